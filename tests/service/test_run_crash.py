"""`pydr run` interrupted or faulty: kill -9 at each crash point of a cycle while a
writer writes into a qemu-storage-daemon disk, then a restart (every point
exact, none recorded twice); SIGTERM while a cycle is held (that cycle ends,
then exit 0); SIGHUP applies a changed policy; an RPO breach (a source that fails every
read) warns, goes critical, alerts, shows in the metrics and recovers. The tests wait on the
service's event lines and on crash points, never on time."""

import json
import os
import shutil
import signal
import subprocess

import pytest

from pydr.dr.vault import Vault

from qemuhelp import cli

from service_fixtures import (MiB, finished, health_event, listening_ports,  # noqa: F401
                              materialize, needs_qemu, points, protect_file, protected_qsd,
                              qsd_disk, round_end, services, set_target, writer_factory)
from writer import check_point, read_log, verify

pytestmark = needs_qemu

#: the crash points a local cycle passes (agent.disk and fleet.recorded are a
#: fleet's: pydr run --scheduler, not run here)
CYCLE_POINTS = ("cycle.cut", "cycle.disk", "cycle.steps", "cycle.point", "retention.recorded",
                "cycle.done")


def point_of(event):
    word, pid = event["message"].split()
    assert word == "point"
    return int(pid)


def check_all_points(vault, seed, log, tmp_path):
    """Every point of "vm" holds the writer's records flushed before its cut;
    returns the records each covers, oldest point first."""
    covered = []
    for p in points(vault, "vm"):
        out = tmp_path / f"check{p.id}"
        path = materialize(vault, "vm", p.id, out)
        covered.append(check_point(path, seed, log, p.cut_at.timestamp(),
                                   p.created_at.timestamp()))
        shutil.rmtree(out)
    return covered


@pytest.mark.parametrize("crash_point", CYCLE_POINTS)
def test_kill_9_at_a_cycle_crash_point_then_a_restart_loses_nothing_and_records_nothing_twice(
        crash_point, protected_qsd, writer_factory, services, tmp_path):
    disk, vault, _ = protected_qsd
    set_target(vault, "vm", 2)
    w = writer_factory(disk, seed=21, rate=2)
    # killed the 2nd time it passes the point: a first point exists by then
    first = services(vault, env={"PYDR_CRASH_AT": f"{crash_point}:2"})
    first.wait_for(finished("vm"))
    assert first.drain() == -signal.SIGKILL, first.proc.stderr.read().decode()
    again = services(vault)
    again.wait_for(finished("vm"))
    n, stopped_at = w.stop()
    while True:
        pid = point_of(again.wait_for(finished("vm")))
        (last,) = [p for p in points(vault, "vm") if p.id == pid]
        if last.cut_at.timestamp() > stopped_at:
            break
    again.signal(signal.SIGTERM)
    assert again.drain() == 0, again.proc.stderr.read().decode()
    verify(materialize(vault, "vm", last.id, tmp_path / "last"), 21, n)
    covered = check_all_points(vault, 21, read_log(w.log), tmp_path)
    assert covered == sorted(covered) and covered[-1] == n, covered
    kept = points(vault, "vm")
    assert len({p.id for p in kept}) == len(kept)
    assert len({p.cut_at for p in kept}) == len(kept), "a cycle recorded twice"
    with Vault(vault) as v:
        assert v.status("vm").state == "protected"
        jobs = v.jobs(item="vm")
    assert not [j for j in jobs if j.state in ("running", "queued")], jobs
    r = cli(vault, "vault", "check")
    assert r.returncode == 0, r.stdout + r.stderr


def stopped(proc):
    """Wait until `proc` (our child) is stopped by a signal (a PYDR_STOP_AT point)."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status


def test_sigterm_while_a_cycle_is_held_ends_that_cycle_then_exits_0(
        protected_qsd, writer_factory, services, tmp_path):
    disk, vault, _ = protected_qsd
    set_target(vault, "vm", 2)
    w = writer_factory(disk, seed=31, rate=2)
    s = services(vault, env={"PYDR_STOP_AT": "cycle.disk:2"})
    stopped(s.proc)  # in its second cycle, its disk replicated, its step not recorded
    s.signal(signal.SIGTERM)  # pending while it is stopped
    s.signal(signal.SIGCONT)
    assert s.drain() == 0, s.proc.stderr.read().decode()
    n, _ = w.stop()
    done = [e for e in s.events if e["operation"] == "replicate" and e["kind"] == "finished"]
    started = [e for e in s.events if e["operation"] == "replicate" and e["kind"] == "started"]
    assert len(done) == 2 and len(started) == 2, s.events  # the held cycle ended, none after
    assert [e["kind"] for e in s.events if e["operation"] == "run"][-1] == "finished"
    pids = [point_of(e) for e in done]
    assert [p.id for p in points(vault, "vm")][-2:] == pids
    covered = check_all_points(vault, 31, read_log(w.log), tmp_path)
    assert covered == sorted(covered) and covered[-1] <= n


def test_sighup_applies_a_policy_changed_while_it_runs(protected_qsd, services, tmp_path):
    """An item without a target is not scheduled; given one through `pydr
    policy` while the service waits, SIGHUP makes it replicate."""
    _, vault, _ = protected_qsd
    s = services(vault)
    round_end = s.wait_for(lambda e: e["operation"] == "run" and e["kind"] == "finished")
    assert "0 succeeded" in round_end["message"] and not points(vault, "vm")
    r = cli(vault, "policy", "vm", "--rpo", "5s")
    assert r.returncode == 0, r.stderr
    s.signal(signal.SIGHUP)
    pid = point_of(s.wait_for(finished("vm")))
    assert [p.id for p in points(vault, "vm")] == [pid]
    s.signal(signal.SIGTERM)
    assert s.drain() == 0
    starts = [e for e in s.events if e["operation"] == "replicate" and e["kind"] == "started"]
    assert len(starts) == 1


def scrape(port):
    """{(item, state): value} of pydr_health from a real GET of the metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "pydr_health":
            for s in family.samples:
                out[(s.labels["item"], s.labels["state"])] = s.value
    return out


def test_an_rpo_breach_warns_then_goes_critical_alerts_and_shows_then_recovers(
        tmp_path, faulty_image, services):
    """Item "bad" (target 2 s, critical at 4 s) has a point; then its source
    fails every read (a FUSE file that fails every read, bind-mounted
    over it) and its
    cycles fail, while item "ok" keeps the rounds coming. bad turns warning
    then critical: a "health" event for each, its alert command gets both
    JSON events, a real scrape of --metrics shows it critical. The fault
    cleared and a cycle run by the operator (waiting for the service's
    lock), bad is ok again, in the events and in the metrics."""
    from pydr.dr.vault import init_vault

    vault = tmp_path / "vault"
    init_vault(vault)
    protect_file(vault, str(tmp_path), "ok", size=MiB)
    source, _ = protect_file(vault, str(tmp_path), "bad", size=MiB)
    # each alert command hands its JSON to the test through a FIFO (the service
    # runs them on a thread of their own: the test reads each, in order, as it comes)
    alerts = tmp_path / "alerts.fifo"
    os.mkfifo(alerts)
    set_target(vault, "ok", 1)
    set_target(vault, "bad", 2, rpo_critical=4.0,
               alert_commands=json.dumps([f"cat > {alerts}"]))
    s = services(vault, "--metrics", "127.0.0.1:0")
    s.wait_for(finished("bad"))
    (port,) = listening_ports(s.proc.pid)
    # the same bytes behind a file system that fails every read
    backing = tmp_path / "backing.img"
    shutil.copyfile(source, backing)
    failing, _ = faulty_image(0, MiB, backing=backing)
    subprocess.run(["mount", "--bind", failing, source], check=True)  # over the source
    try:
        breach_and_recover(s, vault, port, alerts, source)
    finally:
        subprocess.run(["umount", source], capture_output=True)


def next_alert(fifo):
    """The next alert an alert command `cat > FIFO` hands over (its open
    waits for this reader; this read ends when the command ends)."""
    with open(fifo) as f:
        return json.loads(f.read())


def breach_and_recover(s, vault, port, alerts, source):
    s.wait_for(health_event("bad", "warning"))
    s.wait_for(health_event("bad", "critical"))
    assert [e for e in s.events if e["operation"] == "replicate" and e["item"] == "bad"
            and e["kind"] == "failed"]
    sent = [next_alert(alerts), next_alert(alerts)]
    assert [(a["item"], a["new"]) for a in sent] == [("bad", "warning"), ("bad", "critical")]
    assert all(a["type"] == "alert" and a["target_rpo"] == 2 for a in sent[-2:]), sent
    assert sent[-1]["rpo_seconds"] > 4 and sent[-1]["vault"] == str(vault)
    health = scrape(port)
    assert health[("bad", "critical")] == 1 and health[("bad", "ok")] == 0, health
    assert health[("ok", "ok")] == 1, health
    subprocess.run(["umount", source], check=True)  # the fault cleared: the file itself again
    r = cli(vault, "replicate", "bad")
    assert r.returncode == 0, r.stderr
    s.wait_for(health_event("bad", "ok"))
    s.wait_for(round_end)
    health = scrape(port)
    assert health[("bad", "ok")] == 1 and health[("bad", "critical")] == 0, health
    recovered = next_alert(alerts)
    assert (recovered["old"], recovered["new"]) == ("critical", "ok")
    s.signal(signal.SIGTERM)
    assert s.drain() == 0
    with Vault(vault) as v:
        logged = [(a.old, a.new) for a in v.alerts("bad")]
    assert ("ok", "warning") in logged and ("warning", "critical") in logged, logged
    assert ("critical", "ok") in logged, logged

"""Each machine's failure its own: one cycle over several independent items
and a group, with one item's and one group member's source disk gone. The
healthy items get exact points and stay healthy, the broken item carries its
own error, the group gets no point, --json names every item's outcome, the
exit status is 21; once the disks are back a rerun finishes everything.
The same through a fleet (a Dask cluster, tests/dr/test_fleet.py), and a
fleet runs a --cbt qcow2 item and an S3 item on their hosts' workers.

States are reached by removing files, never by timing."""

import json
import os
import shutil
import sqlite3
import subprocess

import pytest

from conftest import PYDR, run_cli, sha
from pydr.dr.vault import Vault
from pydr.errors import CycleFailed
from test_cbt import qemu_io, raw_sha
from test_fleet import make_cluster, scribble, write_disk
from test_s3 import s3, swift  # noqa: F401  (fixtures: a Swift server, a bucket)

ALONE = ("a", "b", "c")
GROUP = ("g1", "g2")
BROKEN = ("b", "g2")  # their source disks go away
HOSTS = {"a": "hv-a", "b": "hv-b", "c": "hv-a", "g1": "hv-a", "g2": "hv-b"}


def setup_items(tmp_path, hosts=False, remote=()):
    """Items a, b, c and group g1+g2; those in `remote` have their replica
    on host "siteb", reached through dying_rsh(tmp_path)."""
    vault = tmp_path / "vault"
    assert run_cli("vault", "init", vault).returncode == 0
    items = {}
    for n, name in enumerate(ALONE + GROUP):
        source, replica = tmp_path / "site-a" / f"{name}.img", tmp_path / "site-b" / f"{name}.img"
        source.parent.mkdir(exist_ok=True)
        replica.parent.mkdir(exist_ok=True)
        write_disk(source, n)
        args = ["protect", name, "--disk", f"{source}={replica}", "--vault", vault]
        if name in remote:
            args[3] = f"{source}=siteb:{replica}"
            args += ["--rsh", dying_rsh(tmp_path), "--remote-pydr", PYDR]
        if name in GROUP:
            args += ["--group", "shop"]
        if hosts:
            args += ["--host", HOSTS[name]]
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
        items[name] = source
    return str(vault), items


def dying_rsh(tmp_path):
    """An --rsh that fails as ssh to a dead host does while tmp_path/dead
    exists, and otherwise runs the command here (as tests/local_rsh)."""
    rsh = tmp_path / "rsh"
    rsh.write_text(f"""#!/bin/sh
if [ -e '{tmp_path / "dead"}' ]; then
    echo "ssh: connect to host $1 port 22: Connection refused" >&2; exit 255
fi
shift
exec sh -c "$*"
""")
    rsh.chmod(0o755)
    return str(rsh)


def replicate_all(vault, *extra):
    return run_cli("replicate", "--all", *extra, "--vault", vault)


def record(vault, items, history, names):
    """history[item][point id] = sha of its source now, for the newest point of `names`."""
    with Vault(vault) as v:
        for name in names:
            history.setdefault(name, {})[v.store.points(name)[-1]["id"]] = sha(items[name])


def check_points(vault, history, tmp_path):
    """Every point of every item is exactly its source at that cycle."""
    with Vault(vault, writer=True) as v:
        for name, points in history.items():
            assert [p["id"] for p in v.store.points(name)] == sorted(points), name
            for pid, want in points.items():
                out = tmp_path / "check" / name / str(pid)
                (path,) = v.materialize(name, pid, str(out)).paths
                assert sha(path) == want, (name, pid)
                shutil.rmtree(out)


def break_and_check(vault, items, history, tmp_path, extra=()):
    """Change every source, remove the broken ones, replicate --all: the
    outcomes, the exit status, each item's health and points."""
    for n, name in enumerate(items):
        scribble(items[name], 100 + n)
    for name in BROKEN:
        os.rename(items[name], f"{items[name]}.gone")
    r = replicate_all(vault, "--json", *extra)
    assert r.returncode == 21, r.stderr
    assert b"3 of 5 items failed" in r.stderr and b"Traceback" not in r.stderr
    result = json.loads(r.stdout)
    outcomes = {o["item"]: o for o in result["outcomes"]}
    assert sorted(outcomes) == sorted(items)
    assert sorted(result["items"]) == ["a", "c"]
    for name in ("a", "c"):
        o = outcomes[name]
        assert o["status"] == "succeeded" and o["point_id"] == result["point_id"] is not None
        assert o["error"] is None and o["exit_code"] is None and o["recoverable"] is None
    for name in BROKEN:  # each carries its own error: its disk's path, exit 3 (not found)
        o = outcomes[name]
        assert o["status"] == "failed" and o["exit_code"] == 3 and o["point_id"] is None
        assert str(items[name]) in o["error"], o
    o = outcomes["g1"]  # the group is all-or-nothing: g1 fails with g2's error
    assert o["status"] == "failed" and str(items["g2"]) in o["error"]
    record(vault, items, history, ["a", "c"])
    with Vault(vault) as v:
        for name in ("a", "c"):
            st = v.status(name).to_dict()
            assert st["health"] == "ok" and st["last_error"] is None and st["point_count"] == 2
        for name in BROKEN + ("g1",):
            st = v.status(name).to_dict()
            assert st["point_count"] == 1, name  # the group gets no point
            assert st["health"] == "critical" and st["operation"] is None
        assert str(items["b"]) in v.status("b").to_dict()["last_error"]
        g1 = v.status("g1").to_dict()["last_error"]  # failed with the member whose disk is gone
        assert g1.startswith("group member g2 failed: ") and str(items["g2"]) in g1, g1
        assert str(items["g2"]) in v.status("g2").to_dict()["last_error"]
        jobs = [j for j in v.store.jobs() if j["kind"] == "replicate"][-5:]
        assert {j["item"]: j["state"] for j in jobs} == {
            "a": "succeeded", "b": "failed", "c": "succeeded", "g1": "failed", "g2": "failed"}
    return result


def repair_and_rerun(vault, items, history, tmp_path, extra=()):
    for name in BROKEN:
        os.rename(f"{items[name]}.gone", items[name])
    r = replicate_all(vault, "--json", *extra)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert sorted(result["items"]) == sorted(items)
    assert all(o["status"] == "succeeded" for o in result["outcomes"])
    record(vault, items, history, list(items))
    with Vault(vault) as v:
        assert all(v.status(n).to_dict()["health"] == "ok" for n in items)
        assert v.store.points("g1")[-1]["id"] == v.store.points("g2")[-1]["id"]  # one point for the group
    check_points(vault, history, tmp_path)


def test_one_broken_machine_does_not_stop_the_others(tmp_path):
    vault, items = setup_items(tmp_path)
    assert replicate_all(vault).returncode == 0
    history = {}
    record(vault, items, history, list(items))
    break_and_check(vault, items, history, tmp_path)
    check_points(vault, history, tmp_path)
    r = replicate_all(vault)  # the text says which items failed and why
    assert r.returncode == 21
    lines = r.stdout.decode().splitlines()
    assert lines[0].startswith("point ") and lines[0].endswith(" s") and "for a, c:" in lines[0]
    assert sorted(line.split(":")[0] for line in lines[1:]) == ["b", "g1", "g2"]
    assert "b: failed: " in lines[1] and str(items["b"]) in lines[1]
    record(vault, items, history, ["a", "c"])
    repair_and_rerun(vault, items, history, tmp_path)


def test_the_api_raises_one_error_with_every_outcome(tmp_path):
    vault, items = setup_items(tmp_path)
    os.rename(items["b"], f"{items['b']}.gone")
    with Vault(vault, writer=True) as v:
        with pytest.raises(CycleFailed) as caught:
            v.replicate(["a", "b"])
        result = caught.value.result
        assert [(o.item, o.status) for o in result.outcomes] == [("a", "succeeded"),
                                                                 ("b", "failed")]
        assert result.items == ("a",) and v.store.points("a") and not v.store.points("b")
        with pytest.raises(FileNotFoundError):  # one item: its own error, as before
            v.replicate("b")
        v.replicate("c")
        assert v.status("c").to_dict()["health"] == "ok"


def test_a_failure_while_recording_an_item_is_its_own(tmp_path, monkeypatch):
    """The vault's disk fills while a's retention runs, after its point is
    recorded: a keeps its point (it is protected) and says why it is not ok
    (health warning, last_error), the next retention tries again; c is
    recorded and ends as usual."""
    import errno

    from pydr.dr import cycle

    real = cycle.apply_retention

    def full(vault, name, now=None):
        if name == "a":
            raise OSError(errno.ENOSPC, "No space left on device", vault.dir)
        return real(vault, name, now)

    monkeypatch.setattr(cycle, "apply_retention", full)
    vault, items = setup_items(tmp_path)
    with Vault(vault, writer=True) as v:
        result = v.replicate(["a", "c"])
        outcomes = {o.item: o for o in result.outcomes}
        assert outcomes["c"].status == "succeeded" and v.status("c").to_dict()["health"] == "ok"
        assert outcomes["a"].status == "succeeded" and len(v.points("a")) == 1
        st = v.status("a").to_dict()
        assert st["health"] == "warning" and "No space left" in st["last_error"]
        assert "retention" in st["last_error"]
        assert [j["state"] for j in v.store.jobs() if j["kind"] == "replicate"] == ["succeeded",
                                                                              "succeeded"]


def test_retry_retries_only_the_items_that_may_recover(tmp_path):
    """A missing disk is not recoverable: --retry does not retry it (a retry
    would run the healthy items again and give them a second point)."""
    vault, items = setup_items(tmp_path)
    os.rename(items["b"], f"{items['b']}.gone")
    r = run_cli("replicate", "--all", "--retry", "--json", "--vault", vault)
    assert r.returncode == 21, r.stderr
    outcomes = {o["item"]: o for o in json.loads(r.stdout)["outcomes"]}
    assert outcomes["b"]["status"] == "failed" and not outcomes["b"]["recoverable"]
    with Vault(vault) as v:
        assert [len(v.store.points(n)) for n in sorted(items)] == [1, 0, 1, 1, 1]
        assert all(v.status(n).to_dict()["failed_attempts"] == 0 for n in items)


def test_retry_retries_only_the_recoverable_items(tmp_path, monkeypatch):
    """b's first capture loses its connection (recoverable), c's disk is
    gone (not): the retry runs b alone, and the result has every item's
    last outcome."""
    from pydr.dr import stepcapture
    from pydr.dr.retry import RetryPolicy

    vault, items = setup_items(tmp_path)
    real, calls = stepcapture.capture, []

    def flaky(v, names, opts, jobs):
        calls.append(list(names))
        if names == ["b"] and calls.count(["b"]) == 1:
            raise ConnectionResetError(104, "connection reset by the replica's host")
        return real(v, names, opts, jobs)

    monkeypatch.setattr(stepcapture, "capture", flaky)
    os.rename(items["c"], f"{items['c']}.gone")
    slept = []
    with Vault(vault, writer=True) as v:
        with pytest.raises(CycleFailed) as caught:
            v.replicate(list(items), retry=True, policy=RetryPolicy(sleep=slept.append))
        assert calls == [["a"], ["b"], ["c"], ["g1", "g2"], ["b"]]
        assert len(slept) == 1
        result = caught.value.result
        assert {o.item: o.status for o in result.outcomes} == {
            "a": "succeeded", "b": "succeeded", "c": "failed", "g1": "succeeded",
            "g2": "succeeded"}
        assert sorted(result.items) == ["a", "b", "g1", "g2"]
        assert [len(v.store.points(n)) for n in sorted(items)] == [1, 1, 0, 1, 1]
        assert v.status("b").to_dict()["health"] == "ok" and v.status("c").to_dict()["health"] == "critical"


def test_the_same_through_a_fleet(tmp_path):
    vault, items = setup_items(tmp_path, hosts=True)
    with make_cluster(sorted(set(HOSTS.values())), tmp_path) as cluster:
        fleet = ("--scheduler", cluster.scheduler_address)
        r = replicate_all(vault, *fleet)
        assert r.returncode == 0, r.stderr
        history = {}
        record(vault, items, history, list(items))
        break_and_check(vault, items, history, tmp_path, fleet)
        with Vault(vault) as v:  # the healthy items' work ran on their hosts
            ran = {j["item"]: j["host"] for j in v.store.jobs()
                   if j["kind"] == "replicate" and j["state"] == "succeeded"}
        assert ran == HOSTS
        repair_and_rerun(vault, items, history, tmp_path, fleet)


def qcow2_image(path):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    qemu_io(path, "write -P 0x11 0 8M", "write -P 0x22 32M 4M")


def bitmaps(image):
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(image)],
                                     check=True, capture_output=True).stdout)
    return sorted(b["name"] for b in info.get("format-specific", {}).get("data", {})
                  .get("bitmaps", ()))


@pytest.mark.skipif(not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "qemu-nbd")),
                    reason="needs qemu-utils (scripts/bootstrap installs them)")
def test_a_fleet_replicates_a_cbt_item_and_an_s3_item_on_their_hosts(s3, tmp_path):  # noqa: F811
    ctx = s3
    vault = ctx["vault"]
    image = tmp_path / "vm.qcow2"
    qcow2_image(image)
    raw = tmp_path / "obj.img"
    write_disk(raw, 7, size=8 << 20)
    for args in (["vm", "--cbt", "--host", "hv-a", "--disk", f"{image}={tmp_path / 'vm.img'}"],
                 ["obj", "--host", "hv-b", "--disk", f"{raw}={ctx['url']}"]):
        r = run_cli("protect", *args, "--vault", vault, env=ctx["env"])
        assert r.returncode == 0, r.stderr
    history = {"vm": {}, "obj": {}}
    marker = tmp_path / "killed"
    for cycle in range(3):
        if cycle:
            qemu_io(image, f"write -P 0x3{cycle} {cycle * 8}M 64k")
            scribble(raw, cycle)
        # the last cycle's first try dies on hv-a after its transfer, before it returns: the
        # worker's Nanny restarts it and the task runs again from the bitmaps the vault knows
        env = {"PYDR_CRASH_AT": "agent.disk", "PYDR_CRASH_ONCE": str(marker)} \
            if cycle == 2 else None
        with make_cluster(["hv-a", "hv-b"], tmp_path, env=env) as cluster:
            r = run_cli("replicate", "--all", "--scheduler", cluster.scheduler_address,
                        "--json", "--vault", vault, env=ctx["env"])
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        assert sorted(result["items"]) == ["obj", "vm"]
        history["vm"][result["point_id"]] = raw_sha(image, tmp_path)
        history["obj"][result["point_id"]] = sha(raw)
        with sqlite3.connect(os.path.join(vault, "vault.db")) as db:
            bitmap, generation = db.execute(
                "SELECT bitmap, generation FROM disks WHERE item='vm'").fetchone()
        assert (bitmap, generation) == (f"pydr-{cycle + 1}", cycle + 1)
        # the bitmap of the point before is dropped by the host's next cut
        assert bitmaps(image) == sorted({f"pydr-{cycle + 1}", f"pydr-{max(cycle, 1)}"})
    assert marker.exists()  # a worker did die there
    with Vault(vault) as v:
        ran = [(j["item"], j["host"], j["state"]) for j in v.store.jobs() if j["kind"] == "replicate"]
        bytes_vm = [j["bytes_transferred"] for j in v.store.jobs() if j["item"] == "vm"
                    and j["kind"] == "replicate"]
    assert sorted(set(ran)) == [("obj", "hv-b", "succeeded"), ("vm", "hv-a", "succeeded")]
    assert len(ran) == 6
    assert all(b <= 64 << 10 for b in bytes_vm[1:]), bytes_vm  # only what the bitmap said
    r = run_cli("verify", "obj", "--json", "--vault", vault, env=ctx["env"])
    assert r.returncode == 0 and json.loads(r.stdout)["problems"] == []
    with Vault(vault, writer=True) as v:
        for name, points in history.items():
            assert [p["id"] for p in v.store.points(name)] == sorted(points)
            for pid, want in points.items():
                (path,) = v.materialize(name, pid,
                                        str(tmp_path / "check" / name / str(pid))).paths
                assert sha(path) == want, (name, pid)


def test_retry_that_gives_up_on_one_item_reports_every_item(tmp_path):
    """b's site is dead on every attempt: the last attempt retries b alone,
    and the call still ends in CycleFailed with every item's last outcome
    (a's and c's from the first attempt), and no retry left scheduled."""
    from pydr.dr.retry import RetryPolicy

    vault, items = setup_items(tmp_path, remote={"b"})
    (tmp_path / "dead").touch()
    with Vault(vault, writer=True) as v:
        with pytest.raises(CycleFailed) as caught:
            v.replicate(["a", "b", "c"], retry=True,
                        policy=RetryPolicy(sleep=lambda s: None, max_attempts=3))
        result = caught.value.result
        outcomes = {o.item: o for o in result.outcomes}
        assert {n: o.status for n, o in outcomes.items()} == {
            "a": "succeeded", "b": "failed", "c": "succeeded"}
        b = outcomes["b"]
        assert (b.exit_code, b.recoverable) == (18, True) and "Connection refused" in b.error
        assert result.items == ("a", "c")
        assert result.point_id == outcomes["a"].point_id == outcomes["c"].point_id is not None
        assert [len(v.store.points(n)) for n in "abc"] == [1, 0, 1]
        assert [j["state"] for j in v.store.jobs() if j["item"] == "b" and j["kind"] == "replicate"] \
            == ["failed"] * 3  # three attempts ran
        for n in "abc":
            st = v.status(n).to_dict()
            assert st["failed_attempts"] == 0 and st["next_retry"] is None, (n, st)
        st = v.status("b").to_dict()
        assert st["health"] == "warning" and "Connection refused" in st["last_error"]


def test_points_of_a_retried_call_are_named_per_item(tmp_path, capsys):
    """b's site comes back during the wait: b's point is not a's and c's, so
    the result has no one point id and the CLI names each point's items."""
    import argparse

    from pydr.cli.vault import _print_cycles
    from pydr.dr.retry import RetryPolicy

    vault, items = setup_items(tmp_path, remote={"b"})
    dead = tmp_path / "dead"
    dead.touch()
    with Vault(vault, writer=True) as v:
        result = v.replicate(["a", "b", "c"], retry=True,
                             policy=RetryPolicy(sleep=lambda s: dead.unlink(missing_ok=True)))
        ids = {o.item: o.point_id for o in result.outcomes}
        assert all(o.status == "succeeded" for o in result.outcomes)
        assert ids["a"] == ids["c"] != ids["b"] and None not in ids.values()
        assert {n: v.store.points(n)[-1]["id"] for n in "abc"} == ids
        assert result.point_id is None and result.items == ("a", "b", "c")
    _print_cycles(argparse.Namespace(json=False), result)
    line = capsys.readouterr().out.splitlines()[0]
    # ext4 has no reflink and no hooks ran: the sources were read as they were
    assert line.startswith(f"points {ids['a']} for a, c; {ids['b']} for b (inconsistent): ")


@pytest.mark.parametrize("broken", ["replica gone", "resync required"])
def test_a_group_member_failing_a_check_fails_the_others_on_the_record(tmp_path, broken):
    """g2 fails a check before the group's cycle begins: g1, which failed
    with it, has a failed job, its health and a last_error that says why."""
    from pydr.dr.cyclerecord import mark_resync_required

    vault, items = setup_items(tmp_path)
    assert replicate_all(vault).returncode == 0
    with Vault(vault, writer=True) as v:
        replica = v.disks("g2")[0]["replica"]
        if broken == "replica gone":
            os.rename(replica, f"{replica}.gone")
        else:
            mark_resync_required(v.store, "g2", "change tracking was lost")
    r = replicate_all(vault, "--json")
    assert r.returncode == 21, r.stderr
    outcomes = {o["item"]: o for o in json.loads(r.stdout)["outcomes"]}
    assert {n: o["status"] for n, o in outcomes.items()} == {
        "a": "succeeded", "b": "succeeded", "c": "succeeded", "g1": "failed", "g2": "failed"}
    with Vault(vault) as v:
        g1, g2 = v.status("g1").to_dict(), v.status("g2").to_dict()
        assert g1["last_error"].startswith("group member g2 failed: "), g1
        assert outcomes["g1"]["error"] == g1["last_error"]
        assert g1["health"] == "critical" and g1["operation"] is None and g1["point_count"] == 1
        jobs = [j for j in v.store.jobs() if j["kind"] == "replicate" and j["item"] == "g1"]
        assert [j["state"] for j in jobs] == ["succeeded", "failed"]
        assert jobs[-1]["error"] == g1["last_error"]
        assert g2["health"] != "ok" and g2["last_error"] and g2["point_count"] == 1
        if broken == "replica gone":
            assert replica in g1["last_error"] and replica in g2["last_error"]
        else:  # g2's own record stays the check's
            assert g2["state"] == "resync-required"
            assert g2["last_error"] == "change tracking was lost"


def test_ctrl_c_cancels_the_running_item_and_leaves_the_others(tmp_path):
    """SIGINT while b's disk is replicated (the process stopped at b's
    cycle.disk, then interrupted): b's job is cancelled (its error says so)
    and, as after a kill, its health and last_error stay as they were (an
    operator's stop is no fault); c and the group, never started, keep
    their health; a, done before, has its point. The same command again
    finishes everything."""
    import signal

    vault, items = setup_items(tmp_path)
    assert replicate_all(vault).returncode == 0
    for n, name in enumerate(items):
        scribble(items[name], 200 + n)
    p = subprocess.Popen([PYDR, "replicate", "--all", "--vault", vault], cwd=tmp_path,
                         env=dict(os.environ, PYDR_STOP_AT="cycle.disk:2"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, status = os.waitpid(p.pid, os.WUNTRACED)  # returns once it stopped there
        assert os.WIFSTOPPED(status)
        os.kill(p.pid, signal.SIGINT)
        os.kill(p.pid, signal.SIGCONT)
        _, err = p.communicate()
    finally:
        p.kill()
    assert p.returncode == 130, err
    with Vault(vault) as v:
        st = {n: v.status(n).to_dict() for n in items}
        jobs = {j["item"]: j for j in v.store.jobs() if j["kind"] == "replicate"}
        assert st["a"]["point_count"] == 2 and st["a"]["health"] == "ok"
        assert st["b"]["health"] == "ok" and st["b"]["last_error"] is None, st["b"]
        assert jobs["b"]["error"]
        assert {n: jobs[n]["state"] for n in items} == {
            "a": "succeeded", "b": "cancelled", "c": "cancelled", "g1": "cancelled",
            "g2": "cancelled"}
        for name in ("c", "g1", "g2"):  # never started: as they were
            assert st[name]["health"] == "ok" and st[name]["last_error"] is None, st[name]
            assert st[name]["point_count"] == 1
        assert all(s["operation"] is None for s in st.values())
    r = replicate_all(vault)
    assert r.returncode == 0, r.stderr
    with Vault(vault) as v:
        assert all(v.status(n).to_dict()["health"] == "ok" for n in items)


def test_losing_the_scheduler_fails_what_is_not_back_recoverably(tmp_path):
    """The scheduler goes away once a's task is back (b's host has no worker:
    its task waits): a is recorded, b fails with a recoverable FleetError
    (exit 20), health warning; a later run with a scheduler does b."""
    from pydr.dr.fleet import Fleet

    vault, items = setup_items(tmp_path, hosts=True)
    with make_cluster(["hv-a"], tmp_path) as cluster:
        def lose_the_scheduler(event):
            if event.item == "a" and event.phase == "transfer" and event.disk is None:
                cluster.close()

        with Vault(vault, writer=True) as v, \
                Fleet(cluster.scheduler_address, events=lose_the_scheduler) as fleet:
            with pytest.raises(CycleFailed) as caught:
                v.replicate(["a", "b"], executor=fleet.executor())
            outcomes = {o.item: o for o in caught.value.result.outcomes}
            assert outcomes["a"].status == "succeeded" and len(v.store.points("a")) == 1
            b = outcomes["b"]
            assert (b.status, b.exit_code, b.recoverable) == ("failed", 20, True), b
            assert "lost the Dask scheduler" in b.error
            st = v.status("b").to_dict()
            assert st["health"] == "warning" and st["operation"] is None and not v.store.points("b")
            assert [j["state"] for j in v.store.jobs()
                    if j["item"] == "b" and j["kind"] == "replicate"] == ["failed"]
    with make_cluster(["hv-b"], tmp_path) as cluster, Vault(vault, writer=True) as v, \
            Fleet(cluster.scheduler_address) as fleet:
        v.replicate(["b"], executor=fleet.executor())
        assert v.status("b").to_dict()["health"] == "ok" and len(v.store.points("b")) == 1


def test_a_base_mismatch_on_a_remote_replica_is_that_item_s(tmp_path, monkeypatch):
    """g2's replica is on host siteb: a BaseMismatch it reports (path
    siteb:PATH) breaks g2's chain only, never g1's points."""
    from pydr.dr import stepcapture
    from pydr.errors import BaseMismatch

    vault, items = setup_items(tmp_path, remote={"g2"})
    assert replicate_all(vault).returncode == 0
    real = stepcapture.transfer_disk

    def lying(source, replica, **kwargs):
        if replica.spec.startswith("siteb:"):
            raise BaseMismatch("read-back verification failed (on siteb)", path=replica.spec,
                               offset=0)
        return real(source, replica, **kwargs)

    monkeypatch.setattr(stepcapture, "transfer_disk", lying)
    with Vault(vault, writer=True) as v:
        with pytest.raises(BaseMismatch):
            v.replicate(["g1", "g2"])
        assert v.status("g1").to_dict()["damaged_points"] == [] and v.status("g1").to_dict()["state"] == "protected"
        assert v.status("g2").to_dict()["damaged_points"] == [p["id"] for p in v.store.points("g2")]
        assert v.status("g2").to_dict()["state"] == "resync-required"


def test_a_bug_in_one_item_is_reported_as_a_bug(tmp_path, monkeypatch):
    """An internal error in one item's cycle is not hidden behind 'some
    items failed': CycleFailed is chained to it (the CLI then exits 1,
    saying it is an internal error, after every item's outcome)."""
    import pydr.dr.stepcapture as S
    from pydr.dr.vault import Vault, init_vault
    from pydr.errors import CycleFailed

    vault = tmp_path / "vault"
    init_vault(str(vault))
    for n in ("a", "b"):
        (tmp_path / f"{n}.img").write_bytes(os.urandom(1 << 20))
    real = S.capture

    def buggy(vault, names, *args, **kwargs):
        if "b" in names:
            return None.missing  # an AttributeError: a bug, not damage
        return real(vault, names, *args, **kwargs)

    monkeypatch.setattr(S, "capture", buggy)
    with Vault(str(vault), writer=True) as v:
        for n in ("a", "b"):
            v.protect(n, [(str(tmp_path / f"{n}.img"), str(tmp_path / f"{n}-r.img"))])
        with pytest.raises(CycleFailed) as info:
            v.replicate(["a", "b"])
        assert isinstance(info.value.__cause__, AttributeError)
        outcomes = {o.item: o for o in info.value.result.outcomes}
        assert outcomes["a"].status == "succeeded" and outcomes["b"].exit_code == 1

"""Alert commands (pydr.dr.alerting): real shell commands get the alert JSON
on stdin and PYDR_ALERT_* in their environment; a failing, hanging or
unstartable one is reported (never by its text, which may hold a token)
and never raises; and a breach end to end at the unit level (health,
alerts, metrics over a real vault). A hanging command blocks on a FIFO nobody writes: the
test waits on the process itself (a pidfd), never on the clock."""

import datetime
import json
import os
import select
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pydr.dr.alerting import alert_event, run_alert_commands
from pydr.dr.health import Transition, check_transitions, rpo_health
from pydr.dr.metrics import ServiceMetrics
from pydr.dr.policy import Policy
from pydr.dr.rpo import rpo_facts
from pydr.dr.vault import Vault, init_vault
from pydr.errors import PydrError

AT = datetime.datetime(2026, 12, 7, 5, 30, 0, tzinfo=datetime.timezone.utc).timestamp()


def event(item="web", **changes):
    t = Transition(item=item, old="ok", new="warning", rpo_seconds=12.5, target_rpo=10.0,
                   at=AT, message="ok -> warning: RPO 12.5 s > target 10 s")
    return dict(alert_event(t, "/srv/vault"), **changes)


def test_the_command_gets_the_json_and_the_environment(tmp_path):
    out, env = tmp_path / "stdin.json", tmp_path / "env"
    problems = run_alert_commands(
        [f"cat > {out}",
         f'printf "%s|%s|%s" "$PYDR_ALERT_ITEM" "$PYDR_ALERT_HEALTH" "$PYDR_ALERT_VAULT" > {env}'],
        event())
    assert problems == []
    got = json.loads(out.read_text())
    assert got == {"type": "alert", "version": 1, "item": "web", "old": "ok", "new": "warning",
                   "rpo_seconds": 12.5, "target_rpo": 10.0, "at": "2026-12-07T05:30:00.000000Z",
                   "message": "ok -> warning: RPO 12.5 s > target 10 s", "vault": "/srv/vault"}
    assert out.read_text().endswith("}\n") and out.read_text().count("\n") == 1
    assert env.read_text() == "web|warning|/srv/vault"


def test_an_item_name_is_never_shell_syntax(tmp_path):
    """Values reach the command only through the environment and stdin."""
    marker = tmp_path / "injected"
    got = tmp_path / "item"
    name = f"web; touch {marker}"
    assert run_alert_commands([f'printf %s "$PYDR_ALERT_ITEM" > {got}'], event(item=name)) == []
    assert got.read_text() == name and not marker.exists()


def test_a_failing_command_is_reported_by_number_not_text(tmp_path):
    secret = "token=hunter2"
    after = tmp_path / "after"
    problems = run_alert_commands(
        [f"echo curl failed >&2; : {secret}; exit 3", f"touch {after}"], event())
    assert len(problems) == 1
    assert problems[0] == "alert command 1 of 2 of item 'web' exited with status 3: curl failed"
    assert secret not in problems[0]
    assert after.exists()  # the next command still ran


def test_a_killed_command_is_reported():
    [problem] = run_alert_commands(["kill -9 $$"], event())
    assert problem == "alert command 1 of 1 of item 'web' was killed by signal 9"


def test_a_hanging_command_is_killed_with_its_group(tmp_path):
    """The command starts a child blocked opening a FIFO nobody writes and
    waits for it: at the timeout both are killed (the process group), the
    problem says so with what it printed, and the next command runs."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    child_pid, after = tmp_path / "child.pid", tmp_path / "after"
    problems = run_alert_commands(
        [f"echo waiting; cat {fifo} > /dev/null & echo $! > {child_pid}; wait",
         f"touch {after}"], event(), timeout=0.5)
    assert problems == ["alert command 1 of 2 of item 'web' did not finish within 0.5 s and "
                        "was killed; it printed: waiting"]
    assert after.exists()
    # the child got the group's SIGKILL: wait for its end on a pidfd (no
    # clock; the bound only turns a hang into a failure)
    try:
        pidfd = os.pidfd_open(int(child_pid.read_text()))
    except ProcessLookupError:
        return  # already dead and reaped
    try:
        readable, _, _ = select.select([pidfd], [], [], 60)
        assert readable == [pidfd], "the hanging command's child outlived the kill"
    finally:
        os.close(pidfd)
    # and nothing reads the FIFO any more
    with pytest.raises(OSError) as err:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert err.value.errno == 6  # ENXIO: no reader


def test_the_commands_run_at_the_same_time(tmp_path):
    """The first command waits for what the second writes into a FIFO: run
    one after the other, the first would never end; together both succeed.
    Two that hang share one timeout and are both killed."""
    fifo, got = tmp_path / "fifo", tmp_path / "got"
    os.mkfifo(fifo)
    assert run_alert_commands([f"cat {fifo} > {got}", f"echo handed over > {fifo}"],
                              event(), timeout=120) == []
    assert got.read_text() == "handed over\n"
    other = tmp_path / "other"
    os.mkfifo(other)
    problems = run_alert_commands([f"cat {other}", f"cat {other}"], event(), timeout=0.5)
    assert problems == [f"alert command {n} of 2 of item 'web' did not finish within 0.5 s "
                        "and was killed" for n in (1, 2)]


def test_a_command_that_ignores_stdin_does_not_block():
    """A large alert and a command that never reads it: no EPIPE, no wait."""
    big = event(message="x" * (4 << 20))
    assert run_alert_commands(["exit 0", "exec 0<&-; true"], big) == []


def test_bad_input_is_reported_not_raised():
    assert run_alert_commands(["true"], {"item": "web", "bad": object()})[0].startswith(
        "the alert of item 'web' could not be made JSON")
    assert run_alert_commands(["true"], ["not", "a", "dict"])[0].startswith(
        "the alert of item None could not be made JSON: an alert is a dict, not list")
    [problem] = run_alert_commands(["echo \0"], event())  # a NUL cannot be in a command line
    assert problem == "alert command 1 of 1 of item 'web' could not start: embedded null byte"
    assert run_alert_commands([], event()) == []


def test_a_breach_alerts_twice_shows_in_metrics_and_recovers(tmp_path):
    """The unit-level breach (pydr run's end-to-end one is F's): the item's
    source goes missing, so its cycles fail and its point ages (the clock
    is a fake `now`, advanced by the test). Judged past the target, then
    past the critical RPO, each change runs the alert command once with its
    JSON, and a real scrape shows the health; the source back, a cycle
    makes a point and the item recovers to ok (a third alert)."""
    received = tmp_path / "alerts.jsonl"
    policy = Policy(target_rpo=10.0, alert_commands=(f"cat >> {received}",))
    source = tmp_path / "web.img"
    source.write_bytes(os.urandom(1 << 20))
    init_vault(tmp_path / "v")
    metrics = ServiceMetrics()
    port = metrics.serve("127.0.0.1", 0)

    def health_served():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
            families = text_string_to_metric_families(r.read().decode())
        return {s.labels["state"] for f in families if f.name == "pydr_health"
                for s in f.samples if s.value == 1}

    def round_at(v, now):
        """What a pydr run round does with these parts after its cycles, at `now`."""
        for t in check_transitions(v.store, ["web"], now, {"web": policy}):
            assert run_alert_commands(policy.alert_commands,
                                      alert_event(t, str(tmp_path / "v"))) == []
        facts = rpo_facts(v, "web", now=now)
        metrics.set_item("web", facts.rpo_seconds, policy.target_rpo,
                         rpo_health(policy, facts, v.store.item("web"), now))

    try:
        with Vault(tmp_path / "v", writer=True) as v:
            v.protect("web", [(str(source), str(tmp_path / "web.replica"))])
            assert not v.replicate(["web"]).failed
            cut = v.store.points("web")[-1].data_time
            round_at(v, cut + 1)
            assert health_served() == {"ok"} and not received.exists()

            source.rename(tmp_path / "away.img")  # the disk is gone: cycles fail
            with pytest.raises((OSError, PydrError)):
                v.replicate(["web"])
            assert len(v.store.points("web")) == 1  # the failed cycle made no point
            metrics.observe_cycle("web", 0.1, 0, 0, 0, ok=False)
            round_at(v, cut + 12)
            assert health_served() == {"warning"}
            round_at(v, cut + 15)  # still warning: no second alert
            round_at(v, cut + 25)
            assert health_served() == {"critical"}

            (tmp_path / "away.img").rename(source)
            assert not v.replicate(["web"]).failed
            again = v.store.points("web")[-1].data_time
            round_at(v, again + 1)
            assert health_served() == {"ok"}
    finally:
        metrics.close()
    got = [json.loads(line) for line in received.read_text().splitlines()]
    assert [(a["old"], a["new"]) for a in got] == [("ok", "warning"), ("warning", "critical"),
                                                   ("critical", "ok")]
    assert all(a["type"] == "alert" and a["item"] == "web" and a["target_rpo"] == 10.0
               and a["vault"] == str(tmp_path / "v") for a in got)
    assert got[0]["rpo_seconds"] == pytest.approx(12.0)
    assert got[1]["message"] == "warning -> critical: RPO 25 s > critical 20 s"


def test_a_flooding_command_keeps_only_the_end_of_its_output():
    """A command that prints 16 MiB: what pydr keeps of it is its last
    4 KiB, never all of it. The command asks, after printing, how much its
    stdout holds (before the fix: a temporary file of all of it)."""
    [problem] = run_alert_commands(
        ["head -c 16M /dev/zero | tr '\\0' x; echo; "
         "echo held $(stat -L -c %s /proc/$$/fd/1) bytes; exit 3"], event(), timeout=120)
    assert problem.startswith("alert command 1 of 1 of item 'web' exited with status 3: xxx")
    held = int(problem.split("held ")[1].split(" bytes")[0])
    assert held < 4096, problem
    assert len(problem) < 600


def test_the_logged_output_has_its_control_characters_escaped(caplog):
    """An alert command's output could move the terminal of whoever reads
    the log (ESC sequences) or forge lines: control characters are escaped."""
    [problem] = run_alert_commands(["printf 'a\\033[2Jb\\001c\\rd'; exit 1"], event())
    assert problem.endswith(": a\\x1b[2Jb\\x01c d"), problem
    assert "\x1b" not in caplog.text and "\x01" not in caplog.text

"""pydr run's loop (pydr.dr.service, pydr run): rounds over plain file
disks. In-process rounds use a fake clock; the CLI's are read through its
--events lines, held at crash points (PYDR_STOP_AT) -- never sleeps."""

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from pydr.dr import stepcapture
from pydr.dr.service import Service
from pydr.dr.vault import Vault, init_vault

MiB = 1 << 20


def pydr_exe():
    return os.path.join(os.path.dirname(sys.executable), "pydr")


def pydr(*args, env=None):
    return subprocess.run([pydr_exe()] + [str(a) for a in args], capture_output=True, text=True,
                          timeout=300, cwd="/tmp", env={**os.environ, **(env or {})})


class Running:
    """`pydr run --events` as a child; its event lines read by a thread
    into a queue, so a test waits for an event, bounded only to end a test
    that failed."""

    def __init__(self, vault, *args, env=None):
        self.proc = subprocess.Popen([pydr_exe(), "run", "--vault", str(vault), "--events"]
                                     + [str(a) for a in args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd="/tmp",
                                     env={**os.environ, **(env or {})})
        self.lines = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def wait_for(self, pred, timeout=120):
        """The first event from now on for which pred(event) holds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                e = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no such event within {timeout} s; seen {self.seen[-5:]}")
            if e is None:
                raise AssertionError(f"pydr run ended (rc {self.proc.wait()}): "
                                     f"{self.proc.stderr.read()}")
            self.seen.append(e)
            if pred(e):
                return e

    def round_end(self, timeout=120):
        return self.wait_for(lambda e: e["operation"] == "run" and e["kind"] == "finished",
                             timeout)

    def stop(self):
        """SIGTERM; the exit status (the rest of the events read)."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=300)
        while True:
            e = self.lines.get(timeout=60)
            if e is None:
                return rc
            self.seen.append(e)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def replicated(e, item):
    return e["operation"] == "replicate" and e["kind"] == "finished" and e["item"] == item


@pytest.fixture
def vault(tmp_path):
    """A vault with items a, b, c on 1 MiB file disks (no point, no policy)."""
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        for name in "abc":
            src = tmp_path / f"{name}.img"
            src.write_bytes(os.urandom(MiB))
            v.protect(name, [(str(src), str(tmp_path / f"r{name}.img"))])
    return tmp_path / "v"


def points(vault, name):
    with Vault(vault) as v:
        return v.points(name)


# -- rounds in this process -------------------------------------------------------------


def test_an_item_past_half_its_target_is_replicated_one_not_due_is_not(vault):
    with Vault(vault, writer=True) as v:
        v.set_policy("a", target_rpo=100)
        v.set_policy("b", target_rpo=10000)
        v.replicate(["a", "b"])
        newest = max(v.store.points(n)[-1].data_time for n in "ab")
    now = newest + 60  # a's data is 60 s old (>= 50), b's too (< 5000); c has no target
    result = Service(vault, clock=lambda: now, warm=False).run_once()
    assert (result.due, result.succeeded, result.failed) == (["a"], ["a"], {})
    assert result.skipped["b"].startswith("not due until")
    assert result.skipped["c"] == "no target RPO"
    assert [len(points(vault, n)) for n in "abc"] == [2, 1, 0]
    assert result.exit_code() == 0


def test_items_without_a_point_are_due_and_run_in_one_round(vault):
    with Vault(vault, writer=True) as v:
        for n in "abc":
            v.set_policy(n, target_rpo=60)
    result = Service(vault, jobs=3, warm=False).run_once()
    assert sorted(result.succeeded) == ["a", "b", "c"] and result.failed == {}
    for n in "abc":
        assert len(points(vault, n)) == 1
        with open(vault.parent / f"{n}.img", "rb") as src, \
                open(vault.parent / f"r{n}.img", "rb") as replica:
            assert src.read() == replica.read()


def test_resync_required_is_replicated_as_a_resync(vault):
    with Vault(vault, writer=True) as v:
        v.set_policy("a", target_rpo=60)
        v.replicate("a")
        v.store.set_item("a", state="resync-required", last_error="tracking lost")
    with Vault(vault) as v:
        data = v.store.points("a")[-1].data_time
    result = Service(vault, clock=lambda: data + 30, warm=False).run_once()
    assert result.succeeded == ["a"]
    with Vault(vault) as v:
        assert v.item("a")["state"] == "protected"


def test_a_pydr_bug_in_one_items_cycle_is_logged_and_the_others_go_on(vault, monkeypatch,
                                                                       caplog):
    real = stepcapture.capture

    def capture(v, names, opts, jobs):
        if "a" in names:
            raise RuntimeError("a bug in the capture")
        return real(v, names, opts, jobs)

    monkeypatch.setattr(stepcapture, "capture", capture)
    with Vault(vault, writer=True) as v:
        for n in "ab":
            v.set_policy(n, target_rpo=60)
    clock = [time.time()]
    service = Service(vault, jobs=1, clock=lambda: clock[0], warm=False)
    with caplog.at_level(logging.ERROR, logger="pydr.service"):
        result = service.run_once()
    assert result.succeeded == ["b"] and list(result.failed) == ["a"]
    assert "a bug in the capture" in result.failed["a"]
    assert result.exit_code() == 1  # a bug, as the CLI would say it
    bug = [r for r in caplog.records if "pydr bug" in r.getMessage()]
    assert bug and bug[0].exc_info[0] is RuntimeError
    with Vault(vault) as v:
        a = v.item("a")
        # the retry schedule's first minute, capped at half the 60 s target
        assert a["attempts"] == 1 and a["next_retry"] == pytest.approx(clock[0] + 30, abs=1)
        assert "a bug in the capture" in a["last_error"]
    # the next round: a waits for its retry, b is not due; nothing fails
    result = service.run_once()
    assert result.due == [] and result.skipped["a"].startswith("retry at")
    # at its retry time, and fixed: it succeeds and its schedule is cleared
    monkeypatch.setattr(stepcapture, "capture", real)
    clock[0] += 61
    result = service.run_once()
    assert "a" in result.succeeded
    with Vault(vault) as v:
        assert (v.item("a")["attempts"], v.item("a")["next_retry"]) == (0, None)


def test_an_error_that_escapes_the_cycle_driver_marks_its_items(vault, monkeypatch):
    import pydr.dr.service as service_module

    def broken(*args, **kwargs):
        raise KeyError("escaped")

    monkeypatch.setattr(service_module, "replicate", broken)
    with Vault(vault, writer=True) as v:
        v.set_policy("a", target_rpo=60)
    result = Service(vault, warm=False).run_once()
    assert list(result.failed) == ["a"] and result.exit_codes == {"a": 1}
    with Vault(vault) as v:
        assert "escaped" in v.item("a")["last_error"] and v.item("a")["attempts"] == 1


# -- the command ---------------------------------------------------------------------------


def test_once_exit_codes(vault, tmp_path):
    r = pydr("run", "--vault", vault, "--once", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["skipped"] == {n: "no target RPO" for n in "abc"}
    assert pydr("policy", "a", "--vault", vault, "--rpo", "1h").returncode == 0
    os.unlink(tmp_path / "a.img")  # a's source is gone: its cycle fails
    r = pydr("run", "--vault", vault, "--once", "--json")
    out = json.loads(r.stdout)
    assert out["failed"].keys() == {"a"} and out["succeeded"] == []
    alone = pydr("replicate", "a", "--vault", vault).returncode
    assert alone not in (0, 1)
    assert r.returncode == out["exit_codes"]["a"] == alone, r.stderr
    with Vault(vault) as v:
        assert v.item("a")["attempts"] == 1 and v.item("a")["next_retry"] > time.time()
    r = pydr("run", "--vault", vault, "--once", "--json")  # a waits for its retry
    assert r.returncode == 0 and json.loads(r.stdout)["skipped"]["a"].startswith("retry at")
    for n in "bc":  # two items fail in one round: CycleFailed's status
        assert pydr("policy", n, "--vault", vault, "--rpo", "1h").returncode == 0
        os.unlink(tmp_path / f"{n}.img")
    r = pydr("run", "--vault", vault, "--once", "--json")
    out = json.loads(r.stdout)
    assert sorted(out["failed"]) == ["b", "c"] and r.returncode == 21, r.stderr


def test_a_second_pydr_run_on_the_vault_is_refused(vault):
    first = Running(vault)
    try:
        first.round_end()
        r = pydr("run", "--vault", vault, "--once")
        assert r.returncode == 14, r.stderr
        assert f"another pydr run serves this vault (pid {first.proc.pid})" in r.stderr
    finally:
        rc = first.stop()
    assert rc == 0
    assert pydr("run", "--vault", vault, "--once").returncode == 0  # its lock went with it


def test_sigterm_while_a_cycle_is_held_ends_after_that_cycle(vault):
    """SIGTERM reaches the service while its cycle is stopped at a crash
    point (cycle.disk: a disk replicated, its step not recorded): the cycle
    finishes, its point is recorded, no other round starts, exit 0."""
    assert pydr("policy", "a", "--vault", vault, "--rpo", "1h").returncode == 0
    run = Running(vault, env={"PYDR_STOP_AT": "cycle.disk"})
    try:
        _, st = os.waitpid(run.proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(st)
        assert points(vault, "a") == []
        os.kill(run.proc.pid, signal.SIGTERM)  # pending until it runs again
        os.kill(run.proc.pid, signal.SIGCONT)
        rc = run.proc.wait(timeout=300)
        run.wait_for(lambda e: replicated(e, "a"))
        run.round_end()
        rest = []
        while (e := run.lines.get(timeout=60)) is not None:
            rest.append(e)
    finally:
        run.kill()
    assert rc == 0, run.proc.stderr.read()
    assert rest == []  # nothing after that round: no other round started
    assert [e["kind"] for e in run.seen if e["operation"] == "run"] == ["started", "finished"]
    assert len(points(vault, "a")) == 1


def test_sighup_rereads_a_policy_changed_by_pydr_policy(vault):
    """a has no target: not scheduled. `pydr policy a --rpo 1h` while the
    service waits (it holds no lock then), SIGHUP: the next round, at once,
    replicates a (no point yet). Without the SIGHUP the service would wait
    its longest idle (60 s), beyond this test's bound."""
    run = Running(vault)
    try:
        end = run.round_end()
        assert end["message"].startswith("round: 0 succeeded")
        r = pydr("policy", "a", "--vault", vault, "--rpo", "1h")
        assert r.returncode == 0, r.stderr
        run.proc.send_signal(signal.SIGHUP)
        run.wait_for(lambda e: replicated(e, "a"), timeout=45)
        assert run.round_end()["message"].startswith("round: 1 succeeded (a)")
    finally:
        rc = run.stop()
    assert rc == 0
    assert len(points(vault, "a")) == 1 and points(vault, "b") == []


def test_a_failover_while_the_service_runs_waits_then_pauses_that_item(vault):
    """The service is held at a crash point with the vault's lock (its 3rd
    point recorded). `pydr failover a` waits for the lock (pydr run holds
    it: 600 s by default), the service goes on, the failover succeeds; from
    then on every round skips a as paused and replicates b."""
    for n in "ab":
        assert pydr("policy", n, "--vault", vault, "--rpo", "1s").returncode == 0
    run = Running(vault, env={"PYDR_STOP_AT": "cycle.point:3"})
    op = None
    try:
        _, st = os.waitpid(run.proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(st)
        op = subprocess.Popen([pydr_exe(), "failover", "a", "--vault", str(vault), "--point",
                               "latest-processed"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd="/tmp")
        from test_lock_priority import until_a_writer_waits

        until_a_writer_waits(str(vault), op)  # it waits for the service's lock
        os.kill(run.proc.pid, signal.SIGCONT)
        _, err = op.communicate(timeout=300)
        assert op.returncode == 0, err
        paused = run.wait_for(lambda e: e["operation"] == "run" and e["kind"] == "finished"
                              and "1 paused (a)" in e["message"])
        at = len(run.seen)
        run.wait_for(lambda e: replicated(e, "b"))  # b goes on
        end = run.round_end()
        assert "1 paused (a)" in end["message"] and "succeeded (b)" in end["message"]
    finally:
        rc = run.stop()
        if op is not None and op.poll() is None:
            op.kill()
    assert rc == 0
    assert paused is not None
    assert not [e for e in run.seen[at:] if e["operation"] == "replicate" and e["item"] == "a"]
    with Vault(vault) as v:
        assert v.item("a")["state"] == "failed-over"


def test_run_serves_metrics_and_stops_from_its_events(vault):
    """Service.run with --metrics on port 0: at the end of the first round
    (its "finished" event) a real scrape shows the item's RPO and target;
    stop() from that event ends run() after the round."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with Vault(vault, writer=True) as v:
        v.set_policy("a", target_rpo=3600)
    scraped = {}

    def on_event(e):
        if e.operation == "run" and e.kind == "finished":
            with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics",
                                        timeout=60) as r:
                text = r.read().decode()
            scraped.update({(s.name, s.labels.get("item")): s.value
                            for f in text_string_to_metric_families(text) for s in f.samples})
            service.stop()

    notes = []
    service = Service(vault, metrics="127.0.0.1:0", events=on_event, warm=False,
                      notify=notes.append)
    service.run()
    assert scraped[("pydr_rpo_target_seconds", "a")] == 3600
    assert 0 <= scraped[("pydr_rpo_seconds", "a")] < 3600
    assert notes[0] == "READY=1" and notes[-1] == "STOPPING=1"
    assert len(points(vault, "a")) == 1


def test_a_due_group_member_brings_its_group_in_one_point(tmp_path):
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        for n in "xy":
            (tmp_path / f"{n}.img").write_bytes(os.urandom(MiB))
            v.protect(n, [(str(tmp_path / f"{n}.img"), str(tmp_path / f"r{n}.img"))], group="g")
        v.set_policy("x", target_rpo=60)  # y has no target: it goes with its group all the same
    result = Service(tmp_path / "v", jobs=2, warm=False).run_once()
    assert sorted(result.succeeded) == ["x", "y"] and result.due == ["x"]
    assert "y" not in result.skipped
    px, py = points(tmp_path / "v", "x"), points(tmp_path / "v", "y")
    assert len(px) == len(py) == 1 and px[0].id == py[0].id


def test_app_consistent_every_runs_the_hooks_when_the_last_such_point_is_old(tmp_path):
    init_vault(tmp_path / "v")
    (tmp_path / "h.img").write_bytes(os.urandom(MiB))
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("h", [(str(tmp_path / "h.img"), str(tmp_path / "rh.img"))],
                  quiesce_hook="true", thaw_hook="true")
        v.set_policy("h", target_rpo=60, app_consistent_every=3600)
    clock = [time.time()]
    service = Service(tmp_path / "v", clock=lambda: clock[0], warm=False)
    assert service.run_once().succeeded == ["h"]
    with Vault(tmp_path / "v") as v:
        first = v.store.points("h")[-1]
    assert first.consistency == "app-consistent"
    clock[0] = first.data_time + 30  # due again; its app-consistent point is 30 s old
    assert service.run_once().succeeded == ["h"]
    clock[0] = first.data_time + 3600
    assert service.run_once().succeeded == ["h"]
    with Vault(tmp_path / "v") as v:
        labels = [p.consistency for p in v.store.points("h")]
    assert labels[0] == labels[2] == "app-consistent" and labels[1] != "app-consistent"


def test_stop_without_finish_cancels_the_running_cycle_and_a_rerun_finishes_it(tmp_path):
    """stop(finish=False) (a second SIGTERM) from the event of a's first disk
    done: the cycle stops before its second disk, as a kill leaves it (job
    cancelled, no point, no retry scheduled: no fault); the next round
    replicates it whole."""
    init_vault(tmp_path / "v")
    disks = []
    for i in range(2):
        (tmp_path / f"d{i}.img").write_bytes(os.urandom(MiB))
        disks.append((str(tmp_path / f"d{i}.img"), str(tmp_path / f"r{i}.img")))
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("a", disks)
        v.set_policy("a", target_rpo=60)

    def on_event(e):
        if e.operation == "replicate" and e.kind == "progress" and e.disk == 0 \
                and e.phase == "transfer" and e.bytes_done == e.bytes_total:
            service.stop(finish=False)

    service = Service(tmp_path / "v", events=on_event, warm=False)
    result = service.run_once()
    assert result.succeeded == [] and result.exit_codes == {"a": 130}
    assert result.exit_code() == 130
    with Vault(tmp_path / "v") as v:
        assert v.points("a") == []
        assert [(j.kind, j.state) for j in v.jobs(item="a")][0] == ("replicate", "cancelled")
        assert (v.item("a")["attempts"], v.item("a")["next_retry"]) == (0, None)
    again = Service(tmp_path / "v", warm=False).run_once()
    assert again.succeeded == ["a"]
    for src, replica in disks:
        with open(src, "rb") as f, open(replica, "rb") as g:
            assert f.read() == g.read()


def test_a_run_lock_that_is_a_symlink_is_not_followed(vault, tmp_path):
    os.symlink(tmp_path / "elsewhere", vault / "run.lock")
    r = pydr("run", "--vault", vault, "--once")
    assert r.returncode not in (0, 1) and "run.lock" in r.stderr, r.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_a_failing_health_check_is_logged_and_the_round_still_replicates(vault, monkeypatch,
                                                                         caplog):
    from pydr.dr import health

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the health check")

    monkeypatch.setattr(health, "check_transitions", broken)
    with Vault(vault, writer=True) as v:
        v.set_policy("a", target_rpo=60)
    with caplog.at_level(logging.ERROR, logger="pydr.service"):
        result = Service(vault, warm=False).run_once()
    assert result.succeeded == ["a"] and result.transitions == []
    assert any("RPO health check hit a pydr bug" in r.getMessage() and r.exc_info
               for r in caplog.records)
    assert len(points(vault, "a")) == 1


def test_once_events_and_json_keep_standard_output_json_lines(vault):
    assert pydr("policy", "a", "--vault", vault, "--rpo", "1h").returncode == 0
    r = pydr("run", "--vault", vault, "--once", "--events", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[-1]["type"] == "round" and lines[-1]["succeeded"] == ["a"]
    assert all(e["type"] == "event" for e in lines[:-1])
    assert [e["kind"] for e in lines[:-1] if e["operation"] == "run"] == ["started", "finished"]
    r = pydr("run", "--vault", vault, "--json")
    assert r.returncode == 2 and "--json goes with --once" in r.stderr


def test_a_failed_items_retry_is_capped_by_its_target_and_a_later_round_failure_is_survived(
        tmp_path, monkeypatch):
    """A seconds-long target is not left minutes behind by the retry
    schedule; a round that cannot open the vault after the first is logged
    and tried again, the service stays up."""
    from pydr.dr import service as S

    init_vault(tmp_path / "v")
    src = tmp_path / "gone.img"
    src.write_bytes(b"x" * 65536)
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("a", [(str(src), str(tmp_path / "r.img"))])
        v.set_policy("a", target_rpo=8)
    src.unlink()
    now = [1_000_000.0]
    svc = S.Service(tmp_path / "v", clock=lambda: now[0], notify=lambda s: None)
    result = svc.run_once()
    assert list(result.failed) == ["a"]
    with Vault(tmp_path / "v") as v:
        assert v.store.item("a")["next_retry"] == pytest.approx(now[0] + 5)  # max(5, 8 / 2)

    rounds = []
    real = S.Service._round

    def flaky(self):
        rounds.append(len(rounds))
        if len(rounds) == 2:
            raise S.VaultError("the vault's storage went away", path=str(tmp_path / "v"))
        if len(rounds) == 3:
            self.stop()
        return real(self)

    monkeypatch.setattr(S.Service, "_round", flaky)
    waits = []
    monkeypatch.setattr(svc._wake, "wait", lambda t=None: waits.append(t) or True)
    svc.run()  # the second round's failure did not end it: the third ran and stopped it
    assert rounds == [0, 1, 2] and S.MIN_RETRY in waits


def test_metrics_on_port_0_names_its_port_on_stderr_and_in_the_first_started_event(vault):
    """--metrics HOST:0: the port bound is told once, on standard error
    ("pydr run: metrics at http://HOST:PORT/metrics") and in the first
    round's "started" event; it is the port the service listens on."""
    import re
    import urllib.request

    from service_fixtures import listening_ports

    run = Running(vault, "--metrics", "127.0.0.1:0")
    try:
        started = run.wait_for(lambda e: e["operation"] == "run" and e["kind"] == "started")
        m = re.search(r"metrics at (http://127\.0\.0\.1:(\d+)/metrics)", started["message"])
        assert m, started
        assert int(m[2]) in listening_ports(run.proc.pid)
        with urllib.request.urlopen(m[1], timeout=60) as resp:
            assert b"pydr_" in resp.read()
        run.round_end()
        assert run.stop() == 0
    finally:
        run.kill()
    lines = run.proc.stderr.read().splitlines()
    assert lines.count(f"pydr run: metrics at {m[1]}") == 1, lines
    r = pydr("run", "--vault", vault, "--once", "--metrics", "127.0.0.1:0")
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "metrics at" in line]
    assert len(said) == 1 and re.fullmatch(
        r"pydr run: metrics at http://127\.0\.0\.1:[1-9]\d*/metrics", said[0]), r.stderr
    assert "has a target RPO: nothing is scheduled" in r.stderr  # (the vault has no target)


def test_once_stopped_before_its_due_cycles_began_is_no_success(tmp_path):
    """A stop that leaves due items not begun, or comes before the round
    began, is not "every due cycle succeeded": --once says 130, as a
    cancelled command does."""
    from pydr.dr import service as S
    from pydr.errors import Cancelled

    assert S.RoundResult(due=["a"], skipped={"a": S.STOPPING}).exit_code() == 130
    assert S.RoundResult(due=["a"], succeeded=["a"]).exit_code() == 0
    init_vault(tmp_path / "v")
    svc = Service(tmp_path / "v", notify=lambda s: None)
    svc.stop()  # before the round: it waits for the lock no more
    with pytest.raises(Cancelled) as caught:
        svc.run_once()
    assert caught.value.exit_code == 130

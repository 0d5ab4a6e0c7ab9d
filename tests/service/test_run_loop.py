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
        assert a["attempts"] == 1 and a["next_retry"] == pytest.approx(clock[0] + 60, abs=5)
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

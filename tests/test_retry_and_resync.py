"""Retry schedule (fake clock), resync-required, change-tracker extents, and
the point-in-time test with a writer appending numbered records."""

import errno
import os
import subprocess
import sys
import time

import pytest

from pydr.replication import materialize, replicate, replicate_with_retry
from pydr.retry import RetryPolicy, attempt_offset, recoverable
from pydr.vault import InvalidState, Vault, init_vault


class FakeClock:
    def __init__(self):
        self.now = 1_000_000.0
        self.attempts = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_schedule_offsets():
    assert [attempt_offset(n) for n in range(9)] == [0, 60, 120, 240, 480, 600, 2400, 4200, 6000]


def test_recoverable_errors_are_retried_on_the_schedule():
    fake = FakeClock()
    failures = [OSError(errno.EIO, "I/O error")] * 3 + [OSError(errno.ENOSPC, "full")] * 4

    def attempt():
        fake.attempts.append(fake.now - 1_000_000.0)
        if failures:
            raise failures.pop(0)
        return "done"

    assert RetryPolicy(clock=fake.clock, sleep=fake.sleep).run(attempt) == "done"
    assert fake.attempts == [0, 60, 120, 240, 480, 600, 2400, 4200]


def test_non_recoverable_errors_stop_at_once():
    fake = FakeClock()
    calls = []

    def attempt():
        calls.append(fake.now)
        raise FileNotFoundError(errno.ENOENT, "disk not found", "/dev/sdz")

    with pytest.raises(FileNotFoundError):
        RetryPolicy(clock=fake.clock, sleep=fake.sleep).run(attempt)
    assert len(calls) == 1
    assert not recoverable(PermissionError(errno.EACCES, "denied"))
    assert recoverable(TimeoutError()) and recoverable(ConnectionResetError())


def test_max_attempts():
    fake = FakeClock()
    with pytest.raises(OSError):
        RetryPolicy(clock=fake.clock, sleep=fake.sleep, max_attempts=3).run(
            lambda: (_ for _ in ()).throw(OSError(errno.EIO, "x")))
    assert fake.now - 1_000_000.0 == 120


@pytest.fixture
def item(tmp_path):
    init_vault(tmp_path / "v")
    src, rep = tmp_path / "s.img", tmp_path / "r.img"
    src.write_bytes(os.urandom(1 << 20))
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("x", [(src, rep)])
        replicate(v, ["x"])
    return tmp_path, src, rep


def test_retry_with_the_vault_records_attempts_then_succeeds(item, monkeypatch):
    tmp_path, src, rep = item
    import pydr.replication as R

    real = R.resync
    fails = [2]

    def flaky(*a, **k):
        if fails[0]:
            fails[0] -= 1
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real(*a, **k)

    monkeypatch.setattr(R, "resync", flaky)
    fake = FakeClock()
    seen = []
    with Vault(tmp_path / "v", writer=True) as v:
        policy = RetryPolicy(clock=fake.clock, sleep=fake.sleep)

        def record(attempt, when, exc):
            seen.append((attempt, when - 1_000_000.0, v.status("x")["health"]))
            v.set_item("x", attempts=attempt, next_retry=when)

        policy.on_retry = record
        res = replicate_with_retry(v, ["x"], policy=policy)
        assert res.point_id == 2
        st = v.status("x")
        assert st["health"] == "ok" and st["failed_attempts"] == 0 and st["next_retry"] is None
        states = [j["state"] for j in v.jobs()]
    assert seen == [(1, 60, "warning"), (2, 120, "warning")]
    assert states == ["succeeded", "failed", "failed", "succeeded"]


def test_tracking_lost_requires_a_resync(item):
    tmp_path, src, rep = item
    with Vault(tmp_path / "v", writer=True) as v:
        with pytest.raises(InvalidState, match="--resync"):
            replicate(v, ["x"], tracking_lost=True)
        assert v.status("x")["state"] == "resync-required"
        with pytest.raises(InvalidState):
            replicate(v, ["x"])
        with open(rep, "r+b") as f:  # the replica drifted too: a resync compares both sides
            f.seek(5000)
            f.write(b"drift")
        replicate(v, ["x"], resync_all=True)
        assert v.status("x")["state"] == "protected"
    assert src.read_bytes() == rep.read_bytes()


def test_changed_extents_and_the_half_disk_rule(item):
    tmp_path, src, rep = item
    with open(src, "r+b") as f:
        f.seek(300_000)
        f.write(b"tracked change")
    with Vault(tmp_path / "v", writer=True) as v:
        res = replicate(v, ["x"], changed_extents={"x": {0: [(300_000, 14)]}})
        assert res.bytes_read == 4096  # only the tracked range of the source
        assert src.read_bytes() == rep.read_bytes()
        with pytest.raises(InvalidState, match="resync"):
            replicate(v, ["x"], changed_extents={"x": {0: [(0, 600_000)]}})
        assert v.status("x")["state"] == "resync-required"


WRITER = r"""
import os, sys, time
path, rs = sys.argv[1], 4096
fd = os.open(path, os.O_WRONLY)
n = 0
while n < int(sys.argv[2]):
    rec = (b"REC%08d" % n) * (rs // 11) + b"\n" * (rs % 11)
    os.pwrite(fd, rec, n * rs)
    n += 1
    time.sleep(0.0005)
"""


def prefix_length(path):
    """k if the image holds exactly records 0..k-1 and zeros after; None if not a prefix."""
    data = open(path, "rb").read()
    rs = 4096
    k = 0
    while (k + 1) * rs <= len(data) and data[k * rs:k * rs + 11] == b"REC%08d" % k:
        expected = (b"REC%08d" % k) * (rs // 11) + b"\n" * (rs % 11)
        if data[k * rs:(k + 1) * rs] != expected:
            return None
        k += 1
    return k if data[k * rs:].count(0) == len(data) - k * rs else None


def test_point_in_time_with_a_writer(tmp_path):
    """A writer appends numbered records during replication; with the
    quiesce/thaw hooks (here: SIGSTOP/SIGCONT of the writer), every recovery
    point holds an exact prefix of the records."""
    src, rep = tmp_path / "log.img", tmp_path / "log-replica.img"
    nrec = 6000
    with open(src, "wb") as f:
        f.truncate(nrec * 4096)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(nrec)])
    try:
        init_vault(tmp_path / "v")
        with Vault(tmp_path / "v", writer=True) as v:
            v.protect("log", [(src, rep)], retention=50,
                      quiesce_hook=f"kill -STOP {writer.pid}", thaw_hook=f"kill -CONT {writer.pid}")
            ids = []
            for _ in range(6):
                ids.append(replicate(v, ["log"], app_consistent=True).point_id)
                time.sleep(0.05)
            prefixes = []
            for pid in ids:
                path, = materialize(v, "log", pid, tmp_path / f"p{pid}")
                prefixes.append(prefix_length(path))
    finally:
        writer.kill()
        writer.wait()
    assert None not in prefixes, prefixes
    assert prefixes == sorted(prefixes) and prefixes[-1] > prefixes[0], prefixes

"""Retry schedule (fake clock), resync-required, change-tracker extents, and
the point-in-time test with a writer appending numbered records."""

import errno
import os
import subprocess
import sys
import time

import pytest

from pydr.dr.points import materialize
from pydr.dr.replication import replicate, replicate_with_retry
from pydr.dr.retry import RetryPolicy, attempt_offset, recoverable
from pydr.dr.vault import Vault, init_vault
from pydr.errors import InvalidState


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
        replicate(v.store, ["x"])
    return tmp_path, src, rep


def test_retry_with_the_vault_records_attempts_then_succeeds(item, monkeypatch):
    tmp_path, src, rep = item
    import pydr.dr.agent as R  # where a cycle's disk transfer is made

    real = R.transfer
    fails = [2]

    def flaky(*a, **k):
        if fails[0]:
            fails[0] -= 1
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real(*a, **k)

    monkeypatch.setattr(R, "transfer", flaky)
    fake = FakeClock()
    seen = []
    with Vault(tmp_path / "v", writer=True) as v:
        policy = RetryPolicy(clock=fake.clock, sleep=fake.sleep)

        def record(attempt, when, exc):
            seen.append((attempt, when - 1_000_000.0, v.status("x").to_dict()["health"]))
            v.set_item("x", attempts=attempt, next_retry=when)

        policy.on_retry = record
        res = replicate_with_retry(v.store, ["x"], policy=policy)
        assert res.point_id == 2
        st = v.status("x").to_dict()
        assert st["health"] == "ok" and st["failed_attempts"] == 0 and st["next_retry"] is None
        states = [j["state"] for j in v.store.jobs()]
    assert seen == [(1, 60, "warning"), (2, 120, "warning")]
    assert states == ["succeeded", "succeeded", "failed", "failed", "succeeded"]  # protect first


def test_tracking_lost_requires_a_resync(item):
    tmp_path, src, rep = item
    with Vault(tmp_path / "v", writer=True) as v:
        with pytest.raises(InvalidState, match="x needs a resync") as err:
            replicate(v.store, ["x"], tracking_lost=True)
        assert err.value.item == "x" and err.value.hint == "run 'pydr replicate x --resync'"
        assert v.status("x").state == "resync-required"
        with pytest.raises(InvalidState):
            replicate(v.store, ["x"])
        with open(rep, "r+b") as f:  # the replica drifted too: a resync compares both sides
            f.seek(5000)
            f.write(b"drift")
        replicate(v.store, ["x"], resync_all=True)
        assert v.status("x").to_dict()["state"] == "protected"
    assert src.read_bytes() == rep.read_bytes()


def test_changed_extents_and_the_half_disk_rule(item):
    tmp_path, src, rep = item
    with open(src, "r+b") as f:
        f.seek(300_000)
        f.write(b"tracked change")
    with Vault(tmp_path / "v", writer=True) as v:
        res = replicate(v.store, ["x"], changed_extents={"x": {0: [(300_000, 14)]}})
        assert res.bytes_read == 4096  # only the tracked range of the source
        assert src.read_bytes() == rep.read_bytes()
        with pytest.raises(InvalidState, match="resync"):
            replicate(v.store, ["x"], changed_extents={"x": {0: [(0, 600_000)]}})
        assert v.status("x").to_dict()["state"] == "resync-required"


# A little log-structured store: record n goes to block n + 1, then the
# header in block 0 is rewritten to count n + 1 committed records (like a
# superblock). A consistent image holds an exact prefix of the records, and
# a header counting all of them, or all but the last (written, not yet
# committed). Reading the blocks at different moments breaks that: the
# header, read late, counts records the image does not hold.
# Given a gate and an ack pipe (fds), it writes BATCH records each time the
# gate lets it and acks each whole batch: the test, not the clock, says how
# far it is.
BATCH = 100
WRITER = r"""
import os, sys, time
path, rs = sys.argv[1], 4096
gate, ack = (int(a) for a in sys.argv[3:5]) if len(sys.argv) > 3 else (None, None)
fd = os.open(path, os.O_WRONLY)
n = 0
while n < int(sys.argv[2]):
    if gate is not None and n % int(sys.argv[5]) == 0:  # a batch when the test lets one run
        if n:
            os.write(ack, b"+")  # the batch before it is on the image
        if not os.read(gate, 1):
            break
    rec = (b"REC%08d" % n) * (rs // 11) + b"\n" * (rs % 11)
    os.pwrite(fd, rec, (n + 1) * rs)
    os.pwrite(fd, (b"HDR%08d" % (n + 1)) * (rs // 11) + bytes(rs % 11), 0)
    n += 1
    time.sleep(0.0002)
"""


class GatedWriter:
    """The writer above, appending records while cycles run, in batches the
    test lets through: before each cycle one whole batch more is on the image
    (so the points advance, whatever the machine's speed), and the next one
    is being written during the cycle (so the cut matters)."""

    def __init__(self, path, nrec):
        self.gate_r, self.gate_w = os.pipe()
        self.ack_r, self.ack_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(nrec), str(self.gate_r),
             str(self.ack_w), str(BATCH)], pass_fds=(self.gate_r, self.ack_w))
        os.close(self.gate_r)
        os.close(self.ack_w)
        os.write(self.gate_w, b"+")  # the first batch

    @property
    def pid(self):
        return self.proc.pid

    def next_batch(self):
        """Wait until the current batch is written, then let the next one run."""
        assert os.read(self.ack_r, 1) == b"+", "the writer died"
        os.write(self.gate_w, b"+")

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self.gate_w)
        os.close(self.ack_r)


def prefix_length(path):
    """k if the image is consistent (records 0..k-1 exact, zeros after, the
    header counting k or k-1 records); None if it is not."""
    data = open(path, "rb").read()
    rs = 4096
    head = data[:rs]
    header = int(head[3:11]) if head[:3] == b"HDR" else 0
    if head[:3] == b"HDR" and head != (b"HDR%08d" % header) * (rs // 11) + bytes(rs % 11):
        return None
    k = 0
    while (k + 2) * rs <= len(data) and data[(k + 1) * rs:(k + 1) * rs + 11] == b"REC%08d" % k:
        expected = (b"REC%08d" % k) * (rs // 11) + b"\n" * (rs % 11)
        if data[(k + 1) * rs:(k + 2) * rs] != expected:
            return None
        k += 1
    if data[(k + 1) * rs:].count(0) != len(data) - (k + 1) * rs:
        return None
    return k if header in (k, k - 1) or (k == 0 and header == 0) else None


def test_point_in_time_with_a_writer(tmp_path):
    """A writer appends numbered records during replication; with the
    quiesce/thaw hooks (here: SIGSTOP/SIGCONT of the writer), every recovery
    point holds an exact prefix of the records."""
    src, rep = tmp_path / "log.img", tmp_path / "log-replica.img"
    nrec = 6000
    with open(src, "wb") as f:
        f.truncate((nrec + 1) * 4096)
    writer = GatedWriter(src, nrec)
    try:
        init_vault(tmp_path / "v")
        with Vault(tmp_path / "v", writer=True) as v:
            v.protect("log", [(src, rep)], retention=50,
                      quiesce_hook=f"kill -STOP {writer.pid}", thaw_hook=f"kill -CONT {writer.pid}")
            ids = []
            for _ in range(6):
                writer.next_batch()
                ids.append(replicate(v.store, ["log"], app_consistent=True).point_id)
            prefixes = []
            for pid in ids:
                path, = materialize(v.store, "log", pid, tmp_path / f"p{pid}")
                prefixes.append(prefix_length(path))
    finally:
        writer.stop()
    assert None not in prefixes, prefixes
    # cycle i ran after batch i was whole, while batch i+1 could be written
    assert all(BATCH * (i + 1) <= k <= BATCH * (i + 2) for i, k in enumerate(prefixes)), prefixes
    assert prefixes == sorted(prefixes) and prefixes[-1] > prefixes[0], prefixes


def test_reflink_cut_with_a_writer_and_no_hooks(xfs_dir, tmp_path):
    """On XFS the cycle clones the source first: with the writer running and
    no hooks at all, every point is still an exact prefix of the records."""
    src, rep = xfs_dir / "log.img", tmp_path / "log-replica.img"
    nrec = 8000
    with open(src, "wb") as f:
        f.truncate((nrec + 1) * 4096)
    writer = GatedWriter(src, nrec)
    try:
        init_vault(tmp_path / "v")
        with Vault(tmp_path / "v", writer=True) as v:
            v.protect("log", [(src, rep)], retention=50)
            ids = []
            for _ in range(6):
                writer.next_batch()
                ids.append(replicate(v.store, ["log"]).point_id)
            assert {p["cut"] for p in v.store.points("log")} == {"reflink"}
            prefixes = []
            for pid in ids:
                path, = materialize(v.store, "log", pid, tmp_path / f"p{pid}")
                prefixes.append(prefix_length(path))
    finally:
        writer.stop()
    assert None not in prefixes, prefixes
    assert all(BATCH * (i + 1) <= k <= BATCH * (i + 2) for i, k in enumerate(prefixes)), prefixes
    assert prefixes == sorted(prefixes) and prefixes[-1] > prefixes[0], prefixes
    assert not [p for p in os.listdir(xfs_dir) if p.endswith(".pydr-snap")]


def test_points_on_ext4_say_their_cut(item):
    tmp_path, src, rep = item
    with Vault(tmp_path / "v") as v:
        assert [p["cut"] for p in v.store.points("x")] == ["none"]


def test_cache_describes_what_was_written_while_the_source_changed(tmp_path):
    """Regression: resync signs the source, then reads the changed blocks
    again to send them; if the source changed in between, the signature cache
    must hold the hashes of what the target received, or the next resync
    refuses the replica (BaseMismatch)."""
    import pydr
    from pydr.engine.sigcache_any import cached_signature

    src, dst, cache = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "dst.sig"
    nrec = 6000
    with open(src, "wb") as f:
        f.truncate((nrec + 1) * 4096)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(nrec)])
    try:
        for _ in range(8):
            pydr.resync(src, dst, signature_cache=cache)
            assert cached_signature(cache) == pydr.signature(dst, block_size=4096)
            time.sleep(0.02)
    finally:
        writer.kill()
        writer.wait()
    pydr.resync(src, dst, signature_cache=cache)
    assert src.read_bytes() == dst.read_bytes()

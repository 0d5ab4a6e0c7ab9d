"""A disk as it was at a recovery point (pydr.engine.restore): the latest
state with the undo steps rolled back onto it, newest first. Every point of a
real history (resyncs that keep their undo journals) comes back exactly, by
copy and by reflink (XFS on a loop device), however the write-back is cut
into batches; each step is read through once before it is written back
(and once as it is), the disk is synced once, and a step changed after its
check is never written."""

import hashlib
import os
import random

import pytest

import pydr
from pydr.engine import journal as J
from pydr.engine import restore, writeback
from pydr.errors import DamagedJournal

from conftest import rchar, sha

MiB = 1 << 20
KiB = 1 << 10


def history(where, replica_dir):
    """A disk changed five ways between cycles, each cycle a resync onto the
    replica that keeps its undo step. Returns (replica, steps newest first,
    {point: sha of the disk at that point}), point 0 the first copy."""
    rng = random.Random(22)
    src, rep = where / "src.img", replica_dir / "rep.img"
    disk = bytearray(rng.randbytes(12 * MiB))
    disk[3 * MiB:5 * MiB] = bytes(2 * MiB)  # a hole-to-be run
    changes = [
        lambda d: [d.__setitem__(slice(o, o + 4 * KiB), rng.randbytes(4 * KiB))  # scattered
                   for o in rng.sample(range(0, len(d) - 4 * KiB, 4 * KiB), 200)],
        lambda d: d.__setitem__(slice(3 * MiB, 5 * MiB), rng.randbytes(2 * MiB)),  # a hole filled
        lambda d: d.__setitem__(slice(6 * MiB, 9 * MiB), bytes(3 * MiB)),  # data zeroed
        lambda d: d.extend(rng.randbytes(2 * MiB + 4 * KiB)),  # it grows (a short last block)
        lambda d: d.__delitem__(slice(7 * MiB, None)),  # and shrinks
    ]
    points, steps = {}, []
    for point in range(len(changes) + 1):
        if point:
            changes[point - 1](disk)
        with open(src, "wb") as f:
            f.write(disk)
            if point == 0:
                f.truncate(len(disk))
        step = where / f"{point}.undo"
        pydr.resync(src, rep, keep_undo=step if point else None)
        if point:
            steps.insert(0, str(step))
        points[point] = hashlib.sha256(bytes(disk)).hexdigest()
    assert sha(rep) == points[len(changes)]
    return str(rep), steps, points


@pytest.mark.parametrize("batch", [writeback.BATCH, 64 * KiB + 1, 1])
def test_every_point_comes_back_exactly_by_copy_however_the_batches_are_cut(tmp_path, monkeypatch,
                                                                             batch):
    monkeypatch.setattr(writeback, "BATCH", batch)  # 1: every record alone; 64K+1: cuts inside runs
    rep, steps, points = history(tmp_path, tmp_path)
    latest = len(steps)
    for point in range(latest, -1, -1):
        out = tmp_path / f"point{point}.img"
        used = restore.materialize_file(rep, steps[:latest - point], str(out), method="copy")
        assert used == "copy"
        assert sha(out) == points[point], f"point {point}"
    assert sha(rep) == points[latest]  # the latest state is never written


def test_every_point_comes_back_exactly_by_reflink_reading_each_step_twice_and_syncing_once(
        tmp_path, xfs_dir, monkeypatch):
    rep, steps, points = history(tmp_path, xfs_dir)
    latest = len(steps)
    scans, fdatasyncs = [], []
    real_scan, real_fdatasync = J.scan, os.fdatasync
    monkeypatch.setattr(J, "scan", lambda path, **kw: scans.append(path) or real_scan(path, **kw))
    monkeypatch.setattr(os, "fdatasync", lambda fd: fdatasyncs.append(fd) or real_fdatasync(fd))
    for point in range(latest, -1, -1):
        chain = steps[:latest - point]
        scans.clear()
        fdatasyncs.clear()
        out = xfs_dir / f"point{point}.img"
        read_before = rchar()
        assert restore.materialize_file(rep, chain, str(out), method="reflink") == "reflink"
        read = rchar() - read_before
        assert sha(out) == points[point], f"point {point}"
        assert scans == chain  # each step scanned once, newest first; rollback reuses the scan
        assert fdatasyncs == []  # synced once, by install (fsync)
        # the clone reads nothing: each step read through to check it, then once to write it back
        assert read <= 2 * sum(os.path.getsize(s) for s in chain) + MiB  # (+ small files)
        out.unlink()
    assert sha(rep) == points[latest]


@pytest.mark.parametrize("what", ["payload", "header"])
def test_a_step_changed_after_its_check_is_never_written(tmp_path, what):
    rep, steps, _ = history(tmp_path, tmp_path)
    step = steps[-1]  # the oldest: the scattered blocks' old contents
    found = J.scan(step, step=True)
    # the last DATA record: the ones before it in its batch must not be written either
    pos, size = [(r[0], r[1]) for r in found.records if r[2] == J.B.DATA][-1]
    assert sum(r[1] for r in found.records) < writeback.BATCH  # one batch
    with open(step, "r+b") as f:  # changed after the check: a byte of the payload or header
        f.seek(pos + (J.B.RECORD_HEADER + size // 2 if what == "payload" else 20))
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    target = tmp_path / "target.img"  # point 1, which the oldest step takes back to point 0
    restore.materialize_file(rep, steps[:-1], str(target), method="copy")
    before = bytearray(target.read_bytes())
    fd = os.open(target, os.O_RDWR)
    try:
        with pytest.raises(DamagedJournal) as err:
            J.rollback_fd(fd, step, str(target), False, step=True, found=found, sync=False)
    finally:
        os.close(fd)
    assert err.value.path == step and err.value.offset == pos
    # holes go first, in batches of their own; no DATA record was written (one batch: 8 MiB)
    zeros = [(r[3], r[4]) for r in found.records if r[2] == J.B.ZERO]
    for offset, length in zeros:
        before[offset:offset + length] = bytes(length)
    assert target.read_bytes() == bytes(before)
    # and through materialize_file: the destination is never made, nothing is left beside it
    dest = tmp_path / "out" / "point.img"
    dest.parent.mkdir()
    with pytest.raises(DamagedJournal):
        restore.materialize_file(rep, steps, str(dest), method="copy")
    assert os.listdir(dest.parent) == []


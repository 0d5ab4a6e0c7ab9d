"""SIGKILL `pydr apply` / `pydr resync` at random moments, an extra to the
crash matrix (tests/dr/test_crash_matrix.py, which kills at every named
point): afterwards, running the same apply again gives the new image and
`pydr rollback` the old one, exactly; while an apply is unfinished other
commands refuse the target. How many kills land during the work depends on
the machine's load, so nothing is asserted about it."""

import os
import random
import signal
import subprocess
import time

import pytest

import pydr
from pydr.engine import journal as J

from conftest import pydr_command, run_cli, sha


@pytest.fixture
def images(tmp_path):
    rng = random.Random(11)
    size = 48 << 20
    old = rng.randbytes(size)
    new = bytearray(old)
    for off in range(0, size, 512 << 10):  # half of the image changes
        new[off:off + (256 << 10)] = rng.randbytes(256 << 10)
    new[10 << 20:14 << 20] = bytes(4 << 20)  # and a run becomes zeros
    new += rng.randbytes(3 << 20)  # and it grows
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(bytes(new))
    pydr.make_delta(tmp_path / "new.img", tmp_path / "d.delta", target=tmp_path / "old.img")
    return tmp_path, sha(tmp_path / "old.img"), sha(tmp_path / "new.img")


def start(args, cwd):
    return subprocess.Popen(pydr_command() + [str(a) for a in args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def timed_run(args, cwd):
    t = time.monotonic()
    p = start(args, cwd)
    assert p.wait(timeout=120) == 0, p.stderr.read()
    return time.monotonic() - t


@pytest.mark.parametrize("command", ["apply", "resync"])
def test_sigkill_then_finish_or_rollback(images, command):
    d, old, new = images
    target = d / "target.img"
    args = (["apply", d / "d.delta", target] if command == "apply"
            else ["resync", d / "new.img", target])
    target.write_bytes((d / "old.img").read_bytes())
    duration = timed_run(args, d)
    rng = random.Random(3)
    for i in range(14):
        target.write_bytes((d / "old.img").read_bytes())
        p = start(args, d)
        time.sleep(rng.uniform(0.02, duration))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        pending = J.pending(target) is not None
        if not pending:
            # killed before the journal existed, or after the commit
            assert sha(target) in (old, new)
            continue
        # every other command refuses, naming both ways out
        r = run_cli("signature", target, "-o", d / "x.sig")
        assert r.returncode == 11 and b"pydr rollback" in r.stderr and b"pydr apply" in r.stderr
        if i % 2 == 0:
            r = run_cli(*args)  # the same command again finishes it
            assert r.returncode == 0, r.stderr
            assert sha(target) == new
        else:
            r = run_cli("rollback", target)
            assert r.returncode == 0, r.stderr
            assert sha(target) == old
        assert J.pending(target) is None


def test_resync_resumes_after_an_outage(tmp_path):
    """Kill a resync part-way; the next one goes on from where it was (the
    blocks already written are not sent again), and its journal, continued
    across the interruption, still rolls the target back to the original --
    also when the source changed in between inside the part already written
    (the journal then holds two records for those blocks; the first wins)."""
    import shutil

    rng = random.Random(21)
    size = 256 << 20
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    original = os.urandom(size)
    dst.write_bytes(original)
    new = bytearray(original)
    for off in range(0, size, 1 << 20):
        new[off:off + (768 << 10)] = rng.randbytes(768 << 10)
    src.write_bytes(bytes(new))
    changed_total = 256 * (768 << 10)
    # killed once its second batch of records is written (a crash point: no timing)
    p = subprocess.run(pydr_command() + ["resync", str(src), str(dst)], cwd=tmp_path,
                       env={**os.environ, "PYDR_CRASH_AT": "apply.written:2"})
    assert p.returncode == -signal.SIGKILL
    assert J.pending(dst) is not None
    # the source changes again inside the part the killed run had written
    with open(src, "r+b") as f:
        f.seek(4096)
        f.write(b"changed after the outage" * 100)
    final = src.read_bytes()
    undo = tmp_path / "kept.undo"
    stats = pydr.resync(src, dst, keep_undo=undo)
    assert dst.read_bytes() == final
    assert 0 < stats.bytes_written < changed_total  # went on; did not start over
    copy = tmp_path / "copy.img"
    shutil.copyfile(dst, copy)
    fd = os.open(copy, os.O_RDWR)
    try:
        J.rollback_fd(fd, str(undo), str(copy), False)
    finally:
        os.close(fd)
    assert copy.read_bytes() == original

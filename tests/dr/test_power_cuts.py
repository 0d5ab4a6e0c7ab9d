"""Power cuts, not only kills: the operations run on a FUSE file system that
holds every write not yet fsynced and loses it when its process is killed
(tests/faultyfs.py, "lazy": the technique of LazyFS). An apply, a resync and
a replication cycle are killed at each crash point they pass, the power is
cut, the file system comes back with only what was durable, and the checks
of the crash matrix follow (tests/crashmatrix.py): the vault is intact, the
same command finishes the work, the disks and every recovery point are
exact, nothing is left behind."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import HERE
from crashmatrix import run_matrix
from test_crash_matrix import SCENARIOS

POWER_CUT = ("apply", "resync", "replicate")


class LazyDisk:
    """A LazyFS-style mount of `backing` at `mountpoint`."""

    def __init__(self, backing, mountpoint):
        self.backing, self.mountpoint = backing, mountpoint
        self.proc = None
        self.mount()

    def mount(self):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "faultyfs.py"), "lazy",
                                      str(self.backing), str(self.mountpoint)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(200):  # until the kernel shows the mount
            if os.path.ismount(self.mountpoint):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"the lazy file system did not mount: {self.proc.stderr.read()}")
            time.sleep(0.025)
        pytest.fail("the lazy file system did not mount in 5 s")

    def sync(self):
        with open(os.path.join(self.mountpoint, ".lazyfs-sync"), "w") as f:
            f.write("sync")

    def cut(self):
        """The power goes: what was not fsynced is gone; then it comes back."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        self.mount()

    def close(self):
        subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def disk(tmp_path):
    pytest.importorskip("fuse", reason="fusepy is not installed (pip install fusepy)")
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("FUSE needs /dev/fuse and root here")
    (tmp_path / "backing").mkdir()
    (tmp_path / "mnt").mkdir()
    d = LazyDisk(tmp_path / "backing", tmp_path / "mnt")
    yield d
    d.close()


def test_the_lazy_disk_loses_exactly_what_was_not_fsynced(disk):
    mnt = disk.mountpoint
    with open(mnt / "kept", "wb") as f:
        f.write(b"durable")
        f.flush()
        os.fsync(f.fileno())
        f.write(b" and lost")
    (mnt / "lost").write_bytes(b"never fsynced")
    assert (mnt / "kept").read_bytes() == b"durable and lost"  # as a page cache shows it
    disk.cut()
    assert (mnt / "kept").read_bytes() == b"durable"
    assert (mnt / "lost").read_bytes() == b""  # its name was durable, its data not


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.name in POWER_CUT],
                         ids=list(POWER_CUT))
def test_a_power_cut_at_every_crash_point(scenario, disk, tmp_path):
    assert run_matrix(scenario, tmp_path, work=disk.mountpoint / "work", disk=disk)

"""Each source byte a resync needs is read once, counted where the data
lives: the bytes a qemu-storage-daemon serving the source read (its
/proc/PID/io rchar, its file node with aio=threads so every read is a
syscall), and the bytes a child process running a resync of local files
read through syscalls. The blocks found to differ are encoded from the
buffer that was hashed, never read again; the replicas are exact (SHA-256)."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

import pydr
from pydr.engine.devices import NbdDevice
from pydr.transport import exchange as X
from pydr.transport.roles import LocalSource, LocalTarget

from conftest import rchar, sha
from qemuhelp import end_by_pidfd, start_storage_daemon

MiB = 1 << 20
pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-storage-daemon", "qemu-io")),
    reason="needs qemu-storage-daemon and qemu-io (scripts/bootstrap installs them)")


def data_bytes(path):
    """Bytes of `path` that hold data (SEEK_DATA/SEEK_HOLE), not holes."""
    total, pos = 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            total += pos - start
    finally:
        os.close(fd)
    return total


def make_source(path, size, regions, seed=1):
    """A sparse file of `size` bytes with random data in `regions`
    [(offset, length)] (8 MiB aligned, so holes stay holes)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in regions:
            f.seek(off)
            for _ in range(0, length, 8 * MiB):
                f.write(rng.randbytes(8 * MiB))
    return path


class SourceDaemon:
    """qemu-storage-daemon serving a raw file read-only as an NBD export on a
    unix socket; its file node uses aio=threads and the page cache, so every
    byte it reads shows in its rchar."""

    def __init__(self, image):
        self.image = image
        self.sock = image.with_name("src.sock")
        self.pid, self.pidfd = start_storage_daemon(
            image.with_name("qsd.pid"),
            "--blockdev", f"driver=file,node-name=file0,filename={image},aio=threads,"
                          "cache.direct=off",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
            "--export", "type=nbd,id=e0,node-name=disk0,name=disk0", sockets=(self.sock,))

    @property
    def uri(self):
        return f"nbd+unix:///disk0?socket={self.sock}"

    def rchar(self):
        return rchar(self.pid)

    def stop(self):
        if self.pidfd is not None:
            end_by_pidfd(self.pidfd, gone_ok=True)
            self.pidfd = None


# 512 MiB, 320 MiB of data: regions of random data between holes
SOURCE_SIZE = 512 * MiB
SOURCE_DATA = [(0, 64 * MiB), (96 * MiB, 128 * MiB), (256 * MiB, 64 * MiB),
               (448 * MiB, 64 * MiB)]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    image = make_source(tmp_path_factory.mktemp("qsd") / "source.raw", SOURCE_SIZE, SOURCE_DATA)
    d = SourceDaemon(image)
    yield d
    d.stop()


def test_a_full_resync_of_an_nbd_source_reads_its_data_once(daemon, tmp_path):
    data = data_bytes(daemon.image)
    assert data >= 300 * MiB  # the file system kept the holes and the data
    target = tmp_path / "replica.raw"
    before = daemon.rchar()
    st = pydr.resync(daemon.uri, str(target))
    served = daemon.rchar() - before
    assert sha(target) == sha(daemon.image)
    # before: 2x (hashed, then the differing blocks read again to encode them)
    assert data <= served <= 1.1 * data, (served, data)
    # the stats tell what was read: all of it from the source, nothing from a new target
    assert data <= st.source_bytes_read <= 1.1 * data
    assert st.target_bytes_read == 0
    assert st.bytes_read == st.source_bytes_read + st.target_bytes_read
    assert abs(st.source_bytes_read - served) <= 0.02 * data


def test_a_tracked_resync_reads_the_changed_blocks_once(daemon, tmp_path):
    target = tmp_path / "replica.raw"
    pydr.resync(daemon.uri, str(target))
    # 256 4 KiB writes scattered over the disk, straight to the file (the
    # daemon reads through the page cache: it sees them)
    rng = random.Random(5)
    blocks = sorted(rng.sample(range(SOURCE_SIZE // 4096), 256))
    changed = []
    with open(daemon.image, "r+b") as f:
        for b in blocks:
            off = b * 4096
            f.seek(off)
            f.write(rng.randbytes(4096))
            changed.append((off, 4096))
    before = daemon.rchar()
    st = pydr.resync(daemon.uri, str(target), changed_extents=changed)
    served = daemon.rchar() - before
    assert sha(target) == sha(daemon.image)
    assert st.blocks_changed == 256
    assert served <= 1.5 * MiB, served  # before: each block twice
    assert 1 * MiB <= st.source_bytes_read <= 1.5 * MiB


def test_the_exchange_source_side_reads_once(daemon, tmp_path):
    """The roles of a push or pull, in this process: the side holding the
    source encodes the records from the windows it kept."""
    data = data_bytes(daemon.image)
    target = tmp_path / "replica.raw"
    before = daemon.rchar()
    with NbdDevice(daemon.uri) as dev, LocalSource(dev, block_size=4096, threads=2) as source:
        with LocalTarget(str(target), block_size=4096, result_size=source.size,
                         threads=2) as tgt:
            source.run(tgt)
            result = tgt.finish()
    served = daemon.rchar() - before
    assert sha(target) == sha(daemon.image)
    assert result.bytes_written == data
    assert data <= served <= 1.1 * data, (served, data)
    assert data <= source.bytes_read <= 1.1 * data


def test_an_exchange_window_beyond_the_keep_budget_rereads_only_what_differs(daemon, tmp_path):
    """keep_bytes=0: no window's data is kept; an equal target costs one read
    of the source, and each block that differs one more read of itself."""
    data = data_bytes(daemon.image)
    target = tmp_path / "replica.raw"
    shutil.copyfile(daemon.image, target)
    with open(target, "r+b") as f:  # 1 MiB of the target differs
        f.seek(8 * MiB)
        f.write(bytes(random.Random(7).randbytes(MiB)))
    before = daemon.rchar()
    with NbdDevice(daemon.uri) as dev, LocalSource(dev, block_size=4096, threads=2,
                                                   keep_bytes=0) as source:
        with LocalTarget(str(target), block_size=4096, result_size=source.size,
                         threads=2) as tgt:
            source.run(tgt)
            tgt.finish()
    served = daemon.rchar() - before
    assert sha(target) == sha(daemon.image)
    assert source.blocks_changed == MiB // 4096
    assert data + MiB <= served <= data + 2 * MiB + 0.02 * data, (served, data)


CHILD = r"""
import json, os, sys
import numpy, pydr
from pydr.engine.devices import FileDevice
from pydr.engine.resync import resync


def rchar():
    with open("/proc/self/io") as f:
        return int(next(l for l in f if l.startswith("rchar:")).split()[1])


before = rchar()
with FileDevice(sys.argv[1]) as source:
    st = resync(source, sys.argv[2], threads=2)
    reread = source.encoded_bytes  # what encoding records read from the source file
print(json.dumps({"rchar": rchar() - before, "source": st.source_bytes_read,
                  "target": st.target_bytes_read, "read": st.bytes_read,
                  "changed": st.blocks_changed, "reread": reread}))
"""


def resync_in_child(src, dst, tmp_path):
    """Run pydr's resync of two local files in a child process; returns what
    it read through syscalls (rchar), its stats, and what encoding the
    records read from the source file (``reread``: FileDevice.encoded_bytes)."""
    import tempfile

    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst)], capture_output=True,
                       text=True, timeout=600, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_local_resync_onto_a_new_target_reads_each_source_byte_once(tmp_path):
    src = make_source(tmp_path / "src.raw", 256 * MiB,
                      [(0, 64 * MiB), (128 * MiB, 96 * MiB)], seed=3)
    data = data_bytes(src)
    dst = tmp_path / "dst.raw"
    got = resync_in_child(src, dst, tmp_path)
    assert sha(dst) == sha(src)
    # before: hashed (from mmap, which rchar does not see), then the
    # differing blocks read again by pread to encode them
    assert got["reread"] == 0
    assert data <= got["rchar"] <= 1.1 * data, (got, data)
    assert data <= got["source"] <= 1.1 * data
    assert got["target"] == 0 and got["read"] == got["source"]


def test_a_local_resync_onto_an_old_target_reads_each_side_once(tmp_path):
    src = make_source(tmp_path / "src.raw", 128 * MiB, [(0, 128 * MiB)], seed=4)
    dst = tmp_path / "dst.raw"
    shutil.copyfile(src, dst)
    rng = random.Random(6)
    with open(src, "r+b") as f:  # 16 MiB of the source changed, in 64 places
        for i in range(64):
            f.seek(rng.randrange(0, 128 * MiB // 4096 - 64) * 4096)
            f.write(rng.randbytes(256 * 1024))
    got = resync_in_child(src, dst, tmp_path)
    assert sha(dst) == sha(src)
    assert got["changed"] > 0 and got["reread"] == 0
    assert 128 * MiB <= got["source"] <= 1.1 * 128 * MiB
    assert 128 * MiB <= got["target"] <= 1.1 * 128 * MiB
    assert got["read"] == got["source"] + got["target"]
    # the source through syscalls once; the target (hashed from mmap, or
    # read) and the journal's old blocks at most once more each
    assert got["rchar"] <= 1.1 * (2 * 128 * MiB) + 16 * MiB, got


def test_windows_of_holes_are_neither_hashed_nor_compared(tmp_path, monkeypatch):
    """A 2 GiB sparse source holding 1 MiB (and a short last block): only its
    data window is signed; the windows of holes are skipped, on the first
    resync (the target has nothing there) and on the next ones (holes in the
    target, or all zero in its signature cache), and the cache written then
    equals the target's signature (the zero hashes of the skipped windows,
    the short last block's included)."""
    from pydr.engine import devices as D
    from pydr.engine import resync as R
    from pydr.engine.sigcache_any import load_any

    size = 2048 * MiB + 1000
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(size)
        f.seek(700 * MiB)
        f.write(random.Random(8).randbytes(MiB))
    dst, cache = tmp_path / "dst.raw", tmp_path / "dst.sig"
    signed = []
    real_sign = D.FileDevice.sign

    def counting_sign(self, offset, length, *args, **kw):
        signed.append((os.path.basename(self.name), offset))
        return real_sign(self, offset, length, *args, **kw)

    monkeypatch.setattr(D.FileDevice, "sign", counting_sign)
    data_window = 700 * MiB // R.WINDOW * R.WINDOW
    # a first copy; the target's holes (no cache yet); the cache's zero blocks
    for cached, target_signed in ((None, []), (cache, [data_window]), (cache, [])):
        signed.clear()
        st = R.resync(str(src), str(dst), signature_cache=cached)
        assert sha(dst) == sha(src)
        assert st.source_bytes_read == MiB
        assert [o for name, o in signed if name == "src.raw"] == [data_window]
        assert [o for name, o in signed if name == "dst.raw"] == target_signed
        assert st.used_cache == (cached is not None and not target_signed)
    monkeypatch.setattr(D.FileDevice, "sign", real_sign)
    assert st.used_cache and st.target_bytes_read == 0
    with load_any(str(cache)) as reader:
        hashes, mask = reader.read(0, reader.n)
    sig = pydr.signature(str(dst), block_size=4096)
    assert bytes(hashes) == sig.hashes.tobytes()
    assert bytes(mask) == bytes(sig.zero_mask.astype("u1"))

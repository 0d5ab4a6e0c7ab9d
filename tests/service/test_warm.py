"""Warm cycles (pydr.dr.warm.WarmState, as pydr run keeps it): a warm cycle
gives byte for byte what a cold one gives, notices when reality changed
under it (a restarted qemu-storage-daemon, a replica written behind its
back, another process's cycle), and close() leaves nothing behind."""

import os
import shutil
import signal
import socket
import subprocess

import pytest

from pydr.dr.cycle import replicate
from pydr.dr.vault import Vault, init_vault
from pydr.dr.warm import WarmState
from pydr.errors import InvalidState, TrackingLost

from conftest import sha
from qemuhelp import DaemonSockets, cli, end_by_pidfd, qemu_io, start_qcow2_daemon

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-nbd", "qemu-io", "qemu-storage-daemon")),
    reason="needs qemu-utils and qemu-system-common (scripts/bootstrap installs them)")
MiB = 1 << 20
SIZE = 64 * MiB
#: what each round writes between cycles: (offset, length, pattern)
ROUNDS = [[(3 * MiB, 4096, 0x21), (40 * MiB, 65536, 0x22)],
          [(3 * MiB + 4096, 8192, 0x31), (63 * MiB, 4096, 0x32), (0, 512, 0x33)],
          [],  # nothing changed
          [(17 * MiB, 2 * MiB, 0x41)]]


def make_image(path):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE)],
                   check=True)
    qemu_io(path, "write -P 0x11 0 8M", "write -P 0x12 32M 1M")


class LiveDisk(DaemonSockets):
    """A qcow2 image held by qemu-storage-daemon: NBD for its writer, QMP for pydr."""

    def __init__(self, d):
        self.dir = d
        d.mkdir()
        self.image = d / "live.qcow2"
        make_image(self.image)
        self.qmp, self.nbd = d / "qmp.sock", d / "nbd.sock"
        self.start()

    def start(self):
        for s in (self.qmp, self.nbd):
            if s.exists():
                s.unlink()
        self.pid, self.pidfd = start_qcow2_daemon(self.dir / "qsd.pid", self.image,
                                                  self.qmp, self.nbd)

    def write(self, offset, length, pattern):
        qemu_io(f"nbd+unix:///disk0?socket={self.nbd}",
                f"write -P {pattern} {offset} {length}", fmt="raw")

    def content_sha(self, tmp):
        out = self.dir / "content.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", "raw", "-O", "raw",
                        f"nbd+unix:///disk0?socket={self.nbd}", str(out)], check=True)
        try:
            return sha(out)
        finally:
            out.unlink()

    def kill(self):
        end_by_pidfd(self.pidfd, signal.SIGKILL, gone_ok=True)
        self.pidfd = None

    def stop(self):
        if self.pidfd is not None:
            end_by_pidfd(self.pidfd, gone_ok=True)
            self.pidfd = None


class ImageFile:
    """A qcow2 image file with persistent dirty bitmaps (no QEMU runs it)."""

    def __init__(self, d):
        self.dir = d
        d.mkdir()
        self.image = d / "disk.qcow2"
        make_image(self.image)
        self.spec = str(self.image)

    def write(self, offset, length, pattern):
        qemu_io(self.image, f"write -P {pattern} {offset} {length}")

    def content_sha(self, tmp):
        out = self.dir / "content.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(self.image), str(out)],
                       check=True)
        try:
            return sha(out)
        finally:
            out.unlink()

    def stop(self):
        pass


def protected(d, disk):
    vault = d / "vault"
    init_vault(vault)
    replica = d / "replica.img"
    r = cli(vault, "protect", "vm", "--disk", f"{disk.spec}={replica}", "--cbt")
    assert r.returncode == 0, r.stderr
    return vault, replica


def point_shas(vault, tmp):
    """{point id: sha256 of the point materialised}."""
    out = {}
    with Vault(vault, writer=True) as v:
        for p in v.store.points("vm"):
            dest = tmp / f"p{p['id']}"
            (path,) = v.materialize("vm", p["id"], dest).paths
            out[p["id"]] = sha(path)
            shutil.rmtree(dest)
    return out


def children():
    """Pids of this process's children (every thread's)."""
    found = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            found |= {int(p) for p in f.read().split()}
    return found


def open_paths():
    """What this process's descriptors point at."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return out


@pytest.fixture(params=["live", "file"])
def twins(request, tmp_path):
    """Two identical tracked disks, each protected in a vault of its own:
    one replicated cold, the other warm."""
    kind = LiveDisk if request.param == "live" else ImageFile
    disks = [kind(tmp_path / "cold"), kind(tmp_path / "warm")]
    try:
        yield [(disk,) + protected(disk.dir, disk) for disk in disks]
    finally:
        for disk in disks:
            disk.stop()


def test_warm_cycles_give_the_replicas_and_points_of_cold_ones(twins, tmp_path):
    (cold_disk, cold_vault, cold_replica), (warm_disk, warm_vault, warm_replica) = twins
    before = children()
    with WarmState() as warm, Vault(cold_vault, writer=True) as cv, \
            Vault(warm_vault, writer=True) as wv:
        replicate(cv.store, "vm")  # the initial copies
        replicate(wv.store, "vm", warm=warm)
        contents = [cold_disk.content_sha(tmp_path)]
        for writes in ROUNDS:
            for disk in (cold_disk, warm_disk):
                for offset, length, pattern in writes:
                    disk.write(offset, length, pattern)
            cold = replicate(cv.store, "vm")
            hot = replicate(wv.store, "vm", warm=warm)
            contents.append(cold_disk.content_sha(tmp_path))
            assert warm_disk.content_sha(tmp_path) == contents[-1]  # the twins got the same
            assert sha(warm_replica) == sha(cold_replica) == contents[-1]
            assert hot.bytes_written == cold.bytes_written
            assert len(warm) == 1  # its disk's entry, kept from one cycle to the next
        assert children() == before  # no qemu-nbd left running between cycles
    cold_points, warm_points = point_shas(cold_vault, tmp_path), point_shas(warm_vault, tmp_path)
    assert list(cold_points.values()) == list(warm_points.values()) == contents
    with Vault(cold_vault) as cv, Vault(warm_vault) as wv:  # the same steps, the same bitmaps
        assert [(s["idx"], s["step"], s["bytes"]) for s in cv.store.steps("vm")] == \
            [(s["idx"], s["step"], s["bytes"]) for s in wv.store.steps("vm")]
        assert [(d["bitmap"], d["generation"]) for d in cv.store.disks("vm")] == \
            [(d["bitmap"], d["generation"]) for d in wv.store.disks("vm")]


@pytest.fixture
def live(tmp_path):
    disk = LiveDisk(tmp_path / "live")
    vault, replica = protected(disk.dir, disk)
    yield disk, vault, replica
    disk.stop()


def test_a_restarted_daemon_between_warm_cycles_is_found_and_the_resync_is_exact(live, tmp_path):
    disk, vault, replica = live
    with WarmState() as warm, Vault(vault, writer=True) as v:
        replicate(v.store, "vm", warm=warm)
        disk.write(5 * MiB, 4096, "0x31")
        replicate(v.store, "vm", warm=warm)
        disk.write(6 * MiB, 4096, "0x32")  # then the daemon dies with its bitmaps
        disk.kill()
        disk.start()
        # as a cold cycle would: the bitmap is missing, the item needs a resync
        with pytest.raises((TrackingLost, InvalidState)) as raised:
            replicate(v.store, "vm", warm=warm)
        assert "missing" in str(raised.value)
        assert v.store.item("vm")["state"] == "resync-required"
        assert len(warm) == 0  # what it kept of the disk was dropped
        res = replicate(v.store, "vm", warm=warm, resync_all=True)
        assert sha(replica) == disk.content_sha(tmp_path)
        disk.write(7 * MiB, 8192, "0x33")  # and warm cycles go on from there
        replicate(v.store, "vm", warm=warm)
        assert sha(replica) == disk.content_sha(tmp_path)
    shas = point_shas(vault, tmp_path)
    assert shas[res.point_id] != shas[max(shas)]


def test_a_qmp_connection_to_a_restarted_daemon_is_not_used_again(live):
    from pydr.transport.qemu import Qmp

    disk, _, _ = live
    q = Qmp(str(disk.qmp))
    try:
        assert q.alive()
        disk.kill()
        disk.start()  # a new socket file at the same path
        assert not q.alive()
    finally:
        q.close()
    assert not q.alive()


def test_no_qmp_connection_is_held_between_cycles(live):
    """QEMU serves one QMP client at a time: between cycles, others get it."""
    disk, vault, _ = live
    with WarmState() as warm, Vault(vault, writer=True) as v:
        replicate(v.store, "vm", warm=warm)
        replicate(v.store, "vm", warm=warm)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(60)  # only a bug waits: the greeting comes at once when free
            s.connect(str(disk.qmp))
            assert b'"QMP"' in s.makefile("rb").readline()


@pytest.mark.parametrize("how", ["written", "replaced"])
def test_a_replica_changed_behind_the_service_is_not_trusted(live, tmp_path, how):
    disk, vault, replica = live
    with WarmState() as warm, Vault(vault, writer=True) as v:
        replicate(v.store, "vm", warm=warm)
        disk.write(5 * MiB, 4096, "0x31")
        replicate(v.store, "vm", warm=warm)
        if how == "written":  # someone else writes a block of the replica
            with open(replica, "r+b") as f:
                f.seek(9 * MiB)
                f.write(b"\xee" * 4096)
        else:  # or puts a copy in its place (another inode, same bytes)
            shutil.copyfile(replica, f"{replica}.copy")
            os.replace(f"{replica}.copy", replica)
        disk.write(9 * MiB, 4096, "0x44")
        # the signature cache bound to the old replica is not trusted: refused, as cold
        with pytest.raises(InvalidState, match="outside pydr|replaced|written") as raised:
            replicate(v.store, "vm", warm=warm)
        assert str(replica) in str(raised.value)
        assert len(warm) == 0
        replicate(v.store, "vm", warm=warm, resync_all=True)
        assert sha(replica) == disk.content_sha(tmp_path)
        disk.write(10 * MiB, 4096, "0x45")
        replicate(v.store, "vm", warm=warm)
        assert sha(replica) == disk.content_sha(tmp_path)


def test_another_process_cycle_in_between_drops_the_warm_entry(live, tmp_path):
    disk, vault, replica = live
    with WarmState() as warm:
        with Vault(vault, writer=True) as v:
            replicate(v.store, "vm", warm=warm)
            entry = warm.disk(str(vault), "vm", 0)
            assert entry.expected is not None
        disk.write(5 * MiB, 4096, "0x31")
        r = cli(vault, "replicate", "vm")  # an operator's one-shot cycle
        assert r.returncode == 0, r.stderr
        with Vault(vault, writer=True) as v:
            warm.begin(v.store, "vm")
            assert warm.disk(str(vault), "vm", 0) is not entry  # dropped: the next is cold
            disk.write(6 * MiB, 4096, "0x32")
            replicate(v.store, "vm", warm=warm)
    assert sha(replica) == disk.content_sha(tmp_path)


def test_close_leaves_no_child_and_no_descriptor(live, tmp_path):
    disk, vault, replica = live
    before = children()
    warm = WarmState()
    with Vault(vault, writer=True) as v:
        replicate(v.store, "vm", warm=warm)
        disk.write(5 * MiB, 4096, "0x31")
        replicate(v.store, "vm", warm=warm)
        entry = warm.disk(str(vault), "vm", 0)
        template_dir = entry._dir
        assert template_dir is not None and os.listdir(template_dir)
    warm.close()
    warm.close()  # idempotent
    assert children() == before
    held = open_paths()
    assert not [p for p in held if p.startswith((str(replica), str(vault), str(template_dir)))]
    assert not [p for p in held if "pydr-warm-" in p or "pydr-fleece-" in p]
    assert not os.path.exists(template_dir)
    with pytest.raises(ValueError):
        warm.disk(str(vault), "vm", 0)


@pytest.fixture
def image_item(tmp_path):
    disk = ImageFile(tmp_path / "file")
    vault, replica = protected(disk.dir, disk)
    return disk, vault, replica


def qemu_img_calls(monkeypatch):
    """The qemu-img operations run from now on (info, bitmap, create ...)."""
    import pydr.transport.qemu as tq

    calls, real = [], tq.qemu_img

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(tq, "qemu_img", counted)
    return calls


def test_a_warm_cycle_of_a_qcow2_image_reads_its_info_once(image_item, tmp_path, monkeypatch):
    disk, vault, replica = image_item
    with WarmState() as warm, Vault(vault, writer=True) as v:
        replicate(v.store, "vm")
        calls = qemu_img_calls(monkeypatch)
        disk.write(5 * MiB, 4096, "0x31")
        replicate(v.store, "vm")
        cold = list(calls)
        del calls[:]
        disk.write(6 * MiB, 4096, "0x32")
        replicate(v.store, "vm", warm=warm)
        disk.write(7 * MiB, 4096, "0x33")
        replicate(v.store, "vm", warm=warm)
        assert cold.count("info") == 3 and calls.count("info") == 2  # one a cycle
        assert calls.count("bitmap") == 2 * cold.count("bitmap") > 0  # the same changes
        assert sha(replica) == disk.content_sha(tmp_path)


def test_image_info_is_read_again_once_the_file_changed(tmp_path):
    from pydr.dr.warm import DiskWarm

    image = tmp_path / "x.qcow2"
    image.write_bytes(b"one")
    reads = []
    entry = DiskWarm((str(tmp_path), "vm", 0))

    def read():
        reads.append(1)
        return {"n": len(reads)}

    assert entry.image_info(str(image), read) == {"n": 1}
    assert entry.image_info(str(image), read) == {"n": 1}  # unchanged: not read again
    with open(image, "ab") as f:
        f.write(b"two")  # another size, mtime and ctime
    assert entry.image_info(str(image), read) == {"n": 2}
    os.replace(image, tmp_path / "old")
    image.write_bytes(b"one")  # another inode
    assert entry.image_info(str(image), read) == {"n": 3}
    entry.forget_info()
    assert entry.image_info(str(image), read) == {"n": 4}
    entry.close()


def test_resync_windows_hold_exactly_the_changed_spans():
    from pydr.engine.resync import WINDOW, _windows

    size = 5 * WINDOW + 1000
    spans = [(0, 4096), (WINDOW - 8192, WINDOW + 4096), (3 * WINDOW + 4096, 3 * WINDOW + 8192),
             (3 * WINDOW + 40960, 3 * WINDOW + 65536), (5 * WINDOW, size)]
    windows = list(_windows(size, spans))
    assert windows == [(0, WINDOW), (WINDOW, WINDOW + 4096),
                       (3 * WINDOW + 4096, 3 * WINDOW + 65536), (5 * WINDOW, size)]
    for w0, w1 in windows:  # never across a grid cell, block-aligned starts
        assert w0 // WINDOW == (w1 - 1) // WINDOW and w0 % 4096 == 0
    covered = sorted((max(a, w0), min(b, w1)) for w0, w1 in windows for a, b in spans
                     if a < w1 and b > w0)
    assert sum(b - a for a, b in covered) == sum(b - a for a, b in spans)
    assert list(_windows(size)) == [(w, min(size, w + WINDOW)) for w in range(0, size, WINDOW)]


@pytest.mark.parametrize("seed", range(6))
def test_a_tracked_resync_of_scattered_spans_is_exact(tmp_path, monkeypatch, seed):
    """Tracked cycles visit only the windows' changed parts (engine.resync._windows):
    the target and its signature cache end as a whole compare leaves them."""
    import random

    import pydr
    from pydr.engine import resync as R
    from pydr.engine.sigcache_any import cached_signature

    monkeypatch.setattr(R, "WINDOW", 256 << 10)
    rng = random.Random(seed)
    size = (4 << 20) + rng.choice([0, 1, 1000, 4095])
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    a = bytearray(size)
    for _ in range(20):  # data islands, the rest zeros
        at = rng.randrange(size)
        a[at:at + rng.randrange(1, 200_000)] = rng.randbytes(200_000)[:max(0, size - at)]
    a = a[:size]
    src.write_bytes(bytes(a))
    dst.write_bytes(bytes(a))
    pydr.resync(src, dst, signature_cache=cache)
    for _ in range(4):
        b = bytearray(a)
        changed = []
        for _ in range(rng.randrange(1, 12)):
            at = rng.randrange(size)
            n = rng.choice([1, 512, 4096, 70_000, 300_000])  # some cross a window's end
            fill = bytes(n) if rng.random() < 0.3 else rng.randbytes(n)
            b[at:at + n] = fill[:size - at]
            changed.append((at, min(n, size - at)))
        src.write_bytes(bytes(b))
        stats = pydr.resync(src, dst, signature_cache=cache, changed_extents=changed)
        assert stats.used_cache and dst.read_bytes() == bytes(b)
        assert cached_signature(cache) == pydr.signature(dst, block_size=4096)
        a = b

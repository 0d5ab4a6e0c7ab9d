"""Dirty bitmaps at the cycle's block size, with real QEMU tools: each
bitmap pydr adds (qemu-img bitmap --add -g, QMP block-dirty-bitmap-add
granularity=) gets the item's granularity, 4 KiB by default, so that a
tracked cycle after scattered 4 KiB writes reads about what was written --
counted where the data lives, in the /proc/PID/io of the
qemu-storage-daemon serving the disk. A bitmap of another granularity (one
left by a release before schema 10, at QEMU's 64 KiB) keeps working and the
next cycle replaces it. The replicas are exact."""

import json
import os
import random
import shutil
import sqlite3
import subprocess

import pytest

from pydr.dr.vault import Vault, init_vault
from pydr.errors import InvalidArgument

from conftest import pydr_command, rchar, sha
from qemuhelp import (DaemonSockets, cli, end_by_pidfd, qcow2_and_vault, qemu_io, raw_sha,
                      replicate, start_qcow2_daemon)

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-nbd", "qemu-io", "qemu-storage-daemon")),
    reason="needs qemu-utils and qemu-system-common (scripts/bootstrap installs them)")
KiB, MiB = 1 << 10, 1 << 20


def image_bitmaps(image):
    """{name: granularity} of a qcow2 image's persistent bitmaps."""
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)],
                                     check=True, capture_output=True, text=True).stdout)
    found = info.get("format-specific", {}).get("data", {}).get("bitmaps") or []
    return {b["name"]: b["granularity"] for b in found}


def recorded_granularity(vault):
    with Vault(vault) as v:
        return [d.granularity for d in v.disks("vm")]


def scattered(count, size, seed):
    """`count` distinct 4 KiB-aligned offsets over a disk of `size` bytes,
    each in a slot of its own (512 KiB), in the slot's first 256 KiB: more
    than 64 KiB apart (no two in one 64 KiB granule, nor in one read)."""
    rng = random.Random(seed)
    slots = rng.sample(range(size // (512 * KiB)), count)
    return sorted(s * 512 * KiB + rng.randrange(0, 256 * KiB, 4 * KiB) for s in slots)


@pytest.fixture
def qcow2_disk(tmp_path):
    return qcow2_and_vault(tmp_path, "128M", "write -P 0x11 0 16M", "write -P 0x22 64M 4M")


# -- protect: the granularity recorded and checked -----------------------------------------


def test_protect_records_the_granularity_and_refuses_a_bad_one(qcow2_disk, tmp_path):
    img, replica, vault = qcow2_disk
    for bad, says in (("3K", b"power of two"), ("256", b"power of two"),
                      ("128M", b"power of two"), ("lots", b"invalid size")):
        r = cli(vault, "protect", "vm", "--disk", f"{img}={replica}", "--cbt",
                "--cbt-granularity", bad)
        assert r.returncode == 2 and says in r.stderr and b"Traceback" not in r.stderr, r.stderr
    r = cli(vault, "protect", "vm", "--disk", f"{img}={replica}", "--cbt-granularity", "64K")
    assert r.returncode == 2 and b"--cbt" in r.stderr, r.stderr
    with Vault(vault, writer=True) as v:
        assert not v.store.has_item("vm")  # nothing recorded by a refused protect
        with pytest.raises(InvalidArgument):
            v.protect("vm", [(str(img), str(replica))], cbt=True, cbt_granularity=True)
        with pytest.raises(InvalidArgument):
            v.protect("vm", [(str(img), str(replica))], cbt=True, cbt_granularity=3 << 20)
        assert not v.store.has_item("vm")
    r = cli(vault, "protect", "vm", "--disk", f"{img}={replica}", "--cbt",
            "--cbt-granularity", "64K")
    assert r.returncode == 0, r.stderr
    assert recorded_granularity(vault) == [64 * KiB]
    replicate(vault)
    assert image_bitmaps(img) == {"pydr-1": 64 * KiB}
    assert sha(replica) == raw_sha(img, tmp_path)


def test_an_untracked_disk_records_no_granularity(tmp_path):
    src = tmp_path / "d.img"
    src.write_bytes(os.urandom(MiB))
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("vm", [(str(src), str(tmp_path / "r.img"))])
        assert [d.granularity for d in v.disks("vm")] == [None]


def test_a_damaged_granularity_in_the_vault_is_a_vault_error(qcow2_disk, tmp_path):
    """A recorded granularity that is not one (the vault edited or damaged)
    stops the cycle with exit 14 naming it, before QEMU is asked anything."""
    img, replica, vault = qcow2_disk
    assert cli(vault, "protect", "vm", "--disk", f"{img}={replica}", "--cbt").returncode == 0
    replicate(vault)
    db = sqlite3.connect(vault / "vault.db")
    db.execute("UPDATE disks SET granularity = 3000")
    db.commit()
    db.close()
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 14 and b"granularity 3000" in r.stderr and b"vm" in r.stderr, r.stderr
    assert image_bitmaps(img) == {"pydr-1": 4 * KiB}  # untouched


# -- qcow2 images: 4 KiB bitmaps, an old 64 KiB one replaced --------------------------------


def test_a_qcow2_tracked_disk_gets_4k_bitmaps_and_reads_what_was_written(qcow2_disk, tmp_path):
    img, replica, vault = qcow2_disk
    assert cli(vault, "protect", "vm", "--disk", f"{img}={replica}", "--cbt").returncode == 0
    assert recorded_granularity(vault) == [None]  # the default
    replicate(vault)
    assert image_bitmaps(img) == {"pydr-1": 4 * KiB}
    offsets = scattered(32, 128 * MiB, seed=1)
    qemu_io(img, *(f"write -P 0x{0x40 + i % 64:x} {off} 4k" for i, off in enumerate(offsets)))
    res = replicate(vault)
    assert sha(replica) == raw_sha(img, tmp_path)
    assert res["bytes_written"] == 32 * 4 * KiB
    # the 4 KiB extents, read on both sides (and the source again to encode
    # them, before read-once); 64 KiB granules would read 32 x 64 KiB a side
    assert res["bytes_read"] <= 3 * 32 * 4 * KiB, res["bytes_read"]
    assert image_bitmaps(img) == {"pydr-2": 4 * KiB}


def test_an_old_64k_bitmap_keeps_working_and_the_next_cycle_replaces_it(qcow2_disk, tmp_path):
    """A disk tracked before schema 10 has a bitmap at QEMU's 64 KiB. Its
    cycle reads its (64 KiB) extents; a cycle killed after its cut leaves a
    4 KiB bitmap beside it that the next cut merges back (across
    granularities: nothing lost); the cycle that succeeds leaves only a
    4 KiB bitmap."""
    img, replica, vault = qcow2_disk
    assert cli(vault, "protect", "vm", "--disk", f"{img}={replica}", "--cbt").returncode == 0
    replicate(vault)
    # what a release before schema 10 left: the recorded bitmap at 64 KiB
    subprocess.run(["qemu-img", "bitmap", "--remove", str(img), "pydr-1"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "65536", "--enable", str(img),
                    "pydr-1"], check=True)
    assert image_bitmaps(img) == {"pydr-1": 64 * KiB}
    qemu_io(img, "write -P 0x61 3M 4k", "write -P 0x62 100M 4k")
    env = dict(os.environ, PYDR_CRASH_AT="cycle.cut")
    r = subprocess.run(pydr_command() + ["replicate", "vm", "--vault", str(vault)], env=env,
                       capture_output=True)
    assert r.returncode == -9, r.stderr
    assert image_bitmaps(img) == {"pydr-1": 64 * KiB, "pydr-2": 4 * KiB}
    qemu_io(img, "write -P 0x63 50M 4k")  # lands in pydr-2 only: merged back by the next cut
    res = replicate(vault)
    assert sha(replica) == raw_sha(img, tmp_path)
    assert res["bytes_written"] == 3 * 4 * KiB
    assert res["bytes_read"] >= 3 * 64 * KiB  # the old bitmap's granules, read
    assert image_bitmaps(img) == {"pydr-2": 4 * KiB}  # the killed cycle's number, again
    qemu_io(img, "write -P 0x64 70M 4k")
    res = replicate(vault)
    assert sha(replica) == raw_sha(img, tmp_path)
    assert res["bytes_written"] == 4 * KiB and res["bytes_read"] < 64 * KiB, res
    assert image_bitmaps(img) == {"pydr-3": 4 * KiB}


def test_a_failed_cycle_merges_an_old_64k_bitmap_into_its_4k_successor(tmp_path):
    """The tracker's abort (a cycle that failed after its cut) merges the
    frozen 64 KiB bitmap into the new 4 KiB one: the next cut still reads
    every granule the old bitmap had."""
    from pydr.dr.tracking import Qcow2Tracker
    from pydr.endpoints import open_endpoint

    img = tmp_path / "os.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "65536", "--enable", str(img),
                    "pydr-1"], check=True)
    qemu_io(img, "write -P 0x71 1M 4k", "write -P 0x72 9M 4k")  # recorded at 64 KiB
    disk = {"idx": 0, "bitmap": "pydr-1", "generation": 1, "granularity": None}
    tracker = Qcow2Tracker(None, "vm", disk, open_endpoint(str(img)))
    tracker.validate()
    with tracker.cut(False) as cut:
        assert cut.changed == [(1 * MiB, 64 * KiB), (9 * MiB, 64 * KiB)]
        assert image_bitmaps(img) == {"pydr-1": 64 * KiB, "pydr-2": 4 * KiB}
    tracker.abort()  # the cycle failed: nothing it tracked may be lost
    assert image_bitmaps(img) == {"pydr-2": 4 * KiB}
    qemu_io(img, "write -P 0x73 5M 4k")  # recorded at 4 KiB
    disk = {"idx": 0, "bitmap": "pydr-2", "generation": 2, "granularity": None}
    tracker = Qcow2Tracker(None, "vm", disk, open_endpoint(str(img)))
    tracker.validate()
    with tracker.cut(False) as cut:
        # the merged granules are 4 KiB bits now: all 16 of each old granule set
        assert cut.changed == [(1 * MiB, 64 * KiB), (5 * MiB, 4 * KiB), (9 * MiB, 64 * KiB)]
    tracker.commit()
    assert image_bitmaps(img) == {"pydr-3": 4 * KiB}


# -- large granules: never a cycle that refuses for what one write marked ------------------


def status(vault):
    r = cli(vault, "status", "vm", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_protect_refuses_a_granularity_larger_than_the_disk(tmp_path):
    """A granule larger than the source disk (its size known at protect)
    is refused, exit 2 naming both sizes; nothing is recorded. A granule
    of the disk's size is accepted."""
    img, replica, vault = tmp_path / "small.qcow2", tmp_path / "r.img", tmp_path / "vault"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "32M"], check=True)
    init_vault(vault)
    r = cli(vault, "protect", "vm", "--disk", f"{img}={replica}", "--cbt",
            "--cbt-granularity", "64M")
    assert r.returncode == 2 and b"larger than" in r.stderr and str(img).encode() in r.stderr \
        and b"Traceback" not in r.stderr, r.stderr
    with Vault(vault, writer=True) as v:
        assert not v.store.has_item("vm")
        with pytest.raises(InvalidArgument, match="larger than"):
            v.protect("vm", [(str(img), str(replica))], cbt=True, cbt_granularity=64 * MiB)
        assert not v.store.has_item("vm")
        v.protect("vm", [(str(img), str(replica))], cbt=True, cbt_granularity=32 * MiB)
        assert [d.granularity for d in v.disks("vm")] == [32 * MiB]


def test_granules_over_half_the_disk_make_the_cycle_compare_it_whole(qcow2_disk, tmp_path):
    """At 64 MiB granules two 4 KiB writes mark the whole 128 MiB disk
    dirty. The cycle compares the whole disk (the source read in full, the
    replica through its signature cache), as an untracked cycle does,
    instead of refusing with resync-required: the replica is exact, only
    the written blocks are sent, and the bitmaps go on rotating."""
    img, replica, vault = qcow2_disk
    r = cli(vault, "protect", "vm", "--disk", f"{img}={replica}", "--cbt",
            "--cbt-granularity", "64M")
    assert r.returncode == 0, r.stderr
    replicate(vault)
    for cycle, offsets in ((2, (4 * KiB, 100 * MiB)), (3, (8 * KiB, 70 * MiB))):
        qemu_io(img, *(f"write -P 0x{0x70 + cycle:x} {off} 4k" for off in offsets))
        r = cli(vault, "replicate", "vm", "--json")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert sha(replica) == raw_sha(img, tmp_path)
        assert res["bytes_written"] == 2 * 4 * KiB, res
        assert image_bitmaps(img) == {f"pydr-{cycle}": 64 * MiB}
        st = status(vault)
        assert st["state"] == "protected" and not st["last_error"], st
    qemu_io(img, "write -P 0x7f 12K 4k")  # one granule of two: a tracked compare again
    res = replicate(vault)
    assert sha(replica) == raw_sha(img, tmp_path) and res["bytes_written"] == 4 * KiB


def test_a_host_task_compares_the_whole_disk_when_granules_cover_over_half(qcow2_disk,
                                                                            tmp_path):
    """The same on an item's host (pydr.dr.agent.cycle_item, run as a fleet
    worker runs it: its task and result through a pickle)."""
    from test_rpo import PickledExecutor

    img, replica, vault = qcow2_disk
    with Vault(vault, writer=True) as v:
        v.protect("vm", [(str(img), str(replica))], cbt=True, cbt_granularity=64 * MiB,
                  host="hv-a")
        assert not v.replicate("vm", executor=PickledExecutor()).failed
        qemu_io(img, "write -P 0x77 4k 4k", "write -P 0x78 100M 4k")
        result = v.replicate("vm", executor=PickledExecutor())
        assert not result.failed and v.status("vm").state == "protected"
        assert sha(replica) == raw_sha(img, tmp_path)
        assert image_bitmaps(img)["pydr-2"] == 64 * MiB
        assert [p.id for p in v.points("vm")] == [1, 2]


# -- a live disk: what the qemu-storage-daemon reads for a tracked cycle --------------------


class QcowDaemon(DaemonSockets):
    """A 512 MiB qcow2 image held by qemu-storage-daemon (its file node with
    aio=threads, so every read is a read the daemon's threads count in
    /proc/PID/io rchar): an NBD export for its writer, a QMP socket for pydr."""

    def __init__(self, tmp_path):
        raw = tmp_path / "content.raw"
        rng = random.Random(22)
        with open(raw, "wb") as f:  # 8 MiB of data every 32 MiB: 128 MiB of data
            f.truncate(512 * MiB)
            for at in range(0, 512 * MiB, 32 * MiB):
                f.seek(at)
                f.write(rng.randbytes(8 * MiB))
        self.disk = tmp_path / "live.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                        str(self.disk)], check=True)
        raw.unlink()
        self.qmp, self.nbd = tmp_path / "qmp.sock", tmp_path / "nbd.sock"
        self.pid, self.pidfd = start_qcow2_daemon(tmp_path / "qsd.pid", self.disk, self.qmp,
                                                  self.nbd, ",aio=threads")

    def rchar(self):
        """Bytes the daemon has read so far (files and sockets)."""
        return rchar(self.pid)

    def qmp_command(self, command, **arguments):
        from pydr.transport.qemu import Qmp

        with Qmp(str(self.qmp)) as q:
            return q.execute(command, **arguments)

    def bitmap_granularities(self):
        from pydr.transport.qemu import Qmp, node_bitmaps

        with Qmp(str(self.qmp)) as q:
            return {name: b["granularity"] for name, b in node_bitmaps(q, "disk0").items()}

    def stop(self):
        end_by_pidfd(self.pidfd)


@pytest.fixture
def daemon(tmp_path):
    d = QcowDaemon(tmp_path)
    yield d
    d.stop()


@pytest.fixture
def tracked_daemon(daemon, tmp_path):
    """(daemon, vault, replica): the daemon's disk protected --cbt as item
    'vm', its first cycle done."""
    vault = tmp_path / "vault"
    init_vault(vault)
    replica = tmp_path / "replica.img"
    r = cli(vault, "protect", "vm", "--disk", f"{daemon.spec}={replica}", "--cbt")
    assert r.returncode == 0, r.stderr
    replicate(vault)
    return daemon, vault, replica


#: what else the daemon reads in a tracked cycle: the fleecing overlay's
#: qcow2 metadata (64 KiB of preads at blockdev-add), its event counters
#: (8-byte eventfd reads), the NBD and QMP requests from their sockets --
#: 142 KiB measured for a cycle with nothing changed (QEMU 7.2) -- and an L2
#: table of the source if its cache dropped it (64 KiB: one covers 512 MiB)
METADATA_ALLOWANCE = 256 * KiB


def test_a_tracked_cycle_reads_at_the_source_what_was_written(tracked_daemon, tmp_path):
    daemon, vault, replica = tracked_daemon
    assert daemon.bitmap_granularities() == {"pydr-1": 4 * KiB}
    offsets = scattered(256, 512 * MiB, seed=22)
    commands = [f"write -P 0x{0x80 + i % 64:x} {off} 4k" for i, off in enumerate(offsets)]
    before = daemon.rchar()
    res = replicate(vault)  # nothing changed: what a cycle reads besides the data
    fixed = daemon.rchar() - before
    assert res["bytes_written"] == 0 and fixed <= METADATA_ALLOWANCE, fixed
    qemu_io(daemon.uri, *commands, fmt="raw")  # through the daemon: its bitmap records them

    before = daemon.rchar()
    res = replicate(vault)
    read = daemon.rchar() - before

    changed = 256 * 4 * KiB
    assert res["bytes_written"] == changed
    print(f"the qemu-storage-daemon read {read} bytes for a tracked cycle after {changed} "
          f"bytes of scattered 4 KiB writes, {fixed} with nothing changed (pydr says "
          f"{res['bytes_read']} read)")
    assert read >= changed  # it did read each changed block
    # 1.5 MiB plus metadata: each changed block read once (needs read-once,
    # pydr.engine.resync encoding from the buffer it hashed), at 4 KiB granules
    assert read <= 3 * MiB // 2 + METADATA_ALLOWANCE, read
    assert daemon.bitmap_granularities() == {"pydr-3": 4 * KiB}
    assert sha(replica) == raw_sha(daemon.uri, tmp_path, fmt="raw")


def test_a_live_disks_old_64k_bitmap_keeps_working_and_is_replaced(tracked_daemon, tmp_path):
    daemon, vault, replica = tracked_daemon
    # what a release before schema 10 added: the recorded bitmap at QEMU's 64 KiB
    daemon.qmp_command("block-dirty-bitmap-remove", node="disk0", name="pydr-1")
    daemon.qmp_command("block-dirty-bitmap-add", node="disk0", name="pydr-1",
                       granularity=64 * KiB, persistent=False)
    assert daemon.bitmap_granularities() == {"pydr-1": 64 * KiB}
    offsets = scattered(16, 512 * MiB, seed=7)
    qemu_io(daemon.uri, *(f"write -P 0x{0x90 + i:x} {off} 4k" for i, off in enumerate(offsets)),
            fmt="raw")
    res = replicate(vault)
    assert res["bytes_written"] == 16 * 4 * KiB
    assert res["bytes_read"] >= 16 * 64 * KiB  # its extents: whole 64 KiB granules
    assert daemon.bitmap_granularities() == {"pydr-2": 4 * KiB}
    assert sha(replica) == raw_sha(daemon.uri, tmp_path, fmt="raw")
    qemu_io(daemon.uri, *(f"write -P 0x{0xa0 + i:x} {off} 4k" for i, off in enumerate(offsets)),
            fmt="raw")
    res = replicate(vault)
    assert res["bytes_written"] == 16 * 4 * KiB and res["bytes_read"] < 16 * 64 * KiB, res
    assert daemon.bitmap_granularities() == {"pydr-3": 4 * KiB}
    assert sha(replica) == raw_sha(daemon.uri, tmp_path, fmt="raw")

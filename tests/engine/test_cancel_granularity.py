"""A set ``cancel`` event stops every long engine operation within about
CANCEL_BYTES (16 MiB) of I/O per thread, wherever it is set: in the first
progress callback, between the pieces a signing thread reads, in the middle of
a resync's write phase, once a batch is on the target. No timers: each cancel
is set at a point the engine reaches deterministically.

What was read after the cancel is the process's storage reads
(/proc/self/io read_bytes; the disks are evicted from the page cache first,
so every byte the engine reads is counted), or qemu-nbd's for an export.
After each cancel the same operation runs again and its result is checked
byte for byte (sha256 of the disks, the xxhash oracle for signatures).
"""

import hashlib
import os
import random
import subprocess
import threading

import pytest

import pydr
from pydr.engine import bindings as B
from pydr.engine import crashpoints, progress as P
from pydr.engine import journal as J
from pydr.engine.delta import BATCH_BYTES
from pydr.engine.parallel import CANCEL_BYTES

from conftest import as_ints, oracle
from disks import evict
from qemuhelp import qemu_nbd_servers

MiB = 1 << 20
THREADS = 2
READAHEAD = 4 * MiB  # what the kernel may read ahead of the last piece asked for
#: reads allowed after the cancel point: ~16 MiB plus one piece per thread
BOUND = CANCEL_BYTES + THREADS * CANCEL_BYTES + READAHEAD
#: a resync's writer thread also finishes the batch it is in (journaled, then
#: written: one unit), reading the old contents it replaces
RESYNC_BOUND = BOUND + BATCH_BYTES


def _data(seed, size):
    rng = random.Random(seed)
    return rng.randbytes(size)


def _make_dense(path, size, seed):
    with open(path, "wb") as f:
        for off in range(0, size, 16 * MiB):
            f.write(_data(seed * 1_000_003 + off // MiB, min(16 * MiB, size - off)))
    return path


def _make_sparse(path, size, seed):
    """1 GiB with 24 MiB of data every 128 MiB (192 MiB of data), holes between."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 128 * MiB):
            f.seek(off + 8 * MiB)
            f.write(_data(seed * 1_000_003 + off // MiB, 24 * MiB))
    return path


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * MiB):
            h.update(chunk)
    return h.hexdigest()


def read_bytes(pid="self"):
    with open(f"/proc/{pid}/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["read_bytes"])


class CancelAt:
    """A progress callback that sets the event when `when(record)` first holds
    and notes the reads (of `pid`) at that moment."""

    def __init__(self, when=lambda rec: True, pid="self"):
        self.event = threading.Event()
        self.when = when
        self.pid = pid
        self.records = []
        self.read_at = None

    def __call__(self, rec):
        self.records.append(rec)
        if not self.event.is_set() and self.when(rec):
            self.read_at = read_bytes(self.pid)
            self.event.set()

    def read_after(self):
        assert self.read_at is not None, "the cancel point was never reached"
        return read_bytes(self.pid) - self.read_at


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    """{name: (path, sha256)}: a dense 64 MiB disk and a 1 GiB sparse one
    with 192 MiB of data, and for each an older version to resync over."""
    d = tmp_path_factory.mktemp("disks")
    out = {}
    for name, size, make in (("64M", 64 * MiB, _make_dense), ("1G", 1 << 30, _make_sparse)):
        src = make(d / f"{name}.src", size, 1)
        old = make(d / f"{name}.old", size, 2)
        out[name] = (src, sha(src), old, sha(old))
    return out


SIZES = ["64M", "1G"]


def _fresh_target(disks, name, tmp_path):
    """A copy of the old version of the disk (a different image: a resync
    must write), evicted like the source."""
    src, _, old, old_sha = disks[name]
    dst = tmp_path / "dst"
    subprocess.run(["cp", "--sparse=always", str(old), str(dst)], check=True)
    evict(src, dst)
    return dst


# -- signature -------------------------------------------------------------------

@pytest.mark.parametrize("name", SIZES)
def test_signature_stops_at_the_first_progress_callback(disks, name):
    src = disks[name][0]
    evict(src)
    cb = CancelAt()
    with pytest.raises(pydr.Cancelled):
        pydr.signature(src, threads=THREADS, progress=cb, cancel=cb.event)
    assert cb.read_after() <= BOUND
    sig = pydr.signature(src, block_size=65536, threads=THREADS)
    with open(src, "rb") as f:  # the oracle over the data; holes hash as zeros
        assert as_ints(sig) == oracle(f.read(), 65536, "xxh3-128")


@pytest.mark.parametrize("name", SIZES)
def test_signing_threads_stop_within_a_piece_of_a_cancel_set_meanwhile(disks, name,
                                                                       monkeypatch):
    """Someone sets the event as the first piece of 16 MiB is signed (no
    callback involved): every thread stops within the piece it is in. Before,
    a thread signed its whole 64 MiB chunk first: the 64 MiB disk ended
    without Cancelled."""
    src = disks[name][0]
    evict(src)
    ev = threading.Event()
    seen = {}
    real = B.Signer.sign

    def sign(self, device, offset, length, *args, **kwargs):
        assert length <= CANCEL_BYTES  # the engine asks for a piece at a time
        real(self, device, offset, length, *args, **kwargs)
        if length and not ev.is_set():
            seen["read_at"] = read_bytes()
            ev.set()

    monkeypatch.setattr(B.Signer, "sign", sign)
    with pytest.raises(pydr.Cancelled):
        pydr.signature(src, block_size=4096, threads=THREADS, cancel=ev)
    assert read_bytes() - seen["read_at"] <= THREADS * CANCEL_BYTES + READAHEAD
    monkeypatch.setattr(B.Signer, "sign", real)
    sig = pydr.signature(src, block_size=4096, threads=THREADS)
    assert sig == pydr.signature(src, block_size=4096, threads=1)


# -- resync, file to file ------------------------------------------------------------

@pytest.mark.parametrize("name", SIZES)
def test_resync_stops_at_the_first_progress_callback(disks, name, tmp_path):
    src, src_sha, _, old_sha = disks[name]
    dst = _fresh_target(disks, name, tmp_path)
    cb = CancelAt()
    with pytest.raises(pydr.Cancelled):
        pydr.resync(src, dst, threads=THREADS, progress=cb, cancel=cb.event)
    assert cb.read_after() <= RESYNC_BOUND
    assert J.pending(dst) is None and sha(dst) == old_sha  # nothing was written
    pydr.resync(src, dst, threads=THREADS)
    assert sha(dst) == src_sha


@pytest.mark.parametrize("name", SIZES)
def test_resync_stops_in_its_write_phase(disks, name, tmp_path, monkeypatch):
    """Every 16 MiB of records encoded reports progress and looks at the
    event (before, a 256 MiB window was encoded and written whole)."""
    from pydr.engine import resync as R

    monkeypatch.setattr(P, "REPORT_INTERVAL", 0)  # every report reaches the callback
    writing = []
    real = R.write_records

    def write_records(*args, **kwargs):  # marks the write phase of a window
        writing.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "write_records", write_records)
    src, src_sha, _, _ = disks[name]
    dst = _fresh_target(disks, name, tmp_path)
    cb = CancelAt(lambda rec: bool(writing))
    with pytest.raises(pydr.Cancelled):
        pydr.resync(src, dst, threads=THREADS, progress=cb, cancel=cb.event)
    assert cb.read_after() <= RESYNC_BOUND
    # the first record of the write phase came after one piece of records
    assert cb.records[-1].read_bytes - cb.records[-2].read_bytes <= CANCEL_BYTES
    pydr.resync(src, dst, threads=THREADS)
    assert sha(dst) == src_sha and J.pending(dst) is None


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("finish", ["rerun", "rollback"])
def test_resync_cancelled_once_a_batch_is_written_is_left_as_a_kill_leaves_it(
        disks, name, finish, tmp_path, monkeypatch):
    """The event is set as the first batch is written to the target: the
    resync stops, the undo journal stays (as after a kill), and running it
    again finishes the target, or rollback puts the old one back."""
    src, src_sha, _, old_sha = disks[name]
    dst = _fresh_target(disks, name, tmp_path)
    ev = threading.Event()
    seen = {}
    real = crashpoints.reached

    def reached(point):
        if point == "apply.written" and not ev.is_set():
            seen["read_at"] = read_bytes()
            ev.set()
        real(point)

    monkeypatch.setattr(crashpoints, "reached", reached)
    with pytest.raises(pydr.Cancelled):
        pydr.resync(src, dst, threads=THREADS, cancel=ev)
    assert read_bytes() - seen["read_at"] <= RESYNC_BOUND
    monkeypatch.setattr(crashpoints, "reached", real)
    assert J.pending(dst) is not None and sha(dst) not in (src_sha, old_sha)
    if finish == "rerun":
        pydr.resync(src, dst, threads=THREADS)
        assert sha(dst) == src_sha
    else:
        pydr.rollback(dst)
        assert sha(dst) == old_sha
    assert J.pending(dst) is None


# -- resync to an NBD export ------------------------------------------------------------

@pytest.fixture
def nbd_target(tmp_path, monkeypatch):
    """(start(image) -> (uri, pid)): a writable qemu-nbd export of an image."""
    import shutil

    if not B.nbd_available() or shutil.which("qemu-nbd") is None:
        pytest.skip("pydr built without libnbd, or no qemu-nbd")
    monkeypatch.setenv("PYDR_JOURNAL_DIR", str(tmp_path / "journals"))
    with qemu_nbd_servers(tmp_path) as start:
        yield lambda image: (start(image, read_only=False), start.procs[-1].pid)


@pytest.mark.parametrize("name", SIZES)
def test_an_nbd_export_stops_at_the_first_progress_callback(disks, name, tmp_path, nbd_target):
    """Signing an export: the readers run on their own threads, the caller's
    reports and passes the cancel on to the C core (before, one connection
    signed a 256 MiB window in the caller's thread and looked at the event
    only between windows: the 64 MiB export was signed whole). The server's
    reads are counted. Then a resync to the export, stopped the same way,
    and run again."""
    src, src_sha, _, old_sha = disks[name]
    dst = _fresh_target(disks, name, tmp_path)
    uri, pid = nbd_target(dst)
    from pydr.engine.devices import NbdDevice

    cb = CancelAt(pid=pid)
    with NbdDevice(uri) as dev, pytest.raises(pydr.Cancelled):
        pydr.signature(dev, block_size=4096, progress=cb, cancel=cb.event)
    assert cb.read_after() <= BOUND
    cb = CancelAt(pid=pid)
    with pytest.raises(pydr.Cancelled):
        pydr.resync(src, uri, threads=THREADS, progress=cb, cancel=cb.event)
    assert cb.read_after() <= BOUND
    assert sha(dst) == old_sha
    pydr.resync(src, uri, threads=THREADS)
    assert sha(dst) == src_sha


def test_resync_to_an_nbd_export_cancelled_after_a_batch_keeps_its_journal(
        disks, tmp_path, nbd_target, monkeypatch):
    src, src_sha, _, old_sha = disks["64M"]
    dst = _fresh_target(disks, "64M", tmp_path)
    uri, pid = nbd_target(dst)
    ev = threading.Event()
    real = crashpoints.reached

    def reached(point):
        if point == "apply.written":
            ev.set()
        real(point)

    monkeypatch.setattr(crashpoints, "reached", reached)
    with pytest.raises(pydr.Cancelled):
        pydr.resync(src, uri, threads=THREADS, cancel=ev)
    monkeypatch.setattr(crashpoints, "reached", real)  # (undo() would drop the journal dir)
    journals = [n for n in os.listdir(tmp_path / "journals") if n.endswith(".pydr-undo")]
    assert journals and sha(dst) not in (src_sha, old_sha)
    pydr.resync(src, uri, threads=THREADS)
    assert sha(dst) == src_sha
    assert not [n for n in os.listdir(tmp_path / "journals") if n.endswith(".pydr-undo")]


# -- make_delta and apply_delta ------------------------------------------------------------

@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("where", ["first callback", "write phase"])
def test_make_delta_stops(disks, name, where, tmp_path):
    """In the first callback (before the source is read), or in the last one
    of its signing: then within one piece of records encoded."""
    src, src_sha, old, old_sha = disks[name]
    base_sig = pydr.signature(old, block_size=4096, threads=THREADS)
    evict(src)
    out = tmp_path / "d.delta"
    cb = CancelAt(lambda rec: True if where == "first callback" else rec.finished)
    with pytest.raises(pydr.Cancelled):
        pydr.make_delta(src, out, against=base_sig, threads=THREADS, progress=cb,
                        cancel=cb.event)
    assert cb.read_after() <= (BOUND if where == "first callback" else CANCEL_BYTES + READAHEAD)
    assert not out.exists()
    pydr.make_delta(src, out, against=base_sig, threads=THREADS)
    dst = tmp_path / "dst"
    subprocess.run(["cp", "--sparse=always", str(old), str(dst)], check=True)
    pydr.apply_delta(out, dst)
    assert sha(dst) == src_sha


@pytest.mark.parametrize("name", SIZES)
def test_apply_delta_stops_at_the_first_progress_callback(disks, name, tmp_path):
    """The first callback comes after the first batch; the apply stops
    before the next one and is rolled back (an apply's way); run again, it
    makes the target exact."""
    src, src_sha, old, old_sha = disks[name]
    delta = tmp_path / "d.delta"
    pydr.make_delta(src, delta, target=old, threads=THREADS)
    dst = _fresh_target(disks, name, tmp_path)
    evict(delta)
    cb = CancelAt()
    with pytest.raises(pydr.Cancelled):
        pydr.apply_delta(delta, dst, progress=cb, cancel=cb.event)
    assert cb.records and not cb.records[0].finished
    assert cb.read_after() <= BOUND
    assert sha(dst) == old_sha and J.pending(dst) is None
    pydr.apply_delta(delta, dst)
    assert sha(dst) == src_sha


# -- rollback -------------------------------------------------------------------------------

def test_rollback_stops_before_its_next_record_and_finishes_when_run_again(disks, tmp_path,
                                                                        monkeypatch):
    """A resync stopped once a batch is on the target leaves its journal;
    rolling it back is stopped as its first record is written back (before
    the next one: at most a record of 16 MiB), the journal stays whole, and
    rolling back again restores the old image."""
    from pydr.engine import apply as A
    from pydr.engine.devices import FileDevice

    src, src_sha, _, old_sha = disks["1G"]
    dst = _fresh_target(disks, "1G", tmp_path)
    stop = threading.Event()
    real = crashpoints.reached

    def reached(point):
        if point == "apply.written":
            stop.set()
        real(point)

    monkeypatch.setattr(crashpoints, "reached", reached)
    with pytest.raises(pydr.Cancelled):
        pydr.resync(src, dst, threads=THREADS, cancel=stop)
    monkeypatch.setattr(crashpoints, "reached", real)
    journal = J.pending(dst)
    assert journal is not None and len(J.scan(journal).records) > 1
    ev = threading.Event()
    writes = []
    real_write = FileDevice.apply_write

    def apply_write(self, recs):
        real_write(self, recs)
        writes.append(len(recs))
        ev.set()

    monkeypatch.setattr(FileDevice, "apply_write", apply_write)
    with pytest.raises(pydr.Cancelled):
        A.rollback(dst, cancel=ev)
    monkeypatch.setattr(FileDevice, "apply_write", real_write)
    assert len(writes) == 1 and writes[0] <= B.RECORD_HEADER + B.RECORD_MAX
    assert J.pending(dst) == journal and sha(dst) != old_sha
    A.rollback(dst)
    assert sha(dst) == old_sha and J.pending(dst) is None

"""Signing spans of a window and keeping what was read (pydr_signer_sign_spans),
and the memory device that encodes records from it (pydr_device_open_memory),
on real parts: a sparse file, a FUSE file that fails to read (faultyfs), and
qemu-nbd serving them.

Every byte a span covers is hashed and, with keep, stored at its place in the
caller's buffer; what lies outside the spans, and holes (never read), are left
untouched; records encoded from the kept bytes are those encoded from the disk.
"""

import contextlib
import errno
import os
import re
import subprocess
from array import array

import pytest

import pydr
from pydr.engine import bindings as B
from pydr.engine import devices as D
from pydr.engine.bindings import ffi, lib
from pydr.engine.progress import Throttle

from conftest import oracle
from nbdfail import FailingNbdServer
from qemuhelp import qemu_nbd_servers

KiB, MiB = 1 << 10, 1 << 20
BS = 4096
XXH3_128 = B.ALGORITHMS["xxh3-128"]
SIZE = 12 * MiB + 1234                  # a short last block
HOLE = (2 * MiB, 3 * MiB)               # punched: a hole in the file
ZEROS = (5 * MiB, 5 * MiB + 64 * KiB)   # written zeros: data that is zero
# spans of more than 8 MiB (NBD asks block status for them), one across the
# hole, one across the written zeros, the last one ending on the short block
SPANS = [(0, 64 * KiB), (1 * MiB + 4 * KiB, 9 * MiB), (9 * MiB + 64 * KiB, 9 * MiB + 128 * KiB),
         (12 * MiB, SIZE)]
HASH_SENTINEL, MASK_SENTINEL, KEEP_SENTINEL = 0xEE, 7, 0x5A


@pytest.fixture
def image(tmp_path):
    """(path, data): a random file of SIZE bytes with a hole at HOLE and
    written zeros at ZEROS."""
    data = bytearray(os.urandom(SIZE))
    data[ZEROS[0]:ZEROS[1]] = bytes(ZEROS[1] - ZEROS[0])
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    subprocess.run(["fallocate", "-p", "-o", str(HOLE[0]), "-l", str(HOLE[1] - HOLE[0]),
                    str(path)], check=True)
    data[HOLE[0]:HOLE[1]] = bytes(HOLE[1] - HOLE[0])
    return str(path), bytes(data)


@pytest.fixture
def nbd_server(tmp_path):
    """Start qemu-nbd (read-only, raw) on a unix socket for a file; yields a
    function(path) -> URI; stops them afterwards."""
    if not B.nbd_available():
        pytest.fail("pydr was built without libnbd")
    with qemu_nbd_servers(tmp_path) as start:
        yield start


@contextlib.contextmanager
def file_device(path):
    """A Device over a read-only descriptor of `path`, closed on exit."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with B.Device.open_fd(fd, name=path) as device:
            yield device
    finally:
        os.close(fd)


def pairs(spans):
    """(start, end) spans as the core's flat (start, length) uint64 pairs."""
    return array("Q", [v for start, end in spans for v in (start, end - start)])


def sign_spans(device, spans, *, keep=True, flags=0, offset=0, size=SIZE, progress=None):
    """Raw pydr_signer_sign_spans of the window [offset, size) into sentinel
    buffers; returns (rc, error, hashes, mask, keep)."""
    n = (size - offset + BS - 1) // BS
    hashes = bytearray([HASH_SENTINEL]) * (16 * n)
    mask = bytearray([MASK_SENTINEL]) * n
    kept = bytearray([KEEP_SENTINEL]) * (size - offset) if keep else None
    signer = ffi.new("pydr_signer **")
    assert lib.pydr_signer_create(signer, BS, XXH3_128, 0, flags) == 0
    signer = ffi.gc(signer[0], lib.pydr_signer_free)
    error, span_pairs = B.new_error(), pairs(spans)
    with ffi.from_buffer("uint64_t[]", span_pairs) as s, \
            ffi.from_buffer("uint64_t[]", hashes) as h, ffi.from_buffer("uint8_t[]", mask) as z:
        k = ffi.from_buffer("uint8_t[]", kept) if keep else ffi.NULL
        rc = lib.pydr_signer_sign_spans(signer, device._ptr, offset, n, s, len(spans), h, z,
                                        k, len(kept) if keep else 0,
                                        progress._ptr if progress else ffi.NULL, error)
    return rc, error, hashes, mask, kept


def in_spans(pos, spans):
    return any(start <= pos < end for start, end in spans)


def check_window(data, spans, hashes, mask, kept, holes, offset=0):
    """Every block of the spans hashed as python-xxhash does, its mask 1
    exactly when it is all zeros; blocks outside untouched; keep holds the
    bytes read, and its sentinel in the holes (not read) and outside."""
    expect = oracle(data[offset:], BS, "xxh3-128")
    for b, (lo, hi) in enumerate(expect):
        pos = offset + b * BS
        block = data[pos:pos + BS]
        got_hash = (int.from_bytes(hashes[16 * b:16 * b + 8], "little"),
                    int.from_bytes(hashes[16 * b + 8:16 * b + 16], "little"))
        kept_block = kept[pos - offset:pos - offset + len(block)] if kept is not None else None
        if in_spans(pos, spans):
            assert got_hash == (lo, hi), f"block at {pos}"
            assert mask[b] == (not any(block)), f"mask at {pos}"
            if kept is None:
                continue
            if in_spans(pos, holes):
                assert kept_block == bytes([KEEP_SENTINEL]) * len(block), f"hole at {pos} read"
                assert mask[b] == 1
            else:
                assert kept_block == block, f"keep at {pos}"
        else:
            assert hashes[16 * b:16 * b + 16] == bytes([HASH_SENTINEL]) * 16, f"{pos} touched"
            assert mask[b] == MASK_SENTINEL, f"mask at {pos} touched"
            if kept is not None:
                assert kept_block == bytes([KEEP_SENTINEL]) * len(block), f"keep at {pos}"


# -- files -----------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [True, False], ids=["keep", "no-keep"])
@pytest.mark.parametrize("flags", [0, lib.PYDR_SIGN_NO_MMAP], ids=["mmap", "pread"])
def test_spans_of_a_file_are_hashed_and_kept_holes_untouched(image, keep, flags):
    path, data = image
    with file_device(path) as device:
        progress = B.Progress()
        rc, error, hashes, mask, kept = sign_spans(device, SPANS, keep=keep, flags=flags,
                                                   progress=progress)
    assert rc == 0, B.ffi.string(lib.pydr_strerror(rc))
    check_window(data, SPANS, hashes, mask, kept, holes=[HOLE])
    span_bytes = sum(end - start for start, end in SPANS)
    hole_bytes = sum(min(end, HOLE[1]) - max(start, HOLE[0]) for start, end in SPANS
                     if start < HOLE[1] and end > HOLE[0])
    assert progress.done == span_bytes
    assert progress.read == span_bytes - hole_bytes  # neither holes nor the rest were read


def test_spans_in_a_window_that_does_not_start_at_zero(image):
    """The window's arrays and keep are indexed from its offset."""
    path, data = image
    offset = 4 * MiB
    spans = [(4 * MiB + 8 * KiB, 6 * MiB), (8 * MiB, 8 * MiB + 4 * KiB)]
    with file_device(path) as device:
        rc, _, hashes, mask, kept = sign_spans(device, spans, offset=offset,
                                               size=9 * MiB)
    assert rc == 0
    check_window(data[:9 * MiB], spans, hashes, mask, kept, holes=[], offset=offset)


def test_one_span_without_keep_is_pydr_signer_sign(image):
    path, data = image
    n = (SIZE + BS - 1) // BS
    with file_device(path) as device:
        rc, _, hashes, mask, _ = sign_spans(device, [(0, SIZE)], keep=False)
        with B.OutputBuffers(bytearray(16 * n), bytearray(n), 2) as out, \
                B.Signer(BS, XXH3_128) as signer:
            h, z = out.at(0)
            signer.sign(device, 0, SIZE, h, z, n, None)
            whole = (bytes(ffi.buffer(h, 16 * n)), bytes(ffi.buffer(z, n)))
    assert rc == 0 and (bytes(hashes), bytes(mask)) == whole
    assert pydr.Signature(BS, SIZE, "xxh3-128", hashes, mask) == pydr.signature(path,
                                                                                block_size=BS)


@pytest.mark.parametrize("spans, bad", [
    ([(4096, 8192), (0, 4096)], 0),                     # not sorted
    ([(0, 8192), (4096, 12288)], 4096),                 # overlapping
    ([(0, 4096), (6000, 8192)], 6000),                  # not block aligned
    ([(0, 4096), (8192, 8192 + 100)], 8192),            # a short block inside the window
    ([(SIZE // BS * BS, SIZE + 4096)], SIZE // BS * BS),  # past the window
], ids=["unsorted", "overlap", "unaligned", "short-inside", "outside"])
def test_bad_spans_are_refused_at_the_span_before_anything_is_read(image, spans, bad):
    path, _ = image
    with file_device(path) as device:
        progress = B.Progress()
        rc, error, hashes, mask, kept = sign_spans(device, spans, progress=progress)
    assert rc == -errno.EINVAL == error.code
    assert error.has_offset == 1 and error.offset == bad
    assert progress.read == 0 and set(kept) == {KEEP_SENTINEL} and set(mask) == {MASK_SENTINEL}


def test_a_keep_shorter_than_a_span_is_refused(image):
    path, _ = image
    with file_device(path) as device, B.Signer(BS, XXH3_128) as signer:
        n = 4
        with pytest.raises(OSError) as info:
            signer.sign_spans(device, 0, n, array("Q", [0, 4 * BS]), bytearray(16 * n),
                              bytearray(n), bytearray(3 * BS), None, path)
    assert info.value.errno == errno.EINVAL and info.value.filename == path
    assert "at offset 0" in info.value.strerror


def test_a_read_error_in_a_span_names_its_block_and_other_spans_never_touch_it(faulty_image):
    """The byte at 5 MiB + 12345 fails to read: a span over it fails at its
    block (read straight into keep, and through mmap without keep); spans
    around it are read, and equal the file."""
    bad = 5 * MiB + 12345
    path, data = faulty_image(bad, bad + 1)
    size = len(data)
    with file_device(path) as device:
        for keep in (True, False):
            rc, error, _, _, kept = sign_spans(device, [(1 * MiB, 2 * MiB),
                                                        (4 * MiB, 6 * MiB)],
                                               keep=keep, size=size)
            assert rc == -errno.EIO == error.code
            assert error.has_offset and error.offset == bad // BS * BS
            if keep:  # the first span was read whole before
                assert kept[1 * MiB:2 * MiB] == data[1 * MiB:2 * MiB]
        around = [(0, 5 * MiB), (5 * MiB + 16 * KiB, size)]
        rc, _, hashes, mask, kept = sign_spans(device, around, size=size)
        assert rc == 0
        check_window(data, around, hashes, mask, kept, holes=[])
        # and through the bindings: an OSError naming the file and the block
        with B.Signer(BS, XXH3_128) as signer:
            n = size // BS
            with pytest.raises(OSError) as info:
                signer.sign_spans(device, 0, n, array("Q", [4 * MiB, 2 * MiB]),
                                  bytearray(16 * n), bytearray(n), bytearray(size), None)
    assert info.value.errno == errno.EIO and info.value.filename == path
    assert f"at offset {bad // BS * BS}" in info.value.strerror


def test_a_cancelled_sign_reads_nothing_and_says_where(image):
    path, _ = image
    with file_device(path) as device:
        progress = B.Progress()
        progress.request_cancel()
        rc, error, _, mask, kept = sign_spans(device, SPANS[1:], progress=progress)
    assert rc == lib.PYDR_E_CANCELLED == error.code
    assert error.offset == SPANS[1][0]
    assert progress.read == 0 and set(kept) == {KEEP_SENTINEL}


# -- NBD -------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [True, False], ids=["keep", "no-keep"])
def test_spans_of_an_export_are_read_into_keep_holes_untouched(image, nbd_server, keep):
    """Through qemu-nbd: the same hashes as the file, keep equals it, the
    hole (block status) is not read and stays untouched in keep."""
    path, data = image
    uri = nbd_server(path)
    with B.Device.open_nbd(uri) as export:
        progress = B.Progress()
        rc, error, hashes, mask, kept = sign_spans(export, SPANS, keep=keep, progress=progress)
    assert rc == 0, ffi.string(error.detail)
    check_window(data, SPANS, hashes, mask, kept, holes=[HOLE])
    span_bytes = sum(end - start for start, end in SPANS)
    assert progress.done == span_bytes
    assert progress.read == span_bytes - (HOLE[1] - HOLE[0])


def test_many_small_spans_of_an_export_are_read_once_each(image, nbd_server):
    """256 scattered 4 KiB spans (too few bytes to ask block status: read,
    the hole included): all hashed and kept, each read once."""
    path, data = image
    uri = nbd_server(path)
    spans = [(b * 12 * KiB, b * 12 * KiB + 4 * KiB) for b in range(256)]
    with B.Device.open_nbd(uri) as export:
        progress = B.Progress()
        rc, _, hashes, mask, kept = sign_spans(export, spans, progress=progress)
    assert rc == 0
    # not asked about: the hole is read (as zeros) into keep
    check_window(data, spans, hashes, mask, kept, holes=[])
    assert progress.read == progress.done == 256 * 4 * KiB


def test_a_read_error_in_an_export_stops_at_the_request_holding_it(faulty_image, nbd_server):
    """qemu-nbd serves a file whose byte at 5 MiB + 12345 fails, and drops
    the connection when it does: the sign fails at the start of a request
    not read, the one holding the bad byte (4 MiB) or one before it still
    out (1 MiB: which requests the server answered first is its own affair),
    never past it; spans that do not touch it are read, and equal the file."""
    bad = 5 * MiB + 12345
    path, data = faulty_image(bad, bad + 1)
    size = len(data)
    around = [(0, 4 * MiB), (6 * MiB, size)]
    with B.Device.open_nbd(nbd_server(path)) as export:
        rc, _, hashes, mask, kept = sign_spans(export, around, size=size)
        assert rc == 0
        check_window(data, around, hashes, mask, kept, holes=[])
    with B.Device.open_nbd(nbd_server(path)) as export:
        rc, error, _, _, kept = sign_spans(export, [(1 * MiB, 2 * MiB), (4 * MiB, 8 * MiB)],
                                           size=size)
    assert rc in (-errno.EIO, -errno.ENOTCONN) and error.code == rc
    assert error.has_offset and error.offset in (1 * MiB, 4 * MiB)


def test_a_cancelled_export_sign_reads_nothing(image, nbd_server):
    path, _ = image
    with B.Device.open_nbd(nbd_server(path)) as export:
        progress = B.Progress()
        progress.request_cancel()
        rc, error, _, _, kept = sign_spans(export, SPANS, progress=progress)
    assert rc == lib.PYDR_E_CANCELLED and error.offset == SPANS[0][0]
    assert progress.read == 0 and set(kept) == {KEEP_SENTINEL}


# -- devices.py: sign(keep=, spans=), data_extents --------------------------------------

def device_sign(device, spans, keep, threads=2, cancel=None):
    n = (SIZE + BS - 1) // BS
    hashes = bytearray([HASH_SENTINEL]) * (16 * n)
    mask = bytearray([MASK_SENTINEL]) * n
    progress = B.Progress()
    device.sign(0, SIZE, BS, XXH3_128, hashes, mask, threads=threads,
                progress_record=progress, throttle=Throttle(None, "sign", device.name, SIZE),
                cancel=cancel, keep=keep, spans=spans)
    return hashes, mask, progress


@pytest.mark.parametrize("kind", ["file", "nbd"])
def test_device_sign_with_spans_and_keep(image, nbd_server, kind, monkeypatch):
    path, data = image
    if kind == "nbd":  # windows of 4 MiB: spans cut across them, several connections
        monkeypatch.setattr(D, "SIGN_WINDOW", 4 * MiB)
    device = D.FileDevice(path) if kind == "file" else D.NbdDevice(nbd_server(path))
    with device:
        kept = bytearray([KEEP_SENTINEL]) * SIZE
        hashes, mask, progress = device_sign(device, SPANS, kept)
        check_window(data, SPANS, hashes, mask, kept, holes=[HOLE] if kind == "file" else [])
        # keep without spans: the whole range, each byte read once (a 4 MiB
        # window is too short to ask the server for block status: read)
        kept = bytearray([KEEP_SENTINEL]) * SIZE
        hashes, mask, progress = device_sign(device, None, kept)
        holes = [HOLE] if kind == "file" else []
        check_window(data, [(0, SIZE)], hashes, mask, kept, holes=holes)
        assert progress.read == SIZE - sum(end - start for start, end in holes)
        assert pydr.Signature(BS, SIZE, "xxh3-128", hashes, mask) == \
            pydr.signature(path, block_size=BS)


def test_device_sign_refuses_bad_spans_and_a_short_keep(image):
    path, _ = image
    with D.FileDevice(path) as device:
        with pytest.raises(ValueError, match=f"{path}: span \\[4096, 6000\\) refused at "
                                             "offset 4096"):
            device_sign(device, [(4096, 6000)], None)
        with pytest.raises(ValueError, match="keep must be a writable buffer of at least"):
            device_sign(device, SPANS, bytearray(SIZE - 1))
        with pytest.raises(ValueError, match="read-only"):
            device_sign(device, SPANS, bytes(SIZE))


def test_device_sign_with_a_set_cancel_is_cancelled(image):
    import threading

    path, _ = image
    cancel = threading.Event()
    cancel.set()
    with D.FileDevice(path) as device:
        with pytest.raises(pydr.Cancelled):
            device_sign(device, SPANS, bytearray(SIZE), cancel=cancel)


def test_data_extents_of_a_file_and_its_export(image, nbd_server):
    """The hole is not data; the written zeros are (they are allocated)."""
    path, _ = image
    with D.FileDevice(path) as device:
        assert device.data_extents(0, SIZE) == [(0, HOLE[0]), (HOLE[1], SIZE)]
        assert device.data_extents(HOLE[0], 4096) == []
        assert device.data_extents(HOLE[0] - 4096, 8192) == [(HOLE[0] - 4096, HOLE[0])]
    with D.NbdDevice(nbd_server(path)) as export:
        assert export.data_extents(0, SIZE) == [(0, HOLE[0]), (HOLE[1], SIZE)]
    assert D.Device().data_extents(10, 20) == [(10, 30)]  # a device that cannot tell


# -- the memory device -------------------------------------------------------------------

def encode_all(device, extents, zero, block_size=BS):
    """The records of the extents and the payload block hashes."""
    n = len(zero)
    out, payload = bytearray(8 * MiB), array("Q", bytes(8 * 2 * (SIZE // BS + 1)))
    used, done, hused = device.encode(array("Q", extents), bytearray(zero), bytearray(16 * n),
                                      7, out, block_size, payload)
    assert done == n
    return bytes(out[:used]), bytes(payload)[:8 * hused]


def test_records_encoded_from_the_kept_window_are_those_from_the_disk(image):
    """Sign a window keeping it, then encode the same extents from the file
    and from a MemoryDevice over keep: byte-identical records and payload
    hashes; the file counts what encode read, the memory reads no disk."""
    path, data = image
    offset, end = 4 * MiB, SIZE
    extents = [4 * MiB, 8 * KiB, 5 * MiB, 64 * KiB, 6 * MiB + 4 * KiB, 1 * MiB,
               12 * MiB, SIZE - 12 * MiB]
    zero = [0, 1, 0, 0]
    with D.FileDevice(path) as device:
        kept = bytearray(end - offset)
        n = (end - offset + BS - 1) // BS
        device.sign(offset, end - offset, BS, XXH3_128, bytearray(16 * n), bytearray(n),
                    threads=2, progress_record=B.Progress(),
                    throttle=Throttle(None, "sign", path, end - offset), keep=kept)
        from_disk = encode_all(device, extents, zero)
        assert device.encoded_bytes == 8 * KiB + 1 * MiB + (SIZE - 12 * MiB)
        encode_all(device, extents, zero)
        assert device.encoded_bytes == 2 * (8 * KiB + 1 * MiB + (SIZE - 12 * MiB))
    with D.MemoryDevice(kept, offset, name=path) as memory:
        assert memory.size == end and memory.name == path
        from_memory = encode_all(memory, extents, zero)
        assert memory.encoded_bytes == 0
        assert memory.pread(100, 6 * MiB) == data[6 * MiB:6 * MiB + 100]
    assert from_memory == from_disk
    # and they are real records: the DATA payloads are the file's bytes
    records = from_memory[0]
    assert data[4 * MiB:4 * MiB + 8 * KiB] in records and data[12 * MiB:SIZE] in records


@pytest.mark.parametrize("at, length, where", [
    (4 * MiB - 4096, 4096, 4 * MiB - 4096),   # before the memory
    (8 * MiB - 4096, 8192, 8 * MiB),          # across its end: the first byte outside
    (9 * MiB, 4096, 9 * MiB),                 # after it
])
def test_a_read_outside_the_memory_fails_with_einval_at_the_offset(at, length, where):
    memory = bytearray(os.urandom(4 * MiB))
    with B.Device.open_memory(memory, 4 * MiB, name="/dev/source") as device:
        error, buf = B.new_error(), bytearray(length)
        rc = lib.pydr_device_pread(device._ptr, ffi.from_buffer(buf), length, at, error)
        assert rc == -errno.EINVAL == error.code and error.has_offset and error.offset == where
        assert set(buf) <= {0}  # nothing made up
        with pytest.raises(OSError) as info:
            device.encode(array("Q", [at, length]), bytearray(1), bytearray(16),
                          0, bytearray(1 * MiB))
        assert info.value.errno == errno.EINVAL and info.value.filename == "/dev/source"
        assert f"at offset {where}" in info.value.strerror
        assert device.pread(4096, 4 * MiB + 4096) == bytes(memory[4096:8192])


def test_a_memory_device_is_read_only_and_says_what_it_is():
    memory = bytearray(8192)
    with B.Device.open_memory(memory, 1 * MiB, name="src") as device:
        assert device.size == device.size_now() == 1 * MiB + 8192
        assert device.can("read-only") and not device.can("zero") and not device.can("flush")
        with pytest.raises(OSError) as info:
            device.pwrite(b"x" * 4096, 1 * MiB)
        assert info.value.errno == errno.EROFS and f"at offset {1 * MiB}" in str(info.value)
        device.flush()  # nothing was written: nothing to do
        with pytest.raises(OSError) as info:
            device.extents(1 * MiB, 8192)
        assert info.value.errno == errno.EOPNOTSUPP
    with pytest.raises(ValueError, match="offset -1"):
        B.Device.open_memory(memory, -1, name="src")
    with pytest.raises(ValueError, match="reaches past 2\\*\\*63"):
        B.Device.open_memory(memory, (1 << 63) - 4096, name="src")
    out = ffi.new("pydr_device **")
    assert lib.pydr_device_open_memory(out, ffi.NULL, 1, 0) == -errno.EINVAL
    assert lib.pydr_device_open_memory(ffi.NULL, ffi.NULL, 0, 0) == -errno.EINVAL


def test_a_memory_device_signs_as_the_bytes_it_holds():
    """sign_spans of a memory device hashes its memory (the oracle's
    hashes); a span outside it fails with EINVAL at the first offset
    outside, never reads zeros."""
    data = os.urandom(64 * KiB)
    with B.Device.open_memory(data, 1 * MiB, name="src") as device:
        rc, _, hashes, mask, kept = sign_spans(device, [(1 * MiB, 1 * MiB + 64 * KiB)],
                                               offset=1 * MiB, size=1 * MiB + 64 * KiB)
        assert rc == 0 and kept == data
        assert [(int.from_bytes(hashes[i:i + 8], "little"),
                 int.from_bytes(hashes[i + 8:i + 16], "little"))
                for i in range(0, len(hashes), 16)] == oracle(data, BS, "xxh3-128")
        rc, error, _, _, _ = sign_spans(device, [(1 * MiB, 1 * MiB + 128 * KiB)],
                                        offset=1 * MiB, size=1 * MiB + 128 * KiB)
        assert rc == -errno.EINVAL and error.offset == 1 * MiB + 64 * KiB


def test_span_errors_name_the_path_in_messages():
    """A message from the bindings names the device and the offset."""
    with pytest.raises(OSError) as info:
        with B.Device.open_memory(bytearray(4096), 0, name="/the/source") as device:
            device.pread(4096, 4096)
    assert info.value.filename == "/the/source"
    assert re.search(r"at offset 4096", info.value.strerror)


# -- an NBD server that answers a read error and stays -----------------------------------

def test_a_read_error_from_a_server_that_stays_names_the_failing_block(tmp_path):
    """The server answers EIO to the 2 MiB request holding the bad byte and
    keeps the connection: the request is read again block by block, and the
    error names the block that fails, not the request's start. The spans
    before were read into keep."""
    data = os.urandom(8 * MiB)
    bad = 5 * MiB + 12345
    server = FailingNbdServer(tmp_path / "fail.sock", data, bad)
    with B.Device.open_nbd(server.uri) as export:
        rc, error, hashes, mask, kept = sign_spans(export, [(1 * MiB, 2 * MiB),
                                                            (4 * MiB, 8 * MiB)], size=8 * MiB)
    assert rc == -errno.EIO == error.code
    assert error.has_offset and error.offset == bad // BS * BS
    assert kept[1 * MiB:2 * MiB] == data[1 * MiB:2 * MiB]
    # reads: the spans as runs of 2 MiB at most, then the failed one block by block
    assert (4 * MiB, 2 * MiB) in server.reads and (bad // BS * BS, BS) in server.reads
    assert not any(start < 1 * MiB or 2 * MiB <= start < 4 * MiB for start, _ in server.reads)


def test_a_cancel_while_a_read_is_held_stops_at_the_next_buffer(faulty_image, tmp_path):
    """A read at 6 MiB is held by the file system (faultyfs hold mode);
    the cancel flag is set while it waits, then the read is let go: the
    sign stops with PYDR_E_CANCELLED at the next buffer. Everything before
    the offset it names is kept, nothing after it is read."""
    import threading

    held = 6 * MiB + 1
    path, data = faulty_image(held, held + 1, mode="hold")
    backing = tmp_path / "backing0.img"
    spans = [(1 * MiB, 2 * MiB), (4 * MiB, 10 * MiB)]
    progress, result = B.Progress(), {}
    with file_device(path) as device:
        signer = threading.Thread(target=lambda: result.update(
            zip("rehmk", sign_spans(device, spans, size=len(data), progress=progress))))
        signer.start()
        while not os.path.exists(f"{backing}.held"):  # a state, not a time
            assert signer.is_alive(), result
            subprocess.run(["sleep", "0.01"])
        progress.request_cancel()
        open(f"{backing}.release", "w").close()
        signer.join()
    rc, error, kept = result["r"], result["e"], result["k"]
    assert rc == lib.PYDR_E_CANCELLED == error.code
    stop = error.offset  # the held buffer, or the one after it, was the last one read
    assert stop in (6 * MiB, 7 * MiB)
    assert kept[1 * MiB:2 * MiB] == data[1 * MiB:2 * MiB]
    assert kept[4 * MiB:stop] == data[4 * MiB:stop]
    assert set(kept[stop:]) == {KEEP_SENTINEL} and set(kept[2 * MiB:4 * MiB]) == {KEEP_SENTINEL}
    assert progress.read == 1 * MiB + (stop - 4 * MiB)

"""Thin bindings over pydr._core: check arguments, convert types, nothing else.

The classes users see (pydr.signature, pydr.Signature) are built on these.
Buffers are anything with the buffer protocol (bytearray, memoryview, numpy);
this module does not import numpy, so the CLI starts fast.
"""

import contextlib
import errno
import os
import re

try:
    from .._core import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on how pydr is run
    import os as _os

    raise ImportError(
        f"pydr's compiled core (pydr._core) is missing from {_os.path.dirname(_os.path.dirname(__file__))}: "
        "this looks like a source tree. Build and install pydr first "
        "(./scripts/bootstrap, or pip install .) and run from outside the source directory."
    ) from exc
from .. import errors as E
from .._version import __version__

# pydr's C codes (csrc/pydr.h) -> exception classes.
_CODE_CLASSES = {
    -1001: E.Cancelled,
    -1002: E.FileChanged,
    -1003: E.UnsupportedFile,
    -1004: E.CorruptDelta,
    -1005: E.BaseMismatch,
    -1006: E.AlreadyApplied,
    -1008: E.UnsupportedFile,   # built without libnbd
    -1009: E.TrackingLost,      # no such dirty bitmap on the NBD server
    -1010: E.FormatError,       # an unknown hash algorithm code
}


def new_error():
    """A zeroed ``pydr_error``: the C core's one error channel, which a
    failing call fills with where it failed (and libnbd's words)."""
    return ffi.new("pydr_error *")


def raise_for_code(code, *, path=None, offset=None, error=None, detail=None):
    """Raise the exception for a C return code; return None when it is 0.

    Negative errnos become the matching ``OSError`` subclass (the builtin
    picks it from the errno) with ``filename=path``; pydr's own codes become
    their :class:`pydr.errors.PydrError` class. ``error`` is the
    ``pydr_error`` the failing call filled: its offset says where, its
    detail (libnbd's message) is added to the message; ``offset`` and
    ``detail`` are for failures found on this side. This is the only place
    that turns C codes into exceptions, and the only reader of pydr_error.
    """
    if code == 0:
        return
    if error is not None:
        if error.has_offset:
            offset = int(error.offset)
        said = ffi.string(error.detail).decode(errors="replace")
        if said:
            detail = f"{detail}: {said}" if detail else said
    message = ffi.string(lib.pydr_strerror(code)).decode()
    if -1000 < code < 0:
        if offset is not None:
            message = f"{message} at offset {offset}"
        if detail and detail not in message:
            message = f"{message}: {detail}"
        if path is not None:
            raise OSError(-code, message, os.fspath(path))
        raise OSError(-code, message)
    if detail and detail not in message:
        message = f"{message}: {detail}"
    cls = _CODE_CLASSES.get(code, E.PydrError)
    raise cls(message, path=path, offset=offset)


def version_number(text):
    """MAJOR * 10000 + MINOR * 100 + PATCH of a "MAJOR.MINOR.PATCH[...]"
    version, as pydr_version_number() gives it."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"not a MAJOR.MINOR.PATCH version: {text!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major * 10000 + minor * 100 + patch


def core_version():
    """The version of the compiled core in use, from the library itself
    (pydr_version_string, as zstd's ZSTD_versionString)."""
    return ffi.string(lib.pydr_version_string()).decode()


def check_core_version(number, text, expected):
    """ImportError unless the core's version number is that of the Python
    package (`expected`): a core left over from another build would
    otherwise run with code that expects another one."""
    if number != version_number(expected):
        raise ImportError(
            f"pydr's compiled core (pydr._core) is version {text} but its Python code is "
            f"version {expected}: they come from different builds. Reinstall pydr "
            "(pip install . from one source tree) so that both are built together."
        )


check_core_version(lib.pydr_version_number(), core_version(), __version__)

ALGORITHMS = {"xxh3-64": lib.PYDR_XXH3_64, "xxh3-128": lib.PYDR_XXH3_128}
ALGORITHM_NAMES = {code: name for name, code in ALGORITHMS.items()}
BLOCK_MIN = lib.PYDR_BLOCK_MIN
BLOCK_MAX = lib.PYDR_BLOCK_MAX
C_VERSION = (lib.PYDR_VERSION_MAJOR, lib.PYDR_VERSION_MINOR, lib.PYDR_VERSION_PATCH)


def algorithm_code(name):
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(
            f"unknown algorithm {name!r}: choose one of {', '.join(ALGORITHMS)}"
        ) from None


def hash_words(code):
    """uint64 words per block of a hash algorithm code (1 or 2); FormatError
    for a code the core does not know."""
    words = lib.pydr_hash_words(code)
    if words < 0:
        raise_for_code(words, detail=f"code {code!r} (pydr knows " + ", ".join(
            f"{c} = {n}" for n, c in ALGORITHMS.items()) + ")")
    return words


def check_block_size(block_size):
    if (
        not isinstance(block_size, int)
        or block_size < BLOCK_MIN
        or block_size > BLOCK_MAX
        or block_size & (block_size - 1)
    ):
        raise ValueError(
            f"block size {block_size!r} must be a power of two between "
            f"{BLOCK_MIN} and {BLOCK_MAX} bytes"
        )
    return block_size


def kernel_name():
    return ffi.string(lib.pydr_kernel_name()).decode()


def fd_size(fd, path=None):
    """(size in bytes, is_block_device) of an open file descriptor."""
    size = ffi.new("uint64_t *")
    is_blk = ffi.new("int *")
    raise_for_code(lib.pydr_fd_size(fd, size, is_blk), path=path)
    return int(size[0]), bool(is_blk[0])


def hash_bytes(code, data):
    """Tuple of uint64 words: (h,) for xxh3-64, (low, high) for xxh3-128."""
    words = hash_words(code)
    out = ffi.new("uint64_t[]", 2)
    buf = ffi.from_buffer(data)
    raise_for_code(lib.pydr_hash(code, buf, len(buf), out))
    return tuple(out[i] for i in range(words))


class Progress:
    """The C progress record: shared by all threads of one operation."""

    def __init__(self):
        self._ptr = ffi.new("pydr_progress *")

    @property
    def done(self):
        return lib.pydr_progress_done(self._ptr)

    @property
    def read(self):
        return lib.pydr_progress_read(self._ptr)

    def request_cancel(self):
        lib.pydr_progress_request_cancel(self._ptr)


class Signer:
    """One C signer (one thread's I/O buffer); use from a single thread."""

    def __init__(self, block_size, code, io_size=0, use_mmap=True):
        out = ffi.new("pydr_signer **")
        flags = 0 if use_mmap else lib.PYDR_SIGN_NO_MMAP
        raise_for_code(lib.pydr_signer_create(out, block_size, code, io_size, flags))
        self._ptr = ffi.gc(out[0], lib.pydr_signer_free)
        self._error = new_error()
        self._file = None  # the Device of the last file descriptor signed
        self.block_size = block_size
        self.words = hash_words(code)

    def sign(self, device, offset, length, hashes, zero_mask, nblocks, progress, path=None):
        """Hash [offset, offset+length) of `device` (a :class:`Device`, or a
        file descriptor) into ``nblocks`` blocks at the cffi pointers
        ``hashes`` (uint64_t *) and ``zero_mask`` (uint8_t *), as given by
        :class:`OutputBuffers`."""
        if not isinstance(device, Device):
            if self._file is None or self._file.fd != device:
                if self._file is not None:
                    self._file.close()
                self._file = Device.open_fd(device, name=path)
            device = self._file
        rc = lib.pydr_signer_sign(
            self._ptr, device._ptr, offset, length, hashes, zero_mask, nblocks,
            progress._ptr if progress is not None else ffi.NULL, self._error,
        )
        if rc:
            raise_for_code(rc, path=path if path is not None else device.name,
                           error=self._error)

    def sign_spans(self, device, offset, nblocks, spans, hashes, zero_mask, keep, progress,
                   path=None):
        """Hash the spans of the window [offset, offset + nblocks blocks) of
        `device`, reading each byte once (pydr_signer_sign_spans).

        device: a :class:`Device` (or a file descriptor, as for sign()).
        offset: the window's start, block aligned. nblocks: its blocks.
        spans: (start, length) pairs, absolute, block aligned, sorted and
        disjoint inside the window (a length may end on a short block only
        in the window's last block): a flat uint64 buffer (a numpy uint64
        array of pairs) or a sequence of (start, length) tuples.
        hashes, zero_mask: the window's output (nblocks entries from
        `offset`): cffi pointers (as OutputBuffers.at gives) or writable
        buffers; blocks outside every span are left untouched.
        keep: None, or a writable buffer that gets every byte read at
        (device offset - offset); it must cover every span. Blocks not read
        (holes) stay untouched there and get zero_mask 1.
        progress: a :class:`Progress` or None. path: the name for errors.

        Raises ValueError for spans or a keep the core refuses (the message
        names the offset), OSError with the path and the offset of the first
        failing block for a failed read, Cancelled when progress was
        cancelled, FileChanged when a file ended first."""
        if not isinstance(device, Device):
            if self._file is None or self._file.fd != device:
                if self._file is not None:
                    self._file.close()
                self._file = Device.open_fd(device, name=path)
            device = self._file
        name = path if path is not None else device.name
        with contextlib.ExitStack() as views:
            span_view = _spans_view(spans, views)
            nspans = len(span_view) // 2
            h = hashes if isinstance(hashes, ffi.CData) else views.enter_context(
                ffi.from_buffer("uint64_t[]", hashes, require_writable=True))
            z = zero_mask if isinstance(zero_mask, ffi.CData) else views.enter_context(
                ffi.from_buffer("uint8_t[]", zero_mask, require_writable=True))
            if keep is None:
                k, klen = ffi.NULL, 0
            else:
                k = views.enter_context(ffi.from_buffer("uint8_t[]", keep,
                                                        require_writable=True))
                klen = len(k)
            rc = lib.pydr_signer_sign_spans(
                self._ptr, device._ptr, offset, nblocks, span_view, nspans, h, z, k, klen,
                progress._ptr if progress is not None else ffi.NULL, self._error)
        if rc == -errno.EINVAL and self._error.has_offset:
            raise ValueError(f"{name}: spans of the window at {offset} ({nblocks} blocks of "
                             f"{self.block_size}) refused at offset {int(self._error.offset)}: "
                             "spans must be block aligned, sorted, disjoint, inside the window "
                             "and the keep buffer")
        if rc:
            raise_for_code(rc, path=name, error=self._error)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._ptr is not None:
            ffi.release(self._ptr)
            self._ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _spans_view(spans, views):
    """A uint64_t[] cdata of (start, length) pairs: `spans` as a flat uint64
    buffer (kept open in the ExitStack `views`), or made from a sequence of
    pairs."""
    try:
        view = views.enter_context(ffi.from_buffer("uint64_t[]", spans))
    except TypeError:  # not a buffer: a sequence of (start, length) pairs
        return ffi.new("uint64_t[]", [int(v) for pair in spans for v in pair])
    if len(view) % 2:
        raise ValueError(f"spans must be (start, length) pairs: {len(view)} numbers given")
    return view


def mask_pack(mask):
    """(packed bytes, number of set blocks) of a one-byte-per-block mask."""
    src = ffi.from_buffer("uint8_t[]", mask)
    packed = bytearray((len(src) + 7) // 8)
    count = lib.pydr_mask_pack(src, len(src), ffi.from_buffer("uint8_t[]", packed))
    return packed, count


def mask_unpack(packed, nblocks):
    """(one-byte-per-block bytearray, number of set blocks); None if the
    unused bits of the last byte are not zero."""
    src = ffi.from_buffer("uint8_t[]", packed)
    if len(src) != (nblocks + 7) // 8 or not lib.pydr_mask_tail_clear(src, nblocks):
        return None, 0
    mask = bytearray(nblocks)
    count = lib.pydr_mask_unpack(src, nblocks, ffi.from_buffer("uint8_t[]", mask))
    return mask, count


class OutputBuffers:
    """cffi views of a signature's output buffers, released on close().

    ``at(block)`` gives the (hashes, zero_mask) pointers of a block, so that
    threads can fill disjoint slices without creating views per chunk.
    """

    def __init__(self, hashes, zero_mask, words):
        self._h = ffi.from_buffer("uint64_t[]", hashes, require_writable=True)
        self._z = ffi.from_buffer("uint8_t[]", zero_mask, require_writable=True)
        if len(self._h) != len(self._z) * words:
            self.close()
            raise ValueError("hash and mask buffers do not match")
        self.words = words

    def at(self, block):
        return self._h + block * self.words, self._z + block

    def close(self):
        for view in (self._h, self._z):
            ffi.release(view)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


RECORD_HEADER = lib.PYDR_RECORD_HEADER
RECORD_MAX = lib.PYDR_RECORD_MAX
DATA, ZERO, END, COMMIT = (lib.PYDR_RECORD_DATA, lib.PYDR_RECORD_ZERO,
                           lib.PYDR_RECORD_END, lib.PYDR_RECORD_COMMIT)


def record_build(type, offset=0, length=0, base_hash=(0, 0), payload_hash=0, seq=0):
    r = ffi.new("pydr_record *")
    r.type, r.offset, r.length, r.payload_hash, r.seq = type, offset, length, payload_hash, seq
    r.base_hash[0], r.base_hash[1] = base_hash
    out = bytearray(RECORD_HEADER)
    lib.pydr_record_build(ffi.from_buffer("uint8_t[]", out), r)
    return out


def record_parse(header):
    """dict of a 64-byte record header, or None when it fails its checks."""
    r = ffi.new("pydr_record *")
    if lib.pydr_record_parse(ffi.from_buffer("uint8_t[]", header), r) != 0:
        return None
    return {"type": r.type, "offset": r.offset, "length": r.length,
            "base_hash": (r.base_hash[0], r.base_hash[1]),
            "payload_hash": r.payload_hash, "seq": r.seq}


def records_scan(buf):
    """(complete bytes, records, journal bound, saw END) of whole records at
    the start of buf; raises CorruptDelta with the position of a bad header."""
    scan, error = ffi.new("pydr_scan *"), new_error()
    with ffi.from_buffer("uint8_t[]", buf) as view:
        rc = lib.pydr_records_scan(view, len(view), scan, error)
    if rc:
        raise_for_code(rc, error=error)
    return scan.complete, scan.records, scan.journal_bound, bool(scan.end)


def hashes_digest_ranges(hashes, nblocks, block_size, extents):
    """Digests (2 words per extent) of the base block hashes under extents."""
    n = len(extents) // 2
    out = bytearray(16 * n)
    with ffi.from_buffer("uint64_t[]", hashes) as h, ffi.from_buffer("uint64_t[]", extents) as e:
        lib.pydr_hashes_digest_ranges(h, nblocks, block_size, e, n,
                                      ffi.from_buffer("uint64_t[]", out, require_writable=True))
    return out


def blocks_digest(data, block_size):
    out = ffi.new("uint64_t[2]")
    with ffi.from_buffer("uint8_t[]", data) as view:
        lib.pydr_blocks_digest(view, len(view), block_size, out)
    return int(out[0]), int(out[1])


class ApplyState:
    def __init__(self):
        self._ptr = ffi.new("pydr_apply_state *")

    def __getattr__(self, name):
        return getattr(self._ptr, name)


def journal_capacity(journal_bound, records, block_size):
    """Journal buffer bytes that apply_prepare may need for a scanned batch:
    per record its length plus a longer last base block, and a 64-byte
    header per block in the worst case (zero and data blocks alternating)."""
    return journal_bound + records * block_size + RECORD_HEADER * (
        journal_bound // block_size + 2 * records)


def start_writeback(fd):
    """Kick off write-back of dirty pages; errors are ignored (a hint)."""
    lib.pydr_start_writeback(fd)


class Digest:
    """Streaming XXH3-128 used for the checksums of pydr's file formats."""

    def __init__(self):
        out = ffi.new("pydr_digest **")
        raise_for_code(lib.pydr_digest_create(out))
        self._ptr = ffi.gc(out[0], lib.pydr_digest_free)

    def update(self, data):
        buf = ffi.from_buffer(data)
        raise_for_code(lib.pydr_digest_update(self._ptr, buf, len(buf)))
        return self

    def digest(self):
        """16 bytes: low64 then high64, each little-endian."""
        out = ffi.new("uint64_t[2]")
        lib.pydr_digest_final(self._ptr, out)
        return int(out[0]).to_bytes(8, "little") + int(out[1]).to_bytes(8, "little")


# -- devices (csrc/device.c, io.c, nbd.c) ---------------------------------------------

NBD_STATE_HOLE, NBD_STATE_ZERO, NBD_DIRTY = (lib.PYDR_NBD_STATE_HOLE, lib.PYDR_NBD_STATE_ZERO,
                                             lib.PYDR_NBD_DIRTY)
_CAN = {"flush": lib.PYDR_CAN_FLUSH, "zero": lib.PYDR_CAN_ZERO,
        "multi-conn": lib.PYDR_CAN_MULTI_CONN, "read-only": lib.PYDR_READ_ONLY}


def nbd_available():
    return bool(lib.pydr_nbd_available())


class Device:
    """One C device (pydr_device): a file or block device open in this
    process, one connection to an NBD export, or caller memory standing for
    a range of a disk (open_memory). Signing, encoding and
    applying records take it, whatever its kind. A file device may be used
    by several threads; an NBD one by one thread at a time."""

    def __init__(self, ptr, name, fd=None):
        self._ptr = ffi.gc(ptr, lib.pydr_device_free)
        self.name = name
        self.fd = fd
        self.size = None  # an NBD export's, from open_nbd
        self.bitmap = None
        self._signer = None  # (block_size, code, Signer) of the last sign()
        self._memory = None  # a memory device's buffer and its cffi view

    @classmethod
    def open_fd(cls, fd, *, name=None, is_block=False):
        """A device over the open descriptor `fd`, which stays the caller's
        to close (after this device). is_block: zero ranges with
        BLKZEROOUT rather than by punching holes."""
        out = ffi.new("pydr_device **")
        flags = lib.PYDR_DEVICE_BLOCK if is_block else 0
        raise_for_code(lib.pydr_device_open_fd(out, fd, flags), path=name)
        return cls(out[0], name, fd)

    @classmethod
    def open_nbd(cls, uri, *, name=None, bitmap=None, write=False, extra=False):
        """A connection to the NBD export at `uri`. extra: one more
        connection to a server we hold one to already; BlockingIOError
        (EAGAIN) if the server takes no more clients."""
        name = name or uri
        out, error = ffi.new("pydr_device **"), new_error()
        flags = (lib.PYDR_NBD_WRITE if write else 0) | (lib.PYDR_NBD_EXTRA if extra else 0)
        rc = lib.pydr_device_open_nbd(out, uri.encode(), bitmap.encode() if bitmap else ffi.NULL,
                                      flags, error)
        raise_for_code(rc, path=name, error=error)
        device = cls(out[0], name)
        device.bitmap = bitmap
        device.size = device.size_now()
        return device

    @classmethod
    def open_memory(cls, buffer, offset, *, name=None):
        """A read-only device over `buffer` (anything with the buffer
        protocol), which reads as those bytes lying at device offset
        `offset`: the window a sign_spans kept, so that records are encoded
        from what was hashed. The device keeps a reference to the buffer
        (the memory outlives it). A read outside [offset, offset + len)
        fails with EINVAL at the first offset outside (an OSError naming
        `name`); writes fail with EROFS. ValueError for a negative offset
        or a range past 2**63."""
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"memory device offset {offset!r} must be an int >= 0")
        view = ffi.from_buffer("uint8_t[]", buffer)
        out = ffi.new("pydr_device **")
        rc = lib.pydr_device_open_memory(out, view, len(view), offset)
        if rc == -errno.EINVAL:
            ffi.release(view)
            raise ValueError(f"{name}: a memory device of {len(view)} bytes at offset {offset} "
                             "reaches past 2**63")
        raise_for_code(rc, path=name)
        device = cls(out[0], name)
        device._memory = (buffer, view)  # the C device reads them: keep them alive
        device.size = offset + len(view)
        return device

    def size_now(self):
        size, error = ffi.new("uint64_t *"), new_error()
        raise_for_code(lib.pydr_device_size(self._ptr, size, error), path=self.name, error=error)
        return int(size[0])

    def can(self, what):
        """One of "flush", "zero", "multi-conn", "read-only"."""
        return bool(lib.pydr_device_can(self._ptr, _CAN[what]))

    def extents(self, offset, length, *, dirty=False):
        """[(offset, length, flags)] of base:allocation, or of the dirty
        bitmap with `dirty`, covering [offset, offset + length) (NBD)."""
        cap = 4096
        out = ffi.new("uint64_t[]", 3 * cap)
        count, reached, error = ffi.new("size_t *"), ffi.new("uint64_t *"), new_error()
        bitmap = self.bitmap.encode() if (dirty and self.bitmap) else ffi.NULL
        result, pos, end = [], offset, offset + length
        while pos < end:
            rc = lib.pydr_device_extents(self._ptr, 1 if dirty else 0, bitmap, pos, end - pos,
                                         out, cap, count, reached, error)
            raise_for_code(rc, path=self.name, error=error)
            result += [(int(out[3 * i]), int(out[3 * i + 1]), int(out[3 * i + 2]))
                       for i in range(count[0])]
            if reached[0] <= pos:  # the core refuses this already; never spin
                raise_for_code(-errno.EIO, path=self.name, offset=pos,
                               detail="the NBD server answered block status with nothing")
            pos = int(reached[0])
        return result

    def sign(self, offset, length, block_size, code, hashes, zero_mask, nblocks, progress):
        """pydr_signer_sign of this device into the cffi pointers hashes /
        zero_mask, with a signer kept for the next call."""
        self._signer_for(block_size, code).sign(self, offset, length, hashes, zero_mask,
                                                nblocks, progress, self.name)

    def sign_spans(self, offset, nblocks, block_size, code, spans, hashes, zero_mask, keep,
                   progress):
        """pydr_signer_sign_spans of this device (see Signer.sign_spans for
        the arguments), with a signer kept for the next call."""
        self._signer_for(block_size, code).sign_spans(self, offset, nblocks, spans, hashes,
                                                      zero_mask, keep, progress, self.name)

    def _signer_for(self, block_size, code):
        if self._signer is None or self._signer[:2] != (block_size, code):
            if self._signer is not None:
                self._signer[2].close()
            self._signer = (block_size, code, Signer(block_size, code))
        return self._signer[2]

    def pread(self, length, offset):
        buf, error = bytearray(length), new_error()
        rc = lib.pydr_device_pread(self._ptr, ffi.from_buffer(buf), length, offset, error)
        raise_for_code(rc, path=self.name, error=error)
        return bytes(buf)

    def pwrite(self, data, offset):
        error = new_error()
        with ffi.from_buffer("uint8_t[]", data) as view:
            rc = lib.pydr_device_pwrite(self._ptr, view, len(view), offset, error)
        raise_for_code(rc, path=self.name, error=error)

    def flush(self):
        error = new_error()
        raise_for_code(lib.pydr_device_flush(self._ptr, error), path=self.name, error=error)

    def encode(self, extents, zero, base_hashes, first_seq, out, block_size=0,
               payload_hashes=None):
        """Encode as many extents as fit into `out`; returns (used, done,
        hash words written to payload_hashes, a writable uint64 buffer, if
        given)."""
        used, done, hused = ffi.new("size_t *"), ffi.new("size_t *"), ffi.new("size_t *")
        error = new_error()
        n = len(zero)
        with ffi.from_buffer("uint64_t[]", extents) as e, ffi.from_buffer("uint8_t[]", zero) as z, \
                ffi.from_buffer("uint64_t[]", base_hashes) as b, \
                ffi.from_buffer("uint8_t[]", out, require_writable=True) as o:
            if payload_hashes is None:
                rc = lib.pydr_encode(self._ptr, e, z, b, n, first_seq, o, len(o), used, done, 0,
                                     ffi.NULL, 0, hused, error)
            else:
                with ffi.from_buffer("uint64_t[]", payload_hashes, require_writable=True) as ph:
                    rc = lib.pydr_encode(self._ptr, e, z, b, n, first_seq, o, len(o), used,
                                         done, block_size, ph, len(ph), hused, error)
        raise_for_code(rc, path=self.name, error=error)
        return used[0], done[0], hused[0]

    def apply_prepare(self, recs, block_size, old_size, new_size, state, scratch, journal):
        """Verify a batch and fill `journal` with undo records; returns its
        length. CorruptDelta's offset is the bad record's position in recs."""
        used, error = ffi.new("size_t *"), new_error()
        with ffi.from_buffer("uint8_t[]", recs) as r, \
                ffi.from_buffer("uint8_t[]", scratch, require_writable=True) as s, \
                ffi.from_buffer("uint8_t[]", journal, require_writable=True) as j:
            rc = lib.pydr_apply_prepare(self._ptr, r, len(r), block_size, old_size, new_size,
                                        state._ptr, s, len(s), j, len(j), used, error)
        raise_for_code(rc, path=self.name, error=error)
        return used[0]

    def apply_write(self, recs):
        error = new_error()
        with ffi.from_buffer("uint8_t[]", recs) as r:
            rc = lib.pydr_apply_write(self._ptr, r, len(r), error)
        raise_for_code(rc, path=self.name, error=error)

    def close(self):
        if self._signer is not None:
            self._signer[2].close()
            self._signer = None
        if self._ptr is not None:
            ffi.release(self._ptr)
            self._ptr = None
        if self._memory is not None:  # after the device: it reads the view
            ffi.release(self._memory[1])
            self._memory = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

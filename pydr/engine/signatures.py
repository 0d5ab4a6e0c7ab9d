"""Block signatures: per-block XXH3 hashes of a disk image or block device.

``signature(path)`` computes one with the C core on N threads;
:class:`Signature` holds it as numpy arrays, compares two with
:meth:`Signature.diff`, and saves/loads the file format of docs/FORMAT.md.
"""

from __future__ import annotations

import os
import struct
import sys
import time

from . import bindings as B
from .atomic import atomic_write
# CHUNK_BYTES and sign_range are re-exported (pydr.dr.scrub signs ranges of a replica)
from .devices import CHUNK_BYTES, blocks_for, sign_range, using_device  # noqa: F401
from .parallel import check_threads
from ..errors import FormatError, IncompatibleSignatures
from .progress import ProgressRecord, Record, Throttle

# typing costs ~4 ms at start-up: the checkers honour a TYPE_CHECKING of our own
TYPE_CHECKING = False
if TYPE_CHECKING:
    import threading
    from typing import Callable, Union

    import numpy as np
    import numpy.typing as npt

    from .devices import Device

    _Path = Union[str, "os.PathLike[str]"]

#: Default block size, chosen by measurement (README "Choosing the block
#: size"): signing at 64 KiB runs at the speed of reading; 4 KiB costs ~3%
#: more and a 16x larger hash array. Resync refines to 4 KiB inside changes.
DEFAULT_BLOCK_SIZE = 64 * 1024
DEFAULT_ALGORITHM = "xxh3-128"

MAGIC = b"PYDRSIG\x00"
TRAILER_MAGIC = b"PYDREND\x00"
VERSION = 1
# magic, version, algorithm, block_size, image_size, block_count,
# zero_blocks, flags, reserved -> then header checksum (xxh3-64 of the above)
_HEADER = struct.Struct("<8sHHIQQQQQ")
HEADER_SIZE = _HEADER.size + 8  # 64
MAX_STREAMED = 1 << 30  # bytes of a signature read from a peer's stream
_TRAILER = struct.Struct("<8sQ16s")  # magic, total file length, xxh3-128
TRAILER_SIZE = _TRAILER.size  # 32
_MAX_IMAGE = 1 << 62
_LITTLE = sys.byteorder == "little"


class SignStats(Record):
    """How a signature was computed (``Signature.stats``; not stored in the
    file). Read-only.

    Attributes:
        bytes_read: Bytes read from the disk.
        bytes_skipped: Bytes of holes, known to be zero without reading.
        seconds: Wall-clock time taken.
        threads: Hashing threads used.
        kernel: The hashing kernel the C core picked (``"avx2"``, ...).
    """

    _fields = ("bytes_read", "bytes_skipped", "seconds", "threads", "kernel")
    __slots__ = _fields
    bytes_read: int
    bytes_skipped: int
    seconds: float
    threads: int
    kernel: str


def _raw(buf):
    with memoryview(buf) as view:
        return view.cast("B").tobytes() if view.ndim != 1 or view.format != "B" else bytes(view)


def _nbytes(buf):
    with memoryview(buf) as view:
        return view.nbytes


class Signature:
    """Per-block hashes of an image: made by :func:`pydr.signature`, read by
    :meth:`load`, written by :meth:`save`, compared by :meth:`diff`.

    ``hashes`` is a numpy uint64 array: shape ``(n,)`` for xxh3-64,
    ``(n, 2)`` with columns ``[low64, high64]`` for xxh3-128, where
    ``n = ceil(size / block_size)``. Each value equals python-xxhash's digest
    (seed 0) of that block's bytes; the last block is hashed over its real,
    possibly shorter, length. ``zero_mask`` (bool, ``(n,)``) marks all-zero
    blocks, holes included.

    ``hashes`` and ``zero_mask`` may be given as numpy arrays or as raw
    native-endian buffers (bytearray); numpy is only imported when the arrays
    are asked for, so tools that only sign and save start fast.

    Args:
        block_size: Bytes per block (a power of two, 512 to 16 MiB).
        size: The image's size in bytes.
        algorithm: ``"xxh3-64"`` or ``"xxh3-128"``.
        hashes: The hashes, as above.
        zero_mask: The all-zero flags, as above.
        stats: How it was computed (:class:`SignStats`), or None.

    Raises:
        ValueError: The arrays do not fit ``size`` blocks of ``algorithm``,
            or an unknown algorithm or a bad block size.

    Example::

        sig = pydr.signature("disk.img")
        sig.save("disk.sig")
        changed = pydr.Signature.load("disk.sig").diff(pydr.signature("disk.img"))
    """

    __slots__ = ("block_size", "size", "algorithm", "stats", "_hash_buf", "_mask_buf",
                 "_hashes", "_zero_mask")

    block_size: int
    size: int
    algorithm: str
    stats: SignStats | None

    def __init__(self, block_size: int, size: int, algorithm: str,
                 hashes: npt.ArrayLike | bytearray, zero_mask: npt.ArrayLike | bytearray,
                 stats: SignStats | None = None) -> None:
        code = B.algorithm_code(algorithm)
        B.check_block_size(block_size)
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a non-negative integer, not {size!r}")
        n = blocks_for(size, block_size)
        words = B.hash_words(code)
        if hasattr(hashes, "__array__") and not isinstance(hashes, (bytes, bytearray)):
            import numpy as np

            hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
            zero_mask = np.ascontiguousarray(zero_mask, dtype=np.bool_)
            shape = (n,) if words == 1 else (n, 2)
            if hashes.shape != shape or zero_mask.shape != (n,):
                raise ValueError(
                    f"hashes {hashes.shape} / zero_mask {zero_mask.shape} do not fit "
                    f"{n} blocks of {algorithm}"
                )
            self._hashes, self._zero_mask = hashes, zero_mask
        else:
            if _nbytes(hashes) != n * words * 8 or _nbytes(zero_mask) != n:
                raise ValueError(f"hash/mask buffers do not fit {n} blocks of {algorithm}")
            self._hashes = self._zero_mask = None
        self._hash_buf, self._mask_buf = hashes, zero_mask
        self.block_size = block_size
        self.size = size
        self.algorithm = algorithm
        self.stats = stats

    @property
    def hashes(self) -> npt.NDArray[np.uint64]:
        """The hashes as a numpy uint64 array (see the class)."""
        if self._hashes is None:
            import numpy as np

            words = B.hash_words(B.ALGORITHMS[self.algorithm])
            arr = np.frombuffer(self._hash_buf, dtype=np.uint64)
            self._hashes = arr if words == 1 else arr.reshape(-1, 2)
        return self._hashes

    @property
    def zero_mask(self) -> npt.NDArray[np.bool_]:
        """True for each all-zero block, as a numpy bool array."""
        if self._zero_mask is None:
            import numpy as np

            self._zero_mask = np.frombuffer(self._mask_buf, dtype=np.bool_)
        return self._zero_mask

    @property
    def block_count(self) -> int:
        """The number of blocks, ``ceil(size / block_size)``."""
        return blocks_for(self.size, self.block_size)

    @property
    def zero_blocks(self) -> int:
        """The number of all-zero blocks."""
        return B.mask_pack(self._mask_buf)[1]

    def __repr__(self):
        return (
            f"<Signature {self.algorithm} size={self.size} "
            f"block_size={self.block_size} blocks={self.block_count}>"
        )

    def __eq__(self, other):
        if not isinstance(other, Signature):
            return NotImplemented
        return (
            self.block_size == other.block_size
            and self.size == other.size
            and self.algorithm == other.algorithm
            and _raw(self._hash_buf) == _raw(other._hash_buf)
            and B.mask_pack(self._mask_buf)[0] == B.mask_pack(other._mask_buf)[0]
        )

    __hash__ = None

    # -- comparison -------------------------------------------------------
    def changed_blocks(self, other: Signature) -> npt.NDArray[np.bool_]:
        """Bool array over max(n, other.n) blocks: True where the two differ.

        Blocks present in only one of them count as changed, and so does the
        last common block when the sizes differ and it is short in either.
        Raises :class:`pydr.errors.IncompatibleSignatures` when block sizes or
        algorithms differ.
        """
        if self.block_size != other.block_size or self.algorithm != other.algorithm:
            raise IncompatibleSignatures(
                f"cannot compare a {self.algorithm} signature of {self.block_size}-byte "
                f"blocks with a {other.algorithm} one of {other.block_size}-byte blocks"
            )
        import numpy as np

        n_self, n_other = self.block_count, other.block_count
        common = min(n_self, n_other)
        changed = np.ones(max(n_self, n_other), dtype=np.bool_)
        a, b = self.hashes[:common], other.hashes[:common]
        diff = a != b
        changed[:common] = diff if diff.ndim == 1 else diff.any(axis=1)
        if self.size != other.size and common:
            last = common - 1
            if min(self.size, other.size) < common * self.block_size:
                changed[last] = True
        return changed

    def diff(self, other: Signature) -> npt.NDArray[np.uint64]:
        """Byte ranges where ``self`` and ``other`` differ, coalesced.

        Returns a uint64 array of shape ``(k, 2)``: rows ``[offset, length]``,
        sorted, non-overlapping and non-adjacent, clipped to the larger size.
        Raises :class:`pydr.errors.IncompatibleSignatures` (a ``ValueError``)
        when block sizes or algorithms differ.

        Example::

            for offset, length in old.diff(new):
                print(f"changed: {int(length)} bytes at {int(offset)}")
        """
        import numpy as np

        changed = self.changed_blocks(other)
        edges = np.diff(np.concatenate(([0], changed.view(np.int8), [0])).astype(np.int8))
        starts = np.flatnonzero(edges == 1).astype(np.uint64)
        ends = np.flatnonzero(edges == -1).astype(np.uint64)
        bs = np.uint64(self.block_size)
        offsets = starts * bs
        limit = np.uint64(max(self.size, other.size))
        lengths = np.minimum(ends * bs, limit) - offsets
        return np.stack([offsets, lengths], axis=1) if len(starts) else np.empty((0, 2), np.uint64)

    # -- file format (docs/FORMAT.md) --------------------------------------
    def save(self, path: _Path) -> None:
        """Write the signature file (docs/FORMAT.md) to ``path`` atomically:
        a reader sees the old file or the new one, never a part. ``"-"``
        writes to standard output. Raises ``OSError`` (with the path) when
        the file cannot be written."""
        if os.fspath(path) == "-":
            self._write(sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        with atomic_write(path) as f:
            self._write(f)

    def _write(self, f):
        code = B.algorithm_code(self.algorithm)
        fields = _HEADER.pack(
            MAGIC, VERSION, code, self.block_size, self.size, self.block_count,
            self.zero_blocks, 0, 0,
        )
        header = fields + struct.pack("<Q", B.hash_bytes(B.ALGORITHMS["xxh3-64"], fields)[0])
        body = self._hash_buf if _LITTLE else self.hashes.astype("<u8")
        mask, _ = B.mask_pack(self._mask_buf)
        digest = B.Digest()
        total = HEADER_SIZE + _nbytes(body) + len(mask) + TRAILER_SIZE
        for part in (header, body, mask):
            digest.update(part)
            f.write(memoryview(part).cast("B"))
        trailer_head = TRAILER_MAGIC + struct.pack("<Q", total)
        digest.update(trailer_head)
        f.write(trailer_head + digest.digest())

    @classmethod
    def load(cls, path: _Path) -> Signature:
        """Read a signature file written by :meth:`save`; every byte is
        checked (header and trailer checksums) before it is trusted.

        Raises:
            FormatError: The file is corrupt, truncated, of another version
                or not a signature (naming the path and offset).
            OSError: It cannot be read (``FileNotFoundError``, ...).
        """
        with open(path, "rb") as f:
            return cls._read(f, os.fspath(path))

    @classmethod
    def _read(cls, f, path):
        """Read from a binary file object; ``path`` names it in errors."""
        header = f.read(HEADER_SIZE)
        info = parse_header(header, path)
        n, words = info["block_count"], B.hash_words(B.ALGORITHMS[info["algorithm"]])
        body_bytes = n * words * 8
        mask_bytes = (n + 7) // 8
        expected = HEADER_SIZE + body_bytes + mask_bytes + TRAILER_SIZE
        # a file, a remote file (its size is known) or a stream from a peer
        actual = os.fstat(f.fileno()).st_size if hasattr(f, "fileno") else getattr(f, "size", None)
        if actual is None:
            if expected > MAX_STREAMED:  # checked before allocating what a peer claims
                raise FormatError(f"a signature of {expected} bytes is over the {MAX_STREAMED}-byte "
                                  "limit for one received over a connection", path=path, offset=0)
        elif actual != expected:
            what = "truncated" if actual < expected else "has trailing data"
            raise FormatError(
                f"signature file {what}: {actual} bytes, header says {expected}",
                path=path, offset=min(actual, expected),
            )
        digest = B.Digest().update(header)
        if actual is None:  # a peer's stream: memory grows as its bytes arrive, not as it claims
            hashes = bytearray()
            while len(hashes) < body_bytes:
                piece = f.read(min(16 << 20, body_bytes - len(hashes)))
                if not piece:
                    raise FormatError("signature truncated", path=path,
                                      offset=HEADER_SIZE + len(hashes))
                hashes += piece
        else:
            hashes = bytearray(body_bytes)
            if f.readinto(hashes) != body_bytes:
                raise FormatError("signature file truncated", path=path, offset=HEADER_SIZE)
        digest.update(hashes)
        packed = f.read(mask_bytes)
        digest.update(packed)
        trailer = f.read(TRAILER_SIZE)
        if len(packed) != mask_bytes or len(trailer) != TRAILER_SIZE:
            raise FormatError("signature file truncated", path=path, offset=expected - TRAILER_SIZE)
        magic, total, checksum = _TRAILER.unpack(trailer)
        trailer_at = expected - TRAILER_SIZE
        if magic != TRAILER_MAGIC or total != expected:
            raise FormatError("signature trailer is corrupt", path=path, offset=trailer_at)
        digest.update(trailer[:16])
        if digest.digest() != checksum:
            raise FormatError(
                "signature checksum mismatch: the file is corrupt", path=path, offset=trailer_at
            )
        zero_mask, zeros = B.mask_unpack(packed, n)
        if zero_mask is None or zeros != info["zero_blocks"]:
            raise FormatError("zero mask disagrees with the header", path=path,
                              offset=HEADER_SIZE + body_bytes)
        if not _LITTLE:
            import numpy as np

            hashes = np.frombuffer(hashes, dtype="<u8").astype(np.uint64)
            if words == 2:
                hashes = hashes.reshape(n, 2)
            zero_mask = np.frombuffer(zero_mask, dtype=np.bool_)
        return cls(info["block_size"], info["size"], info["algorithm"], hashes, zero_mask)


def parse_header(header, path):
    """Validate a signature header; returns its fields as a dict."""
    if len(header) < 8 or header[:8] != MAGIC:
        if len(header) == 0:
            raise FormatError("empty file, not a pydr signature", path=path, offset=0)
        raise FormatError("not a pydr signature file (bad magic)", path=path, offset=0)
    if len(header) < HEADER_SIZE:
        raise FormatError("signature header truncated", path=path, offset=len(header))
    fields = header[: _HEADER.size]
    (stored,) = struct.unpack_from("<Q", header, _HEADER.size)
    if B.hash_bytes(B.ALGORITHMS["xxh3-64"], fields)[0] != stored:
        raise FormatError("signature header checksum mismatch: the file is corrupt", path=path, offset=0)
    _, version, code, block_size, size, n, zeros, flags, _ = _HEADER.unpack(fields)
    if version != VERSION:
        raise FormatError(
            f"signature format version {version} is not supported (this pydr reads {VERSION})",
            path=path, offset=8,
        )
    if code not in B.ALGORITHM_NAMES:
        raise FormatError(f"unknown hash algorithm {code}", path=path, offset=10)
    try:
        B.check_block_size(block_size)
    except ValueError as exc:
        raise FormatError(str(exc), path=path, offset=12) from None
    if size > _MAX_IMAGE or n != blocks_for(size, block_size) or zeros > n or flags:
        raise FormatError("inconsistent signature header", path=path, offset=16)
    return {
        "version": version, "algorithm": B.ALGORITHM_NAMES[code],
        "block_size": block_size, "size": size, "block_count": n, "zero_blocks": zeros,
    }


def signature(path: _Path | Device, *, block_size: int = DEFAULT_BLOCK_SIZE,
              algorithm: str = DEFAULT_ALGORITHM, threads: int | None = None,
              progress: Callable[[ProgressRecord], None] | None = None,
              cancel: threading.Event | None = None, use_mmap: bool = True) -> Signature:
    """Compute the block signature of a file or block device: a hash of
    every block, holes skipped without reading.

    Args:
        path: The file or block device (or an open device of
            pydr.engine.devices: an NBD export).
        block_size: Bytes per block (a power of two, 512 to 16 MiB).
        algorithm: ``"xxh3-128"`` (the default; what deltas need) or
            ``"xxh3-64"``.
        threads: Threads signing disjoint chunks in parallel (default: the
            CPUs available, at most 8); the result is the same for any count.
        progress: Called with a :class:`pydr.ProgressRecord` at most ~10
            times a second and once at the end.
        cancel: Setting this event (or Ctrl-C) stops the work promptly with
            :class:`pydr.errors.Cancelled`.
        use_mmap: False reads with pread() instead of hashing from mmap
            windows.

    Returns:
        The :class:`Signature`, with ``stats`` (:class:`SignStats`) saying how
        it was computed.

    Raises:
        UnfinishedApply: `path` has an interrupted apply (roll it back first).
        UnsupportedFile: `path` is not a regular file or block device.
        FileChanged: `path` shrank while it was read.
        Cancelled: `cancel` was set, or Ctrl-C.
        ValueError: A bad block size or an unknown algorithm.
        OSError: `path` cannot be read (``FileNotFoundError``, ...).

    Example::

        sig = pydr.signature("disk.img", block_size=65536, threads=2)
        print(sig.block_count, sig.stats.seconds)
    """
    from .journal import check_no_unfinished_apply  # not loaded by `import pydr`

    code = B.algorithm_code(algorithm)
    B.check_block_size(block_size)
    threads = check_threads(threads)
    check_no_unfinished_apply(path)
    start = time.monotonic()
    with using_device(path) as device:
        size = device.size_now()
        n = blocks_for(size, block_size)
        hashes = bytearray(n * B.hash_words(code) * 8)  # native endian, like the C core
        zero_mask = bytearray(n)
        shared = B.Progress()
        throttle = Throttle(progress, "signature", device.name, size)
        used = device.sign(0, size, block_size, code, hashes, zero_mask, threads=threads,
                           progress_record=shared, throttle=throttle, cancel=cancel,
                           use_mmap=use_mmap)
        bytes_read = shared.read
    stats = SignStats(bytes_read, size - bytes_read, time.monotonic() - start, used, B.kernel_name())
    return Signature(block_size, size, algorithm, hashes, zero_mask, stats)

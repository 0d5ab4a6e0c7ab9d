"""Signature files read and written window by window, in bounded memory.

``Signature.load``/``save`` hold a whole signature in memory (17 bytes per
block: 4.25 GiB for a 1 TiB disk at 4 KiB). Resync's signature cache uses
these instead: the reader checks the whole-file checksum in one streaming
pass and then serves any block range with pread; the writer takes blocks in
order and finishes the header and checksum at the end. Only the packed zero
mask (1 bit per block) is kept in memory. Same format (docs/FORMAT.md).
"""

import contextlib
import os
import struct

from . import bindings as B
from .atomic import fsync_dir, open_temp
from .oserrors import naming
from ..errors import FormatError
from .signatures import (_HEADER, _TRAILER, HEADER_SIZE, MAGIC, TRAILER_MAGIC, TRAILER_SIZE,
                         VERSION, blocks_for, parse_header)

CHUNK = 16 << 20


class SignatureReader:
    """Random access to the blocks of a verified xxh3-128 signature file."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._verify()
        except BaseException:
            os.close(self.fd)
            raise

    def _verify(self):
        header = os.pread(self.fd, HEADER_SIZE, 0)
        info = parse_header(header, self.path)
        if info["algorithm"] != "xxh3-128":
            raise FormatError("signature cache must use xxh3-128", path=self.path, offset=10)
        self.block_size, self.size, self.n = info["block_size"], info["size"], info["block_count"]
        body = self.n * 16
        mask_bytes = (self.n + 7) // 8
        expected = HEADER_SIZE + body + mask_bytes + TRAILER_SIZE
        actual = os.fstat(self.fd).st_size
        if actual != expected:
            raise FormatError(f"signature file has {actual} bytes, header says {expected}",
                              path=self.path, offset=min(actual, expected))
        digest = B.Digest()
        pos, end = 0, expected - 16
        while pos < end:
            chunk = os.pread(self.fd, min(CHUNK, end - pos), pos)
            if not chunk:
                raise FormatError("signature file truncated", path=self.path, offset=pos)
            digest.update(chunk)
            pos += len(chunk)
        magic, total, checksum = _TRAILER.unpack(os.pread(self.fd, TRAILER_SIZE, expected - TRAILER_SIZE))
        if magic != TRAILER_MAGIC or total != expected or digest.digest() != checksum:
            raise FormatError("signature checksum mismatch: the file is corrupt", path=self.path,
                              offset=expected - TRAILER_SIZE)
        self.packed = os.pread(self.fd, mask_bytes, HEADER_SIZE + body)
        mask, zeros = B.mask_unpack(self.packed, self.n)
        if mask is None or zeros != info["zero_blocks"]:
            raise FormatError("zero mask disagrees with the header", path=self.path,
                              offset=HEADER_SIZE + body)

    def read(self, first, count):
        """(hashes: 16*count bytes, zero mask: count bytes) of blocks
        [first, first+count), clipped to the signature's blocks."""
        count = max(0, min(count, self.n - first))
        hashes = bytearray(os.pread(self.fd, 16 * count, HEADER_SIZE + 16 * first))
        lo, hi = first // 8, (first + count + 7) // 8
        bits, _ = B.mask_unpack(self.packed[lo:hi], 8 * (hi - lo))
        skip = first - 8 * lo
        return hashes, bits[skip:skip + count]

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SignatureWriter:
    """Writes an xxh3-128 signature file block range by block range, in
    order; `commit()` replaces the target file atomically."""

    def __init__(self, path, block_size, size):
        self.path = os.fspath(path)
        self.block_size, self.size = block_size, size
        self.n = blocks_for(size, block_size)
        fd, self.tmp = open_temp(self.path)
        self.fd = fd
        self.written = 0
        self.zeros = 0
        self.packed = bytearray((self.n + 7) // 8)
        with naming(self.path):
            os.pwrite(self.fd, bytes(HEADER_SIZE), 0)

    def write(self, hashes, mask):
        """Append the next blocks: 16 bytes each of hashes, one mask byte each."""
        count = len(mask)
        if self.written % 8 or self.written + count > self.n or len(hashes) != 16 * count:
            raise ValueError("blocks must be written in order, 8-block aligned")
        with naming(self.path):
            os.pwrite(self.fd, hashes, HEADER_SIZE + 16 * self.written)
        packed, zeros = B.mask_pack(mask)
        self.packed[self.written // 8:self.written // 8 + len(packed)] = packed
        self.zeros += zeros
        self.written += count

    def commit(self):
        if self.written != self.n:
            raise ValueError(f"{self.written} of {self.n} blocks written")
        with naming(self.path):
            self._finish()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path)

    def _finish(self):
        end = HEADER_SIZE + 16 * self.n
        os.pwrite(self.fd, bytes(self.packed), end)
        fields = _HEADER.pack(MAGIC, VERSION, B.ALGORITHMS["xxh3-128"], self.block_size,
                              self.size, self.n, self.zeros, 0, 0)
        header = fields + struct.pack("<Q", B.hash_bytes(B.ALGORITHMS["xxh3-64"], fields)[0])
        os.pwrite(self.fd, header, 0)
        total = end + len(self.packed) + TRAILER_SIZE
        digest = B.Digest()
        pos, stop = 0, end + len(self.packed)
        while pos < stop:
            chunk = os.pread(self.fd, min(CHUNK, stop - pos), pos)
            digest.update(chunk)
            pos += len(chunk)
        head = TRAILER_MAGIC + struct.pack("<Q", total)
        digest.update(head)
        os.pwrite(self.fd, head + digest.digest(), stop)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None

    def abort(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)

"""The signature cache of a replica (format v2, docs/FORMAT.md): what each
block of the target holds, kept so that a cycle need not read the target.

Its size and cost follow the data and the change, not the disk:

- Blocks are grouped in segments of SEGMENT_BLOCKS. A segment with no data
  costs one table entry; one with data a slot holding its data bits (one per
  block) and the hashes of its non-zero blocks only, packed. A zero block's
  hash is never stored: it is the hash of zeros.
- A cycle updates in place only the segments it changed (an unchanged hash is
  not even rewritten); each segment carries its own checksum, so opening the
  cache costs its header, and reading a range costs that range.
- Crash-safe by a state field in the header: CLEAN (the cache describes the
  target), CHANGING (a cycle may be changing the target: the cache still
  describes it as it was before, which a resumed resync may check its journal
  against, but no comparison may trust), UPDATING (being rewritten: nothing
  may trust it). A cycle's changes wait in a side file (``NAME.pending``)
  until commit(), after the target is durable. Each commit binds the cache to
  the target's identity (device, inode, size, mtime) as it leaves it.
- Memory is bounded by the ranges asked for (and one segment), never the disk.

A cache in the previous format (v1, a whole-disk signature file, as written
by ``pydr signature``) is converted to v2 once, when a cycle opens it and it
can be trusted: the conversion reads the old file, not the target.
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Callable, Iterator, Optional, Tuple

from . import bindings as B
from . import crashpoints
from .atomic import fsync_dir, open_temp
from .oserrors import naming
from ..errors import FormatError
from .sigcache_v1 import convert_v1
from .sigcache_layout import (  # noqa: F401 (CLEAN, ... binding: this module's API too)
    CHANGING, CLEAN, ENTRY_BYTES, HEADER_BYTES, MAGIC, NO_TARGET, PAGE_BYTES, PAGE_CHECK,
    PAGE_ENTRIES, PENDING_SUFFIX, SEGMENT_BLOCKS, STATE_NAMES, UPDATING, VERSION, binding,
    page_checksum, table_bytes)
from .sigcache_layout import pending_runs
from .sigcache_layout import (ENTRY as _ENTRY, HEADER as _HEADER, PENDING as _PENDING,
                              XXH128 as _XXH128, capacity as _capacity,
                              parse_header as _parse_header, punch as _punch, xxh64 as _xxh64,
                              zero_hash as _zero_hash)

#: side file bytes gathered before one write (a tracked cycle's many short updates)
PENDING_BATCH = 1 << 20
#: segments (68 KiB each at most) one instance keeps once loaded
MEMO_SEGMENTS = 256


class SignatureCache:
    """A v2 signature cache file (see the module docstring). Made by
    :meth:`open` (an existing cache, for a cycle), :meth:`create` (a new
    one, replacing the old at commit) or :meth:`load` (read only, for
    checks); read with :meth:`read` and :meth:`all_zero`, changed with
    :meth:`update` then :meth:`commit`.

    Attributes:
        path: The cache file.
        block_size: Bytes per block.
        size: Bytes of the disk it describes.
        n: Blocks of the disk (the last may be short).
        state: CLEAN, CHANGING or UPDATING, as read from the header.
    """

    def __init__(self, path: str, fd: int, header: dict, *, new: bool = False,
                 tmp: Optional[str] = None) -> None:
        self.path, self.fd, self.tmp, self.new = path, fd, tmp, new
        self.block_size, self.size, self.n = header["block_size"], header["size"], header["n"]
        self.state, self.generation = header["state"], header["generation"]
        self.cache_id, self.target = header["cache_id"], header["target"]
        self.segments = header["segments"]
        self.table = header["table"]
        self.end = header["end"]
        self.mask_bytes = SEGMENT_BLOCKS // 8
        self._zero = _zero_hash(self.block_size)
        tail = self.size - (self.n - 1) * self.block_size if self.n else 0
        self._tail_zero = _zero_hash(tail) if tail and tail != self.block_size else self._zero
        self._seg: Optional[Tuple[int, object, object]] = None  # (index, data bits, hashes)
        self._pending_fd: Optional[int] = None
        self._pending_digest = None
        self._pending_out = bytearray()  # side file bytes not written yet (batched)
        self._dirty = False  # the loaded segment differs from the file (created caches only)
        self._last_read = None
        self._empty = None  # (bits, hashes) of a segment with no data: shared, read only
        self._table_page = None  # (index, bytes) of the table page last read, checked
        # segments loaded (checked) by this instance, as they stand: a tracked cycle
        # reads a segment to compare and again to commit; the second is not read
        self._memo: dict = {}

    # -- opening ---------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, block_size: int, size: int, trusted: Callable[[int], bool],
             target: Optional[tuple] = None) -> Optional["SignatureCache"]:
        """The cache at `path` for a cycle about to change the target it
        describes, or None when it cannot be used: missing, unreadable or
        corrupt, of another block size or disk size, left by an interrupted
        cycle (not CLEAN), not ``trusted(mtime_ns)`` (a callable: the
        target's Device.cache_trusted), or bound by its last commit to a
        target other than `target` (Device.cache_identity()). An opened cache is marked CHANGING
        (durably) before this returns: until :meth:`commit`, a crash leaves it
        untrusted. A v1 cache is converted to v2 first (once).

        Args:
            path: The cache file.
            block_size: The cycle's block size.
            size: The target's size now.
            trusted: Called with the cache file's mtime (ns); False rejects it.
            target: The target's identity now (None: not checked).

        Returns:
            The cache, or None (the cycle reads the target instead).

        Raises:
            OSError: Only when marking it CHANGING fails (the cycle must not
            go on with a cache that would still look clean)."""
        path = os.fspath(path)
        try:
            st = os.stat(path)
            if not trusted(st.st_mtime_ns):
                return None
            with open(path, "rb") as f:
                magic = f.read(8)
            if magic != MAGIC:
                convert_v1(path, block_size, size, target, create=cls.create)
            cache = cls.load(path, writable=True)
        except (FormatError, ValueError, OSError):
            return None
        if (cache.block_size != block_size or cache.size != size or cache.state != CLEAN
                or (target is not None and cache.target != tuple(target))):
            cache.close()
            return None
        try:
            cache._write_header(CHANGING)
        except BaseException:
            cache.close()
            raise
        return cache

    @classmethod
    def load(cls, path: str, *, writable: bool = False) -> "SignatureCache":
        """The v2 cache at `path`, whatever its state (see :attr:`state`);
        its header is checked here, each segment when read. Read only unless
        `writable` (as :meth:`open` takes it).

        Raises:
            FormatError: Not a v2 cache, or a damaged header (names the path
            and offset).
            OSError: It cannot be opened or read."""
        path = os.fspath(path)
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
                     | os.O_NOFOLLOW)
        try:
            with naming(path):
                header = _parse_header(os.pread(fd, HEADER_BYTES, 0), path)
            return cls(path, fd, header)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create(cls, path: str, *, block_size: int, size: int) -> "SignatureCache":
        """A new cache for a disk of `size` bytes, written beside `path` and
        put in its place by :meth:`commit` (the old cache stays until then).
        Every block starts as a zero block: the cycle updates the others.

        Raises:
            ValueError: A block size the core does not take.
            OSError: The file cannot be made (names the path)."""
        B.check_block_size(block_size)
        path = os.fspath(path)
        n = -(-size // block_size)
        segments = -(-n // SEGMENT_BLOCKS)
        table = HEADER_BYTES
        end = table + table_bytes(segments)
        header = {"block_size": block_size, "size": size, "n": n, "state": UPDATING,
                  "generation": 0, "segments": segments, "table": table, "end": end,
                  "cache_id": os.urandom(16),  # tells this cache from a copy of another
                  "target": NO_TARGET}
        fd, tmp = open_temp(path)
        cache = cls(path, fd, header, new=True, tmp=tmp)
        try:
            with naming(tmp):
                os.ftruncate(fd, 0)
                empty = bytes(PAGE_CHECK)  # every entry: no data, no slot
                pages = table_bytes(segments) // PAGE_BYTES
                for first in range(0, pages, 256):
                    os.pwrite(fd, b"".join(empty + page_checksum(i, empty)
                                           for i in range(first, min(pages, first + 256))),
                              table + first * PAGE_BYTES)
                cache._write_header(UPDATING, sync=False)
        except BaseException:
            cache.abort()
            raise
        return cache

    # -- reading ---------------------------------------------------------

    def read(self, first: int, count: int) -> Tuple[bytearray, bytearray]:
        """The hashes (16 bytes a block, xxh3-128 words little-endian) and
        zero mask (one byte a block, 1 = all zeros) of blocks [first,
        first + count), clipped to the disk's blocks.

        Raises:
            FormatError: A segment's entry or slot fails its checksum (names
            the path and the offset of what is damaged).
            OSError: The file cannot be read."""
        import numpy as np

        count = max(0, min(count, self.n - first))
        hashes = np.empty((count, 16), dtype=np.uint8)
        mask = np.empty(count, dtype=np.uint8)
        for seg, lo, hi in self._segments_of(first, count):
            bits, seg_hashes = self._load(seg)
            base = seg * SEGMENT_BLOCKS
            at = base + lo - first
            hashes[at:at + hi - lo] = seg_hashes[lo:hi]
            mask[at:at + hi - lo] = ~bits[lo:hi] & 1
        got_h, got_m = hashes.tobytes(), mask.tobytes()
        # update() of the same range compares with it (bytes: the caller may change its copy)
        self._last_read = (first, count, (got_h, got_m))
        return bytearray(got_h), bytearray(got_m)

    def all_zero(self, first: int, count: int) -> bool:
        """Whether every block of [first, first + count) is known to hold
        zeros (clipped to the disk). Costs the table pages of a range with
        no data (one per 127 segments), not its slots. Raises as :meth:`read`."""
        import numpy as np

        count = max(0, min(count, self.n - first))
        if not count:
            return True
        seg, last = first // SEGMENT_BLOCKS, (first + count - 1) // SEGMENT_BLOCKS
        while seg <= last:
            index, k = divmod(seg, PAGE_ENTRIES)
            stop = min(last + 1, (index + 1) * PAGE_ENTRIES)
            words = np.frombuffer(self._page(index), dtype="<u4", count=8 * PAGE_ENTRIES)
            counts = words[3::8][k:k + stop - seg]  # each entry's non-zero blocks
            for j in np.nonzero(counts)[0].tolist():  # segments with data: their bits
                base = (seg + j) * SEGMENT_BLOCKS
                bits, _ = self._load(seg + j)
                if bits[max(first, base) - base:min(first + count, base + SEGMENT_BLOCKS)
                        - base].any():
                    return False
            seg = stop
        return True

    # -- changing --------------------------------------------------------

    def update(self, first: int, hashes: bytes, mask: bytes,
               old: Optional[Tuple[bytes, bytes]] = None) -> None:
        """Blocks [first, first + len(mask)) of the target now hold blocks
        of these hashes (16 bytes each) and zero mask (1 = zeros). A new
        cache takes them now; an opened one keeps the blocks that differ
        from what it holds in its side file until :meth:`commit`. `old`:
        what :meth:`read` of the same blocks returned this cycle (no update
        of them since), so they are not read again; None: read here.

        Raises:
            ValueError: Lengths that disagree, or blocks past the disk.
            FormatError, OSError: As :meth:`read`; a write that fails.
        """
        import numpy as np

        count = len(mask)
        if len(hashes) != 16 * count or first < 0 or first + count > self.n:
            raise ValueError(f"update of blocks [{first}, {first + count}) with "
                             f"{len(hashes)} bytes of hashes: the cache has {self.n} blocks")
        if not count:
            return
        new_h = np.frombuffer(hashes, dtype=np.uint8).reshape(count, 16)
        new_z = np.frombuffer(mask, dtype=np.uint8) != 0
        if self.new:
            self._apply(first, new_h, new_z)
            return
        last = self._last_read
        old_h, old_z = (old if old is not None else
                        last[2] if last is not None and last[:2] == (first, count)
                        else self.read(first, count))
        if old_h == hashes and old_z == mask:
            return  # the usual window: nothing changed (a byte compare, no per-block work)
        old64 = np.frombuffer(old_h, dtype="<u8").reshape(count, 2)
        new64 = np.frombuffer(hashes, dtype="<u8").reshape(count, 2)
        old_z = np.frombuffer(old_z, dtype=np.uint8) != 0
        differ = np.nonzero((old64[:, 0] != new64[:, 0]) | (old64[:, 1] != new64[:, 1])
                            | (old_z != new_z))[0]
        if not len(differ):
            return
        if self._pending_fd is None:
            pending = self.path + PENDING_SUFFIX
            with contextlib.suppress(FileNotFoundError):  # never write through what is there
                os.unlink(pending)
            self._pending_fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL
                                       | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            self._pending_digest = B.Digest()
        # runs of changed blocks, those less than 16 blocks apart taken as one
        breaks = np.nonzero(np.diff(differ) > 16)[0]
        starts = np.concatenate(([differ[0]], differ[breaks + 1]))
        ends = np.concatenate((differ[breaks], [differ[-1]])) + 1
        out = bytearray()
        for s, e in zip(starts.tolist(), ends.tolist()):
            out += _PENDING.pack(first + s, e - s)
            out += new_z[s:e].astype(np.uint8).tobytes() + new_h[s:e].tobytes()
        self._pending_digest.update(out)
        self._pending_out += out  # many short updates: one write
        if len(self._pending_out) >= PENDING_BATCH:
            self._write_pending()

    def _write_pending(self) -> None:
        with naming(self.path + PENDING_SUFFIX):
            os.write(self._pending_fd, self._pending_out)
        self._pending_out = bytearray()

    def commit(self, target: Optional[tuple] = None) -> None:
        """The target is durable and holds what the updates said: write
        them into the cache and mark it CLEAN (a new cache replaces the old
        file), bound to `target` (the target's Device.cache_identity() now;
        None: bound to none, never trusted with one). Call only after the
        target is durable: the cache never runs ahead of it.

        Raises:
            FormatError: The side file read back is not what was written.
            OSError: A write or fsync fails (the cache is left untrusted).
        """
        self.target = NO_TARGET if target is None else tuple(target)
        with naming(self.tmp or self.path):
            if self.new:
                self._flush()
                os.fsync(self.fd)
                self._write_header(CLEAN)
                os.replace(self.tmp, self.path)
                fsync_dir(self.path)
                self.tmp, self.new = None, False
                self._discard_pending()
                return
            self._write_header(UPDATING)
            self._last_read = None
            crashpoints.reached("sigcache.updating")
            if self._pending_fd is not None:
                self._replay()
            self._flush()
            os.fsync(self.fd)
            self._write_header(CLEAN)
        self._discard_pending()

    def abort(self) -> None:
        """The cycle failed: a new cache is removed; an opened one stays
        marked untrusted (CHANGING: the target may have been changed), so
        the next cycle reads the target. Never raises for a cache already
        gone."""
        self._discard_pending()
        if self.new and self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None
        self.close()

    def close(self) -> None:
        """Release the file (an uncommitted cycle stays untrusted)."""
        if self._pending_fd is not None:
            os.close(self._pending_fd)
            self._pending_fd = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "SignatureCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside ----------------------------------------------------------

    def verify(self) -> None:
        """Check every segment's entry and slot (costs reading the whole
        cache: for checks, never for a cycle).

        Raises:
            FormatError: The first damaged segment (names the path and offset).
            OSError: The file cannot be read.
        """
        for seg in range(self.segments):
            self._load(seg)

    def _segments_of(self, first: int, count: int) -> Iterator[Tuple[int, int, int]]:
        """(segment, first block in it, end block in it) covering the range."""
        pos, stop = first, first + count
        while pos < stop:
            seg = pos // SEGMENT_BLOCKS
            base = seg * SEGMENT_BLOCKS
            hi = min(stop, base + SEGMENT_BLOCKS)
            yield seg, pos - base, hi - base
            pos = hi

    def _page(self, index: int) -> bytearray:
        """Table page `index`, checked (the last one read is kept)."""
        if self._table_page is not None and self._table_page[0] == index:
            return self._table_page[1]
        at = self.table + index * PAGE_BYTES
        with naming(self.path):
            raw = bytearray(os.pread(self.fd, PAGE_BYTES, at))
        if len(raw) != PAGE_BYTES or page_checksum(index, raw) != raw[PAGE_CHECK:]:
            raise FormatError(f"signature cache damaged: page {index} of its segment table "
                              f"fails its checksum", path=self.path, offset=at)
        self._table_page = (index, raw)
        return raw

    def _write_entry(self, seg: int, offset: int, capacity: int, nonzero: int,
                     checksum: bytes) -> None:
        index, k = divmod(seg, PAGE_ENTRIES)
        page = self._page(index)
        page[ENTRY_BYTES * k:ENTRY_BYTES * (k + 1)] = _ENTRY.pack(offset, capacity, nonzero,
                                                                   checksum)
        page[PAGE_CHECK:] = page_checksum(index, page)
        os.pwrite(self.fd, page, self.table + index * PAGE_BYTES)

    def _read_entry(self, seg: int) -> Tuple[int, int, int, bytes]:
        index, k = divmod(seg, PAGE_ENTRIES)
        page = self._page(index)
        at = self.table + index * PAGE_BYTES + ENTRY_BYTES * k
        offset, capacity, nonzero, checksum = _ENTRY.unpack_from(page, ENTRY_BYTES * k)
        blocks = self._segment_len(seg)
        if nonzero > min(capacity, blocks) or (nonzero and offset < self.table
                                                + table_bytes(self.segments)):
            raise FormatError(f"signature cache damaged: the entry of segment {seg} is "
                              f"impossible", path=self.path, offset=at)
        return offset, capacity, nonzero, checksum

    def _segment_len(self, seg: int) -> int:
        return min(SEGMENT_BLOCKS, self.n - seg * SEGMENT_BLOCKS)

    def _load(self, seg: int):
        """(data bits: bool per block, hashes: (blocks, 16) uint8) of a
        segment, checked; the last one loaded is kept."""
        import numpy as np

        if self._seg is not None and self._seg[0] == seg:
            return self._seg[1], self._seg[2]
        self._flush()
        if seg in self._memo:
            self._seg = (seg,) + self._memo[seg]
            return self._memo[seg]
        blocks = self._segment_len(seg)
        offset, _, nonzero, checksum = self._read_entry(seg)
        if nonzero == 0 and blocks == SEGMENT_BLOCKS:
            if self._empty is None:
                bits = np.zeros(blocks, dtype=bool)
                hashes = np.empty((blocks, 16), dtype=np.uint8)
                hashes[:] = np.frombuffer(self._zero, dtype=np.uint8)
                bits.flags.writeable = hashes.flags.writeable = False
                self._empty = bits, hashes
            self._seg = (seg,) + self._empty
            return self._empty
        hashes = np.empty((blocks, 16), dtype=np.uint8)
        hashes[:] = np.frombuffer(self._zero, dtype=np.uint8)
        if self._is_last(seg) and self._tail_zero != self._zero:
            hashes[-1] = np.frombuffer(self._tail_zero, dtype=np.uint8)
        if nonzero == 0:
            bits = np.zeros(blocks, dtype=bool)
        else:
            length = self.mask_bytes + 16 * nonzero
            with naming(self.path):
                slot = os.pread(self.fd, length, offset)
            digest = B.Digest().update(struct.pack("<Q", seg)).update(slot).digest()
            if len(slot) != length or digest != checksum:
                raise FormatError(f"signature cache damaged: segment {seg} (blocks from "
                                  f"{seg * SEGMENT_BLOCKS}) fails its checksum",
                                  path=self.path, offset=offset)
            bits = np.unpackbits(np.frombuffer(slot[:self.mask_bytes], dtype=np.uint8),
                                 bitorder="little").astype(bool)
            if int(bits.sum()) != nonzero or bits[blocks:].any():
                raise FormatError(f"signature cache damaged: segment {seg} counts {nonzero} "
                                  f"data blocks, its bits {int(bits.sum())}",
                                  path=self.path, offset=offset)
            bits = bits[:blocks]
            hashes[bits] = np.frombuffer(slot[self.mask_bytes:], dtype=np.uint8).reshape(-1, 16)
        self._seg = (seg, bits, hashes)
        if len(self._memo) < MEMO_SEGMENTS:
            self._memo[seg] = (bits, hashes)
        return bits, hashes

    def _is_last(self, seg: int) -> bool:
        return seg == self.segments - 1

    def _apply(self, first: int, new_h, new_z) -> None:
        """Set blocks from `first` in the loaded segments, written back when
        another segment is loaded (or at commit)."""
        at = 0
        for seg, lo, hi in self._segments_of(first, len(new_z)):
            bits, hashes = self._load(seg)
            k = hi - lo
            if not bits.flags.writeable and new_z[at:at + k].all():
                at += k  # zeros into a segment with no data: nothing changes
                continue
            if not bits.flags.writeable:  # the shared empty segment: this one's own copy
                bits, hashes = bits.copy(), hashes.copy()
                self._seg = (seg, bits, hashes)
                self._memo.pop(seg, None)
            bits[lo:hi] = ~new_z[at:at + k]
            hashes[lo:hi] = new_h[at:at + k]
            self._dirty = True
            at += k

    def _flush(self) -> None:
        """Write the loaded segment back if it was changed: in its slot when
        it fits (only what differs), else in a new slot at the end."""
        import numpy as np

        if not self._dirty or self._seg is None:
            return
        self._dirty = False
        seg, bits, hashes = self._seg
        # a zero block's hash is the hash of zeros whatever was given
        blocks = len(bits)
        nonzero = int(bits.sum())
        packed_bits = np.packbits(bits, bitorder="little").tobytes()
        packed_bits += bytes(self.mask_bytes - len(packed_bits))
        packed_h = hashes[bits].tobytes()
        offset, capacity, old_count, _ = self._read_entry(seg)
        slot = packed_bits + packed_h
        checksum = (B.Digest().update(struct.pack("<Q", seg)).update(slot).digest()
                    if nonzero else bytes(16))
        with naming(self.tmp or self.path):
            if nonzero == 0:
                if not old_count:
                    return  # no data before, none now: the entry stays as it is
                _punch(self.fd, offset, self.mask_bytes + 16 * capacity)
                offset = capacity = 0
            elif nonzero <= capacity and old_count:
                old = os.pread(self.fd, self.mask_bytes + 16 * old_count, offset)
                # the same blocks hold data: only the hashes that changed
                differ = None
                if old[:self.mask_bytes] == packed_bits:
                    a = np.frombuffer(old[self.mask_bytes:], dtype=np.uint8).reshape(-1, 16)
                    differ = np.nonzero((a != hashes[bits]).any(axis=1))[0].tolist()
                if differ is not None and len(differ) <= 64:  # a few: one write each
                    for i in differ:
                        os.pwrite(self.fd, packed_h[16 * i:16 * i + 16],
                                  offset + self.mask_bytes + 16 * i)
                else:
                    os.pwrite(self.fd, slot, offset)
            else:
                if old_count:
                    _punch(self.fd, offset, self.mask_bytes + 16 * capacity)
                capacity = min(_capacity(nonzero), max(blocks, 4))
                offset, self.end = self.end, self.end + self.mask_bytes + 16 * capacity
                os.pwrite(self.fd, slot, offset)
            self._write_entry(seg, offset, capacity, nonzero, checksum)

    def _replay(self) -> None:
        """Write the side file's blocks into the cache, checking that it
        reads back as written."""
        import numpy as np

        pending = self.path + PENDING_SUFFIX
        self._write_pending()
        digest = B.Digest()
        for first, count, body in pending_runs(self._pending_fd, self.n, pending, digest):
            z = np.frombuffer(body[:count], dtype=np.uint8) != 0
            h = np.frombuffer(body[count:], dtype=np.uint8).reshape(count, 16)
            self._apply(first, h, z)
        if digest.digest() != self._pending_digest.digest():
            raise FormatError("signature cache side file does not read back as written",
                              path=pending, offset=0)

    def _discard_pending(self) -> None:
        self._pending_out = bytearray()
        if self._pending_fd is not None:
            os.close(self._pending_fd)
            self._pending_fd = None
        with contextlib.suppress(OSError):
            os.unlink(self.path + PENDING_SUFFIX)

    def _write_header(self, state: int, sync: bool = True) -> None:
        if state == CLEAN:
            self.generation += 1
        fields = _HEADER.pack(MAGIC, VERSION, _XXH128, state, self.block_size, self.size,
                              self.n, SEGMENT_BLOCKS, self.segments, self.table, self.end,
                              self.generation, self.cache_id, *self.target)
        with naming(self.tmp or self.path):
            os.pwrite(self.fd, fields + _xxh64(fields), 0)
            if sync:
                os.fsync(self.fd)
        self.state = state


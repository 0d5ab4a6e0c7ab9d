"""A tracked resync's pass over the changed spans, paid by the bytes that
changed, not by the address space they are scattered over.

The spans a change tracker reported are cut into batches of at most WINDOW
bytes of spans each (pydr.engine.spans.batch_spans), however far apart they
lie (up to BATCH_RANGE from the first to the last). Each batch is one
sign() of the source over all its spans (on an NBD export: one
pydr_signer_sign_spans call, every read in flight), kept in a buffer indexed
by disk offset (numpy.empty over the batch's range: only the pages read are
ever touched); the spans' blocks are gathered into one packed signature on
each side, compared once, and the records of the blocks that differ are
encoded from the kept bytes in one call and handed to the journaled writer.
Used by pydr.engine.resync.resync for a tracked cycle of a target whose size
does not change, whose signature cache (if any) is updated in place.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

from . import bindings as B
from .delta import changed_extents as extents_between, encode_buffer, write_records
from .devices import Device, MemoryDevice, blocks_for
from .parallel import check_cancel
from .signatures import Signature
from .spans import Span, batch_spans, packed_blocks, unpack_extents
from ..errors import FormatError

#: the farthest apart the first and last span of one batch may lie: bounds
#: the virtual size of the kept buffer (and 16 bytes a block of hashes) a
#: batch reserves, of which only the pages of the spans are touched
BATCH_RANGE = 4 << 30


class TrackedPass:
    """The state one tracked resync carries from batch to batch.

    Attributes:
        changed_blocks: Blocks that differed so far.
        written: (offset, length, digest of the source's blocks) of every
            extent encoded, when verify was asked (else stays empty).
        seq: The next record's sequence number.
        cached: The target's signature cache still in use (None once it
            turned out damaged, or when there was none).
        writer: The cache being updated (None once dropped).
    """

    def __init__(self, *, source: Device, target: Device, cached: Any, writer: Any,
                 block_size: int, code: int, threads: int, source_read: B.Progress,
                 target_read: B.Progress, throttle: Any, target_throttle: Any, cancel: Any,
                 check: Callable[[int], None], emit: Callable[[bytes], None],
                 drop_cache: Callable[["TrackedPass"], Any],
                 verify: bool, name: str) -> None:
        """source, target: the devices. cached: the target's trusted
        signature cache or None; writer: None or `cached` (updated in
        place). block_size, code: the signing geometry. threads: sign()'s
        threads. source_read, target_read: the Progress records of each
        side's reads. throttle, target_throttle: as sign() takes them.
        cancel: a threading.Event or None. check: called between pieces of
        encoded records (progress, cancel). emit: takes each chunk of
        encoded records. drop_cache: called with this pass when the cache
        turns out damaged (it closes and removes it); returns the writer to
        go on with.
        verify: keep what verification needs. name: the target's name for
        cancellation errors."""
        self.source, self.target = source, target
        self.cached, self.writer = cached, writer
        self.block_size, self.code, self.threads = block_size, code, threads
        self.source_read, self.target_read = source_read, target_read
        self.throttle, self.target_throttle = throttle, target_throttle
        self.cancel, self.check, self.emit = cancel, check, emit
        self.drop_cache = drop_cache
        self._encode_buf = None  # 32 MiB, made when first needed: a quiet cycle needs none
        self.verify, self.name = verify, name
        self.changed_blocks = 0
        self.seq = 0
        self.written: List[Tuple[int, int, bytes]] = []
        self._read_parts: Optional[list] = None  # the cache's (hashes, mask) of each span

    def run(self, spans: List[Span], window: int) -> None:
        """Resync the spans (sorted, merged, block aligned [start, end)
        pairs inside the disk), `window` bytes of spans at a time.

        Raises what sign() and the writer raise (OSError naming the path
        and offset, Cancelled)."""
        for batch in batch_spans(spans, self.block_size, window, max(window, BATCH_RANGE)):
            check_cancel(self.cancel, self.name)
            self._batch(batch)

    def _batch(self, batch: List[Span]) -> None:
        import numpy as np

        bs = self.block_size
        lo, hi = batch[0][0], batch[-1][1]
        n = blocks_for(hi - lo, bs)
        idx = packed_blocks(batch, lo, bs)
        keep = sparse_array(hi - lo, np.uint8)  # virtual: pages touched only where read
        src_h, src_z = sparse_array((n, 2), np.uint64), np.empty(n, np.uint8)
        with memoryview(src_h) as h, memoryview(src_z) as z:
            self.source.sign(lo, hi - lo, bs, self.code, h, z, threads=self.threads,
                             progress_record=self.source_read, throttle=self.throttle,
                             cancel=self.cancel, final_report=False, keep=keep, spans=batch)
        dst = self._target_hashes(batch, lo, hi, n, idx)
        src_hp, src_zp = src_h[idx], src_z[idx] != 0
        dst_hp, dst_zp = dst
        packed_len = sum(stop - start for start, stop in batch)
        self.check(0)
        src_sig = Signature(bs, packed_len, "xxh3-128", src_hp, src_zp)
        dst_sig = Signature(bs, packed_len, "xxh3-128", dst_hp, dst_zp)
        ext, zero = extents_between(dst_sig, src_sig)
        if len(zero):
            disk_ext, zero, packed_ext = unpack_extents(ext, zero, batch)
            digests = B.hashes_digest_ranges(dst_sig.hashes, dst_sig.block_count, bs,
                                             packed_ext)
            self.changed_blocks += int(((packed_ext[1::2] + np.uint64(bs - 1))
                                        // np.uint64(bs)).sum())
            if self.verify:
                src_d = B.hashes_digest_ranges(src_sig.hashes, src_sig.block_count, bs,
                                               packed_ext)
                self.written += [(int(disk_ext[2 * i]), int(disk_ext[2 * i + 1]),
                                  bytes(src_d[16 * i:16 * i + 16])) for i in range(len(zero))]
            # the records are made of the bytes that were hashed: the source is not read again
            with memoryview(keep) as kept, MemoryDevice(kept, lo, name=self.source.name) as mem:
                count, _, _ = write_records(mem, disk_ext, zero, digests, self.emit,
                                            first_seq=self.seq, buf=self._buffer(),
                                            check=self.check)
            self.seq += count
        if self.writer is not None:
            self._update_cache(batch, src_hp, src_zp, dst_hp, dst_zp)

    def _buffer(self) -> Any:
        if self._encode_buf is None:
            self._encode_buf = encode_buffer()
        return self._encode_buf

    def _target_hashes(self, batch: List[Span], lo: int, hi: int, n: int,
                       idx: Any) -> Tuple[Any, Any]:
        """(hashes (k, 2) uint64, zero mask bool) of the target's blocks of
        the batch, packed: from the signature cache, else read."""
        import numpy as np

        bs = self.block_size
        if self.cached is not None:
            try:
                parts = [self.cached.read(start // bs, blocks_for(stop - start, bs))
                         for start, stop in batch]
            except FormatError:  # damaged here: the target is read from now on
                self.writer = self.drop_cache(self)
                self.cached = None
            else:
                self._read_parts = parts  # what the cache update compares with
                hashes = np.frombuffer(b"".join(h for h, _ in parts), "<u8").reshape(-1, 2)
                mask = np.frombuffer(b"".join(z for _, z in parts), np.uint8) != 0
                if len(mask) == len(idx):
                    return hashes, mask
                # the cache holds fewer blocks than the spans: a bug upstream
                raise FormatError(f"signature cache holds {len(mask)} of the {len(idx)} "
                                  f"blocks of [{lo}, {hi})", path=self.cached.path, offset=lo)
        self._read_parts = None
        dst_h, dst_z = sparse_array((n, 2), np.uint64), np.empty(n, np.uint8)
        with memoryview(dst_h) as h, memoryview(dst_z) as z:
            self.target.sign(lo, hi - lo, bs, self.code, h, z, threads=self.threads,
                             progress_record=self.target_read,
                             throttle=self.target_throttle, cancel=self.cancel,
                             final_report=False, spans=batch)
        return dst_h[idx], dst_z[idx] != 0

    def _update_cache(self, batch: List[Span], src_hp: Any, src_zp: Any, dst_hp: Any,
                      dst_zp: Any) -> None:
        """Tell the cache (updated in place) the new hashes of every span
        that has a block that changed."""
        import numpy as np

        bs = self.block_size
        differ = (src_hp != dst_hp).any(axis=1) | (src_zp != dst_zp)
        if not differ.any():
            return
        at = 0
        parts = self._read_parts  # the cache's own read of each span (the writer is it)
        for i, (start, stop) in enumerate(batch):
            k = blocks_for(stop - start, bs)
            if differ[at:at + k].any():
                old = None if parts is None else (bytes(parts[i][0]), bytes(parts[i][1]))
                self.writer.update(start // bs, src_hp[at:at + k].astype("<u8").tobytes(),
                                   src_zp[at:at + k].astype(np.uint8).tobytes(), old)
            at += k


def sparse_array(shape: Any, dtype: Any) -> Any:
    """An uninitialised numpy array over an anonymous private mapping of
    its own, kept out of transparent huge pages: a batch's buffers span its
    whole address range but only the pages of its spans are touched, and
    numpy.empty asks for huge pages for large arrays, so each touch would
    fault in (and zero) 2 MiB, 512 MiB for 256 scattered 4 KiB spans. The
    mapping goes with the array."""
    import mmap
    import sys

    import numpy as np

    count = int(np.prod(shape))
    nbytes = max(1, count * np.dtype(dtype).itemsize)
    # no swap reserved for the untouched range: a small host's overcommit
    # heuristic would refuse 4 GiB of address space it will never back
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | \
        getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
    area = mmap.mmap(-1, nbytes, flags=flags)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        area.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(area, dtype=dtype, count=count).reshape(shape)


def use_tracked_pass(spans: Optional[List[Span]], src_size: int, dst_size: int, cached: Any,
                     writer: Any) -> bool:
    """Whether a resync takes the batched tracked pass: changed spans given,
    the target's size unchanged, and no new cache to fill (none, or the
    target's own updated in place)."""
    return spans is not None and src_size == dst_size and (writer is None or writer is cached)

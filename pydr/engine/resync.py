"""Local resync: make a target image equal to a source image, moving only the
blocks that differ.

Both images are compared window by window (WINDOW bytes at a time, hashed at
4 KiB on all threads), so memory stays bounded whatever their size; the
blocks that differ are encoded as delta records and written through the same
journaled :class:`pydr.apply.Applier` as ``pydr apply``, so an interrupted
resync can always be finished or rolled back. With a valid signature cache of
the target, the target is not read at all.

Each source byte is read once: a window of the source (all of it, or the
changed spans a tracker reported, merged where the gap between two is at most
MERGE_GAP, in disk order, in one call) is read into a kept buffer while it is
hashed, and the records of the blocks that differ are encoded from that
buffer (a MemoryDevice over it), never read from the source again. Memory: one
kept window (WINDOW, 64 MiB; a numpy.empty buffer, so the pages of holes and
of windows never read cost nothing) plus the 32 MiB encode buffer. A window
that is a hole on the source (Device.data_extents) and needs nothing from the
target (past its end, a hole there too, or all zero in a valid signature
cache of it) is skipped without hashing: a sparse disk costs its data.
"""

import contextlib
import os
import time

from . import bindings as B
from . import crashpoints
from . import journal as J
from .devices import (Device, FileDevice, MemoryDevice, as_device, blocks_for, disk_mode,
                      sign_range)
from .parallel import check_cancel, check_threads
from .spans import merge_spans
from .apply import Applier
from .atomic import fsync_dir
from .delta import (BATCH_BYTES, RECORD_SPLIT, changed_extents as extents_between,
                    encode_buffer, write_records)
from ..errors import BaseMismatch, DamagedJournal, FormatError, SameFile
from .progress import Record, Throttle
from .signatures import Signature
from .sigcache import CLEAN, CHANGING, SignatureCache
from .sigcache_any import load_any
from .tracked import TrackedPass, use_tracked_pass

DEFAULT_RESYNC_BLOCK = 4096
WINDOW = 64 << 20
#: changed spans closer than this are read as one: reading a small gap costs
#: less than another request (a seek, an NBD round trip)
MERGE_GAP = 64 << 10


class ResyncStats(Record):
    """What a resync of two disks on this machine did (:func:`pydr.resync`).
    Read-only.

    Attributes:
        bytes_read: Bytes pydr read, from both disks: source_bytes_read +
            target_bytes_read.
        bytes_written: Bytes of data written to the target.
        bytes_zeroed: Bytes of the target zeroed (punched or written).
        blocks_changed: Blocks that differed.
        seconds: Wall-clock time taken.
        journal_bytes: Size of the undo journal written.
        used_cache: Whether the target's signature cache was used.
        source_size: The source's size, the target's size now.
        source_bytes_read: Bytes read from the source: each byte of the
            compared range that holds data once (holes and NBD zero extents
            are not read, the records are encoded from what was hashed).
        target_bytes_read: Bytes read from the target to hash it (0 with a
            valid signature cache). Not counted: the undo journal's reads
            of the old contents of the blocks it saves before they are
            overwritten (about journal_bytes), and the read-back of
            ``verify``.
    """

    _fields = ("bytes_read", "bytes_written", "bytes_zeroed", "blocks_changed", "seconds",
               "journal_bytes", "used_cache", "source_size", "source_bytes_read",
               "target_bytes_read")
    __slots__ = _fields
    bytes_read: int
    bytes_written: int
    bytes_zeroed: int
    blocks_changed: int
    seconds: float
    journal_bytes: int
    used_cache: bool
    source_size: int
    source_bytes_read: int
    target_bytes_read: int


def check_no_lost_records(applier, cache, block_size, threads):
    """Resuming an interrupted resync: a journal cut short exactly at a
    record boundary (a lost write) looks whole, and its lost records would
    never be rolled back. The signature cache still describes the target as
    it was before the interrupted resync (it is rewritten only once a resync
    finishes), so every block that differs from it now must be covered by a
    journal record; one that is not raises DamagedJournal naming the offset.
    Costs one read of the target, only on a resume with a valid cache of
    the same geometry; without one nothing is checked."""
    import numpy as np

    dev, journal = applier.dev, applier.resumed
    if not isinstance(dev, FileDevice) or dev.fd is None:
        return  # an NBD export: its blocks are read by the resync anyway
    try:
        reader = load_any(cache)
    except (ValueError, OSError):
        return
    with reader:
        old_size, now = journal.header["old_size"], dev.size_now()
        # "being updated": the cache may describe neither the old target nor the new
        if (reader.block_size != block_size or reader.size != old_size
                or reader.state not in (CLEAN, CHANGING)):
            return
        # blocks both sizes hold whole (a short last block is hashed over its length)
        n = reader.n if now == old_size else min(now, old_size) // block_size
        if n == 0:
            return
        spans = merge_spans((r[3], r[3] + r[4]) for r in J.scan(journal.path).records)
        starts = np.array([s for s, _ in spans], dtype=np.int64)
        ends = np.array([e for _, e in spans], dtype=np.int64)
        per_window = max(1, WINDOW // block_size)  # memory: one window, not the disk
        lost, first_lost = 0, None
        for first in range(0, n, per_window):
            count = min(per_window, n - first)
            offset = first * block_size
            length = min(offset + count * block_size, now) - offset
            hashes, mask = bytearray(16 * count), bytearray(count)
            sign_range(dev.fd, applier.target, offset, length, block_size,
                       B.ALGORITHMS["xxh3-128"], hashes, mask, threads=threads,
                       progress_record=B.Progress(),
                       throttle=Throttle(None, "resync", applier.target, length))
            want, _ = reader.read(first, count)
            got = np.frombuffer(hashes, dtype=np.uint64).reshape(count, 2)
            differ = np.nonzero((got != np.frombuffer(bytes(want), dtype="<u8")
                                 .reshape(count, 2)).any(axis=1))[0]
            if not len(differ):
                continue
            # a block is covered when one record holds all of it (the old
            # target's short last block: a record reaching the old end)
            blk = differ.astype(np.int64) + first
            b0 = blk * block_size
            b1 = np.minimum(b0 + block_size, old_size)
            k = np.maximum(np.searchsorted(starts, b0, side="right") - 1, 0)
            ok = ((starts[k] <= b0) & (ends[k] >= b1)) if len(starts) else np.zeros(len(blk), bool)
            bad = blk[~ok]
            if len(bad):
                lost += len(bad)
                if first_lost is None:
                    first_lost = int(bad[0])
    if lost:
        raise DamagedJournal(
            f"undo journal is damaged: {lost} blocks of the target differ from its "
            f"signature cache (the target before the interrupted resync), the first at offset "
            f"{first_lost * block_size}, and no record of the journal holds their old "
            f"contents: records were lost (a write cut short), or the target was changed "
            f"outside pydr", path=journal.path, offset=journal.bytes)


def compare_window(src_sig, dst_sig, origin, block_size):
    """What it takes to make a window of the target equal to the same window
    of the source (Signatures of the window, starting at byte `origin`):
    (extents [offset, length] with absolute offsets, zero flags, digests of
    the target blocks they replace, blocks changed), or None if equal."""
    import numpy as np

    ext, zero = extents_between(dst_sig, src_sig)
    if not len(zero):
        return None
    digests = B.hashes_digest_ranges(dst_sig.hashes, dst_sig.block_count, block_size, ext)
    bs = np.uint64(block_size)
    blocks = int(((ext[1::2] + bs - np.uint64(1)) // bs).sum())
    ext = ext.copy()
    ext[0::2] += np.uint64(origin)  # offsets only: ext is [offset, length] pairs
    return ext, zero, digests, blocks


def _coalesce(ranges, block_size, limit):
    """Block-aligned, sorted, merged [start, end) pairs within [0, limit)."""
    spans = []
    for off, length in ranges:
        start = max(0, int(off)) // block_size * block_size
        end = min(limit, -(-(int(off) + int(length)) // block_size) * block_size)
        if end > start:
            spans.append([start, end])
    return merge_spans(spans)



def _windows(size, spans=None):
    """The (w0, w1) windows a resync walks: the WINDOW grid over [0, size),
    or, given `spans` (sorted, merged, block-aligned [start, end) pairs),
    only the grid cells that hold some, each from its first span's start to
    its last span's end (a span across a cell's end is cut there): block
    aligned, never longer than WINDOW, the same spans inside."""
    if spans is None:
        for w0 in range(0, size, WINDOW):
            yield w0, min(size, w0 + WINDOW)
        return
    cells = {}
    for s0, s1 in spans:
        cell = s0 // WINDOW
        while cell * WINDOW < min(s1, size):
            lo, hi = max(s0, cell * WINDOW), min(s1, (cell + 1) * WINDOW, size)
            if cell in cells:
                cells[cell][1] = max(cells[cell][1], hi)
            else:
                cells[cell] = [lo, hi]
            cell += 1
    for cell in sorted(cells):
        yield tuple(cells[cell])


def encode_kept(keep, w0, w1, name, extents, zero, digests, emit, *, first_seq, buf,
                check=None):
    """write_records of the window [w0, w1) of a source from `keep`, the
    buffer its signing kept (sign(keep=...)): the records are made of the
    bytes that were hashed, and the source is not read again. `name` (the
    source's) names a read outside the window, a bug. Returns what
    write_records returns."""
    with memoryview(keep) as kept, MemoryDevice(kept[:w1 - w0], w0, name=name) as window:
        return write_records(window, extents, zero, digests, emit, first_seq=first_seq,
                             buf=buf, check=check)


def _known_zero(cache, first, count):
    """Whether the signature cache knows blocks [first, first+count) of the
    target are all zero."""
    try:
        return cache.all_zero(first, count)
    except FormatError:
        return False  # damaged: the window is compared, and its read of the cache says so


def _both_holes(source, target, cache, w0, w1, d1, block_size):
    """Whether the window [w0, w1) is a hole on the source and needs nothing
    from the target: past the target's end, or a hole there too (its own
    SEEK_DATA, or all zero in a valid signature cache). Costs no data read:
    a sparse disk's windows of holes are neither hashed nor compared."""
    if d1 == w0:
        pass  # past the target's end: a hole of the source stays a hole
    elif d1 != w1:
        return False  # the target's end falls inside the window: compare it
    elif cache is not None:
        if not _known_zero(cache, w0 // block_size, blocks_for(w1 - w0, block_size)):
            return False
    elif target.data_extents(w0, w1 - w0):
        return False
    return not source.data_extents(w0, w1 - w0)


def _zero_window(length, block_size, code):
    """(hashes, zero mask) of `length` bytes of zeros, as signing gives
    them: the last block may be short, and is hashed over its length."""
    import numpy as np

    n = blocks_for(length, block_size)
    hashes = np.tile(np.array(B.hash_bytes(code, bytes(block_size)), np.uint64), (n, 1))
    tail = length - (n - 1) * block_size
    if tail != block_size:
        hashes[-1] = B.hash_bytes(code, bytes(tail))
    return bytes(hashes.tobytes()), bytes(b"\1" * n)



def resync(src, dst, *, block_size=DEFAULT_RESYNC_BLOCK, signature_cache=None,
           changed_extents=None, verify=False, threads=None, progress=None, cancel=None,
           keep_undo=None):
    """Make `dst` byte-identical to `src`; returns ResyncStats. Each is a
    path (a file or block device) or an open device (pydr.engine.devices: an
    NBD export). A missing `dst` file is created (and removed again if the
    first resync fails).

    ``signature_cache``: a signature file of the target at ``block_size``,
    used instead of reading the target when it is valid, newer than the
    target and bound to the target as the resync that wrote it left it (its
    device, inode, size and mtime), and rewritten after every resync. pydr
    must be the target's only writer: a write by another within the same
    timestamp tick as a resync's end changes none of these and goes unseen. ``changed_extents``: (offset,
    length) byte ranges of the source that may have changed (from a change
    tracker); only those are compared. ``verify`` reads back every written
    range and compares hashes before the resync is committed. ``keep_undo``:
    a path where the committed undo journal is kept (the reverse delta that
    turns the new target back into the old one) instead of being deleted.

    ``progress`` gets ProgressRecords ("resync", done_bytes: the source
    compared so far; read_bytes: read from both disks so far; the records are
    encoded from what was read, not read again).
    A set ``cancel`` event stops the resync within about CANCEL_BYTES of
    I/O per thread (pydr.engine.parallel) and raises Cancelled; the target is
    then left as a killed resync leaves it: what was written is journaled,
    and running the same resync again finishes it (or ``pydr rollback``
    undoes it). Cancelled before anything was written, a target created by
    this resync is removed again.
    """
    import numpy as np

    start = time.monotonic()
    B.check_block_size(block_size)
    threads = check_threads(threads)
    code = B.ALGORITHMS["xxh3-128"]
    if not isinstance(src, Device) and not isinstance(dst, Device) and os.path.exists(dst) \
            and os.path.samefile(src, dst):
        raise SameFile("source and target are the same file", path=os.fspath(dst))
    J.check_no_unfinished_apply(src)
    source = as_device(src)
    writer = cached = None
    try:
        src_size = source.size_now()
        applier = Applier(dst, block_size=block_size, base_size=None, result_size=src_size,
                          kind=J.KIND_RESYNC, create=True, mode=disk_mode(source), cancel=cancel)
        with applier:
            dst_size = applier.base_size  # what the target holds now
            if applier.resumed is not None and signature_cache is not None:
                check_no_lost_records(applier, signature_cache, block_size, threads)
            # a cache of the target it can trust, marked "target being changed" until commit
            cached = None if signature_cache is None else SignatureCache.open(
                signature_cache, block_size=block_size, size=dst_size,
                trusted=applier.dev.cache_trusted, target=applier.dev.cache_identity())
            writer = None
            if signature_cache is not None and cached is None:
                # one this cycle cannot trust (left "target being changed" by an older
                # cycle, say) goes, durably, before the target is written: else a later
                # resume would take it for the target before this cycle's journal
                _remove_cache(signature_cache)
            if cached is not None and src_size == dst_size:
                writer = cached  # updated in place: only the windows compared
            elif signature_cache is not None and (changed_extents is None or cached is not None):
                # (with only the changed ranges compared and no cache, nothing would
                # describe the rest of the target: no cache is written)
                writer = SignatureCache.create(signature_cache, block_size=block_size,
                                               size=src_size)
            if changed_extents is not None:
                spans = _coalesce(changed_extents, block_size, src_size)
                if dst_size != src_size:
                    lo = min(dst_size, src_size) // block_size * block_size
                    spans = _coalesce([(s, e - s) for s, e in spans] + [(lo, src_size - lo)],
                                      block_size, src_size)
            else:
                spans = None
            total = src_size if spans is None else sum(e - s for s, e in spans)
            throttle = Throttle(progress, "resync", applier.target, total)
            shared = B.Progress()
            dst_read = B.Progress()
            seq = [0]
            encode_buf = None  # 32 MiB, made when first needed: a quiet cycle needs none
            keep = None  # the window as read from the source, made when first needed
            zero_windows = {}  # window length -> (hashes, mask) of zeros, for the cache
            pending = _Batcher(applier)
            changed_blocks = 0
            written = []  # (offset, length, digest) for verify
            span_i = 0

            def read_so_far():  # both sides, as read while signing
                return shared.read + dst_read.read

            # while the target is signed (slow: an NBD export, a remote disk)
            # the resync's own record goes on being reported
            target_throttle = _Reporting(throttle, lambda: (shared.done, read_so_far()))

            def check(data_bytes):
                # every piece of records encoded: progress, and a set cancel
                # stops before the next piece
                throttle.report(shared.done, read_so_far())
                check_cancel(cancel, applier.target)

            # a tracked cycle that updates its cache in place (or keeps none) visits
            # only the changed spans: each window shrunk to them (not 64 MiB of cache
            # read and compared for one changed block)
            shaped = spans is not None and (writer is None or writer is cached)
            if use_tracked_pass(spans, src_size, dst_size, cached, writer):
                # the changed spans batched by the bytes they hold: the windows
                # below are not walked at all
                tracked = TrackedPass(
                    source=source, target=applier.dev, cached=cached, writer=writer,
                    block_size=block_size, code=code, threads=threads, source_read=shared,
                    target_read=dst_read, throttle=throttle, target_throttle=target_throttle,
                    cancel=cancel, check=check, emit=pending.add, verify=verify,
                    drop_cache=lambda p: _without_cache(p.cached, p.writer, True,
                                                        signature_cache),
                    name=applier.target)
                tracked.run(merge_spans(spans, MERGE_GAP), WINDOW)
                cached, writer = tracked.cached, tracked.writer
                changed_blocks, seq[0], written = (tracked.changed_blocks, tracked.seq,
                                                   tracked.written)
                spans_done = True
            else:
                spans_done = False
            for w0, w1 in (() if spans_done else _windows(src_size, spans if shaped else None)):
                check_cancel(cancel, applier.target)
                if spans is None:
                    subs = [(w0, w1)]
                else:  # the parts of the changed spans inside this window
                    while span_i < len(spans) and spans[span_i][1] <= w0:
                        span_i += 1
                    subs, k = [], span_i
                    while k < len(spans) and spans[k][0] < w1:
                        subs.append((max(w0, spans[k][0]), min(w1, spans[k][1])))
                        k += 1
                    if not subs and (writer is None or writer is cached):
                        continue
                    subs = merge_spans(subs, MERGE_GAP)
                # one signature pair for the whole window: blocks outside the
                # changed spans get the target's hashes on both sides (so they
                # compare equal), and the window is compared and encoded in one
                # pass however many short spans a tracker reported
                n = blocks_for(w1 - w0, block_size)
                # whole blocks of the target: where it is longer than the source,
                # its block at the source's end is hashed over its full length,
                # as apply reads it
                d1 = min(dst_size, -(-w1 // block_size) * block_size) if w0 < dst_size else w0
                m = blocks_for(d1 - w0, block_size)
                skipped = False
                if subs and _both_holes(source, applier.dev, cached, w0, w1, d1, block_size):
                    # nothing to read on either side: equal (a source hole past
                    # the target's end is left a hole), hashed as zeros
                    subs, skipped = [], True
                    if writer is not None and writer is not cached:
                        # the same for every full window: made once
                        if w1 - w0 not in zero_windows:
                            zero_windows[w1 - w0] = _zero_window(w1 - w0, block_size, code)
                        src_h, src_z = zero_windows[w1 - w0]
                else:
                    try:
                        cache_window = cached and cached.read(w0 // block_size, m)
                    except FormatError:  # damaged here: the target is read from now on
                        writer = _without_cache(cached, writer, spans is not None,
                                                signature_cache)
                        cached = cache_window = None
                    if cached is not None:
                        dst_h, dst_z = cache_window
                        dst_h += bytes(16 * m - len(dst_h))
                        dst_z = bytearray(dst_z) + bytes(m - len(dst_z))
                    else:
                        dst_h, dst_z = bytearray(16 * m), bytearray(m)
                    k = min(n, m)
                    src_h = bytearray(dst_h[:16 * k]) + bytes(16 * (n - k))
                    src_z = bytearray(dst_z[:k]) + bytes(n - k)
                if subs:
                    if keep is None:
                        keep = np.empty(WINDOW, np.uint8)  # pages touched only where read
                    with memoryview(src_h) as h, memoryview(src_z) as z:
                        source.sign(w0, w1 - w0, block_size, code, h, z, threads=threads,
                                    progress_record=shared, throttle=throttle, cancel=cancel,
                                    final_report=False, keep=keep,
                                    spans=None if spans is None else subs)
                    t_subs = [(s0, min(d1, -(-s1 // block_size) * block_size))
                              for s0, s1 in subs if s0 < d1]
                    if cached is None and t_subs:
                        with memoryview(dst_h) as h, memoryview(dst_z) as z:
                            applier.dev.sign(w0, d1 - w0, block_size, code, h, z,
                                             threads=threads, progress_record=dst_read,
                                             throttle=target_throttle, cancel=cancel,
                                             final_report=False,
                                             spans=None if spans is None else t_subs)
                    throttle.report(shared.done, read_so_far())
                    check_cancel(cancel, applier.target)
                cmp = None
                if subs:
                    src_sig = Signature(block_size, w1 - w0, "xxh3-128", src_h, src_z)
                    dst_sig = Signature(block_size, d1 - w0, "xxh3-128", dst_h, dst_z)
                    cmp = compare_window(src_sig, dst_sig, w0, block_size)
                if cmp:
                    ext, zero, digests, blocks = cmp
                    changed_blocks += blocks
                    if verify:
                        rel = ext.copy()
                        rel[0::2] -= np.uint64(w0)
                        src_d = B.hashes_digest_ranges(src_sig.hashes, n, block_size, rel)
                        written += [(int(ext[2 * i]), int(ext[2 * i + 1]),
                                     bytes(src_d[16 * i:16 * i + 16])) for i in range(len(zero))]
                    if encode_buf is None:
                        encode_buf = encode_buffer()
                    # the records are encoded from the bytes that were hashed
                    # (kept while signing): the source is not read again, and
                    # src_h (the signature cache's source) is what the target gets
                    count, _, _ = encode_kept(keep, w0, w1, source.name, ext, zero, digests,
                                              pending.add, first_seq=seq[0], buf=encode_buf,
                                              check=check)
                    seq[0] += count
                if writer is not None and not (skipped and writer is cached):
                    # (a skipped window the cache knows is zero stays as it is)
                    writer.update(w0 // block_size, src_h, src_z)
            check_cancel(cancel, applier.target)
            pending.flush()
            applier.drain()
            check_cancel(cancel, applier.target)  # the writer may have dropped batches
            if verify:
                _verify_written(applier, written, block_size)
            applier.finish(keep_journal=keep_undo)
            bound = writer and applier.dev.cache_identity()  # the target as this cycle left it
        st = applier.state
        used_cache = cached is not None
        if writer is not None:
            if cached is not None and writer is not cached:
                # the old cache is closed before the new one is renamed over it: a
                # file system that keeps a file replaced while open (FUSE's
                # .fuse_hidden) would otherwise keep it, and a power cut leaves it
                cached.close()
                cached = None
            writer.commit(bound)  # after the target is durable: never runs ahead of it
            if writer is not cached:
                writer.close()  # a new cache's file: closed here, not left to the exit
            crashpoints.reached("resync.cache")
        source_read, target_read = int(shared.read), int(dst_read.read)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if source is not src:
            source.close()
        if cached is not None:
            cached.close()
    throttle.report(total, read_so_far(), finished=True)
    return ResyncStats(source_read + target_read, int(st.data_bytes), int(st.zero_bytes),
                       changed_blocks, time.monotonic() - start, applier.journal.bytes,
                       used_cache, src_size, source_read, target_read)


def _without_cache(cached, writer, tracked, path):
    """The signature cache read mid-cycle turned out damaged (each segment
    is checked when read): it is closed and removed, and the cycle goes on
    reading the target. Returns the cache writer to go on with: a new cache
    of an untracked cycle (every window is compared, so it can still be
    made whole), else None (nothing would describe the windows passed)."""
    keep = writer if writer is not cached and not tracked else None
    if writer is not None and writer is not keep and writer is not cached:
        writer.abort()
    cached.abort()
    _remove_cache(path)  # a new cache (keep) replaces it only at commit
    return keep


def _remove_cache(path):
    """Remove the signature cache at `path` durably (nothing there: nothing
    to do). Raises OSError when it cannot: the cycle must not write the
    target while a cache nothing may trust is left in place."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(os.fspath(path))


#: a chunk of records this long filled the encode buffer as far as whole
#: records go (seven of 4 MiB in 32 MiB): a batch by itself, not merged with
#: the next into one twice as long, which the writer would finish after a cancel
FULL_BATCH = BATCH_BYTES - B.RECORD_HEADER - RECORD_SPLIT


class _Reporting:
    """A throttle for a part of the work (signing the target) that reports
    the whole operation's progress instead of the part's counters."""

    def __init__(self, throttle, counters):
        self.throttle, self.counters, self.path = throttle, counters, throttle.path

    def report(self, done, read, finished=False):
        if not finished:
            self.throttle.report(*self.counters())


class _Batcher:
    """Gathers the records of many small changed spans into batches of about
    BATCH_BYTES: each batch costs one durable journal write, so a tracker's
    thousands of short extents must not each pay for one."""

    def __init__(self, applier):
        self.applier = applier
        self.buf = bytearray()
        self.bound = self.count = 0

    def add(self, chunk):
        _, count, bound, _ = B.records_scan(chunk)
        if not self.buf and len(chunk) >= FULL_BATCH:  # a full batch already
            self.applier.submit(chunk, bound, count)
            return
        self.buf += chunk
        self.bound += bound
        self.count += count
        if len(self.buf) >= FULL_BATCH:
            self.flush()

    def flush(self):
        if self.count:
            self.applier.submit(self.buf, self.bound, self.count)
        self.buf = bytearray()
        self.bound = self.count = 0


def _verify_written(applier, written, block_size):
    for off, length, digest in written:
        data = applier.dev.pread(length, off)
        got = B.blocks_digest(data, block_size)
        if got[0].to_bytes(8, "little") + got[1].to_bytes(8, "little") != digest:
            raise BaseMismatch("read-back verification failed: the target does not hold what was "
                               "written", path=applier.target, offset=off)

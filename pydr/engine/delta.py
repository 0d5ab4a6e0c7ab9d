"""Delta format v1 (docs/FORMAT.md) and making deltas.

A delta turns a base image into a result image. It is written and read in
one pass (pipes and ssh work): a 96-byte header, DATA/ZERO records in
increasing offset order, each with its own checksum and the hash of the base
blocks it replaces, then an END record with the counts and a checksum of the
whole stream.
"""

import os
import struct
import sys
import time

from . import bindings as B
from .atomic import atomic_write
from .contentid import identity
from .devices import Device, using_device
from .parallel import CANCEL_BYTES, check_cancel
from ..errors import CorruptDelta, IncompatibleSignatures, SameFile
from .progress import Record
from .signatures import Signature, signature

MAGIC = b"PYDRDLT\x00"
VERSION = 1
# magic, version, flags, block_size, base_size, result_size, base_id, result_id, reserved
_HEADER = struct.Struct("<8sHHIQQ16s16s24s")
HEADER_SIZE = _HEADER.size + 8  # 96 with its xxh3-64 checksum

#: Records are cut at this many bytes, so that a batch journals and applies
#: in bounded memory whatever the extent.
RECORD_SPLIT = 4 << 20
#: Bytes of records encoded per call into the C core.
BATCH_BYTES = 32 << 20
DEFAULT_DELTA_BLOCK = 4096


class DeltaHeader(Record):
    _fields = ("block_size", "base_size", "result_size", "base_id", "result_id")
    __slots__ = _fields

    def pack(self):
        fields = _HEADER.pack(MAGIC, VERSION, 0, self.block_size, self.base_size,
                              self.result_size, self.base_id, self.result_id, bytes(24))
        return fields + struct.pack("<Q", B.hash_bytes(B.ALGORITHMS["xxh3-64"], fields)[0])

    @classmethod
    def parse(cls, raw, path):
        if len(raw) == 0:
            raise CorruptDelta("empty input, not a pydr delta", path=path, offset=0)
        if raw[:8] != MAGIC[:min(8, len(raw))]:
            raise CorruptDelta("not a pydr delta (bad magic)", path=path, offset=0)
        if len(raw) < HEADER_SIZE:
            raise CorruptDelta("delta header truncated", path=path, offset=len(raw))
        fields = raw[:_HEADER.size]
        if struct.unpack_from("<Q", raw, _HEADER.size)[0] != B.hash_bytes(B.ALGORITHMS["xxh3-64"], fields)[0]:
            raise CorruptDelta("delta header checksum mismatch: the delta is corrupt", path=path, offset=0)
        _, version, flags, bs, base, result, base_id, result_id, _ = _HEADER.unpack(fields)
        if version != VERSION:
            raise CorruptDelta(f"delta format version {version} is not supported (this pydr reads 1)",
                               path=path, offset=8)
        try:
            B.check_block_size(bs)
        except ValueError as exc:
            raise CorruptDelta(str(exc), path=path, offset=12) from None
        if flags or base > 1 << 62 or result > 1 << 62:
            raise CorruptDelta("inconsistent delta header", path=path, offset=10)
        return cls(bs, base, result, base_id, result_id)


class DeltaStats(Record):
    """What a delta holds (:func:`pydr.make_delta`). Read-only.

    Attributes:
        records: DATA and ZERO records written.
        data_bytes: Bytes of data carried (DATA payload).
        zero_bytes: Bytes the ZERO records zero.
        delta_bytes: The delta's size in bytes.
        seconds: Wall-clock time taken.
    """

    _fields = ("records", "data_bytes", "zero_bytes", "delta_bytes", "seconds")
    __slots__ = _fields
    records: int
    data_bytes: int
    zero_bytes: int
    delta_bytes: int
    seconds: float


def changed_extents(base, source):
    """(extents uint64 (k*2,), zero flags uint8 (k,)) for the records of a
    delta from `base` to `source` (both Signatures, same block size).

    Runs of changed blocks of equal zero-ness, cut at RECORD_SPLIT; zero
    blocks wholly past the base's end are left out (growth leaves holes)."""
    import numpy as np

    bs = source.block_size
    n = source.block_count
    changed = base.changed_blocks(source)[:n].copy()
    zero = source.zero_mask[:n]
    first_beyond = -(-base.size // bs)  # blocks at or past this lie past the base's end
    if first_beyond < n:
        changed[first_beyond:] &= ~zero[first_beyond:]
    idx = np.flatnonzero(changed)
    if len(idx) == 0:
        return np.empty(0, np.uint64), np.empty(0, np.uint8)
    # a new run starts where blocks are not consecutive or zero-ness flips
    breaks = np.ones(len(idx), dtype=bool)
    breaks[1:] = (np.diff(idx) != 1) | (zero[idx[1:]] != zero[idx[:-1]])
    per = max(1, RECORD_SPLIT // bs)
    run_id = np.cumsum(breaks) - 1
    run_start = idx[breaks]
    pos_in_run = idx - run_start[run_id]
    breaks |= (pos_in_run % per) == 0
    starts = idx[breaks]
    ends = np.append(idx[np.flatnonzero(breaks)[1:] - 1], idx[-1]) + 1
    offsets = starts.astype(np.uint64) * np.uint64(bs)
    lengths = np.minimum(ends.astype(np.uint64) * np.uint64(bs), np.uint64(source.size)) - offsets
    extents = np.empty(2 * len(starts), np.uint64)
    extents[0::2], extents[1::2] = offsets, lengths
    return extents, zero[starts].astype(np.uint8)


def encode_buffer():
    """A buffer for write_records; reuse it across calls (allocating and
    faulting in 32 MiB per call costs more than encoding). An anonymous
    mapping: zeros, as a bytearray, but a page costs only once it is written
    (a bytearray wrote all 32 MiB: ~45 ms of a cycle that encodes 8 KiB)."""
    import mmap

    return mmap.mmap(-1, max(BATCH_BYTES, B.RECORD_HEADER + RECORD_SPLIT))


def write_records(source, extents, zero, base_digests, emit, first_seq=0, buf=None,
                  read_hashes=None, check=None):
    """Encode extents of the source (a device, pydr.engine.devices) into
    records, BATCH_BYTES at a time,
    calling emit(buffer) for each batch. Returns (records, data, zero) bytes.

    read_hashes=(block_size, array, first_block): the XXH3-128 of every DATA
    block as it was read is stored into `array` (shape (n, 2)) at its block
    index minus first_block, so a signature cache describes what the target
    received even if the source changed after it was signed.

    check(data_bytes): called after every piece of about CANCEL_BYTES read
    (a batch is filled in pieces), with the DATA bytes encoded so far; it
    reports progress and may raise (Cancelled) to stop within one piece."""
    import numpy as np

    if buf is None:
        buf = encode_buffer()
    bs = read_hashes[0] if read_hashes else 0
    hbuf = np.empty(2 * (len(buf) // max(bs, 1) + 2 * len(zero) + 2),
                    np.uint64) if read_hashes else None
    base_digests = np.frombuffer(base_digests, dtype=np.uint64)  # 2 words per extent
    k = len(zero)
    done_total = 0
    data_bytes = zero_bytes = 0
    lengths = extents[1::2]
    piece = max(CANCEL_BYTES, B.RECORD_HEADER + RECORD_SPLIT)
    while done_total < k:
        used = 0
        while done_total < k:
            cap = min(len(buf) - used, piece)
            with memoryview(buf) as whole, whole[used:used + cap] as out:
                n, done, hwords = source.encode(
                    extents[2 * done_total:], zero[done_total:], base_digests[2 * done_total:],
                    first_seq + done_total, out, block_size=bs, payload_hashes=hbuf)
            if done == 0:
                if used:
                    break  # the batch is full
                if cap < len(buf):
                    piece = len(buf)  # a record larger than a piece: whole batches then
                    continue
                raise AssertionError("a record larger than the encode buffer")
            if read_hashes:
                seg_ext = extents[2 * done_total:2 * (done_total + done)]
                data = ~zero[done_total:done_total + done].astype(bool)
                starts = (seg_ext[0::2][data] // np.uint64(bs)).astype(np.int64) - read_hashes[2]
                counts = -(-seg_ext[1::2][data].astype(np.int64) // bs)
                if int(counts.sum()) * 2 != hwords:
                    raise AssertionError("payload hash count does not match the extents")
                idx = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + \
                    np.arange(int(counts.sum()))
                read_hashes[1][idx] = hbuf[:hwords].reshape(-1, 2)
            used += n
            seg = slice(done_total, done_total + done)
            z = zero[seg].astype(bool)
            data_bytes += int(lengths[seg][~z].sum())
            zero_bytes += int(lengths[seg][z].sum())
            done_total += done
            if check is not None:
                check(data_bytes)
        with memoryview(buf) as whole, whole[:used] as view:
            emit(view)
    return k, data_bytes, zero_bytes


def make_delta(source, out, *, against=None, target=None, block_size=DEFAULT_DELTA_BLOCK,
               threads=None, progress=None, cancel=None):
    """Write a delta that turns the base into `source`.

    The base is given by its signature (`against`: a Signature or a signature
    file; its block size is used) or as an image (`target`: signed here).
    `out` is a path, "-" for stdout, or a binary file object. Returns
    DeltaStats. A set ``cancel`` event stops it within about CANCEL_BYTES
    read (signing or encoding) with Cancelled; a file `out` is then not
    written at all."""
    if (against is None) == (target is None):
        raise ValueError("give exactly one of against= (a signature) or target= (an image)")
    start = time.monotonic()
    if target is not None:
        if not isinstance(source, Device) and not isinstance(target, Device) \
                and os.path.exists(target) and os.path.exists(source) \
                and os.path.samefile(source, target):
            raise SameFile("source and target are the same file", path=os.fspath(target))
        base = signature(target, block_size=block_size, threads=threads, cancel=cancel)
    else:
        base = against if isinstance(against, Signature) else Signature.load(against)
    if base.algorithm != "xxh3-128":
        raise IncompatibleSignatures(
            "a delta needs an xxh3-128 signature of the base (sign it with --algorithm xxh3-128)",
            path=None if isinstance(against, Signature) else against)
    src = signature(source, block_size=base.block_size, threads=threads, progress=progress,
                    cancel=cancel)
    extents, zero = changed_extents(base, src)
    base_digests = B.hashes_digest_ranges(base.hashes, base.block_count, base.block_size, extents)
    header = DeltaHeader(base.block_size, base.size, src.size, identity(base), identity(src))

    def write_to(f):
        digest = B.Digest()
        total = [0]

        def emit(chunk):
            digest.update(chunk)
            f.write(chunk)
            total[0] += len(chunk)

        emit(header.pack())
        with using_device(source) as dev:
            records, data, zeros = write_records(dev, extents, zero, base_digests, emit,
                                                 check=lambda _: check_cancel(cancel, dev.name))
        low, high = struct.unpack("<QQ", digest.digest())
        f.write(B.record_build(B.END, offset=zeros, length=data, base_hash=(low, high),
                               seq=records))
        total[0] += B.RECORD_HEADER
        return DeltaStats(records, data, zeros, total[0], time.monotonic() - start)

    if hasattr(out, "write"):
        return write_to(out)
    if os.fspath(out) == "-":
        stats = write_to(sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return stats
    with atomic_write(out) as f:
        return write_to(f)

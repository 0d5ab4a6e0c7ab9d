"""Spans of a range to sign: checked, clipped, and cut into units of work.

A span is an absolute (start, end) byte pair; the spans of one sign() call
lie inside its range [offset, offset + length), sorted and disjoint, start
block aligned, end block aligned or the range's end (a short last block
only where the disk ends). The C core takes them as (start, length) pairs
(pydr_signer_sign_spans); these helpers turn one into the other.
"""

from __future__ import annotations

from array import array
from typing import Any, Iterable, List, Optional, Sequence, Tuple

Span = Tuple[int, int]


def check_spans(spans: Optional[Sequence[Span]], offset: int, length: int,
                block_size: int, name: Optional[str] = None) -> List[Span]:
    """The spans of a sign() of [offset, offset + length) as a list of
    (start, end) pairs, the whole range when `spans` is None; empty spans
    are dropped.

    Raises ValueError, naming `name` and the offset, for a span that is not
    inside the range, not block aligned (an end may be short only at the
    range's end), or not after the one before it."""
    end = offset + length
    if spans is None:
        return [(offset, end)] if length else []
    result = []
    previous = offset
    for start, stop in spans:
        start, stop = int(start), int(stop)
        if stop == start:
            continue
        if not (previous <= start < stop <= end) or (start - offset) % block_size or \
                ((stop - offset) % block_size and stop != end):
            raise ValueError(
                f"{name}: span [{start}, {stop}) refused at offset {start}: spans must be "
                f"sorted, disjoint, block aligned ({block_size}) and inside [{offset}, {end})")
        result.append((start, stop))
        previous = stop
    return result


def cut_units(spans: Sequence[Span], block_size: int, unit_bytes: int) -> List[List[Span]]:
    """The spans cut into units of at most about `unit_bytes` bytes of spans
    each (a span longer than that is split at a block boundary), in disk
    order: the work one thread takes at a time."""
    unit_bytes = max(block_size, unit_bytes // block_size * block_size)
    units: List[List[Span]] = []
    current: List[Span] = []
    size = 0
    for start, stop in spans:
        while start < stop:
            take = min(stop - start, unit_bytes - size)
            if take < stop - start:  # split inside the span: at a block boundary
                take = min(stop - start, max(block_size, take // block_size * block_size))
            current.append((start, start + take))
            size += take
            start += take
            if size >= unit_bytes:
                units.append(current)
                current, size = [], 0
    if current:
        units.append(current)
    return units


def as_pairs(spans: Sequence[Span]) -> "array[int]":
    """(start, end) spans as the flat uint64 (start, length) pairs the core
    takes."""
    return array("Q", [v for start, stop in spans for v in (start, stop - start)])


def merge_spans(pairs: Iterable[Span], gap: int = 0) -> List[Span]:
    """The (start, end) pairs sorted, with those that overlap, touch or lie
    at most `gap` bytes apart made one (the gap between them then read too:
    fewer, longer reads)."""
    merged: List[Span] = []
    for start, end in sorted(pairs):
        if merged and start - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def batch_spans(spans: Sequence[Span], block_size: int, batch_bytes: int,
                max_range: int) -> List[List[Span]]:
    """The spans (sorted, disjoint, block aligned) cut into batches in disk
    order: each holds at most about `batch_bytes` bytes of spans (a span
    is split, at a block boundary, only when it is longer than that) and reaches at most `max_range`
    bytes from its first span's start to its last span's end, however far
    apart its spans lie: the work of one resync pass (one read call, one
    compare, one encode), paid by the bytes that changed, not by the
    address space between them. `max_range` >= `batch_bytes`."""
    batches: List[List[Span]] = []
    held = 0  # bytes of spans in the last batch
    for span in spans:
        # a span is split only when it is longer than a batch by itself
        pieces = [span] if span[1] - span[0] <= batch_bytes else \
            [p for unit in cut_units([span], block_size, batch_bytes) for p in unit]
        for start, stop in pieces:
            if (not batches or held + stop - start > batch_bytes
                    or stop - batches[-1][0][0] > max_range):
                batches.append([])
                held = 0
            batches[-1].append((start, stop))
            held += stop - start
    return batches


def packed_blocks(spans: Sequence[Span], origin: int, block_size: int) -> "Any":
    """The block numbers (relative to `origin`, block aligned) of the
    blocks the spans cover, in order: a numpy int64 array indexing
    signatures of the range from `origin`, to gather the spans' blocks into
    one packed signature."""
    import numpy as np

    parts = [np.arange((start - origin) // block_size, -(-(stop - origin) // block_size),
                       dtype=np.int64) for start, stop in spans]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def unpack_extents(ext: Any, zero: Any, spans: Sequence[Span]) -> Tuple[Any, Any, Any]:
    """Extents found comparing packed signatures of the spans (the spans'
    bytes laid end to end from 0): [offset, length] uint64 pairs and their
    zero flags. An extent across the end of one span is cut there. Returns
    (extents at their disk offsets, zero flags, the same extents packed),
    one entry each per piece."""
    import bisect

    import numpy as np

    starts, cum = [], [0]
    for start, stop in spans:
        starts.append(start)
        cum.append(cum[-1] + stop - start)
    disk, packed, flags = [], [], []
    pairs = ext.tolist()
    for i, z in enumerate(zero.tolist()):
        pos, end = pairs[2 * i], pairs[2 * i] + pairs[2 * i + 1]
        while pos < end:
            k = bisect.bisect_right(cum, pos) - 1
            piece = min(end, cum[k + 1]) - pos
            disk += (starts[k] + pos - cum[k], piece)
            packed += (pos, piece)
            flags.append(z)
            pos += piece
    return (np.array(disk, dtype=np.uint64), np.array(flags, dtype=zero.dtype),
            np.array(packed, dtype=np.uint64))

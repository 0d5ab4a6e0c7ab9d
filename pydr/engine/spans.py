"""Spans of a range to sign: checked, clipped, and cut into units of work.

A span is an absolute (start, end) byte pair; the spans of one sign() call
lie inside its range [offset, offset + length), sorted and disjoint, start
block aligned, end block aligned or the range's end (a short last block
only where the disk ends). The C core takes them as (start, length) pairs
(pydr_signer_sign_spans); these helpers turn one into the other.
"""

from __future__ import annotations

from array import array
from typing import Iterable, List, Optional, Sequence, Tuple

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

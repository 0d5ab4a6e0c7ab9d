"""Merging two committed undo journals (recovery-point steps) into one.

Undo step `older` takes a disk from the state its cycle made back to the
state before; step `newer` (the next cycle's) takes the disk from the state
it made back to the state `older` made. When no point needs that middle
state any more (retention thinned it: pydr.dr.stepmerge), the two become
one committed journal that takes the disk from `newer`'s state straight
back to the state before `older`: for every byte, `older`'s old contents
where it has a record for it, else `newer`'s. Rolling the merged journal
back is rolling back `newer` then `older` (docs/FORMAT.md, "Merged steps").

The work is in proportion to the two journals, never the disk: each record
is read once, its payload checked against its hash, and the parts of it no
earlier record covers are written out. The result is an ordinary committed
undo journal (journal.check_step passes) whose records do not overlap.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from dataclasses import dataclass
from typing import BinaryIO, Dict, List, Sequence, Tuple

from . import bindings as B
from . import journal as J
from .atomic import fsync_dir
from ..errors import DamagedJournal, UnsupportedFile

#: bytes of records gathered before they are appended (and made durable)
_FLUSH = 8 << 20


class NotMergeable(UnsupportedFile):
    """The two steps cannot be made one exactly (different block sizes, or
    sizes that do not follow each other): the caller keeps them both."""


@dataclass(frozen=True)
class Merged:
    """A merged step as written.

    path: the committed journal written.
    bytes: its size before the COMMIT record (what the vault records for a step).
    records: how many DATA and ZERO records it holds.
    header: its header (kind, block_size, old_size, new_size, base_id, result_id).
    """

    path: str
    bytes: int
    records: int
    header: Dict[str, object]


class _Covered:
    """Disjoint byte ranges [start, end), sorted: what the records taken so
    far already give the merged journal."""

    def __init__(self) -> None:
        self.starts: List[int] = []
        self.ends: List[int] = []

    def take(self, start: int, end: int) -> List[Tuple[int, int]]:
        """The parts of [start, end) not covered yet, in order; they are covered from now on."""
        if start >= end:
            return []
        starts, ends = self.starts, self.ends
        gaps, pos = [], start
        i = bisect.bisect_right(ends, start)
        while i < len(starts) and starts[i] < end:
            if starts[i] > pos:
                gaps.append((pos, starts[i]))
            pos = max(pos, ends[i])
            i += 1
        if pos < end:
            gaps.append((pos, end))
        lo = bisect.bisect_left(ends, start)  # ranges touching [start, end) join it
        hi = bisect.bisect_right(starts, end)
        if lo < hi:
            start, end = min(start, starts[lo]), max(end, ends[hi - 1])
        starts[lo:hi], ends[lo:hi] = [start], [end]
        return gaps


def _merged_header(older: Dict, newer: Dict, older_path: str, newer_path: str) -> Dict:
    """The merged journal's header, or NotMergeable naming the step that does not fit."""
    if older["block_size"] != newer["block_size"]:
        raise NotMergeable(f"undo steps of different block sizes ({older['block_size']} and "
                           f"{newer['block_size']}) are not merged: {older_path} stays as it is",
                           path=newer_path, offset=12)
    if older["new_size"] != newer["old_size"]:
        raise NotMergeable(f"this undo step starts from a disk of {newer['old_size']} bytes, the "
                           f"older step {older_path} left {older['new_size']}: they do not "
                           f"follow each other and are not merged", path=newer_path, offset=16)
    both_applies = older["kind"] == newer["kind"] == J.KIND_APPLY
    return {"kind": J.KIND_APPLY if both_applies else J.KIND_RESYNC,
            "block_size": older["block_size"],
            "old_size": older["old_size"], "new_size": newer["new_size"],
            # a resync's journal carries no identities; a merge with one neither
            "base_id": older["base_id"] if both_applies else bytes(16),
            "result_id": newer["result_id"] if both_applies else bytes(16)}


def _payload(f: BinaryIO, path: str, record: Tuple) -> bytes:
    """The payload of a DATA record (scan's tuple), checked against its hash again."""
    pos, _, _, _, length, payload_hash = record
    f.seek(pos + B.RECORD_HEADER)
    data = f.read(length)
    if len(data) < length or B.hash_bytes(B.ALGORITHMS["xxh3-64"], data)[0] != payload_hash:
        raise DamagedJournal("undo step is damaged: a record's payload changed since it was "
                             "checked (payload_hash)", path=path, offset=pos)
    return data


def _record(kind: int, offset: int, data: bytes = b"", length: int = 0, seq: int = 0) -> bytes:
    if kind == B.ZERO:
        return bytes(B.record_build(B.ZERO, offset, length, seq=seq))
    digest = B.hash_bytes(B.ALGORITHMS["xxh3-64"], data)[0]
    return bytes(B.record_build(B.DATA, offset, len(data), payload_hash=digest, seq=seq)) + data


def merge_steps(older: str, newer: str, dest: str) -> Merged:
    """Write to `dest` (a new file: FileExistsError if it is there) the
    committed undo journal equal to rolling back step `newer` and then step
    `older` (both committed undo journals, recovery-point steps, `older`
    the one made first), made durable with its directory.

    Both steps are read through and checked whole first (journal.check_step:
    DamagedJournal naming the file and the offset), and every payload again
    as it is copied. The merged journal's old size, kind and base identity
    are `older`'s, its new size and result identity `newer`'s (a merge
    with a resync's journal is of kind resync, with no identities).
    Records within one step may overlap (a resumed resync: the first one
    holds the original contents); the merged one's do not.

    Returns a Merged. Raises NotMergeable (exit 10: the caller keeps both
    steps) for steps of different block sizes, or when `older` does not
    leave the disk at the size `newer` starts from; DamagedJournal for
    damage; OSError (naming `dest`) when it cannot be written. `dest` is
    removed again on any error."""
    return merge_chain([older, newer], dest)


def merge_chain(steps: Sequence[str], dest: str) -> Merged:
    """merge_steps for a run of steps, oldest first (two or more, each
    the next cycle's after the one before it), in one pass: `dest` equals
    rolling back every step, newest first, and the work is in proportion to
    the steps together (not step by step, which would rewrite the merged
    part again for each one). Arguments, result and errors as merge_steps's
    (NotMergeable names the first step that does not follow the one
    before it)."""
    if len(steps) < 2:
        raise ValueError("merge_chain needs two steps or more")
    scans = [J.scan(path, step=True) for path in steps]
    header = scans[0].header
    for i in range(1, len(steps)):
        header = _merged_header(header, scans[i].header, steps[i - 1], steps[i])
    old_size = header["old_size"]
    covered = _Covered()
    out = J.Journal.create(dest, **header)
    try:
        buf, seq = bytearray(), 0

        def emit(piece: bytes) -> None:
            nonlocal buf, seq
            buf += piece
            seq += 1
            if len(buf) >= _FLUSH:
                out.append(buf)
                buf = bytearray()

        # the oldest step's records clipped to the size it restores; then,
        # for each newer step, the range a sequential rollback zero-fills
        # (the older ones grew the disk back past the size this one
        # restores: truncate, then extend), then its records, clipped to
        # what survives the older ones' truncation
        for i, (path, found) in enumerate(zip(steps, scans)):
            limit = old_size
            if i:
                middle = scans[i - 1].header["new_size"]  # what the older ones start from
                for a, b in covered.take(middle, min(old_size, found.header["new_size"])):
                    for at in range(a, b, B.RECORD_MAX):
                        emit(_record(B.ZERO, at, length=min(B.RECORD_MAX, b - at), seq=seq))
                limit = min(middle, old_size)
            records = found.records
            with open(path, "rb") as f:
                for rec in records:
                    kind, offset, length = rec[2], rec[3], rec[4]
                    gaps = covered.take(offset, min(offset + length, limit))
                    if not gaps:
                        continue
                    data = _payload(f, path, rec) if kind == B.DATA else None
                    for a, b in gaps:
                        if data is None:
                            emit(_record(B.ZERO, a, length=b - a, seq=seq))
                        else:
                            emit(_record(B.DATA, a, data[a - offset:b - offset], seq=seq))
        out.append(buf)
        size = out.bytes
        out.commit()
        out.close()
        fsync_dir(dest)
    except BaseException:
        out.close()
        with contextlib.suppress(OSError):
            os.unlink(dest)
        raise
    return Merged(dest, size, seq, header)


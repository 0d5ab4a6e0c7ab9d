"""Writing an undo journal's records back (pydr.engine.journal.rollback),
in batches: records that lie close in the journal are read with one read,
every record checked against what the scan found (its header, its
payload's hash), and only then written, side-by-side ones with one
apply_write. A step of a recovery point is read through once to check it
and once more here, and costs a few large reads instead of one per record."""

from __future__ import annotations

from typing import BinaryIO, Iterable, Iterator, List, Tuple

from . import bindings as B
from ..errors import DamagedJournal

# a record as journal.scan lists it: (position, size, type, offset, length, payload_hash)
Record = Tuple[int, int, int, int, int, int]

BATCH = 8 << 20  # bytes of records read, checked and written back in one go
BATCH_GAP = 64 << 10  # other records skipped inside a batch (the holes, written first)


def batches(order: Iterable[Record], old_size: int) -> Iterator[List[Record]]:
    """Cut `order` (scan's records, in the order they are written back) into
    runs read with one read: records that follow each other in the journal
    with at most BATCH_GAP bytes between them (the other records there, the
    holes written first), up to BATCH bytes from the first to the last; a
    record that reaches past `old_size` (the disk's size to restore: it is
    clipped) is a run of its own. Yields the runs, in order."""
    batch, first, end = [], 0, None
    for rec in order:
        pos, size, _, offset, length, _ = rec
        alone = offset + length > old_size
        if batch and (alone or not end <= pos <= end + BATCH_GAP or pos + size - first > BATCH):
            yield batch
            batch = []
        if not batch:
            first = pos
        batch.append(rec)
        end = pos + size
        if alone:
            yield batch
            batch = []
    if batch:
        yield batch


def write_back(dev, f: BinaryIO, path: str, batch: List[Record], old_size: int) -> int:
    """Read one run of records (see batches) from the journal `f` (at
    `path`, named in errors) with one read, check that every record is the
    one scanned and every DATA payload against its hash, then write the run
    to the device `dev` (records side by side with one apply_write; a record
    past `old_size` clipped to it). Returns the payload bytes restored.
    Raises DamagedJournal (naming `path` and the record's position) for a
    record changed or cut short since the scan, before any record of the
    run is written; the device's errors as its apply_write raises them."""
    hash64 = B.ALGORITHMS["xxh3-64"]
    first = batch[0][0]
    size = batch[-1][0] + batch[-1][1] - first
    f.seek(first)
    data = f.read(size)
    if len(data) < size:  # cut short since the scan
        raise DamagedJournal("undo journal is damaged: a record is cut short", path=path,
                             offset=first + len(data))
    restored = 0
    with memoryview(data) as view:
        for pos, rec_size, kind, offset, length, payload_hash in batch:
            at = pos - first
            info = B.record_parse(bytes(view[at:at + B.RECORD_HEADER]))
            if info is None or (info["type"], info["offset"], info["length"],
                                info["payload_hash"]) != (kind, offset, length, payload_hash):
                raise DamagedJournal("undo journal is damaged: a record changed since it was "
                                     "checked", path=path, offset=pos)
            if kind == B.DATA:
                with view[at + B.RECORD_HEADER:at + rec_size] as payload:
                    intact = B.hash_bytes(hash64, payload)[0] == payload_hash
                if not intact:  # changed since the scan: never written back
                    raise DamagedJournal("undo journal is damaged: a record's payload fails its "
                                         "checksum (payload_hash)", path=path, offset=pos)
                restored += length
        if len(batch) == 1 and batch[0][3] + batch[0][4] > old_size:
            clipped = _clip(data, old_size)
            if clipped is None:
                return 0
            dev.apply_write(clipped)
            return len(clipped) - B.RECORD_HEADER if batch[0][2] == B.DATA else 0
        start = end = None
        for pos, rec_size, *_ in batch:  # all checked: written, side-by-side ones at once
            if start is not None and pos != end:
                dev.apply_write(view[start - first:end - first])
                start = None
            if start is None:
                start = pos
            end = pos + rec_size
        dev.apply_write(view[start - first:end - first])
    return restored


def _clip(data, old_size):
    """A record limited to [0, old_size): rollback truncates the rest away."""
    info = B.record_parse(bytes(data[:B.RECORD_HEADER]))
    if info["offset"] >= old_size:
        return None
    if info["offset"] + info["length"] <= old_size:
        return data
    n = old_size - info["offset"]
    if info["type"] == B.ZERO:
        return B.record_build(B.ZERO, info["offset"], n, seq=info["seq"])
    payload = bytes(data[B.RECORD_HEADER:B.RECORD_HEADER + n])
    return B.record_build(B.DATA, info["offset"], n, seq=info["seq"],
                          payload_hash=B.hash_bytes(B.ALGORITHMS["xxh3-64"], payload)[0]) + payload

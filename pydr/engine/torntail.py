"""The torn tail of an interrupted undo journal (pydr.engine.journal): the
bytes after its last valid record, which a rerun cuts off and a rollback
ignores -- only once they are shown to be what a crash leaves (a batch
journaled but not yet written to the target), never damage to records the
target was written for."""

import mmap
import os
import re

from . import bindings as B
from ..errors import DamagedJournal


def check_torn_tail(dev, path, found):
    """The bytes after the valid prefix of an uncommitted journal are
    ignored as a torn tail only when no crash could have left them
    otherwise. The target is written for a batch only once the batch's
    records are durable, so a record anywhere in that tail whose old
    contents the target (the device `dev`) no longer holds means the target
    was written for it: the journal is needed whole, and the bad record
    before it is damage, not a tear (DamagedJournal naming the offset of
    the bad record, before anything is written). The records after a bad
    one are found by scanning for headers that pass their checksum
    (_records_after). A tail longer than one batch's journal is damage
    too: a crash tears only the batch being journaled."""
    if not found.torn:
        return
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        limit = batch_journal_limit(found.header)
        if size - found.end > limit:
            raise DamagedJournal(f"undo journal is damaged: {size - found.end} bytes follow a "
                                 f"record that fails its checks, more than one batch journals "
                                 f"(at most {limit}): not a torn write", path=path,
                                 offset=found.end)
        if size - found.end < B.RECORD_HEADER:
            return  # no record fits: a torn write
        # mapped, not read: up to a whole target's worth of old contents
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as journal_map:
            _check_tail_records(dev, path, found.end, journal_map)


def _check_tail_records(dev, path, start, journal_map):
    torn = B.record_parse(journal_map[start:start + B.RECORD_HEADER])
    if torn is not None and torn["type"] in (B.DATA, B.ZERO) and not _holds_old_contents(
            dev, torn, None):
        raise DamagedJournal("undo journal is damaged: a record that fails its checks covers a "
                             "range the apply had written already (not a torn write)", path=path,
                             offset=start)
    for pos, info, payload in _records_after(journal_map, start):
        if not _holds_old_contents(dev, info, payload):
            raise DamagedJournal(
                f"undo journal is damaged: a record that fails its checks is followed by a "
                f"record (at offset {pos}) whose range the target no longer holds as it was, "
                f"so the target was written for it: the journal is needed whole (not a torn "
                f"write)", path=path, offset=start)


def batch_journal_limit(header):
    """The most journal bytes one batch can append: the old contents of
    every block of the target once (a batch's ranges do not overlap; one
    ZERO record of the delta may stand for megabytes of old data), with a
    record header per block and two more per record edge."""
    bs = max(header["block_size"], 1)
    blocks = -(-max(header["old_size"], header["new_size"]) // bs) + 1
    return blocks * bs + B.RECORD_HEADER * (2 * blocks + 2)


_RECORD_START = re.compile(rb"(?=[%c%c]\x00{7})" % (B.DATA, B.ZERO))


def _records_after(journal_map, start):
    """(position, info, payload) of each record found in the journal after
    the bad record at `start`: any position (records need not stay 8-byte
    aligned after a short last block) where a DATA or ZERO header passes its
    checksum and, for DATA, its payload passes payload_hash. Scanning
    resumes after each record found, so a payload is not searched."""
    hash64 = B.ALGORITHMS["xxh3-64"]
    end = len(journal_map)
    pos = start + 1  # the record at `start` failed its checks
    while True:
        match = _RECORD_START.search(journal_map, pos)
        if match is None or match.start() + B.RECORD_HEADER > end:
            return
        at = match.start()
        info = B.record_parse(journal_map[at:at + B.RECORD_HEADER])
        if info is None or info["type"] not in (B.DATA, B.ZERO):
            pos = at + 1
            continue
        size = B.RECORD_HEADER + (info["length"] if info["type"] == B.DATA else 0)
        payload = None
        if info["type"] == B.DATA:
            payload = journal_map[at + B.RECORD_HEADER:at + size]
            if len(payload) < info["length"] or \
                    B.hash_bytes(hash64, payload)[0] != info["payload_hash"]:
                pos = at + 1
                continue
        yield at, info, payload
        pos = at + size


def _holds_old_contents(dev, info, payload):
    """Whether the target still holds a record's old contents at its range:
    its payload (or, when that failed its check, the payload_hash), or
    zeros."""
    data = dev.pread(info["length"], info["offset"])
    if info["type"] == B.ZERO:
        return data.count(0) == len(data)
    if payload is None:  # the payload failed its check: its header's hash still says what it was
        return len(data) == info["length"] and \
            B.hash_bytes(B.ALGORITHMS["xxh3-64"], data)[0] == info["payload_hash"]
    return bytes(data) == payload

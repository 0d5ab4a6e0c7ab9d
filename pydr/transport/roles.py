"""The two roles of a resync in this process, spoken in the frames of
pydr.transport.exchange, so that either end may sit across a connection.

A *source* runs the comparison: it signs its disk window by window, hands
each window's COARSE digests to the target, takes the target's FINE answer
and hands over the RECORDS of the blocks that differ. A *target* answers
COARSE with FINE and applies RECORDS under the undo journal. The client's
roles for a disk on another host (pydr.transport.client) and these have
the same methods:

    source.size, source.run(target) -> source;  source.blocks_changed
    target.coarse(payload); target.next_fine() -> payload
    target.records(payload); target.finish() -> TargetResult
    target.frame_bytes: how many record bytes a RECORDS frame should carry
    target.bytes_read (optional): bytes of the target read in this process

``pydr serve`` uses these roles for its side of a transfer.
"""

import collections

from ..engine import bindings as B
from ..engine import journal as J
from ..engine.apply import Applier
from ..engine.progress import Record, Throttle
from ..engine.devices import as_device, disk_mode
from . import exchange as X
from . import protocol as P


class TargetResult(Record):
    """What a target role applied: bytes_written, bytes_zeroed, records,
    `kept` (which of the offered undo paths holds the step, or None) and
    journal_bytes (the size of that step)."""

    _fields = ("bytes_written", "bytes_zeroed", "records", "kept", "journal_bytes")
    __slots__ = _fields


class LocalSource:
    """The source role over a disk this process opens: a path (a file or
    block device) or an open device (pydr.engine.devices: an NBD export).
    ``keep_bytes``: how much data of the windows awaiting their answer is
    kept to encode records from (pydr.transport.exchange.KEEP_BYTES); past
    it, the blocks that differ are read a second time. ``bytes_read``
    counts every byte read from the disk, second reads included."""

    bytes_sent = bytes_received = 0
    reports_progress = True

    def __init__(self, disk, *, block_size, threads, progress=None, window=X.WINDOW,
                 group=X.GROUP, lookahead=X.LOOKAHEAD, keep_bytes=X.KEEP_BYTES):
        J.check_no_unfinished_apply(disk)
        self.dev = as_device(disk)
        self.owned = self.dev is not disk
        self.path = self.dev.name
        self.size = self.dev.size_now()
        self.mode = disk_mode(self.dev)  # what a new target gets (pydr.engine.atomic.copy_mode)
        self.block_size, self.threads = block_size, threads
        self.options = dict(window=window, group=group, lookahead=lookahead,
                            keep_bytes=keep_bytes)
        self.shared = B.Progress()
        self.throttle = Throttle(progress, "resync", self.path, self.size)
        self.blocks_changed = self.data_bytes = self.bytes_reread = 0

    def run(self, target):
        def send(ftype, payload):
            (target.coarse if ftype == P.COARSE else target.records)(payload)

        side = X.SourceSide(self.dev, self.size, self.block_size, send,
                            target.next_fine, threads=self.threads, shared=self.shared,
                            throttle=self.throttle, batch=target.frame_bytes,
                            **self.options).run()
        self.blocks_changed, self.data_bytes = side.blocks_changed, side.data_bytes
        self.bytes_reread = side.bytes_reread
        self.throttle.report(self.size, self.bytes_read, finished=True)
        return self

    @property
    def bytes_read(self):
        """Bytes read from the disk: signing, and the second reads of what
        differs in windows that were not kept."""
        return self.shared.read + self.bytes_reread

    def close(self):
        if self.owned and self.dev is not None:
            self.dev.close()
        self.dev = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalTarget:
    """The target role over a disk this process opens: COARSE is answered
    from its own 4 KiB hashes, RECORDS go through the journaled Applier (a
    missing target is created, and removed again if the first transfer
    fails; a lost connection keeps the journal, so running the transfer
    again resumes it). ``keep_undo``: where the committed undo journal is
    kept (a recovery-point step). ``mode``: the permission bits of a target
    created here (the source's, see pydr.engine.atomic.copy_mode; None:
    private)."""

    bytes_sent = bytes_received = 0
    frame_bytes = X.NET_BATCH  # record bytes per RECORDS frame it is handed

    def __init__(self, disk, *, block_size, result_size, threads, keep_undo=None, kept=0,
                 progress=None, mode=None):
        self.keep_undo, self.kept = keep_undo, kept
        self.applier = Applier(disk, block_size=block_size, base_size=None,
                               result_size=result_size, kind=J.KIND_RESYNC, create=True,
                               mode=mode)
        self.applier.__enter__()
        self.path = self.applier.target
        self.answers = collections.deque()
        self.side = X.TargetSide(self.applier.dev, self.applier.base_size, block_size,
                                 lambda ftype, payload: self.answers.append(payload),
                                 threads=threads, shared=B.Progress(),
                                 throttle=Throttle(progress, "resync", self.path, result_size))

    @property
    def base_size(self):
        return self.applier.base_size

    @property
    def bytes_read(self):
        """Bytes of the target read to answer COARSE frames."""
        return self.side.shared.read

    def coarse(self, payload):
        self.side.coarse(payload)

    def next_fine(self):
        return self.answers.popleft()

    def records(self, payload):
        complete, count, bound, end = B.records_scan(payload)
        if complete != len(payload) or end:
            raise P.ProtocolError("a RECORDS frame must hold whole DATA/ZERO records")
        self.applier.submit(payload, bound, count)

    def finish(self):
        self.applier.finish(keep_journal=self.keep_undo)
        st = self.applier.state
        return TargetResult(int(st.data_bytes), int(st.zero_bytes), int(st.records),
                            self.kept if self.keep_undo is not None else None,
                            self.applier.journal.bytes)

    def close(self, exc=None):
        """End the target: after an error, the Applier rolls back (or keeps
        the journal of an interrupted transfer)."""
        applier, self.applier = self.applier, None
        if applier is not None:
            exc_type = type(exc) if exc is not None else None
            applier.__exit__(exc_type, exc, None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(exc)

"""Applying records to a target, crash-safely, and rolling back.

:class:`Applier` is the one writer of targets: ``pydr apply`` feeds it the
records of a delta stream, ``pydr resync`` the records it computes. Every
batch is verified (checksums, order, the base hash of the blocks it replaces)
and journaled before the target is touched; any error rolls the target back.
"""

import contextlib
import os
import struct
import sys
import time

from . import bindings as B
from . import crashpoints
from . import journal as J
from .atomic import create_file
from .contentid import identity_of
from .delta import HEADER_SIZE, DeltaHeader
from .devices import Device, as_device, using_device
from .parallel import CANCEL_BYTES
from ..errors import (AlreadyApplied, BaseMismatch, Cancelled, CorruptDelta, DamagedJournal,
                     NothingToRollBack, PydrError, UnfinishedApply, UnsupportedFile)
from .progress import Record, Throttle

# Delta bytes read per batch (a batch holds the whole records in it; a longer
# record, up to RECORD_MAX, waits for the next read): the apply looks at its
# cancel event once per batch. 16 MiB measured faster than 32 (512 MiB delta:
# 1.5-2.7 s against 3.0-6.1 s, on a shared 2-core VM).
READ_BYTES = CANCEL_BYTES


class ApplyStats(Record):
    """What an apply did (:func:`pydr.apply_delta`). Read-only.

    Attributes:
        records: Records applied.
        bytes_written: Bytes of data written (DATA payload).
        bytes_zeroed: Bytes zeroed.
        journal_bytes: Size of the undo journal written.
        seconds: Wall-clock time taken.
        rolled_back_first: Whether an interrupted apply of this delta was
            rolled back first.
        already_applied: Whether the target already held the delta's result
            (then nothing was written).
    """

    _fields = ("records", "bytes_written", "bytes_zeroed", "journal_bytes", "seconds",
               "rolled_back_first", "already_applied")
    __slots__ = _fields
    records: int
    bytes_written: int
    bytes_zeroed: int
    journal_bytes: int
    seconds: float
    rolled_back_first: bool
    already_applied: bool


class Applier:
    """Writes verified record batches to `target` under an undo journal.

    `target` is a path (a file or block device, opened here) or an open
    device (pydr.engine.devices: an NBD export). Use as a context manager:
    on an exception inside the block the target is rolled back to its old
    contents; :meth:`finish` completes the apply.
    """

    def __init__(self, target, *, block_size, base_size, result_size, kind=J.KIND_APPLY,
                 base_id=bytes(16), result_id=bytes(16), resume_same=True, create=False,
                 mode=None, cancel=None):
        self.given = target if isinstance(target, Device) else None
        self.target = self.given.name if self.given else os.fspath(target)
        self.block_size = block_size
        self.base_size = base_size
        self.result_size = result_size
        self.kind = kind
        self.ids = (base_id, result_id)
        self.resume_same = resume_same
        self.create = create  # a missing target starts empty; removed again on failure
        self.mode = mode  # the permission bits of a target created here (None: private)
        self.created = False
        self.dev = None
        self.journal = None
        self.state = B.ApplyState()
        self.rolled_back_first = False
        self.finished = False
        self.scratch = None
        self.undo = None
        self._writer = None
        self._writer_error = None
        self._abandon = False  # set when the apply failed: queued batches are dropped
        self.cancel = cancel  # a set event: the writer thread starts no other batch
        self.resumed = None
        self.base_size_seen = None

    # -- set-up ----------------------------------------------------------------
    def __enter__(self):
        if self.given is None and self.create and not os.path.lexists(self.target):
            create_file(self.target, self.mode)
            self.created = True
        try:
            self.dev = as_device(self.given or self.target, write=True)
        except BaseException:
            self._forget_created()
            raise
        try:
            self.dev.lock()
            self.is_block = not self.dev.resizable
            self._recover_interrupted()
            size = self.dev.size_now()
            self._check_base_size(size)
            if self.resumed is not None:
                self.journal = self.resumed
            else:
                self.journal = J.Journal.create(
                    self.dev.journal_path, kind=self.kind, block_size=self.block_size,
                    old_size=size, new_size=self.result_size, base_id=self.ids[0],
                    result_id=self.ids[1])
            # A larger result is sized at finish(): writes past the end extend
            # the file anyway, and the target stays untouched until the first
            # batch (its mtime too, which signature caches are checked against).
        except BaseException:
            self._close_dev()
            self._forget_created()
            raise
        return self

    @property
    def fd(self):
        """The target's file descriptor (files only)."""
        return self.dev.fd

    def _close_dev(self):
        if self.dev is not None and self.given is None:
            self.dev.close()
        self.dev = None

    def _forget_created(self):
        if self.created:
            with contextlib.suppress(OSError):
                os.unlink(self.target)

    def _recover_interrupted(self):
        found = J.pending_journal(self.dev)
        if found is None:
            return
        path, header = found
        same = header["kind"] == self.kind and (
            self.kind == J.KIND_RESYNC or (header["base_id"], header["result_id"]) == self.ids)
        if not (same and self.resume_same):
            raise UnfinishedApply(
                "an interrupted apply of another delta is pending on this target: finish it "
                "with 'pydr apply' and that delta, or run 'pydr rollback TARGET' "
                f"(undo journal: {path})", path=self.target)
        if self.kind == J.KIND_RESYNC:
            # Resume: keep the journal (it holds the original contents of
            # everything already written) and go on appending to it; the
            # resync compares both sides again, so finished blocks are skipped.
            self.resumed = J.Journal.reopen(path, self.dev)
            if self.resumed is not None:
                return
        # Finish the interrupted apply by undoing it, then applying again.
        J.rollback(self.dev, path)
        crashpoints.reached("rollback.restored")
        os.unlink(path)
        self.rolled_back_first = True

    def _check_base_size(self, size):
        self.base_size_seen = size
        if self.base_size is None:
            self.base_size = size
        if size != self.base_size:
            hint = ""
            if size == self.result_size:
                hint = " (the size of its result: was it applied already?)"
            raise BaseMismatch(
                f"target is {size} bytes but the delta was made against a {self.base_size}-byte "
                f"image{hint}", path=self.target)
        if self.is_block and self.result_size != self.base_size:
            raise UnsupportedFile(
                f"block devices cannot be resized: the delta changes the size from "
                f"{self.base_size} to {self.result_size} bytes", path=self.target)

    # -- batches -----------------------------------------------------------------
    def apply_batch(self, recs, journal_bound, records):
        """Verify, journal (durably), then write one batch of records."""
        if not len(recs):
            return
        if self.scratch is None:
            self.scratch = bytearray(B.RECORD_MAX + self.block_size)
        need = B.journal_capacity(journal_bound, records, self.block_size)
        if self.undo is None or len(self.undo) < need:
            self.undo = bytearray(need)
        used = self.dev.apply_prepare(recs, self.block_size, self.base_size, self.result_size,
                                      self.state, self.scratch, self.undo)
        with memoryview(self.undo) as view:
            self.journal.append(view[:used])
        crashpoints.reached("apply.journaled")
        self.dev.apply_write(recs)
        crashpoints.reached("apply.written")
        self.dev.writeback()

    # -- pipelined batches (resync): a writer thread journals and writes while
    # the caller hashes the next window. Same order, same guarantees: each
    # batch's journal is durable before that batch touches the target. Once
    # `cancel` is set the writer finishes the batch it is in and drops the
    # queued ones: what is on the target is journaled, as after a kill.
    def submit(self, recs, journal_bound, records):
        """Queue a batch for the writer thread (the bytes are copied)."""
        import queue
        import threading

        if self._writer is None:
            self._queue = queue.Queue(maxsize=2)
            self._writer = threading.Thread(target=self._write_loop, name="pydr-writer",
                                            daemon=True)
            self._writer.start()
        if self._writer_error is not None:
            raise self._writer_error
        self._queue.put((bytes(recs), journal_bound, records))

    def _write_loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.cancel is not None and self.cancel.is_set():
                self._abandon = True  # the caller raises Cancelled at its next look
            if self._writer_error is None and not self._abandon:
                try:
                    self.apply_batch(*item)
                except BaseException as exc:  # handed to the caller by drain/submit
                    self._writer_error = exc

    def drain(self):
        """Wait for queued batches; re-raise the writer's error, if any."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        if self._writer_error is not None:
            raise self._writer_error

    def finish(self, keep_journal=None):
        """Shrink if needed, make the target durable, commit, and drop the
        journal -- or, with keep_journal=PATH, move the committed journal
        there: it is the reverse delta of this apply (a recovery point)."""
        self.drain()
        if self.result_size < self.base_size:
            self._journal_tail()
            self.dev.truncate(self.result_size)
        elif self.result_size > self.base_size and not self.is_block:
            self.dev.truncate(self.result_size)
        self.dev.sync()
        crashpoints.reached("apply.synced")
        if keep_journal is not None:  # where recovery moves it if we die after COMMIT
            J.write_keep_note(self.dev, keep_journal)
        self.journal.commit()
        crashpoints.reached("apply.committed")
        if keep_journal is None:
            self.journal.remove()
        else:
            self.journal.keep_as(os.fspath(keep_journal))
            crashpoints.reached("apply.kept")
            J.remove_keep_note(self.dev)
        self.finished = True

    def _journal_tail(self):
        """Old contents of [result_size, base_size), which a shrink drops."""
        pos, end, seq = self.result_size, self.base_size, (1 << 62) + self.journal.bytes
        while pos < end:
            n = min(4 << 20, end - pos)
            data = self.dev.pread(n, pos)
            if len(data) != n:
                raise PydrError("target shrank while being journaled", path=self.target, offset=pos + len(data))
            if data.count(0) == n:
                rec = B.record_build(B.ZERO, pos, n, seq=seq)
            else:
                rec = B.record_build(B.DATA, pos, n, payload_hash=B.hash_bytes(B.ALGORITHMS["xxh3-64"], data)[0], seq=seq) + data
            self.journal.append(rec)
            pos += n
            seq += 1

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None and not self.finished:
                self._abandon = True  # batches not yet journaled are never written
                try:
                    self.drain()  # the writer must stop before anything is undone
                except BaseException:
                    pass
                if self.kind == J.KIND_RESYNC and (
                        issubclass(exc_type, ConnectionError)
                        or issubclass(exc_type, Cancelled) and self.journal.bytes > J.HEADER_SIZE):
                    # a dropped connection, or a cancel once something was written:
                    # keep the journal, as a kill does; the next run resumes
                    return False
                if issubclass(exc_type, DamagedJournal):
                    return False  # never rolled back with, nor removed: the evidence stays
                self._rollback_after(exc)  # raises if the old contents could not be restored
                self._forget_created()
        finally:
            if self.journal is not None:
                self.journal.close()
            self._close_dev()
        return False

    def _rollback_after(self, exc):
        """An error stopped the apply: put the old contents back."""
        try:
            J.rollback(self.dev, self.journal.path)
            self.journal.remove()
        except BaseException as rollback_error:
            raise UnfinishedApply(
                f"the apply failed ({exc}) and so did restoring the old contents "
                f"({rollback_error}); the undo journal is kept: run 'pydr rollback TARGET' "
                "once the cause is fixed", path=self.target) from exc


def _open_delta(delta):
    if hasattr(delta, "read"):
        return contextlib.nullcontext(delta), getattr(delta, "name", "<stream>")
    if os.fspath(delta) == "-":
        return contextlib.nullcontext(sys.stdin.buffer), "<stdin>"
    return open(delta, "rb"), os.fspath(delta)


def read_delta_header(f, name):
    return DeltaHeader.parse(f.read(HEADER_SIZE), name)


def apply_delta(delta, target, *, progress=None, cancel=None, verify=False):
    """Apply a delta (path, "-" for stdin, or binary file object) to target.

    Crash-safe: see pydr.journal. If an apply of the same delta to this
    target was interrupted, it is rolled back first and then done again. On
    any error the target is restored. ``verify`` re-reads the whole target
    afterwards and checks it against the delta's result identity (rolled
    back on mismatch). Returns ApplyStats.

    A target that already holds the delta's result (all of it: checked by
    reading it whole, as after a run killed once it had finished) is left
    as it is, with ``already_applied`` set; one that holds it only where the
    delta's first records land is refused (BaseMismatch: it is neither).

    ``progress`` gets a ProgressRecord after every batch of READ_BYTES of the
    delta; a set ``cancel`` event is looked at before each batch, so the apply
    stops within one batch, raises Cancelled and (as on any error) restores
    the target; running it again applies the delta whole."""
    start = time.monotonic()
    opener, name = _open_delta(delta)
    with opener as f:
        header = read_delta_header(f, name)
        throttle = Throttle(progress, "apply", target, header.result_size)
        applier = Applier(target, block_size=header.block_size, base_size=header.base_size,
                          result_size=header.result_size, base_id=header.base_id,
                          result_id=header.result_id)
        try:
            with applier:
                _feed(f, name, header, applier, throttle, cancel)
                if verify:
                    _verify_result(applier, header)
                applier.finish()
        except BaseMismatch as exc:
            if not (isinstance(exc, AlreadyApplied) or applier.base_size_seen == header.result_size):
                raise
            if not holds_result(target, header):
                if isinstance(exc, AlreadyApplied):  # only in part: not "already applied" (12)
                    raise BaseMismatch(
                        "the target holds this delta's result where its first records land, but "
                        "not all of it: it is neither the image the delta was made against nor "
                        "its result", path=exc.path, offset=exc.offset) from None
                raise
            return ApplyStats(0, 0, 0, 0, time.monotonic() - start, applier.rolled_back_first,
                              True)
    st = applier.state
    throttle.report(header.result_size, st.data_bytes, finished=True)
    return ApplyStats(int(st.records), int(st.data_bytes), int(st.zero_bytes),
                      applier.journal.bytes, time.monotonic() - start, applier.rolled_back_first,
                      False)


def _feed(f, name, header, applier, throttle, cancel):
    digest = B.Digest().update(header.pack())
    position = HEADER_SIZE  # of buf[0] in the stream
    buf = bytearray()
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled", path=applier.target)
        chunk = f.read(READ_BYTES)
        buf += chunk
        try:
            complete, count, bound, end = B.records_scan(buf)
        except CorruptDelta as exc:
            raise CorruptDelta("corrupt record header in the delta", path=name,
                               offset=position + exc.offset) from None
        body = complete - (B.RECORD_HEADER if end else 0)
        batch = memoryview(buf)[:body]
        try:
            applier.apply_batch(batch, bound, count - (1 if end else 0))
        except CorruptDelta as exc:  # exc.offset: the record's position in the batch
            raise CorruptDelta("corrupt or out-of-order record in the delta", path=name,
                               offset=position + exc.offset
                               if exc.offset is not None and exc.offset < len(buf) else None
                               ) from None
        except AlreadyApplied as exc:
            raise AlreadyApplied("the target already holds this delta's result", path=applier.target,
                                 offset=exc.offset) from None
        except BaseMismatch as exc:
            raise BaseMismatch("the target does not hold the image this delta was made against",
                               path=applier.target, offset=exc.offset) from None
        digest.update(batch)
        batch.release()
        throttle.report(int(applier.state.next_offset), int(applier.state.data_bytes))
        if end:
            _check_end(bytes(buf[body:complete]), digest, applier, name, position + body)
            if len(buf) > complete or f.read(1):
                raise CorruptDelta("data after the end of the delta", path=name,
                                   offset=position + complete)
            return
        if not chunk:
            raise CorruptDelta("delta truncated: it ends before its END record", path=name,
                               offset=position + len(buf))
        del buf[:complete]
        position += complete


def _check_end(raw, digest, applier, name, offset):
    info = B.record_parse(raw)
    low, high = struct.unpack("<QQ", digest.digest())
    st = applier.state
    if (info is None or info["type"] != B.END or info["base_hash"] != (low, high)
            or info["seq"] != st.records or info["length"] != st.data_bytes
            or info["offset"] != st.zero_bytes):
        raise CorruptDelta("delta checksum or counts do not match its END record", path=name,
                           offset=offset)


def holds_result(target, header):
    """Whether `target` (a path or an open device) holds, all of it, the
    image the delta produces."""
    with using_device(target) as dev:
        size = dev.size_now()
        return size == header.result_size and identity_of(
            dev, size, header.block_size) == header.result_id


def _verify_result(applier, header):
    applier.dev.sync()
    got = identity_of(applier.dev, header.result_size, header.block_size)
    if got != header.result_id:
        raise BaseMismatch("after applying, the target does not equal the delta's result "
                           "(was the base different outside the changed blocks?)",
                           path=applier.target)


def rollback(target, *, cancel=None):
    """Undo an interrupted apply on `target`. Returns bytes restored; raises
    FileNotFoundError-like PydrError if there is nothing to roll back. A set
    ``cancel`` event stops it before the next journal record (Cancelled):
    the journal stays whole, and rolling back again finishes."""
    path = J.pending(target)
    if path is None:
        raise NothingToRollBack("no interrupted apply to roll back on this target (no undo journal)",
                                path=os.fspath(target))
    with using_device(target, write=True) as dev:
        dev.lock()
        restored = J.rollback(dev, path, cancel=cancel)
        crashpoints.reached("rollback.restored")
        os.unlink(path)
        J.fsync_dir(path)
    return restored

"""Undo journals: the old contents of every block an apply overwrites.

Kept beside the target (``DIR/.NAME.pydr-undo``); for block devices, and
for every target when ``$PYDR_JOURNAL_DIR`` is set, in that directory
(default ``/var/lib/pydr/journal``), named after the target's real path. The protocol, which
makes an interrupted apply always recoverable (docs/FORMAT.md):

1. the journal header (old and new sizes, which delta) is written and fsynced,
   with its directory, before the target is touched;
2. for each batch, the old contents of the blocks it replaces are appended and
   fsynced *before* the batch is written to the target;
3. once the target is complete and fdatasynced, a COMMIT record is appended
   and fsynced, and the journal is removed.

Anything after the last valid record (a torn write at a crash) is ignored:
the target was not touched for it -- once that is shown (check_torn_tail in
pydr.engine.torntail: no record found after it was written to the target).
Rolling back = restoring the old size and writing every journaled record
back. The same records are a reverse delta,
which is what recovery points will be built from.
"""

import contextlib
import errno
import os
import struct

from . import bindings as B
from . import keepnote
from . import names
from . import crashpoints
from .atomic import check_own_file, check_safe_dir, fsync_dir
from .contentid import identity_of
from .devices import FileDevice
from .oserrors import NamedFile, naming
from .writeback import batches, write_back
from .torntail import batch_journal_limit, check_torn_tail  # noqa: F401 (re-exported)
from ..errors import Cancelled, CorruptDelta, DamagedJournal, UnfinishedApply

MAGIC = b"PYDRUND\x00"
VERSION = 1
KIND_APPLY = 1
KIND_RESYNC = 2
# magic, version, kind, block_size, old_size, new_size, base_id, result_id, reserved
_HEADER = struct.Struct("<8sHHIQQ16s16s24s")
HEADER_SIZE = _HEADER.size + 8  # 96 with its xxh3-64 checksum
COMMIT_SIZE = B.RECORD_HEADER  # the record that ends a committed journal


def journal_path(target):
    """Where the undo journal of the disk at the path `target` lives (see
    pydr.engine.names.journal, the one place that says)."""
    return names.journal(target)


def pack_header(kind, block_size, old_size, new_size, base_id=bytes(16), result_id=bytes(16)):
    fields = _HEADER.pack(MAGIC, VERSION, kind, block_size, old_size, new_size,
                          base_id, result_id, bytes(24))
    return fields + struct.pack("<Q", B.hash_bytes(B.ALGORITHMS["xxh3-64"], fields)[0])


def parse_header(raw, path):
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        return None
    fields = raw[:_HEADER.size]
    if struct.unpack_from("<Q", raw, _HEADER.size)[0] != B.hash_bytes(B.ALGORITHMS["xxh3-64"], fields)[0]:
        return None
    _, version, kind, bs, old, new, base_id, result_id, _ = _HEADER.unpack(fields)
    if version != VERSION:
        raise CorruptDelta(f"undo journal version {version} is not supported", path=path, offset=8)
    return {"kind": kind, "block_size": bs, "old_size": old, "new_size": new,
            "base_id": base_id, "result_id": result_id}


class Journal:
    """An open undo journal (append side)."""

    def __init__(self, path, fd, header):
        self.path, self.fd, self.header = path, fd, header
        self.bytes = HEADER_SIZE

    @classmethod
    def create(cls, path, **header):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        check_safe_dir(os.path.dirname(path))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            with naming(path):
                os.write(fd, pack_header(**header))
                os.fsync(fd)
            fsync_dir(path)
            crashpoints.reached("journal.created")
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return cls(path, fd, header)

    def append(self, records):
        """Append undo records and make them durable before returning."""
        with naming(self.path):
            if len(records):
                view = memoryview(records)
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
                self.bytes += len(records)
            os.fdatasync(self.fd)

    def commit(self):
        with naming(self.path):
            os.write(self.fd, B.record_build(B.COMMIT))
            os.fdatasync(self.fd)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def keep_as(self, dest):
        """Move the committed journal to `dest` (see move_journal)."""
        self.close()
        move_journal(self.path, dest)

    def remove(self):
        self.close()
        os.unlink(self.path)
        fsync_dir(self.path)

    @classmethod
    def reopen(cls, path, dev):
        """Continue an interrupted (uncommitted) journal of the device `dev`:
        cut a torn tail off (checked first: check_torn_tail), then append
        after the last valid record."""
        found = scan(path)
        if found.header is None:
            return None
        check_torn_tail(dev, path, found)
        header, end = found.header, found.end
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            with naming(path):
                os.ftruncate(fd, end)
                os.fsync(fd)
            os.lseek(fd, end, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        journal = cls(path, fd, header)
        journal.bytes = end
        return journal


def read_journal(path):
    """(header or None, committed) of a journal on disk, checking its records
    as an uncommitted journal is read (see scan): a torn header or tail is
    what a crash leaves, damage raises DamagedJournal."""
    found = scan(path)
    return found.header, found.committed


def check_step(path):
    """Check a recovery-point step (a committed journal) whole: its header,
    every record and its payload hash, and the COMMIT that ends it. Returns
    its header; raises DamagedJournal naming the file and the offset of what
    is wrong."""
    return scan(path, step=True).header


class JournalScan:
    """What a journal holds: its header (None: torn, the target untouched),
    its valid records as (position, size, type, offset, length,
    payload_hash), whether they end in COMMIT, where they end, and whether
    a torn tail follows them (ignored)."""

    __slots__ = ("header", "records", "committed", "end", "torn")

    def __init__(self, header, records, committed, end, torn=False):
        self.header, self.records, self.committed, self.end = header, records, committed, end
        self.torn = torn


def scan(path, *, step=False):
    """Read a journal through, checking every record's header and every
    DATA payload against its payload_hash (xxh3-64, in C).

    ``step``: a committed journal (a recovery-point step) must be valid
    record by record up to its COMMIT, which ends the file; anything else is
    damage. Otherwise (crash recovery) the valid prefix counts and a torn
    header or tail is ignored -- the target was not touched for it -- except
    a bad header with bytes after it, which no crash leaves (records are
    appended only once the header is durable); a tail is then checked
    against the target before it is trusted (check_torn_tail). Damage raises
    DamagedJournal with the file and the byte offset."""
    what = "undo step" if step else "undo journal"
    with open(path, "rb") as f:
        header = parse_header(f.read(HEADER_SIZE), path)
        size = os.fstat(f.fileno()).st_size
        if header is None:
            if step or size > HEADER_SIZE:  # records are appended only after the header is durable
                raise DamagedJournal(f"{what} is damaged: its header fails its checks", path=path,
                                     offset=0)
            return JournalScan(None, [], False, size)
        records, committed, end = [], False, HEADER_SIZE
        for pos, info, problem in _walk(f):
            if problem is not None:
                if step:
                    raise DamagedJournal(f"{what} is damaged: {problem}", path=path, offset=pos)
                break  # a torn tail, or damage: see check_torn_tail
            end = pos + info["size"]
            if info["type"] == B.COMMIT:
                committed = True
                break
            records.append((pos, info["size"], info["type"], info["offset"], info["length"],
                            info["payload_hash"]))
        if step and not committed:
            raise DamagedJournal(f"{what} is damaged: it ends without a COMMIT record (cut short?)",
                                 path=path, offset=end)
        if step and size != end:
            raise DamagedJournal(f"{what} is damaged: {size - end} bytes follow its COMMIT record",
                                 path=path, offset=end)
        return JournalScan(header, records, committed, end, torn=not committed and end < size)


def _walk(f):
    """Yield (position, info, None) for each whole record from HEADER_SIZE
    whose header and payload check out, up to and including a COMMIT; then,
    if the file does not end there, (position, info or None, what is wrong)
    for the first one that does not. One read and one hash (in C) a record."""
    hash64 = B.ALGORITHMS["xxh3-64"]
    pos = HEADER_SIZE
    f.seek(pos)
    while True:
        head = f.read(B.RECORD_HEADER)
        if not head:
            return
        if len(head) < B.RECORD_HEADER:
            yield pos, None, "a record header is cut short"
            return
        info = B.record_parse(head)
        if info is None:
            yield pos, None, "a record header fails its checksum"
            return
        if info["type"] not in (B.DATA, B.ZERO, B.COMMIT):
            yield pos, None, f"a record of type {info['type']} has no place in an undo journal"
            return
        info["size"] = B.RECORD_HEADER
        if info["type"] == B.DATA:
            info["size"] += info["length"]
            payload = f.read(info["length"])
            if len(payload) < info["length"]:
                yield pos, info, "a record's payload is cut short"
                return
            if B.hash_bytes(hash64, payload)[0] != info["payload_hash"]:
                yield pos, info, "a record's payload fails its checksum (payload_hash)"
                return
        yield pos, info, None
        if info["type"] == B.COMMIT:
            return
        pos += info["size"]


def rollback_fd(fd, path, target, is_block_device, *, step=False, found=None, sync=True):
    """rollback() onto an open file descriptor (`found` and `sync`: as
    rollback's)."""
    return rollback(FileDevice(target, fd=fd, is_block=is_block_device), path, step=step,
                    found=found, sync=sync)


def rollback(dev, path, *, step=False, cancel=None, found=None, sync=True):
    """Restore the device `dev` from the journal at `path`; returns bytes
    restored. Leaves the journal in place (the caller removes it once this
    returned). ``step``: the journal is a recovery-point step, which must be
    whole and committed (see scan). A set ``cancel`` event stops it before
    the next batch (at most writeback.BATCH bytes, or one record) with
    Cancelled; the journal is whole, and rolling back again restores every
    record.

    The whole journal is checked (scan) before its first byte is written,
    and each DATA payload against its hash again as it is written back, so
    damage raises DamagedJournal and is never written to the target.
    ``found``: what scan(path, step=step) returned to a caller that checked
    the journal just before (it is not read through twice; the payloads are
    still checked as they are written back). ``sync``: fdatasync `dev` at
    the end (False: the caller syncs it next, as pydr.engine.restore does).

    A journal continued after an interruption (resumed resync) may hold
    several records for one range; the first one has the original contents,
    so then every record is written back newest first. Otherwise ranges are
    disjoint and holes go first, which frees space on a full file system;
    records that lie close in the journal are read and checked in batches
    (one read, one hash per record in C), then written back (one
    apply_write for the ones side by side)."""
    if found is None:
        found = scan(path, step=step)
    if found.header is None:
        return 0  # torn header: nothing was written to the target
    check_torn_tail(dev, path, found)
    old_size = found.header["old_size"]
    index = found.records
    with open(path, "rb") as f:
        if dev.resizable and dev.size_now() != old_size:
            dev.truncate(old_size)
        spans = sorted((r[3], r[3] + r[4]) for r in index)
        overlapping = any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
        if overlapping:
            order = list(reversed(index))
        else:
            order = [r for r in index if r[2] == B.ZERO] + [r for r in index if r[2] == B.DATA]
        restored = 0
        for batch in batches(order, old_size):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled: the rollback is not finished (run it again)",
                                path=getattr(dev, "name", None))
            restored += write_back(dev, f, path, batch, old_size)
    if sync:
        dev.sync()
    if found.torn and found.header["kind"] == KIND_APPLY:
        _check_base_restored(dev, found, path)
    return restored


def _check_base_restored(dev, found, path):
    """A torn tail was ignored: a crash while a batch was journaled, its
    range untouched -- or damage to a record whose range was written. An
    apply's journal names the image it started from (base_id), so the
    target rolled back is compared with it (read whole: only in this case).
    A mismatch raises DamagedJournal; the journal stays. (Not after every
    rollback: an apply stopped because the target was not its base rolls
    back to what the target held, which is not base_id.)"""
    header = found.header
    if identity_of(dev, header["old_size"], header["block_size"]) != header["base_id"]:
        raise DamagedJournal("undo journal is damaged: it ends in a record that fails its "
                             "checks, and the target rolled back without it is not the image "
                             "the apply started from", path=path, offset=found.end)


def move_journal(path, dest, dir_fd=None):
    """Move a committed journal to `dest`, durably (copied where `dest` is on
    another file system): a recovery-point step. With `dir_fd`, `dest` is a
    name in that directory (opened so that it cannot lead elsewhere)."""
    import shutil

    if dir_fd is None:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), mode=0o700, exist_ok=True)
        dir_fd = os.open(os.path.dirname(os.path.abspath(dest)), os.O_RDONLY | os.O_DIRECTORY)
        dest = os.path.basename(dest)
    else:
        dir_fd = os.dup(dir_fd)
    try:
        try:
            os.replace(path, dest, dst_dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            tmp = f".{dest}.pydr-new"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dir_fd)
            try:
                with os.fdopen(fd, "wb") as out, open(path, "rb") as f, naming(dest):
                    shutil.copyfileobj(f, NamedFile(out, dest), 4 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, dest, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
            os.unlink(path)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    fsync_dir(path)


def journal_of(target):
    """The undo journal's path for a target: a path, or a device
    (pydr.engine.devices) that knows where its journal lives."""
    return target.journal_path if hasattr(target, "journal_path") else journal_path(target)


def keep_note_path(target):
    """Where an apply that keeps its journal notes the destination, before
    it commits: a crash between the COMMIT and the move leaves a committed
    journal that recovery moves there instead of deleting it."""
    return journal_of(target) + ".keep"


def _target_name(target):
    """The path of a target: a path, or a device named by its path."""
    return os.fspath(target) if isinstance(target, (str, bytes, os.PathLike)) else target.name


def write_keep_note(target, dest):
    keepnote.write(keep_note_path(target), _target_name(target), dest)


def remove_keep_note(target):
    keepnote.remove(keep_note_path(target))


def pending_journal(target, allowed=()):
    """(path, header) of the journal of an unfinished apply on `target`, or
    None. A journal that was committed (a crash after the commit) is settled
    on the way: moved where its apply meant to keep it (its keep note, see
    pydr.engine.keepnote; `allowed`: steps the caller offers), or removed."""
    path = journal_of(target)
    try:
        check_own_file(path)  # a journal someone else planted is never rolled back or kept
        header, committed = read_journal(path)
    except FileNotFoundError:
        remove_keep_note(target)  # a crash after the journal was kept
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise
    if header is not None and committed:
        if allowed:
            _check_fits(path, header, target)
        kept = keepnote.destination(keep_note_path(target), _target_name(target), allowed,
                                    holds_step=_holds_committed_step)
        if kept is not None:  # a recovery-point step, as its apply meant
            dir_fd, name = kept
            try:
                move_journal(path, name, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
            remove_keep_note(target)
            return None
    if header is None or committed:
        # torn header (target untouched) or finished apply: nothing to undo
        with contextlib.suppress(OSError):
            os.unlink(path)
        remove_keep_note(target)
        return None
    return path, header


def pending(target):
    """The journal path if `target` has an unfinished apply, else None."""
    found = pending_journal(target)
    return found[0] if found else None


def check_no_unfinished_apply(target):
    """Raise UnfinishedApply if an apply on `target` was interrupted."""
    path = pending(target)
    if path is not None:
        raise UnfinishedApply(
            "an apply to this target was interrupted: run 'pydr apply DELTA TARGET' "
            "again with the same delta to finish it, or 'pydr rollback TARGET' to "
            f"restore the old contents (undo journal: {path})",
            path=os.fspath(target),
        )


def choose_undo_path(target, candidates):
    """(path, index) of the first of `candidates` that holds no committed
    undo journal, or (None, None) when there are none. A replication cycle
    offers the next recovery-point step and the one after it: a cycle killed
    after it kept its step, before the vault recorded it, left the first one
    committed (the replica already moved past it). A committed journal still
    beside `target` is settled first, so that it is found there too."""
    if candidates:
        pending_journal(target, allowed=candidates)
    for i, path in enumerate(candidates):
        if not (os.path.exists(path) and _holds_committed(path)):
            return path, i
    if candidates:
        raise FileExistsError(errno.EEXIST, "every step offered holds a committed step already",
                              candidates[-1])
    return None, None


def _check_fits(path, header, target):
    """A committed journal beside a replica that a cycle is about to keep as
    its step must be of that replica: its apply left the replica at the
    header's new size. (A resync's journal carries no identity of the
    state it made: another valid step of the same size is not told apart.)"""
    if isinstance(target, (str, bytes, os.PathLike)):
        try:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            size = B.fd_size(fd, os.fspath(target))[0]
        finally:
            os.close(fd)
    else:  # an open device, or a place that only names the journal: its fd if it has one
        fd = getattr(target, "fd", None)
        if not isinstance(fd, int):
            return
        size = B.fd_size(fd, _target_name(target))[0]
    if header["new_size"] != size:
        raise DamagedJournal(f"this committed undo journal is not the last apply's on "
                             f"{_target_name(target)}: it leaves {header['new_size']} bytes, "
                             f"the replica holds {size}; nothing was moved", path=path, offset=24)


def _holds_committed_step(path):
    """Whether `path` (an offered step) already holds a committed journal."""
    return os.path.lexists(path) and _holds_committed(path)


def _holds_committed(path):
    """Whether `path` holds a committed journal. A damaged one counts as
    one: it is never written over (the points that need it are found
    damaged when they are restored or verified)."""
    try:
        return read_journal(path)[1]
    except CorruptDelta:
        return True

"""Where the engine reads and writes a disk: a file or block device this
process opens (FileDevice), or an NBD export it connects to (NbdDevice,
through libnbd). Signing, encoding records, the journaled apply, rollback
and resync take a device; each kind does the work its own way (mmap windows
and SEEK_DATA for files; block status and reads in flight for NBD).

A device (a Device) has: name (for messages), size, resizable, journal_path
(where the undo journal of an apply to it lives: pydr.engine.names), lock(),
sign() (of the whole range or of spans, keeping what it read when asked),
data_extents(), encode() (counting the bytes it reads in encoded_bytes),
apply_prepare(), apply_write(), pread(), truncate(), sync(), writeback(),
cache_trusted(mtime), cache_identity() (may a signature cache be used), close().
Whatever takes "a path or an open device" turns it into a device with
as_device() (or using_device()).

A MemoryDevice stands for a window of a disk that sign(keep=...) kept: it
has encode() and pread() only, so that the records of the blocks found to
differ are encoded from the bytes that were hashed, without reading the
disk again.

This module is the bottom of the engine's own modules: it imports none of
the modules that take a device (signatures, journal, apply, resync).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from typing import Any, List, Optional, Tuple

from ..errors import Cancelled, UnfinishedApply, UnsupportedFile
from . import bindings as B
from . import names
from .atomic import copy_mode
from .oserrors import naming
from .filesign import blocks_for, check_keep, sign_spans_range  # noqa: F401 (blocks_for)
from .parallel import CANCEL_BYTES, run_chunks, start_all, wait_all
from .spans import as_pairs, check_spans, cut_units, merge_spans

SIGN_WINDOW = 256 << 20  # an NBD export is signed this much at a time
# connections that sign one export side by side where the server offers
# multi-conn. Each costs a server thread and a client thread: on 2 cores one
# connection was fastest (2.6 s for 4 GiB against 3.1 s with two or four)
NBD_CONNECTIONS = max(1, min(4, (os.cpu_count() or 1) // 2))
# Each thread signing a file takes chunks of this many bytes (rounded to
# whole blocks).
CHUNK_BYTES = 64 * 1024 * 1024


def kind_of(mode):
    """What a file of this st_mode is, in words, for messages."""
    for test, word in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return word
    return "not a regular file or block device"


def not_a_disk(mode):
    text = kind_of(mode)
    return f"{text[0].upper()}{text[1:]} is not a disk: give a regular file or a block device"


def open_disk(path, flags=os.O_RDONLY):
    """A descriptor of the disk at `path`, which must be a regular file or a
    block device; anything else is refused with UnsupportedFile (a
    directory with IsADirectoryError). Opened with O_NONBLOCK, checked with
    fstat, then made blocking again: a FIFO opened for reading would
    otherwise wait for a writer forever."""
    path = os.fspath(path)
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:  # ENXIO: a socket, or a FIFO opened for writing only
        if exc.errno == errno.ENXIO:
            mode = os.stat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise UnsupportedFile(not_a_disk(mode), path=path) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a disk", path)
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise UnsupportedFile(not_a_disk(mode), path=path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def disk_mode(device):
    """The permission bits a copy of `device` gets (pydr.engine.atomic.
    copy_mode): a file's or block device's own, PRIVATE for an NBD export."""
    fd = getattr(device, "fd", None)
    return copy_mode(os.fstat(fd).st_mode if fd is not None else None)


def check_disk(path):
    """Raise as open_disk does unless `path` is a regular file or a block
    device (opened and closed again: nothing is read)."""
    os.close(open_disk(path))


class Device:
    """What the engine reads and writes: see the module's docstring for
    what each kind has. A with block closes it."""

    #: bytes encode() read from the disk so far on this device object (a
    #: block read twice counts twice); a MemoryDevice reads none
    encoded_bytes = 0

    def data_extents(self, offset: int, length: int) -> List[Tuple[int, int]]:
        """The (start, end) byte pairs of [offset, offset + length) that may
        hold data, sorted: a device that cannot tell says all of it. Cheap:
        no data is read."""
        return [(offset, offset + length)] if length > 0 else []

    def _count_encoded(self, used: int, done: int) -> None:
        """Adds the payload bytes of an encode() that wrote `done` records in
        `used` bytes (one 64-byte header per record) to encoded_bytes."""
        with self._count_lock:
            self.encoded_bytes += used - B.RECORD_HEADER * done

    _count_lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sign_range(fd, path, offset, length, block_size, code, hashes, zero_mask, *,
               threads, progress_record, throttle, cancel=None, use_mmap=True,
               final_report=True):
    """Sign [offset, offset+length) of an open file into caller buffers
    (``hashes``: blocks * words uint64, ``zero_mask``: one byte per block),
    on ``threads`` threads. offset is block aligned; the range may end on a
    short block only at the end of the file. Returns the threads used.

    Each thread signs its chunk CANCEL_BYTES at a time and looks at
    ``cancel`` before each piece: a set event stops it within one piece
    (the C core looks at the flag per mmap window or I/O buffer too), and
    a piece of holes costs no read but bounded CPU."""
    n = blocks_for(length, block_size)
    words = B.hash_words(code)
    per_chunk = max(1, CHUNK_BYTES // block_size)
    per_piece = max(1, min(per_chunk, CANCEL_BYTES // block_size))
    nchunks = (n + per_chunk - 1) // per_chunk
    end = offset + length

    def do_chunk(signer, i):
        b1 = min(n, (i + 1) * per_chunk)
        for b0 in range(i * per_chunk, b1, per_piece):
            if cancel is not None and cancel.is_set():
                progress_record.request_cancel()  # the other workers stop too
            b2 = min(b1, b0 + per_piece)
            start = offset + b0 * block_size
            h, z = out.at(b0)
            signer.sign(fd, start, min(end, offset + b2 * block_size) - start, h, z, b2 - b0,
                        progress_record, path)

    used = max(1, min(threads, nchunks))
    with B.OutputBuffers(hashes, zero_mask, words) as out:
        run_chunks(nchunks, used, lambda: B.Signer(block_size, code, use_mmap=use_mmap),
                   do_chunk, progress_record, throttle, cancel, final_report)
    return used


def as_device(disk, *, write=False):
    """The device `disk` is: an open device (a Device) as it is; a path (a
    regular file or a block device) opened here as a FileDevice (for
    writing with `write`), which the caller closes."""
    if isinstance(disk, Device):
        return disk
    return FileDevice(disk, write=write)


@contextlib.contextmanager
def using_device(disk, *, write=False):
    """as_device(disk) for a with block: a device opened here is closed at
    its end; a device given stays open (its owner closes it)."""
    device = as_device(disk, write=write)
    try:
        yield device
    finally:
        if device is not disk:
            device.close()


class FileDevice(Device):
    """A regular file or block device, open in this process."""

    def __init__(self, path, *, write=False, fd=None, is_block=None):
        self.name = os.fspath(path)
        self.owned = fd is None
        self.fd = open_disk(self.name, os.O_RDWR if write else os.O_RDONLY) \
            if fd is None else fd
        self.core = None
        try:
            size, blk = B.fd_size(self.fd, self.name)
            self.size = size
            self.is_block = blk if is_block is None else is_block
            self.core = B.Device.open_fd(self.fd, name=self.name, is_block=self.is_block)
        except BaseException:
            self.close()
            raise
        self.resizable = not self.is_block

    @property
    def journal_path(self):
        return names.journal(self.name)

    def lock(self):
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UnfinishedApply("another pydr is writing to this target", path=self.name) from None

    def size_now(self):
        self.size = B.fd_size(self.fd, self.name)[0]
        return self.size

    def sign(self, offset: int, length: int, block_size: int, code: int, hashes: Any,
             zero_mask: Any, *, threads: int, progress_record: B.Progress, throttle: Any,
             cancel: Any = None, use_mmap: bool = True, final_report: bool = True,
             keep: Any = None, spans: Optional[List[Tuple[int, int]]] = None) -> int:
        """Sign [offset, offset + length) (offset block aligned; a short
        last block only at the end of the disk) into ``hashes`` (blocks x
        words uint64) and ``zero_mask`` (a byte per block), on ``threads``
        threads; progress goes to ``progress_record`` reported by
        ``throttle``; a set ``cancel`` event stops it (Cancelled).

        spans: None (the whole range) or (start, end) absolute byte pairs
        inside the range, block aligned, sorted: only they are read, and
        the blocks outside them are left untouched in hashes / zero_mask.
        keep: None, or a writable buffer of at least `length` bytes indexed
        from `offset` that gets every byte read (pread straight into it, no
        mmap); holes are not read and stay untouched there (zero_mask 1).
        Without keep and spans the data is hashed through mmap windows
        (use_mmap) as before. Returns the threads used.

        Raises ValueError for bad spans or keep, OSError (path, offset of
        the first failing block) for a failed read, FileChanged when the
        file ends first, Cancelled."""
        if keep is None and spans is None:
            return sign_range(self.fd, self.name, offset, length, block_size, code, hashes,
                              zero_mask, threads=threads, progress_record=progress_record,
                              throttle=throttle, cancel=cancel, use_mmap=use_mmap,
                              final_report=final_report)
        check_keep(keep, length, self.name)
        return sign_spans_range(
            self.fd, self.name, offset, length, block_size, code, hashes, zero_mask,
            spans=check_spans(spans, offset, length, block_size, self.name), keep=keep,
            threads=threads, progress_record=progress_record, throttle=throttle,
            cancel=cancel, use_mmap=use_mmap, final_report=final_report)

    def data_extents(self, offset: int, length: int) -> List[Tuple[int, int]]:
        """The (start, end) pairs of [offset, offset + length) holding data,
        found with SEEK_DATA / SEEK_HOLE (no data read); the whole range
        where the file system cannot tell (or for a block device)."""
        end, pos, result = offset + length, offset, []
        if self.is_block or length <= 0:
            return super().data_extents(offset, length)
        with naming(self.name):
            while pos < end:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # only a hole up to the end of the file
                        break
                    if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                        return super().data_extents(offset, length)
                    raise
                if data >= end:
                    break
                hole = os.lseek(self.fd, data, os.SEEK_HOLE)
                result.append((data, min(hole, end)))
                pos = hole
        return merge_spans(result)

    def encode(self, extents, zero, base_hashes, first_seq, out, block_size=0,
               payload_hashes=None):
        """Encode records of the extents into out (see B.Device.encode);
        the bytes read are added to encoded_bytes."""
        used, done, hused = self.core.encode(extents, zero, base_hashes, first_seq, out,
                                             block_size, payload_hashes)
        self._count_encoded(used, done)
        return used, done, hused

    def apply_prepare(self, recs, block_size, old_size, new_size, state, scratch, journal):
        return self.core.apply_prepare(recs, block_size, old_size, new_size, state, scratch,
                                       journal)

    def apply_write(self, recs):
        self.core.apply_write(recs)

    def pread(self, length, offset):
        return os.pread(self.fd, length, offset)

    def truncate(self, size):
        with naming(self.name):
            os.ftruncate(self.fd, size)

    def sync(self):
        with naming(self.name):
            os.fdatasync(self.fd)

    def writeback(self):
        B.start_writeback(self.fd)  # a hint: overlap the disk with the next batch

    def cache_trusted(self, cache_mtime_ns):
        """Whether a signature cache written at that time still describes
        this disk: a file must not have changed since; a block device cannot
        tell, and is trusted (pydr is meant to be its only writer)."""
        return self.is_block or cache_mtime_ns >= os.fstat(self.fd).st_mtime_ns

    def cache_identity(self):
        """(device, inode, size, mtime ns or 0 for a device): what a signature cache
        is bound to. pydr must be the only writer (one in a commit's tick is unseen)."""
        st = os.fstat(self.fd)
        return (st.st_dev, st.st_ino, self.size_now(), 0 if self.is_block else st.st_mtime_ns)

    def close(self):
        if self.core is not None:
            self.core.close()
            self.core = None
        if self.owned and self.fd is not None:
            os.close(self.fd)
        self.fd = None


class NbdDevice(Device):
    """An NBD export, through libnbd (one connection): a disk of fixed size.
    ``bitmap``: a QEMU dirty bitmap exported with it (changed-block
    tracking). Its undo journal and lock live in names.journal_dir()."""

    resizable = False
    is_block = True

    def __init__(self, uri, *, name=None, write=False, bitmap=None, journal=None, lock=None):
        self.lock_path = lock
        self.uri = uri
        self.name = name or uri
        self.handle = B.Device.open_nbd(uri, name=self.name, bitmap=bitmap, write=write)
        self.size = self.handle.size
        self.bitmap = bitmap
        self._journal = journal
        self._lock_fd = None
        # read connections beside self.handle (a writer uses only its own)
        self._extra = None if write else []
        self._extra_full = False

    @property
    def journal_path(self):
        return self._journal if self._journal is not None else self.journal_for(self.name)

    @staticmethod
    def journal_for(name):
        """Where the undo journal of an export named `name` lives."""
        return names.export_journal(name)

    def lock(self):
        """Exclusive writer: a lock file in the journal directory, or the
        image file itself (lock) for a QEMU image pydr serves."""
        path = self.lock_path or self.journal_path + ".lock"
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise UnfinishedApply("another pydr is writing to this export", path=self.name) from None

    def size_now(self):
        return self.size

    def sign(self, offset: int, length: int, block_size: int, code: int, hashes: Any,
             zero_mask: Any, *, threads: int, progress_record: B.Progress, throttle: Any,
             cancel: Any = None, use_mmap: bool = True, final_report: bool = True,
             keep: Any = None, spans: Optional[List[Tuple[int, int]]] = None) -> int:
        """Signs window by window (arguments as FileDevice.sign; `threads`
        and `use_mmap` are not used). Each connection keeps several reads
        in flight; with spans, one call reads all the spans of a window
        with many requests in flight (not one span at a time), straight
        into keep when given. Where the server offers multi-conn, up to
        NBD_CONNECTIONS sign windows side by side. The readers run on their
        own threads while this one reports progress and passes a set
        ``cancel`` on to the C core, which stops at its next read request
        (NBD_CHUNK bytes, a few in flight)."""
        step = max(block_size, SIGN_WINDOW // block_size * block_size)
        windows = [(w0, min(length, w0 + step)) for w0 in range(0, length, step)]
        by_spans = keep is not None or spans is not None
        if by_spans:
            check_keep(keep, length, self.name)
            # windows of up to `step` bytes of spans however far apart they lie:
            # scattered short spans are one call, their reads all in flight
            windows = [(unit[0][0] - offset, unit[-1][1] - offset, unit) for unit in
                       cut_units(check_spans(spans, offset, length, block_size, self.name),
                                 block_size, step)]
            keep_view = memoryview(keep).cast("B") if keep is not None else None
        handles = self._readers(min(NBD_CONNECTIONS, len(windows)))
        failure, lock = [], threading.Lock()

        def stop():  # each reader stops within its read requests in flight
            progress_record.request_cancel()

        def tick():
            throttle.report(progress_record.done, progress_record.read)
            if cancel is not None and cancel.is_set():
                stop()

        with B.OutputBuffers(hashes, zero_mask, B.hash_words(code)) as out:
            def work(handle):
                while not failure:
                    with lock:
                        if not windows:
                            return
                        w0, w1, *rest = windows.pop(0)
                        w_spans = rest[0] if rest else None
                    h, z = out.at(w0 // block_size)
                    try:
                        if by_spans:
                            handle.sign_spans(offset + w0, blocks_for(w1 - w0, block_size),
                                              block_size, code, as_pairs(w_spans), h, z,
                                              None if keep_view is None else
                                              keep_view[w0:w1], progress_record)
                        else:
                            handle.sign(offset + w0, w1 - w0, block_size, code, h, z,
                                        blocks_for(w1 - w0, block_size), progress_record)
                    except BaseException as exc:  # raised again in the caller's thread
                        failure.append(exc)
                        stop()
                        return

            done = [threading.Event() for _ in handles]

            def run(k):
                try:
                    work(handles[k])
                finally:
                    done[k].set()

            workers = [threading.Thread(target=run, args=(k,), daemon=True,
                                        name="pydr-nbd-sign") for k in range(len(handles))]
            tick()  # a first record before any read; a cancel set there reads nothing
            try:
                start_all(workers, done, stop)
                wait_all(done, tick, stop)
            except KeyboardInterrupt:
                stop()  # Ctrl-C between the two: the readers still finish first
                wait_all(done, lambda: None, stop)
                raise
        real = [e for e in failure if not isinstance(e, Cancelled)]
        if real:
            raise real[0]
        if failure:
            raise Cancelled("cancelled", path=self.name)
        if final_report:
            throttle.report(progress_record.done, progress_record.read, finished=True)
        return 1

    def data_extents(self, offset: int, length: int) -> List[Tuple[int, int]]:
        """The (start, end) pairs of [offset, offset + length) that the
        server does not say read as zeros (base:allocation block status, no
        data read)."""
        pairs = [(start, start + size) for start, size, flags in self.extents(offset, length)
                 if not flags & B.NBD_STATE_ZERO]
        return merge_spans(pairs)

    @property
    def connections(self):
        """Connections open to the server (signing opens more, see sign)."""
        return 1 + len(self._extra or ())

    def _readers(self, count):
        """This device's connection and up to count-1 more, kept for later
        calls; more only where the server offers multi-conn, and as many as
        it takes."""
        if count <= 1 or self._extra is None or not self.handle.can("multi-conn"):
            return [self.handle]
        while not self._extra_full and len(self._extra) < count - 1:
            try:
                self._extra.append(B.Device.open_nbd(self.uri, name=self.name, extra=True))
            except BlockingIOError:  # at its client limit: sign with what we have
                self._extra_full = True
        return [self.handle] + self._extra[:count - 1]

    def extents(self, offset, length, *, dirty=False):
        return self.handle.extents(offset, length, dirty=dirty)

    def encode(self, extents, zero, base_hashes, first_seq, out, block_size=0,
               payload_hashes=None):
        """Encode records of the extents into out (see B.Device.encode);
        the bytes read are added to encoded_bytes."""
        used, done, hused = self.handle.encode(extents, zero, base_hashes, first_seq, out,
                                               block_size, payload_hashes)
        self._count_encoded(used, done)
        return used, done, hused

    def apply_prepare(self, recs, block_size, old_size, new_size, state, scratch, journal):
        return self.handle.apply_prepare(recs, block_size, old_size, new_size, state, scratch,
                                         journal)

    def apply_write(self, recs):
        self.handle.apply_write(recs)

    def pread(self, length, offset):
        return self.handle.pread(length, offset)

    def truncate(self, size):
        if size != self.size:
            raise UnsupportedFile(f"an NBD export cannot be resized (from {self.size} to {size} "
                                  "bytes)", path=self.name)

    def sync(self):
        self.handle.flush()

    def writeback(self):
        pass

    def cache_trusted(self, cache_mtime_ns):
        return False  # an export tells no change time: its blocks are read

    def cache_identity(self):
        return None

    def close(self):
        self.handle.close()
        for extra in self._extra or ():
            extra.close()
        self._extra = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class MemoryDevice(Device):
    """A window of a disk kept in memory by sign(keep=...): it reads as the
    bytes of `buffer` lying at device offset `offset`, so that records are
    encoded from what was hashed without reading the disk again. It has
    encode() and pread() only (it is read-only); a read outside
    [offset, offset + len(buffer)) is a bug in the caller and fails with
    EINVAL at the first offset outside (OSError naming `name`, the source's
    name), never reads as zeros. encoded_bytes stays 0: it reads no disk
    (the bytes were counted by the sign() that kept them)."""

    resizable = False
    is_block = True

    def __init__(self, buffer: Any, offset: int, *, name: Optional[str]) -> None:
        """buffer: anything with the buffer protocol (a numpy array, a
        bytearray), referenced, not copied, until close(). offset: the
        device offset of its first byte. name: the source's name, for
        errors. ValueError for a negative offset."""
        self.name = name
        self.offset = offset
        self.core = B.Device.open_memory(buffer, offset, name=name)
        self.size = self.core.size

    def encode(self, extents: Any, zero: Any, base_hashes: Any, first_seq: int, out: Any,
               block_size: int = 0, payload_hashes: Any = None) -> Tuple[int, int, int]:
        """Encode records of the extents (inside the memory) into out, as
        B.Device.encode; returns (used, done, payload hash words)."""
        return self.core.encode(extents, zero, base_hashes, first_seq, out, block_size,
                                payload_hashes)

    def pread(self, length: int, offset: int) -> bytes:
        """`length` bytes at device offset `offset` (inside the memory)."""
        return self.core.pread(length, offset)

    def close(self):
        if self.core is not None:
            self.core.close()
            self.core = None

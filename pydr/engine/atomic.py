"""Crash-safe file replacement: temp file, fsync, rename, fsync directory.

The temp file of a destination NAME is always ".NAME.pydr-new" beside it,
locked while it is written: a process killed half-way leaves it, and the
next writer of NAME takes it over (a live one is refused), so no temp file
outlives the next run.

An output that is a character device or a FIFO (/dev/null, a pipe a reader
waits on) is written through instead: renaming a file over it would
replace the device for the whole machine. Files pydr makes get an explicit
mode (PRIVATE unless a caller knows better, see copy_mode), whatever the
umask.
"""

import contextlib
import errno
import fcntl
import os
import stat

from ..errors import UnfinishedApply, UnsupportedFile
from .oserrors import NamedFile, naming

PRIVATE = 0o600


def copy_mode(st_mode):
    """The permission bits of a copy of a disk of mode `st_mode` (or of
    PRIVATE when None: not known): its read and write bits, never wider, so
    a private disk (no group or other bits) gives a private copy."""
    return PRIVATE if st_mode is None else stat.S_IMODE(st_mode) & 0o666


def create_file(path, mode=None):
    """Create the empty file `path` (it must not exist) with permission bits
    `mode` (None: PRIVATE), whatever the umask: created 0600, then set with
    fchmod before any data is written, so it is never wider than asked."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE)
    try:
        os.fchmod(fd, PRIVATE if mode is None else mode)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def fsync_dir(path):
    """fsync the directory holding `path`: a rename or unlink in it is durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_safe_dir(directory):
    """Refuse a directory that users other than this one (and root) can
    change, as sshd's StrictModes does: pydr keeps journals, keep notes and
    half-made disks beside a disk under predictable names, and whoever may
    rename entries there could swap one for a link between two system calls
    and turn a write into one anywhere. World-writable with the sticky bit
    (/tmp) is fine: nobody else may rename or remove what pydr made there."""
    directory = os.fspath(directory) or "."
    st = os.stat(directory)
    others_write = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
    if others_write or st.st_uid not in (0, os.geteuid()):
        raise PermissionError(
            errno.EACCES, f"other users may change this directory (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}): pydr keeps its journals and half-made disks "
            "beside a disk and will not here; make it writable by its owner only", directory)


def check_own_file(path):
    """Refuse a file pydr would take for its own (a journal, a step) that
    is not a regular file with one link owned by this user: someone else
    made it, and what it says would be restored onto a disk."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
        raise PermissionError(errno.EACCES, "not a file pydr made (another owner, a link or not "
                              "a regular file): refused; remove it if it is not pydr's", path)


def open_temp(dest, mode=PRIVATE):
    """(fd, path) of the empty temp file ".NAME.pydr-new" beside `dest`,
    locked by this process, of permission bits `mode`; one that a killed
    writer left is taken over."""
    head, tail = os.path.split(os.path.abspath(os.fspath(dest)))
    path = os.path.join(head, f".{tail}.pydr-new")
    check_safe_dir(head)
    # never through a symlink, and never into a file linked elsewhere too:
    # the name is predictable, so someone else may have made it first
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise UnsupportedFile("a temp file that is not a regular file with one link: "
                                  "refused (remove it)", path=path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UnfinishedApply("another pydr is writing this file now", path=dest) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        with naming(dest):
            os.ftruncate(fd, 0)
        os.fchmod(fd, mode)  # before any data: not the umask's, nor a leftover's mode
    except BaseException:
        os.close(fd)
        raise
    return fd, path


def output_kind(path):
    """How `path` is written as an output: "replace" (missing, or a regular
    file: atomically, through a temp file) or "through" (a character device
    or a FIFO: opened and written as it is). A directory (or a symlink to
    one) raises IsADirectoryError; a block device or a socket UnsupportedFile."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "replace"
    if stat.S_ISREG(mode):
        return "replace"
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return "through"
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory: give a file name as output", path)
    raise UnsupportedFile("refusing to write an output over a block device or socket",
                          path=path)


@contextlib.contextmanager
def atomic_write(path, mode=PRIVATE, *, through=True):
    """Yield a binary file; on success it atomically replaces ``path``, a
    file of permission bits `mode`.

    On any error the temp file is removed and ``path`` is left as it was.
    A character device or FIFO is written through (see output_kind), or
    refused with ``through=False`` (a name a peer chose).
    """
    path = os.fspath(path)
    if output_kind(path) == "through":
        if not through:
            raise UnsupportedFile("refusing to write to a device or FIFO named by the peer",
                                  path=path)
        with _write_through(path) as f:
            yield f
        return
    fd, tmp = open_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield NamedFile(f, path)  # a full disk names the file it could not write
            with naming(path):
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path)


@contextlib.contextmanager
def _write_through(path):
    """The character device or FIFO at `path`, open for writing: no temp
    file, no rename (a FIFO waits here for its reader, as `cat > FIFO`)."""
    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        kind = os.fstat(fd).st_mode
        if not (stat.S_ISCHR(kind) or stat.S_ISFIFO(kind)):  # swapped since it was looked at
            raise UnsupportedFile("the output changed while it was opened; run the same "
                                  "command again", path=path)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "wb") as f:
        yield f

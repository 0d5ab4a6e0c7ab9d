"""Crash-safe file replacement: temp file, fsync, rename, fsync directory.

The temp file of a destination NAME is always ".NAME.pydr-new" beside it,
locked while it is written: a process killed half-way leaves it, and the
next writer of NAME takes it over (a live one is refused), so no temp file
outlives the next run.
"""

import contextlib
import fcntl
import os
import stat

from ..errors import UnfinishedApply, UnsupportedFile


def fsync_dir(path):
    """fsync the directory holding `path`: a rename or unlink in it is durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_temp(dest):
    """(fd, path) of the empty temp file ".NAME.pydr-new" beside `dest`,
    locked by this process; one that a killed writer left is taken over."""
    head, tail = os.path.split(os.path.abspath(os.fspath(dest)))
    path = os.path.join(head, f".{tail}.pydr-new")
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
    os.ftruncate(fd, 0)
    return fd, path


@contextlib.contextmanager
def atomic_write(path):
    """Yield a binary file; on success it atomically replaces ``path``.

    On any error the temp file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    fd, tmp = open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path)

"""Copy-on-write clones of files (reflink): XFS with reflink=1, btrfs.

A clone shares every extent with its source until one of them is written,
so it costs O(1) in time and space whatever the file's size."""

import contextlib
import errno
import fcntl
import os

from .atomic import copy_mode
from .devices import open_disk

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)

# what a file system (or a pair of them) that cannot clone answers
NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM,
                 errno.ENOSYS, errno.EBADF)


def clone_file(src, dst):
    """Make `dst` (created; it must not exist) a reflink clone of `src`,
    with its permission bits (pydr.engine.atomic.copy_mode: never wider).
    Returns True, or False where the file systems cannot clone (then `dst`
    does not exist). Other errors (a full disk, an I/O error) raise."""
    fd_src = open_disk(src)
    try:
        fd_dst = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd_dst, copy_mode(os.fstat(fd_src).st_mode))  # before it shares any data
            fcntl.ioctl(fd_dst, FICLONE, fd_src)
        except OSError as exc:
            os.close(fd_dst)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)
            if exc.errno in NOT_SUPPORTED:
                return False
            raise OSError(exc.errno, f"cannot clone {src}: {exc.strerror}", dst) from None
        os.close(fd_dst)
        return True
    finally:
        os.close(fd_src)

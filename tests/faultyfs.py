"""A FUSE file system that serves one real file and fails reads in a range.

Used by the tests to inject real I/O errors (EIO) under pydr, both through
read() and through mmap page faults (which the kernel turns into SIGBUS).

    python faultyfs.py BACKING_FILE MOUNTPOINT BAD_START BAD_END

The mount shows the file as MOUNTPOINT/disk.img; any read that touches
[BAD_START, BAD_END) fails with EIO. Runs in the foreground until unmounted.
"""

import errno
import os
import stat
import sys

from fuse import FUSE, FuseOSError, Operations


class FaultyFile(Operations):
    def __init__(self, backing, bad_start, bad_end):
        self.backing = backing
        self.bad = (bad_start, bad_end)
        self.fd = os.open(backing, os.O_RDONLY)

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path != "/disk.img":
            raise FuseOSError(errno.ENOENT)
        st = os.fstat(self.fd)
        return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": st.st_size,
                "st_mtime": st.st_mtime, "st_ctime": st.st_ctime, "st_atime": st.st_atime}

    def readdir(self, path, fh):
        return [".", "..", "disk.img"]

    def open(self, path, flags):
        if path != "/disk.img":
            raise FuseOSError(errno.ENOENT)
        return 0

    def read(self, path, size, offset, fh):
        lo, hi = self.bad
        if offset < hi and offset + size > lo:
            raise FuseOSError(errno.EIO)
        return os.pread(self.fd, size, offset)


if __name__ == "__main__":
    backing, mountpoint, lo, hi = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    FUSE(FaultyFile(backing, lo, hi), mountpoint, foreground=True, ro=True, nothreads=True)

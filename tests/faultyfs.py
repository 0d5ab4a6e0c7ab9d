"""A FUSE file system that serves one real file and fails reads in a range.

Used by the tests to inject real I/O errors (EIO) under pydr, both through
read() and through mmap page faults (which the kernel turns into SIGBUS).

    python faultyfs.py BACKING_FILE MOUNTPOINT BAD_START BAD_END [read|write]

The mount shows the file as MOUNTPOINT/disk.img; any read (default) or any
write that touches [BAD_START, BAD_END) fails with EIO. In write mode the
file is writable. Runs in the foreground until unmounted.
"""

import errno
import os
import stat
import sys

from fuse import FUSE, FuseOSError, Operations


class FaultyFile(Operations):
    def __init__(self, backing, bad_start, bad_end, mode="read"):
        self.backing = backing
        self.bad = (bad_start, bad_end)
        self.mode = mode
        self.fd = os.open(backing, os.O_RDWR if mode == "write" else os.O_RDONLY)

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path != "/disk.img":
            raise FuseOSError(errno.ENOENT)
        st = os.fstat(self.fd)
        perm = 0o644 if self.mode == "write" else 0o444
        return {"st_mode": stat.S_IFREG | perm, "st_nlink": 1, "st_size": st.st_size,
                "st_mtime": st.st_mtime, "st_ctime": st.st_ctime, "st_atime": st.st_atime}

    def readdir(self, path, fh):
        return [".", "..", "disk.img"]

    def open(self, path, flags):
        if path != "/disk.img":
            raise FuseOSError(errno.ENOENT)
        return 0

    def _hits(self, offset, size):
        lo, hi = self.bad
        return offset < hi and offset + size > lo

    def read(self, path, size, offset, fh):
        if self.mode == "read" and self._hits(offset, size):
            raise FuseOSError(errno.EIO)
        return os.pread(self.fd, size, offset)

    def write(self, path, data, offset, fh):
        if self.mode != "write":
            raise FuseOSError(errno.EROFS)
        if self._hits(offset, len(data)):
            raise FuseOSError(errno.EIO)
        return os.pwrite(self.fd, data, offset)

    def truncate(self, path, length, fh=None):
        if self.mode != "write":
            raise FuseOSError(errno.EROFS)
        os.ftruncate(self.fd, length)

    def fsync(self, path, datasync, fh):
        os.fsync(self.fd)
        return 0

    def flush(self, path, fh):
        return 0


if __name__ == "__main__":
    backing, mountpoint, lo, hi = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) > 5 else "read"
    FUSE(FaultyFile(backing, lo, hi, mode), mountpoint, foreground=True, ro=(mode == "read"),
         nothreads=True)

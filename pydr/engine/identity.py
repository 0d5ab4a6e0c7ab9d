"""A file's identity: what tells whether anything wrote it since it was
last seen (pydr.dr.ownership keeps a replica's, so that a write outside
pydr's cycles is found). Any write changes a file's ctime, and a user cannot
set it back."""

import errno
import os

from . import bindings as B

_AT_FDCWD = -100


def file_identity(path, fd=None):
    """(size, mtime_ns, ctime_ns, inode, device) of the file at `path` (or
    of the open file `fd`: `path` then only names it), as its file system
    has it, or "missing". Read with statx(AT_STATX_FORCE_SYNC) in the C
    core: a FUSE or network file system otherwise answers times its kernel
    set itself when it wrote, which change again when the attributes are
    next fetched."""
    out = B.ffi.new("uint64_t[5]")
    if fd is None:
        rc = B.lib.pydr_file_identity(_AT_FDCWD, os.fsencode(path), out)
    else:
        rc = B.lib.pydr_file_identity(fd, b"", out)
    if rc == -errno.ENOENT:
        return "missing"
    B.raise_for_code(rc, path=path)
    size, mtime, ctime, ino, dev = (int(x) for x in out)
    return (size, mtime, ctime, ino, os.makedev(dev >> 32, dev & 0xFFFFFFFF))

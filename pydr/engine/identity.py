"""A file's identity: what tells whether anything wrote it since it was
last seen (pydr.dr.ownership keeps a replica's, so that a write outside
pydr's cycles is found). Any write changes a file's ctime, and a user cannot
set it back."""

import errno
import os
import struct

_AT_FDCWD = -100
_AT_STATX_FORCE_SYNC = 0x2000
_AT_EMPTY_PATH = 0x1000
_STATX_BASIC_STATS = 0x7FF


def file_identity(path, fd=None):
    """(size, mtime_ns, ctime_ns, inode, device) of the file at `path` (or
    of the open file `fd`: `path` then only names it), as its file system
    has it, or "missing". statx(AT_STATX_FORCE_SYNC) where
    the C library has it: a FUSE or network file system otherwise answers
    times its kernel set itself when it wrote, which change again when the
    attributes are next fetched."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        statx = libc.statx
    except (OSError, AttributeError):
        statx = None
    if statx is not None:  # struct statx: the fields at their fixed offsets
        buf = ctypes.create_string_buffer(256)
        if fd is None:
            rc = statx(_AT_FDCWD, os.fsencode(path), _AT_STATX_FORCE_SYNC, _STATX_BASIC_STATS, buf)
        else:
            rc = statx(fd, b"", _AT_STATX_FORCE_SYNC | _AT_EMPTY_PATH, _STATX_BASIC_STATS, buf)
        err = ctypes.get_errno()
        if rc == 0:
            ino, size = struct.unpack_from("=QQ", buf, 32)
            ctime_s, ctime_ns = struct.unpack_from("=qI", buf, 96)
            mtime_s, mtime_ns = struct.unpack_from("=qI", buf, 112)
            dev_major, dev_minor = struct.unpack_from("=II", buf, 136)
            return (size, mtime_s * 10**9 + mtime_ns, ctime_s * 10**9 + ctime_ns, ino,
                    os.makedev(dev_major, dev_minor))
        if err == errno.ENOENT:
            return "missing"
    try:
        st = os.stat(path) if fd is None else os.fstat(fd)
    except FileNotFoundError:
        return "missing"
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)

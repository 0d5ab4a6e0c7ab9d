"""Files beneath a directory fd, opened so that they cannot leave it.

A path is opened relative to an open directory with openat2(RESOLVE_BENEATH
| RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) where the kernel has it, or
component by component with O_NOFOLLOW and dir_fd= where it does not (Linux
before 5.6, or a seccomp filter that refuses the call). Either way "..",
absolute paths and symlinks anywhere on the way are refused by the kernel at
the moment of the open, never checked first and trusted later (the way
OpenSSH's sftp-server and runc's securejoin serve a subtree).

A regular file is opened with O_NONBLOCK and checked with fstat: devices,
FIFOs and sockets are refused without blocking, and so is a file with more
than one link (a hard link could lead out of the directory).
"""

import errno
import fcntl
import os
import stat

from ..errors import UnsupportedFile
from . import bindings as B

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# None: not tried yet; then whether this kernel lets us call openat2.
# PYDR_BENEATH=walk forces the fallback (tests cover both ways).
_openat2 = False if os.environ.get("PYDR_BENEATH") == "walk" else None


def split(rel):
    """The components of a relative path, refusing "..", absolute paths,
    NUL and empty names."""
    if not isinstance(rel, str) or "\x00" in rel or rel.startswith("/"):
        raise PermissionError(errno.EACCES, "not a path inside the directory", str(rel))
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise PermissionError(errno.EACCES, "not a path inside the directory", rel)
    return parts


def _refused(exc, rel):
    """ELOOP/EXDEV from a confined open: a symlink or ".." on the way."""
    if exc.errno in (errno.ELOOP, errno.EXDEV):
        return PermissionError(errno.EACCES, "a symlink on the way is not followed", rel)
    return type(exc)(exc.errno, exc.strerror, rel)


def _walk_refused(exc, dir_fd, name, rel):
    """O_NOFOLLOW|O_DIRECTORY on a symlink says ENOTDIR: say what openat2 says."""
    if exc.errno == errno.ENOTDIR:
        try:
            if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                exc = OSError(errno.ELOOP, "a symlink")
        except OSError:
            pass
    return _refused(exc, rel)


def open_beneath(dir_fd, rel, flags, mode=0o600):
    """A file descriptor for `rel` beneath the directory `dir_fd` (open(2)
    flags and mode); PermissionError where the path would leave it."""
    global _openat2
    parts = split(rel)
    if _openat2 is not False:
        fd = B.lib.pydr_open_beneath(dir_fd, "/".join(parts).encode(), flags | os.O_CLOEXEC, mode)
        if fd >= 0:
            _openat2 = True
            return fd
        if -fd in (errno.ENOSYS, errno.EPERM) and _openat2 is None:
            _openat2 = False  # no openat2 here: walk (an EPERM it makes itself stays)
        else:
            raise _refused(OSError(-fd, os.strerror(-fd)), rel)
    return _walk(dir_fd, parts, flags, mode, rel)


def _walk(dir_fd, parts, flags, mode, rel):
    current = dir_fd
    try:
        for name in parts[:-1]:
            try:
                nxt = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=current)
            except OSError as exc:
                raise _walk_refused(exc, current, name, rel) from None
            if current != dir_fd:
                os.close(current)
            current = nxt
        try:
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=current)
        except OSError as exc:
            raise _walk_refused(exc, current, parts[-1], rel) from None
    finally:
        if current != dir_fd:
            os.close(current)


def open_dir(dir_fd, rel, create=False):
    """A directory fd for `rel` beneath `dir_fd` ("" is `dir_fd` itself, a
    new fd); with `create`, missing directories are made (0700)."""
    if rel in ("", "."):
        return os.dup(dir_fd)
    try:
        return open_beneath(dir_fd, rel, _DIR_FLAGS)
    except FileNotFoundError:
        if not create:
            raise
    current = os.dup(dir_fd)
    try:
        for name in split(rel):
            try:
                nxt = open_beneath(current, name, _DIR_FLAGS)
            except FileNotFoundError:
                try:
                    os.mkdir(name, 0o700, dir_fd=current)
                except FileExistsError:
                    pass
                nxt = open_beneath(current, name, _DIR_FLAGS)
            os.close(current)
            current = nxt
    except BaseException:
        os.close(current)
        raise
    return current


def check_regular(fd, rel):
    """Refuse what is not a regular file with one link (fd is closed then)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", rel)
        raise UnsupportedFile("not a regular file (a device, FIFO or socket): refused", path=rel)
    if st.st_nlink > 1:
        os.close(fd)
        raise PermissionError(errno.EACCES, f"has {st.st_nlink} hard links: refused "
                              "(one of them may lead out of the directory)", rel)
    return st


def open_file(dir_fd, rel, flags, mode=0o600):
    """A regular file beneath `dir_fd` (see check_regular), opened without
    blocking on a FIFO or device; the returned fd is blocking again."""
    try:
        fd = open_beneath(dir_fd, rel, flags | os.O_NONBLOCK | os.O_NOCTTY, mode)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO without a reader, or a device that is not there
            raise UnsupportedFile("not a regular file (a device, FIFO or socket): refused",
                                  path=rel) from None
        raise
    check_regular(fd, rel)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def parent_and_name(dir_fd, rel, create=False):
    """(fd of the directory holding `rel`, its last name), the directory
    opened beneath `dir_fd`."""
    parts = split(rel)
    return open_dir(dir_fd, "/".join(parts[:-1]), create=create), parts[-1]


def lstat(dir_fd, rel):
    """os.lstat of `rel` beneath `dir_fd`, or None when it does not exist."""
    try:
        parent, name = parent_and_name(dir_fd, rel)
    except FileNotFoundError:
        return None
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(parent)

"""Where ``pydr serve`` may touch files: anywhere (no --root: the peer is
trusted as the user it runs as), or beneath DIR, confined by construction.

Beneath DIR a request's path names a file in a directory that is opened
from DIR's fd without following any symlink (pydr.engine.beneath); the
file itself is opened from that directory fd the same way. The engine,
which works on paths, is handed the directory pinned by its fd,
``/proc/self/fd/N/NAME``: derived names (the undo journal, its keep note,
the temp file) are looked up in that very directory, never through a path
the peer could have changed since. What cannot be pinned is checked: a
derived name must be absent or a regular file with one link.

Error frames name paths relative to DIR (scrub()), never DIR itself.
"""

import errno
import os
import re
import stat

from ..engine import beneath
from ..engine import names
from ..engine.atomic import PRIVATE, create_file
from ..engine.devices import FileDevice, open_disk
from ..errors import PydrError, UnsupportedFile
from . import protocol as P

DRILL_MARKER = ".pydr-drill"  # the disks a test failover wrote into a directory
_PINNED = re.compile(r"/proc/self/fd/(\d+)(/?)")


class PinnedDevice(FileDevice):
    """A file opened beneath DIR, whose undo journal lives beside it in its
    pinned directory."""

    def __init__(self, place, fd):
        super().__init__(place.path, fd=fd, is_block=False)
        self.owned = True  # closed with the device
        self.place = place

    @property
    def journal_path(self):
        return self.place.sibling_path(names.UNDO)


class _JournalTarget:
    def __init__(self, place):
        self.name = place.path
        self.journal_path = place.sibling_path(names.UNDO)

    def __fspath__(self):
        return self.name


class Place:
    """One file a request names. Confined: `dir_fd` (the directory, opened
    beneath DIR), `name` in it, `rel` (its path relative to DIR, for
    messages). Unconfined: `path` as the peer gave it."""

    def __init__(self, scope, rel, dir_fd=None, name=None):
        self.scope, self.rel, self.dir_fd, self.name = scope, rel, dir_fd, name
        self.confined = dir_fd is not None
        self.path = f"/proc/self/fd/{dir_fd}/{name}" if self.confined else rel
        if not self.confined:
            self.name = os.path.basename(rel)

    def sibling_path(self, suffix):
        """The engine's path of the hidden file `suffix` of this one."""
        return names.beside(self.path, suffix)

    def lstat(self, name=None):
        """lstat of this file (or `name` beside it), None if absent."""
        try:
            if self.confined:
                return os.stat(name or self.name, dir_fd=self.dir_fd, follow_symlinks=False)
            return os.stat(os.path.join(os.path.dirname(self.path), name) if name else self.path)
        except FileNotFoundError:
            return None

    def exists(self, name=None):
        return self.lstat(name) is not None

    def unlink(self):
        if self.confined:
            os.unlink(self.name, dir_fd=self.dir_fd)
        else:
            os.unlink(self.path)

    def journal_target(self):
        """What the engine's journal functions take for this file: its
        journal and keep note are looked up in the pinned directory."""
        return _JournalTarget(self) if self.confined else self.path

    def open(self, flags, mode=0o600, name=None):
        """A file descriptor: beneath DIR, a regular file with one link only."""
        if not self.confined:
            if name is None:
                return open_disk(self.path, flags)  # a FIFO is refused, never waited on
            return os.open(os.path.join(os.path.dirname(self.path), name), flags | os.O_CLOEXEC,
                           mode)
        try:
            return beneath.open_file(self.dir_fd, name or self.name, flags, mode)
        except OSError as exc:  # named from DIR, not from the directory fd
            raise type(exc)(exc.errno, exc.strerror,
                            self.scope.display(self.dir_fd, name or self.name)) from None
        except PydrError as exc:
            exc.path = self.scope.display(self.dir_fd, name or self.name)
            raise

    def proc_path(self, fd):
        """A path that reopens the file open as `fd` (not a lookup by name)."""
        return f"/proc/self/fd/{fd}" if self.confined else self.path

    def device(self, write=False, create=False, mode=None):
        """(the file as an engine device, created) -- created, with
        permission bits `mode` (None: private), where it did not exist and
        `create` is given."""
        if not self.confined:
            created = create and not os.path.lexists(self.path)
            if created:
                create_file(self.path, mode)
            return FileDevice(self.path, write=write), created
        flags = os.O_RDWR if write else os.O_RDONLY
        created = False
        if create:
            try:
                fd = self.open(flags | os.O_CREAT | os.O_EXCL, PRIVATE)
                created = True
            except FileExistsError:
                fd = self.open(flags)
            else:
                os.fchmod(fd, PRIVATE if mode is None else mode)
        else:
            fd = self.open(flags)
        return PinnedDevice(self, fd), created

    def check_sidecars(self, *suffixes):
        """Each hidden file `suffix` of this one must be absent or a regular
        file with one link: the engine opens them by name."""
        if not self.confined:
            return
        for suffix in suffixes:
            name = f".{self.name}{suffix}"
            st = self.lstat(name)
            if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1):
                raise UnsupportedFile("not a regular file with one link: refused",
                                      path=self.scope.display(self.dir_fd, name))


class Scope:
    """The files one server may touch. Holds the fds it opened for the
    request being served; release() closes them."""

    def __init__(self, root=None):
        self.root = os.path.realpath(root) if root is not None else None
        self.fd = None
        if self.root is not None:
            self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dirs = {}  # fd -> its path relative to DIR ("" for DIR itself)

    def relative(self, path):
        """`path` relative to DIR: relative paths are taken from DIR, an
        absolute one must lie in it; ".." never."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise P.ProtocolError("bad path")
        if os.path.isabs(path):
            if not (path + "/").startswith(self.root + "/"):
                raise PermissionError(errno.EACCES, "outside the directory this server may use",
                                      path)
            path = path[len(self.root):]
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise PermissionError(errno.EACCES, "outside the directory this server may use",
                                  path)
        return "/".join(parts)

    def name_of(self, path):
        """`path` as the peer means it: relative to DIR beneath --root."""
        if self.root is None:
            if not isinstance(path, str) or not path or "\x00" in path:
                raise P.ProtocolError("bad path")
            return path
        return self.relative(path)

    def place(self, path, create_dirs=False):
        """The Place of a path the peer sent."""
        if self.root is None:
            if not isinstance(path, str) or not path or "\x00" in path:
                raise P.ProtocolError("bad path")
            if create_dirs:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            return Place(self, path)
        rel = self.relative(path)
        head, _, name = rel.rpartition("/")
        try:
            dir_fd = beneath.open_dir(self.fd, head, create=create_dirs)
        except PermissionError:
            raise PermissionError(errno.EACCES, "outside the directory this server may use "
                                  "(a symlink on the way is not followed)", rel) from None
        self.dirs[dir_fd] = head
        return Place(self, rel, dir_fd, name)

    def hold(self, fd, rel):
        """Remember an fd opened for this request (closed by release())."""
        self.dirs[fd] = rel
        return fd

    def display(self, dir_fd, name):
        head = self.dirs.get(dir_fd, "")
        return f"{head}/{name}" if head else name

    def release(self):
        for fd in self.dirs:
            try:
                os.close(fd)
            except OSError:
                pass
        self.dirs = {}

    def close(self):
        self.release()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def scrub(self, payload):
        """An ERROR frame's JSON with paths relative to DIR: no pinned
        /proc/self/fd path and no absolute root reaches the peer."""
        if self.root is None:
            return payload

        def unpin(match):
            rel = self.dirs.get(int(match.group(1)), "?")
            if match.group(2):
                return f"{rel}/" if rel else ""
            return rel or "."

        def relative_text(text):
            text = _PINNED.sub(unpin, text)
            return text.replace(self.root + "/", "").replace(self.root, ".")

        return {k: relative_text(v) if isinstance(v, str) else v for k, v in payload.items()}


def drill_name_ok(name):
    """A name a drill marker may hold: one file of its directory, printable."""
    return bool(name) and name not in (".", "..", DRILL_MARKER) and "/" not in name \
        and not any(ord(c) < 32 or ord(c) == 127 for c in name)


def parent_rel(place):
    if place.confined:
        return place.rel.rpartition("/")[0]
    return os.path.normpath(os.path.dirname(os.path.abspath(place.path)))


def open_drill_dir(drill):
    if drill.confined:
        return beneath.open_dir(drill.dir_fd, drill.name)
    return os.open(drill.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def drill_listing(drill, dir_fd):
    """The names a drill marker lists that are plain names (others are
    ignored: the marker may have been written by someone else); None when
    the directory has no marker (no drill made it)."""
    try:
        if drill.confined:
            fd = beneath.open_file(dir_fd, DRILL_MARKER, os.O_RDONLY)
        else:
            fd = os.open(DRILL_MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        lines = os.fsdecode(f.read(1 << 20)).split("\n")
    if not drill.confined:
        drill.rel = os.path.normpath(os.path.abspath(drill.path))
    return {name for name in lines if drill_name_ok(name)}

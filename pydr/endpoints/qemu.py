"""QEMU disks: an NBD export (``nbd://HOST[:PORT]/EXPORT``,
``nbd+unix:///EXPORT?socket=PATH``: a running QEMU, qemu-nbd or
qemu-storage-daemon), and a disk image file in a QEMU format (qcow2, vmdk,
vhdx, vpc, vdi) that pydr reads and writes through a qemu-nbd child of its
own. Either way the engine works through libnbd (pydr.engine.devices)."""

import contextlib
import os

from ..engine import names
from ..engine.atomic import create_file
from ..engine.devices import NbdDevice
from ..errors import UnsupportedFile
from .base import Endpoint, InProcess
from .local import LocalEndpoint

SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+vsock://")


def is_nbd_uri(spec):
    return isinstance(spec, str) and spec.startswith(SCHEMES)


def qmp_connection(socket_path):
    """A new QMP connection to the QEMU (or qemu-storage-daemon) listening
    on the unix socket `socket_path` (pydr.transport.qemu.Qmp: execute(),
    alive(), close()). ConnectionRefusedError when nothing answers there."""
    from ..transport.qemu import Qmp

    return Qmp(socket_path)


def create_image(path, size, fmt="qcow2"):
    """A new empty image of `fmt` and virtual `size` bytes at `path`, private
    (0600: qemu-img keeps the bits of a file it truncates; qemu-img create,
    QemuError naming `path` when it fails)."""
    from ..transport.qemu import qemu_img

    create_file(path)
    qemu_img("create", "-q", "-f", fmt, path, str(size), path=path)


class NbdEndpoint(InProcess, Endpoint):
    """An NBD export: a disk of fixed size with no files beside it (its undo
    journals and steps live on this machine)."""

    def __init__(self, uri):
        super().__init__(uri)

    @property
    def path(self):
        return self.spec

    def journal_target(self):
        return _JournalOnly(NbdDevice.journal_for(self.spec))

    @contextlib.contextmanager
    def engine_disk(self, *, write=False, size=None, bitmap=None):
        with NbdDevice(self.spec, write=write, bitmap=bitmap) as dev:
            yield dev

    def exists(self):
        try:
            with self.engine_disk():
                return True
        except OSError:
            return False

    def size(self):
        with self.engine_disk() as dev:
            return dev.size

    def _at(self, path):
        raise UnsupportedFile("an NBD export has no files beside it", path=self.spec)

    def rename(self, dest):
        raise UnsupportedFile("an NBD export cannot be renamed", path=self.spec)


class _JournalOnly:
    """What choose_undo_path needs of a target: where its journal lives."""

    def __init__(self, journal_path):
        self.journal_path = journal_path


class QemuImageEndpoint(LocalEndpoint):
    """A disk image file in a QEMU format on this machine. Its blocks are
    read and written through a qemu-nbd that pydr starts on a private unix
    socket (read-only unless written to) and stops when the work ends; its
    undo journal is beside the file, as for raw files."""

    def __init__(self, path, fmt):
        super().__init__(path)
        self.format = fmt
        self.tracking = "qcow2" if fmt == "qcow2" else None  # persistent dirty bitmaps
        #: a service's pydr.dr.warm.DiskWarm: `qemu-img info` read once while the
        #: file is unchanged (None: every call runs qemu-img)
        self.warm = None

    def _info(self):
        from ..transport.qemu import image_info

        if self.warm is None:
            return image_info(self.path, self.format)
        return self.warm.image_info(self.path, lambda: image_info(self.path, self.format))

    def _at(self, path):
        from ..transport.qemu import detect_format

        fmt = detect_format(path)
        return QemuImageEndpoint(path, fmt) if fmt != "raw" else LocalEndpoint(path)

    @contextlib.contextmanager
    def engine_disk(self, *, write=False, size=None, bitmap=None, path=None):
        from ..transport.qemu import QemuNbd, qemu_img

        path = path or self.path
        if write and not os.path.exists(path):
            if size is None:
                raise FileNotFoundError(2, "disk image not found", path)
            create_image(path, size, self.format)
        with QemuNbd(path, self.format, read_only=not write, bitmap=bitmap) as server:
            dev = server.connect(lambda uri: NbdDevice(
                uri, name=path, write=write, bitmap=bitmap,
                journal=names.beside(path, names.UNDO), lock=path))
            with dev:
                if write and size is not None and dev.size != size:
                    raise UnsupportedFile(f"the {self.format} image is {dev.size} bytes and the "
                                          f"source {size}: resize it first (qemu-img resize)",
                                          path=path)
                yield dev

    def size(self):
        """Its virtual size in bytes, from one `qemu-img info` (no qemu-nbd
        started: a cycle asks before its cut). An image qemu-img cannot
        describe is opened as a read would open it, so that the error is
        the same (FormatError, FileNotFoundError, ...)."""
        from ..transport.qemu import QemuError

        if os.path.isfile(self.path):
            with contextlib.suppress(QemuError, KeyError, TypeError, ValueError):
                return int(self._info()["virtual-size"])
        with self.engine_disk() as dev:
            return dev.size

    # -- persistent dirty bitmaps (changed-block tracking, pydr.dr.tracking) ---------
    def bitmaps(self):
        """{name: flags} of the image's persistent dirty bitmaps."""
        from ..transport.qemu import bitmaps_of

        return bitmaps_of(self._info())

    def bitmap(self, *operations, name):
        """qemu-img bitmap OPERATIONS (--add [-g BYTES: its granularity],
        --enable, --disable, --remove, --merge SOURCE, which may be of another
        granularity) on the bitmap `name`; the image must not be in use."""
        from ..transport.qemu import qemu_img

        if self.warm is not None:
            self.warm.forget_info()  # it changes the image, even when it fails part-way
        qemu_img("bitmap", *operations, "-f", self.format, self.path, name, path=self.path)

    def snapshot(self):
        return None  # a reflink clone of a QEMU image is not a point-in-time disk of its own

    def materialize(self, steps, dest, *, drill=False, threads=None, method="auto",
                    progress=None, cancel=None):
        """The point as an image of the same format: the latest state (the
        baseline after a failover) cloned (reflink) where the file system
        can, else copied through qemu-nbd, into a new image beside `dest`;
        the undo steps rolled back onto it through qemu-nbd; then renamed."""
        import errno

        from ..engine import journal as J
        from ..engine.atomic import fsync_dir
        from ..engine.clone import clone_file
        from ..engine.resync import resync

        if method == "qcow2":
            raise UnsupportedFile(f"the replica is a {self.format} image already: its points are "
                                  "images of that format", path=self.spec,
                                  hint="leave out --as qcow2")
        self.check_same_place(dest)
        if drill and os.path.lexists(dest.path):
            raise FileExistsError(errno.EEXIST, "a test failover does not overwrite files",
                                  dest.path)
        os.makedirs(os.path.dirname(dest.path), exist_ok=True)
        tmp = names.beside(dest.path, names.NEW)
        for leftover in (tmp, names.beside(tmp, names.UNDO)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        try:
            latest = names.latest_state(self.path)
            used = "copy"
            if method != "copy" and clone_file(latest, tmp):
                used = "reflink"
            elif method == "reflink":
                raise UnsupportedFile(f"the file system cannot clone {latest} into "
                                      f"{os.path.dirname(dest.path)}", path=dest.path,
                                      hint="leave out --reflink to copy")
            with self.engine_disk(path=latest) as src:
                with self.engine_disk(write=True, size=src.size, path=tmp) as out:
                    if used == "copy":
                        resync(src, out, threads=threads, progress=progress, cancel=cancel)
                    for step in steps:  # newest first; checked whole before it is written
                        J.rollback(out, step.path, step=True)
                    out.sync()
            os.replace(tmp, dest.path)
            fsync_dir(dest.path)
        except BaseException:
            for leftover in (tmp, names.beside(tmp, names.UNDO)):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
            raise
        return used


class QmpEndpoint(InProcess, Endpoint):
    """A block node of a running QEMU or qemu-storage-daemon,
    ``qmp:SOCKET:NODE``: read -- never written -- through a point-in-time
    fleecing export over NBD that pydr sets up by QMP for each use
    (pydr.transport.qemu.Fleece). Its changed-block tracking (dirty
    bitmaps added and rotated by QMP) is pydr.dr.tracking's."""

    tracking = "qmp"  # dirty bitmaps added and rotated by QMP

    def __init__(self, socket_path, node, nbd_socket=None):
        super().__init__(f"qmp:{socket_path}:{node}" + (f"?nbd={nbd_socket}" if nbd_socket
                                                        else ""))
        self.socket, self.node, self.nbd_socket = socket_path, node, nbd_socket
        #: a service's pydr.dr.warm.DiskWarm: one QMP connection for the cycle's
        #: commands and the fleece overlay's template (None: each use connects)
        self.warm = None

    @classmethod
    def parse(cls, spec):
        """qmp:SOCKET:NODE, or qmp:SOCKET:NODE?nbd=PATH when QEMU runs an NBD
        server already (on the unix socket PATH): pydr then adds its export
        there instead of starting one."""
        body, _, query = spec[len("qmp:"):].partition("?")
        socket_path, sep, node = body.rpartition(":")
        nbd = query[len("nbd="):] if query.startswith("nbd=") else None
        if not sep or not socket_path or not node or (query and not nbd):
            raise ValueError(f"a live disk is qmp:SOCKET:NODE[?nbd=PATH], not {spec!r}")
        return cls(os.path.abspath(socket_path), node,
                   os.path.abspath(nbd) if nbd else None)

    @property
    def path(self):
        return self.spec

    def qmp(self):
        """A context manager giving a QMP connection to the disk's QEMU: a
        new one closed after, or the warm entry's, kept (and dropped if a
        command fails on the wire: the stream may be out of step)."""
        from ..transport.qemu import Qmp

        if self.warm is None:
            return Qmp(self.socket)
        return _Borrowed(self.warm, self.socket)

    @contextlib.contextmanager
    def engine_disk(self, *, write=False, size=None, bitmap=None, actions=()):
        from ..transport.qemu import Fleece

        if write:
            raise UnsupportedFile("a live disk is read by pydr, never written", path=self.spec)
        with self.qmp() as q:
            fleece = Fleece(q, self.node, actions=actions, bitmap=bitmap,
                            nbd_socket=self.nbd_socket,
                            template=None if self.warm is None else self.warm.template)
            try:
                with NbdDevice(fleece.uri, name=self.spec, bitmap=bitmap) as dev:
                    yield dev
            finally:
                fleece.close()

    def bitmaps(self):
        """{name: info} of the node's dirty bitmaps (recording, busy, count, ...)."""
        from ..transport.qemu import node_bitmaps

        with self.qmp() as q:
            return node_bitmaps(q, self.node)

    def clear_left_fleeces(self):
        """Remove what a killed pydr left of its fleeces of this node (its
        backup job keeps pydr's bitmaps busy): pydr.transport.qemu's."""
        from ..transport.qemu import clear_left_fleeces

        with self.qmp() as q:
            return clear_left_fleeces(q, self.node, nbd_socket=self.nbd_socket)

    def bitmap_command(self, command, **arguments):
        """A block-dirty-bitmap-* QMP command on this node."""
        with self.qmp() as q:
            return q.execute(command, node=self.node, **arguments)

    def exists(self):
        from ..transport.qemu import node_size

        try:
            with self.qmp() as q:
                node_size(q, self.node)
            return True
        except OSError:
            return False

    def size(self):
        from ..transport.qemu import node_size

        with self.qmp() as q:
            return node_size(q, self.node)

    @property
    def identity(self):
        return f"qmp:{os.path.realpath(self.socket)}:{self.node}"

    def _at(self, path):
        raise UnsupportedFile("a live disk has no files beside it", path=self.spec)

    def rename(self, dest):
        raise UnsupportedFile("a live disk cannot be renamed", path=self.spec)


class _Borrowed:
    """A warm entry's QMP connection, lent for one use (not closed after);
    an error on the wire (not a QMP error answer) closes it."""

    def __init__(self, warm, socket_path):
        self.warm, self.socket_path = warm, socket_path

    def __enter__(self):
        return self.warm.qmp(self.socket_path)

    def __exit__(self, kind, exc, tb):
        from ..transport.qemu import QmpError

        if exc is not None and not isinstance(exc, QmpError):
            self.warm.broken()

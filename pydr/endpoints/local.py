"""A disk on this machine: a regular file or a block device, opened by this
process. The engine does the work in place."""

import contextlib
import errno
import os

from ..engine import bindings as B
from ..engine import names
from ..engine.atomic import atomic_write, fsync_dir
from ..engine.devices import open_disk
from ..errors import UnsupportedFile
from .base import Endpoint, InProcess, StepChainPlace

class LocalEndpoint(StepChainPlace, InProcess, Endpoint):
    """A raw disk: a regular file or a block device (QEMU-format files are
    QemuImageEndpoint, pydr.endpoints.qemu)."""

    place = None

    def __init__(self, path):
        path = os.fspath(path)
        super().__init__(os.path.abspath(path) if path else path)
        self._path = self.spec

    @property
    def path(self):
        return self._path

    @property
    def local_path(self):
        return self._path

    @property
    def identity(self):
        return os.path.realpath(self._path)

    def _at(self, path):
        return LocalEndpoint(path)

    # -- the disk ---------------------------------------------------------------
    def exists(self):
        return os.path.lexists(self._path)

    def size(self):
        try:
            fd = open_disk(self._path)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "disk not found", self._path) from None
        try:
            return B.fd_size(fd, self._path)[0]
        finally:
            os.close(fd)

    def engine_disk(self, *, write=False, size=None, bitmap=None):
        return contextlib.nullcontext(self._path)  # the engine opens (and creates) files itself

    def file_identity(self):
        from ..engine.identity import file_identity

        return file_identity(self._path)

    def snapshot(self):
        """A reflink clone beside the disk (.NAME.pydr-snap), or None where
        the file system cannot clone (or this is not a regular file)."""
        import stat

        from ..engine.clone import clone_file

        if not stat.S_ISREG(os.stat(self._path).st_mode):
            return None
        snap = names.beside(self._path, names.SNAP)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(snap)
        try:
            cloned = clone_file(self._path, snap)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None  # e.g. a read-only directory: no snapshot
            raise
        return LocalEndpoint(snap) if cloned else None

    # -- files beside it ----------------------------------------------------------
    def rename(self, dest):
        os.replace(self._path, dest.path)  # atomic, in one directory
        fsync_dir(dest.path)

    def remove_many(self, endpoints):
        for ep in endpoints:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ep.path)

    def remove_drill(self, disks):
        self.remove_many(disks)
        with contextlib.suppress(OSError):
            os.rmdir(self._path)  # only if the drill left it empty

    def materialize(self, steps, dest, *, drill=False, threads=None, method="auto",
                    progress=None, cancel=None):
        from ..engine.restore import materialize_file

        self.check_same_place(dest)
        if drill and os.path.lexists(dest.path):
            raise FileExistsError(errno.EEXIST, "a test failover does not overwrite files",
                                  dest.path)
        os.makedirs(os.path.dirname(dest.path), exist_ok=True)
        latest = names.latest_state(self._path)
        if method == "qcow2":
            from ..transport.overlay import materialize_overlay

            return materialize_overlay(latest, [s.path for s in steps], dest.path)
        return materialize_file(latest, [s.path for s in steps], dest.path, threads,
                                method=method, progress=progress, cancel=cancel)

    def backing(self):
        from ..transport.overlay import backing_of

        return backing_of(self._path) if os.path.isfile(self._path) else None

    def flatten(self, backing):
        from ..transport.overlay import flatten

        flatten(self._path, backing.path)

    # -- files as streams; engine work --------------------------------------------
    def open_read(self):
        return open(self._path, "rb")

    def open_write(self):
        return atomic_write(self._path)

    def check_not_over(self, out):
        target = getattr(out, "local_path", None)
        if target and os.path.exists(target) and os.path.exists(self._path) \
                and os.path.samefile(target, self._path):
            raise UnsupportedFile("refusing to write the signature over the image itself",
                                  path=target)


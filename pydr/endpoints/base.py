"""The endpoint interface: what pydr asks of "a disk somewhere".

An implementation answers these for one kind of place. The operations come
in four small groups; the optional ones are capabilities, and a caller asks
for them rather than for the kind of place.

The disk
    ``exists()``, ``size()``.
The two roles of a resync (pydr.transport.roles describes them)
    ``open_source(...)``: signs the disk window by window (fine 4 KiB hashes,
    coarse digests per group of them) and reads the blocks that differ.
    ``open_target(...)``: answers with its own hashes where the coarse
    digests differ and applies records under the undo journal.
    pydr.endpoints.transfer pumps one into the other.
Files beside it, at the same place
    ``sibling(name)``, ``child(name)``, ``sidecar(suffix)``, ``step_spec(...)``
    name other files there; ``rename(dest)`` (atomic), ``remove_many(eps)``.
Files as streams, and engine work done where the data is
    ``open_read()``, ``open_write()``, ``write_signature(out, ...)``,
    ``make_delta(out, ...)``, ``apply_delta(stream, ...)``.
Capabilities
    ``in_process``: this process reads and writes the disk itself
    (InProcess: a local file, a QEMU image, an NBD export); a resync
    between two such uses the engine's own resync, with its signature cache
    and change-tracking extents.
    ``local_path``: the path of a file this process opens directly, else None.
    ``snapshot()``: a point-in-time clone beside the disk, or None.
    StepChainPlace: the place can make a step chain's points itself
    (``materialize``, ``remove_drill``, ``backing``, ``flatten``); only
    pydr.dr.pointstores.stepchain asks for it.
"""

import contextlib
import os

from ..engine import names
from ..engine.progress import Record
from ..engine.signatures import signature
from ..errors import InvalidState, UnsupportedFile


class Endpoint:
    """A disk or file somewhere. ``spec`` is how pydr names it (stored in the
    vault, shown in messages); ``place`` is hashable and equal for endpoints
    whose files one request can rename, remove or materialise together."""

    local_path = None
    place = None
    in_process = False  # see InProcess
    tracking = None     # the kind of changed-block tracking it offers (pydr.dr.tracking)

    def __init__(self, spec):
        self.spec = spec

    def __str__(self):
        return self.spec

    def __repr__(self):
        return f"<{type(self).__name__} {self.spec}>"

    def __eq__(self, other):
        return isinstance(other, Endpoint) and self.spec == other.spec

    def __hash__(self):
        return hash(self.spec)

    @property
    def identity(self):
        """What two specs of the same disk share (a real path, for files here)."""
        return self.spec

    # -- the disk ---------------------------------------------------------------
    def exists(self):
        raise NotImplementedError

    def size(self):
        """Its size in bytes; FileNotFoundError if it is missing, and
        UnfinishedApply if an interrupted apply is pending on it."""
        raise NotImplementedError

    def open_source(self, *, block_size, threads, progress=None, window=None, group=None,
                    bwlimit=None, compress=False):
        raise NotImplementedError

    def open_target(self, *, block_size, result_size, threads, keep_undo=None, progress=None,
                    streams=0, bwlimit=None, compress=False, mode=None):
        """``keep_undo``: specs at this place where the committed undo journal
        may be kept (a recovery-point step); the first that holds no
        committed step is taken, and TargetResult.kept says which.
        ``mode``: the permission bits of a target created (the source
        role's ``mode``; None: private)."""
        raise NotImplementedError

    def snapshot(self):
        return None

    def file_identity(self):
        """(size, mtime_ns, ctime_ns, inode, device) of the disk's file where
        it is, "missing", or None where that cannot be told (an NBD export,
        a server that predates the question). Any write changes the ctime."""
        return None

    # -- files beside it ----------------------------------------------------------
    def _at(self, path):
        """An endpoint of the same kind at another path of this place."""
        raise NotImplementedError

    @property
    def path(self):
        raise NotImplementedError

    def sibling(self, name):
        return self._at(os.path.join(os.path.dirname(self.path), name))

    def child(self, name):
        return self._at(os.path.join(self.path, name))

    def sidecar(self, suffix):
        """The hidden file pydr keeps beside this disk (pydr.engine.names)."""
        return self._at(names.beside(self.path, suffix))

    def step_spec(self, item, idx, number, vault_dir):
        """Where the undo step `number` of disk `idx` of `item` is kept when
        this endpoint is a replica: in the vault when this process applies
        the records, beside the replica where the host does."""
        return os.path.join(vault_dir, "undo", item, f"{idx}-{number}.undo")

    def same_place(self, other):
        return self.place == other.place

    def check_same_place(self, other):
        if not self.same_place(other):
            where = self.place or "this machine"
            raise InvalidState(f"a point of a replica on {where} is materialised there"
                               + (f": give {self.place}:DIR" if self.place else ""),
                               path=str(other))

    def rename(self, dest):
        raise NotImplementedError

    def remove_many(self, endpoints):
        raise NotImplementedError

    # -- files as streams; engine work where the data is ------------------------
    def open_read(self):
        raise NotImplementedError

    def open_write(self):
        """A binary file that replaces this one atomically when it is closed
        without an error; on an error the old file stays."""
        raise NotImplementedError

    def write_signature(self, out, *, block_size, algorithm, threads=None, progress=None,
                        cancel=None, use_mmap=True):
        """Sign this disk into `out` (an Endpoint, or a binary stream such as
        stdout). Returns a SignResult."""
        raise NotImplementedError

    def signature(self, *, block_size, threads=None):
        """This disk's xxh3-128 Signature, in memory."""
        raise NotImplementedError

    def make_delta(self, out, *, base, threads=None, progress=None, cancel=None):
        """Write to `out` (a binary stream) a delta turning the image whose
        Signature is `base` into this disk. Returns DeltaStats."""
        raise NotImplementedError

    def apply_delta(self, stream, *, name, verify=False, progress=None, cancel=None):
        """Apply the delta read from `stream` to this disk, crash-safely.
        Returns ApplyStats."""
        raise NotImplementedError


class StepChainPlace:
    """What the step chain (pydr.dr.pointstores.stepchain, their one caller)
    asks of the place that holds a replica and its undo steps, and which is
    done there: a file on this machine, ``host:PATH`` (a request to ``pydr
    serve`` there), a QEMU image. An NBD export or a live disk has no files
    beside it and is not one."""

    def remove_drill(self, disks):
        """This endpoint is a drill's directory: remove the `disks` a test
        failover wrote there, then the directory if that empties it."""
        raise NotImplementedError

    def materialize(self, steps, dest, *, drill=False, threads=None, method="auto",
                    progress=None, cancel=None):
        """Write this disk's latest state with the undo `steps` (endpoints,
        newest first) rolled back onto it to `dest`, at this place, by
        ``method``: "auto" (a reflink clone where the file system can, else a
        copy), "reflink", "copy" or "qcow2" (an overlay backed by the latest
        state). ``drill``: a test failover's disk (never overwrites a file).
        ``cancel``: a threading.Event; once set, the copy stops (Cancelled)
        and nothing is renamed over `dest`. Returns the method used."""
        raise NotImplementedError

    def backing(self):
        """The path of the backing file where this disk is a qcow2 overlay
        (a point made with --as qcow2), else None."""
        return None

    def flatten(self, backing):
        """Write this qcow2 overlay's blocks into its backing file (the
        endpoint `backing`) and make that file this disk: one raw disk."""
        raise UnsupportedFile("only a qcow2 overlay on this machine can be flattened",
                              path=self.spec)


class SignResult(Record):
    """What write_signature did. ``bytes_read`` were read from the disk where
    it is, ``bytes_received`` crossed a connection; threads and kernel are
    those of this process (None when another machine signed)."""

    _fields = ("image", "output", "size", "block_size", "algorithm", "blocks", "zero_blocks",
               "bytes_read", "bytes_skipped", "bytes_received", "seconds", "threads", "kernel")
    __slots__ = _fields


class InProcess:
    """What every endpoint whose disk this process reads and writes itself
    (a local file, a QEMU image through its own qemu-nbd, an NBD export)
    does the same way, given ``engine_disk()``: a context manager yielding
    what the engine takes -- a path, or an open device (pydr.engine.devices).
    ``engine_disk(write=True, size=N)`` may create the disk (N bytes)."""

    in_process = True

    def engine_disk(self, *, write=False, size=None, bitmap=None):
        raise NotImplementedError

    def choose_undo(self, keep_undo):
        """(path, index) of the first offered undo-step path that holds no
        committed step (see Endpoint.open_target): an Endpoint, or the path
        of a file on this machine."""
        from ..engine.journal import choose_undo_path

        return choose_undo_path(self.journal_target(), [
            k.path if isinstance(k, Endpoint) else os.path.abspath(os.fspath(k))
            for k in keep_undo or ()])

    def journal_target(self):
        return self.path

    @contextlib.contextmanager
    def open_source(self, *, block_size, threads, progress=None, window=None, group=None,
                    bwlimit=None, compress=False):
        from ..transport import exchange as X
        from ..transport.roles import LocalSource

        with self.engine_disk() as disk, LocalSource(
                disk, block_size=block_size, threads=threads, progress=progress,
                window=window or X.WINDOW, group=group or X.GROUP) as source:
            yield source

    @contextlib.contextmanager
    def open_target(self, *, block_size, result_size, threads, keep_undo=None, progress=None,
                    streams=0, bwlimit=None, compress=False, mode=None):
        from ..transport.roles import LocalTarget

        keep, index = self.choose_undo(keep_undo)
        with self.engine_disk(write=True, size=result_size) as disk, LocalTarget(
                disk, block_size=block_size, result_size=result_size, threads=threads,
                keep_undo=keep, kept=index, progress=progress, mode=mode) as target:
            yield target

    def signature(self, *, block_size, threads=None):
        with self.engine_disk() as disk:
            return signature(disk, block_size=block_size, threads=threads)

    def write_signature(self, out, *, block_size, algorithm, threads=None, progress=None,
                        cancel=None, use_mmap=True):
        self.check_not_over(out)
        with self.engine_disk() as disk:
            sig = signature(disk, block_size=block_size, algorithm=algorithm, threads=threads,
                            progress=progress, cancel=cancel, use_mmap=use_mmap)
        target = getattr(out, "local_path", None)
        if target:
            sig.save(target)
        elif isinstance(out, Endpoint):
            with out.open_write() as f:
                sig._write(f)
        else:
            sig._write(out)
            out.flush()
        st = sig.stats
        return SignResult(self.spec, str(out) if isinstance(out, Endpoint) else "-", sig.size,
                          sig.block_size, sig.algorithm, sig.block_count, sig.zero_blocks,
                          st.bytes_read, st.bytes_skipped, 0, st.seconds, st.threads, st.kernel)

    def check_not_over(self, out):
        """Refuse an output that is this very disk."""

    def make_delta(self, out, *, base, threads=None, progress=None, cancel=None):
        from ..engine.delta import make_delta

        with self.engine_disk() as disk:
            return make_delta(disk, out, against=base, threads=threads, progress=progress,
                              cancel=cancel)

    def apply_delta(self, stream, *, name, verify=False, progress=None, cancel=None):
        from ..engine.apply import apply_delta

        with self.engine_disk(write=True) as disk:
            return apply_delta(stream, disk, verify=verify, progress=progress, cancel=cancel)


class DeviceEndpoint(InProcess, Endpoint):
    """A disk that is open already, as an endpoint: the point-in-time view
    of a cut (changed-block tracking), read while the cut holds it."""

    def __init__(self, dev, spec):
        super().__init__(spec)
        self.dev = dev

    @property
    def path(self):
        return self.spec

    def engine_disk(self, *, write=False, size=None, bitmap=None):
        if write:
            raise UnsupportedFile("a point-in-time view is read, never written", path=self.spec)
        return contextlib.nullcontext(self.dev)

    def exists(self):
        return True

    def size(self):
        return self.dev.size

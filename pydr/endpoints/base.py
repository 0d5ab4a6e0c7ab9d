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
    name other files there; ``rename(dest)`` (atomic), ``remove_many(eps)``,
    ``remove_drill(disks)``, ``materialize(steps, dest)`` (a recovery point
    from this disk's latest state and its undo steps, written there).
Files as streams, and engine work done where the data is
    ``open_read()``, ``open_write()``, ``write_signature(out, ...)``,
    ``make_delta(out, ...)``, ``apply_delta(stream, ...)``.
Capabilities
    ``local_path``: the path of a file or block device this process opens
    directly (resync between two such uses the engine's own fast path, with
    its signature cache and change-tracking extents), else None.
    ``snapshot()``: a point-in-time clone beside the disk, or None.
"""

import os

from ..engine import names
from ..engine.progress import Record
from ..errors import InvalidState


class Endpoint:
    """A disk or file somewhere. ``spec`` is how pydr names it (stored in the
    vault, shown in messages); ``place`` is hashable and equal for endpoints
    whose files one request can rename, remove or materialise together."""

    local_path = None
    place = None

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
                    streams=0, bwlimit=None, compress=False):
        """``keep_undo``: specs at this place where the committed undo journal
        may be kept (a recovery-point step); the first that holds no
        committed step is taken, and TargetResult.kept says which."""
        raise NotImplementedError

    def snapshot(self):
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

    def remove_drill(self, disks):
        """This endpoint is a drill's directory: remove the `disks` a test
        failover wrote there, then the directory if that empties it."""
        raise NotImplementedError

    def materialize(self, steps, dest, *, drill=False, threads=None):
        """Write this disk's latest state with the undo `steps` (endpoints,
        newest first) rolled back onto it to `dest`, at this place.
        ``drill``: a test failover's disk (never overwrites a file)."""
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


class SignResult(Record):
    """What write_signature did. ``bytes_read`` were read from the disk where
    it is, ``bytes_received`` crossed a connection; threads and kernel are
    those of this process (None when another machine signed)."""

    _fields = ("image", "output", "size", "block_size", "algorithm", "blocks", "zero_blocks",
               "bytes_read", "bytes_skipped", "bytes_received", "seconds", "threads", "kernel")
    __slots__ = _fields

"""A replica has one writer: the vault item that protects it.

Recovery points are reverse deltas rolled back onto the replica, so a write
to a replica that is not a cycle of its item (a manual ``pydr resync`` onto
it, a second vault protecting it) silently breaks every point it already
has. Two records prevent and detect that:

``.NAME.pydr-owner`` beside the replica
    which vault (its id, ``Store.vault_id()``), item and disk write it.
    ``pydr protect`` and every cycle refuse a replica that another vault or
    item owns; one without the file is claimed (an older vault's replicas
    are adopted on their next cycle).
``cache/ITEM/IDX.replica`` in the vault
    the replica's identity as the last cycle left it (size, mtime, ctime --
    which a user cannot set, and any write or rename changes -- and, for
    people, inode and device),
    and whether a cycle was writing it. A cycle that finds the replica
    different does not compare against it: its signature cache is bound to
    that identity, and the points that rolling steps back onto the changed
    replica would rebuild wrongly (all of them) are marked damaged.

Both are one small format (docs/VAULT.md, "One writer"): magic, version,
fields, the three names, and a trailer with an XXH3-128 checksum, as
pydr's other files. The vault's copy is trusted (the vault is 0700); the one
beside the replica is read as hostile input: bounded, no symlinks followed,
every field checked.
"""

import contextlib
import errno
import os
import stat
import struct

from ..engine import names
from ..errors import FormatError, InvalidState, UnsupportedFile

MAGIC = b"PYDROWN\0"
END_MAGIC = b"PYDREND\0"
VERSION = 2  # 2: the digest of the signature cache the last cycle left
WRITING = 1   # flag: a cycle was writing the replica (its identity is not known)
IDENTIFIED = 2  # flag: the identity fields are the replica's after the last cycle
CACHED = 4  # flag: the cache digest is the one of the signature cache the cycle wrote
MAX_BYTES = 64 << 10  # three names of at most ~4 KiB each, and the fixed fields

_HEADER_V1 = struct.Struct("<8sHHI16sQqqQQHHHH")
# magic, version, flags, disk index, vault id, size, mtime_ns, ctime_ns, inode, device,
# item length, replica length, vault path length, reserved; version 2 then:
_HEADER = struct.Struct(_HEADER_V1.format + "16s")  # the cache digest
_END = struct.Struct("<8sQ")  # magic, total length; then the xxh3-128 checksum


class Owner:
    """What an owner record says: the vault (id and, for people, its path),
    the item and disk index, the replica's spec, and (the vault's copy) the
    replica's identity after the last cycle, or None."""

    __slots__ = ("vault_id", "vault_dir", "item", "idx", "replica", "identity", "writing",
                 "cache")

    def __init__(self, vault_id, vault_dir, item, idx, replica, identity=None, writing=False,
                 cache=None):
        self.vault_id, self.vault_dir, self.item, self.idx = vault_id, vault_dir, item, idx
        self.replica, self.identity, self.writing = replica, identity, writing
        self.cache = cache  # cache_digest() of the signature cache the cycle left, or None

    def same_owner(self, other):
        return (self.vault_id, self.item, self.idx) == (other.vault_id, other.item, other.idx)

    def describe(self):
        return f"disk {self.idx} of item {self.item!r} of vault {self.vault_id} ({self.vault_dir})"


def _checksum(data):
    from ..engine import bindings as B  # the C core: loaded when a record is read or written

    lo, hi = B.hash_bytes(B.ALGORITHMS["xxh3-128"], data)
    return lo.to_bytes(8, "little") + hi.to_bytes(8, "little")


def encode(owner):
    """The bytes of an owner record."""
    texts = [s.encode() for s in (owner.item, owner.replica, owner.vault_dir)]
    if any(len(t) > 0xFFFF for t in texts):
        raise ValueError("a name in an owner record is longer than 65535 bytes")
    flags = (WRITING if owner.writing else 0) | (IDENTIFIED if owner.identity else 0) | (
        CACHED if owner.cache else 0)
    ident = owner.identity or (0, 0, 0, 0, 0)
    body = _HEADER.pack(MAGIC, VERSION, flags, owner.idx, bytes.fromhex(owner.vault_id), *ident,
                        *(len(t) for t in texts), 0, owner.cache or bytes(16)) + b"".join(texts)
    body += _END.pack(END_MAGIC, len(body) + _END.size + 16)
    return body + _checksum(body)


def decode(blob, where):
    """The Owner in `blob`; FormatError naming `where` and the offset of the
    first problem otherwise."""
    if len(blob) < _HEADER_V1.size + _END.size + 16:
        raise FormatError(f"owner record is truncated ({len(blob)} bytes)", path=where, offset=0)
    if blob[:8] != MAGIC:
        raise FormatError("not a pydr owner record", path=where, offset=0)
    version = struct.unpack_from("<H", blob, 8)[0]
    if version not in (1, VERSION):
        raise FormatError(f"owner record version {version} is not supported", path=where,
                          offset=8)
    header = _HEADER if version == VERSION else _HEADER_V1
    if len(blob) < header.size + _END.size + 16:
        raise FormatError(f"owner record is truncated ({len(blob)} bytes)", path=where, offset=0)
    fields = header.unpack_from(blob)
    magic, version, flags, idx, vault_id, *ident = fields[:10]
    lengths = fields[10:13]
    cache = fields[14] if version == VERSION and flags & CACHED else None
    if flags & ~(WRITING | IDENTIFIED | CACHED) or fields[13]:
        raise FormatError("owner record has unknown flags", path=where, offset=10)
    end = header.size + sum(lengths)
    if len(blob) != end + _END.size + 16:
        raise FormatError(f"owner record is {len(blob)} bytes, its header says "
                          f"{end + _END.size + 16}", path=where, offset=_HEADER.size)
    trailer, total = _END.unpack_from(blob, end)
    if trailer != END_MAGIC or total != len(blob):
        raise FormatError("owner record has a bad trailer", path=where, offset=end)
    if blob[-16:] != _checksum(blob[:-16]):
        raise FormatError("owner record checksum mismatch: the file is damaged", path=where,
                          offset=len(blob) - 16)
    texts, at = [], header.size
    for n in lengths:
        try:
            texts.append(blob[at:at + n].decode())
        except UnicodeDecodeError:
            raise FormatError("owner record holds a name that is not UTF-8", path=where,
                              offset=at) from None
        at += n
    item, replica, vault_dir = texts
    return Owner(vault_id.hex(), vault_dir, item, idx, replica,
                 tuple(ident) if flags & IDENTIFIED else None, bool(flags & WRITING), cache)


# -- the owner file beside a replica ------------------------------------------------
def owner_file(replica):
    """The endpoint of a replica's owner file, or None where a disk has no
    files beside it (an NBD export, an object store)."""
    if replica.local_path is not None:  # a raw file or a QEMU image here: a plain file
        from ..endpoints.local import LocalEndpoint

        return LocalEndpoint(names.beside(replica.local_path, names.OWNER))
    try:
        return replica.sidecar(names.OWNER)
    except (UnsupportedFile, NotImplementedError):
        return None


def _read_local(path):
    """The bytes of a local owner file, opened without following a symlink
    and read only if it is a small regular file; None if it is missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsupportedFile("the owner file is a symbolic link: pydr does not follow it",
                                  path=path, hint="remove it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsupportedFile("the owner file is not a regular file: remove it", path=path)
        if st.st_size > MAX_BYTES:
            raise FormatError(f"owner file is {st.st_size} bytes: not a pydr owner record",
                              path=path, offset=0)
        return os.pread(fd, MAX_BYTES + 1, 0)
    finally:
        os.close(fd)


def read_owner(replica):
    """The Owner recorded beside `replica` (an endpoint), or None when it
    has none (or cannot have one)."""
    ep = owner_file(replica)
    if ep is None:
        return None
    if ep.local_path is not None:
        blob = _read_local(ep.local_path)
    else:
        if not ep.exists():
            return None
        with ep.open_read() as f:
            blob = f.read(MAX_BYTES + 1)
    return None if blob is None else decode(blob, ep.spec)


def _write(ep, owner):
    with ep.open_write() as f:  # atomic: a temp file (0600) renamed over the name
        f.write(encode(owner))


def claim(replica, me, *, exists_in_vault=lambda item: True):
    """Make `me` (an Owner) the owner of `replica`, or refuse as
    check_claimable() does."""
    if owner_file(replica) is None:
        return
    current = check_claimable(replica, me, exists_in_vault=exists_in_vault)
    if current is None or not current.same_owner(me):
        _write(owner_file(replica), me)


def check_claimable(replica, me, *, exists_in_vault=lambda item: True):
    """The Owner beside `replica` (or None) if `me` may own it: no one does,
    `me` does, or an item this vault no longer has (``exists_in_vault(item)``
    False: a stale file). InvalidState naming the owner otherwise."""
    current = read_owner(replica)
    if current is None or current.same_owner(me):
        return current
    if current.vault_id == me.vault_id and not exists_in_vault(current.item):
        return current
    raise InvalidState(
        f"replica {replica} is owned by {current.describe()}: a replica has one writer. "
        f"Protect another path (if that vault is gone, remove {owner_file(replica).spec})",
        path=replica.spec)


def release(replica, me):
    """Remove the owner file of `replica` if it names `me` (the item is no
    longer protected); a replica on another host keeps it."""
    ep = owner_file(replica)
    if ep is None or ep.local_path is None:
        return False
    current = read_owner(replica)
    if current is None or not current.same_owner(me):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(ep.local_path)
    return True


# -- the replica's identity, kept in the vault -------------------------------------------
def identity(replica):
    """(size, mtime_ns, ctime_ns, inode, device) of a replica's file where
    it is (here, or on its host through the server's STAT), None where that
    cannot be told (an NBD export, an older server), or "missing"."""
    return replica.file_identity()


REPLICA, BASELINE = "replica", "baseline"  # whose identity a state record holds


def state_path(vault_dir, item, idx, which=REPLICA):
    """``cache/ITEM/IDX.replica``, or ``IDX.baseline``: the identity of the
    replica's baseline, which a failover records right after its rename."""
    return os.path.join(vault_dir, "cache", item, f"{idx}.{which}")


def read_state(vault_dir, item, idx, which=REPLICA):
    """The Owner the vault recorded for a disk's replica (or its baseline)
    after its last cycle (rename), or None when none is recorded.
    FormatError naming the file and the offset for a damaged record: the
    caller decides (an item with points cannot trust its replica)."""
    path = state_path(vault_dir, item, idx, which)
    try:
        with open(path, "rb") as f:
            return decode(f.read(MAX_BYTES + 1), path)
    except FileNotFoundError:
        return None


def read_state_exists(vault_dir, item, idx, which=REPLICA):
    return os.path.exists(state_path(vault_dir, item, idx, which))


def forget_state(vault_dir, item, idx, which=REPLICA):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(vault_dir, item, idx, which))


def cache_digest(path):
    """A digest of the signature cache at `path` (v2: of its header but the
    state, pydr.engine.sigcache.binding; v1: of its trailer, which holds the
    checksum of the whole file), or None when there is none."""
    from ..engine.signatures import TRAILER_SIZE
    from ..engine.sigcache import binding

    try:
        bound = binding(path)
        if bound is not None:
            return _checksum(bound)
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < TRAILER_SIZE:
                return _checksum(b"")
            f.seek(-TRAILER_SIZE, os.SEEK_END)
            return _checksum(f.read(TRAILER_SIZE))
    except FileNotFoundError:
        return None


def record_state(me, replica, *, writing, which=REPLICA, cache=None):
    """Record in the vault (``me.vault_dir``) the replica's identity now, or,
    with ``writing``, that a cycle is about to write it. ``which``
    BASELINE: `replica` is the endpoint of the replica's baseline. `cache`:
    the path of the signature cache the cycle wrote, bound to the replica
    by its digest (a cache put back from elsewhere is then not used)."""
    from ..engine.atomic import atomic_write

    path = state_path(me.vault_dir, me.item, me.idx, which)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if not writing and getattr(replica, "local_path", None):
        _sync_times(replica.local_path)
    now = None if writing else identity(replica)
    # writing: the cache is the one the cycle starts from (it is replaced only
    # when the cycle is whole), which a resumed cycle still trusts to find
    # blocks its journal lost
    state = Owner(me.vault_id, me.vault_dir, me.item, me.idx, me.replica,
                  now if isinstance(now, tuple) else None, writing,
                  None if cache is None else cache_digest(cache))
    with atomic_write(path) as f:
        f.write(encode(state))


def _sync_times(path):
    """fsync the replica: the cycle made its data durable with fdatasync,
    which leaves the times; a power cut must not bring back an older ctime
    than the one recorded (the replica would look written outside pydr)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cache_unbound(recorded, cache):
    """Why the signature cache at `cache` is not the one the last cycle left
    with the replica recorded in `recorded` (a sentence), or None when it is
    (or when there is none)."""
    if not os.path.exists(cache):
        return None
    if recorded is None or (recorded.identity is None and not recorded.writing):
        return f"signature cache {cache} is not bound to the replica"
    if recorded.cache != cache_digest(cache):  # writing: the cache its cycle started from
        return f"signature cache {cache} is not the one the last cycle left"
    return None


def changed_outside(recorded, replica, what="replica"):
    """Why `replica` is not as the last cycle left it (a sentence), or None
    when it is, or when that cannot be told (no identity recorded, a cycle
    of this item was interrupted while writing it, a replica this machine
    cannot stat). A block device's node does not change when its blocks
    are written: writes to one are not seen."""
    if recorded is None or recorded.writing or recorded.identity is None:
        return None
    now = identity(replica)
    if now is None:
        return None
    if now == "missing":
        return f"{what} {replica} is missing"
    # inode and device are recorded, not compared: a remount (FUSE) or a device
    # numbered anew at boot (device mapper) changes them with no write; a file
    # put in the replica's place has its own ctime
    size, mtime, ctime, _, _ = recorded.identity
    if size != now[0]:
        return f"{what} {replica} changed size from {size} to {now[0]} bytes"
    if (mtime, ctime) != now[1:3]:
        return f"{what} {replica} was written"
    return None

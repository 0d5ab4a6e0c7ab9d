"""The chunks and point indexes of one object store as pydr reads and
writes them (layout in docs/FORMAT.md): every chunk or index a cycle, a
restore, verify or gc moves goes through a ChunkStore, which knows how
the store names, seals and versions its objects. Lists and deletes are the
ObjectStore's (``.objects``).

An unencrypted store names a chunk by the XXH3-128 of its bytes; an
encrypted one (``keys``: pydr.engine.sealing.DataKeys) by a keyed MAC, and
seals each chunk and index with its object's name as associated data.

In a versioned bucket each put returns the new object's version, and a
read names the version a point recorded (an ObjectRef), never "the current
one" when it knows better. With a ``lock`` (pydr.dr.objectlock.LockTerms)
every put is locked (S3 Object Lock), and :meth:`ChunkStore.keep` extends
a reused chunk's lock (docs/FORMAT.md, "Object Lock and versions").
"""

import hashlib
import threading

from ..engine.chunks import (CHUNK_HEADER_SIZE, CHUNK_SIZE, ObjectRef, PointIndex, chunk_id,
                             decode_chunk, encode_chunk)
from ..engine.sealing import KIND_CHUNK, KIND_INDEX, OVERHEAD, SealBroken
from ..errors import FormatError

_coders = threading.local()  # a zstd decompressor per thread

#: the largest chunk object pydr writes (zstd is kept only when smaller) and
#: some slack: a larger one is damage, refused before it is read into memory
MAX_CHUNK_OBJECT = CHUNK_HEADER_SIZE + CHUNK_SIZE + OVERHEAD + (64 << 10)
#: a point index names 16 bytes (and a version) per 4 MiB chunk: 1 GiB is
#: far above any real one, yet bounds what a hostile object costs
MAX_INDEX_OBJECT = 1 << 30


class ChunkStore:
    """The chunks and indexes under one ObjectStore (``objects``).

    Args:
        objects: the pydr.endpoints.s3.ObjectStore.
        keys: the store's DataKeys when it is encrypted, else None.
        lock: the Object Lock a new object gets (a
            pydr.dr.objectlock.LockTerms), or None.
    Thread-safe, as the ObjectStore is."""

    def __init__(self, objects, keys=None, lock=None):
        self.objects, self.keys, self.lock = objects, keys, lock
        # the store's config or key files found deleted or overwritten when it was
        # opened (pydr.dr.storeversions findings; set by objectstore.chunk_store_at)
        self.tampered = []

    def __repr__(self):
        return f"<ChunkStore {self.spec}{' (encrypted)' if self.keys else ''}>"

    @property
    def spec(self):
        return self.objects.spec

    @property
    def encrypted(self):
        return self.keys is not None

    def url(self, key):
        return self.objects.url(key)

    def chunk_key(self, ident):
        return self.objects.chunk_key(ident)

    def index_key(self, item, name):
        return self.objects.index_key(item, name)

    def _name(self, key):
        """`key` relative to the store's prefix: what a seal binds."""
        prefix = self.objects.key()
        return key[len(prefix) + 1:] if prefix else key

    def _at(self, key, ref):
        """Where the object `key` (its version in `ref`) is, for messages."""
        version = ref.version if ref is not None else None
        return self.url(key) + (f"?versionId={version}" if version else "")

    def _put(self, key, blob):
        """Put `blob` as `key`, locked when the store has a lock: its ObjectRef."""
        lock = self.lock
        until = lock.until() if lock is not None else None
        version = self.objects.put(key, blob, lock=(lock.mode, until) if lock else None)
        return ObjectRef(version, until)

    def chunk_id(self, data):
        """The id (and object name) of a chunk's bytes in this store."""
        return self.keys.chunk_id(data) if self.keys is not None else chunk_id(data)

    # -- chunks ---------------------------------------------------------------------
    def put_chunk(self, ident, data, compressor=None, throttle=None):
        """Store chunk `ident` (its bytes `data`, zstd with `compressor` when
        smaller; ``throttle(n)`` is called with the object's size before it
        is sent). Returns (its ObjectRef, the bytes sent)."""
        key = self.chunk_key(ident)
        blob = encode_chunk(data, ident, compressor)
        if self.keys is not None:
            blob = self.keys.seal(KIND_CHUNK, blob, self._name(key))
        if throttle is not None:
            throttle(len(blob))
        return self._put(key, blob), len(blob)

    def get_chunk(self, ident, ref=None, *, check_name=True):
        """The verified bytes of chunk `ident` (the version `ref` names, if
        any); FileNotFoundError if the store lacks it, FormatError (naming
        its key) if it is damaged, renamed or foreign. In an encrypted store
        the seal already binds the object's name, and so its id: with
        ``check_name`` False the keyed MAC of the bytes is not computed
        again (a restore's cost; ``verify`` keeps it). An unencrypted
        store's chunk is always hashed against its id (its only check)."""
        import zstandard

        key = self.chunk_key(ident)
        blob = self.objects.get(key, ref.version if ref is not None else None,
                                max_size=MAX_CHUNK_OBJECT)
        where = self._at(key, ref)
        if self.keys is not None:
            try:
                blob = self.keys.open(KIND_CHUNK, blob, self._name(key))
            except SealBroken as exc:
                raise FormatError(f"chunk {ident.hex()} {exc}", path=where, offset=0) from None
        if not hasattr(_coders, "zd"):
            _coders.zd = zstandard.ZstdDecompressor()
        ident_of = None  # XXH3
        if self.keys is not None:
            ident_of = self.keys.chunk_id if check_name else (lambda _: ident)
        return decode_chunk(blob, ident, _coders.zd, where=where, ident_of=ident_of)

    def has_chunk(self, ident, ref=None):
        """Whether the store has chunk `ident` (a HEAD; its version `ref`)."""
        version = ref.version if ref is not None else None
        return self.objects.head(self.chunk_key(ident), version) is not None

    def keep(self, ident, ref):
        """The ObjectRef under which a new point may name chunk `ident`,
        stored as `ref` (None: its current object): `ref` itself without a
        lock; with one, `ref` with its retention extended (on its version)
        to a new lock's end when it would end before the new point's lock.
        None when the chunk must be uploaded again: a lock needs a version,
        and `ref` names none, or the version is gone or refuses the new
        lock (a mode it cannot take)."""
        ref = ref if ref is not None else ObjectRef()
        lock = self.lock
        if lock is None:
            return ref
        if ref.version is None:
            return None
        if not lock.needs_extension(ref.retain_until):
            return ref
        until = lock.until()
        try:
            self.objects.set_retention(self.chunk_key(ident), ref.version, lock.mode, until)
        except (FileNotFoundError, PermissionError):
            return None
        return ObjectRef(ref.version, until)

    # -- point indexes ---------------------------------------------------------------
    def put_index(self, key, index):
        """Store the PointIndex `index` as `key`. Returns (its ObjectRef, the
        object as stored: what :meth:`decode_index` reads back)."""
        blob = index.encode()
        if self.keys is not None:
            blob = self.keys.seal(KIND_INDEX, blob, self._name(key))
        return self._put(key, blob), blob

    def decode_index(self, blob, key, where=None, digest=None):
        """The PointIndex in `blob`, the object `key` of this store (or a
        local copy of it at `where`); FormatError naming it if damaged, or
        if `digest` (the hex SHA-256 the vault recorded of the object as
        stored; None: not recorded) does not match: an index re-encoded
        with its chunk ids swapped passes its own, unkeyed, checksum."""
        where = where or self.url(key)
        stored = blob
        if self.keys is not None:  # its seal first: the more telling message
            try:
                blob = self.keys.open(KIND_INDEX, blob, self._name(key))
            except SealBroken as exc:
                raise FormatError(f"point index {exc}", path=where, offset=0) from None
        if digest is not None and index_digest(stored) != digest:
            raise FormatError("point index does not match the digest the vault recorded "
                              f"(sha256 {digest}): replaced or damaged", path=where, offset=0)
        return PointIndex.decode(blob, where)

    def get_index(self, key, ref=None, digest=None):
        """The PointIndex stored as `key` (the version `ref` names, if any),
        checked against `digest` as :meth:`decode_index` checks it;
        FileNotFoundError if gone, FormatError naming it if damaged."""
        version = ref.version if ref is not None else None
        blob = self.objects.get(key, version, max_size=MAX_INDEX_OBJECT)
        return self.decode_index(blob, key, self._at(key, ref),
                                 digest)


def index_digest(blob):
    """The hex SHA-256 of a point index object as stored (sealed or plain):
    what the vault records of it (object_indexes.digest)."""
    return hashlib.sha256(blob).hexdigest()

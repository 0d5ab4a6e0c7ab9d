"""Chunks and point indexes: how a disk is kept in an object store
(docs/FORMAT.md, "Chunk object" and "Point index").

A disk is cut into fixed-size chunks aligned to the disk (CHUNK_SIZE, the
last one shorter). A chunk is named by the XXH3-128 of its bytes, so equal
chunks -- across points, disks and items -- are one object; an all-zero
chunk is not stored at all (its id is ZERO_ID). A stored chunk is a small
checksummed header and the bytes, zstd-compressed when that makes them
smaller. A point index lists, for every disk of an item, the ids of its
chunks in order, and (version 2) the S3 version and Object Lock
retain-until of each chunk object it needs; it ends in a checksum of all
of it.
"""

import struct
import time

from ..errors import FormatError
from . import bindings as B

#: 4 MiB: large enough that a request's latency and per-object cost are
#: small against its transfer (a 1 TiB disk is 262,144 objects at most),
#: small enough that a few changed 4 KiB blocks cost one 4 MiB upload, as in
#: Proxmox Backup Server's fixed-size chunks for VM images.
CHUNK_SIZE = 4 << 20
ZERO_ID = bytes(16)

CHUNK_MAGIC = b"PYDRCHK\0"
INDEX_MAGIC = b"PYDRIDX\0"
END_MAGIC = b"PYDREND\0"
VERSION = 1  # of a chunk object
INDEX_VERSION = 2  # of a point index written now; version 1 is read too
STORED, ZSTD = 0, 1

_CHUNK_HEADER = struct.Struct("<8sHHI16sQ")  # magic, version, coding, raw length, id, stored length
CHUNK_HEADER_SIZE = _CHUNK_HEADER.size + 8  # + xxh3-64 of the fields
_INDEX_HEADER = struct.Struct("<8sHHIQH")  # magic, version, disks, chunk size, created ns, name len
_DISK = struct.Struct("<IQQ")  # disk index, size, chunk count
_OBJECTS = struct.Struct("<I")  # object count (version 2)
_OBJECT = struct.Struct("<16sQH")  # chunk id, retain until (POSIX s, 0 none), version length
_END = struct.Struct("<8sQ")  # magic, total length; then the xxh3-128 checksum
_XXH3_64, _XXH3_128 = B.ALGORITHMS["xxh3-64"], B.ALGORITHMS["xxh3-128"]


def chunk_id(data):
    """The 16-byte id of a chunk's bytes: XXH3-128, low 64 bits first."""
    lo, hi = B.hash_bytes(_XXH3_128, data)
    return lo.to_bytes(8, "little") + hi.to_bytes(8, "little")


def chunk_count(size, chunk_size=CHUNK_SIZE):
    return -(-size // chunk_size)


def encode_chunk(data, ident, compressor=None):
    """The stored object of a chunk with id `ident`: zstd when `compressor`
    (a zstandard.ZstdCompressor) makes it smaller, else the bytes as they are."""
    payload, coding = data, STORED
    if compressor is not None:
        packed = compressor.compress(data)
        if len(packed) < len(data):
            payload, coding = packed, ZSTD
    fields = _CHUNK_HEADER.pack(CHUNK_MAGIC, VERSION, coding, len(data), ident, len(payload))
    check = struct.pack("<Q", B.hash_bytes(_XXH3_64, fields)[0])
    return b"".join((fields, check, payload))


def decode_chunk(blob, ident, decompressor=None, *, where="chunk", ident_of=None):
    """The bytes of a stored chunk, verified to hash to `ident` (by
    `ident_of`, default :func:`chunk_id`; an encrypted store's is keyed);
    FormatError naming `where` (its object key) otherwise."""
    hexid = ident.hex()
    if len(blob) < CHUNK_HEADER_SIZE:
        raise FormatError(f"chunk {hexid} is truncated ({len(blob)} bytes)", path=where, offset=0)
    fields = blob[:_CHUNK_HEADER.size]
    magic, version, coding, raw_len, stored_id, stored_len = _CHUNK_HEADER.unpack(fields)
    (check,) = struct.unpack_from("<Q", blob, _CHUNK_HEADER.size)
    if magic != CHUNK_MAGIC or check != B.hash_bytes(_XXH3_64, fields)[0]:
        raise FormatError(f"chunk {hexid} has a bad header: not a pydr chunk, or corrupt",
                          path=where, offset=0)
    if version != VERSION or coding not in (STORED, ZSTD):
        raise FormatError(f"chunk {hexid}: version {version}, coding {coding} not supported",
                          path=where, offset=8)
    payload = memoryview(blob)[CHUNK_HEADER_SIZE:]  # not a copy of 4 MiB
    if len(payload) != stored_len:
        raise FormatError(f"chunk {hexid} holds {len(payload)} bytes, its header says "
                          f"{stored_len}", path=where, offset=CHUNK_HEADER_SIZE)
    if coding == ZSTD:
        if decompressor is None:
            raise FormatError(f"chunk {hexid} is zstd-compressed: install zstandard",
                              path=where, offset=10)
        try:
            data = decompressor.decompress(payload, max_output_size=raw_len)
        except Exception as exc:  # zstandard.ZstdError: the frame is damaged
            raise FormatError(f"chunk {hexid} does not decompress: {exc}", path=where,
                              offset=CHUNK_HEADER_SIZE) from None
    else:
        data = payload
    if len(data) != raw_len or stored_id != ident or (ident_of or chunk_id)(data) != ident:
        raise FormatError(f"chunk {hexid} does not hash to its id: corrupt", path=where,
                          offset=CHUNK_HEADER_SIZE)
    return data


class ObjectRef:
    """Which stored object a point needs: its S3 ``version`` (None in an
    unversioned bucket, or not known) and the time its lock ends
    (``retain_until``, POSIX seconds; None when not locked)."""

    __slots__ = ("version", "retain_until")

    def __init__(self, version=None, retain_until=None):
        self.version, self.retain_until = version, retain_until

    def __repr__(self):
        return f"ObjectRef({self.version!r}, {self.retain_until!r})"

    def __eq__(self, other):
        return isinstance(other, ObjectRef) and (self.version, self.retain_until) == (
            other.version, other.retain_until)


class PointIndex:
    """The chunk ids of every disk of an item at one point.

    ``disks``: {disk index: (size, [16-byte id, ...])}. ``refs``: {chunk
    id: ObjectRef}, the S3 version of each chunk object the point needs (in
    a versioned bucket) and its Object Lock; empty in a version-1 index and
    in an unversioned bucket."""

    __slots__ = ("item", "chunk_size", "created", "disks", "refs")

    def __init__(self, item, disks, chunk_size=CHUNK_SIZE, created=None, refs=None):
        self.item, self.chunk_size, self.disks = item, chunk_size, dict(disks)
        self.created = time.time_ns() if created is None else created
        self.refs = dict(refs or {})
        for idx, (size, ids) in self.disks.items():
            if len(ids) != chunk_count(size, chunk_size):
                raise ValueError(f"disk {idx}: {len(ids)} chunk ids for {size} bytes")

    def chunk_ids(self):
        """Every stored chunk the index names (no zero chunks), once."""
        return {i for _, ids in self.disks.values() for i in ids if i != ZERO_ID}

    def ref(self, ident):
        """The ObjectRef of chunk `ident` this point needs: its version, or
        None (the current one: an unversioned bucket, a version-1 index)."""
        return self.refs.get(ident) or ObjectRef()

    def encode(self):
        """The index object, version 2."""
        name = self.item.encode()
        parts = [_INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, len(self.disks),
                                    self.chunk_size, self.created, len(name)), name]
        for idx in sorted(self.disks):
            size, ids = self.disks[idx]
            parts += [_DISK.pack(idx, size, len(ids)), b"".join(ids)]
        refs = {i: r for i, r in self.refs.items() if r.version or r.retain_until}
        parts.append(_OBJECTS.pack(len(refs)))
        for ident in sorted(refs):
            version, until = refs[ident].version, refs[ident].retain_until
            raw = (version or "").encode("ascii")
            parts += [_OBJECT.pack(ident, int(until or 0), len(raw)), raw]
        body = b"".join(parts)
        total = len(body) + _END.size + 16
        head = body + _END.pack(END_MAGIC, total)
        return head + B.Digest().update(head).digest()

    @classmethod
    def decode(cls, blob, where="index"):
        """Parse and verify a version-1 or -2 index; FormatError naming
        `where` and the offset."""
        if len(blob) < _INDEX_HEADER.size + _END.size + 16:
            raise FormatError(f"point index is truncated ({len(blob)} bytes)", path=where,
                              offset=len(blob))
        magic, version, ndisks, chunk_size, created, name_len = _INDEX_HEADER.unpack_from(blob)
        if magic != INDEX_MAGIC:
            raise FormatError("not a pydr point index", path=where, offset=0)
        if version not in (1, 2):
            raise FormatError(f"point index version {version} is not supported", path=where,
                              offset=8)
        end = len(blob) - 16
        tail_magic, total = _END.unpack_from(blob, end - _END.size)
        if tail_magic != END_MAGIC or total != len(blob):
            raise FormatError("point index is truncated or has trailing data", path=where,
                              offset=end - _END.size)
        if B.Digest().update(blob[:end]).digest() != blob[end:]:
            raise FormatError("point index checksum mismatch: corrupt", path=where, offset=end)
        body_end = end - _END.size
        pos = _INDEX_HEADER.size
        item = blob[pos:pos + name_len].decode()
        pos += name_len
        disks = {}
        for _ in range(ndisks):
            if pos + _DISK.size > body_end:
                raise FormatError("point index ends inside a disk's header", path=where,
                                  offset=pos)
            idx, size, count = _DISK.unpack_from(blob, pos)
            pos += _DISK.size
            if count != chunk_count(size, chunk_size) or pos + 16 * count > body_end:
                raise FormatError(f"disk {idx} of the point index is inconsistent", path=where,
                                  offset=pos - _DISK.size)
            disks[idx] = (size, [bytes(blob[p:p + 16]) for p in range(pos, pos + 16 * count, 16)])
            pos += 16 * count
        refs = {}
        if version >= 2:
            pos, refs = _decode_refs(blob, pos, body_end, where)
        if pos != body_end:
            raise FormatError("point index has bytes after its disks", path=where, offset=pos)
        return cls(item, disks, chunk_size, created, refs)


def _decode_refs(blob, pos, end, where):
    """(position after it, {id: ObjectRef}) of a version-2 index's object
    table at `pos`."""
    if pos + _OBJECTS.size > end:
        raise FormatError("point index ends before its object table", path=where, offset=pos)
    (count,) = _OBJECTS.unpack_from(blob, pos)
    pos += _OBJECTS.size
    refs = {}
    for _ in range(count):
        if pos + _OBJECT.size > end:
            raise FormatError("point index's object table is truncated", path=where, offset=pos)
        ident, until, n = _OBJECT.unpack_from(blob, pos)
        raw = bytes(blob[pos + _OBJECT.size:pos + _OBJECT.size + n])
        if len(raw) != n or not raw.isascii():
            raise FormatError("point index names a chunk version that is not ASCII or is "
                              "truncated", path=where, offset=pos)
        refs[bytes(ident)] = ObjectRef(raw.decode("ascii") or None,
                                       float(until) if until else None)
        pos += _OBJECT.size + n
    return pos, refs

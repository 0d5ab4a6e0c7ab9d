"""Point index versions 1 and 2 (pydr.engine.chunks, docs/FORMAT.md "Point
index"): version 2 names each chunk object's S3 version and retain-until;
both versions are read."""

import struct

import pytest
import xxhash

from pydr.engine.chunks import CHUNK_SIZE, ZERO_ID, ObjectRef, PointIndex
from pydr.errors import FormatError

A, B = bytes(range(16)), bytes(range(16, 32))


def _index(refs=None):
    return PointIndex("web", {0: (2 * CHUNK_SIZE + 5, [A, ZERO_ID, B]), 3: (10, [A])},
                      created=123, refs=refs)


def _v1_bytes(index):
    """A version-1 index written by hand from the spec, as pydr before it."""
    name = index.item.encode()
    body = struct.pack("<8sHHIQH", b"PYDRIDX\0", 1, len(index.disks), index.chunk_size,
                       index.created, len(name)) + name
    for idx in sorted(index.disks):
        size, ids = index.disks[idx]
        body += struct.pack("<IQQ", idx, size, len(ids)) + b"".join(ids)
    head = body + struct.pack("<8sQ", b"PYDREND\0", len(body) + 16 + 16)
    h = xxhash.xxh3_128(head).intdigest()
    return head + (h & (2**64 - 1)).to_bytes(8, "little") + (h >> 64).to_bytes(8, "little")


def test_version_2_round_trip_names_versions_and_locks():
    refs = {A: ObjectRef("v-a-1", 1800000000.0), B: ObjectRef("v-b", None)}
    blob = _index(refs).encode()
    assert struct.unpack_from("<H", blob, 8)[0] == 2
    back = PointIndex.decode(blob)
    assert back.disks == _index().disks and back.item == "web" and back.created == 123
    assert back.refs == refs
    assert back.ref(A).version == "v-a-1" and back.ref(B).retain_until is None
    assert back.ref(ZERO_ID) == ObjectRef()


def test_refs_of_nothing_are_not_written():
    back = PointIndex.decode(_index({A: ObjectRef(), B: ObjectRef("v", None)}).encode())
    assert back.refs == {B: ObjectRef("v", None)}


def test_version_1_is_still_read():
    blob = _v1_bytes(_index())
    back = PointIndex.decode(blob, "old.pidx")
    assert back.disks == _index().disks and back.refs == {}
    assert back.ref(A).version is None


def test_every_truncation_and_a_flipped_byte_are_refused():
    blob = _index({A: ObjectRef("v1", 5.0), B: ObjectRef("v2", None)}).encode()
    for n in range(len(blob)):
        with pytest.raises(FormatError):
            PointIndex.decode(blob[:n], "x.pidx")
    for i in range(0, len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x40
        with pytest.raises(FormatError):
            PointIndex.decode(bytes(bad), "x.pidx")


def test_a_version_3_index_is_refused_naming_it():
    blob = bytearray(_index().encode())
    blob[8] = 3
    with pytest.raises(FormatError, match="version 3") as e:
        PointIndex.decode(bytes(blob), "s3://b/x.pidx")
    assert e.value.path == "s3://b/x.pidx"

"""The on-disk layout of the signature cache, format v2 (docs/FORMAT.md):
its constants, header and segment entries, and the small helpers that read
and write them. The cache itself is pydr.engine.sigcache.SignatureCache."""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Optional

from . import bindings as B
from ..errors import FormatError

MAGIC = b"PYDRSIGC"
VERSION = 2
SEGMENT_BLOCKS = 4096
HEADER_BYTES = 4096
CLEAN, CHANGING, UPDATING = 0, 1, 2
STATE_NAMES = {CLEAN: "clean", CHANGING: "target being changed", UPDATING: "being updated"}
#: magic, version, algorithm, state, block size, size, blocks, segment blocks,
#: segments, table offset, slots end, generation, cache id, the target as the
#: last commit left it (device, inode, size, mtime ns: TARGET); then an xxh3-64 of those
HEADER = struct.Struct("<8sHBBIQQIIQQQ16sQQQq")
#: the target's identity of a cache no commit has bound to a target (never trusted)
NO_TARGET = (0, 0, 0, 0)
STATE_AT = 11  # the state byte: left out of binding()
ENTRY = struct.Struct("<QII16s")  # slot offset, capacity (hashes), non-zero blocks, checksum
ENTRY_BYTES = ENTRY.size
#: the segment table is in pages of PAGE_BYTES: PAGE_ENTRIES entries, zeros,
#: and at PAGE_CHECK an xxh3-64 of (page index, the bytes before it)
PAGE_BYTES = 4096
PAGE_ENTRIES = 127
PAGE_CHECK = PAGE_BYTES - 8
PENDING_SUFFIX = ".pending"
PENDING = struct.Struct("<QI")  # first block, block count; then mask, hashes
XXH64 = B.ALGORITHMS["xxh3-64"]
XXH128 = B.ALGORITHMS["xxh3-128"]
PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def xxh64(data: bytes) -> bytes:
    return struct.pack("<Q", B.hash_bytes(XXH64, data)[0])


def zero_hash(length: int) -> bytes:
    low, high = B.hash_bytes(XXH128, bytes(length))
    return struct.pack("<QQ", low, high)


def capacity(count: int) -> int:
    """Hash slots for `count` non-zero blocks: room to grow, at most twice."""
    cap = 4
    while cap < count:
        cap *= 2
    return cap


def punch(fd: int, offset: int, length: int) -> None:
    """Give back the whole pages of a freed slot (best effort: a file system
    that cannot keeps them allocated, which costs space, never correctness)."""
    start, end = -(-offset // 4096) * 4096, (offset + length) // 4096 * 4096
    if end <= start:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate(ctypes.c_int(fd), ctypes.c_int(PUNCH), ctypes.c_longlong(start),
                       ctypes.c_longlong(end - start))
    except (OSError, AttributeError):
        pass


def table_bytes(segments: int) -> int:
    """Bytes of the segment table of `segments` segments (whole pages)."""
    return -(-segments // PAGE_ENTRIES) * PAGE_BYTES


def page_checksum(index: int, page: bytes) -> bytes:
    """The xxh3-64 a table page ends with (its index hashed in: a page read
    from elsewhere in the table fails)."""
    return xxh64(struct.pack("<Q", index) + page[:PAGE_CHECK])


def parse_header(raw: bytes, path: str) -> dict:
    """The fields of a v2 header block (HEADER_BYTES), checked."""
    if len(raw) < 8 or raw[:8] != MAGIC:
        raise FormatError("not a pydr signature cache (v2)", path=path, offset=0)
    if len(raw) != HEADER_BYTES:
        raise FormatError("signature cache truncated in its header", path=path,
                          offset=len(raw))
    rest = raw[HEADER.size + 8:]
    if rest.count(0) != len(rest):  # reserved: zeros, so that damage there is seen
        at = HEADER.size + 8 + next(i for i, c in enumerate(rest) if c)
        raise FormatError("signature cache header damaged (reserved bytes are not zero)",
                          path=path, offset=at)
    raw = raw[:HEADER.size + 8]
    fields = raw[:HEADER.size]
    (magic, version, algorithm, state, block_size, size, n, seg_blocks, segments, table, end,
     generation, cache_id, *target) = HEADER.unpack(fields)
    if xxh64(fields) != raw[HEADER.size:]:
        raise FormatError("signature cache header fails its checksum", path=path, offset=0)
    if version != VERSION:
        raise FormatError(f"signature cache version {version}: this pydr reads {VERSION}",
                          path=path, offset=8)
    if algorithm != XXH128 or seg_blocks != SEGMENT_BLOCKS or state not in STATE_NAMES:
        raise FormatError("signature cache header holds values this pydr does not use",
                          path=path, offset=10)
    try:
        B.check_block_size(block_size)
    except ValueError:
        raise FormatError(f"signature cache block size {block_size} is not valid",
                          path=path, offset=12) from None
    if (n != -(-size // block_size) or segments != -(-n // SEGMENT_BLOCKS)
            or table != HEADER_BYTES or end < table + table_bytes(segments)):
        raise FormatError("signature cache header disagrees with itself or the file's size",
                          path=path, offset=16)
    return {"block_size": block_size, "size": size, "n": n, "state": state,
            "generation": generation, "segments": segments, "table": table, "end": end,
            "cache_id": cache_id, "target": tuple(target)}


def binding(path: str) -> Optional[bytes]:
    """What binds a v2 cache to the replica it describes: its header without
    the state (its geometry, random id and generation, which every commit
    moves on), so that a cache copied from another disk or put back from an
    older cycle is told apart, while one a cycle is changing is not. None
    for a file in another format (a v1 cache: the caller digests it whole).

    Raises:
        FileNotFoundError: There is no file.
        OSError: It cannot be read.
    """
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if raw[:8] != MAGIC:
        return None
    return raw[:STATE_AT] + b"\0" + raw[STATE_AT + 1:]


def pending_runs(fd: int, blocks: int, path: str, digest):
    """The runs of the side file open at `fd` (`path`, of a cache of
    `blocks` blocks), each as (first block, count, zero mask then hashes),
    fed to `digest` as read. FormatError naming the offset of a run that is
    truncated or out of the disk."""
    total, pos = os.fstat(fd).st_size, 0
    while pos < total:
        head = os.pread(fd, PENDING.size, pos)
        if len(head) != PENDING.size:
            raise FormatError("signature cache side file truncated", path=path, offset=pos)
        first, count = PENDING.unpack(head)
        if first + count > blocks:
            raise FormatError("signature cache side file damaged", path=path, offset=pos)
        body = os.pread(fd, 17 * count, pos + PENDING.size)
        if len(body) != 17 * count:
            raise FormatError("signature cache side file truncated", path=path, offset=pos)
        digest.update(head).update(body)
        yield first, count, body
        pos += PENDING.size + 17 * count

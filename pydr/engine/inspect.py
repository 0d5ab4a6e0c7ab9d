"""Describing a pydr file and verifying it from end to end (``pydr info``)."""

import os
import struct

from ..errors import CorruptDelta
from . import bindings as B
from .delta import HEADER_SIZE, MAGIC as DELTA_MAGIC, DeltaHeader
from .signatures import Signature
from .sigcache_layout import MAGIC as SIGCACHE_MAGIC, STATE_NAMES


def describe_delta(path):
    """Read a whole delta, checking every record and the END checksum."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
        header = DeltaHeader.parse(raw, path)
        digest = B.Digest().update(raw)
        position, buf = HEADER_SIZE, bytearray()
        records = data = zeros = 0
        while True:
            chunk = f.read(32 << 20)
            buf += chunk
            try:
                complete, count, _, end = B.records_scan(buf)
            except CorruptDelta as exc:
                raise CorruptDelta("corrupt record header", path=path, offset=position + exc.offset) from None
            body = complete - (B.RECORD_HEADER if end else 0)
            pos = 0
            while pos < body:
                info = B.record_parse(buf[pos:pos + B.RECORD_HEADER])
                size = B.RECORD_HEADER + (info["length"] if info["type"] == B.DATA else 0)
                if info["type"] == B.DATA:
                    payload = bytes(buf[pos + B.RECORD_HEADER:pos + size])
                    if B.hash_bytes(B.ALGORITHMS["xxh3-64"], payload)[0] != info["payload_hash"]:
                        raise CorruptDelta("record payload checksum mismatch", path=path,
                                             offset=position + pos)
                    data += info["length"]
                else:
                    zeros += info["length"]
                records += 1
                pos += size
            digest.update(memoryview(buf)[:body])
            if end:
                info = B.record_parse(buf[body:complete])
                if (info["type"] != B.END or info["base_hash"] != struct.unpack("<QQ", digest.digest())
                        or (info["seq"], info["length"], info["offset"]) != (records, data, zeros)):
                    raise CorruptDelta("delta checksum or counts do not match its END record",
                                         path=path, offset=position + body)
                if f.read(1) or complete != len(buf):
                    raise CorruptDelta("data after the end of the delta", path=path,
                                         offset=position + complete)
                break
            if not chunk:
                raise CorruptDelta("delta truncated: no END record", path=path,
                                     offset=position + len(buf))
            del buf[:complete]
            position += complete
    return {
        "path": path, "kind": "delta", "format_version": 1, "block_size": header.block_size,
        "base_size": header.base_size, "result_size": header.result_size,
        "base_identity": header.base_id.hex(), "result_identity": header.result_id.hex(),
        "records": records, "data_bytes": data, "zero_bytes": zeros,
        "file_size": os.path.getsize(path), "checksum": "ok",
    }


def describe_file(path):
    """Kind and details of a pydr file, verified in full."""
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic == DELTA_MAGIC:
        return describe_delta(path)
    if magic == SIGCACHE_MAGIC:
        return describe_cache(path)
    # load() names the problem (empty file, bad magic, truncation, checksum)
    sig = Signature.load(path)
    return {
        "path": path,
        "kind": "signature",
        "format_version": 1,
        "algorithm": sig.algorithm,
        "block_size": sig.block_size,
        "image_size": sig.size,
        "blocks": sig.block_count,
        "zero_blocks": sig.zero_blocks,
        "file_size": os.path.getsize(path),
        "checksum": "ok",
    }


def describe_cache(path):
    """A signature cache in format v2 (docs/FORMAT.md), every segment
    checked: its state, geometry, generation and segments. Raises
    FormatError naming the first damage, OSError."""
    from .sigcache_any import load_any

    with load_any(path, verify=True) as cache:
        data = sum(cache._read_entry(seg)[2] for seg in range(cache.segments))
        return {
            "path": path,
            "kind": "signature cache",
            "format_version": 2,
            "state": STATE_NAMES[cache.state],
            "algorithm": "xxh3-128",
            "block_size": cache.block_size,
            "image_size": cache.size,
            "blocks": cache.n,
            "zero_blocks": cache.n - data,
            "generation": cache.generation,
            "segments": cache.segments,
            "cache_id": cache.cache_id.hex(),
            "file_size": os.path.getsize(path),
            "checksum": "ok",
        }

"""The C core's buffers, records and masks (csrc/delta.c, mask.c): thin
conversions over pydr._core with no error to raise, re-exported by
pydr.engine.bindings (use them from there, as B.record_build and so on).
"""

from .._core import ffi, lib


def mask_pack(mask):
    """(packed bytes, number of set blocks) of a one-byte-per-block mask."""
    src = ffi.from_buffer("uint8_t[]", mask)
    packed = bytearray((len(src) + 7) // 8)
    count = lib.pydr_mask_pack(src, len(src), ffi.from_buffer("uint8_t[]", packed))
    return packed, count


def mask_unpack(packed, nblocks):
    """(one-byte-per-block bytearray, number of set blocks); None if the
    unused bits of the last byte are not zero."""
    src = ffi.from_buffer("uint8_t[]", packed)
    if len(src) != (nblocks + 7) // 8 or not lib.pydr_mask_tail_clear(src, nblocks):
        return None, 0
    mask = bytearray(nblocks)
    count = lib.pydr_mask_unpack(src, nblocks, ffi.from_buffer("uint8_t[]", mask))
    return mask, count


class OutputBuffers:
    """cffi views of a signature's output buffers, released on close().

    ``at(block)`` gives the (hashes, zero_mask) pointers of a block, so that
    threads can fill disjoint slices without creating views per chunk.
    """

    def __init__(self, hashes, zero_mask, words):
        self._h = ffi.from_buffer("uint64_t[]", hashes, require_writable=True)
        self._z = ffi.from_buffer("uint8_t[]", zero_mask, require_writable=True)
        if len(self._h) != len(self._z) * words:
            self.close()
            raise ValueError("hash and mask buffers do not match")
        self.words = words

    def at(self, block):
        return self._h + block * self.words, self._z + block

    def close(self):
        for view in (self._h, self._z):
            ffi.release(view)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


RECORD_HEADER = lib.PYDR_RECORD_HEADER
RECORD_MAX = lib.PYDR_RECORD_MAX
DATA, ZERO, END, COMMIT = (lib.PYDR_RECORD_DATA, lib.PYDR_RECORD_ZERO,
                           lib.PYDR_RECORD_END, lib.PYDR_RECORD_COMMIT)


def record_build(type, offset=0, length=0, base_hash=(0, 0), payload_hash=0, seq=0):
    r = ffi.new("pydr_record *")
    r.type, r.offset, r.length, r.payload_hash, r.seq = type, offset, length, payload_hash, seq
    r.base_hash[0], r.base_hash[1] = base_hash
    out = bytearray(RECORD_HEADER)
    lib.pydr_record_build(ffi.from_buffer("uint8_t[]", out), r)
    return out


def record_parse(header):
    """dict of a 64-byte record header, or None when it fails its checks."""
    r = ffi.new("pydr_record *")
    if lib.pydr_record_parse(ffi.from_buffer("uint8_t[]", header), r) != 0:
        return None
    return {"type": r.type, "offset": r.offset, "length": r.length,
            "base_hash": (r.base_hash[0], r.base_hash[1]),
            "payload_hash": r.payload_hash, "seq": r.seq}


def hashes_digest_ranges(hashes, nblocks, block_size, extents):
    """Digests (2 words per extent) of the base block hashes under extents."""
    n = len(extents) // 2
    out = bytearray(16 * n)
    with ffi.from_buffer("uint64_t[]", hashes) as h, ffi.from_buffer("uint64_t[]", extents) as e:
        lib.pydr_hashes_digest_ranges(h, nblocks, block_size, e, n,
                                      ffi.from_buffer("uint64_t[]", out, require_writable=True))
    return out


def blocks_digest(data, block_size):
    out = ffi.new("uint64_t[2]")
    with ffi.from_buffer("uint8_t[]", data) as view:
        lib.pydr_blocks_digest(view, len(view), block_size, out)
    return int(out[0]), int(out[1])


def journal_capacity(journal_bound, records, block_size):
    """Journal buffer bytes that apply_prepare may need for a scanned batch:
    per record its length plus a longer last base block, and a 64-byte
    header per block in the worst case (zero and data blocks alternating)."""
    return journal_bound + records * block_size + RECORD_HEADER * (
        journal_bound // block_size + 2 * records)

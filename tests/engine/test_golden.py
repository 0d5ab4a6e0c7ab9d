"""Every block hash equals python-xxhash's digest of that block's bytes."""

import os
import random

import pytest
import xxhash

import pydr
from pydr.engine import bindings as B

from conftest import as_ints, oracle, zero_oracle

ALGORITHMS = ["xxh3-64", "xxh3-128"]


def awkward_sizes(bs):
    return sorted({0, 1, 2, 15, 16, 17, 240, 241, bs - 1, bs, bs + 1, 2 * bs - 1,
                   3 * bs + 17, 7 * bs + bs // 2 + 3})


def pattern(size, seed):
    rng = random.Random(seed)
    return rng.randbytes(size)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("block_size", [512, 4096, 65536])
@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "pread"])
def test_awkward_lengths_match_python_xxhash(tmp_path, algorithm, block_size, use_mmap):
    for size in awkward_sizes(block_size):
        data = pattern(size, size)
        path = tmp_path / f"img{size}"
        path.write_bytes(data)
        sig = pydr.signature(path, block_size=block_size, algorithm=algorithm,
                             threads=1, use_mmap=use_mmap)
        assert sig.size == size
        assert sig.block_count == -(-size // block_size)
        assert as_ints(sig) == oracle(data, block_size, algorithm), size
        assert list(sig.zero_mask) == zero_oracle(data, block_size)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hash_array_shape_and_dtype(tmp_path, algorithm):
    path = tmp_path / "img"
    path.write_bytes(os.urandom(5000))
    sig = pydr.signature(path, block_size=4096, algorithm=algorithm)
    assert str(sig.hashes.dtype) == "uint64"
    assert sig.hashes.shape == ((2,) if algorithm == "xxh3-64" else (2, 2))
    assert sig.zero_mask.dtype == bool and sig.zero_mask.shape == (2,)


def test_128_columns_are_low_then_high(tmp_path):
    data = b"pydr" * 1000
    path = tmp_path / "img"
    path.write_bytes(data)
    sig = pydr.signature(path, block_size=65536, algorithm="xxh3-128")
    digest = xxhash.xxh3_128_intdigest(data)
    assert int(sig.hashes[0, 0]) == digest & ((1 << 64) - 1)
    assert int(sig.hashes[0, 1]) == digest >> 64


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_blocks_written_as_data(tmp_path, algorithm):
    bs = 4096
    data = bytes(bs) + b"\x01" + bytes(bs - 1) + bytes(bs) + bytes(100)  # short zero tail
    path = tmp_path / "img"
    path.write_bytes(data)
    sig = pydr.signature(path, block_size=bs, algorithm=algorithm)
    assert list(sig.zero_mask) == [True, False, True, True]
    assert as_ints(sig) == oracle(data, bs, algorithm)
    assert sig.zero_blocks == 3


def test_one_shot_hash_binding_matches_xxhash():
    for size in (0, 1, 3, 16, 17, 128, 129, 240, 241, 1024, 100_000):
        data = pattern(size, 99)
        assert B.hash_bytes(B.ALGORITHMS["xxh3-64"], data) == (xxhash.xxh3_64_intdigest(data),)
        d = xxhash.xxh3_128_intdigest(data)
        assert B.hash_bytes(B.ALGORITHMS["xxh3-128"], data) == (d & (2**64 - 1), d >> 64)


def test_digest_streaming_matches_one_shot():
    data = pattern(300_000, 5)
    d = B.Digest()
    for i in range(0, len(data), 7777):
        d.update(data[i:i + 7777])
    expect = xxhash.xxh3_128_intdigest(data)
    assert d.digest() == expect.to_bytes(16, "little")  # low64 LE then high64 LE


def test_kernel_is_named():
    assert B.kernel_name() in {"generic", "avx2"}


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "pread"])
def test_largest_block_size(tmp_path, use_mmap):
    bs = 64 << 20
    rng = random.Random(3)
    data = rng.randbytes(1 << 20) + bytes(bs - (1 << 20)) + rng.randbytes(1000)
    path = tmp_path / "img"
    path.write_bytes(data)
    sig = pydr.signature(path, block_size=bs, threads=2, use_mmap=use_mmap)
    assert as_ints(sig) == oracle(data, bs, "xxh3-128")
    assert list(sig.zero_mask) == [False, False]

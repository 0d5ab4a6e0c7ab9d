"""Holes are never read, and hash like zeros; data islands at odd offsets."""

import os
import random

import pytest

import pydr

from conftest import as_ints, oracle, write_sparse, zero_oracle


@pytest.mark.parametrize("algorithm", ["xxh3-64", "xxh3-128"])
@pytest.mark.parametrize("block_size", [512, 4096, 65536])
def test_islands_at_odd_offsets(holes, algorithm, block_size):
    size = 3 * (1 << 20) + 12345
    rng = random.Random(block_size)
    islands = [(1, b"a"), (70001, rng.randbytes(5000)), (1 << 20, rng.randbytes(1)),
               (2 * (1 << 20) - 3, rng.randbytes(4099)), (size - 7, b"tailend")]
    path = write_sparse(holes / "img", size, islands)
    data = open(path, "rb").read()
    for use_mmap in (True, False):
        sig = pydr.signature(path, block_size=block_size, algorithm=algorithm,
                             threads=2, use_mmap=use_mmap)
        assert as_ints(sig) == oracle(data, block_size, algorithm)
        assert list(sig.zero_mask) == zero_oracle(data, block_size)
        allocated = os.stat(path).st_blocks * 512
        assert sig.stats.bytes_read <= allocated + 2 * 65536 * len(islands)
        assert sig.stats.bytes_read < size // 4


def test_fully_sparse_file_reads_nothing(holes):
    path = write_sparse(holes / "img", 10 * (1 << 20) + 5, [])
    sig = pydr.signature(path, block_size=4096, algorithm="xxh3-128")
    assert sig.stats.bytes_read == 0
    assert sig.zero_mask.all()
    assert as_ints(sig) == oracle(bytes(sig.size), 4096, "xxh3-128")  # short tail too


def test_hole_then_short_data_tail(holes):
    size = 65536 * 4 + 100
    path = write_sparse(holes / "img", size, [(size - 50, b"x" * 50)])
    data = open(path, "rb").read()
    sig = pydr.signature(path, block_size=65536)
    assert as_ints(sig) == oracle(data, 65536, "xxh3-128")


@pytest.mark.slow
def test_sparse_file_larger_than_4gib_with_data_past_4gib(holes):
    gib = 1 << 30
    size = 5 * gib + 4097
    rng = random.Random(4)
    island_a = rng.randbytes(70_000)
    island_b = rng.randbytes(3)
    islands = [(4 * gib + 12345, island_a), (size - 3, island_b), (gib - 1, b"\x07\x08")]
    path = write_sparse(holes / "big", size, islands)
    bs = 65536
    sig = pydr.signature(path, block_size=bs, algorithm="xxh3-128", threads=2)
    assert sig.size == size and sig.block_count == -(-size // bs)
    assert sig.stats.bytes_read < 16 << 20

    # Compare every block that holds data against xxhash of the real bytes,
    # and check that every other block has the zero-block hash.
    zero_full = oracle(bytes(bs), bs, "xxh3-128")[0]
    data_blocks = set()
    with open(path, "rb") as f:
        for off, chunk in islands:
            for b in range(off // bs, (off + len(chunk) - 1) // bs + 1):
                data_blocks.add(b)
                f.seek(b * bs)
                block = f.read(bs)
                assert (int(sig.hashes[b, 0]), int(sig.hashes[b, 1])) == \
                    oracle(block, bs, "xxh3-128")[0], b
    others = [b for b in range(sig.block_count - 1) if b not in data_blocks]
    hashes = sig.hashes[others]
    assert (hashes[:, 0] == zero_full[0]).all() and (hashes[:, 1] == zero_full[1]).all()
    assert sig.zero_mask[others].all()


def test_block_device(tmp_path):
    """A loop device: size from BLKGETSIZE64, same hashes as the file."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    backing = tmp_path / "dev.img"
    data = os.urandom(3 << 20)
    backing.write_bytes(data)
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        sig = pydr.signature(dev, block_size=4096)
        assert sig.size == len(data)
        assert as_ints(sig) == oracle(data, 4096, "xxh3-128")
        assert sig == pydr.signature(backing, block_size=4096)
    finally:
        subprocess.run(["losetup", "-d", dev])

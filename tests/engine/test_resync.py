"""pydr.resync: equality, bytes moved, signature cache, changed extents."""

import os
import random

import pytest

import pydr
from pydr.engine import journal as J
from pydr.engine.sigcache_any import cached_signature

from conftest import write_sparse


def resync_bytes(tmp_path, a, b, **kw):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b)
    dst.write_bytes(a)
    stats = pydr.resync(src, dst, **kw)
    assert dst.read_bytes() == b
    assert not os.path.exists(J.journal_path(dst))
    return stats


@pytest.mark.parametrize("size_a,size_b", [(0, 5000), (5000, 0), (0, 0), (12_345, 12_345),
                                           (1 << 20, (1 << 20) + 1), ((3 << 20) + 7, 100)])
def test_sizes(tmp_path, size_a, size_b):
    resync_bytes(tmp_path, os.urandom(size_a), os.urandom(size_b))


def test_random_4k_writes_cost_little(tmp_path):
    rng = random.Random(3)
    size = 32 << 20
    a = rng.randbytes(size)
    b = bytearray(a)
    blocks = rng.sample(range(size // 4096), 300)
    for blk in blocks:
        off = blk * 4096 + rng.randrange(4096)
        b[off] ^= 0x5A
    stats = resync_bytes(tmp_path, a, bytes(b), threads=2)
    assert stats.blocks_changed == 300
    assert stats.bytes_written <= 1.25 * 300 * 4096
    assert stats.bytes_written == 300 * 4096


def test_identical_writes_nothing(tmp_path):
    a = os.urandom(1 << 20)
    stats = resync_bytes(tmp_path, a, a)
    assert stats.bytes_written == 0 and stats.blocks_changed == 0


def test_window_boundaries(tmp_path, monkeypatch):
    from pydr.engine import resync as R

    monkeypatch.setattr(R, "WINDOW", 64 << 10)
    rng = random.Random(4)
    a = rng.randbytes((1 << 20) + 333)
    b = bytearray(a)
    for off in (65535, 65536, 131071, 500_000, len(b) - 1):
        b[off] ^= 1
    resync_bytes(tmp_path, a, bytes(b) + b"grow" * 5000)
    resync_bytes(tmp_path, a, bytes(b[:300_000]))


def test_signature_cache(tmp_path):
    rng = random.Random(5)
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    a = rng.randbytes(4 << 20)
    dst.write_bytes(a)
    b = bytearray(a)
    b[100_000:110_000] = rng.randbytes(10_000)
    src.write_bytes(bytes(b))
    first = pydr.resync(src, dst, signature_cache=cache)
    assert not first.used_cache and cache.exists()
    assert cached_signature(cache) == pydr.signature(dst, block_size=4096)
    b[2_000_000:2_000_100] = rng.randbytes(100)
    src.write_bytes(bytes(b))
    second = pydr.resync(src, dst, signature_cache=cache)
    assert second.used_cache
    assert second.bytes_read == len(b)  # the source only: the target was not read
    assert dst.read_bytes() == bytes(b)
    assert second.bytes_written == 4096


def test_stale_signature_cache_is_not_trusted(tmp_path):
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    a = os.urandom(1 << 20)
    src.write_bytes(a)
    dst.write_bytes(a)
    pydr.resync(src, dst, signature_cache=cache)
    # someone writes to the target after the cache was made
    with open(dst, "r+b") as f:
        f.seek(5000)
        f.write(b"tampered")
    os.utime(dst, ns=(os.stat(cache).st_mtime_ns + 10**9,) * 2)
    stats = pydr.resync(src, dst, signature_cache=cache)
    assert not stats.used_cache
    assert dst.read_bytes() == a


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path):
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    a = os.urandom(1 << 20)
    src.write_bytes(a)
    dst.write_bytes(bytes(len(a)))
    cache.write_bytes(b"garbage")
    stats = pydr.resync(src, dst, signature_cache=cache)
    assert not stats.used_cache and dst.read_bytes() == a
    assert cached_signature(cache).size == len(a)


def test_changed_extents_only_hashes_those(tmp_path):
    rng = random.Random(6)
    size = 16 << 20
    a = rng.randbytes(size)
    b = bytearray(a)
    b[5 << 20:(5 << 20) + 100] = rng.randbytes(100)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(bytes(b))
    dst.write_bytes(a)
    stats = pydr.resync(src, dst, changed_extents=[(5 << 20, 100)])
    assert dst.read_bytes() == bytes(b)
    assert stats.bytes_read == 2 * 4096


def test_verify(tmp_path):
    a = os.urandom(1 << 20)
    b = bytearray(a)
    b[777] ^= 1
    stats = resync_bytes(tmp_path, a, bytes(b), verify=True)
    assert stats.bytes_written == 4096


def test_same_file_is_refused(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    with pytest.raises(pydr.SameFile):
        pydr.resync(p, p)
    os.link(p, tmp_path / "hard")
    with pytest.raises(pydr.SameFile):
        pydr.resync(p, tmp_path / "hard")


def test_sparse_source_makes_holes(holes):
    size = 8 << 20
    write_sparse(holes / "src", size, [(1 << 20, os.urandom(4096))])
    (holes / "dst").write_bytes(os.urandom(size))
    stats = pydr.resync(holes / "src", holes / "dst")
    assert (holes / "dst").read_bytes() == (holes / "src").read_bytes()
    assert stats.bytes_zeroed >= size - (1 << 20)
    assert os.stat(holes / "dst").st_blocks * 512 < 1 << 20


@pytest.mark.slow
def test_data_past_4gib(holes):
    gib = 1 << 30
    size = 5 * gib + 3
    write_sparse(holes / "src", size, [(4 * gib + 99, os.urandom(70_000)), (size - 3, b"abc")])
    write_sparse(holes / "dst", size, [(4 * gib + 99, os.urandom(70_000))])
    stats = pydr.resync(holes / "src", holes / "dst", threads=2)
    assert stats.bytes_written <= 24 * 4096
    assert pydr.signature(holes / "src") == pydr.signature(holes / "dst")


def test_missing_target_is_created(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(300_000))
    stats = pydr.resync(src, tmp_path / "new")
    assert (tmp_path / "new").read_bytes() == src.read_bytes()
    assert stats.bytes_written == 300_000


def test_failed_first_copy_leaves_nothing(tmp_path):
    import threading

    src = tmp_path / "src"
    src.write_bytes(os.urandom(300_000))
    ev = threading.Event()
    ev.set()
    with pytest.raises(pydr.Cancelled):
        pydr.resync(src, tmp_path / "new", cancel=ev)
    assert sorted(os.listdir(tmp_path)) == ["src"]


@pytest.mark.parametrize("new_size", [(1 << 20) + 333, (1 << 20) + 100_000, 500_000])
def test_streamed_cache_across_windows(tmp_path, monkeypatch, new_size):
    """Small windows: the cache is read and written in many pieces, and ends
    equal to a full signature of the target, also when the image grows or
    shrinks."""
    from pydr.engine import resync as R

    monkeypatch.setattr(R, "WINDOW", 64 << 10)
    rng = random.Random(new_size)
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    a = rng.randbytes((1 << 20) + 333)
    dst.write_bytes(a)
    src.write_bytes(a)
    pydr.resync(src, dst, signature_cache=cache)
    b = bytearray(a[:new_size]) + rng.randbytes(max(0, new_size - len(a)))
    for off in range(1000, min(len(b), 900_000), 70_001):
        b[off] ^= 0xFF
    b[200_000:270_000] = bytes(70_000)
    src.write_bytes(bytes(b))
    stats = pydr.resync(src, dst, signature_cache=cache)
    assert stats.used_cache
    assert dst.read_bytes() == bytes(b)
    assert cached_signature(cache) == pydr.signature(dst, block_size=4096)


def test_changed_extents_with_cache_keeps_the_other_hashes(tmp_path, monkeypatch):
    from pydr.engine import resync as R

    monkeypatch.setattr(R, "WINDOW", 256 << 10)
    rng = random.Random(12)
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    a = rng.randbytes(2 << 20)
    src.write_bytes(a)
    dst.write_bytes(a)
    pydr.resync(src, dst, signature_cache=cache)
    b = bytearray(a)
    b[300_000:300_010] = b"0123456789"
    b[1_500_000:1_600_000] = rng.randbytes(100_000)
    src.write_bytes(bytes(b))
    stats = pydr.resync(src, dst, signature_cache=cache,
                        changed_extents=[(300_000, 10), (1_500_000, 100_000)])
    assert stats.used_cache and dst.read_bytes() == bytes(b)
    assert stats.bytes_read < 200_000  # only the extents of the source were read
    assert cached_signature(cache) == pydr.signature(dst, block_size=4096)


def test_cache_of_another_block_size_is_not_used(tmp_path):
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    a = os.urandom(300_000)
    src.write_bytes(a)
    dst.write_bytes(a)
    pydr.signature(dst, block_size=8192).save(cache)
    stats = pydr.resync(src, dst, signature_cache=cache)
    assert not stats.used_cache
    assert cached_signature(cache).block_size == 4096

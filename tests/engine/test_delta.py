"""apply(delta(a, b), a) == b, and the edge cases block-sync tools test."""

import io
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pydr
from pydr.engine import journal as J

from conftest import write_sparse


def roundtrip(tmp_path, a, b, block_size=4096, via="target"):
    pa, pb, pd = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "d.delta"
    pa.write_bytes(a)
    pb.write_bytes(b)
    if via == "target":
        stats = pydr.make_delta(pb, pd, target=pa, block_size=block_size)
    else:
        sig = pydr.signature(pa, block_size=block_size)
        stats = pydr.make_delta(pb, pd, against=sig)
    applied = pydr.apply_delta(pd, pa)
    assert pa.read_bytes() == b
    assert not os.path.exists(J.journal_path(pa))
    return stats, applied


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), size_a=st.integers(0, 30_000), size_b=st.integers(0, 30_000),
       edits=st.lists(st.tuples(st.integers(0, 30_000), st.integers(1, 5000), st.booleans()), max_size=6),
       block_size=st.sampled_from([512, 4096]), via=st.sampled_from(["target", "against"]))
def test_hypothesis_apply_delta_roundtrip(tmp_path, seed, size_a, size_b, edits, block_size, via):
    rng = random.Random(seed)
    a = rng.randbytes(size_a)
    b = bytearray(a[:size_b]) + bytearray(max(0, size_b - size_a))
    for off, length, zero in edits:
        if off < len(b):
            n = min(length, len(b) - off)
            b[off:off + n] = bytes(n) if zero else rng.randbytes(n)
    roundtrip(tmp_path, a, bytes(b), block_size, via)


@pytest.mark.parametrize("pos", [0, 4095, 4096, 8191, 3 * 4096 + 17])
def test_one_byte_at_block_edges(tmp_path, pos):
    a = os.urandom(5 * 4096 + 100)
    b = bytearray(a)
    b[pos] ^= 0xFF
    stats, applied = roundtrip(tmp_path, a, bytes(b))
    assert stats.records == 1 and stats.data_bytes == 4096
    assert applied.bytes_written == 4096


@pytest.mark.parametrize("size_a,size_b", [(0, 10_000), (10_000, 0), (0, 0), (4096, 4097),
                                           (4097, 4096), (100, 1 << 20), (1 << 20, 100)])
def test_growth_and_shrinkage(tmp_path, size_a, size_b):
    a, b = os.urandom(size_a), os.urandom(size_b)
    roundtrip(tmp_path, a, b)


def test_identical_images_give_an_empty_delta(tmp_path):
    a = os.urandom(50_000)
    stats, applied = roundtrip(tmp_path, a, a)
    assert stats.records == 0 and applied.bytes_written == 0


def test_zero_blocks_become_holes(holes):
    a = os.urandom(1 << 20)
    b = bytearray(a)
    b[4096 * 10:4096 * 200] = bytes(4096 * 190)
    stats, applied = roundtrip(holes, a, bytes(b))
    assert stats.zero_bytes == 4096 * 190 and stats.data_bytes == 0
    allocated = os.stat(holes / "a.img").st_blocks * 512
    assert allocated <= (1 << 20) - 4096 * 190 + 65536  # the zeroed range is a hole now


def test_holes_over_data_and_data_over_holes(holes):
    size = 3 << 20
    write_sparse(holes / "x", size, [(100_000, os.urandom(300_000)), (2 << 20, os.urandom(5000))])
    write_sparse(holes / "y", size, [(1 << 20, os.urandom(200_000)), (2 << 20, os.urandom(5000))])
    a, b = (holes / "x").read_bytes(), (holes / "y").read_bytes()
    roundtrip(holes, a, b)


def test_streams_through_file_objects(tmp_path):
    a = os.urandom(200_000)
    b = bytearray(a)
    b[1000:2000] = os.urandom(1000)
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(bytes(b))
    buf = io.BytesIO()
    pydr.make_delta(tmp_path / "b", buf, target=tmp_path / "a")
    buf.seek(0)
    pydr.apply_delta(buf, tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == bytes(b)


def test_against_a_64k_signature(tmp_path):
    a = os.urandom(1 << 20)
    b = bytearray(a)
    b[300_000] ^= 1
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(bytes(b))
    pydr.signature(tmp_path / "a").save(tmp_path / "a.sig")  # default 64 KiB blocks
    stats = pydr.make_delta(tmp_path / "b", tmp_path / "d", against=tmp_path / "a.sig")
    assert stats.data_bytes == 65536
    pydr.apply_delta(tmp_path / "d", tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == bytes(b)


def test_large_change_is_split_into_bounded_records(tmp_path):
    a = bytes(12 << 20)
    b = os.urandom(12 << 20)
    stats, _ = roundtrip(tmp_path, a, b)
    assert stats.records == 3  # 4 MiB records


@pytest.mark.slow
def test_data_past_4gib(holes):
    gib = 1 << 30
    size = 5 * gib
    write_sparse(holes / "a", size, [(4 * gib + 12345, b"old" * 1000)])
    write_sparse(holes / "b", size, [(4 * gib + 12345, b"new" * 1000), (size - 10, b"end!end!ab")])
    pydr.make_delta(holes / "b", holes / "d", target=holes / "a")
    pydr.apply_delta(holes / "d", holes / "a")
    with open(holes / "a", "rb") as fa, open(holes / "b", "rb") as fb:
        for off in (4 * gib, size - 4096):
            fa.seek(off)
            fb.seek(off)
            assert fa.read(1 << 20) == fb.read(1 << 20)
    assert pydr.signature(holes / "a") == pydr.signature(holes / "b")


def test_verify_option(tmp_path):
    a = os.urandom(100_000)
    b = bytearray(a)
    b[5] ^= 1
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(bytes(b))
    pydr.make_delta(tmp_path / "b", tmp_path / "d", target=tmp_path / "a")
    pydr.apply_delta(tmp_path / "d", tmp_path / "a", verify=True)
    assert (tmp_path / "a").read_bytes() == bytes(b)


def test_verify_catches_a_base_that_differs_outside_the_changes(tmp_path):
    a = os.urandom(100_000)
    b = bytearray(a)
    b[5] ^= 1
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(bytes(b))
    pydr.make_delta(tmp_path / "b", tmp_path / "d", target=tmp_path / "a")
    other = bytearray(a)
    other[90_000] ^= 1  # differs only in a block the delta does not touch
    (tmp_path / "a").write_bytes(bytes(other))
    with pytest.raises(pydr.BaseMismatch):
        pydr.apply_delta(tmp_path / "d", tmp_path / "a", verify=True)
    assert (tmp_path / "a").read_bytes() == bytes(other)


def test_many_batches(tmp_path, monkeypatch):
    from pydr.engine import delta as D

    monkeypatch.setattr(D, "BATCH_BYTES", 64 << 10)
    monkeypatch.setattr(D, "RECORD_SPLIT", 16 << 10)
    rng = random.Random(9)
    a = rng.randbytes(2 << 20)
    b = bytearray(a)
    for off in range(0, len(b), 50_000):
        b[off:off + 30_000] = rng.randbytes(30_000)
    stats, _ = roundtrip(tmp_path, a, bytes(b))
    assert stats.records > 60
    (tmp_path / "dst").write_bytes(a)
    (tmp_path / "src").write_bytes(bytes(b))
    pydr.resync(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == bytes(b)

"""Signature file format v1 (docs/FORMAT.md): round trip and refusal of bad files."""

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pydr
from pydr.engine import signatures as S
from pydr.engine import bindings as B


@pytest.fixture
def sig_file(tmp_path):
    img = tmp_path / "img"
    img.write_bytes(os.urandom(100_000) + bytes(70_000) + b"tail")
    sig = pydr.signature(img, block_size=4096)
    path = tmp_path / "img.sig"
    sig.save(path)
    return sig, path


@pytest.mark.parametrize("algorithm", ["xxh3-64", "xxh3-128"])
def test_round_trip(tmp_path, algorithm):
    img = tmp_path / "img"
    img.write_bytes(os.urandom(12345) + bytes(9000))
    sig = pydr.signature(img, block_size=1024, algorithm=algorithm)
    sig.save(tmp_path / "s")
    back = pydr.Signature.load(tmp_path / "s")
    assert back == sig
    assert back.hashes.shape == sig.hashes.shape and (back.hashes == sig.hashes).all()
    assert (back.zero_mask == sig.zero_mask).all()
    assert (back.block_size, back.size, back.algorithm) == (1024, 21345, algorithm)


def test_empty_image_round_trip(tmp_path):
    img = tmp_path / "empty"
    img.write_bytes(b"")
    sig = pydr.signature(img)
    assert sig.block_count == 0 and sig.hashes.shape == (0, 2)
    sig.save(tmp_path / "s")
    assert pydr.Signature.load(tmp_path / "s") == sig


def test_layout_is_as_documented(sig_file):
    sig, path = sig_file
    raw = path.read_bytes()
    assert raw[:8] == b"PYDRSIG\x00"
    version, algo, bs, size, n, zeros = struct.unpack_from("<HHIQQQ", raw, 8)
    assert (version, algo, bs, size, n, zeros) == (1, 2, 4096, sig.size, sig.block_count, sig.zero_blocks)
    assert struct.unpack_from("<Q", raw, 56)[0] == B.hash_bytes(B.ALGORITHMS["xxh3-64"], raw[:56])[0]
    assert struct.unpack_from("<QQ", raw, 64) == (int(sig.hashes[0, 0]), int(sig.hashes[0, 1]))
    assert raw[-32:-24] == b"PYDREND\x00"
    assert struct.unpack_from("<Q", raw, len(raw) - 24)[0] == len(raw)
    import xxhash
    assert raw[-16:] == xxhash.xxh3_128_intdigest(raw[:-16]).to_bytes(16, "little")


def test_every_truncation_is_refused(sig_file, tmp_path):
    _, path = sig_file
    raw = path.read_bytes()
    bad = tmp_path / "bad.sig"
    for cut in list(range(0, 80)) + list(range(len(raw) - 40, len(raw))) + [len(raw) // 2]:
        bad.write_bytes(raw[:cut])
        with pytest.raises(pydr.FormatError) as info:
            pydr.Signature.load(bad)
        assert str(bad) in str(info.value)


def test_trailing_garbage_is_refused(sig_file, tmp_path):
    _, path = sig_file
    bad = tmp_path / "bad.sig"
    bad.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(pydr.FormatError, match="trailing data"):
        pydr.Signature.load(bad)


def test_every_flipped_byte_is_refused(sig_file, tmp_path):
    _, path = sig_file
    raw = bytearray(path.read_bytes())
    bad = tmp_path / "bad.sig"
    positions = list(range(0, 64)) + list(range(64, len(raw), 97)) + list(range(len(raw) - 32, len(raw)))
    for pos in positions:
        flipped = bytearray(raw)
        flipped[pos] ^= 0x40
        bad.write_bytes(bytes(flipped))
        with pytest.raises(pydr.FormatError):
            pydr.Signature.load(bad)


def _reheader(raw, **changes):
    fields = list(S._HEADER.unpack_from(raw, 0))
    names = ["magic", "version", "algorithm", "block_size", "size", "n", "zeros", "flags", "reserved"]
    for k, v in changes.items():
        fields[names.index(k)] = v
    head = S._HEADER.pack(*fields)
    head += struct.pack("<Q", B.hash_bytes(B.ALGORITHMS["xxh3-64"], head)[0])
    return head + raw[64:]


@pytest.mark.parametrize("change,message", [
    ({"version": 2}, "version 2 is not supported"),
    ({"algorithm": 9}, "unknown hash algorithm"),
    ({"block_size": 3000}, "power of two"),
    ({"n": 1}, "inconsistent"),
    ({"flags": 1}, "inconsistent"),
])
def test_header_fields_are_validated(sig_file, tmp_path, change, message):
    _, path = sig_file
    bad = tmp_path / "bad.sig"
    bad.write_bytes(_reheader(path.read_bytes(), **change))
    with pytest.raises(pydr.FormatError, match=message):
        pydr.Signature.load(bad)


def test_huge_claimed_size_does_not_allocate(sig_file, tmp_path):
    _, path = sig_file
    bad = tmp_path / "bad.sig"
    bs = 512
    size = 1 << 61
    bad.write_bytes(_reheader(path.read_bytes(), block_size=bs, size=size, n=size // bs))
    with pytest.raises(pydr.FormatError, match="truncated"):
        pydr.Signature.load(bad)


@pytest.mark.parametrize("content,message", [
    (b"", "empty file"),
    (b"hello world, this is not a signature" * 3, "bad magic"),
    (b"PYDRSIG\x00\x01", "header truncated"),
])
def test_foreign_files(tmp_path, content, message):
    bad = tmp_path / "bad.sig"
    bad.write_bytes(content)
    with pytest.raises(pydr.FormatError, match=message):
        pydr.Signature.load(bad)


def test_save_is_atomic_and_leaves_no_temp(sig_file, tmp_path):
    sig, path = sig_file
    before = sorted(os.listdir(tmp_path))
    sig.save(path)
    assert sorted(os.listdir(tmp_path)) == before


def test_save_failure_keeps_the_old_file(sig_file, tmp_path, monkeypatch):
    sig, path = sig_file
    old = path.read_bytes()
    monkeypatch.setattr(S.Signature, "_write", lambda self, f: (f.write(b"partial"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        sig.save(path)
    assert path.read_bytes() == old
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=20000), bs=st.sampled_from([512, 1024, 4096]),
       algorithm=st.sampled_from(["xxh3-64", "xxh3-128"]))
def test_hypothesis_round_trip(tmp_path, data, bs, algorithm):
    img = tmp_path / "h.img"
    img.write_bytes(data)
    sig = pydr.signature(img, block_size=bs, algorithm=algorithm, threads=2)
    sig.save(tmp_path / "h.sig")
    assert pydr.Signature.load(tmp_path / "h.sig") == sig

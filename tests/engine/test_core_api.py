"""The C core's public API (csrc/pydr.h): its version, hash_words of an
unknown algorithm, and the one error channel -- a failure deep in signing,
encoding or applying records tells where it happened through the caller's
pydr_error, read by bindings.raise_for_code alone."""

import errno
import os
from array import array
import shutil
import subprocess
import sys

import pytest
import xxhash

import pydr
from pydr.engine import bindings as B
from pydr.engine.bindings import ffi, lib

from conftest import oracle

XXH3_128 = B.ALGORITHMS["xxh3-128"]


# -- version ---------------------------------------------------------------------------

def test_version_number_and_string_are_the_librarys_and_the_packages():
    major, minor, patch = B.C_VERSION  # the header's macros
    assert lib.pydr_version_number() == major * 10000 + minor * 100 + patch
    assert lib.pydr_version_number() == lib.PYDR_VERSION_NUMBER
    assert B.core_version() == f"{major}.{minor}.{patch}"
    assert B.core_version() == pydr.__version__
    assert B.version_number("0.1.0") == 100 and B.version_number("12.3.45rc1") == 120345


def test_a_core_of_another_version_is_an_import_error_naming_both():
    with pytest.raises(ImportError) as info:
        B.check_core_version(10203, "1.2.3", "0.1.0")
    assert "1.2.3" in str(info.value) and "0.1.0" in str(info.value)
    B.check_core_version(100, "0.1.0", "0.1.0")  # the same: nothing raised


def test_importing_pydr_with_a_core_from_another_build_fails_clearly(tmp_path):
    """The installed core beside Python code that says it is 9.8.7: import
    pydr stops with an ImportError naming both versions."""
    package = tmp_path / "pydr"
    shutil.copytree(os.path.dirname(pydr.__file__), package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (package / "_version.py").write_text('__version__ = "9.8.7"\n')
    r = subprocess.run([sys.executable, "-c", "import pydr.engine.bindings"],
                       env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:"), r.stderr
    assert f"version {B.core_version()}" in last and "version 9.8.7" in last, last


# -- hash_words ------------------------------------------------------------------------

@pytest.mark.parametrize("code", [0, -1, 3, 7, 1 << 20])
def test_hash_words_of_an_unknown_algorithm_is_an_error(code):
    assert lib.pydr_hash_words(code) == lib.PYDR_E_UNKNOWN_ALGORITHM < 0
    with pytest.raises(pydr.FormatError) as info:
        B.hash_words(code)
    assert isinstance(info.value, ValueError)
    assert "unknown hash algorithm" in str(info.value) and f"code {code}" in str(info.value)
    out = ffi.new("uint64_t[2]")
    assert lib.pydr_hash(code, b"abc", 3, out) == lib.PYDR_E_UNKNOWN_ALGORITHM
    with pytest.raises(pydr.FormatError, match="unknown hash algorithm"):
        B.Signer(4096, code)


def test_hash_words_of_the_known_algorithms():
    assert B.hash_words(B.ALGORITHMS["xxh3-64"]) == 1
    assert B.hash_words(XXH3_128) == 2


# -- the one error channel -------------------------------------------------------------

def test_raise_for_code_reads_offset_and_detail_from_a_pydr_error():
    error = B.new_error()
    error.code, error.has_offset, error.offset = -errno.EIO, 1, 123 << 20
    error.detail = b"nbd_pread: server said no"
    with pytest.raises(OSError) as info:
        B.raise_for_code(-errno.EIO, path="/d", error=error)
    assert info.value.errno == errno.EIO and info.value.filename == "/d"
    assert f"at offset {123 << 20}" in info.value.strerror
    assert info.value.strerror.endswith(": nbd_pread: server said no")
    error.has_offset = 0  # no place: no offset in the message
    with pytest.raises(pydr.BaseMismatch) as info:
        B.raise_for_code(-1005, path="/d", error=error)
    assert info.value.offset is None and "server said no" in info.value.message


@pytest.fixture
def bad_disk(faulty_image):
    """A 16 MiB disk whose byte at 5 MiB + 12345 fails to read (EIO), open
    read-only as a device; yields (device, fd, path, data, bad offset)."""
    bad = (5 << 20) + 12345
    path, data = faulty_image(bad, bad + 1)
    fd = os.open(path, os.O_RDONLY)
    device = B.Device.open_fd(fd, name=path)
    yield device, fd, path, data, bad
    device.close()
    os.close(fd)


@pytest.mark.parametrize("flags", [0, 1], ids=["mmap", "pread"])
def test_a_read_error_deep_in_signing_names_its_block(bad_disk, flags):
    device, fd, path, data, bad = bad_disk
    n = len(data) // 4096
    hashes, mask = ffi.new("uint64_t[]", 2 * n), ffi.new("uint8_t[]", n)
    signer = ffi.new("pydr_signer **")
    assert lib.pydr_signer_create(signer, 4096, XXH3_128, 0, flags) == 0
    signer = ffi.gc(signer[0], lib.pydr_signer_free)
    error = B.new_error()
    rc = lib.pydr_signer_sign(signer, device._ptr, 0, len(data), hashes, mask, n, ffi.NULL,
                              error)
    assert rc == -errno.EIO and error.code == rc
    assert error.has_offset == 1 and error.offset == bad // 4096 * 4096
    # the I/O buffers (1 MiB) before the failing one were signed, exactly
    good = bad // (1 << 20) * (1 << 20) // 4096
    expect = oracle(data[:good * 4096], 4096, "xxh3-128")
    assert [(hashes[2 * i], hashes[2 * i + 1]) for i in range(good)] == expect
    # and through the bindings: the same place, in the exception
    with B.OutputBuffers(bytearray(16 * n), bytearray(n), 2) as out, \
            B.Signer(4096, XXH3_128, use_mmap=not flags) as s:
        h, z = out.at(0)
        with pytest.raises(OSError) as info:
            s.sign(device, 0, len(data), h, z, n, None)
    assert info.value.errno == errno.EIO and info.value.filename == path
    assert f"at offset {bad // 4096 * 4096}" in info.value.strerror


def test_a_read_error_deep_in_encoding_names_its_offset(bad_disk):
    device, fd, path, data, bad = bad_disk
    extents = array("Q", [0, 4096, 1 << 20, 8192, 5 << 20, 1 << 20])  # the third: bad byte
    args = (extents, bytearray(3), bytearray(16 * 3), 0, bytearray(4 << 20))
    with pytest.raises(OSError) as info:
        device.encode(*args)
    assert info.value.errno == errno.EIO and info.value.filename == path
    assert f"at offset {bad // 4096 * 4096}" in info.value.strerror
    # the raw call: the channel, and what was encoded before the failure
    used, done, hused = (ffi.new("size_t *") for _ in range(3))
    error, out = B.new_error(), bytearray(4 << 20)
    e, z, b, o = (ffi.from_buffer("uint64_t[]", extents), ffi.from_buffer("uint8_t[]", bytes(3)),
                  ffi.from_buffer("uint64_t[]", bytes(48)), ffi.from_buffer("uint8_t[]", out))
    rc = lib.pydr_encode(device._ptr, e, z, b, 3, 0, o, len(out), used, done, 0, ffi.NULL, 0,
                         hused, error)
    assert rc == -errno.EIO == error.code and error.offset == bad // 4096 * 4096
    assert done[0] == 2 and used[0] == 2 * B.RECORD_HEADER + 4096 + 8192


def _data_record(offset, payload, seq=0, base=(1, 2)):
    """A DATA record; `base`: the digest of the block hashes it replaces."""
    digest = xxhash.xxh3_64_intdigest(payload)
    return B.record_build(B.DATA, offset, len(payload), base, digest, seq) + payload


def test_a_read_error_deep_in_an_apply_names_its_offset(bad_disk):
    """apply_prepare reads the old content a record replaces: the failing
    read is reported at its own offset, not at the record's start."""
    device, fd, path, data, bad = bad_disk
    recs = _data_record(4 << 20, os.urandom(2 << 20))
    scratch = bytearray(B.RECORD_MAX + 4096)
    journal = bytearray(B.journal_capacity(len(recs), 1, 4096))
    with pytest.raises(OSError) as info:
        device.apply_prepare(recs, 4096, len(data), len(data), B.ApplyState(), scratch, journal)
    assert info.value.errno == errno.EIO and info.value.filename == path
    assert f"at offset {bad // 4096 * 4096}" in info.value.strerror


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "t.img"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    device = B.Device.open_fd(fd, name=str(path))
    yield device, path, data
    device.close()
    os.close(fd)


def test_a_corrupt_record_is_reported_at_its_position_in_the_batch(target):
    device, path, data = target
    first = _data_record(0, os.urandom(4096), seq=0, base=B.blocks_digest(data[:4096], 4096))
    second = bytearray(_data_record(8192, os.urandom(4096), seq=1))
    second[B.RECORD_HEADER + 100] ^= 1  # its payload fails its checksum
    scratch = bytearray(B.RECORD_MAX + 4096)
    journal = bytearray(B.journal_capacity(len(first) + len(second), 2, 4096))
    with pytest.raises(pydr.CorruptDelta) as info:
        device.apply_prepare(first + second, 4096, len(data), len(data), B.ApplyState(),
                             scratch, journal)
    assert info.value.offset == len(first)
    # a damaged header: the scanner and the writer say where it starts
    header = bytearray(second)
    header[8] ^= 1
    with pytest.raises(pydr.CorruptDelta) as info:
        B.records_scan(first + header)
    assert info.value.offset == len(first)
    with pytest.raises(pydr.CorruptDelta) as info:
        device.apply_write(first[:B.RECORD_HEADER] + first[B.RECORD_HEADER:] + header)
    assert info.value.offset == len(first)


def test_a_base_mismatch_is_reported_at_its_record(target):
    device, path, data = target
    recs = _data_record(0, os.urandom(4096)) + _data_record(65536, os.urandom(4096), seq=1)
    st = B.ApplyState()
    scratch = bytearray(B.RECORD_MAX + 4096)
    journal = bytearray(B.journal_capacity(len(recs), 2, 4096))
    error, used = B.new_error(), ffi.new("size_t *")
    rc = lib.pydr_apply_prepare(device._ptr, ffi.from_buffer(recs), len(recs), 4096, len(data),
                                len(data), st._ptr, ffi.from_buffer(scratch), len(scratch),
                                ffi.from_buffer(journal), len(journal), used, error)
    assert rc == lib.PYDR_E_BASE_MISMATCH == error.code
    assert error.has_offset == 1 and error.offset == 0
    assert path.read_bytes() == data


def test_a_file_device_has_no_block_status_and_says_so(target):
    device, path, data = target
    with pytest.raises(OSError) as info:
        device.extents(0, len(data))
    assert info.value.errno == errno.EOPNOTSUPP and info.value.filename == str(path)

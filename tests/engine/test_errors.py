"""Bad input: a clear error that names the path (and offset), nothing else."""

import errno
import os
import threading

import pytest

import pydr
from pydr.engine import bindings as B


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        pydr.signature(tmp_path / "nope")
    assert info.value.filename == str(tmp_path / "nope")


def test_directory(tmp_path):
    with pytest.raises(IsADirectoryError) as info:
        pydr.signature(tmp_path)
    assert info.value.errno == errno.EISDIR and info.value.filename == str(tmp_path)


def test_fifo_is_unsupported(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # open a writer so that opening the FIFO for reading does not block
    fd = os.open(fifo, os.O_RDWR)
    try:
        with pytest.raises(pydr.UnsupportedFile) as info:
            pydr.signature(fifo)
        assert isinstance(info.value, ValueError) and info.value.path == str(fifo)
    finally:
        os.close(fd)


def test_unreadable_file(tmp_path):
    """Permission denied: as root, drop the capabilities that bypass file
    modes (setpriv), so the mode-000 file is really unreadable."""
    import shutil
    import subprocess
    import sys

    p = tmp_path / "locked"
    p.write_bytes(b"x")
    p.chmod(0)
    code = ("import pydr, sys\n"
            "try: pydr.signature(sys.argv[1])\n"
            "except PermissionError as e: print('EACCES', e.filename)\n")
    cmd = [sys.executable, "-c", code, str(p)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.stdout.strip() == f"EACCES {p}", r.stderr


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "pread"])
@pytest.mark.parametrize("block_size", [4096, 65536])
def test_eio_names_the_failing_block(faulty_image, use_mmap, block_size):
    bad = 9_000_123
    path, _ = faulty_image(bad, bad + 10)
    with pytest.raises(OSError) as info:
        pydr.signature(path, block_size=block_size, threads=1, use_mmap=use_mmap)
    assert info.value.errno == errno.EIO
    assert info.value.filename == path
    # the block holding the bad byte (FUSE reads whole pages, so the failing
    # read may start up to one page earlier for blocks smaller than a page)
    expected = bad // block_size * block_size
    assert f"at offset {expected}" in str(info.value) or f"at offset {bad // 4096 * 4096}" in str(info.value)


def test_eio_with_threads_is_reported_once(faulty_image):
    path, _ = faulty_image(3 << 20, (3 << 20) + 1)
    with pytest.raises(OSError) as info:
        pydr.signature(path, block_size=4096, threads=4)
    assert info.value.errno == errno.EIO


def test_healthy_region_of_faulty_device_still_signs(faulty_image):
    """The guard only catches our own faults: a clean image through FUSE
    signs normally with mmap and gives the same result as pread."""
    path, data = faulty_image(1 << 40, (1 << 40) + 1)  # bad range beyond EOF
    a = pydr.signature(path, block_size=4096, use_mmap=True)
    b = pydr.signature(path, block_size=4096, use_mmap=False)
    assert a == b
    assert a.size == len(data)


def test_file_shrinking_while_signed(tmp_path):
    """Asking for more than the file holds: FileChanged with the offset."""
    p = tmp_path / "img"
    p.write_bytes(os.urandom(1 << 20))
    fd = os.open(p, os.O_RDONLY)
    try:
        n = 512
        hashes, mask = bytearray(n * 16), bytearray(n)
        for use_mmap in (True, False):
            with B.OutputBuffers(hashes, mask, 2) as out, \
                    B.Signer(4096, B.ALGORITHMS["xxh3-128"], use_mmap=use_mmap) as s:
                h, z = out.at(0)
                with pytest.raises(pydr.FileChanged) as info:
                    s.sign(fd, 0, n * 4096, h, z, n, None, str(p))
                assert info.value.offset == 1 << 20
                assert isinstance(info.value, RuntimeError)
    finally:
        os.close(fd)


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "pread"])
def test_file_truncated_during_signing(tmp_path, use_mmap):
    """A writer truncates the image while it is being signed: FileChanged
    naming the new end of file, never a crash (SIGBUS on the mmap path)."""
    p = tmp_path / "img"
    size = 1 << 30
    with open(p, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
    cut = []

    def on_progress(rec):
        if not cut and rec.done_bytes < size - (256 << 20):
            cut.append(rec.done_bytes + (64 << 20))
            os.truncate(p, cut[0])

    with pytest.raises(pydr.FileChanged) as info:
        pydr.signature(p, block_size=512, threads=1, progress=on_progress, use_mmap=use_mmap)
    assert cut, "the signing finished before the test could truncate the file"
    assert info.value.path == str(p)
    assert info.value.offset == cut[0]


def test_errors_keep_the_builtin_hierarchy():
    assert issubclass(pydr.FormatError, ValueError)
    assert issubclass(pydr.IncompatibleSignatures, ValueError)
    assert issubclass(pydr.UnsupportedFile, ValueError)
    assert issubclass(pydr.FileChanged, RuntimeError)
    for cls in (pydr.FormatError, pydr.Cancelled, pydr.FileChanged):
        assert issubclass(cls, pydr.PydrError)


def test_raise_for_code_maps_errno_and_own_codes():
    from pydr.engine.bindings import raise_for_code

    raise_for_code(0)
    with pytest.raises(FileNotFoundError):
        raise_for_code(-errno.ENOENT, path="/x")
    with pytest.raises(OSError) as info:
        raise_for_code(-errno.ENOSPC, path="/x", offset=4096)
    assert info.value.errno == errno.ENOSPC and "at offset 4096" in info.value.strerror
    with pytest.raises(pydr.Cancelled):
        raise_for_code(-1001)
    with pytest.raises(pydr.PydrError, match="unknown pydr error"):
        raise_for_code(-1999)


def test_cancel_from_another_thread_during_sparse_scan(tmp_path):
    ev = threading.Event()
    ev.set()
    p = tmp_path / "s"
    p.write_bytes(b"x" * 10)
    with pytest.raises(pydr.Cancelled):
        pydr.signature(p, cancel=ev)

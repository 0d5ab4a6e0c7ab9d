"""Devices: as_device() turns "a path or an open device" into a device, and
every undo journal's path comes from pydr.engine.names."""

import os

import pytest

import pydr
from pydr.engine import contentid, names
from pydr.engine import journal as J
from pydr.engine.devices import FileDevice, NbdDevice, as_device, using_device


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(300_000))
    return path


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_a_path_is_opened_and_a_device_is_kept(disk):
    dev = as_device(disk)
    try:
        assert isinstance(dev, FileDevice) and dev.name == str(disk) and dev.size == 300_000
        assert as_device(dev) is dev
    finally:
        dev.close()


def test_using_device_closes_only_what_it_opened(disk):
    with using_device(disk) as opened:
        fd = opened.fd
        assert is_open(fd)
    assert opened.fd is None and not is_open(fd)
    with FileDevice(disk) as given:
        with using_device(given) as dev:
            assert dev is given
        assert given.fd is not None and is_open(given.fd)


def test_what_is_not_a_disk_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(pydr.UnsupportedFile) as exc:
        as_device(fifo)
    assert exc.value.path == str(fifo)
    with pytest.raises(IsADirectoryError):
        as_device(tmp_path)
    with pytest.raises(FileNotFoundError):
        as_device(tmp_path / "missing")


def test_a_device_is_signed_as_its_path(disk):
    with FileDevice(disk) as dev:
        assert pydr.signature(dev, block_size=4096) == pydr.signature(disk, block_size=4096)
        assert is_open(dev.fd)  # a device given is left open


def test_an_images_identity_read_from_its_device_is_its_signatures(disk):
    sig = pydr.signature(disk, block_size=4096, algorithm="xxh3-128")
    with FileDevice(disk) as dev:
        assert contentid.identity_of(dev, sig.size, 4096) == contentid.identity(sig)
        other = contentid.identity_of(dev, sig.size - 1, 4096)
    assert other != contentid.identity(sig)


def test_a_journal_is_beside_its_disk(disk, monkeypatch):
    monkeypatch.delenv("PYDR_JOURNAL_DIR", raising=False)
    want = os.path.join(os.path.dirname(disk), ".disk.img.pydr-undo")
    with FileDevice(disk) as dev:
        assert dev.journal_path == J.journal_path(disk) == names.journal(disk) == want


def test_a_journal_dir_holds_every_journal_named_after_the_real_path(disk, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("PYDR_JOURNAL_DIR", str(tmp_path / "journals"))
    link = tmp_path / "link.img"
    os.symlink(disk, link)
    real = os.path.realpath(disk)
    want = os.path.join(tmp_path / "journals", real.strip("/").replace("/", "_") + ".pydr-undo")
    with FileDevice(link) as dev:
        assert dev.journal_path == J.journal_path(link) == want


def test_an_nbd_exports_journal_is_in_the_journal_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PYDR_JOURNAL_DIR", str(tmp_path))
    name = "nbd+unix:///disk 1?socket=/run/q.sock"
    want = os.path.join(tmp_path, "nbd_unix_disk_1_socket_run_q.sock.pydr-undo")
    assert NbdDevice.journal_for(name) == names.export_journal(name) == want
    monkeypatch.delenv("PYDR_JOURNAL_DIR")
    assert names.export_journal(name) == os.path.join(names.JOURNAL_DIR, os.path.basename(want))

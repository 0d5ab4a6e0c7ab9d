"""Block devices (loop devices): resync onto one (zero ranges via BLKZEROOUT),
apply a delta, and refuse a size change before any write."""

import os
import shutil
import subprocess

import pytest

import pydr

from conftest import run_cli


@pytest.fixture
def loopdev(tmp_path, monkeypatch):
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    monkeypatch.setenv("PYDR_JOURNAL_DIR", str(tmp_path / "journals"))
    devices = []

    def make(content):
        backing = tmp_path / f"dev{len(devices)}.img"
        backing.write_bytes(content)
        r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"no loop device here: {r.stderr.strip()}")
        devices.append(r.stdout.strip())
        return r.stdout.strip(), backing

    yield make
    for dev in devices:
        subprocess.run(["losetup", "-d", dev])


def test_resync_onto_a_block_device(loopdev, tmp_path):
    size = 4 << 20
    dev, backing = loopdev(os.urandom(size))
    src = tmp_path / "src.img"
    content = bytearray(os.urandom(size))
    content[1 << 20:3 << 20] = bytes(2 << 20)  # becomes BLKZEROOUT
    src.write_bytes(bytes(content))
    stats = pydr.resync(src, dev)
    assert stats.bytes_zeroed == 2 << 20
    with open(dev, "rb") as f:
        assert f.read() == bytes(content)
    assert os.listdir(tmp_path / "journals") == []


def test_apply_to_a_block_device(loopdev, tmp_path):
    old = os.urandom(2 << 20)
    new = bytearray(old)
    new[12345:22345] = os.urandom(10_000)
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(bytes(new))
    pydr.make_delta(tmp_path / "new.img", tmp_path / "d", target=tmp_path / "old.img")
    dev, _ = loopdev(old)
    pydr.apply_delta(tmp_path / "d", dev)
    with open(dev, "rb") as f:
        assert f.read() == bytes(new)


def test_size_change_on_a_block_device_is_refused(loopdev, tmp_path):
    old = os.urandom(1 << 20)
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(old + b"grown")
    pydr.make_delta(tmp_path / "new.img", tmp_path / "d", target=tmp_path / "old.img")
    dev, backing = loopdev(old)
    r = run_cli("apply", tmp_path / "d", dev, env=dict(os.environ))
    assert r.returncode == 10, r.stderr
    assert b"cannot be resized" in r.stderr and dev.encode() in r.stderr
    with open(dev, "rb") as f:
        assert f.read() == old
    journals = tmp_path / "journals"
    assert not journals.exists() or os.listdir(journals) == []

"""Real ext4 images: made with mkfs.ext4 -d, changed with debugfs -w, resynced
(and delta-applied), then cmp-equal and e2fsck -fn clean."""

import shutil
import subprocess

import pytest

import pydr

from conftest import run_cli
from disks import change, debugfs, fsck_clean, mkfs  # noqa: F401

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mkfs.ext4", "debugfs", "e2fsck")),
    reason="e2fsprogs (mkfs.ext4, debugfs, e2fsck) is not installed")


def test_resync_ext4(tmp_path):
    img = mkfs(tmp_path, "disk")
    replica = tmp_path / "replica.img"
    subprocess.run(["cp", "--sparse=always", str(img), str(replica)], check=True)
    change(img, tmp_path)
    fsck_clean(img)
    r = run_cli("resync", img, replica, "--json", "--verify")
    assert r.returncode == 0, r.stderr
    assert subprocess.run(["cmp", str(img), str(replica)]).returncode == 0
    fsck_clean(replica)
    import json
    stats = json.loads(r.stdout)
    assert 0 < stats["bytes_written"] < 16 << 20  # the change, not the 64 MiB disk


def test_delta_apply_ext4_with_signature(tmp_path):
    img = mkfs(tmp_path, "disk2")
    replica = tmp_path / "replica.img"
    subprocess.run(["cp", "--sparse=always", str(img), str(replica)], check=True)
    assert run_cli("signature", replica, "-o", tmp_path / "r.sig", "--block-size", "4K").returncode == 0
    change(img, tmp_path)
    r = run_cli("delta", img, "--against", tmp_path / "r.sig", "-o", tmp_path / "d.delta")
    assert r.returncode == 0, r.stderr
    r = run_cli("apply", tmp_path / "d.delta", replica, "--verify")
    assert r.returncode == 0, r.stderr
    assert subprocess.run(["cmp", str(img), str(replica)]).returncode == 0
    fsck_clean(replica)


def test_grown_filesystem(tmp_path):
    img = mkfs(tmp_path, "disk3", size="48M")
    replica = tmp_path / "replica.img"
    subprocess.run(["cp", "--sparse=always", str(img), str(replica)], check=True)
    subprocess.run(["truncate", "-s", "80M", str(img)], check=True)
    subprocess.run(["resize2fs", "-f", str(img)], check=True, capture_output=True)
    change(img, tmp_path)
    pydr.resync(img, replica)
    assert subprocess.run(["cmp", str(img), str(replica)]).returncode == 0
    fsck_clean(replica)

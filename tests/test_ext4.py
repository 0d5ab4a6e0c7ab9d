"""Real ext4 images: made with mkfs.ext4 -d, changed with debugfs -w, resynced
(and delta-applied), then cmp-equal and e2fsck -fn clean."""

import os
import random
import shutil
import subprocess

import pytest

import pydr

from conftest import run_cli

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mkfs.ext4", "debugfs", "e2fsck")),
    reason="e2fsprogs (mkfs.ext4, debugfs, e2fsck) is not installed")


def mkfs(tmp_path, name, size="64M"):
    tree = tmp_path / f"{name}-tree"
    rng = random.Random(name)
    (tree / "etc").mkdir(parents=True)
    (tree / "var/log").mkdir(parents=True)
    for i in range(40):
        (tree / "etc" / f"conf{i}.txt").write_text(f"setting{i} = {rng.random()}\n" * rng.randrange(1, 200))
    (tree / "var/log/big.bin").write_bytes(rng.randbytes(5 << 20))
    img = tmp_path / f"{name}.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(img), size],
                   check=True, capture_output=True)
    return img


def debugfs(img, *commands, tmp_path):
    script = tmp_path / "debugfs.cmds"
    script.write_text("\n".join(commands) + "\n")
    subprocess.run(["debugfs", "-w", "-f", str(script), str(img)], check=True, capture_output=True)


def fsck_clean(img):
    r = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def change(img, tmp_path, tag=0):
    """Write, remove and create files with debugfs. Each `tag` uses its own
    names: debugfs damages a file system when told to mkdir an existing
    directory, so a disk changed twice needs a new tag."""
    local = tmp_path / "payload.bin"
    local.write_bytes(os.urandom(3 << 20))
    commands = [f"write {local} /var/log/new{tag}.bin", f"rm /etc/conf{3 + tag}.txt",
                f"mkdir /srv{tag}", f"write {local} /srv{tag}/copy.bin"]
    if tag == 0:
        commands.append("rm /var/log/big.bin")
    debugfs(img, *commands, tmp_path=tmp_path)


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

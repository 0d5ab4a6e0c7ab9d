"""Real ext4 disk images for the tests: made with mkfs.ext4 -d, changed with
debugfs -w, checked with e2fsck -fn."""

import os
import random
import subprocess


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

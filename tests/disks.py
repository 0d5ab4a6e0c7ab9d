"""Real ext4 disk images for the tests: made with mkfs.ext4 -d, changed with
debugfs -w, checked with e2fsck -fn; and the page cache dropped for files
whose next reads must hit the disk (evict)."""

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


def cycled_item(tmp_path, cli, sha, *, seed, written):
    """Item 'vm' of the vault PYDR_VAULT names (made at tmp_path/vault):
    two 1 MiB random disks a.img and c.img replicated to tmp_path/site-b,
    3 cycles, `written(n)` random bytes changed in disk n before cycles 2
    and 3. Returns ([(source, replica)], {point: [sha of each source]})."""
    import json

    rng = random.Random(seed)
    (tmp_path / "site-b").mkdir()
    pairs = []
    for name in ("a", "c"):
        src = tmp_path / f"{name}.img"
        src.write_bytes(rng.randbytes(1 << 20))
        pairs.append((src, tmp_path / "site-b" / f"{name}.img"))
    assert cli("vault", "init", tmp_path / "vault").returncode == 0
    args = ["protect", "vm"]
    for s, r in pairs:
        args += ["--disk", f"{s}={r}"]
    assert cli(*args).returncode == 0
    history = {}
    for cycle in range(3):
        for n, (src, _) in enumerate(pairs):
            if cycle:
                with open(src, "r+b") as f:
                    f.seek(rng.randrange(0, (1 << 20) - 60_000))
                    f.write(rng.randbytes(written(n)))
        r = cli("replicate", "vm", "--json")
        assert r.returncode == 0, r.stderr
        history[json.loads(r.stdout)["point_id"]] = [sha(s) for s, _ in pairs]
    assert sorted(history) == [1, 2, 3]
    return pairs, history


def scribble(path, seed, blocks=6):
    """Rewrite `blocks` random 4 KiB blocks of a disk, as its machine would."""
    rng = random.Random(seed)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for _ in range(blocks):
            f.seek(rng.randrange(0, size, 4096))
            f.write(rng.randbytes(4096))


def evict(*paths):
    """Drop the files from the page cache: every later read is from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

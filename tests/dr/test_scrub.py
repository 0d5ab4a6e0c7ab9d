"""Bit rot in a replica (a block changed below the file system: size and
mtime as they were) is found by `pydr verify`, which reads each replica back
and compares it with its signature cache: exit 7 naming the replica and the
offset, every point marked damaged, the item resync-required; `pydr
replicate --resync` is the way out. Contents are checked against hashlib
(SHA-256) as the oracle."""

import json
import os
import random

import pytest

from conftest import run_cli, sha
from disks import cycled_item
from pydr.dr import scrub
from pydr.engine.sigcache_any import load_any


@pytest.fixture
def item(tmp_path, monkeypatch):
    """Item 'vm', two 1 MiB disks, 3 cycles. Returns (tmp_path, [(source,
    replica)])."""
    monkeypatch.setenv("PYDR_VAULT", str(tmp_path / "vault"))
    pairs, history = cycled_item(tmp_path, cli, sha, seed=11, written=lambda n: 50_000)
    return tmp_path, pairs


def cli(*args):
    return run_cli(*args, env=dict(os.environ))


def cache(tmp_path, idx):
    return tmp_path / "vault" / "cache" / "vm" / f"{idx}.sig"


def rot(path, offset):
    """Flip a bit of `path` and put its mtime back, as rot below the file
    system leaves it (only the ctime tells, which a device does not keep)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x04]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def block_of(tmp_path, idx, offset):
    with load_any(cache(tmp_path, idx)) as reader:
        return offset - offset % reader.block_size


def test_scrub_file_finds_the_rotten_block(item):
    tmp_path, pairs = item
    replica = pairs[1][1]
    found, read = scrub.scrub_file(replica, cache(tmp_path, 1))
    assert found is None and read == 1 << 20
    rot(replica, 700_001)
    found, read = scrub.scrub_file(replica, cache(tmp_path, 1), threads=2)
    assert found is not None and read == 1 << 20
    assert found.startswith("1 block of") and f"offset {block_of(tmp_path, 1, 700_001)}" in found


class Pick:
    """A stand-in for random: picks the windows asked for."""

    def __init__(self, *chosen):
        self.chosen = list(chosen)

    def sample(self, population, k):
        assert k == len(self.chosen)
        return [population[i] for i in self.chosen]


def test_a_sample_reads_only_the_windows_it_picks(item, monkeypatch):
    tmp_path, pairs = item
    replica = pairs[0][1]
    monkeypatch.setattr(scrub, "SAMPLE_WINDOW_BYTES", 128 << 10)  # 8 windows of the 1 MiB disk
    rot(replica, 5 * (128 << 10) + 3)  # in window 5
    found, read = scrub.scrub_file(replica, cache(tmp_path, 0), sample=25, rng=Pick(1, 2))
    assert found is None and read == 2 * (128 << 10)
    found, read = scrub.scrub_file(replica, cache(tmp_path, 0), sample=25, rng=Pick(0, 5))
    assert "offset 655360" in found and read == 2 * (128 << 10)


def test_verify_finds_rot_in_a_replica_and_resync_repairs_it(item):
    tmp_path, pairs = item
    r = cli("verify", "vm", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["replicas_scrubbed"] == 2
    replica = pairs[0][1]
    rot(replica, 300_000)
    # what nothing else notices: a cycle trusts the cache and writes nothing
    r = cli("verify", "vm", "--json")
    assert r.returncode == 7, r.stderr
    report = json.loads(r.stdout)
    # the replica's ctime moved too (rot() writes through the file): the identity
    # check names the write, and the scrub names where the bytes differ
    problem = next(p for p in report["problems"] if str(replica) in p and "differ" in p)
    assert f"offset {block_of(tmp_path, 0, 300_000)}" in problem
    assert report["damaged_points"] == [1, 2, 3]
    r = cli("verify", "vm")
    assert r.returncode == 7 and str(replica).encode() in r.stderr, r.stderr
    status = json.loads(cli("status", "vm", "--json").stdout)
    state = status[0]["state"] if isinstance(status, list) else status["state"]
    assert state == "resync-required"
    r = cli("replicate", "vm")
    assert r.returncode != 0  # refused until --resync
    r = cli("replicate", "vm", "--resync")
    assert r.returncode == 0, r.stderr
    assert sha(replica) == sha(pairs[0][0]) and sha(pairs[1][1]) == sha(pairs[1][0])
    report = json.loads(cli("verify", "vm", "--point", "4", "--json").stdout)
    assert not any(str(replica) in p and "signature cache says" in p for p in report["problems"])


def test_a_bad_record_header_in_a_killed_cycles_journal(item):
    """The reviewer's f5b (the journal side of trusting a replica): a cycle
    killed once its batch reached the replica, one bit flipped in the first
    record header of the replica's journal. The next cycle must not take the
    journal for a torn one (cut it and carry on, losing the old contents the
    points need): exit 7 naming the journal, which is kept, the replica
    left as it is."""
    tmp_path, pairs = item
    for src, _ in pairs:
        with open(src, "r+b") as f:
            for off in (10_000, 400_000, 900_000):
                f.seek(off)
                f.write(random.Random(off).randbytes(20_000))
    r = run_cli("replicate", "vm", env={**os.environ, "PYDR_CRASH_AT": "apply.synced"})
    assert r.returncode == -9, r.stderr
    replica = pairs[0][1]
    journal = replica.parent / f".{replica.name}.pydr-undo"
    with open(journal, "r+b") as f:
        f.seek(110)
        byte = f.read(1)
        f.seek(110)
        f.write(bytes([byte[0] ^ 0x10]))
    before = sha(replica)
    for _ in range(2):  # and again: the same answer
        r = cli("replicate", "vm")
        err = r.stderr.decode()
        assert r.returncode == 7, err
        assert str(journal) in err and "offset 96" in err, err
        assert journal.exists() and sha(replica) == before


def test_rot_in_a_remote_replica(sshd, tmp_path, monkeypatch):
    """A replica on another host is signed there (the SIGN request) and
    compared here with a cache. (A vault keeps no cache of a remote replica
    today -- its cycles compare both sides -- so verify scrubs none:
    replicas_scrubbed 0, never a claim that it was read.)"""
    from conftest import PYDR
    from pydr.endpoints import open_endpoint
    from pydr.engine.signatures import signature

    monkeypatch.setenv("PYDR_VAULT", str(tmp_path / "vault"))
    site_b = tmp_path / "site-b"
    site_b.mkdir()
    disk = tmp_path / "os.img"
    rng = random.Random(5)
    disk.write_bytes(rng.randbytes(2 << 20))
    assert cli("vault", "init", tmp_path / "vault").returncode == 0
    r = cli("protect", "vm", "--disk", f"{disk}=127.0.0.1:{site_b / 'os.img'}",
            "--rsh", sshd["rsh"], "--remote-pydr", PYDR)
    assert r.returncode == 0, r.stderr
    assert cli("replicate", "vm").returncode == 0
    r = cli("verify", "vm", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["replicas_scrubbed"] == 0
    sig = tmp_path / "os.sig"
    signature(site_b / "os.img", block_size=64 << 10).save(sig)
    remote = open_endpoint(f"127.0.0.1:{site_b / 'os.img'}", rsh=sshd["rsh"], remote_pydr=PYDR)
    assert scrub.scrub_remote(remote, sig) == (None, 2 << 20)
    rot(site_b / "os.img", 1_500_000)
    found, _ = scrub.scrub_remote(remote, sig)
    block = 1_500_000 - 1_500_000 % (64 << 10)
    assert found.startswith("1 block of") and f"offset {block}" in found


def test_rot_in_the_baseline_of_a_failed_over_item(item):
    """Failed over, the replica path holds the point brought up (which the
    machine may write); the steps roll back from the baseline beside it,
    which is what the cache describes and what is scrubbed."""
    from pydr.engine import names

    tmp_path, pairs = item
    assert cli("failover", "vm", "--point", "2").returncode == 0
    replica = pairs[0][1]
    base = names.beside(str(replica), names.BASE)
    assert os.path.exists(base)
    with open(replica, "r+b") as f:  # the failed-over machine writes: not rot
        f.write(b"booted")
    r = cli("verify", "vm", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["replicas_scrubbed"] == 2
    rot(base, 12_345)
    r = cli("verify", "vm", "--json")
    assert r.returncode == 7, r.stderr
    assert any(base in p and f"offset {block_of(tmp_path, 0, 12_345)}" in p
               for p in json.loads(r.stdout)["problems"])


def test_no_scrub_while_a_cycle_may_write_the_replicas(item):
    """A replica read while a cycle writes it would look rotten: with the
    vault locked by another process, verify refuses (exit 14, the vault's
    error) and marks nothing; run again once it ends."""
    import fcntl

    tmp_path, pairs = item
    with open(tmp_path / "vault" / "vault.lock", "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = cli("verify", "vm", "--json")
    assert r.returncode == 14 and b"run 'pydr verify' again" in r.stderr, r.stderr
    assert all(p is None for p in json_points())
    r = cli("verify", "vm", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["replicas_scrubbed"] == 2, r.stderr


def json_points():
    r = cli("points", "vm", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 3
    return [row["damaged"] for row in rows]


@pytest.mark.skipif(os.geteuid() != 0 or not all(
    __import__("shutil").which(t) for t in ("mkfs.ext4", "debugfs", "mount", "umount")),
    reason="needs root, e2fsprogs and loop mounts")
def test_rot_below_a_file_system_keeps_the_replicas_identity(tmp_path, monkeypatch):
    """The reviewer's f3b: the replica lives on a loop-mounted ext4; a bit
    is flipped in the image beneath it while unmounted, so its size, mtime
    and ctime all stay as they were (no identity check can see it). verify
    finds it by reading the replica: exit 7 naming the offset."""
    import subprocess

    monkeypatch.setenv("PYDR_VAULT", str(tmp_path / "vault"))
    fs, mnt = tmp_path / "fs.img", tmp_path / "site-b"
    mnt.mkdir()
    with open(fs, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(fs)], check=True)
    subprocess.run(["mount", "-o", "loop", str(fs), str(mnt)], check=True)
    try:
        src = tmp_path / "a.img"
        src.write_bytes(random.Random(3).randbytes(4 << 20))
        assert cli("vault", "init", tmp_path / "vault").returncode == 0
        assert cli("protect", "vm", "--disk", f"{src}={mnt / 'a.img'}").returncode == 0
        assert cli("replicate", "vm").returncode == 0
        os.sync()
        before = os.stat(mnt / "a.img")
        bmap = subprocess.run(["debugfs", "-R", "bmap /a.img 500", str(fs)], check=True,
                              capture_output=True, text=True).stdout.split()
        physical = int(bmap[-1])
        subprocess.run(["umount", str(mnt)], check=True)
        with open(fs, "r+b") as f:
            f.seek(physical * 4096 + 123)
            byte = f.read(1)
            f.seek(physical * 4096 + 123)
            f.write(bytes([byte[0] ^ 0x04]))
        subprocess.run(["mount", "-o", "loop", str(fs), str(mnt)], check=True)
        after = os.stat(mnt / "a.img")
        assert (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino) == (
            before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_ino)
        assert sha(mnt / "a.img") != sha(src)
        r = cli("verify", "vm", "--json")
        assert r.returncode == 7, r.stderr
        report = json.loads(r.stdout)
        assert any(f"offset {500 * 4096 - 500 * 4096 % block_size(tmp_path)}" in p
                   for p in report["problems"]), report
        assert report["damaged_points"] == [1]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def block_size(tmp_path):
    with load_any(cache(tmp_path, 0)) as reader:
        return reader.block_size


def test_a_killed_cycles_journal_cut_at_a_record_boundary(item):
    """A lost write exactly at a record boundary of a replica's journal: the
    next cycle resumes it, and the disk's signature cache (the replica
    before the killed cycle) shows blocks changed that no record covers:
    exit 7 naming the journal, which is kept."""
    from pydr.engine import journal as J

    tmp_path, pairs = item
    for src, _ in pairs:
        with open(src, "r+b") as f:
            for off in (10_000, 400_000, 900_000):
                f.seek(off)
                f.write(random.Random(off + 1).randbytes(20_000))
    r = run_cli("replicate", "vm", env={**os.environ, "PYDR_CRASH_AT": "apply.synced"})
    assert r.returncode == -9, r.stderr
    replica = pairs[0][1]
    journal = replica.parent / f".{replica.name}.pydr-undo"
    records = J.scan(journal).records
    assert len(records) >= 2
    os.truncate(journal, records[-1][0])
    r = cli("replicate", "vm")
    err = r.stderr.decode()
    assert r.returncode == 7, err
    assert str(journal) in err and "records were lost" in err, err
    assert journal.exists()


def test_a_damaged_cache_is_one_problem_and_no_blame_on_the_replica(item):
    """A damaged signature cache is reported once (as the cache's problem);
    the scrub of its replica is said to be skipped for that reason, the
    replica is neither blamed nor its points marked damaged."""
    tmp_path, pairs = item
    path = cache(tmp_path, 0)
    with load_any(path) as reader:
        slot = reader._read_entry(0)[0]
    with open(path, "r+b") as f:  # a byte of segment 0's hashes
        f.seek(slot + 600)
        byte = f.read(1)
        f.seek(slot + 600)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = cli("verify", "vm", "--json")
    assert r.returncode == 7, r.stderr
    report = json.loads(r.stdout)
    assert len(report["problems"]) == 1, report["problems"]
    assert "signature cache" in report["problems"][0] and str(path) in report["problems"][0]
    assert not any(str(pairs[0][1]) in p for p in report["problems"])
    assert report["replicas_scrubbed"] == 1 and report["damaged_points"] == []
    assert len(report["scrub_skipped"]) == 1 and "damaged" in report["scrub_skipped"][0]
    r = cli("verify", "vm")
    assert b"scrub of" in r.stdout and b"skipped" in r.stdout, r.stdout

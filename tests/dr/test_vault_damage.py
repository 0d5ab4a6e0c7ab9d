"""Damage is never exit 1, and a full disk is not damage.

* a vault.db whose points table page is overwritten: every command that
  reads it exits 14, naming the database and 'pydr vault check';
* ``pydr vault check`` names each problem: SQLite's integrity_check, a
  missing, a truncated or an unknown step file (exit 14), none (exit 0);
* a vault on a full file system: exit 6 naming vault.db, not "damaged";
* a resync onto a full file system names the file it could not write."""

import json
import os
import random
import shutil
import sqlite3
import subprocess

import pytest

from conftest import run_cli


def _vault(tmp_path, cycles=3):
    """A vault with item vm (one 4 MiB disk) and `cycles` points."""
    disk = tmp_path / "vm.img"
    rng = random.Random(7)
    disk.write_bytes(rng.randbytes(4 << 20))
    vault = tmp_path / "vault"
    assert run_cli("vault", "init", vault).returncode == 0
    r = run_cli("protect", "vm", "--vault", vault, "--disk", f"{disk}={tmp_path / 'replica.img'}")
    assert r.returncode == 0, r.stderr
    for cycle in range(cycles):
        with open(disk, "r+b") as f:
            for _ in range(5):
                f.seek(rng.randrange(0, 4 << 20, 4096))
                f.write(rng.randbytes(4096))
        r = run_cli("replicate", "vm", "--vault", vault)
        assert r.returncode == 0, r.stderr
    return vault


def _page_of(vault, name):
    """(offset, size) of the root page of table or index `name`, once the
    WAL is checkpointed into vault.db."""
    db = sqlite3.connect(vault / "vault.db")
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (name,)).fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()
    return (root - 1) * size, size


def _check(vault):
    r = run_cli("vault", "check", vault, "--json")
    return r.returncode, json.loads(r.stdout)


def test_a_damaged_points_page_is_exit_14_with_the_path_and_the_hint(tmp_path):
    vault = _vault(tmp_path)
    offset, size = _page_of(vault, "points")
    with open(vault / "vault.db", "r+b") as f:
        f.seek(offset)
        f.write(b"\xa5" * size)
    db_path = str(vault / "vault.db").encode()
    for argv in (["status"], ["points", "vm"], ["status", "vm", "--json"], ["replicate", "vm"]):
        r = run_cli(*argv, "--vault", vault)
        assert r.returncode == 14, (argv, r.returncode, r.stderr)
        assert db_path in r.stderr and b"malformed" in r.stderr, (argv, r.stderr)
        assert f"run 'pydr vault check {vault}'".encode() in r.stderr, (argv, r.stderr)
        assert b"internal error" not in r.stderr and b"Traceback" not in r.stderr
    code, report = _check(vault)
    assert code == 14 and not report["ok"]
    assert [p["kind"] for p in report["problems"]] == ["database"], report
    assert report["problems"][0]["where"] == str(vault / "vault.db")


def test_vault_check_clean(tmp_path):
    vault = _vault(tmp_path)
    code, report = _check(vault)
    assert code == 0 and report["ok"] and report["problems"] == [], report
    assert report["steps_checked"] == 2  # the initial copy keeps no step
    r = run_cli("vault", "check", "--vault", vault)
    assert r.returncode == 0 and b": ok (2 steps checked)" in r.stdout, r.stdout


def test_vault_check_names_each_problem(tmp_path):
    vault = _vault(tmp_path, cycles=4)
    steps = vault / "undo" / "vm"
    assert sorted(os.listdir(steps)) == ["0-1.undo", "0-2.undo", "0-3.undo"]
    shutil.copy(steps / "0-1.undo", steps / "0-9.undo")  # unknown to the vault
    os.unlink(steps / "0-1.undo")                        # missing
    with open(steps / "0-2.undo", "r+b") as f:           # cut short
        f.truncate(os.path.getsize(steps / "0-2.undo") - 100)
    code, report = _check(vault)
    assert code == 14 and not report["ok"]
    found = sorted((p["kind"], os.path.basename(p["where"])) for p in report["problems"])
    assert found == [("missing-step", "0-1.undo"), ("step-size", "0-2.undo"),
                     ("unknown-file", "0-9.undo")], report
    r = run_cli("vault", "check", vault)
    assert r.returncode == 14
    for name in ("0-1.undo", "0-2.undo", "0-9.undo"):
        assert str(steps / name).encode() in r.stdout, r.stdout
    assert b"3 problems" in r.stderr, r.stderr


def test_vault_check_finds_a_step_cut_at_a_record_boundary(tmp_path):
    """A step that lost only its COMMIT record: its size still fits one way
    of recording it; its records do not end as a step's must."""
    vault = _vault(tmp_path)
    step = vault / "undo" / "vm" / "0-2.undo"
    db = sqlite3.connect(vault / "vault.db")
    recorded = db.execute("SELECT bytes FROM steps WHERE step=2").fetchone()[0]
    db.close()
    os.truncate(step, recorded)  # the journal without its COMMIT
    code, report = _check(vault)
    assert code == 14, report
    assert [(p["kind"], p["where"]) for p in report["problems"]] == [("step-size", str(step))]
    assert "cut short" in report["problems"][0]["message"]


def test_vault_check_reports_integrity_check(tmp_path):
    """An index that no longer matches its table (keys rewritten in the
    index page): integrity_check's own lines, exit 14."""
    vault = _vault(tmp_path)
    offset, size = _page_of(vault, "sqlite_autoindex_points_1")
    with open(vault / "vault.db", "r+b") as f:
        f.seek(offset)
        page = f.read(size)
        assert page.count(b"vm") == 3
        f.seek(offset)
        f.write(page.replace(b"vm", b"vn"))
    code, report = _check(vault)
    assert code == 14
    assert report["problems"] and all(p["kind"] == "database" for p in report["problems"])
    assert any("missing from index sqlite_autoindex_points_1" in p["message"]
               for p in report["problems"]), report


@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MiB tmpfs (the tests run as root), unmounted afterwards."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the tests run as root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def _fill(directory):
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == 28


def test_a_vault_on_a_full_disk_is_exit_6_naming_it(tmp_path, tiny_fs):
    vault = tiny_fs / "vault"
    assert run_cli("vault", "init", vault).returncode == 0
    disk = tmp_path / "a.img"
    disk.write_bytes(random.Random(1).randbytes(1 << 20))
    other = tmp_path / "b.img"
    other.write_bytes(disk.read_bytes())
    assert run_cli("protect", "a", "--vault", vault,
                   "--disk", f"{disk}={tmp_path / 'ra.img'}").returncode == 0
    _fill(tiny_fs)
    db_path = str(vault / "vault.db").encode()
    # nothing holds the database open: opening it cannot make its -shm file
    for argv in (["protect", "b", "--disk", f"{other}={tmp_path / 'rb.img'}"], ["status"]):
        r = run_cli(*argv, "--vault", vault)
        assert r.returncode == 6, (argv, r.stderr)
        assert db_path in r.stderr and b"no space left" in r.stderr, r.stderr
        assert b"damaged" not in r.stderr
    # another reader holds it open (its -wal and -shm are there): the write
    # itself finds the disk full
    os.unlink(tiny_fs / "filler")
    reader = sqlite3.connect(vault / "vault.db")
    try:
        reader.execute("SELECT COUNT(*) FROM items").fetchone()
        _fill(tiny_fs)
        r = run_cli("protect", "b", "--vault", vault, "--disk", f"{other}={tmp_path / 'rb.img'}")
        assert r.returncode == 6, r.stderr
        assert db_path in r.stderr and b"damaged" not in r.stderr, r.stderr
    finally:
        reader.close()
    os.unlink(tiny_fs / "filler")
    r = run_cli("status", "--vault", vault, "--json")
    assert r.returncode == 0 and [s["item"] for s in json.loads(r.stdout)] == ["a"], r.stderr


def test_a_full_target_disk_in_resync_names_the_path(tmp_path, tiny_fs):
    src = tmp_path / "src.img"
    src.write_bytes(random.Random(2).randbytes(3 << 20))
    # the target grows past the room there
    r = run_cli("resync", src, tiny_fs / "t.img")
    assert r.returncode == 6, r.stderr
    assert str(tiny_fs / "t.img").encode() in r.stderr, r.stderr
    # no room even for the undo journal's header
    (tiny_fs / "t.img").unlink(missing_ok=True)
    (tiny_fs / "t.img").write_bytes(b"\1" * (64 << 10))
    _fill(tiny_fs)
    r = run_cli("resync", src, tiny_fs / "t.img")
    assert r.returncode == 6, r.stderr
    assert str(tiny_fs / ".t.img.pydr-undo").encode() in r.stderr, r.stderr
    assert (tiny_fs / "t.img").read_bytes() == b"\1" * (64 << 10)


def test_vault_check_cross_checks_the_rows(tmp_path):
    """A steps row lost (its file stays), point_disks rows of a point that
    is not there, a disk numbered past a gap: each is named."""
    vault = _vault(tmp_path, cycles=4)  # points 1-4 at steps 0-3 of disk 0
    db = sqlite3.connect(vault / "vault.db")
    with db:
        db.execute("DELETE FROM steps WHERE item='vm' AND idx=0 AND step=2")
        db.execute("INSERT INTO point_disks VALUES (99, 'vm', 0, 1)")
        db.execute("INSERT INTO disks(item, idx, source, replica) VALUES ('vm', 2, 'a', 'b')")
    db.close()
    code, report = _check(vault)
    assert code == 14
    found = sorted((p["kind"], p["where"]) for p in report["problems"])
    assert found == [
        ("point-chain", "item vm point 1 disk 0"),  # at step 0: rolled back through 3, 2, 1
        ("point-chain", "item vm point 1 disk 2"),  # no step recorded for the new disk
        ("point-chain", "item vm point 2 disk 0"),  # at step 1: through 3, 2
        ("point-chain", "item vm point 2 disk 2"),
        ("point-chain", "item vm point 3 disk 2"),
        ("point-chain", "item vm point 4 disk 2"),
        ("rows", "item vm"),                        # disks 0 and 2
        ("rows", "item vm point 99"),
        ("unknown-file", str(vault / "undo" / "vm" / "0-2.undo")),
    ], report
    assert "steps 2 it is rolled back through" in next(
        p["message"] for p in report["problems"] if p["where"] == "item vm point 1 disk 0")


def test_vault_check_while_another_pydr_changes_the_vault(tmp_path):
    """A command holding the vault's lock may be making step files it has
    not recorded yet: they are not called unknown, and the report says so."""
    import fcntl

    vault = _vault(tmp_path, cycles=2)
    (vault / "undo" / "vm" / "0-2.undo").write_bytes(b"being copied in")
    fd = os.open(vault / "vault.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, report = _check(vault)
        assert code == 0 and report["unknown_files_checked"] is False, report
    finally:
        os.close(fd)
    code, report = _check(vault)
    assert code == 14 and report["unknown_files_checked"] is True
    assert [p["kind"] for p in report["problems"]] == ["unknown-file"], report

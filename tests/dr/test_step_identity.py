"""A step must be the step it claims to be, and a point the state it names.

* ``pydr vault check`` finds point rows out of order: a disk's steps rise
  strictly with point id, and the newest point holds the disk's newest step;
* ``pydr vault check`` with a relative vault path finds no unknown files."""

import json
import random
import sqlite3
import subprocess

from conftest import pydr_command, run_cli


def _vault(tmp_path, cycles=4, disks=1):
    """A vault with item vm (`disks` 1 MiB disks) and `cycles` points;
    returns (vault, [disk paths])."""
    rng = random.Random(11)
    sources = []
    spec = []
    for i in range(disks):
        disk = tmp_path / f"vm{i}.img"
        disk.write_bytes(rng.randbytes(1 << 20))
        sources.append(disk)
        spec += ["--disk", f"{disk}={tmp_path / f'replica{i}.img'}"]
    vault = tmp_path / "vault"
    assert run_cli("vault", "init", vault).returncode == 0
    r = run_cli("protect", "vm", "--vault", vault, *spec)
    assert r.returncode == 0, r.stderr
    for _ in range(cycles):
        for disk in sources:
            with open(disk, "r+b") as f:
                for _ in range(3):
                    f.seek(rng.randrange(0, 1 << 20, 4096))
                    f.write(rng.randbytes(4096))
        r = run_cli("replicate", "vm", "--vault", vault)
        assert r.returncode == 0, r.stderr
    return vault, sources


def _check(vault):
    r = run_cli("vault", "check", vault, "--json")
    return r.returncode, json.loads(r.stdout)


def _sql(vault, statement, *args):
    db = sqlite3.connect(vault / "vault.db")
    with db:
        db.execute(statement, args)
    db.close()


def test_vault_check_finds_a_point_naming_a_later_step(tmp_path):
    """point 3's row says step 3 (one bit from 2): it would restore point 4."""
    vault, _ = _vault(tmp_path)  # points 1-4 at steps 0-3
    _sql(vault, "UPDATE point_disks SET step=3 WHERE item='vm' AND id=3 AND idx=0")
    code, report = _check(vault)
    assert code == 14, report
    assert [(p["kind"], p["where"]) for p in report["problems"]] == [
        ("point-chain", "item vm points 3 and 4 disk 0")], report


def test_vault_check_finds_the_newest_point_off_the_newest_step(tmp_path):
    vault, _ = _vault(tmp_path)
    _sql(vault, "UPDATE point_disks SET step=2 WHERE item='vm' AND id=4 AND idx=0")
    code, report = _check(vault)
    assert code == 14, report
    found = [(p["kind"], p["where"]) for p in report["problems"]]
    assert ("point-chain", "item vm point 4 disk 0") in found, report
    assert ("point-chain", "item vm points 3 and 4 disk 0") in found, report


def test_vault_check_with_a_relative_path(tmp_path):
    vault, _ = _vault(tmp_path, cycles=3)
    r = subprocess.run(pydr_command() + ["vault", "check", "vault", "--json"], cwd=tmp_path,
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["steps_checked"] == 2, report
    (vault / "undo" / "vm" / "0-7.undo").write_bytes(b"stray")  # still found
    r = subprocess.run(pydr_command() + ["vault", "check", "vault", "--json"], cwd=tmp_path,
                       capture_output=True, timeout=300)
    assert r.returncode == 14
    assert [p["kind"] for p in json.loads(r.stdout)["problems"]] == ["unknown-file"]

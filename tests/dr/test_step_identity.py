"""A step must be the step it claims to be, and a point the state it names.

* ``pydr vault check`` finds point rows out of order: a disk's steps rise
  strictly with point id, and the newest point holds the disk's newest step;
* ``pydr vault check`` with a relative vault path finds no unknown files;
* a keep note left by a cycle killed after its COMMIT names the step the
  rerun offers first (or the second only when the first is committed):
  one naming another is damage (exit 7, naming the note, nothing moved);
* a committed journal beside the replica that does not leave the replica's
  size is not adopted as the killed cycle's step (exit 7);
* a step swapped for another valid step of the same size (another disk's,
  or a symlink to one) is damage: verify, vault check, test-failover and
  materialize refuse it (exit 7 / 14), never restore another state;
* a step kept by a killed cycle and recorded by the next one gets its
  digest too."""

import json
import os
import random
import shutil
import sqlite3
import subprocess

import pytest

from conftest import pydr_command, run_cli
from pydr.errors import FormatError


def _vault(tmp_path, cycles=4, disks=1, sizes=(1 << 20, 1 << 20)):
    """A vault with item vm (`disks` disks of `sizes`) and `cycles` points;
    returns (vault, [disk paths])."""
    rng = random.Random(11)
    sources = []
    spec = []
    for i in range(disks):
        disk = tmp_path / f"vm{i}.img"
        disk.write_bytes(rng.randbytes(sizes[i]))
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
                    f.seek(rng.randrange(0, os.path.getsize(disk), 4096))
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


def _killed_after_commit(tmp_path, vault, sources):
    """Change the disks and run a cycle killed after its apply's COMMIT,
    before the journal is kept: (replica's journal, its keep note)."""
    for disk in sources:
        with open(disk, "r+b") as f:
            f.write(b"\x5a" * 8192)
    env = dict(os.environ, PYDR_CRASH_AT="apply.committed")
    r = run_cli("replicate", "vm", "--vault", vault, env=env)
    assert r.returncode != 0, r.stderr
    journal = tmp_path / ".replica0.img.pydr-undo"
    note = tmp_path / ".replica0.img.pydr-undo.keep"
    assert journal.exists() and note.exists()
    return journal, note


def _state(tmp_path, vault):
    """What a refused rerun must leave as it was."""
    names = sorted(os.listdir(tmp_path)) + sorted(os.listdir(vault / "undo" / "vm"))
    return names, (tmp_path / "replica0.img").read_bytes()


def test_a_keep_note_naming_the_second_step_is_damage(tmp_path):
    """One bit of the note ('0-4.undo' -> '0-5.undo'): the rerun would record
    an empty step 4 and adopt the journal as step 5."""
    vault, sources = _vault(tmp_path)  # points 1-4 at steps 0-3: the next is 4
    journal, note = _killed_after_commit(tmp_path, vault, sources)
    assert note.read_text() == str(vault / "undo" / "vm" / "0-4.undo")
    note.write_text(str(vault / "undo" / "vm" / "0-5.undo"))
    before, kept = _state(tmp_path, vault), journal.read_bytes()
    r = run_cli("replicate", "vm", "--vault", vault)
    assert r.returncode == 7, r.stderr
    assert str(note).encode() in r.stderr and b"0-5.undo" in r.stderr, r.stderr
    assert _state(tmp_path, vault) == before and journal.read_bytes() == kept
    # the way out the message gives: the note names the first step; the same command again
    note.write_text(str(vault / "undo" / "vm" / "0-4.undo"))
    r = run_cli("replicate", "vm", "--vault", vault)
    assert r.returncode == 0, r.stderr
    assert (vault / "undo" / "vm" / "0-4.undo").read_bytes() == kept
    code, report = _check(vault)
    assert code == 0, report


def test_a_keep_note_naming_a_step_not_offered_is_damage(tmp_path):
    vault, sources = _vault(tmp_path, cycles=3)
    journal, note = _killed_after_commit(tmp_path, vault, sources)
    note.write_text(str(vault / "undo" / "vm" / "0-1.undo"))  # an old step: never offered now
    before = _state(tmp_path, vault)
    r = run_cli("replicate", "vm", "--vault", vault)
    assert r.returncode == 15, r.stderr  # a place not offered: refused, not followed (as before)
    assert str(note).encode() in r.stderr
    assert _state(tmp_path, vault) == before


def test_the_second_step_is_honoured_after_a_kill_after_keep(tmp_path):
    """The legitimate case: the first offered step holds a committed step
    (kept, not recorded) and a later cycle's note names the second."""
    from pydr.engine import journal as J

    replicas, steps = tmp_path / "r", tmp_path / "steps"
    replicas.mkdir()
    steps.mkdir()
    target = replicas / "disk.img"
    target.write_bytes(bytes(4096))
    first, second = steps / "0-4.undo", steps / "0-5.undo"
    journal = J.journal_of(target)
    for dest in (first, second):
        j = J.Journal.create(journal, kind=J.KIND_RESYNC, block_size=4096, old_size=4096,
                             new_size=4096)
        j.commit()
        j.close()
        J.write_keep_note(target, second)
        if dest == first:
            with pytest.raises(FormatError, match="holds no committed step"):
                J.pending_journal(target, allowed=[str(first), str(second)])
            assert os.path.exists(journal) and not first.exists()
            os.rename(journal, first)  # as a cycle killed after keep leaves it
    assert J.pending_journal(target, allowed=[str(first), str(second)]) is None
    assert second.exists() and not os.path.exists(journal)


def test_a_journal_that_leaves_another_size_is_not_adopted(tmp_path):
    """The killed cycle's committed journal replaced by a valid step of a
    disk of another size."""
    vault, sources = _vault(tmp_path, cycles=3, disks=2, sizes=(1 << 20, 2 << 20))
    journal, note = _killed_after_commit(tmp_path, vault, sources)
    other = vault / "undo" / "vm" / "1-1.undo"
    journal.write_bytes(other.read_bytes())
    before = _state(tmp_path, vault)
    r = run_cli("replicate", "vm", "--vault", vault)
    assert r.returncode == 7, r.stderr
    assert str(journal).encode() in r.stderr and b"2097152" in r.stderr, r.stderr
    assert _state(tmp_path, vault) == before


def _digests(vault):
    db = sqlite3.connect(vault / "vault.db")
    try:
        return {(r[0], r[1]): r[2] for r in db.execute("SELECT idx, step, digest FROM steps")}
    finally:
        db.close()


def _refused_everywhere(tmp_path, vault, point):
    r = run_cli("verify", "vm", "--vault", vault)
    assert r.returncode == 7, r.stdout + r.stderr
    assert b"0-3.undo" in r.stdout + r.stderr
    code, report = _check(vault)
    assert code == 14 and report["problems"], report
    assert [os.path.basename(p["where"]) for p in report["problems"]] == ["0-3.undo"], report
    r = run_cli("materialize", "vm", "--vault", vault, "--point", point, "--to",
                tmp_path / "m")
    assert r.returncode == 7, r.stderr
    assert not (tmp_path / "m" / "replica0.img").exists()
    r = run_cli("test-failover", "vm", "--vault", vault, "--point", point, "--to",
                tmp_path / "drill")
    assert r.returncode == 7, r.stderr


def test_a_step_swapped_for_another_disks_step_is_damage(tmp_path):
    vault, _ = _vault(tmp_path, cycles=5, disks=2)  # points 1-5 at steps 0-4
    digests = _digests(vault)
    assert all(digests.values()) and len(digests) == 8, digests
    steps = vault / "undo" / "vm"
    assert os.path.getsize(steps / "1-3.undo") == os.path.getsize(steps / "0-3.undo")
    code, report = _check(vault)
    assert code == 0, report
    shutil.copy(steps / "1-3.undo", steps / "0-3.undo")  # valid, same size, another disk's
    _refused_everywhere(tmp_path, vault, 3)


def test_a_step_swapped_for_a_symlink_is_damage(tmp_path):
    vault, _ = _vault(tmp_path, cycles=5, disks=2)
    steps = vault / "undo" / "vm"
    os.unlink(steps / "0-3.undo")
    os.symlink(steps / "1-3.undo", steps / "0-3.undo")
    _refused_everywhere(tmp_path, vault, 3)


def test_a_step_recorded_after_a_kill_gets_its_digest(tmp_path):
    vault, sources = _vault(tmp_path, cycles=3)
    with open(sources[0], "r+b") as f:
        f.write(b"\x33" * 8192)
    env = dict(os.environ, PYDR_CRASH_AT="apply.kept")
    assert run_cli("replicate", "vm", "--vault", vault, env=env).returncode != 0
    assert (0, 3) not in _digests(vault)
    r = run_cli("replicate", "vm", "--vault", vault)
    assert r.returncode == 0, r.stderr
    digests = _digests(vault)
    assert digests[(0, 3)] and digests[(0, 4)], digests
    from pydr.dr import stepdigest
    assert digests[(0, 3)] == stepdigest.digest(vault / "undo" / "vm" / "0-3.undo")
    code, report = _check(vault)
    assert code == 0, report


def test_vault_check_finds_a_step_that_does_not_fit_its_neighbours(tmp_path):
    """A step recorded without a digest (a vault from before digests)
    swapped for a step of a disk of another size: its header does not begin
    where the step before it ends."""
    vault, _ = _vault(tmp_path, cycles=4, disks=2, sizes=(1 << 20, 2 << 20))
    _sql(vault, "UPDATE steps SET digest=NULL, bytes=0")
    steps = vault / "undo" / "vm"
    shutil.copy(steps / "1-2.undo", steps / "0-2.undo")
    code, report = _check(vault)
    assert code == 14, report
    found = [(p["kind"], os.path.basename(p["where"])) for p in report["problems"]]
    assert found == [("step-file", "0-2.undo"), ("step-file", "0-3.undo")], report
    assert "2097152" in report["problems"][0]["message"], report

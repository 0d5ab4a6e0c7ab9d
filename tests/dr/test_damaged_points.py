"""Damaged recovery points are found and never restored: a step (a
committed undo journal in the vault) with a bit flipped in its header, its
payload or at its end, or cut short, or of another size than the vault
recorded, is exit 7 naming the file and the offset; every point that needs
it is marked damaged (points, status, --json) and refused by materialize,
test-failover, failover and change-point before anything is written or
renamed; the points that do not need it still restore exactly. pydr verify
scrubs the chain. vault.db damaged: never exit 0 with wrong data.
Contents are checked against hashlib (SHA-256) as the oracle."""

import json
import os
import random

import pytest

from conftest import run_cli, sha
from disks import cycled_item

HEADER, RECORD = 96, 64


@pytest.fixture
def item(tmp_path, monkeypatch):
    """Item 'vm', two 1 MiB disks, 3 cycles: point 1 needs steps 0-1, 0-2
    (disk 0) and 1-1, 1-2 (disk 1); point 2 needs 0-2 and 1-2; point 3 none.
    Returns (tmp_path, [(source, replica)], {point: [sha of each disk]})."""
    monkeypatch.setenv("PYDR_VAULT", str(tmp_path / "vault"))
    pairs, history = cycled_item(tmp_path, cli, sha, seed=7, written=lambda n: 50_000 * (n + 1))
    return tmp_path, pairs, history


def cli(*args):
    return run_cli(*args, env=dict(os.environ))


def step(tmp_path, idx, number):
    return tmp_path / "vault" / "undo" / "vm" / f"{idx}-{number}.undo"


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


DAMAGES = {
    "header": lambda p: flip(p, 20),
    "payload": lambda p: flip(p, HEADER + RECORD + 500),  # the first record is DATA
    "end": lambda p: flip(p, os.path.getsize(p) - 1),  # the COMMIT record
    "truncated": lambda p: os.truncate(p, os.path.getsize(p) - 100),
    "longer": lambda p: open(p, "ab").write(bytes(RECORD)),
}


def points(*args):
    r = cli("points", "vm", "--json", *args)
    assert r.returncode == 0, r.stderr
    return {p["id"]: p["damaged"] for p in json.loads(r.stdout)}


def assert_refused(r, *needles):
    err = r.stderr.decode()
    assert r.returncode == 7, (r.returncode, err)
    assert "Traceback" not in err, err
    for n in needles:
        assert str(n) in err, (n, err)


def replicas(pairs):
    return [sha(r) for _, r in pairs]


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_materialize_refuses_a_point_whose_step_is_damaged(item, kind):
    tmp_path, pairs, history = item
    bad = step(tmp_path, 0, 1)
    assert bad.stat().st_size > HEADER + RECORD + 600  # a DATA record to damage
    DAMAGES[kind](bad)
    r = cli("materialize", "vm", "--point", "1", "--to", tmp_path / "m1")
    assert_refused(r, bad, "offset")
    assert not any((tmp_path / "m1").glob("*.img"))  # nothing written
    damaged = points()
    assert damaged[1] and str(bad) in damaged[1]
    assert damaged[2] is None and damaged[3] is None  # they do not need 0-1
    r = cli("materialize", "vm", "--point", "1", "--to", tmp_path / "m1")  # again: refused
    assert_refused(r, "damaged")
    st = json.loads(cli("status", "vm", "--json").stdout)
    assert st["damaged_points"] == [1]
    assert b"DAMAGED" in cli("points", "vm").stdout
    for pid in (2, 3):  # the others still restore exactly
        out = tmp_path / f"m{pid}"
        r = cli("materialize", "vm", "--point", pid, "--to", out)
        assert r.returncode == 0, r.stderr
        assert [sha(out / r_.name) for _, r_ in pairs] == history[pid]


def test_drill_failover_and_change_point_refuse_before_anything_changes(item):
    tmp_path, pairs, history = item
    DAMAGES["payload"](step(tmp_path, 1, 2))  # needed by points 1 and 2
    before = replicas(pairs)
    status = json.loads(cli("status", "vm", "--json").stdout)
    r = cli("test-failover", "vm", "--to", tmp_path / "drill", "--point", "2")
    assert_refused(r, step(tmp_path, 1, 2), "offset")
    assert not (tmp_path / "drill").exists() or not any((tmp_path / "drill").iterdir())
    assert json.loads(cli("status", "vm", "--json").stdout)["state"] == status["state"]
    assert points() == {1: points()[1], 2: points()[2], 3: None} and points()[1] and points()[2]
    r = cli("test-failover", "vm", "--to", tmp_path / "drill", "--point", "1")
    assert_refused(r, "damaged")
    r = cli("failover", "vm", "--point", "1")
    assert_refused(r, "damaged")
    st = json.loads(cli("status", "vm", "--json").stdout)
    assert st["state"] == "protected" and replicas(pairs) == before
    assert not any(p.name.endswith(".pydr-base") or "base" in p.name
                   for p in (tmp_path / "site-b").iterdir())
    # point 3 needs no step: failover to it works, then change-point to 2 is refused
    r = cli("failover", "vm", "--point", "3")
    assert r.returncode == 0, r.stderr
    assert replicas(pairs) == history[3]
    r = cli("change-point", "vm", "--point", "2")
    assert_refused(r, "damaged")
    st = json.loads(cli("status", "vm", "--json").stdout)
    assert st["state"] == "failed-over" and st.get("failover_point", 3) == 3
    assert replicas(pairs) == history[3]


def test_a_step_damaged_found_while_materialising_marks_its_points(item, monkeypatch):
    """Damage the vault has not seen yet (the size is right, a payload bit
    is not), found when point 2 is restored: exit 7, and every point that
    needs the step is marked, point 1 too. (Found by the place that
    materialises, over the protocol: test_a_damaged_step_at_a_remote_place.)"""
    tmp_path, pairs, history = item
    bad = step(tmp_path, 0, 2)
    DAMAGES["payload"](bad)
    r = cli("materialize", "vm", "--point", "2", "--to", tmp_path / "m2")
    assert_refused(r, bad)
    assert points()[1] and points()[2] and points()[3] is None


def test_a_kept_step_the_vault_had_not_recorded_yet_and_is_damaged(item):
    """A cycle killed after it kept its step, before the vault recorded it:
    the next run records it. Damaged, it is recorded all the same (never
    written over) and the points that need it are marked; the new point is
    exact."""
    tmp_path, pairs, history = item
    with open(pairs[0][0], "r+b") as f:
        f.write(random.Random(4).randbytes(40_000))
    r = run_cli("replicate", "vm", env={**os.environ, "PYDR_CRASH_AT": "apply.kept"})
    assert r.returncode == -9, r.stderr
    kept = step(tmp_path, 0, 3)
    assert kept.exists() and points() == {1: None, 2: None, 3: None}
    DAMAGES["payload"](kept)
    r = cli("replicate", "vm", "--json")
    assert r.returncode == 0, r.stderr
    new = json.loads(r.stdout)["point_id"]
    damaged = points()
    assert all(str(kept) in damaged[p] for p in (1, 2, 3)) and damaged[new] is None
    assert_refused(cli("materialize", "vm", "--point", "3", "--to", tmp_path / "m3"), "damaged")
    r = cli("materialize", "vm", "--point", new, "--to", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert [sha(tmp_path / "m" / r_.name) for _, r_ in pairs] == [sha(s) for s, _ in pairs]
    assert kept.exists()


def test_verify_checks_every_step_and_marks_damaged_points(item):
    tmp_path, pairs, history = item
    r = cli("verify", "vm", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["steps"] == report["checked"] == 4 and report["problems"] == []
    assert report["caches"] == 2
    bad = step(tmp_path, 1, 1)
    os.truncate(bad, os.path.getsize(bad) - 1)
    flip(step(tmp_path, 0, 2), os.path.getsize(step(tmp_path, 0, 2)) - RECORD - 1)
    r = cli("verify", "vm", "--json")
    assert r.returncode == 7
    report = json.loads(r.stdout)
    assert len(report["problems"]) == 2, report
    assert any(str(bad) in p for p in report["problems"])
    assert any(str(step(tmp_path, 0, 2)) in p and "offset" in p for p in report["problems"])
    assert report["damaged_points"] == [1, 2]
    r = cli("verify", "vm")
    assert r.returncode == 7 and b"2 problems" in r.stderr, r.stderr
    assert r.stdout.count(b"problem:") == 2 and str(bad).encode() in r.stdout
    # --point: only the steps that point needs (point 3 needs none)
    r = cli("verify", "vm", "--point", "3", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["checked"] == 0, r.stdout
    r = cli("verify", "vm", "--point", "2", "--json")
    assert r.returncode == 7 and json.loads(r.stdout)["checked"] == 2
    # a sample checks a part of the steps, at least one
    r = cli("verify", "vm", "--sample", "25", "--json")
    assert json.loads(r.stdout)["checked"] == 1


@pytest.mark.parametrize("where", ["header", "middle", "end", "truncated"])
def test_damaged_vault_db_never_gives_wrong_data(item, where):
    """vault.db damaged: whatever the command says, it never exits 0 with
    wrong disks, nor 1 (SQLite's damage maps to 14: cli/common.py)."""
    tmp_path, pairs, history = item
    db = tmp_path / "vault" / "vault.db"
    size = db.stat().st_size
    if where == "truncated":
        os.truncate(db, size // 2)
    else:
        flip(db, {"header": 18, "middle": size // 2, "end": size - 1}[where])
    out = tmp_path / "m"
    r = cli("materialize", "vm", "--point", "2", "--to", out)
    assert r.returncode != 1 and b"Traceback" not in r.stderr, r.stderr
    if r.returncode == 0:
        assert [sha(out / r_.name) for _, r_ in pairs] == history[2]


def test_a_damaged_step_at_a_remote_place(sshd, tmp_path, monkeypatch):
    """Steps kept beside a replica on another host: the place that
    materialises reads them and refuses a damaged one (exit 7 over the
    protocol, naming host:PATH and the offset), and the vault marks the
    points that need it; the others still materialise there exactly."""
    from conftest import PYDR
    from pydr.engine import names

    monkeypatch.setenv("PYDR_VAULT", str(tmp_path / "vault"))
    site_b = tmp_path / "site-b"
    site_b.mkdir()
    disk = tmp_path / "os.img"
    rng = random.Random(9)
    disk.write_bytes(rng.randbytes(2 << 20))
    assert cli("vault", "init", tmp_path / "vault").returncode == 0
    r = cli("protect", "vm", "--disk", f"{disk}=127.0.0.1:{site_b / 'os.img'}",
            "--rsh", sshd["rsh"], "--remote-pydr", PYDR)
    assert r.returncode == 0, r.stderr
    history = {}
    for cycle in range(3):
        if cycle:
            with open(disk, "r+b") as f:
                f.seek(rng.randrange(0, 1 << 20))
                f.write(rng.randbytes(100_000))
        res = json.loads(cli("replicate", "vm", "--json").stdout)
        history[res["point_id"]] = sha(disk)
    bad = names.step(str(site_b / "os.img"), "vm", 0, 1)
    assert os.path.getsize(bad) > HEADER + RECORD + 600
    DAMAGES["payload"](bad)
    r = cli("materialize", "vm", "--point", "1", "--to", f"127.0.0.1:{tmp_path / 'p1'}")
    assert_refused(r, bad, "offset")
    assert not (tmp_path / "p1" / "os.img").exists()
    assert points()[1] and points()[2] is None
    r = cli("materialize", "vm", "--point", "2", "--to", f"127.0.0.1:{tmp_path / 'p2'}")
    assert r.returncode == 0, r.stderr
    assert sha(tmp_path / "p2" / "os.img") == history[2]

"""A doomed_files row is only ever a step file of the item's own step
directory (review of issue 23, finding 2): a damaged or hostile row naming
the replica, a file elsewhere, or a step-like name reached through a
symlinked directory is dropped with a warning on the item, and nothing is
unlinked; ``pydr vault check`` reports it."""

import json
import os
import sqlite3

from pydr.dr import stepmerge
from pydr.dr.vault import Vault

from conftest import run_cli


def _cli(*args):
    return run_cli(*args, env=dict(os.environ))


def test_doomed_rows_outside_the_items_step_directory_unlink_nothing(tmp_path, monkeypatch):
    vault = tmp_path / "vault"
    monkeypatch.setenv("PYDR_VAULT", str(vault))
    assert _cli("vault", "init", vault).returncode == 0
    src, rep = tmp_path / "src.img", tmp_path / "rep.img"
    src.write_bytes(os.urandom(1 << 20))
    assert _cli("protect", "db", "--disk", f"{src}={rep}").returncode == 0
    assert _cli("replicate", "db").returncode == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    outside = tmp_path / "outside"  # a step-like name, reached through a symlinked directory
    outside.mkdir()
    (outside / "0-1.undo").write_text("not the vault's")
    os.makedirs(vault / "undo" / "db", exist_ok=True)
    os.symlink(outside, vault / "undo" / "db" / "sub")
    hostile = [str(rep), str(victim), str(vault / "undo" / "db" / "sub" / "0-1.undo"),
               str(vault / "undo" / "db" / ".." / ".." / "victim.txt")]
    db = sqlite3.connect(vault / "vault.db")
    with db:
        db.executemany("INSERT INTO doomed_files VALUES('db', ?)", [(p,) for p in hostile])
    db.close()
    r = _cli("vault", "check", "--json")
    assert r.returncode != 0
    problems = json.loads(r.stdout)["problems"]
    for path in hostile:
        assert any(p["kind"] == "rows" and path in p["message"] for p in problems), (path, problems)
    with open(src, "r+b") as f:
        f.seek(3 << 16)
        f.write(os.urandom(1 << 16))
    r = _cli("replicate", "db")
    assert r.returncode == 0, r.stderr
    assert rep.exists() and victim.read_text() == "precious"
    assert (outside / "0-1.undo").read_text() == "not the vault's"
    with Vault(vault) as v:
        assert v.store.doomed("db") == []  # dropped, not kept to be tried again
        row = v.store.item("db")
        assert row["health"] == "warning" and str(victim) in row["last_error"]


def test_a_doomed_step_file_of_the_item_is_removed(tmp_path, monkeypatch):
    vault = tmp_path / "vault"
    monkeypatch.setenv("PYDR_VAULT", str(vault))
    assert _cli("vault", "init", vault).returncode == 0
    src, rep = tmp_path / "src.img", tmp_path / "rep.img"
    src.write_bytes(os.urandom(1 << 20))
    assert _cli("protect", "db", "--disk", f"{src}={rep}").returncode == 0
    assert _cli("replicate", "db").returncode == 0
    folder = vault / "undo" / "db"
    os.makedirs(folder, exist_ok=True)
    left = [folder / "0-7.undo.m3", folder / "0-9.undo.m8.m4"]  # recovery leaves these alone
    for p in left:
        p.write_text("a merge's old file")
    with Vault(vault, writer=True) as v:
        with v.store.transaction():
            for p in left:
                v.store.add_doomed("db", str(p))
        assert stepmerge.remove_doomed(v.store, "db") == 2
        assert v.store.doomed("db") == [] and not any(p.exists() for p in left)
        assert v.store.item("db")["health"] == "ok"


def test_a_step_row_outside_the_step_directory_points_leftover_removal_nowhere(tmp_path,
                                                                              monkeypatch):
    """The leftovers of a killed merge (``<step>.m<j>`` no row names) are
    looked for only beside step rows in the item's own step directory: a
    damaged or hostile steps row naming a file elsewhere does not make
    ``<that file>.m1`` a leftover to remove."""
    vault = tmp_path / "vault"
    monkeypatch.setenv("PYDR_VAULT", str(vault))
    assert _cli("vault", "init", vault).returncode == 0
    src, rep = tmp_path / "src.img", tmp_path / "rep.img"
    src.write_bytes(os.urandom(1 << 20))
    assert _cli("protect", "db", "--disk", f"{src}={rep}").returncode == 0
    assert _cli("replicate", "db").returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "0-7.undo.m1").write_text("precious")
    db = sqlite3.connect(vault / "vault.db")
    with db:
        db.execute("INSERT INTO steps(item, idx, step, path, bytes) VALUES('db', 0, 7, ?, 0)",
                   (str(elsewhere / "0-7.undo"),))
    db.close()
    with Vault(vault, writer=True) as v:
        assert stepmerge.remove_leftovers(v.store, "db") == []
    assert (elsewhere / "0-7.undo.m1").read_text() == "precious"

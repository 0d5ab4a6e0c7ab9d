"""A cycle whose point is recorded succeeds even when its retention fails
afterwards (review of issue 23, finding 3): the point is there, so the item
is protected; the item's health is warning with last_error naming the
retention problem, and the next cycle's retention tries again. A planted
entry named like a merged step (a directory, a symlink) is never a reason:
only regular files and symlinks themselves are removed, anything else is
skipped with a note."""

import os

from pydr.dr import cycle as cycle_module
from pydr.dr.replication import replicate
from pydr.dr.vault import Vault

from conftest import run_cli
from test_stepmerge import Source, clock, vault_dir  # noqa: F401 (fixtures)


def _replicate_cli(src):
    with open(src, "r+b") as f:
        f.seek(os.urandom(1)[0] * 4096)
        f.write(os.urandom(4096))
    return run_cli("replicate", "db", env=dict(os.environ))


def test_a_planted_directory_named_like_a_merged_step_fails_no_cycle(tmp_path, monkeypatch):
    vault = tmp_path / "vault"
    monkeypatch.setenv("PYDR_VAULT", str(vault))
    assert run_cli("vault", "init", vault).returncode == 0
    src, rep = tmp_path / "s.img", tmp_path / "r.img"
    src.write_bytes(os.urandom(1 << 20))
    r = run_cli("protect", "db", "--disk", f"{src}={rep}", "--keep-within", "1h",
                "--keep-hourly", "3", env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    for _ in range(3):
        assert _replicate_cli(src).returncode == 0
    folder = vault / "undo" / "db"
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    os.symlink(outside, folder / "0-2.undo.m1")
    os.mkdir(folder / "0-1.undo.m9")
    fifo = folder / "0-3.undo.m2"
    os.mkfifo(fifo)
    for _ in range(2):
        r = _replicate_cli(src)
        assert r.returncode == 0, r.stderr
    with Vault(vault) as v:
        assert len(v.store.points("db")) == 5
    assert (folder / "0-1.undo.m9").is_dir() and fifo.exists()  # skipped, not removed
    assert not os.path.lexists(folder / "0-2.undo.m1")  # the symlink itself went
    assert outside.read_text() == "keep"


def test_a_retention_that_fails_after_the_point_is_recorded_fails_no_cycle(
        tmp_path, vault_dir, clock, monkeypatch):
    src = Source(tmp_path, seed=11)
    real = cycle_module.apply_retention
    with Vault(vault_dir, writer=True) as v:
        v.protect("db", [(str(src.path), str(src.replica))], retention=2)
        for _ in range(3):
            src.cycle(v, clock)

        def no_space(vault, name, now=None):
            raise OSError(28, "No space left on device", str(vault_dir / "undo" / "db"))

        monkeypatch.setattr(cycle_module, "apply_retention", no_space)
        clock.advance(600)
        src.change()
        res = replicate(v.store, ["db"])
        assert [o.status for o in res.outcomes] == ["succeeded"] and res.point_id
        assert v.store.point("db", res.point_id)
        row = v.store.item("db")
        assert row["health"] == "warning" and "retention" in row["last_error"]
        assert "No space left" in row["last_error"]
        assert v.store.job(res.jobs[0])["state"] == "succeeded"
        assert len(v.store.points("db")) == 3  # nothing let go yet
        monkeypatch.setattr(cycle_module, "apply_retention", real)
        clock.advance(600)
        src.change()
        res = replicate(v.store, ["db"])
        assert res.outcomes[0].status == "succeeded"
        assert len(v.store.points("db")) == 2  # the next retention did it
        assert v.store.item("db")["health"] == "ok"

"""Step numbers never go down (review of issue 23, finding 1): once
retention leaves an item with one point, every undo step is released; the
next cycle's step must still be numbered past the point's, or the next
release removes it too and every older point silently materialises the
newest data. A point whose steps are not all there is damage (exit 14),
never "no steps"."""

import os
import sqlite3

import pytest

from pydr.dr.points import materialize
from pydr.dr.policy import set_policy
from pydr.dr.pointstores import point_store
from pydr.dr.tiers import Tiers
from pydr.dr.vault import Vault
from pydr.errors import VaultDamaged

from conftest import run_cli
from test_stepmerge import Source, check_kept_points, clock, vault_dir  # noqa: F401 (fixtures)


def test_one_point_left_by_the_tiers_then_every_point_stays_exact(tmp_path, vault_dir, clock):
    src = Source(tmp_path, seed=7)
    with Vault(vault_dir, writer=True) as v:
        v.protect("db", [(str(src.path), str(src.replica))], retention=1000)
        set_policy(v.store, "item", "db", keep=Tiers(hourly=24))
        src.cycle(v, clock)
        src.cycle(v, clock)  # same hour: only the newest point stays, with no step
        assert len(v.store.points("db")) == 1 and v.store.steps("db") == []
        set_policy(v.store, "item", "db", keep=Tiers(within=86400))
        for _ in range(4):
            src.cycle(v, clock)
        steps = [v.store.point_step("db", p.id, 0) for p in v.store.points("db")]
        assert steps == sorted(set(steps)) and len(steps) == 5
        check_kept_points(v, src, tmp_path, "tiers")
    r = run_cli("vault", "check", "--json", env=dict(os.environ))
    assert r.returncode == 0, r.stdout


def test_one_point_left_by_the_age_then_every_point_stays_exact(tmp_path, vault_dir, clock):
    src = Source(tmp_path, seed=8)
    with Vault(vault_dir, writer=True) as v:
        v.protect("db", [(str(src.path), str(src.replica))], retention=1000,
                  retention_age=3600)
        for minutes in (10, 10, 120, 10, 10, 10):
            src.cycle(v, clock, minutes=minutes)
        kept = [p.id for p in v.store.points("db")]
        assert len(kept) == 4  # the last hour's: the age keeps them, not the count
        check_kept_points(v, src, tmp_path, "age")
    r = run_cli("vault", "check", "--json", env=dict(os.environ))
    assert r.returncode == 0, r.stdout


def test_a_point_whose_steps_are_gone_is_damage_not_the_latest_state(tmp_path, vault_dir,
                                                                     clock):
    src = Source(tmp_path, seed=9)
    with Vault(vault_dir, writer=True) as v:
        v.protect("db", [(str(src.path), str(src.replica))], retention=1000)
        for _ in range(4):
            src.cycle(v, clock)
        first, second = [p.id for p in v.store.points("db")][:2]
        gone = v.store.point_step("db", second, 0) + 1
    db = sqlite3.connect(vault_dir / "vault.db")
    with db:  # a damaged vault: the row of a step the points before it need
        db.execute("DELETE FROM steps WHERE item='db' AND idx=0 AND step=?", (gone,))
    db.close()
    with Vault(vault_dir, writer=True) as v:
        for pid in (first, second):
            with pytest.raises(VaultDamaged, match=f"point {pid}.*disk 0"):
                materialize(v.store, "db", pid, tmp_path / f"m{pid}")
        with pytest.raises(VaultDamaged, match=f"point {first}.*disk 0"):
            point_store(v.store, "db").verify()
    for pid in (first, second):
        r = run_cli("materialize", "db", "--point", str(pid), "--to", str(tmp_path / f"c{pid}"),
                    env=dict(os.environ))
        assert r.returncode == 14, r.stderr
    r = run_cli("verify", "db", env=dict(os.environ))
    assert r.returncode == 14 and b"disk 0" in r.stderr, r.stderr
    r = run_cli("vault", "check", "--json", env=dict(os.environ))
    assert r.returncode != 0 and b"not recorded" in r.stdout, r.stdout

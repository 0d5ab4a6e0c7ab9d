"""Test failover, failover, change-point and commit on real ext4 images,
two disks per item; contents checked by hash at every step."""

import json
import os

import pytest

import pydr.dr.failover as F
from pydr.dr.pointstores.stepchain import StepChain
from pydr.dr.vault import Vault, init_vault

from conftest import run_cli, sha
from disks import change, fsck_clean, mkfs


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """An item 'vm' with two ext4 disks, replicated in 3 cycles (changes
    between them); returns (tmp_path, [(source, replica)], {point: hashes})."""
    vault = tmp_path / "vault"
    init_vault(vault)
    monkeypatch.setenv("PYDR_VAULT", str(vault))
    disks = [mkfs(tmp_path, "os", size="32M"), mkfs(tmp_path, "data", size="24M")]
    pairs = [(d, tmp_path / "site-b" / f"{d.name}") for d in disks]
    (tmp_path / "site-b").mkdir()
    args = ["protect", "vm", "--retention", "10"]
    for s, r in pairs:
        args += ["--disk", f"{s}={r}"]
    assert cli(*args).returncode == 0
    history = {}
    for cycle in range(3):
        if cycle:
            change(disks[cycle % 2], tmp_path, tag=cycle)
        res = json.loads(cli("replicate", "vm", "--json").stdout)
        history[res["point_id"]] = [sha(s) for s, _ in pairs]
    return tmp_path, pairs, history


def cli(*args):
    return run_cli(*args, env=dict(os.environ))


def replica_hashes(pairs):
    return [sha(r) for _, r in pairs]


def test_drill_shows_the_point_and_leaves_replicas_alone(machine):
    tmp_path, pairs, history = machine
    before = replica_hashes(pairs)
    r = cli("test-failover", "vm", "--to", tmp_path / "drill", "--point", "1", "--json")
    assert r.returncode == 0, r.stderr
    paths = json.loads(r.stdout)["paths"]
    assert [sha(p) for p in paths] == history[1]
    for p in paths:
        fsck_clean(p)
    assert replica_hashes(pairs) == before
    # replication goes on during the drill
    change(pairs[0][0], tmp_path, tag=7)
    assert cli("replicate", "vm").returncode == 0
    assert cli("test-failover", "vm", "--to", tmp_path / "d2").returncode == 15  # one at a time
    r = cli("cleanup-test-failover", "vm")
    assert r.returncode == 0 and not any(os.path.exists(p) for p in paths)
    r = cli("cleanup-test-failover", "vm")  # again: done already, and it says so
    assert r.returncode == 0 and b"nothing to do" in r.stdout


def test_unplanned_failover_loses_only_unreplicated_changes(machine):
    tmp_path, pairs, history = machine
    change(pairs[1][0], tmp_path, tag=5)  # written at site A, never replicated
    r = cli("failover", "vm", "--point", "latest-processed", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["point"] == 3
    assert replica_hashes(pairs) == history[3]
    for _, rep in pairs:
        fsck_clean(rep)
    st = json.loads(cli("status", "vm", "--json").stdout)
    assert st["state"] == "failed-over" and st["direction"] == "forward"


def test_change_point_is_exact_even_after_the_replica_was_written(machine):
    tmp_path, pairs, history = machine
    assert cli("failover", "vm", "--point", "2").returncode == 0
    assert replica_hashes(pairs) == history[2]
    with open(pairs[0][1], "r+b") as f:  # the failed-over machine writes to its disk
        f.seek(1 << 20)
        f.write(b"written at site B" * 100)
    for p in (1, 3, 2):
        r = cli("change-point", "vm", "--point", p)
        assert r.returncode == 0, r.stderr
        assert replica_hashes(pairs) == history[p], p
    for _, rep in pairs:
        fsck_clean(rep)


def test_planned_failover_loses_nothing(machine):
    tmp_path, pairs, history = machine
    change(pairs[0][0], tmp_path, tag=9)
    now = [sha(s) for s, _ in pairs]
    marker = tmp_path / "shut-down"
    r = cli("failover", "vm", "--planned", "--shutdown-hook", f"touch {marker}", "--json")
    assert r.returncode == 0, r.stderr
    assert marker.exists() and replica_hashes(pairs) == now
    assert json.loads(r.stdout)["point"] == 4


def test_planned_failover_needs_its_shutdown_hook(machine):
    tmp_path, pairs, history = machine
    before = sha(tmp_path / "vault" / "vault.db"), replica_hashes(pairs)
    r = cli("failover", "vm", "--planned", "--shutdown-hook", "exit 4")
    assert r.returncode == 16 and b"shutdown hook" in r.stderr
    assert json.loads(cli("status", "vm", "--json").stdout)["state"] == "protected"
    assert replica_hashes(pairs) == before[1]


def test_latest_without_a_source_uses_the_newest_point(machine):
    tmp_path, pairs, history = machine
    os.unlink(pairs[0][0])  # site A is gone
    r = cli("failover", "vm", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["point"] == 3 and any("could not replicate" in n for n in out["notes"])
    assert replica_hashes(pairs) == history[3]


def test_commit(machine):
    tmp_path, pairs, history = machine
    assert cli("failover", "vm", "--point", "latest-processed").returncode == 0
    r = cli("commit", "vm")
    assert r.returncode == 0, r.stderr
    st = json.loads(cli("status", "vm", "--json").stdout)
    assert (st["state"], st["direction"], st["point_count"]) == ("failover-committed", "reverse", 0)
    assert (st["latest_point"], st["rpo_seconds"]) == (None, None)
    assert replica_hashes(pairs) == history[3]
    # only the owner files are left: the disks stay the item's (its sources after reprotect)
    assert sorted(p for p in os.listdir(tmp_path / "site-b") if p.startswith(".")) == [
        ".data.img.pydr-owner", ".os.img.pydr-owner"]
    assert not os.listdir(tmp_path / "vault" / "undo" / "vm")
    assert cli("replicate", "vm").returncode == 15  # reprotect comes first


def test_invalid_states_leave_the_vault_unchanged(machine):
    tmp_path, pairs, history = machine
    db = tmp_path / "vault" / "vault.db"

    def refused(*args):
        before = sha(db)
        r = cli(*args)
        assert r.returncode == 15, (args, r.returncode, r.stderr)
        assert b"Traceback" not in r.stderr
        assert sha(db) == before, args

    refused("commit", "vm")
    refused("change-point", "vm", "--point", "1")
    assert cli("failover", "vm", "--point", "1").returncode == 0
    before = sha(db)
    r = cli("failover", "vm")  # done already: it says so and changes nothing
    assert r.returncode == 0 and b"already failed over to point 1" in r.stdout
    assert sha(db) == before
    refused("failover", "vm", "--point", "2")  # another point: that is change-point's work
    assert b"pydr change-point vm --point 2" in cli("failover", "vm", "--point", "2").stderr
    refused("replicate", "vm")
    refused("test-failover", "vm", "--to", tmp_path / "x")
    assert cli("failover", "nope").returncode == 3
    assert cli("change-point", "vm", "--point", "42").returncode == 3


def test_interrupted_failover_can_be_continued(machine, monkeypatch):
    tmp_path, pairs, history = machine
    real = StepChain.materialize_disk
    calls = []

    def dies_on_the_second_disk(store, pid, d, dest, **options):
        calls.append(d["idx"])
        if d["idx"] == 1:
            raise KeyboardInterrupt  # killed half-way
        return real(store, pid, d, dest, **options)

    monkeypatch.setattr(StepChain, "materialize_disk", dies_on_the_second_disk)
    with Vault(tmp_path / "vault", writer=True) as v:
        with pytest.raises(KeyboardInterrupt):
            F.failover(v.store, "vm", "2")
        assert v.status("vm").state == "failing-over"
    assert calls == [0, 1]  # the first disk came up, the second was killed
    monkeypatch.setattr(StepChain, "materialize_disk", real)
    r = cli("failover", "vm", "--json")  # the same command finishes the job
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["point"] == 2 and "resumed" in json.loads(r.stdout)["notes"]
    assert replica_hashes(pairs) == history[2]


def test_full_round_trip(machine):
    """failover, commit, work at site B, reprotect (differences only),
    planned failback (nothing lost), commit, reprotect: forward again."""
    tmp_path, pairs, history = machine
    disk_size = sum(os.path.getsize(s) for s, _ in pairs)
    assert cli("failover", "vm", "--point", "latest-processed").returncode == 0
    assert cli("commit", "vm").returncode == 0
    change(pairs[0][1], tmp_path, tag=11)  # the machine runs at site B now
    fsck_clean(pairs[0][1])
    r = cli("reprotect", "vm", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["direction"] == "reverse"
    assert rep["operation"] == "reprotect" and rep["cycle"]["point_id"] == rep["point"]
    assert rep["cycle"]["bytes_written"] < disk_size // 4  # the differences, not a copy
    assert [sha(s) for s, _ in pairs] == replica_hashes(pairs)  # site A follows site B
    change(pairs[1][1], tmp_path, tag=12)  # more work at site B, not yet replicated
    site_b = replica_hashes(pairs)
    r = cli("failback", "vm", "--shutdown-hook", "true", "--json")
    assert r.returncode == 0, r.stderr
    assert [sha(s) for s, _ in pairs] == site_b  # planned: nothing lost
    for s, _ in pairs:
        fsck_clean(s)
    assert cli("commit", "vm").returncode == 0
    assert cli("reprotect", "vm").returncode == 0
    st = json.loads(cli("status", "vm", "--json").stdout)
    assert (st["state"], st["direction"]) == ("protected", "forward")
    assert cli("replicate", "vm").returncode == 0


def test_failback_to_an_alternate_location(machine):
    tmp_path, pairs, history = machine
    assert cli("failover", "vm").returncode == 0
    assert cli("commit", "vm").returncode == 0
    assert cli("reprotect", "vm").returncode == 0
    site_b = replica_hashes(pairs)
    old_a = sha(pairs[0][0])
    new = tmp_path / "new-site-a" / "os-restored.img"
    r = cli("failback", "vm", "--alternate", f"{pairs[0][0]}={new}", "--json")
    assert r.returncode == 0, r.stderr
    assert sha(new) == site_b[0] and sha(pairs[1][0]) == site_b[1]
    assert sha(pairs[0][0]) == old_a  # the old location is left alone
    fsck_clean(new)
    st = json.loads(cli("status", "vm", "--json").stdout)
    assert str(new) in [d["replica"] for d in st["disks"]]


def test_reprotect_and_failback_refused_in_the_wrong_state(machine):
    """Refused: exit 15, and the item (state, direction, operation), the
    vault's database and every file at site B and in the vault unchanged."""
    tmp_path, pairs, history = machine

    def refused(*args):
        before = snapshot(tmp_path, pairs)
        r = cli(*args)
        assert r.returncode == 15, (args, r.returncode, r.stderr)
        assert b"Traceback" not in r.stderr
        assert snapshot(tmp_path, pairs) == before, args

    refused("reprotect", "vm")  # before commit
    refused("failback", "vm")   # not reversed
    assert snapshot(tmp_path, pairs)[0][:3] == ("protected", "forward", None)
    assert cli("failover", "vm").returncode == 0
    refused("reprotect", "vm")  # failed over, not committed
    refused("failback", "vm")
    assert snapshot(tmp_path, pairs)[0][:3] == ("failed-over", "forward", None)


def test_recovery_plan_runs_groups_in_order_with_hooks(tmp_path, monkeypatch):
    vault = tmp_path / "vault"
    init_vault(vault)
    monkeypatch.setenv("PYDR_VAULT", str(vault))
    log = tmp_path / "plan.log"
    for n in ("db", "web1", "web2"):
        (tmp_path / f"{n}.img").write_bytes(os.urandom(1 << 20))
        assert cli("protect", n, "--disk", f"{tmp_path / f'{n}.img'}={tmp_path / f'{n}-b.img'}").returncode == 0
        assert cli("replicate", n).returncode == 0
    r = cli("plan", "create", "shop", "--group", "db", "--pre-hook", f"echo pre1 >> {log}",
            "--post-hook", f"echo post1 >> {log}", "--group", "web1,web2",
            "--post-hook", f"echo post2 >> {log}")
    assert r.returncode == 0, r.stderr
    r = cli("plan", "test-failover", "shop", "--to", tmp_path / "drill", "--json")
    assert r.returncode == 0, r.stderr
    assert sha(tmp_path / "drill" / "web2" / "web2-b.img") == sha(tmp_path / "web2-b.img")
    assert cli("plan", "cleanup-test-failover", "shop").returncode == 0
    log.unlink()
    r = cli("plan", "failover", "shop", "--point", "latest-processed", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["type"] == "plan-report" and report["operation"] == "failover"
    assert [([h["hook"] for h in s["hooks"]], list(s["outcomes"])) for s in report["steps"]] == [
        (["pre", "post"], ["db"]), (["post"], ["web1", "web2"])]
    assert all(o["type"] == "operation-result" and o["operation"] == "failover"
               for s in report["steps"] for o in s["outcomes"].values())
    assert log.read_text().split() == ["pre1", "post1", "post2"]
    for n in ("db", "web1", "web2"):
        assert json.loads(cli("status", n, "--json").stdout)["state"] == "failed-over"
    assert cli("plan", "commit", "shop").returncode == 0
    assert cli("plan", "reprotect", "shop").returncode == 0
    assert json.loads(cli("status", "web1", "--json").stdout)["direction"] == "reverse"


def test_a_failure_stops_the_plan_with_a_report(tmp_path, monkeypatch):
    vault = tmp_path / "vault"
    init_vault(vault)
    monkeypatch.setenv("PYDR_VAULT", str(vault))
    for n in ("a", "b", "c"):
        (tmp_path / f"{n}.img").write_bytes(os.urandom(1 << 16))
        cli("protect", n, "--disk", f"{tmp_path / f'{n}.img'}={tmp_path / f'{n}-b.img'}")
        if n != "b":
            cli("replicate", n)
    cli("plan", "create", "p", "--group", "a", "--group", "b", "--group", "c")
    r = cli("plan", "failover", "p", "--point", "latest-processed", "--json")
    assert r.returncode == 17 and b"stopped in group 2" in r.stderr
    report = json.loads(r.stdout)
    assert not report["ok"] and "stopped in group 2" in report["error"]
    outcomes = [(i, s["outcomes"][i]["type"] if i in s["outcomes"] else "not run")
                for s in report["steps"] for i in s["items"]]
    assert outcomes == [("a", "operation-result"), ("b", "item-error"), ("c", "not run")]
    assert report["steps"][2]["not_run"] == ["c"]
    failed = report["steps"][1]["outcomes"]["b"]
    assert failed["item"] == "b" and failed["exit_code"] == 15 and failed["error"]
    assert json.loads(cli("status", "c", "--json").stdout)["state"] == "protected"
    assert cli("plan", "failover", "nope").returncode == 3
    assert cli("plan", "create", "q", "--group", "a", "--group", "a").returncode == 2
    assert cli("plan", "create", "q", "--pre-hook", "true").returncode == 2


def snapshot(tmp_path, pairs):
    """What a refused command must leave as it was: the item's state and
    operation, the vault's database, and every file at site B and in the
    vault's undo directory (names, sizes, contents)."""
    st = json.loads(cli("status", "vm", "--json").stdout)
    files = {}
    for top in (tmp_path / "site-b", tmp_path / "vault" / "undo"):
        for dirpath, _, filenames in os.walk(top):
            for n in filenames:
                p = os.path.join(dirpath, n)
                files[p] = sha(p)
    return ((st["state"], st["direction"], st["operation"], st["failover_point"],
             st["test_failover"]), vault_rows(tmp_path / "vault" / "vault.db"), files)


def vault_rows(db_path):
    """Every row of the vault, but for the damaged marks of points (a
    refused restore marks the points that need a damaged step: asserted on
    its own)."""
    import sqlite3

    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                           "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        rows = {}
        for t in tables:
            cols = [c[1] for c in db.execute(f"PRAGMA table_info({t})") if c[1] != "damaged"]
            rows[t] = sorted(db.execute(f"SELECT {', '.join(cols)} FROM {t}").fetchall(), key=repr)
        return rows
    finally:
        db.close()


def damaged_points():
    return {p["id"] for p in json.loads(cli("points", "vm", "--json").stdout) if p["damaged"]}


def steps_of(tmp_path):
    """The undo step files of the item, by the step they are (1-2.undo: disk
    1, step 2)."""
    d = tmp_path / "vault" / "undo" / "vm"
    return {n: d / n for n in os.listdir(d)}


@pytest.mark.parametrize("damage", ["missing", "truncated", "torn commit"])
@pytest.mark.parametrize("command", ["failover", "test-failover"])
def test_a_damaged_step_is_found_before_anything_moves(machine, damage, command):
    """Point 1 needs the steps of cycles 2 and 3 of disk 0; one of them is
    damaged: exit 7 naming it, and the item, the vault and the files are
    exactly as they were (the replica was never renamed to its baseline)."""
    tmp_path, pairs, history = machine
    steps = steps_of(tmp_path)
    victim = steps["0-2.undo"]
    kept = victim.read_bytes()
    if damage == "missing":
        victim.unlink()
    elif damage == "truncated":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) - 1)
    else:  # same size, but its last record (the commit) is no longer valid
        with open(victim, "r+b") as f:
            f.seek(-8, os.SEEK_END)
            last = f.read(8)
            f.seek(-8, os.SEEK_END)
            f.write(bytes(b ^ 0xFF for b in last))
    before = snapshot(tmp_path, pairs)
    args = ["failover", "vm", "--point", "1"] if command == "failover" else \
        ["test-failover", "vm", "--point", "1", "--to", tmp_path / "drill"]
    r = cli(*args)
    assert r.returncode == 7, r.stderr
    assert str(victim).encode() in r.stderr and b"undo step 2 of disk 0" in r.stderr
    assert b"Traceback" not in r.stderr
    assert snapshot(tmp_path, pairs) == before
    # the points that need step 2 (point 3 does not); a missing step marks none: it may come back
    assert damaged_points() == (set() if damage == "missing" else {1, 2})
    assert not (tmp_path / "drill").exists()
    assert sorted(n for n in os.listdir(tmp_path / "site-b") if n.startswith(".")) == [
        ".data.img.pydr-owner", ".os.img.pydr-owner"]  # no baseline, no half-made disk
    # a point that does not need the step is still there to be used
    r = cli("failover", "vm", "--point", "3")
    assert r.returncode == 0, r.stderr
    assert replica_hashes(pairs) == history[3]
    if damage == "missing":  # storage that was not mounted: back, and point 1 comes up
        victim.write_bytes(kept)
        r = cli("change-point", "vm", "--point", "1")
        assert r.returncode == 0, r.stderr
        assert replica_hashes(pairs) == history[1]


def test_change_point_to_a_point_with_a_missing_step_changes_nothing(machine):
    tmp_path, pairs, history = machine
    assert cli("failover", "vm", "--point", "3").returncode == 0
    steps_of(tmp_path)["1-2.undo"].unlink()
    before = snapshot(tmp_path, pairs)
    r = cli("change-point", "vm", "--point", "2")
    assert r.returncode == 7 and b"undo step 2 of disk 1" in r.stderr, r.stderr
    assert snapshot(tmp_path, pairs) == before
    assert replica_hashes(pairs) == history[3]


@pytest.mark.parametrize("crash_at", ["failover.marked", "failover.baseline", "restore.copied",
                                      "failover.disk"])
def test_an_interrupted_failover_names_a_command_that_finishes_it(machine, crash_at):
    tmp_path, pairs, history = machine
    r = run_cli("failover", "vm", "--point", "1",
                env={**os.environ, "PYDR_CRASH_AT": crash_at})
    assert r.returncode == -9, r.stderr  # killed at the crash point
    st = json.loads(cli("status", "vm", "--json").stdout)
    assert st["state"] == "failing-over" and st["operation"]["interrupted"]
    command = st["operation"]["command"].split()
    assert command[0] == "pydr"
    r = cli(*command[1:], "--json")  # what status tells the operator to run
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["point"] == 1
    assert replica_hashes(pairs) == history[1]
    st = json.loads(cli("status", "vm", "--json").stdout)
    assert (st["state"], st["operation"], st["failover_point"]) == ("failed-over", None, 1)


def test_a_step_lost_during_an_interrupted_failover_is_named_with_a_way_out(machine):
    """Killed after the first replica moved to its baseline; then a step the
    point needs is lost. Resuming exits 7 naming it and change-point to a
    point that needs no such step finishes the failover."""
    tmp_path, pairs, history = machine
    r = run_cli("failover", "vm", "--point", "1",
                env={**os.environ, "PYDR_CRASH_AT": "failover.baseline"})
    assert r.returncode == -9, r.stderr
    steps_of(tmp_path)["0-2.undo"].unlink()
    before = snapshot(tmp_path, pairs)
    r = cli("failover", "vm")
    assert r.returncode == 7, r.stderr
    assert b"undo step 2 of disk 0" in r.stderr and b"pydr change-point vm --point N" in r.stderr
    after = snapshot(tmp_path, pairs)  # the vault's database: the killed job is marked failed
    assert (after[0], after[2]) == (before[0], before[2])
    r = cli("change-point", "vm", "--point", "3")
    assert r.returncode == 0, r.stderr
    assert replica_hashes(pairs) == history[3]
    st = json.loads(cli("status", "vm", "--json").stdout)
    assert (st["state"], st["operation"], st["failover_point"]) == ("failed-over", None, 3)


# -- a drill's point outlives retention ------------------------------------------------

@pytest.fixture
def kept_one(tmp_path, monkeypatch):
    """An item 'vm' of two random 2 MiB disks keeping 1 point, replicated
    once, then both sources changed; returns (tmp_path, pairs, point 1's
    hashes)."""
    vault = tmp_path / "vault"
    init_vault(vault)
    monkeypatch.setenv("PYDR_VAULT", str(vault))
    (tmp_path / "site-b").mkdir()
    pairs = []
    for n in ("a.img", "b.img"):
        (tmp_path / n).write_bytes(os.urandom(2 << 20))
        pairs.append((tmp_path / n, tmp_path / "site-b" / n))
    args = ["protect", "vm", "--retention", "1"]
    for s, r in pairs:
        args += ["--disk", f"{s}={r}"]
    assert cli(*args).returncode == 0
    assert cli("replicate", "vm").returncode == 0
    point1 = [sha(s) for s, _ in pairs]
    for s, _ in pairs:
        with open(s, "r+b") as f:
            f.seek(1 << 20)
            f.write(os.urandom(64 << 10))
    return tmp_path, pairs, point1


def point_ids():
    return [p["id"] for p in json.loads(cli("points", "vm", "--json").stdout)]


def test_a_resumed_drill_shows_its_point_after_retention(kept_one):
    """Killed after its first disk; a cycle then runs (retention 1). The
    drill's point stays, and the resumed drill makes its second disk from
    it: both disks are point 1, not one of point 1 and one of point 2."""
    tmp_path, pairs, point1 = kept_one
    drill = tmp_path / "drill"
    r = run_cli("test-failover", "vm", "--point", "1", "--to", drill,
                env={**os.environ, "PYDR_CRASH_AT": "drill.disk:1"})
    assert r.returncode == -9, r.stderr
    assert sorted(os.listdir(drill)) == ["a.img"]
    assert cli("replicate", "vm").returncode == 0
    assert point_ids() == [1, 2]  # the drill's point, and the newest
    r = cli("test-failover", "vm", "--to", drill, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["point"] == 1 and out["notes"] == ["resumed"]
    assert [sha(drill / s.name) for s, _ in pairs] == point1
    # once the drill is cleaned up, the next cycle's retention lets point 1 go
    assert cli("cleanup-test-failover", "vm").returncode == 0
    assert cli("replicate", "vm").returncode == 0
    assert point_ids() == [3]


def test_a_resumed_drill_whose_point_is_gone_is_refused(kept_one):
    """A vault whose retention dropped an interrupted drill's point (a pydr
    from before drills kept it): resuming exits 15 naming the point and the
    way out, and makes no disk of another point."""
    tmp_path, pairs, point1 = kept_one
    drill = tmp_path / "drill"
    r = run_cli("test-failover", "vm", "--point", "1", "--to", drill,
                env={**os.environ, "PYDR_CRASH_AT": "drill.disk:1"})
    assert r.returncode == -9, r.stderr
    assert cli("replicate", "vm").returncode == 0
    with Vault(tmp_path / "vault", writer=True) as v, v.db:  # what the old retention did
        v.db.execute("DELETE FROM points WHERE item='vm' AND id=1")
        v.db.execute("DELETE FROM point_disks WHERE item='vm' AND id=1")
    r = cli("test-failover", "vm", "--to", drill)
    assert r.returncode == 15, r.stderr
    assert b"point 1" in r.stderr and b"pydr cleanup-test-failover vm" in r.stderr
    assert sorted(os.listdir(drill)) == ["a.img"] and sha(drill / "a.img") == point1[0]
    assert cli("cleanup-test-failover", "vm").returncode == 0
    assert not drill.exists()


def test_the_steps_of_a_point_that_is_gone_are_refused(kept_one):
    """steps_of never answers "no steps" (the latest state) for a point it
    has no record of: UnknownName for a dropped point, VaultDamaged for a
    point missing one disk's record."""
    from pydr.dr.pointstores.steps import steps_of
    from pydr.errors import UnknownName, VaultDamaged

    tmp_path, pairs, point1 = kept_one
    assert cli("replicate", "vm").returncode == 0  # point 2; retention drops point 1
    with Vault(tmp_path / "vault", writer=True) as v:
        assert [p.id for p in v.points("vm")] == [2]
        with pytest.raises(UnknownName, match="no recovery point 1"):
            steps_of(v.store, "vm", 1, 0)
        assert steps_of(v.store, "vm", 2, 1) == []  # the latest point needs no step
        with v.db:
            v.db.execute("DELETE FROM point_disks WHERE item='vm' AND id=2 AND idx=1")
        with pytest.raises(VaultDamaged, match="point 2 of 'vm' has no record of disk 1"):
            steps_of(v.store, "vm", 2, 1)
        with pytest.raises(VaultDamaged):
            v.materialize("vm", 2, tmp_path / "m")
        assert not (tmp_path / "m" / "b.img").exists()


def test_retention_keeps_the_point_a_failover_shows(kept_one):
    """A failover to the older of two points is killed once it recorded its
    point; retention then keeps 1 point (run by the API): it keeps that
    point too, and the failover finishes with it."""
    tmp_path, pairs, point1 = kept_one
    with Vault(tmp_path / "vault", writer=True) as v:
        v.set_item("vm", retention=2)
    assert cli("replicate", "vm").returncode == 0
    r = run_cli("failover", "vm", "--point", "1",
                env={**os.environ, "PYDR_CRASH_AT": "failover.marked"})
    assert r.returncode == -9, r.stderr
    with Vault(tmp_path / "vault", writer=True) as v:
        v.set_item("vm", retention=1)
        v.apply_retention("vm")
        assert [p.id for p in v.points("vm")] == [1, 2]
    r = cli("failover", "vm", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["point"] == 1
    assert replica_hashes(pairs) == point1


# -- one file name a disk -------------------------------------------------------------

def test_protect_refuses_replicas_that_share_a_file_name(tmp_path, monkeypatch):
    """A point's disks are made side by side, named like their replicas:
    two replicas x/r.img and y/r.img would be one file. Refused (exit 2)
    naming both; nothing is recorded."""
    init_vault(tmp_path / "vault")
    monkeypatch.setenv("PYDR_VAULT", str(tmp_path / "vault"))
    disks = []
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "r.img").write_bytes(os.urandom(64 << 10))
        disks += ["--disk", f"{tmp_path / d / 'r.img'}={tmp_path / 'site-b' / d / 'r.img'}"]
    r = cli("protect", "vm", *disks)
    assert r.returncode == 2, r.stderr
    assert str(tmp_path / "site-b" / "x" / "r.img").encode() in r.stderr
    assert str(tmp_path / "site-b" / "y" / "r.img").encode() in r.stderr
    assert b"share the file name 'r.img'" in r.stderr
    assert cli("status", "vm").returncode == 3


def test_disks_of_an_old_item_that_share_a_file_name_are_never_made_as_one(tmp_path,
                                                                            monkeypatch):
    """An item recorded before protect refused it (add_item, as the old
    protect did): materialize and a drill refuse (exit 15, naming both
    replicas) before writing or recording anything, instead of making
    disk 1 over disk 0 (materialize) or skipping it (a drill)."""
    vault = tmp_path / "vault"
    init_vault(vault)
    monkeypatch.setenv("PYDR_VAULT", str(vault))
    stored = []
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / "site-b" / d).mkdir(parents=True)
        (tmp_path / d / "r.img").write_bytes(os.urandom(256 << 10))
        stored.append((str(tmp_path / d / "r.img"), str(tmp_path / "site-b" / d / "r.img"), None))
    with Vault(vault, writer=True) as v:
        v.add_item("vm", stored, state="protecting", direction="forward", health="ok",
                   retention=5, created=0.0)
    assert cli("replicate", "vm").returncode == 0
    for args in (["materialize", "vm", "--point", "1", "--to", tmp_path / "m"],
                 ["test-failover", "vm", "--point", "1", "--to", tmp_path / "m"]):
        r = cli(*args)
        assert r.returncode == 15, r.stderr
        assert b"disks 0 and 1 of 'vm' would both be made as this file" in r.stderr
        assert str(tmp_path / "m" / "r.img").encode() in r.stderr
        assert str(stored[1][1]).encode() in r.stderr
        assert not (tmp_path / "m" / "r.img").exists()
    st = json.loads(cli("status", "vm", "--json").stdout)
    assert (st["test_failover"], st["test_point"], st["operation"]) == (None, None, None)

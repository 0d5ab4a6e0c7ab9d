"""RPO built in (schema 9): each point records when its cut was taken --
the time of its data, before the cycle's reads, not when the cycle recorded
it -- and each item when its last cycle that made a point ended;
pydr.dr.rpo.rpo_facts turns them into an RPO that keeps its meaning across
failover, commit and reprotect. A point's consistency label says what its
cut was: disks read while they may change are "inconsistent".

The clock is read by hooks (`date +%s.%N`) and by the vault's job records,
never waited on: every assertion is an order of events of one cycle."""

import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from pydr.dr import fleet, schema
from pydr.dr.cycle import LocalExecutor
from pydr.dr.results import CycleResult, ItemStatus, JobInfo, PointInfo, utc
from pydr.dr.rpo import RpoFacts, consistency_of, rpo_facts, weakest
from pydr.dr.vault import Vault, init_vault

from conftest import pydr_command, run_cli

MiB = 1 << 20
QEMU = all(shutil.which(t) for t in ("qemu-img", "qemu-nbd"))


def random_file(path, size=2 * MiB):
    path.write_bytes(os.urandom(size))
    return path


def hooks(tmp_path):
    """A quiesce and a thaw hook that write the time they ran (nanoseconds,
    the clock time.time() reads) to tmp_path/quiesced and tmp_path/thawed."""
    return {"quiesce_hook": f"date +%s.%N > {tmp_path / 'quiesced'}",
            "thaw_hook": f"date +%s.%N > {tmp_path / 'thawed'}"}


def hook_time(tmp_path, name):
    return float((tmp_path / name).read_text())


def newest_point(v, name):
    """Item `name`'s newest point as the store records it (a PointRecord:
    epoch seconds), checked against the PointInfo the Vault gives for it."""
    record = v.store.points(name)[-1]
    info = v.points(name)[-1]
    assert isinstance(info, PointInfo) and (info.id, info.item) == (record.id, name)
    assert (info.created_at, info.cut_at) == (utc(record.created), utc(record.data_time))
    assert (info.cut, info.consistency, info.damaged) == \
        (record.cut, record.consistency, record.damaged)
    return record


def cycle(v, names, **kwargs):
    """One cycle; (its CycleResult, its point records by item, its job
    records by item). The records hold the epoch seconds the ordering
    assertions compare; the Vault's PointInfo and JobInfo must say the same."""
    names = [names] if isinstance(names, str) else names
    result = v.replicate(names, **kwargs)
    assert isinstance(result, CycleResult)
    assert [o.item for o in result.outcomes] == names and not result.failed
    infos = {j.item: j for j in v.jobs() if j.id in result.jobs}
    jobs = {j.item: j for j in v.store.jobs() if j.id in result.jobs}
    assert sorted(infos) == sorted(jobs) == sorted(names)
    for name, job in jobs.items():
        info = infos[name]
        assert isinstance(info, JobInfo) and info.id == job.id and info.state == "succeeded"
        assert (info.started_at, info.ended_at) == (utc(job.started), utc(job.ended))
    points = {n: newest_point(v, n) for n in names}
    assert all(result.by_item[n].point_id == points[n].id for n in names)
    return result, points, jobs


# -- the cut time ---------------------------------------------------------------------

def test_the_cut_time_is_before_the_reads_and_the_record(tmp_path):
    """ext4, no hooks: the sources are read as they are (cut "none"). The
    point's data time is taken before the cycle's job began reading, and its
    record (created) and the item's last success come at the cycle's end."""
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("vm", [(random_file(tmp_path / "d.img"), tmp_path / "r.img")])
        for _ in range(2):
            result, points, jobs = cycle(v, "vm")
            p, job = points["vm"], jobs["vm"]
            assert (p.cut, p.consistency, result.consistency) == \
                ("none", "inconsistent", "inconsistent")
            assert p.cut_at is not None and p.data_time == p.cut_at
            assert p.cut_at <= job.started <= p.created <= job.ended
            assert v.item("vm").last_success_at == p.created


def test_a_cycle_held_after_its_cut_records_the_cut_not_the_end(tmp_path):
    """A cycle stopped right after its cut (PYDR_STOP_AT: SIGSTOP there) for
    as long as the test takes: the point's data time is before the moment
    the test saw it stopped, its record after the cycle went on. Meanwhile
    status (a reader) gives the previous point's RPO."""
    vault = tmp_path / "v"
    init_vault(vault)
    with Vault(vault, writer=True) as v:
        v.protect("vm", [(random_file(tmp_path / "d.img"), tmp_path / "r.img")])
        _, first, _ = cycle(v, "vm")
    p = subprocess.Popen(pydr_command() + ["replicate", "vm", "--vault", str(vault)],
                         env={**os.environ, "PYDR_STOP_AT": "cycle.cut"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, st = os.waitpid(p.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(st)
        held = time.time()  # the cut is taken, nothing read yet
        with Vault(vault) as v:
            facts = rpo_facts(v, "vm", now=held)  # a Vault is taken as its store
            assert facts == rpo_facts(v.store, "vm", now=held)
        assert facts.latest_point == first["vm"].id
        assert facts.rpo_seconds == pytest.approx(held - first["vm"].cut_at, abs=1e-6)
    finally:
        os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    with Vault(vault) as v:
        second = newest_point(v, "vm")
        assert first["vm"].created <= second.cut_at <= held <= second.created
        assert v.item("vm").last_success_at == second.created


def test_a_quiesced_read_is_app_consistent_and_its_cut_is_the_quiesce(tmp_path):
    """ext4 with hooks: the writer is paused for the whole read (cut
    "quiesce"). The cut time is after the quiesce hook ran and before the
    reads; the thaw hook runs after the reads, before the point's record:
    created is later than cut_at by at least the time the reads took."""
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("vm", [(random_file(tmp_path / "d.img"), tmp_path / "r.img")],
                  **hooks(tmp_path))
        result, points, jobs = cycle(v, "vm", app_consistent=True)
    p, job = points["vm"], jobs["vm"]
    quiesced, thawed = hook_time(tmp_path, "quiesced"), hook_time(tmp_path, "thawed")
    assert (p.cut, p.consistency, result.consistency) == ("quiesce", "app-consistent",
                                                          "app-consistent")
    assert quiesced <= p.cut_at <= job.started <= thawed <= p.created <= job.ended


def test_a_reflink_cut_is_crash_consistent_and_thaws_before_the_reads(xfs_dir, tmp_path):
    """XFS: every disk is cloned at the cut. Without hooks the point is
    crash-consistent; with them app-consistent, and the thaw hook runs
    right after the clones, before the reads begin (the cut time precedes
    both)."""
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("plain", [(random_file(xfs_dir / "a.img"), xfs_dir / "ra.img")])
        v.protect("hooked", [(random_file(xfs_dir / "b.img"), xfs_dir / "rb.img")],
                  **hooks(tmp_path))
        result, points, _ = cycle(v, "plain")
        assert (points["plain"].cut, points["plain"].consistency, result.consistency) == \
            ("reflink", "crash-consistent", "crash-consistent")
        result, points, jobs = cycle(v, "hooked", app_consistent=True)
    p, job = points["hooked"], jobs["hooked"]
    assert (p.cut, p.consistency, result.consistency) == ("reflink", "app-consistent",
                                                          "app-consistent")
    quiesced, thawed = hook_time(tmp_path, "quiesced"), hook_time(tmp_path, "thawed")
    assert quiesced <= p.cut_at <= thawed <= job.started <= p.created


@pytest.mark.skipif(not QEMU, reason="needs qemu-utils (scripts/bootstrap installs them)")
def test_a_qcow2_bitmap_cut_is_crash_consistent(tmp_path):
    """A qcow2 image with --cbt: the cut starts its next dirty bitmap while
    the image is locked against writers (cut "bitmap"): crash-consistent,
    app-consistent with hooks (the thaw after the reads: the image stays
    locked until then)."""
    img = tmp_path / "os.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("vm", [(img, tmp_path / "r.img")], cbt=True, **hooks(tmp_path))
        for _ in range(2):  # the first (full) cycle and an incremental one
            result, points, _ = cycle(v, "vm")
            assert (points["vm"].cut, points["vm"].consistency, result.consistency) == \
                ("bitmap", "crash-consistent", "crash-consistent")
        result, points, jobs = cycle(v, "vm", app_consistent=True)
    p, job = points["vm"], jobs["vm"]
    assert (p.cut, p.consistency) == ("bitmap", "app-consistent")
    quiesced, thawed = hook_time(tmp_path, "quiesced"), hook_time(tmp_path, "thawed")
    assert quiesced <= p.cut_at <= job.started <= thawed <= p.created


def test_a_group_shares_one_cut_time(tmp_path):
    """The items of a group are cut at one instant: one point id, one cut time."""
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        for n in "ab":
            v.protect(n, [(random_file(tmp_path / f"{n}.img"), tmp_path / f"r{n}.img")],
                      group="g")
        _, points, jobs = cycle(v, ["a", "b"])
    assert points["a"].id == points["b"].id and points["a"].cut_at == points["b"].cut_at
    assert points["a"].cut_at <= min(j.started for j in jobs.values())


class PickledExecutor(LocalExecutor):
    """Runs each item's capture as a fleet's worker does (the capture's task
    function on a plain dict), its argument and result crossing a pickle as
    they cross Dask, and gives the driver what the fleet executor gives it."""

    on_hosts = True

    def __init__(self):
        self.cut_at = {}  # what each task returned

    def run(self, vault, units, opts, finish):
        for unit in units:
            unit.started = True
            outcome = {}
            for name in unit.names:
                fn, argument = unit.capture.task(vault, name, opts)
                vault.update_job(unit.jobs[name], state="running", started=time.time())
                result = pickle.loads(pickle.dumps(fn(pickle.loads(pickle.dumps(argument)))))
                self.cut_at[name] = result["cut_at"]
                outcome[name] = unit.capture.adopt(vault, name, result)
            fleet._unit_done(unit, outcome, finish)


def test_the_cut_time_comes_back_from_a_fleet_task(tmp_path):
    """A fleet task's result carries its cut time to the coordinator, which
    records it: before the task's record, after the previous point's."""
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("vm", [(random_file(tmp_path / "d.img"), tmp_path / "r.img")])
        _, first, _ = cycle(v, "vm")
        executor = PickledExecutor()
        result, points, jobs = cycle(v, "vm", executor=executor)
    p = points["vm"]
    assert p.id == result.point_id == first["vm"].id + 1
    assert p.cut_at == executor.cut_at["vm"] and p.consistency == "inconsistent"
    assert first["vm"].created <= jobs["vm"].started <= p.cut_at <= p.created


# -- the RPO ----------------------------------------------------------------------------

def test_rpo_facts_at_a_given_time(tmp_path):
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("vm", [(random_file(tmp_path / "d.img"), tmp_path / "r.img")])
        assert rpo_facts(v.store, "vm", now=1e9) == RpoFacts(None, None, None, None)
        cycle(v, "vm")
        _, points, _ = cycle(v, "vm")
        p1, p2 = v.store.points("vm")
        assert points["vm"] == p2
        facts = rpo_facts(v.store, "vm", now=p2.cut_at + 90.0)
        assert (facts.latest_point, facts.latest_point_at) == (p2.id, p2.cut_at)
        assert facts.rpo_seconds == pytest.approx(90.0, abs=1e-6)
        assert facts.last_success_at == p2.created >= p2.cut_at
        assert rpo_facts(v.store, "vm", now=p2.cut_at - 5).rpo_seconds == 0.0  # a clock set back
        # the newest point is damaged: the RPO is the age of the newest one that is not
        v.mark_damaged("vm", [p2.id], "a step is gone")
        facts = rpo_facts(v.store, "vm", now=p2.cut_at + 90.0)
        assert (facts.latest_point, facts.latest_point_at) == (p1.id, p1.cut_at)
        assert facts.rpo_seconds == pytest.approx(p2.cut_at + 90.0 - p1.cut_at, abs=1e-6)
        assert facts.last_success_at == p2.created  # that cycle did end well
        st = v.status("vm")
        assert isinstance(st, ItemStatus) and st.latest_point == p1.id
        assert (st.latest_point_at, st.last_success_at) == (utc(p1.cut_at), utc(p2.created))
        assert st.rpo_seconds > 0 and st.damaged_points == (p2.id,)
        assert st.to_dict()["rpo_seconds"] == st.rpo_seconds
        v.mark_damaged("vm", [p1.id], "a step is gone")
        assert rpo_facts(v.store, "vm", now=1e12)[:3] == (None, None, None)  # nothing restorable


def test_rpo_across_failover_commit_and_reprotect(tmp_path):
    """Failed over: the points stay and age (what the running disks write is
    in none). Committed: no point, no RPO (None: unprotected), the last
    success kept. Reprotected: the first point of the other direction."""
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("vm", [(random_file(tmp_path / "d.img"), tmp_path / "r.img")])
        cycle(v, "vm")
        last = newest_point(v, "vm")
        assert v.failover("vm", point=last.id).point == last.id
        later = last.created + 3600.0
        facts = rpo_facts(v.store, "vm", now=later)
        assert facts.latest_point == last.id
        assert facts.rpo_seconds == pytest.approx(later - last.cut_at, abs=1e-6)
        v.commit("vm")
        assert v.item("vm").direction == "reverse"
        assert rpo_facts(v.store, "vm", now=later) == RpoFacts(None, None, None, last.created)
        assert v.points("vm") == [] and v.status("vm").rpo_seconds is None
        v.reprotect("vm")
        new = newest_point(v, "vm")
        facts = rpo_facts(v.store, "vm", now=later)
        assert (facts.latest_point, facts.latest_point_at) == (new.id, new.cut_at)
        assert new.cut_at >= last.created and facts.last_success_at == new.created
        assert v.item("vm").direction == "reverse" and new.consistency == "inconsistent"


# -- the labels -----------------------------------------------------------------------

def test_each_cut_has_an_honest_label():
    assert [consistency_of(c, hooks_ran=False) for c in
            ("reflink", "fleece", "bitmap", "none")] == \
        ["crash-consistent"] * 3 + ["inconsistent"]
    assert [consistency_of(c, hooks_ran=True) for c in
            ("reflink", "fleece", "bitmap", "quiesce")] == ["app-consistent"] * 4
    assert consistency_of("none", hooks_ran=True) == "inconsistent"  # no cut, whatever ran
    assert weakest(["app-consistent", None, "inconsistent", "crash-consistent"]) == "inconsistent"
    assert weakest(["app-consistent", "crash-consistent"]) == "crash-consistent"
    assert weakest([None]) is None


def test_points_and_status_show_the_label_and_the_rpo(tmp_path):
    vault = tmp_path / "v"
    init_vault(vault)
    src = random_file(tmp_path / "d.img")
    assert run_cli("protect", "vm", "--disk", f"{src}={tmp_path / 'r.img'}",
                   "--vault", vault).returncode == 0
    r = run_cli("status", "vm", "--vault", vault)
    assert r.returncode == 0 and b"0 points" in r.stdout and b"newest data" not in r.stdout
    r = run_cli("replicate", "vm", "--vault", vault)
    assert r.returncode == 0 and b"point 1 (inconsistent) for vm" in r.stdout, r.stderr
    r = run_cli("points", "vm", "--vault", vault)
    assert r.returncode == 0
    line, = r.stdout.decode().splitlines()
    assert line.split()[0] == "1" and "inconsistent" in line and "cut: none" in line
    r = run_cli("status", "vm", "--vault", vault)
    assert r.returncode == 0 and b"1 points, newest data " in r.stdout


# -- the migration from schema 8 --------------------------------------------------------

#: the tables as schema 8 made them (pydr.dr.schema before schema 9)
SCHEMA_8 = """
CREATE TABLE items(name TEXT PRIMARY KEY, grp TEXT, state TEXT NOT NULL, direction TEXT NOT NULL,
    health TEXT NOT NULL, retention INTEGER NOT NULL, quiesce_hook TEXT, thaw_hook TEXT,
    created REAL NOT NULL, last_error TEXT, attempts INTEGER NOT NULL DEFAULT 0, next_retry REAL,
    retention_age REAL, test_dir TEXT, failover_point INTEGER, rsh TEXT, remote_pydr TEXT,
    operation TEXT, operation_command TEXT, operation_args TEXT, test_point INTEGER,
    test_method TEXT, host TEXT, failover_dir TEXT);
CREATE TABLE disks(item TEXT NOT NULL REFERENCES items(name) ON DELETE CASCADE,
    idx INTEGER NOT NULL, source TEXT NOT NULL, replica TEXT NOT NULL, tracking TEXT,
    bitmap TEXT, generation INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(item, idx));
CREATE TABLE steps(item TEXT NOT NULL, idx INTEGER NOT NULL, step INTEGER NOT NULL,
    path TEXT NOT NULL, bytes INTEGER NOT NULL, digest TEXT, PRIMARY KEY(item, idx, step));
CREATE TABLE points(id INTEGER NOT NULL,
    item TEXT NOT NULL REFERENCES items(name) ON DELETE CASCADE, created REAL NOT NULL,
    consistency TEXT NOT NULL, bytes INTEGER NOT NULL, cut TEXT NOT NULL, damaged TEXT,
    PRIMARY KEY(id, item));
CREATE TABLE point_disks(id INTEGER NOT NULL, item TEXT NOT NULL, idx INTEGER NOT NULL,
    step INTEGER NOT NULL, PRIMARY KEY(id, item, idx));
CREATE TABLE jobs(id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, item TEXT,
    state TEXT NOT NULL, progress REAL NOT NULL DEFAULT 0,
    bytes_transferred INTEGER NOT NULL DEFAULT 0, started REAL, ended REAL, error TEXT,
    pid INTEGER, method TEXT, host TEXT);
CREATE TABLE plans(name TEXT PRIMARY KEY, definition TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE object_indexes(item TEXT NOT NULL, point INTEGER NOT NULL, store TEXT NOT NULL,
    key TEXT NOT NULL, bytes INTEGER NOT NULL, PRIMARY KEY(item, point));
CREATE TABLE counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters VALUES ('point', 2);
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('vault_id', '0123456789abcdef0123456789abcdef');
"""


def schema_8_vault(directory):
    """A vault as schema 8 wrote it: item "web" with points 1 (created at
    100, read as the disk changed) and 2 (at 200, quiesced, damaged), item
    "db" with none."""
    directory.mkdir(mode=0o700)
    for sub in ("undo", "cache"):
        (directory / sub).mkdir(mode=0o700)
    db = sqlite3.connect(directory / "vault.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA_8)
    for name in ("web", "db"):
        db.execute("INSERT INTO items(name, state, direction, health, retention, created) "
                   "VALUES (?, 'protected', 'forward', 'ok', 24, 1)", (name,))
    db.execute("INSERT INTO points VALUES (1, 'web', 100.0, 'crash-consistent', 5, 'none', NULL)")
    db.execute("INSERT INTO points VALUES (2, 'web', 200.0, 'app-consistent', 5, 'quiesce', 'x')")
    db.execute("PRAGMA user_version=8")
    db.close()
    return directory


def columns(db):
    return {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")]
            for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_a_schema_8_vault_is_migrated(tmp_path):
    """Its points have no cut time (their created stands in), each item's last
    success is its newest point's record, and its tables are those of a new vault."""
    vault = schema_8_vault(tmp_path / "v")
    with Vault(vault) as v:  # a reader migrates too
        assert v.db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION == 13
        assert [(p.id, p.cut_at, p.data_time) for p in v.store.points("web")] == \
            [(1, None, 100.0), (2, None, 200.0)]
        # the Vault's PointInfo: a point without a cut time gives its record time
        assert [(p.id, p.created_at, p.cut_at) for p in v.points("web")] == \
            [(1, utc(100.0), utc(100.0)), (2, utc(200.0), utc(200.0))]
        # read as it changed (cut none): no longer crash-consistent; app-consistent stays
        assert [(p.cut, p.consistency) for p in v.store.points("web")] == \
            [(p.cut, p.consistency) for p in v.points("web")] == \
            [("none", "inconsistent"), ("quiesce", "app-consistent")]
        assert (v.item("web").last_success_at, v.item("db").last_success_at) == (200.0, None)
        assert rpo_facts(v.store, "web", now=160.0) == RpoFacts(1, 100.0, 60.0, 200.0)
        assert rpo_facts(v.store, "db", now=160.0) == RpoFacts(None, None, None, None)
        migrated = columns(v.db)
    init_vault(tmp_path / "new")
    new = sqlite3.connect(tmp_path / "new" / "vault.db")
    try:
        fresh = columns(new)
    finally:
        new.close()
    assert {t: sorted(c) for t, c in migrated.items()} == {t: sorted(c) for t, c in fresh.items()}


def test_a_vault_made_by_schema_8_code_keeps_working(tmp_path):
    """A vault with a point made before schema 9 (set back to 8: the columns
    dropped) opens, replicates, and its next point has a cut time."""
    src = random_file(tmp_path / "d.img")
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("vm", [(src, tmp_path / "r.img")])
        cycle(v, "vm")
    db = sqlite3.connect(tmp_path / "v" / "vault.db")
    db.execute("ALTER TABLE points DROP COLUMN cut_at")
    db.execute("ALTER TABLE items DROP COLUMN last_success_at")
    db.execute("ALTER TABLE disks DROP COLUMN granularity")
    db.execute("ALTER TABLE items DROP COLUMN rpo_health")
    for table in ("policies", "alerts", "doomed_files", "object_stores"):
        db.execute(f"DROP TABLE {table}")
    db.execute("PRAGMA user_version=8")
    db.commit()
    db.close()
    with Vault(tmp_path / "v", writer=True) as v:
        old, = v.store.points("vm")
        assert old.cut_at is None and v.item("vm").last_success_at == old.created
        assert v.points("vm")[0].cut_at == utc(old.created)  # PointInfo: its record time
        random_file(src)
        _, points, _ = cycle(v, "vm")
        new = points["vm"]
        assert new.cut_at is not None and old.created <= new.cut_at <= new.created
        assert rpo_facts(v.store, "vm", now=new.created).latest_point_at == new.cut_at


KILL_IN_MIGRATION = """
import os, signal, sys
from pydr.dr import store

real = store._connect


def connect(path):  # SIGKILL as the migration's last statement starts: its columns are added
    db = real(path)
    db.set_trace_callback(lambda sql: os.kill(os.getpid(), signal.SIGKILL)
                          if sql.startswith("UPDATE items SET last_success_at") else None)
    return db


store._connect = connect
store.Store(sys.argv[1])
"""


def test_a_migration_killed_halfway_leaves_schema_8(tmp_path):
    """The migration is one transaction: killed after its columns were added,
    the vault is schema 8 as it was, and the next open migrates it."""
    vault = schema_8_vault(tmp_path / "v")
    r = subprocess.run([sys.executable, "-c", KILL_IN_MIGRATION, str(vault)], cwd=tmp_path)
    assert r.returncode == -signal.SIGKILL
    db = sqlite3.connect(vault / "vault.db")
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 8
        assert "cut_at" not in columns(db)["points"]
        assert "last_success_at" not in columns(db)["items"]
        assert db.execute("SELECT consistency FROM points WHERE id=1").fetchone()[0] == \
            "crash-consistent"  # its relabelling went with the rest
    finally:
        db.close()
    with Vault(vault) as v:
        assert v.item("web").last_success_at == 200.0
        assert [p.cut_at for p in v.store.points("web")] == [None, None]
        assert [p.cut_at for p in v.points("web")] == [utc(100.0), utc(200.0)]

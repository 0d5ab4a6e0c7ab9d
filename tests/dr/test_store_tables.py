"""The store owns its tables (issue 20):

* no SQL in pydr.dr or pydr.cli outside the store's modules (no allow-list:
  a workflow module asks table methods), and every store module is under
  the import contract "The vault store knows no workflow";
* the store answers typed, read-only records (read by column name), which
  also answer r["column"] and keys() while callers move to attributes;
* what moved out of the store behaves as before: protect's policy records
  nothing when a disk is refused, status and jobs show the same fields;
* what the store now refuses or tolerates: an UPDATE of a column that is
  not there (a bug), a damaged plan definition (exit 14 with its name), a
  file in undo/ITEM/ that is not a step (left for 'pydr vault check')."""

import ast
import json
import os
import pickle
import random
import sqlite3

import pytest

import pydr
from pydr.dr.store_records import (DiskRecord, ItemRecord, JobRecord, PlanRecord,
                                   PointRecord, Record)
from pydr.dr.vault import Vault, init_vault
from pydr.errors import VaultDamaged

from conftest import ROOT, run_cli

DR = os.path.join(ROOT, "pydr", "dr")
CLI = os.path.join(ROOT, "pydr", "cli")

# The store's modules: pydr/dr/store.py, pydr/dr/store_*.py, and these.
STORE_HELPERS = {"schema", "dberrors"}

SQL_WORDS = {"SELECT", "INSERT", "UPDATE", "DELETE", "REPLACE", "BEGIN", "COMMIT", "ROLLBACK",
             "SAVEPOINT", "RELEASE", "PRAGMA", "CREATE", "ALTER", "DROP", "WITH", "VACUUM"}


def _leading_text(node):
    """The text an argument starts with, when the source says it."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _leading_text(node.values[0])
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _leading_text(node.left)
    return None


def sql_statements(source):
    """The line numbers of execute/executemany/executescript calls whose
    first argument is SQL text."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("execute", "executemany", "executescript") and node.args:
            text = _leading_text(node.args[0])
            if text and text.split(None, 1) and text.split(None, 1)[0].upper() in SQL_WORDS:
                lines.append(node.lineno)
    return sorted(lines)


def modules(top):
    """{module name relative to `top` (a.b): path} of the .py files under `top`."""
    found = {}
    for directory, _, files in os.walk(top):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                found[os.path.relpath(path, top)[:-3].replace(os.sep, ".")] = path
    return found


def is_store_module(name):
    return name == "store" or name.startswith("store_") or name in STORE_HELPERS


def sql_outside_the_store():
    """{module: [lines]} of the workflow (pydr.dr) and CLI modules holding SQL."""
    out = {}
    for top, prefix in ((DR, ""), (CLI, "cli.")):
        for name, path in modules(top).items():
            if prefix or not is_store_module(name):
                with open(path) as f:
                    lines = sql_statements(f.read())
                if lines:
                    out[prefix + name] = lines
    return out


def test_the_census_finds_sql_and_only_sql():
    source = '''
def f(db, q, name):
    db.execute("SELECT 1 FROM items WHERE name=?", (name,))
    db.executemany(f"update points SET damaged=? WHERE id=?", [])
    db.execute("BEGIN IMMEDIATE")
    db.execute(
        "  INSERT INTO plans VALUES (?,?,?)" + "", ())
    q.execute("query-block-jobs")
    q.execute("block-export-del", id=1)
    q.execute(name)
'''
    assert sql_statements(source) == [3, 4, 5, 6]


def test_no_sql_outside_the_store():
    found = sql_outside_the_store()
    assert not found, (f"SQL outside the store's modules (add a table method to "
                       f"pydr/dr/store_*.py and call it): {found}")
    # the census looked where the workflow is: every module that held SQL is there
    present = modules(DR)
    for name in ("check", "plans", "tracking", "ownership", "stepdigest", "retry", "hooks",
                 "protection", "report", "cycle", "cyclerecord", "stepcapture", "chunkcapture",
                 "objectstore", "fleet", "points", "failover", "replica_check", "drills", "vault",
                 "scrub", "agent", "pointstores.stepchain", "pointstores.steps",
                 "pointstores.chunkindex"):
        assert name in present, name


def test_every_store_module_is_under_the_store_contract():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    store, = [c for c in contracts if c["name"] == "The vault store knows no workflow"]
    mine = {f"pydr.dr.{m}" for m in modules(DR) if is_store_module(m)}
    assert mine <= set(store["source_modules"]), mine - set(store["source_modules"])
    # what moved out of the store is workflow the store may not import
    assert {"pydr.dr.protection", "pydr.dr.report"} <= set(store["forbidden_modules"])
    assert not mine & set(store["forbidden_modules"])


# -- a small vault ---------------------------------------------------------------

@pytest.fixture
def vault(tmp_path):
    """Item vm (two disks, group g) with two points, and a plan."""
    init_vault(tmp_path / "v")
    disks = []
    for i in range(2):
        src = tmp_path / f"vm-{i}.img"
        src.write_bytes(random.Random(i).randbytes(256 << 10))
        disks.append((str(src), str(tmp_path / f"r-{i}.img")))
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("vm", disks, group="g", retention=5)
        v.replicate("vm")
        with open(disks[0][0], "r+b") as f:
            f.write(b"\x5a" * 8192)
        v.replicate("vm")
        v.create_plan("p", [{"items": ["vm"], "pre": "true", "post": None}])
    return tmp_path / "v"


def test_rows_come_back_as_typed_read_only_records(vault):
    with Vault(vault) as v:
        item, disks, points, jobs = v.item("vm"), v.disks("vm"), v.store.points("vm"), v.store.jobs()
        plan = v.plan("p")
    assert type(item) is ItemRecord and not isinstance(item, sqlite3.Row)
    assert [type(d) for d in disks] == [DiskRecord, DiskRecord]
    assert [type(p) for p in points] == [PointRecord, PointRecord]
    assert {type(j) for j in jobs} == {JobRecord} and type(plan) is PlanRecord
    assert (item.name, item.grp, item.state, item.retention) == ("vm", "g", "protected", 5)
    assert [d.idx for d in disks] == [0, 1] and disks[1].item == "vm"
    assert [p.id for p in points] == [1, 2] and points[0].damaged is None
    assert [j.kind for j in jobs] == ["protect", "replicate", "replicate"]
    assert plan.definition == [{"items": ["vm"], "pre": "true", "post": None}]
    with pytest.raises(AttributeError):
        item.state = "failed-over"
    with pytest.raises(AttributeError):
        del disks[0].replica


def test_records_bridge_the_row_and_dict_reads_of_callers(vault):
    with Vault(vault) as v:
        item, disk, point = v.item("vm"), v.disks("vm")[0], v.store.point("vm", 2)
    for record in (item, disk, point):
        assert record.keys() == list(type(record).__slots__)
        assert all(record[k] == getattr(record, k) for k in record.keys())
        assert dict(record) == record.to_dict() and list(record.to_dict()) == record.keys()
        assert record.get("no_such_column", "absent") == "absent"
        with pytest.raises(KeyError):
            record["no_such_column"]
        with pytest.raises(KeyError):
            record[0]  # a sqlite3.Row answered positions: no caller may rely on it
        assert pickle.loads(pickle.dumps(record)) == record
    assert item["grp"] == "g" and disk["idx"] == 0 and point["id"] == 2
    assert json.loads(json.dumps(point.to_dict()))["item"] == "vm"
    assert disk != DiskRecord(*(disk[k] for k in disk.keys()[:-1]), disk.generation + 1)


def test_a_record_is_made_from_every_column_once():
    with pytest.raises(TypeError):
        PlanRecord("p", [])
    with pytest.raises(TypeError):
        PlanRecord("p", [], 1.0, 2.0)
    with pytest.raises(TypeError):
        PlanRecord("p", [], created=1.0, name="q")
    with pytest.raises(TypeError):
        PlanRecord("p", [], 1.0, extra=2)
    assert PlanRecord("p", [], created=1.0) == PlanRecord(name="p", definition=[], created=1.0)
    assert issubclass(PlanRecord, Record)


def test_records_are_read_by_column_name(vault):
    """A table whose columns are in another order (as migrations leave
    them) gives the same records."""
    with Vault(vault) as v:
        before = v.disks("vm")
    db = sqlite3.connect(vault / "vault.db")
    db.executescript("""
        CREATE TABLE disks2(granularity INTEGER, generation INTEGER NOT NULL DEFAULT 0,
                            bitmap TEXT, tracking TEXT,
                            replica TEXT NOT NULL, source TEXT NOT NULL, idx INTEGER NOT NULL,
                            item TEXT NOT NULL, PRIMARY KEY(item, idx));
        INSERT INTO disks2 SELECT granularity, generation, bitmap, tracking, replica, source,
            idx, item FROM disks;
        DROP TABLE disks;
        ALTER TABLE disks2 RENAME TO disks;
    """)
    db.close()
    with Vault(vault) as v:
        assert v.disks("vm") == before
        assert v.all_disks() == before


def test_an_update_of_a_column_that_is_not_there_is_a_bug(vault):
    with Vault(vault, writer=True) as v:
        with pytest.raises(TypeError, match="no column nope in table items"):
            v.set_item("vm", state="protected", nope=1)
        with pytest.raises(TypeError, match="no column"):
            v.update_job(1, **{"state=NULL, error": "x"})
        assert v.item("vm").state == "protected"


def test_status_shows_the_same_fields_and_jobs_too(vault):
    with Vault(vault) as v:
        st = v.status("vm").to_dict()
        jobs = v.store.jobs()
    assert list(st) == ["type", "version", "item", "state", "direction", "health", "group",
                        "host", "retention", "retention_age", "hooks", "disks", "point_count",
                        "latest_point", "latest_point_at", "rpo_seconds", "last_success_at",
                        "damaged_points", "last_error", "failed_attempts", "next_retry",
                        "test_failover", "test_point", "test_method", "failover_point",
                        "operation", "target_rpo", "rpo_health", "verification"]
    assert (st["target_rpo"], st["rpo_health"]) == (None, "unknown")  # no policy
    assert st["verification"] is None  # not a machine: never verified
    assert (st["item"], st["state"], st["group"], st["point_count"], st["latest_point"]) == \
        ("vm", "protected", "g", 2, 2)
    assert st["hooks"] == {"quiesce": False, "thaw": False} and st["operation"] is None
    assert [d["tracking"] for d in st["disks"]] == [None, None]
    r = run_cli("status", "vm", "--vault", vault, "--json")
    assert r.returncode == 0
    printed = json.loads(r.stdout)  # the same, but for the data's age, measured later
    assert printed["rpo_seconds"] >= st["rpo_seconds"] >= 0
    assert {**printed, "rpo_seconds": None} == {**st, "rpo_seconds": None}
    assert st["latest_point_at"] <= st["last_success_at"]
    r = run_cli("jobs", "--vault", vault, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [list(j) for j in out] == [["type", "version", "id", "kind", "item", "state",
                                       "progress", "bytes_transferred", "started_at",
                                       "ended_at", "error", "pid", "method", "host"]] * len(jobs)
    assert [(j["id"], j["kind"], j["state"]) for j in out] == \
        [(j.id, j.kind, j.state) for j in reversed(jobs)]  # newest first
    r = run_cli("points", "vm", "--vault", vault, "--json")
    assert r.returncode == 0 and [p["id"] for p in json.loads(r.stdout)] == [1, 2]


def test_protect_records_nothing_when_a_disk_is_refused(tmp_path):
    init_vault(tmp_path / "v")
    good = tmp_path / "a.img"
    good.write_bytes(b"\1" * 65536)
    with Vault(tmp_path / "v", writer=True) as v:
        with pytest.raises(FileNotFoundError) as caught:
            v.protect("vm", [(str(good), str(tmp_path / "ra.img")),
                             (str(tmp_path / "missing.img"), str(tmp_path / "rb.img"))])
        assert caught.value.filename == str(tmp_path / "missing.img")
        assert v.items() == [] and v.store.jobs() == [] and v.all_disks() == []
        with pytest.raises(ValueError, match="source disk itself"):
            v.protect("vm", [(str(good), str(good))])
        v.protect("vm", [(str(good), str(tmp_path / "ra.img"))])
        with pytest.raises(pydr.errors.InvalidState, match="already a disk"):
            v.protect("other", [(str(good), str(tmp_path / "rc.img"))])
        assert v.items() == ["vm"] and [j.kind for j in v.store.jobs()] == ["protect"]


def test_a_damaged_plan_definition_is_vault_damage_naming_the_plan(vault):
    db = sqlite3.connect(vault / "vault.db")
    db.execute("UPDATE plans SET definition='[{\"items\": [' WHERE name='p'")
    db.commit()
    db.close()
    with Vault(vault) as v, pytest.raises(VaultDamaged, match="recovery plan 'p' is damaged"):
        v.plan("p")
    r = run_cli("plan", "test-failover", "p", "--to", vault.parent / "drill",
                "--vault", vault)
    assert r.returncode == 14, (r.returncode, r.stderr)
    assert b"'p'" in r.stderr and b"vault.db" in r.stderr


def test_a_plan_name_is_taken_once(vault):
    with Vault(vault, writer=True) as v:
        with pytest.raises(pydr.errors.InvalidState, match="exists already"):
            v.create_plan("p", [{"items": ["vm"]}])
        assert v.plan("p").definition[0]["pre"] == "true"


def test_a_file_in_undo_that_is_not_a_step_does_not_stop_a_writer(vault):
    stray = vault / "undo" / "vm" / "notes.undo"
    stray.write_bytes(b"not pydr's")
    r = run_cli("replicate", "vm", "--vault", vault)
    assert r.returncode == 0, r.stderr  # was: ValueError from the recovery of every writer
    assert stray.read_bytes() == b"not pydr's"
    r = run_cli("vault", "check", vault, "--json")
    problems = json.loads(r.stdout)["problems"]
    assert r.returncode == 14 and [(p["kind"], p["where"]) for p in problems] == \
        [("unknown-file", str(stray))]


def test_the_table_methods_answer_what_the_workflow_asked_in_sql(vault):
    """The methods the workflow's SQL became: steps by range, a point's
    steps, the newest job, a disk's columns, the chunk index's rows, and a
    point recorded in one transaction (all of it, or nothing)."""
    with Vault(vault, writer=True) as v:
        every = [s for s in v.all_steps() if (s.item, s.idx) == ("vm", 0)]
        assert every and v.steps("vm", 0) == every
        at_first = v.point_step("vm", 1, 0)
        assert at_first is not None and v.point_step("vm", 99, 0) is None
        assert v.oldest_point_step("vm", 0) == at_first
        newer = [s.step for s in every if s.step > at_first]
        assert [s.step for s in v.steps("vm", 0, after=at_first, newest_first=True)] == newer[::-1]
        assert [s.step for s in v.steps("vm", 0, upto=at_first)] == \
            [s.step for s in every if s.step <= at_first]
        assert v.last_job("vm").kind == "replicate"
        assert v.last_job("vm", excluding=("replicate",)).kind == "protect"
        assert v.last_job("vm", "materialize") is None
        with pytest.raises(TypeError, match="no column nope in table disks"):
            v.set_disk("vm", 0, nope=1)
        with v.transaction():
            v.add_index("vm", 1, "s3://b/p", "indexes/vm/1.pidx", 10)
            v.add_index("vm", 7, "s3://b/p", "indexes/vm/7.pidx", 20)
        assert v.has_indexes("vm") and v.orphan_index_points("vm") == {7}
        assert v.index_of("vm", 1).key == "indexes/vm/1.pidx" and v.index_of("vm", 2) is None
        assert v.latest_index("vm").point == 7 and [r.point for r in v.index_rows("vm")] == [1, 7]
        v.drop_index_rows("vm", [1, 7])
        assert not v.has_indexes("vm") and v.latest_index("vm") is None

        before = v.store.points("vm")
        with pytest.raises(RuntimeError), v.transaction():
            pid = v.allocate_point_id()
            v.add_point(pid, "vm", created=1.0, consistency="crash", size=0, cut="copy")
            raise RuntimeError("killed before the commit")
        assert v.store.points("vm") == before and v.point_step("vm", pid, 0) is None
        with v.transaction():
            assert v.allocate_point_id() == pid  # the failed one used no id
            v.add_point(pid, "vm", created=1.0, consistency="crash", size=0, cut="copy")
        assert v.point_step("vm", pid, 1) == v.current_step("vm", 1)
        with v.transaction():
            v.drop_points("vm", [pid])
        assert v.store.points("vm") == before and v.point_step("vm", pid, 0) is None


def test_records_read_as_the_dicts_they_replace():
    """A script written when the store answered dicts keeps working: a
    record is a read-only dict of its columns (JSON, membership, items,
    equality with its dict) and pickles by value."""
    import json
    import pickle

    from pydr.dr.store_records import PointRecord

    p = PointRecord(1, "web", 2.0, "crash-consistent", 10, "reflink", None, 1.5)
    assert json.loads(json.dumps(p))["consistency"] == "crash-consistent"
    assert "id" in p and list(p) == list(PointRecord.__slots__) and len(p) == 8
    assert p.cut_at == 1.5 and p.data_time == 1.5  # the data's time is its cut's
    assert PointRecord(1, "web", 2.0, "app-consistent", 10, "quiesce", None, None).data_time == 2.0
    assert p == dict(p) and dict(p.items())["bytes"] == 10 and p.id == 1
    assert pickle.loads(pickle.dumps(p)) == p
    for change in (lambda: p.__setitem__("id", 2), lambda: p.update(id=2), lambda: p.pop("id")):
        with pytest.raises(TypeError, match="read-only"):
            change()
    assert p.id == 1 and p["id"] == 1


def test_cycle_results_pickle_by_value():
    """A CycleResult and its outcomes cross a process boundary (a process
    pool, a worker) as they are."""
    import pickle

    from pydr.dr.cyclerecord import CycleResult, ItemOutcome

    outcome = ItemOutcome("web", "failed", None, "disk not found", 3, 0, False)
    result = CycleResult(None, [], 0, 0, 0.1, "crash-consistent", [], [outcome])
    assert pickle.loads(pickle.dumps(result)) == result


def test_policies_alerts_and_doomed_files_round_trip(tmp_path):
    from pydr.dr.schema import init_vault
    from pydr.dr.store import Store

    init_vault(tmp_path / "v")
    with Store(tmp_path / "v", writer=True) as s:
        assert s.policy_row("item", "web") is None
        s.put_policy("group", "shop", target_rpo=10.0, priority=3)
        s.put_policy("group", "shop", priority=None)
        row = s.policy_row("group", "shop")
        assert (row.target_rpo, row.priority, row.keep) == (10.0, None, None)
        with pytest.raises(TypeError):
            s.put_policy("item", "web", nonsense=1)
        s.add_doomed("web", "/a")
        s.add_doomed("web", "/a")  # once
        assert s.doomed("web") == ["/a"]
        s.drop_doomed("web", "/a")
        assert s.doomed("web") == []
        first = s.add_alert(1.0, "web", None, "warning", 12.0, 10.0, "RPO 12 s > target 10 s")
        s.add_alert(2.0, "web", "warning", "ok", 1.0, 10.0, "back")
        assert [a.id for a in s.alerts(item="web", limit=1)] == [first + 1]
        assert [a.new for a in s.alerts(since=1.5)] == ["ok"]

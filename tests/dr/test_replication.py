"""Vault, replication cycles, recovery points, groups, retention, jobs."""

import fcntl
import json
import os
import random
import signal
import subprocess
import time

import pytest

from pydr.dr.points import materialize
from pydr.dr.replication import replicate
from pydr.dr.vault import Vault, init_vault

from conftest import pydr_command, run_cli, sha
from disks import change, fsck_clean, mkfs


@pytest.fixture
def vault(tmp_path, monkeypatch):
    d = tmp_path / "vault"
    init_vault(d)
    monkeypatch.setenv("PYDR_VAULT", str(d))
    return d


def cli(*args):
    return run_cli(*args, env=dict(os.environ))


def test_cycles_on_ext4_points_are_exact(tmp_path, vault):
    disks = [mkfs(tmp_path, "os"), mkfs(tmp_path, "data", size="32M")]
    pairs = [(d, tmp_path / f"replica-{d.name}") for d in disks]
    args = ["protect", "web", "--retention", "10"]
    for s, r in pairs:
        args += ["--disk", f"{s}={r}"]
    assert cli(*args).returncode == 0
    history = {}
    for cycle in range(4):
        if cycle:
            change(disks[cycle % 2], tmp_path, tag=cycle)
            fsck_clean(disks[cycle % 2])
        r = cli("replicate", "web", "--json")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        if cycle:
            assert res["bytes_written"] < 12 << 20  # the change, not the disks
        for s, rep in pairs:
            assert sha(s) == sha(rep)
        history[res["point_id"]] = [sha(s) for s, _ in pairs]
    points = json.loads(cli("points", "web", "--json").stdout)
    assert [p["id"] for p in points] == sorted(history)
    assert all({"id", "created_at", "cut_at", "consistency"} <= set(p) for p in points)
    for pid, hashes in history.items():
        out = tmp_path / f"point{pid}"
        r = cli("materialize", "web", "--point", pid, "--to", out)
        assert r.returncode == 0, r.stderr
        for (_, rep), h in zip(pairs, hashes):
            copy = out / rep.name
            assert sha(copy) == h, pid
            fsck_clean(copy)
    st = json.loads(cli("status", "web", "--json").stdout)
    assert (st["state"], st["direction"], st["health"]) == ("protected", "forward", "ok")
    jobs = json.loads(cli("jobs", "--json").stdout)[::-1]  # newest first: reversed
    assert [j["kind"] for j in jobs] == ["protect"] + ["replicate"] * 4 + ["materialize"] * 4
    assert [j["id"] for j in jobs] == sorted(j["id"] for j in jobs)
    assert st["point_count"] == 4 and st["latest_point"] == max(history)
    assert 0 <= st["rpo_seconds"] < 3600 and st["latest_point_at"].endswith("Z")
    failed = json.loads(cli("jobs", "--json", "--state", "failed").stdout)
    assert failed == []
    newest = json.loads(cli("jobs", "--json", "--item", "web", "--limit", "2").stdout)
    assert [j["id"] for j in newest] == [jobs[-1]["id"], jobs[-2]["id"]]
    assert all(j["state"] == "succeeded" for j in jobs)
    assert all({"id", "kind", "state", "bytes_transferred"} <= set(j) for j in jobs)


def test_retention_keeps_the_rest_exact(tmp_path, vault):
    src, rep = tmp_path / "s.img", tmp_path / "r.img"
    rng = random.Random(2)
    data = bytearray(rng.randbytes(2 << 20))
    src.write_bytes(bytes(data))
    with Vault(vault, writer=True) as v:
        v.protect("db", [(src, rep)], retention=3)
        history = {}
        for _ in range(7):
            off = rng.randrange(len(data) - 10_000)
            data[off:off + 10_000] = rng.randbytes(10_000)
            src.write_bytes(bytes(data))
            res = replicate(v.store, ["db"])
            history[res.point_id] = sha(src)
        kept = [p.id for p in v.points("db")]
        assert kept == sorted(history)[-3:]
        for pid in kept:
            path, = materialize(v.store, "db", pid, tmp_path / f"m{pid}")
            assert sha(path) == history[pid]
        steps = v.db.execute("SELECT COUNT(*) FROM steps WHERE item='db'").fetchone()[0]
        assert steps == 2  # the oldest kept point needs no step of its own
        with pytest.raises(LookupError):
            materialize(v.store, "db", sorted(history)[0], tmp_path / "gone")


def test_group_shares_point_ids(tmp_path, vault):
    for n in ("a", "b"):
        (tmp_path / f"{n}.img").write_bytes(os.urandom(1 << 20))
        assert cli("protect", n, "--group", "app", "--disk",
                   f"{tmp_path / f'{n}.img'}={tmp_path / f'{n}-r.img'}").returncode == 0
    assert cli("replicate", "--group", "app").returncode == 0
    assert cli("replicate", "a").returncode == 0  # a's group comes along
    ids_a = [p["id"] for p in json.loads(cli("points", "a", "--json").stdout)]
    ids_b = [p["id"] for p in json.loads(cli("points", "b", "--json").stdout)]
    assert ids_a == ids_b and len(ids_a) == 2


def test_app_consistent_hooks(tmp_path, vault):
    (tmp_path / "s.img").write_bytes(os.urandom(1 << 20))
    log = tmp_path / "hooks.log"
    assert cli("protect", "h", "--disk", f"{tmp_path / 's.img'}={tmp_path / 'r.img'}",
               "--quiesce-hook", f"echo freeze >> {log}", "--thaw-hook", f"echo thaw >> {log}").returncode == 0
    assert cli("replicate", "h", "--app-consistent").returncode == 0
    assert log.read_text().split() == ["freeze", "thaw"]
    assert json.loads(cli("points", "h", "--json").stdout)[0]["consistency"] == "app-consistent"


def test_failing_quiesce_hook_makes_no_point(tmp_path, vault):
    (tmp_path / "s.img").write_bytes(os.urandom(1 << 20))
    cli("protect", "h", "--disk", f"{tmp_path / 's.img'}={tmp_path / 'r.img'}",
        "--quiesce-hook", "exit 3", "--thaw-hook", "true")
    r = cli("replicate", "h", "--app-consistent")
    assert r.returncode == 16 and b"quiesce hook" in r.stderr
    assert json.loads(cli("points", "h", "--json").stdout) == []
    assert json.loads(cli("jobs", "--json").stdout)[0]["state"] == "failed"  # newest first


def test_vanished_disk_makes_the_item_critical(tmp_path, vault):
    src = tmp_path / "s.img"
    src.write_bytes(os.urandom(1 << 20))
    cli("protect", "x", "--disk", f"{src}={tmp_path / 'r.img'}")
    assert cli("replicate", "x").returncode == 0
    src.unlink()
    r = cli("replicate", "x")
    assert r.returncode == 3 and str(src).encode() in r.stderr
    st = json.loads(cli("status", "x", "--json").stdout)
    assert st["health"] == "critical" and "not found" in st["last_error"]
    assert len(json.loads(cli("points", "x", "--json").stdout)) == 1


def test_killed_replicate_can_be_continued(tmp_path, vault):
    """SIGKILL a delta cycle while its job runs (stopped where it has
    written a batch to the replica: PYDR_STOP_AT): the next replicate
    finishes the work, the killed job shows as failed, and the earlier
    point is still exact."""
    rng = random.Random(4)
    size = 32 << 20  # stopped at a known write: no need for a cycle long enough to catch
    src, rep = tmp_path / "s.img", tmp_path / "r.img"
    src.write_bytes(os.urandom(size))
    assert cli("protect", "k", "--disk", f"{src}={rep}").returncode == 0
    assert cli("replicate", "k").returncode == 0
    first = sha(src)
    with open(src, "r+b") as f:
        for off in range(0, size, 1 << 20):
            f.seek(off)
            f.write(rng.randbytes(512 << 10))
    p = subprocess.Popen(pydr_command() + ["replicate", "k"], cwd=tmp_path,
                         stderr=subprocess.DEVNULL,
                         env=dict(os.environ, PYDR_STOP_AT="apply.written"))
    try:
        _, how = os.waitpid(p.pid, os.WUNTRACED)  # returns once it stopped itself there
        assert os.WIFSTOPPED(how), "the cycle ended before it reached its first write"
        listed = json.loads(cli("jobs", "--json").stdout)  # listable while it runs
        assert listed[0]["kind"] == "replicate" and listed[0]["state"] == "running"  # newest first
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    r = cli("replicate", "k", "--json")
    assert r.returncode == 0, r.stderr
    assert sha(src) == sha(rep)
    jobs = json.loads(cli("jobs", "--json").stdout)[::-1]  # oldest first
    assert [j["state"] for j in jobs][:4] == ["succeeded", "succeeded", "failed", "succeeded"]
    assert "interrupted" in jobs[2]["error"]
    points = json.loads(cli("points", "k", "--json").stdout)
    out = tmp_path / "m"
    assert cli("materialize", "k", "--point", points[0]["id"], "--to", out).returncode == 0
    assert sha(out / "r.img") == first


def test_bad_input(tmp_path, vault):
    s = tmp_path / "s.img"
    s.write_bytes(os.urandom(1 << 20))
    assert cli("protect", "one", "--disk", f"{s}={tmp_path / 'r.img'}").returncode == 0
    before = sha(vault / "vault.db")
    cases = [
        (["status", "nope"], 3, "no protected item"),
        (["points", "nope"], 3, "no protected item"),
        (["materialize", "one", "--point", "99", "--to", tmp_path / "x"], 3, "no recovery point"),
        (["protect", "two", "--disk", f"{s}={s}"], 2, "is the source disk itself"),
        (["protect", "two", "--disk", f"{tmp_path / 'other.img'}={tmp_path / 'r.img'}"], 3, "not found"),
        (["protect", "one", "--disk", f"{s}={tmp_path / 'q.img'}"], 15, "already protected"),
        (["replicate", "one", "--app-consistent"], 15, "needs quiesce"),
        (["replicate", "--group", "nope"], 3, "no replication group"),
    ]
    (tmp_path / "other.img").write_bytes(b"x")
    cases[4] = (["protect", "two", "--disk", f"{tmp_path / 'other.img'}={tmp_path / 'r.img'}"], 15,
                "already a disk")
    for args, code, needle in cases:
        r = cli(*args)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert needle.encode() in r.stderr and b"Traceback" not in r.stderr, (args, r.stderr)
    assert sha(vault / "vault.db") == before


def test_not_a_vault_and_locked_vault(tmp_path, vault):
    r = run_cli("status", "--vault", tmp_path)
    assert r.returncode == 14 and b"not a pydr vault" in r.stderr
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "vault.db").write_bytes(b"garbage" * 100)
    r = run_cli("status", "--vault", tmp_path / "fake")
    assert r.returncode == 14 and b"Traceback" not in r.stderr
    fd = os.open(vault / "vault.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        (tmp_path / "s.img").write_bytes(b"x" * 4096)
        r = cli("protect", "z", "--disk", f"{tmp_path / 's.img'}={tmp_path / 'r.img'}")
        assert r.returncode == 14 and b"locked" in r.stderr
        assert cli("status").returncode == 0  # readers do not wait for the lock
    finally:
        os.close(fd)



def test_retention_by_age(tmp_path, vault):
    from pydr.dr.points import apply_retention

    src, rep = tmp_path / "s.img", tmp_path / "r.img"
    data = bytearray(os.urandom(1 << 20))
    src.write_bytes(bytes(data))
    r = cli("protect", "aged", "--disk", f"{src}={rep}", "--retention", "10", "--retention-age", "2h")
    assert r.returncode == 0, r.stderr
    with Vault(vault, writer=True) as v:
        history = {}
        for i in range(4):
            data[i * 1000] ^= 1
            src.write_bytes(bytes(data))
            history[replicate(v.store, ["aged"]).point_id] = sha(src)
        now = time.time()
        ages = {1: 5 * 3600, 2: 3 * 3600, 3: 1 * 3600, 4: 60}  # seconds old
        for pid, age in ages.items():
            v.db.execute("UPDATE points SET created=? WHERE item='aged' AND id=?", (now - age, pid))
        apply_retention(v.store, "aged", now=now)
        assert [p.id for p in v.points("aged")] == [3, 4]
        for pid in (3, 4):
            path, = materialize(v.store, "aged", pid, tmp_path / f"m{pid}")
            assert sha(path) == history[pid]
        for pid in (3, 4):  # everything is old now: the newest point stays anyway
            v.db.execute("UPDATE points SET created=? WHERE item='aged' AND id=?", (now - 9e5, pid))
        apply_retention(v.store, "aged", now=now)
        assert [p.id for p in v.points("aged")] == [4]
    assert cli("protect", "bad", "--disk", f"{src}={tmp_path / 'q.img'}", "--retention-age",
               "soon").returncode == 2


def test_vault_object_api(tmp_path):
    init_vault(tmp_path / "v")
    src = tmp_path / "s.img"
    src.write_bytes(os.urandom(300_000))
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("api", [(src, tmp_path / "r.img")])
        first = v.replicate("api")
        src.write_bytes(os.urandom(300_000))
        v.replicate(["api"], retry=True)
        made = v.materialize("api", first.point_id, tmp_path / "m")
        path, = made.paths
        assert (made.operation, made.point, made.method) == ("materialize", 1, made.method)
        assert made.method in ("reflink", "copy")
        assert [p.id for p in v.points("api")] == [1, 2]
        assert v.items() == ["api"] and v.jobs()[0].kind == "materialize"
        assert [j.id for j in v.jobs()] == sorted((j.id for j in v.jobs()), reverse=True)
    assert sha(path) != sha(src)


def test_a_version_1_vault_is_migrated(tmp_path):
    """Vaults written by the first release (schema 1, no remote replicas, no
    operation records) open as the current version with their items, points
    and steps intact."""
    import sqlite3

    from pydr.dr.store import SCHEMA_VERSION
    from pydr.dr.vault import Vault, init_vault

    src = tmp_path / "d.img"
    src.write_bytes(os.urandom(1 << 20))
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        v.protect("vm", [(src, tmp_path / "r.img")], retention=5)
        replicate(v.store, ["vm"])
    db = sqlite3.connect(tmp_path / "v" / "vault.db")  # back to what version 1 wrote
    for column in ("rsh", "remote_pydr", "operation", "operation_command", "operation_args",
                   "test_point", "test_method", "host", "failover_dir"):
        db.execute(f"ALTER TABLE items DROP COLUMN {column}")
    for column in ("tracking", "bitmap", "generation", "granularity"):
        db.execute(f"ALTER TABLE disks DROP COLUMN {column}")
    for column in ("method", "host"):
        db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    db.execute("ALTER TABLE items DROP COLUMN last_success_at")
    db.execute("ALTER TABLE points DROP COLUMN cut_at")
    db.execute("ALTER TABLE points DROP COLUMN damaged")
    db.execute("ALTER TABLE steps DROP COLUMN digest")
    db.execute("DROP TABLE object_indexes")
    db.execute("DROP TABLE meta")
    db.execute("ALTER TABLE items DROP COLUMN rpo_health")
    for table in ("policies", "alerts", "doomed_files", "object_stores"):
        db.execute(f"DROP TABLE {table}")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    owner = tmp_path / ".r.img.pydr-owner"  # nor did version 1 write an owner file or an identity
    owner.unlink()
    (tmp_path / "v" / "cache" / "vm" / "0.replica").unlink()
    with Vault(tmp_path / "v") as v:  # a reader migrates too
        assert v.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 13
        assert v.item("vm")["rsh"] is None and v.item("vm")["operation"] is None
        assert len(v.points("vm")) == 1
        assert v.points("vm")[0].damaged is None and len(v.vault_id()) == 32
        # no cut time was recorded: the point's data reads as its record's time
        record = v.store.points("vm")[0]
        assert record.cut_at is None and record.data_time == record.created
        assert v.points("vm")[0].cut_at == v.points("vm")[0].created_at
        # the migration takes the last success from the point's record (epoch seconds, exact)
        assert v.item("vm").last_success_at == record.created
        assert "digest" in [r["name"] for r in v.db.execute("PRAGMA table_info(steps)")]
    with Vault(tmp_path / "v", writer=True) as v:
        src.write_bytes(os.urandom(1 << 20))
        assert replicate(v.store, ["vm"]).point_id == 2
        assert owner.exists()  # the replica is adopted by its next cycle

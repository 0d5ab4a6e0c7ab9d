"""Fleets on a real Dask cluster: a SpecCluster of Nanny worker processes on
127.0.0.1 emulates hosts (each with its own pydr-host-NAME resource and a
directory of disks); the coordinator is the real `pydr` command.

Worker deaths are made by crash points (PYDR_CRASH_AT with PYDR_CRASH_ONCE,
so that only the first process to pass the point dies): never by timing."""

import json
import logging
import os
import sqlite3
import subprocess

import pytest

import distributed  # noqa: F401  (pydr[fleet], installed by scripts/bootstrap: fails if missing)

from conftest import pydr_command, run_cli, sha
from pydr.dr.vault import Vault

HOSTS = ("hv-a", "hv-b", "hv-c")
DISK = 1 << 20


def make_cluster(hosts, tmp_path, env=None):
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {
        f"w-{h}": {"cls": Nanny, "options": {
            "nthreads": 2, "resources": {f"pydr-host-{h}": 2}, "env": dict(env or {}),
            "host": "127.0.0.1", "local_directory": str(tmp_path / "dask")}}
        for h in hosts}
    return SpecCluster(workers=workers,
                       scheduler={"cls": Scheduler, "options": {"host": "127.0.0.1",
                                                                "dashboard_address": None}},
                       silence_logs=logging.ERROR)


def write_disk(path, seed, size=DISK):
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(rng.randbytes(size // 2))
        f.truncate(size)  # half of it a hole


def scribble(path, seed):
    import random

    rng = random.Random(seed)
    with open(path, "r+b") as f:
        f.seek(rng.randrange(DISK // 4096) * 4096)
        f.write(rng.randbytes(4096))


@pytest.fixture
def fleet(tmp_path):
    """A vault protecting 10 items on each of 3 host directories."""
    vault = tmp_path / "vault"
    assert run_cli("vault", "init", vault).returncode == 0
    items = {}
    for n in range(30):
        host = HOSTS[n % 3]
        src_dir, dst_dir = tmp_path / host, tmp_path / "site-b"
        src_dir.mkdir(exist_ok=True)
        dst_dir.mkdir(exist_ok=True)
        name = f"vm{n:02d}"
        source = src_dir / f"{name}.img"
        write_disk(source, n)
        r = run_cli("protect", name, "--host", host, "--disk", f"{source}={dst_dir / name}.img",
                    "--vault", vault)
        assert r.returncode == 0, r.stderr
        items[name] = {"host": host, "source": str(source), "replica": str(dst_dir / name) + ".img"}
    return {"vault": str(vault), "items": items, "tmp": tmp_path}


def replicate(ctx, address, *extra, env=None):
    return run_cli("replicate", "--all", "--scheduler", address, "--json", *extra,
                   "--vault", ctx["vault"], env=env)


def check_vault(ctx, history):
    """Integrity, one point per cycle per item, each point exact (`history`:
    item -> [sha of the source at each cycle])."""
    db = sqlite3.connect(os.path.join(ctx["vault"], "vault.db"))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    with Vault(ctx["vault"], writer=True) as v:
        for name, shas in history.items():
            points = v.store.points(name)
            assert len(points) == len(shas), name
            for p, want in zip(points, shas):
                out = ctx["tmp"] / "check" / name / str(p["id"])
                paths = v.materialize(name, p["id"], str(out)).paths
                assert sha(paths[0]) == want, (name, p["id"])
            assert v.item(name)["state"] == "protected"


def replicate_jobs(ctx):
    with Vault(ctx["vault"]) as v:
        return [j for j in v.store.jobs() if j["kind"] == "replicate"]


def test_replicate_all_runs_each_item_on_its_host(fleet, tmp_path):
    ctx = fleet
    history = {n: [sha(i["source"])] for n, i in ctx["items"].items()}
    with make_cluster(HOSTS, tmp_path) as cluster:
        r = replicate(ctx, cluster.scheduler_address)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert sorted(out["items"]) == sorted(ctx["items"])
        for n, i in ctx["items"].items():
            if int(n[2:]) % 4 == 0:
                scribble(i["source"], int(n[2:]) + 100)
            history[n].append(sha(i["source"]))
        r = replicate(ctx, cluster.scheduler_address, "--events")
        assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stderr.splitlines()]
    assert all((e["type"], e["version"], e["operation"]) == ("event", 1, "replicate")
               for e in events)
    submitted = [e["item"] for e in events if e["phase"] == "submitted"]
    back = [e["item"] for e in events if e["kind"] == "progress" and e["phase"] == "transfer"
            and e["disk"] is None]
    disks = [e for e in events if e["kind"] == "progress" and e["disk"] is not None]
    done = [e for e in events if e["kind"] == "finished" and e["item"] is not None]
    assert sorted(submitted) == sorted(back) == sorted(e["item"] for e in done) == sorted(
        ctx["items"])
    assert len(disks) == 30 and all(e["bytes_done"] == e["bytes_total"] > 0 for e in disks)
    assert all(e["job"] is not None and e["message"].startswith("point ") for e in done)
    assert not [e for e in events if e["kind"] in ("failed", "cancelled")]
    summary = [e for e in events if e["kind"] == "finished" and e["item"] is None]
    assert len(summary) == 1 and summary[0]["message"].startswith("30 items: 30 succeeded, "
                                                                   "0 failed")
    for n, i in ctx["items"].items():
        assert sha(i["replica"]) == sha(i["source"])
    jobs = replicate_jobs(ctx)
    assert len(jobs) == 60 and all(j["state"] == "succeeded" for j in jobs)
    for j in jobs:  # each item's work ran on a worker of its own host
        assert j["host"] == ctx["items"][j["item"]]["host"], j
    check_vault(ctx, history)
    r = run_cli("status", "--vault", ctx["vault"])
    assert b"vm00 on hv-a: protected" in r.stdout
    r = run_cli("jobs", "--vault", ctx["vault"])
    assert b"on hv-b" in r.stdout


@pytest.mark.parametrize("point", ["apply.written", "agent.disk"])
def test_a_killed_worker_is_restarted_and_its_items_end_once(fleet, tmp_path, point):
    """The Nanny restarts a worker killed in the middle of a cycle's transfer
    (apply.written) or after it, before its result was returned
    (agent.disk); Dask runs the task again, and each item ends with one
    succeeded job and one point per cycle, every point exact."""
    ctx = fleet
    history = {n: [sha(i["source"])] for n, i in ctx["items"].items()}
    with make_cluster(HOSTS, tmp_path) as cluster:
        assert replicate(ctx, cluster.scheduler_address).returncode == 0
    for n, i in ctx["items"].items():
        scribble(i["source"], int(n[2:]) + 7)
        history[n].append(sha(i["source"]))
    marker = tmp_path / "killed"
    env = {"PYDR_CRASH_AT": point, "PYDR_CRASH_ONCE": str(marker)}
    with make_cluster(HOSTS, tmp_path, env=env) as cluster:
        r = replicate(ctx, cluster.scheduler_address, "--host-timeout", "120")
        assert r.returncode == 0, r.stderr
    assert marker.exists()  # a worker did die there
    jobs = replicate_jobs(ctx)
    assert len(jobs) == 60 and all(j["state"] == "succeeded" for j in jobs)
    for n, i in ctx["items"].items():
        assert sha(i["replica"]) == sha(i["source"])
    check_vault(ctx, history)


def start_worker(address, host, tmp_path, env=None):
    """`pydr worker` with no nanny: a worker that does not come back."""
    cmd = pydr_command() + ["worker", "--scheduler", address, "--host", host, "--",
                            "--no-nanny", "--local-directory", str(tmp_path / "dask-lone")]
    return subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_host_without_a_worker_fails_its_items_and_a_rerun_finishes(fleet, tmp_path):
    ctx = fleet
    marker = tmp_path / "killed"
    with make_cluster(HOSTS[:2], tmp_path) as cluster:
        lone = start_worker(cluster.scheduler_address, "hv-c", tmp_path,
                            env={"PYDR_CRASH_AT": "agent.disk", "PYDR_CRASH_ONCE": str(marker)})
        try:
            r = replicate(ctx, cluster.scheduler_address, "--host-timeout", "3")
            assert lone.wait(timeout=120) == -9  # killed at its crash point, not restarted
        finally:
            lone.kill()
        assert r.returncode == 21, r.stderr  # some items failed, the others have their points
        assert b"no worker for host hv-c" in r.stderr
        out = json.loads(r.stdout)
        failed = {o["item"]: o for o in out["outcomes"] if o["status"] == "failed"}
        assert sorted(failed) == sorted(n for n, i in ctx["items"].items() if i["host"] == "hv-c")
        assert all(o["exit_code"] == 20 and o["recoverable"] and "no worker for host hv-c"
                   in o["error"] for o in failed.values())
        assert sorted(out["items"]) == sorted(set(ctx["items"]) - set(failed))
        with Vault(ctx["vault"]) as v:
            for n, i in ctx["items"].items():
                st = v.status(n).to_dict()
                if i["host"] == "hv-c":
                    assert st["point_count"] == 0 and "no worker for host hv-c" in st["last_error"]
                    assert st["operation"] is None or st["operation"]["interrupted"] is False
                else:
                    assert st["point_count"] == 1 and st["health"] == "ok"
        db = sqlite3.connect(os.path.join(ctx["vault"], "vault.db"))
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
        again = start_worker(cluster.scheduler_address, "hv-c", tmp_path)
        try:
            r = replicate(ctx, cluster.scheduler_address, "--host-timeout", "120")
        finally:
            again.terminate()
            again.wait(timeout=60)
        assert r.returncode == 0, r.stderr
    for n, i in ctx["items"].items():
        assert sha(i["replica"]) == sha(i["source"])
    with Vault(ctx["vault"]) as v:
        assert all(v.status(n).to_dict()["health"] == "ok" and v.status(n).to_dict()["point_count"] >= 1
                   for n in ctx["items"])


def test_plan_failover_over_three_hosts_keeps_group_order_and_hooks(fleet, tmp_path):
    ctx = fleet
    log = tmp_path / "hooks.log"
    groups = []
    for g, host in enumerate(HOSTS, 1):
        members = [n for n, i in ctx["items"].items() if i["host"] == host][:3]
        groups += ["--group", ",".join(members), "--pre-hook", f"echo pre{g} >> {log}",
                   "--post-hook", f"echo post{g} >> {log}"]
    r = run_cli("plan", "create", "shop", *groups, "--vault", ctx["vault"])
    assert r.returncode == 0, r.stderr
    planned = [n for n, i in ctx["items"].items() if int(n[2:]) < 9]
    with make_cluster(HOSTS, tmp_path) as cluster:
        assert replicate(ctx, cluster.scheduler_address).returncode == 0
        for n in planned:
            scribble(ctx["items"][n]["source"], int(n[2:]) + 50)  # the last changes
        r = run_cli("plan", "failover", "shop", "--planned", "--scheduler",
                    cluster.scheduler_address, "--events", "--json", "--vault", ctx["vault"])
        assert r.returncode == 0, r.stderr
    assert log.read_text().split() == ["pre1", "post1", "pre2", "post2", "pre3", "post3"]
    events = [json.loads(line) for line in r.stderr.splitlines()]
    starts = [e["message"].split(":")[1].split("(")[0].strip() for e in events
              if e["kind"] == "plan-step" and e["item"] is None]
    assert starts == ["group 1 of 3 started", "group 2 of 3 started", "group 3 of 3 started"]
    report = json.loads(r.stdout)
    assert report["ok"] and all(h["ok"] for s in report["steps"] for h in s["hooks"])
    assert sorted(i for s in report["steps"] for i in s["outcomes"]) == sorted(
        i for s in report["steps"] for i in s["items"])
    assert all(o["type"] == "operation-result" for s in report["steps"]
               for o in s["outcomes"].values())
    last_cycles = [j for j in replicate_jobs(ctx) if j["item"] in planned][-9:]
    for j in last_cycles:  # the planned failover's last cycle ran on the item's host
        assert j["state"] == "succeeded" and j["host"] == ctx["items"][j["item"]]["host"]
    for n in planned:  # the replicas hold the sources' last changes, nothing lost
        assert sha(ctx["items"][n]["replica"]) == sha(ctx["items"][n]["source"])
        with Vault(ctx["vault"]) as v:
            assert v.item(n)["state"] == "failed-over"


def test_fleet_refusals_are_clear(fleet, tmp_path):
    ctx = fleet
    r = replicate(ctx, "tcp://127.0.0.1:1", "--host-timeout", "5")
    assert r.returncode == 20 and b"cannot reach the Dask scheduler at tcp://127.0.0.1:1" in r.stderr
    src = tmp_path / "plain.img"
    write_disk(src, 99)
    assert run_cli("protect", "plain", "--disk", f"{src}={tmp_path}/plain-replica.img",
                   "--vault", ctx["vault"]).returncode == 0
    with make_cluster(HOSTS[:1], tmp_path) as cluster:  # no host: its disk is read here
        r = run_cli("replicate", "plain", "--scheduler", cluster.scheduler_address,
                    "--vault", ctx["vault"])
    assert r.returncode == 0, r.stderr
    assert sha(f"{tmp_path}/plain-replica.img") == sha(src)
    r = run_cli("worker", "--scheduler", "tcp://x:1", "--host", "bad/name")
    assert r.returncode == 2 and b"invalid host name" in r.stderr
    with sqlite3.connect(os.path.join(ctx["vault"], "vault.db")) as db:
        jobs = db.execute("SELECT item, host FROM jobs WHERE kind='replicate'").fetchall()
    assert jobs == [("plain", None)]  # the one it ran, on this machine


def workers_idle(address):
    """Whether no worker runs a task (those of a killed coordinator run on)."""
    from distributed import Client

    with Client(address, timeout=30) as c:
        return sum(c.run(lambda dask_worker: len(dask_worker.state.executing)).values()) == 0


def test_a_killed_coordinator_is_finished_by_running_it_again(fleet, tmp_path):
    """The coordinator dies after it recorded 5 items (fleet.recorded): the
    vault says what was interrupted, and the same command finishes the
    rest; each recorded item keeps its one point, the others get theirs."""
    import time

    ctx = fleet
    with make_cluster(HOSTS, tmp_path) as cluster:
        r = replicate(ctx, cluster.scheduler_address,
                      env={**os.environ, "PYDR_CRASH_AT": "fleet.recorded:5"})
        assert r.returncode == -9
        deadline = time.monotonic() + 120  # a bound on the wait, not an assertion on timing
        while not workers_idle(cluster.scheduler_address):  # the dead client's tasks finish
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with Vault(ctx["vault"]) as v:
            done = [n for n in ctx["items"] if v.store.points(n)]
            assert len(done) == 5
            waiting = [n for n in ctx["items"] if v.status(n).to_dict()["operation"]]
            assert sorted(waiting) == sorted(set(ctx["items"]) - set(done))
            assert all(v.status(n).to_dict()["operation"]["command"].startswith(
                f"pydr replicate {n} --scheduler") for n in waiting)
        r = replicate(ctx, cluster.scheduler_address)
        assert r.returncode == 0, r.stderr
    for i in ctx["items"].values():
        assert sha(i["replica"]) == sha(i["source"])
    with Vault(ctx["vault"]) as v:
        for n, i in ctx["items"].items():
            points = v.store.points(n)
            assert len(points) == (2 if n in done else 1)
            out = tmp_path / "check" / n
            assert sha(v.materialize(n, points[-1]["id"], str(out)).paths[0]) == \
                sha(i["source"])

"""Replicas in S3 object storage, against a real S3 server: OpenStack Swift
with s3api on 127.0.0.1 (tests/s3server.py), started once for the module.
Each test uses a bucket of its own."""

import json
import os
import sqlite3
import uuid

import boto3
import pytest

from conftest import run_cli, sha
from disks import change, fsck_clean, mkfs
from pydr.dr.vault import Vault
from pydr.engine.sealing import OVERHEAD as SEAL_OVERHEAD
from s3server import OTHER_KEY, OTHER_SECRET, swift  # noqa: F401 (swift: the fixture)


PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def s3(swift, tmp_path, monkeypatch):
    """A fresh bucket, the environment that points pydr at it (and the
    passphrase: its stores are encrypted, pydr's default), a vault."""
    env = {**swift.env(), "PYDR_S3_ADDRESSING": "path", "PYDR_PASSPHRASE": PASSPHRASE}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=swift.endpoint, region_name="us-east-1",
                          aws_access_key_id=swift.access_key,
                          aws_secret_access_key=swift.secret_key)
    bucket = f"pydr-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    vault = tmp_path / "vault"
    assert run_cli("vault", "init", vault).returncode == 0
    return {"env": {**os.environ, **env}, "client": client, "bucket": bucket,
            "url": f"s3://{bucket}/dr", "vault": str(vault), "tmp": tmp_path}


def cli(ctx, *args, env=None):
    return run_cli(*args, "--vault", ctx["vault"], env={**ctx["env"], **(env or {})})


def ok(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if r.stdout.strip().startswith((b"{", b"[")) else r.stdout


def keys(ctx, under):
    out, token = [], None
    while True:
        kw = {"Bucket": ctx["bucket"], "Prefix": f"dr/{under}/"}
        if token:
            kw["ContinuationToken"] = token
        page = ctx["client"].list_objects_v2(**kw)
        out += [o["Key"] for o in page.get("Contents", ())]
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def protect(ctx, *images, name="vm"):
    disks = []
    for img in images:
        disks += ["--disk", f"{img}={ctx['url']}"]
    ok(cli(ctx, "protect", name, *disks))


def replicate(ctx, name="vm", env=None):
    return ok(cli(ctx, "replicate", name, "--json", env=env))


def test_cycles_points_and_drills_of_ext4_disks(s3):
    ctx, tmp = s3, s3["tmp"]
    os_disk, data_disk = mkfs(tmp, "os"), mkfs(tmp, "data")
    protect(ctx, os_disk, data_disk)
    history = []
    for cycle in range(3):
        if cycle:
            change(os_disk, tmp, tag=cycle)
            change(data_disk, tmp, tag=cycle + 10)
        r = replicate(ctx)
        history.append((r["point_id"], sha(os_disk), sha(data_disk), r["bytes_written"]))
    # each change writes 6 MiB of random data per disk (incompressible): a later cycle
    # uploads that, rounded to chunks, and not the two 64 MiB disks
    assert all(12 << 20 <= h[3] < 48 << 20 for h in history[1:]), history
    for pid, want_os, want_data, _ in history:
        out = tmp / f"point{pid}"
        r = ok(cli(ctx, "materialize", "vm", "--point", str(pid), "--to", out, "--json"))
        assert r["method"] == "download"
        assert sha(out / "os.img") == want_os and sha(out / "data.img") == want_data
        fsck_clean(out / "os.img")
        fsck_clean(out / "data.img")
    drill = tmp / "drill"
    ok(cli(ctx, "test-failover", "vm", "--to", drill, "--point", str(history[0][0])))
    assert sha(drill / "os.img") == history[0][1]
    fsck_clean(drill / "data.img")
    assert os.stat(drill / "os.img").st_blocks * 512 < os.path.getsize(drill / "os.img")  # holes
    ok(cli(ctx, "cleanup-test-failover", "vm"))
    assert not drill.exists()
    report = ok(cli(ctx, "verify", "vm", "--json"))
    assert report["points"] == 3 and report["problems"] == [] and report["checked"] > 0
    status = ok(cli(ctx, "status", "vm", "--json"))
    assert status["state"] == "protected" and status["point_count"] == 3


def test_equal_chunks_are_stored_once_across_points_and_disks(s3):
    ctx, tmp = s3, s3["tmp"]
    a, b = tmp / "a.img", tmp / "b.img"
    data = os.urandom(12 << 20)  # three 4 MiB chunks, on both disks
    for img in (a, b):
        with open(img, "wb") as f:
            f.write(data)
            f.truncate(64 << 20)  # the rest zeros: not stored
    protect(ctx, a, b)
    replicate(ctx)
    assert len(keys(ctx, "chunks")) == 3
    again = replicate(ctx)  # nothing changed: nothing uploaded, a new point all the same
    assert again["bytes_written"] == 0 and len(keys(ctx, "indexes")) == 2
    with open(a, "r+b") as f:
        f.seek(5 << 20)
        f.write(os.urandom(4096))
    third = replicate(ctx)
    assert len(keys(ctx, "chunks")) == 4  # one changed chunk of one disk
    assert 4 << 20 <= third["bytes_written"] <= 1.1 * (4 << 20) + 4096


#: the durable steps of a cycle to an object store, each killed once below
KILLED_AT = ["s3.chunk:6", "cycle.cut", "cycle.disk", "s3.index", "cycle.point", "cycle.done"]


@pytest.mark.parametrize("point", KILLED_AT)
def test_a_killed_cycle_is_finished_by_running_it_again(s3, point):
    """Killed at each step of a cycle: the rerun finishes it, uploads no
    chunk twice, leaves no index that no point names, and every point is
    exact."""
    ctx, tmp = s3, s3["tmp"]
    img = tmp / "disk.img"
    with open(img, "wb") as f:
        f.write(os.urandom(40 << 20))  # ten chunks
    protect(ctx, img)
    r = cli(ctx, "replicate", "vm", env={"PYDR_CRASH_AT": point})
    assert r.returncode == -9
    recorded = ok(cli(ctx, "points", "vm", "--json"))
    if point in ("s3.chunk:6", "cycle.cut", "cycle.disk"):
        assert len(keys(ctx, "indexes")) == 0  # the index comes only after every chunk
    uploaded = len(keys(ctx, "chunks"))
    st = ok(cli(ctx, "status", "vm", "--json"))
    if not recorded:
        assert st["operation"]["interrupted"]
        assert st["operation"]["command"] == "pydr replicate vm"
    r = replicate(ctx)
    if point == "s3.chunk:6":
        assert 6 <= uploaded <= 10  # chunks in flight beside the 6th may have landed too
        # not sent again: a chunk object is its header, 4 MiB and its seal's envelope
        assert r["bytes_written"] <= (10 - 6) * ((4 << 20) + 64 + SEAL_OVERHEAD)
    elif uploaded == 10:  # every upload was done and logged before the kill
        assert r["bytes_written"] == 0
    assert len(keys(ctx, "chunks")) == 10
    with Vault(ctx["vault"]) as v:
        recorded = {row["key"] for row in v.db.execute("SELECT key FROM object_indexes")}
        assert len(v.store.points("vm")) == len(recorded) == (2 if point in ("cycle.point",
                                                                       "cycle.done") else 1)
    assert set(keys(ctx, "indexes")) == recorded  # no orphan index
    out = tmp / "out"
    ok(cli(ctx, "materialize", "vm", "--point", str(r["point_id"]), "--to", out))
    assert sha(out / "disk.img") == sha(img)
    left = os.listdir(os.path.join(ctx["vault"], "objects", "vm"))
    assert "pending" not in left and len(left) == 2  # the new point's signature and index
    assert len({f.partition(".")[0] for f in left}) == 1


def test_gc_during_a_cycle_loses_nothing_and_sweeps_what_no_point_names(s3):
    ctx, tmp = s3, s3["tmp"]
    img = tmp / "disk.img"
    with open(img, "wb") as f:
        f.write(os.urandom(16 << 20))
    protect(ctx, img)
    replicate(ctx)
    with open(img, "r+b") as f:
        f.write(os.urandom(8 << 20))  # two new chunks
    import subprocess

    from conftest import pydr_command

    cycle = subprocess.Popen(pydr_command() + ["replicate", "vm", "--vault", ctx["vault"]],
                             env={**ctx["env"], "PYDR_STOP_AT": "cycle.disk"}, cwd=tmp,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        import signal
        import time

        deadline = time.monotonic() + 120  # a bound on the wait, not an assertion on timing
        while True:  # until the cycle stops itself at its crash point
            with open(f"/proc/{cycle.pid}/stat") as f:
                if f.read().split(") ")[1].startswith("T"):
                    break
            assert cycle.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        # the cycle has uploaded its new chunks, and no index names them yet
        report = ok(cli(ctx, "gc", "vm", "--json"))
        assert report["swept"] == 0 and report["young"] == 2
        os.kill(cycle.pid, signal.SIGCONT)
        assert cycle.wait(timeout=120) == 0, cycle.stderr.read()
    finally:
        if cycle.poll() is None:
            cycle.kill()
    assert ok(cli(ctx, "verify", "vm", "--json"))["problems"] == []
    # retention drops the first point: its index goes, then gc sweeps its chunks
    with sqlite3.connect(os.path.join(ctx["vault"], "vault.db")) as db:
        db.execute("UPDATE items SET retention=1 WHERE name='vm'")
    third = replicate(ctx)
    assert len(keys(ctx, "indexes")) == 1
    before = len(keys(ctx, "chunks"))
    report = ok(cli(ctx, "gc", "vm", "--grace", "0", "--json"))
    assert report["swept"] == 2 and len(keys(ctx, "chunks")) == before - 2
    out = tmp / "out"
    ok(cli(ctx, "materialize", "vm", "--point", str(third["point_id"]), "--to", out))
    assert sha(out / "disk.img") == sha(img)


def test_a_corrupt_or_missing_chunk_is_caught_and_nothing_wrong_is_written(s3):
    ctx, tmp = s3, s3["tmp"]
    img = tmp / "disk.img"
    with open(img, "wb") as f:
        f.write(os.urandom(12 << 20))
    protect(ctx, img)
    pid = replicate(ctx)["point_id"]
    victim, gone = sorted(keys(ctx, "chunks"))[:2]
    body = bytearray(ctx["client"].get_object(Bucket=ctx["bucket"], Key=victim)["Body"].read())
    body[-100] ^= 0xFF
    ctx["client"].put_object(Bucket=ctx["bucket"], Key=victim, Body=bytes(body))
    ctx["client"].delete_object(Bucket=ctx["bucket"], Key=gone)
    out = tmp / "out"
    r = cli(ctx, "materialize", "vm", "--point", str(pid), "--to", out)
    assert r.returncode == 7, r.stderr
    named = [k.rpartition("/")[2] for k in (victim, gone)]
    assert any(n.encode() in r.stderr for n in named)
    assert not (out / "disk.img").exists() and not list(out.glob("*.pydr-new"))
    r = cli(ctx, "verify", "vm", "--json")
    assert r.returncode == 7
    problems = json.loads(r.stdout)["problems"]
    # sealed (the store is encrypted): the flipped byte fails the chunk's authentication
    assert any(named[0] in p and "fails authentication" in p for p in problems), problems
    assert any(named[1] in p and "missing" in p for p in problems)


def test_wrong_keys_and_a_missing_bucket_are_clear_and_not_retried(s3):
    ctx, tmp = s3, s3["tmp"]
    img = tmp / "disk.img"
    with open(img, "wb") as f:
        f.write(os.urandom(1 << 20))
    protect(ctx, img)
    r = cli(ctx, "replicate", "vm", "--retry", "--max-attempts", "3",
            env={"AWS_SECRET_ACCESS_KEY": "wrong"})
    assert r.returncode == 4 and b"refused the credentials" in r.stderr, r.stderr
    st = ok(cli(ctx, "status", "vm", "--json"))
    assert st["health"] == "critical" and st["failed_attempts"] == 0  # not retried
    r = cli(ctx, "replicate", "vm", env={"AWS_ACCESS_KEY_ID": OTHER_KEY,
                                         "AWS_SECRET_ACCESS_KEY": OTHER_SECRET})
    # another account's good keys: Swift's buckets are per account, so it has none by that name
    assert r.returncode == 3 and b"no such bucket" in r.stderr, r.stderr
    src2 = tmp / "two.img"
    with open(src2, "wb") as f:
        f.write(os.urandom(1 << 20))
    # protect opens (or makes) the store: a bucket that is not there is said at once
    r = cli(ctx, "protect", "lost", "--disk", f"{src2}=s3://pydr-no-such-bucket/x")
    assert r.returncode == 3 and b"no such bucket" in r.stderr, r.stderr
    r = cli(ctx, "protect", "lost", "--disk", f"{src2}={ctx['url']}/lost",
            env={"AWS_SECRET_ACCESS_KEY": "wrong"})
    assert r.returncode == 4 and b"refused the credentials" in r.stderr, r.stderr
    with Vault(ctx["vault"]) as v:
        assert "lost" not in v.items() and v.object_store("s3://pydr-no-such-bucket/x") is None
        assert v.object_store(f"{ctx['url']}/lost") is None
    assert keys(ctx, "lost") == []
    # a bucket gone after protect: its cycle says so
    gone = f"pydr-{uuid.uuid4().hex[:12]}"
    ctx["client"].create_bucket(Bucket=gone)
    ok(cli(ctx, "protect", "lost", "--disk", f"{src2}=s3://{gone}/x"))
    for o in ctx["client"].list_objects_v2(Bucket=gone).get("Contents", ()):
        ctx["client"].delete_object(Bucket=gone, Key=o["Key"])  # its config and key
    ctx["client"].delete_bucket(Bucket=gone)
    r = cli(ctx, "replicate", "lost")
    assert r.returncode == 3 and b"no such bucket" in r.stderr, r.stderr
    assert replicate(ctx)["point_id"]  # the right keys work
    with Vault(ctx["vault"]) as v:
        assert v.status("vm").to_dict()["health"] == "ok"


def test_failover_from_the_store_then_failback_to_site_a(s3):
    """Failover downloads a point into --to DIR; site B works there; commit
    drops the indexes; reprotect and failback move only differences back."""
    ctx, tmp = s3, s3["tmp"]
    disk = mkfs(tmp, "app")
    protect(ctx, disk)
    first = replicate(ctx)["point_id"]
    at_first = sha(disk)
    change(disk, tmp, tag=1)
    replicate(ctx)
    r = cli(ctx, "failover", "vm", "--point", str(first))
    assert r.returncode == 2 and b"--to DIR" in r.stderr
    site_b = tmp / "site-b"
    r = ok(cli(ctx, "failover", "vm", "--point", str(first), "--to", site_b, "--json"))
    assert r["method"] == "download" and sha(site_b / "app.img") == at_first
    fsck_clean(site_b / "app.img")
    latest = ok(cli(ctx, "points", "vm", "--json"))[-1]["id"]
    ok(cli(ctx, "change-point", "vm", "--point", str(latest)))
    assert sha(site_b / "app.img") == sha(disk)
    change(site_b / "app.img", tmp, tag=2)  # the machine works at site B
    r = ok(cli(ctx, "commit", "vm", "--json"))
    assert any("point indexes" in n for n in r["notes"])
    assert keys(ctx, "indexes") == []
    ok(cli(ctx, "reprotect", "vm"))
    ok(cli(ctx, "failback", "vm"))
    assert sha(disk) == sha(site_b / "app.img")  # site A has site B's last state
    fsck_clean(disk)
    report = ok(cli(ctx, "gc", ctx["url"], "--grace", "0", "--json"))
    assert report["indexes"] == 0 and report["swept"] == report["chunks"] > 0
    assert keys(ctx, "chunks") == []

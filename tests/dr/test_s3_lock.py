"""Immutable points: S3 versions and Object Lock (pydr.dr.objectlock,
docs/FORMAT.md "Object Lock and versions") against a real S3 server that
implements them, SeaweedFS on 127.0.0.1 (tests/seaweed.py), started once
for the module. Each test has a bucket of its own; the attacker holds the
same credentials as pydr."""

import json
import os
import uuid

import pytest

from conftest import run_cli, sha
from pydr.endpoints.s3 import ObjectStore
from pydr.engine.sealing import OVERHEAD
from seaweed import seaweed  # noqa: F401 (the fixture)

MiB = 1 << 20
DAY = 86400.0



def _ctx(seaweed, tmp_path, monkeypatch, *, lock=True):
    env = {**seaweed.env(), "PYDR_PASSPHRASE": "correct horse battery staple"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = f"pydr-{uuid.uuid4().hex[:12]}"
    client = seaweed.client()
    client.create_bucket(Bucket=bucket, **({"ObjectLockEnabledForBucket": True} if lock else {}))
    tmp = tmp_path / ("locked" if lock else "plain")
    tmp.mkdir()
    vault = tmp / "vault"
    assert run_cli("vault", "init", vault).returncode == 0
    return {"env": {**os.environ, **env}, "client": client, "bucket": bucket,
            "url": f"s3://{bucket}/dr", "vault": str(vault), "tmp": tmp,
            "objects": ObjectStore(f"s3://{bucket}/dr")}


@pytest.fixture
def s3(seaweed, tmp_path, monkeypatch):
    """A fresh bucket with Object Lock (so versions), a vault, the environment."""
    return _ctx(seaweed, tmp_path, monkeypatch)


@pytest.fixture
def plain(seaweed, tmp_path, monkeypatch):
    """A fresh bucket without Object Lock or versions."""
    return _ctx(seaweed, tmp_path, monkeypatch, lock=False)


def cli(ctx, *args, env=None):
    return run_cli(*args, "--vault", ctx["vault"], env={**ctx["env"], **(env or {})})


def ok(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if r.stdout.strip().startswith((b"{", b"[")) else r.stdout


def disk(ctx, name="disk.img", chunks=5, size=48 * MiB):
    """A disk of `chunks` random 4 MiB chunks, then zeros."""
    img = ctx["tmp"] / name
    with open(img, "wb") as f:
        f.write(os.urandom(chunks * 4 * MiB))
        f.truncate(size)
    return img


def scribble(img, chunk):
    """New random bytes in one 4 MiB chunk of the disk."""
    with open(img, "r+b") as f:
        f.seek(chunk * 4 * MiB + 12345)
        f.write(os.urandom(8192))


def versions(ctx, under):
    return list(ctx["objects"].versions(under))


def test_a_lock_is_refused_where_it_cannot_hold(s3, plain):
    img = disk(plain)
    r = cli(plain, "protect", "vm", "--disk", f"{img}={plain['url']}", "--lock", "7")
    assert r.returncode == 15, r.stderr  # the bucket's state (InvalidState), with a hint
    assert plain["bucket"].encode() in r.stderr and b"Object Lock" in r.stderr
    assert b"made with Object Lock enabled" in r.stderr
    assert ok(cli(plain, "status", "--json")) == []  # nothing recorded
    r = cli(plain, "protect", "vm", "--disk", f"{img}={plain['tmp'] / 'replica.img'}",
            "--lock", "7")
    assert r.returncode == 10 and b"object store" in r.stderr
    ok(cli(plain, "protect", "vm", "--disk", f"{img}={plain['url']}"))
    r = cli(plain, "policy", "vm", "--lock", "7", "--json")
    assert r.returncode == 15 and plain["bucket"].encode() in r.stderr
    assert ok(cli(plain, "policy", "vm", "--json"))["policy"]["lock_days"] is None
    r = cli(s3, "protect", "vm", "--disk", f"{img}={s3['url']}", "--lock", "-1")
    assert r.returncode != 0 and b"--lock" in r.stderr


def _protect_locked(ctx, img, *extra):
    ok(cli(ctx, "protect", "vm", "--disk", f"{img}={ctx['url']}", "--lock", "1", *extra))


def test_every_object_of_a_locked_point_is_put_with_its_lock_and_named_by_version(s3):
    img = disk(s3)
    _protect_locked(s3, img)
    policy = ok(cli(s3, "policy", "vm", "--json"))["policy"]
    assert policy["lock_days"] == 1 and policy["lock_mode"] == "compliance"
    ok(cli(s3, "replicate", "vm", "--json"))
    chunks = [v for v in versions(s3, "chunks") if not v[3]]
    indexes = [v for v in versions(s3, "indexes") if not v[3]]
    assert len(chunks) == 5 and len(indexes) == 1
    for key, version, *_ in chunks + indexes:
        head = s3["objects"].head(key, version)
        assert head["lock_mode"] == "compliance"
        # one day and the slack (a day: 10% of one day is less)
        assert 2 * DAY - 120 < head["retain_until"] - head["modified"] <= 2 * DAY + 2
        assert s3["objects"].delete_versions([(key, version)]) == [(key, version, "AccessDenied")]
    from pydr.dr.vault import Vault

    with Vault(s3["vault"]) as v:
        row = v.store.latest_index("vm")
    assert (row.key, row.version) == (indexes[0][0], indexes[0][1])
    assert abs(row.retain_until - s3["objects"].head(row.key, row.version)["retain_until"]) < 2


def test_a_reused_chunk_is_extended_once_per_slack(s3):
    img = disk(s3, chunks=2)
    _protect_locked(s3, img)
    ok(cli(s3, "replicate", "vm"))
    (key, version), = [(k, v) for k, v, *_ in versions(s3, "chunks")][:1]
    first = s3["objects"].head(key, version)["retain_until"]
    ok(cli(s3, "replicate", "vm"))  # within the slack: its lock lasts long enough
    assert s3["objects"].head(key, version)["retain_until"] == first
    ok(cli(s3, "policy", "vm", "--lock", "3"))  # now it ends before a new point's would
    ok(cli(s3, "replicate", "vm"))
    extended = s3["objects"].head(key, version)["retain_until"]
    assert extended >= first + 2 * DAY - 120
    assert len([v for v in versions(s3, "chunks") if not v[3]]) == 2  # extended, not uploaded
    ok(cli(s3, "replicate", "vm"))
    assert s3["objects"].head(key, version)["retain_until"] == extended


def _store_objects(ctx):
    """(key, version) of every version of the store's config and key files."""
    return [(k, v) for k, v, _, marker, _, _ in ctx["objects"].versions_of("dr/config")
            + versions(ctx, "keys") if not marker]


def _attack(ctx):
    """With pydr's own credentials: try to delete every version of every
    chunk, index, key file and of the config; then delete every key (delete
    markers), put junk over every chunk key and one index key, and another
    store's config over the config."""
    c, bucket = ctx["client"], ctx["bucket"]
    everything = [(k, v) for k, v, _, marker, _, _ in versions(ctx, "chunks")
                  + versions(ctx, "indexes") if not marker]
    keyring = _store_objects(ctx)
    refused = ctx["objects"].delete_versions(everything + keyring)
    indexes = sorted({k for k, _ in everything if "/indexes/" in k})
    for key in sorted({k for k, _ in everything}):
        c.delete_object(Bucket=bucket, Key=key)
        if "/chunks/" in key or key == indexes[0]:
            c.put_object(Bucket=bucket, Key=key, Body=b"ransom note " * 100)
    for key in ["dr/config"] + [k for k, *_ in versions(ctx, "keys")]:
        c.delete_object(Bucket=bucket, Key=key)
    config = json.loads(ctx["objects"].get("dr/config", keyring[0][1]))
    c.put_object(Bucket=bucket, Key="dr/config",
                 Body=json.dumps({**config, "id": "ab" * 16}).encode())
    return refused, keyring


def test_locked_points_survive_an_attacker_with_the_same_credentials(s3):
    img = disk(s3, chunks=6)
    _protect_locked(s3, img)
    points = []
    for cycle in range(3):
        if cycle:
            scribble(img, cycle)
        r = ok(cli(s3, "replicate", "vm", "--json"))
        points.append((r["point_id"], sha(img)))
    refused, keyring = _attack(s3)
    assert refused and all(code == "AccessDenied" for *_, code in refused)
    assert {(k, v) for k, v, _ in refused} >= set(keyring)  # the keys' versions are locked too
    assert len(keyring) == 2  # the config and the passphrase key
    r = cli(s3, "verify", "vm", "--json")
    assert r.returncode == 7, r.stderr
    report = json.loads(r.stdout)
    assert report["problems"] == [] and report["damaged_points"] == []
    tampered = {(t["kind"], t["what"]) for t in report["tampered"]}
    assert tampered == {("index", "deleted"), ("index", "overwritten"), ("chunk", "overwritten"),
                        ("config", "overwritten"), ("key", "deleted")}
    assert {p for t in report["tampered"] if t["kind"] == "index" for p in t["points"]} \
        == {p for p, _ in points}
    store_findings = [t for t in report["tampered"] if t["kind"] in ("config", "key")]
    assert len(store_findings) == 2 and all(
        set(t["points"]) == {p for p, _ in points} for t in store_findings)
    assert any(f"names store {'ab' * 16}" in t["text"] for t in store_findings)
    chunk_keys = {k for k, *_ in versions(s3, "chunks")}
    assert {t["object"].partition(f"{s3['bucket']}/")[2] for t in report["tampered"]
            if t["kind"] == "chunk"} == chunk_keys
    r = cli(s3, "verify", "vm")
    assert r.returncode == 7 and b"tampered" in r.stdout and b"overwritten" in r.stdout
    assert b"config overwritten" in r.stdout and b"deleted" in r.stdout
    for pid, want in points:
        out = s3["tmp"] / f"point{pid}"
        ok(cli(s3, "materialize", "vm", "--point", str(pid), "--to", out))
        assert sha(out / "disk.img") == want
    report = ok(cli(s3, "gc", "vm", "--grace", "0", "--json"))
    # the attacker's version of every chunk key (6 first chunks, 2 changed), none of ours
    assert report["versions"] and report["swept"] == len(chunk_keys) == 8
    assert report["foreign"] == 1 and report["indexes"] == 3  # the ransom note over an index
    scribble(img, 4)  # the next cycle reads its chunks by version, and stays exact
    r = ok(cli(s3, "replicate", "vm", "--json"))
    out = s3["tmp"] / "after"
    ok(cli(s3, "materialize", "vm", "--point", str(r["point_id"]), "--to", out))
    assert sha(out / "disk.img") == sha(img)
    # the cycle put the recorded config back, locked, and says what it found
    assert s3["objects"].get("dr/config") == s3["objects"].get("dr/config", keyring[0][1])
    head = s3["objects"].head("dr/config")
    assert head["lock_mode"] == "compliance" and head["retain_until"] > head["modified"] + DAY
    status = ok(cli(s3, "status", "vm", "--json"))
    assert status["health"] == "warning", status
    assert s3["url"] in status["last_error"] and "config was put back" in status["last_error"]
    assert "config overwritten" in status["last_error"]
    r = cli(s3, "verify", "vm", "--json")  # the chunks' and indexes' tampering stays on record
    report = json.loads(r.stdout)
    assert r.returncode == 7 and report["problems"] == [], r.stderr
    assert "config" not in {t["kind"] for t in report["tampered"]}  # put back


def test_the_config_and_keys_of_a_locked_store_are_locked_and_so_are_keys_added_later(s3,
                                                                                        tmp_path):
    img = disk(s3, chunks=1)
    _protect_locked(s3, img)
    ok(cli(s3, "replicate", "vm"))
    keyring = _store_objects(s3)
    assert len(keyring) == 2
    for key, version in keyring:
        head = s3["objects"].head(key, version)
        assert head["lock_mode"] == "compliance"
        assert 2 * DAY - 120 < head["retain_until"] - head["modified"] <= 2 * DAY + 2
    assert s3["objects"].delete_versions(keyring) == [(k, v, "AccessDenied") for k, v in keyring]
    before = {k: s3["objects"].head(k, v)["retain_until"] for k, v in keyring}
    ok(cli(s3, "replicate", "vm"))  # within the slack: not extended again
    assert {k: s3["objects"].head(k, v)["retain_until"] for k, v in keyring} == before
    new = tmp_path / "new-passphrase"
    new.write_text("a second passphrase\n")
    added = ok(cli(s3, "key", "add", s3["url"], "--new-passphrase-file", new, "--json"))
    (key, version), = [(k, v) for k, v in _store_objects(s3) if added["id"] in k]
    head = s3["objects"].head(key, version)
    assert head["lock_mode"] == "compliance"
    assert head["retain_until"] == s3["objects"].head("dr/config")["retain_until"]
    r = cli(s3, "key", "remove", s3["url"], added["id"])
    assert r.returncode == 15, r.stderr
    assert b"until 20" in r.stderr and b"what the lock is for" in r.stderr, r.stderr
    assert s3["objects"].head(key) is None  # a delete marker on it; the locked version stays
    assert s3["objects"].head(key, version) is not None
    # a new passphrase: the new key is put (locked) before the old one is removed
    old = [k for k, _ in keyring if "/keys/" in k][0]
    r = cli(s3, "key", "passwd", s3["url"], "--new-passphrase-file", new)
    assert r.returncode == 15 and b"what the lock is for" in r.stderr, r.stderr
    assert s3["objects"].head(old) is None and s3["objects"].head(old, keyring[1][1])
    current = [k for k, _, _ in s3["objects"].list("keys")]
    assert len(current) == 1 and s3["objects"].head(current[0])["lock_mode"] == "compliance"
    ok(cli(s3, "verify", "vm", env={"PYDR_PASSPHRASE": "a second passphrase"}))


def test_retention_and_gc_skip_locked_objects_and_finish(s3):
    img = disk(s3, chunks=3)
    _protect_locked(s3, img, "--retention", "1")
    r = cli(s3, "replicate", "vm", env={"PYDR_CRASH_AT": "s3.chunk:2"})
    assert r.returncode == -9  # two locked chunks no point will ever name
    with open(img, "wb") as f:
        f.write(os.urandom(12 * MiB))
        f.truncate(48 * MiB)
    ok(cli(s3, "replicate", "vm"))
    scribble(img, 0)
    ok(cli(s3, "replicate", "vm"))  # retention drops the first point: its index is locked
    status = ok(cli(s3, "status", "vm", "--json"))
    assert status["health"] == "ok" and status["point_count"] == 1, status
    indexes = [v for v in versions(s3, "indexes") if not v[3]]
    assert len(indexes) == 2  # the dropped point's index stays, locked
    from pydr.dr.vault import Vault

    with Vault(s3["vault"]) as v:
        assert len(v.store.index_rows("vm")) == 2  # its row too, for a later retention
        assert len(v.store.orphan_index_points("vm")) == 1
    dry = ok(cli(s3, "gc", "vm", "--grace", "0", "--dry-run", "--json"))
    assert dry["locked"] >= 2 and dry["swept"] == 0, dry  # known by a HEAD, never tried
    report = ok(cli(s3, "gc", "vm", "--grace", "0", "--json"))
    assert report["locked"] == dry["locked"] and report["swept"] == 0, report
    text = ok(cli(s3, "gc", "vm", "--grace", "0")).decode()
    assert f"and {dry['locked']} under Object Lock" in text
    checked = ok(cli(s3, "verify", "vm", "--json"))
    assert checked["tampered"] == [] and checked["problems"] == []
    # the points kept (as `pydr points` shows), the locked index of the dropped one apart
    assert checked["points"] == len(ok(cli(s3, "points", "vm", "--json"))) == 1
    assert checked["locked_indexes"] == 1
    assert b"1 points," in ok(cli(s3, "verify", "vm"))


def test_retention_in_a_versioned_bucket_deletes_the_version(s3):
    img = disk(s3, chunks=2)
    ok(cli(s3, "protect", "vm", "--disk", f"{img}={s3['url']}", "--retention", "1"))
    ok(cli(s3, "replicate", "vm"))
    scribble(img, 0)
    ok(cli(s3, "replicate", "vm"))
    left = versions(s3, "indexes")
    assert len(left) == 1 and not left[0][3]  # no version and no delete marker left behind
    report = ok(cli(s3, "gc", "vm", "--grace", "0", "--json"))
    assert report["swept"] == 1 and report["locked"] == 0  # the replaced chunk's version
    assert ok(cli(s3, "verify", "vm", "--json"))["problems"] == []


def test_a_killed_locked_cycle_resumes_naming_the_versions_it_uploaded(s3):
    img = disk(s3, chunks=6)
    _protect_locked(s3, img)
    r = cli(s3, "replicate", "vm", env={"PYDR_CRASH_AT": "s3.chunk:3"})
    assert r.returncode == -9
    uploaded = len(versions(s3, "chunks"))
    assert 3 <= uploaded <= 6
    pending = (s3["tmp"] / "vault" / "objects" / "vm" / "pending").read_text().split("\n")
    logged = {f[1]: f[2] for f in (line.split() for line in pending) if len(f) == 4}
    # chunks in flight beside the 3rd may have landed too, unlogged: those are sent again
    assert 3 <= len(logged) <= uploaded
    assert all(f"chunks/{h[:4]}/{h}" in k for h in logged for k in [
        next(k for k, ver, *_ in versions(s3, "chunks") if ver == logged[h])])
    r = ok(cli(s3, "replicate", "vm", "--json"))
    # the logged: not again (each chunk sent at most its 4 MiB, its header, and the seal)
    assert r["bytes_written"] <= (6 - len(logged)) * (4 * MiB + 64 + OVERHEAD)
    chunks = [v for v in versions(s3, "chunks") if not v[3]]
    assert len({k for k, *_ in chunks}) == 6
    from pydr.dr.pointstores.chunkindex import index_ref
    from pydr.dr.objectstore import chunk_store
    from pydr.dr.vault import Vault

    with Vault(s3["vault"]) as v:
        row = v.store.latest_index("vm")
        index = chunk_store(v, "vm").get_index(row.key, index_ref(row))
    assert len(index.refs) == 6
    assert {(s3["objects"].chunk_key(i), ref.version) for i, ref in index.refs.items()} \
        <= {(k, ver) for k, ver, *_ in chunks}
    for ident, ref in index.refs.items():  # a logged upload is reused by its version
        if ident.hex() in logged:
            assert ref.version == logged[ident.hex()]
    assert all(ref.retain_until for ref in index.refs.values())
    out = s3["tmp"] / "out"
    ok(cli(s3, "materialize", "vm", "--point", str(r["point_id"]), "--to", out))
    assert sha(out / "disk.img") == sha(img)


def test_governance_mode_is_what_the_objects_get(s3):
    img = disk(s3, chunks=1)
    _protect_locked(s3, img, "--lock-mode", "governance")
    ok(cli(s3, "replicate", "vm"))
    got = {s3["objects"].head(k, v)["lock_mode"] for k, v, _, marker, _, _ in
           versions(s3, "chunks") + versions(s3, "indexes") if not marker}
    assert got == {"governance"}
    shown = ok(cli(s3, "policy", "vm")).decode()
    assert "1 days" in shown and "governance" in shown
    cleared = ok(cli(s3, "policy", "vm", "--clear", "lock", "--clear", "lock-mode", "--json"))
    assert (cleared["policy"]["lock_days"], cleared["policy"]["lock_mode"]) == (None, None)
    before = {v[:2] for v in versions(s3, "indexes")}
    ok(cli(s3, "replicate", "vm"))  # a point without a lock: versions, no retention
    (key, version), = {v[:2] for v in versions(s3, "indexes")} - before
    assert version and s3["objects"].head(key, version)["retain_until"] is None


@pytest.mark.parametrize("locked", [False, True])
def test_the_index_of_a_killed_cycle_goes_by_version_unless_locked(s3, locked):
    img = disk(s3, chunks=2)
    ok(cli(s3, "protect", "vm", "--disk", f"{img}={s3['url']}", *(
        ["--lock", "1"] if locked else [])))
    r = cli(s3, "replicate", "vm", env={"PYDR_CRASH_AT": "s3.index"})
    assert r.returncode == -9
    (orphan, version, *_), = versions(s3, "indexes")
    ok(cli(s3, "replicate", "vm"))  # records its point, then forgets the orphan
    left = {(k, v) for k, v, _, marker, _, _ in versions(s3, "indexes")}
    assert ((orphan, version) in left) == locked
    assert not any(v[3] for v in versions(s3, "indexes"))  # no delete marker either
    assert len(left) == (2 if locked else 1)
    assert ok(cli(s3, "status", "vm", "--json"))["health"] == "ok"


def test_a_refused_delete_of_an_index_is_kept_for_later_not_an_error(s3):
    """The vault says the lock has ended; the server still refuses: the row
    stays for a later retention, and the cycle is sound."""
    import sqlite3

    img = disk(s3, chunks=1)
    _protect_locked(s3, img, "--retention", "1")
    ok(cli(s3, "replicate", "vm"))
    db = sqlite3.connect(os.path.join(s3["vault"], "vault.db"))
    db.execute("UPDATE object_indexes SET retain_until=1")
    db.commit()
    db.close()
    scribble(img, 0)
    ok(cli(s3, "replicate", "vm"))
    assert ok(cli(s3, "status", "vm", "--json"))["health"] == "ok"
    from pydr.dr.vault import Vault

    with Vault(s3["vault"]) as v:
        assert len(v.store.orphan_index_points("vm")) == 1
    assert len([v for v in versions(s3, "indexes") if not v[3]]) == 2


def test_a_store_whose_every_config_version_is_gone_opens_from_its_keys_versions(s3, plain):
    """No lock: the attacker deleted every version of the config and put
    delete markers on the keys. The vault recorded the store: it opens from
    the keys' older versions, verify names what was done (exit 7), the next
    cycle puts the config back and warns. In a bucket without versions the
    same attack is refused (exit 7 naming the store)."""
    for ctx in (s3, plain):
        img = disk(ctx, chunks=2)
        ok(cli(ctx, "protect", "vm", "--disk", f"{img}={ctx['url']}"))
        pid = ok(cli(ctx, "replicate", "vm", "--json"))["point_id"]
        config = ctx["objects"].get("dr/config")
        c = ctx["client"]
        if ctx is s3:
            every = [(k, v) for k, v, *_ in ctx["objects"].versions_of("dr/config")]
            assert every and ctx["objects"].delete_versions(every) == []
        else:
            c.delete_object(Bucket=ctx["bucket"], Key="dr/config")
        for key, *_ in versions(ctx, "keys"):
            c.delete_object(Bucket=ctx["bucket"], Key=key)
        assert ctx["objects"].head("dr/config") is None
        r = cli(ctx, "materialize", "vm", "--point", str(pid), "--to", ctx["tmp"] / "out")
        if ctx is plain:
            assert r.returncode == 7 and ctx["url"].encode() in r.stderr, r.stderr
            assert b"config is gone" in r.stderr
            continue
        assert r.returncode == 0, r.stderr
        assert sha(ctx["tmp"] / "out" / "disk.img") == sha(img)
        r = cli(ctx, "verify", "vm", "--json")
        assert r.returncode == 7, r.stderr
        found = {(t["kind"], t["what"]): t for t in json.loads(r.stdout)["tampered"]}
        assert set(found) == {("config", "deleted"), ("key", "deleted")}
        assert found[("config", "deleted")]["text"] == "config deleted"
        assert found[("config", "deleted")]["points"] == [pid]
        scribble(img, 0)
        ok(cli(ctx, "replicate", "vm"))
        assert ctx["objects"].get("dr/config") == config  # the recorded store's, put back
        status = ok(cli(ctx, "status", "vm", "--json"))
        assert status["health"] == "warning" and "config deleted" in status["last_error"]
        ok(cli(ctx, "verify", "vm"))  # the config is back; the keys open from their versions

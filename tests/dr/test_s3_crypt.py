"""Encrypted object stores against the Swift of tests/dr/test_s3.py (issue
24): what the bucket holds says nothing about the disks, every point comes
back exact with the passphrase, and a wrong or missing passphrase, a
damaged, renamed or downgraded object, or a swapped store is refused
naming it -- before anything is written. ``--no-encrypt`` stores and
version-1 stores (no config) keep the plain format.

The s3 fixture sets PYDR_PASSPHRASE (test_s3.PASSPHRASE): a store is
encrypted unless a test says otherwise."""

import json
import os
import sqlite3
import uuid

import pytest

from conftest import run_cli, sha
from pydr.dr.vault import Vault
from pydr.engine.chunks import CHUNK_SIZE, ZERO_ID, chunk_id
from pydr.engine.sealing import is_sealed
from pydr.errors import PassphraseRequired
from test_s3 import PASSPHRASE, cli, keys, ok, protect, replicate, s3, swift  # noqa: F401

MARKER = b"PYDR-MARKER-" + uuid.uuid4().hex.encode()


def marked_disk(path, chunks=4):
    """A disk of `chunks` 4 MiB chunks: random bytes with MARKER in each
    chunk but the second, which is all zeros (a zero chunk: never stored).
    Random around it, so zstd leaves a plain chunk's marker visible."""
    with open(path, "wb") as f:
        for i in range(chunks):
            if i == 1:
                f.write(bytes(CHUNK_SIZE))
                continue
            data = bytearray(os.urandom(CHUNK_SIZE))
            at = 4096 * (i + 3)
            data[at:at + len(MARKER)] = MARKER
            f.write(data)
    return path


def xxh3_names(path):
    """The XXH3-128 names (hex) of the disk's non-zero chunks: the names an
    unencrypted store gives them."""
    out = set()
    with open(path, "rb") as f:
        while True:
            data = f.read(CHUNK_SIZE)
            if not data:
                return out
            ident = chunk_id(data)
            if ident != ZERO_ID and any(data):
                out.add(ident.hex())


def bucket(ctx):
    """{key: ETag} of every object in the bucket."""
    out, token = {}, None
    while True:
        kw = {"Bucket": ctx["bucket"], **({"ContinuationToken": token} if token else {})}
        page = ctx["client"].list_objects_v2(**kw)
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", ())})
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def body(ctx, key):
    return ctx["client"].get_object(Bucket=ctx["bucket"], Key=key)["Body"].read()


def put(ctx, key, data):
    ctx["client"].put_object(Bucket=ctx["bucket"], Key=key, Body=data)


def vault_rows(ctx, tables=("disks", "points", "object_indexes", "object_stores")):
    """The vault's records of disks, points, indexes and stores, and the
    files under vault/objects (a failed cycle records its error and job:
    the item's health says it failed)."""
    db = sqlite3.connect(os.path.join(ctx["vault"], "vault.db"))
    try:
        rows = {t: sorted(map(tuple, db.execute(f"SELECT * FROM {t}"))) for t in tables}
    finally:
        db.close()
    files = []
    for top, _, names in os.walk(os.path.join(ctx["vault"], "objects")):
        files += [(os.path.join(top, n), os.path.getsize(os.path.join(top, n))) for n in names]
    return rows, sorted(files)


def without_passphrase(ctx):
    return {k: v for k, v in ctx["env"].items() if not k.startswith("PYDR_PASSPHRASE")}


def bare(ctx, *args, env):
    """The pydr command with exactly `env` (cli() adds to the fixture's)."""
    return run_cli(*args, "--vault", ctx["vault"], env=env)


def materializes(ctx, pid, want, name="vm", disk="disk.img", env=None, tag=""):
    out = ctx["tmp"] / f"out-{name}-{pid}{tag}"
    r = bare(ctx, "materialize", name, "--point", str(pid), "--to", out,
             env=env if env is not None else ctx["env"])
    assert r.returncode == 0, r.stderr
    assert sha(out / disk) == want


def test_the_bucket_holds_no_disk_data_and_no_content_names(s3):
    """After cycles, no object holds the marker written into the disk; chunk
    names are not the chunks' XXH3; chunks and indexes are sealed and so is
    the vault's copy of the newest index; zero chunks are not stored; every
    point materialises exactly."""
    img = marked_disk(s3["tmp"] / "disk.img")
    protect(s3, img)
    shas = {replicate(s3)["point_id"]: sha(img)}
    with open(img, "r+b") as f:  # a second point: the third chunk changes
        f.seek(2 * CHUNK_SIZE + 8192)
        f.write(os.urandom(4096) + MARKER)
    shas[replicate(s3)["point_id"]] = sha(img)
    objects = bucket(s3)
    chunks = [k for k in objects if k.startswith("dr/chunks/")]
    indexes = [k for k in objects if k.startswith("dr/indexes/")]
    assert len(chunks) == 4 and len(indexes) == 2  # 3 non-zero chunks, 1 changed; no zero one
    assert "dr/config" in objects and any(k.startswith("dr/keys/") for k in objects)
    for key in objects:
        data = body(s3, key)
        assert MARKER not in data, key
        if key in chunks or key in indexes:
            assert is_sealed(data), key
    config = json.loads(body(s3, "dr/config"))
    assert (config["encryption"], config["chunk_id"]) == ("aes-256-gcm", "hmac-sha256-128")
    names = {k.rpartition("/")[2] for k in chunks}
    assert not names & xxh3_names(img)
    local = [os.path.join(top, n) for top, _, ns in os.walk(os.path.join(s3["vault"], "objects"))
             for n in ns if n.endswith(".pidx")]
    assert local and all(is_sealed(open(p, "rb").read()) for p in local)
    for pid, want in shas.items():
        materializes(s3, pid, want)
    report = ok(cli(s3, "verify", "vm", "--json"))
    assert report["problems"] == [] and report["chunks"] == 4


def test_a_wrong_passphrase_is_refused_naming_the_store_and_nothing_is_written(s3):
    img = marked_disk(s3["tmp"] / "disk.img", chunks=2)
    protect(s3, img)
    pid = replicate(s3)["point_id"]
    with open(img, "r+b") as f:
        f.write(os.urandom(4096))  # a cycle would upload a chunk
    before_bucket, before_vault = bucket(s3), vault_rows(s3)
    wrong = {**s3["env"], "PYDR_PASSPHRASE": "not the passphrase"}
    r = bare(s3, "replicate", "vm", env=wrong)
    assert r.returncode == 4 and s3["url"].encode() in r.stderr, r.stderr
    assert b"passphrase" in r.stderr
    out = s3["tmp"] / "out"
    r = bare(s3, "materialize", "vm", "--point", str(pid), "--to", out, env=wrong)
    assert r.returncode == 4 and s3["url"].encode() in r.stderr, r.stderr
    assert not out.exists() or not list(out.iterdir())
    r = bare(s3, "verify", "vm", env=wrong)
    assert r.returncode == 4, r.stderr
    # a new item into the same store: refused before anything is recorded (no job either)
    other = marked_disk(s3["tmp"] / "other.img", chunks=1)
    db_before = vault_rows(s3, tables=("items", "disks", "jobs", "object_stores"))
    r = bare(s3, "protect", "other", "--disk", f"{other}={s3['url']}", env=wrong)
    assert r.returncode == 4 and s3["url"].encode() in r.stderr, r.stderr
    assert vault_rows(s3, tables=("items", "disks", "jobs", "object_stores")) == db_before
    # the points, indexes, stores and the vault's index copies; the bucket's every object
    assert bucket(s3) == before_bucket and vault_rows(s3) == before_vault
    assert replicate(s3)["point_id"] > pid  # the right passphrase works on


def test_a_missing_passphrase_is_exit_4_with_a_hint_and_every_source_works(s3, monkeypatch):
    img = marked_disk(s3["tmp"] / "disk.img", chunks=2)
    none = without_passphrase(s3)
    r = bare(s3, "protect", "vm", "--disk", f"{img}={s3['url']}", env=none)
    assert r.returncode == 4 and s3["url"].encode() in r.stderr, r.stderr
    assert b"--passphrase-file" in r.stderr and b"--no-encrypt" in r.stderr, r.stderr
    assert bucket(s3) == {}  # no half-made store
    with Vault(s3["vault"]) as v:
        assert v.items() == [] and v.object_store(s3["url"]) is None
    pfile = s3["tmp"] / "passphrase"
    pfile.write_text(PASSPHRASE + "\n")
    r = bare(s3, "protect", "vm", "--disk", f"{img}={s3['url']}", "--passphrase-file", pfile,
             env=none)
    assert r.returncode == 0, r.stderr
    r = bare(s3, "replicate", "vm", "--json", env=none)
    assert r.returncode == 4 and b"--passphrase-file" in r.stderr, r.stderr
    r = bare(s3, "replicate", "vm", "--json", "--passphrase-file", pfile, env=none)
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)["point_id"]
    r = bare(s3, "replicate", "vm", "--json", env={**none, "PYDR_PASSPHRASE_FILE": str(pfile)})
    assert r.returncode == 0, r.stderr
    assert not any(PASSPHRASE.encode() in open(os.path.join(top, n), "rb").read()
                   for top, _, ns in os.walk(s3["vault"]) for n in ns)  # never stored
    monkeypatch.delenv("PYDR_PASSPHRASE")
    with Vault(s3["vault"]) as v:  # the API: no passphrase given, none in the environment
        with pytest.raises(PassphraseRequired) as e:
            v.materialize("vm", first, str(s3["tmp"] / "api-none"))
        assert e.value.exit_code == 4 and e.value.path == s3["url"]
    with Vault(s3["vault"], passphrase=PASSPHRASE) as v:
        paths = v.materialize("vm", first, str(s3["tmp"] / "api")).paths
    assert sha(paths[0]) == sha(img)


def _flip(ctx, key, at):
    data = bytearray(body(ctx, key))
    data[at] ^= 0x01
    put(ctx, key, bytes(data))


@pytest.mark.parametrize("damage", ["chunk", "index", "renamed chunk", "moved index"])
def test_a_damaged_or_renamed_object_is_refused_naming_it(s3, damage):
    """A flipped byte in a chunk or an index, a chunk copied onto another's
    name, an index copied onto another point's: exit 7 naming the object,
    nothing written at --to; verify reports the object."""
    img = marked_disk(s3["tmp"] / "disk.img", chunks=3)
    protect(s3, img)
    first = replicate(s3)["point_id"]
    with open(img, "r+b") as f:
        f.write(os.urandom(4096))
    pid = replicate(s3)["point_id"]
    chunks, indexes = sorted(_named_by(s3, pid)), keys(s3, "indexes")
    others = sorted(set(keys(s3, "chunks")) - set(chunks))
    with Vault(s3["vault"]) as v:
        index_key = v.index_of("vm", pid).key
        first_index = v.index_of("vm", first).key
    if damage == "chunk":
        victim = chunks[0]
        _flip(s3, victim, len(body(s3, victim)) // 2)
    elif damage == "index":
        victim = index_key
        _flip(s3, victim, 30)  # in the ciphertext
    elif damage == "renamed chunk":
        victim, source = chunks[0], (others + chunks[1:])[0]
        put(s3, victim, body(s3, source))  # a good sealed chunk, of another name
    else:
        victim = index_key
        put(s3, victim, body(s3, first_index))
    assert len(chunks) == 2 and len(others) == 1 and len(indexes) == 2
    name = victim.rpartition("/")[2]
    out = s3["tmp"] / "out"
    r = cli(s3, "materialize", "vm", "--point", str(pid), "--to", out)
    assert r.returncode == 7 and name.encode() in r.stderr, r.stderr
    assert b"fails authentication" in r.stderr, r.stderr
    assert not (out / "disk.img").exists() and not list(out.glob("*.pydr-new"))
    r = cli(s3, "verify", "vm", "--json")
    assert r.returncode == 7, r.stderr
    problems = json.loads(r.stdout)["problems"]
    assert any(name in p and "fails authentication" in p for p in problems), problems


def _named_by(ctx, pid):
    """The chunk keys point `pid`'s index names (read with the passphrase)."""
    with Vault(ctx["vault"], passphrase=PASSPHRASE) as v:
        from pydr.dr.objectstore import chunk_store

        store = chunk_store(v.store, "vm")
        index = store.get_index(v.index_of("vm", pid).key)
        return {store.chunk_key(i) for i in index.chunk_ids()}


def test_equal_disks_store_their_chunks_once(s3):
    """Two equal disks of one item and a third of another item in the same
    encrypted store: the keyed names still deduplicate."""
    tmp = s3["tmp"]
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    one = marked_disk(tmp / "a" / "one.img", chunks=3)
    two = tmp / "b" / "two.img"
    two.write_bytes(one.read_bytes())
    third = tmp / "third.img"
    third.write_bytes(one.read_bytes())
    protect(s3, one, two)
    first = replicate(s3)
    stored = sorted(keys(s3, "chunks"))
    assert len(stored) == 2  # two non-zero chunks, once
    ok(cli(s3, "protect", "vm2", "--disk", f"{third}={s3['url']}"))
    second = replicate(s3, "vm2")  # a first cycle sends its chunks: under the same names
    assert sorted(keys(s3, "chunks")) == stored
    materializes(s3, first["point_id"], sha(one), disk="one.img")
    materializes(s3, first["point_id"], sha(one), disk="two.img", tag="b")
    materializes(s3, second["point_id"], sha(one), name="vm2", disk="third.img")


@pytest.mark.parametrize("change", ["deleted", "none", "another store"])
def test_a_downgraded_or_swapped_store_is_refused_and_nothing_is_written(s3, change):
    """The config deleted, flipped to "none", or another store's: the
    vault's record disagrees, every command that opens the store exits 7
    naming it and what changed; no plain chunk is written."""
    img = marked_disk(s3["tmp"] / "disk.img", chunks=2)
    protect(s3, img)
    pid = replicate(s3)["point_id"]
    with open(img, "r+b") as f:
        f.write(os.urandom(4096))
    config = json.loads(body(s3, "dr/config"))
    if change == "deleted":
        s3["client"].delete_object(Bucket=s3["bucket"], Key="dr/config")
        said = b"its config is gone"
    elif change == "none":
        put(s3, "dr/config", json.dumps({**config, "encryption": "none",
                                         "chunk_id": "xxh3-128"}).encode())
        said = b"encryption 'none'"
    else:
        put(s3, "dr/config", json.dumps({**config, "id": uuid.uuid4().hex}).encode())
        said = b"names store"
    before_bucket, before_vault = bucket(s3), vault_rows(s3)
    for args in (["replicate", "vm"], ["materialize", "vm", "--point", str(pid), "--to",
                                       str(s3["tmp"] / "out")], ["verify", "vm"]):
        r = cli(s3, *args)
        assert r.returncode == 7 and s3["url"].encode() in r.stderr and said in r.stderr, \
            (args, r.stderr)
    assert bucket(s3) == before_bucket and vault_rows(s3) == before_vault
    assert not (s3["tmp"] / "out" / "disk.img").exists()


def test_no_encrypt_stores_keep_the_plain_format(s3):
    """--no-encrypt: chunks named by their XXH3 and not sealed (the marker
    is there to read), a config saying "none", no key files; no passphrase
    is needed to write or read it."""
    img = marked_disk(s3["tmp"] / "disk.img", chunks=3)
    none = without_passphrase(s3)
    r = bare(s3, "protect", "vm", "--disk", f"{img}={s3['url']}", "--no-encrypt", env=none)
    assert r.returncode == 0, r.stderr
    r = bare(s3, "replicate", "vm", "--json", env=none)
    assert r.returncode == 0, r.stderr
    pid = json.loads(r.stdout)["point_id"]
    objects = bucket(s3)
    assert not [k for k in objects if k.startswith("dr/keys/")]
    assert json.loads(body(s3, "dr/config"))["encryption"] == "none"
    chunks = keys(s3, "chunks")
    assert {k.rpartition("/")[2] for k in chunks} == xxh3_names(img)
    assert all(MARKER in body(s3, k) and not is_sealed(body(s3, k)) for k in chunks)
    assert not is_sealed(body(s3, keys(s3, "indexes")[0]))
    materializes(s3, pid, sha(img), env=none)
    with Vault(s3["vault"]) as v:
        assert v.object_store(s3["url"]).encryption == "none"


@pytest.mark.parametrize("seed", ["a junk chunk", "a config saying none"])
def test_an_empty_prefix_seeded_unencrypted_is_refused_unless_opted_out(s3, seed):
    """Before the owner's first protect, someone who can write the prefix
    puts one object under chunks/ (a version-1 store, to pydr) or a config
    saying "none": protect (encryption asked) exits 15 naming the store and
    what is there, records nothing, and writes nothing; with --no-encrypt
    the store is joined knowingly."""
    if seed == "a junk chunk":
        put(s3, "dr/chunks/0000/junk", b"x")
        said = b"version-1 store"
    else:
        put(s3, "dr/config", json.dumps({"format": "pydr-object-store", "version": 2,
                                         "id": "00" * 16, "encryption": "none",
                                         "chunk_id": "xxh3-128", "created": 1}).encode())
        said = b"encryption 'none'"
    img = marked_disk(s3["tmp"] / "disk.img", chunks=1)
    before = bucket(s3)
    r = cli(s3, "protect", "vm", "--disk", f"{img}={s3['url']}")
    assert r.returncode == 15 and s3["url"].encode() in r.stderr and said in r.stderr, r.stderr
    assert b"--no-encrypt" in r.stderr, r.stderr
    assert bucket(s3) == before
    with Vault(s3["vault"]) as v:
        assert v.object_store(s3["url"]) is None and v.items() == []
    ok(cli(s3, "protect", "vm", "--disk", f"{img}={s3['url']}", "--no-encrypt"))
    replicate(s3)
    assert all(MARKER in body(s3, k) for k in keys(s3, "chunks") if not k.endswith("junk"))


def test_a_version_1_store_stays_unencrypted_and_keeps_working(s3):
    """A store without a config (pydr before issue 24) and a vault without
    its record (schema 11 upgraded): made here as the plain format --
    a --no-encrypt store, its config deleted and the vault's record
    dropped. Cycles and restores go on without a passphrase and write no
    config; another vault protecting into it is refused unless it passes
    --no-encrypt, and then keeps it plain; a config that appears later is
    refused."""
    tmp = s3["tmp"]
    img = marked_disk(tmp / "disk.img", chunks=2)
    none = without_passphrase(s3)
    r = bare(s3, "protect", "vm", "--disk", f"{img}={s3['url']}", "--no-encrypt", env=none)
    assert r.returncode == 0, r.stderr
    first = json.loads(bare(s3, "replicate", "vm", "--json", env=none).stdout)["point_id"]
    at_first = sha(img)
    s3["client"].delete_object(Bucket=s3["bucket"], Key="dr/config")
    db = sqlite3.connect(os.path.join(s3["vault"], "vault.db"))
    with db:
        db.execute("DELETE FROM object_stores")
    db.close()
    with open(img, "r+b") as f:
        f.write(os.urandom(4096))
    r = bare(s3, "replicate", "vm", "--json", env=none)
    assert r.returncode == 0, r.stderr
    second = json.loads(r.stdout)["point_id"]
    assert "dr/config" not in bucket(s3)
    assert {k.rpartition("/")[2] for k in keys(s3, "chunks")} >= xxh3_names(img)
    materializes(s3, first, at_first, env=none)
    materializes(s3, second, sha(img), env=none)
    with Vault(s3["vault"]) as v:  # the writer recorded it as it found it
        rec = v.object_store(s3["url"])
        assert (rec.id, rec.encryption) == ("", "none")
    other = {**s3, "vault": str(tmp / "vault2")}
    assert run_cli("vault", "init", other["vault"]).returncode == 0
    (tmp / "b").mkdir()
    img2 = marked_disk(tmp / "b" / "disk.img", chunks=1)
    r = bare(other, "protect", "vm", "--disk", f"{img2}={s3['url']}", env=s3["env"])
    assert r.returncode == 15 and s3["url"].encode() in r.stderr, r.stderr  # encryption asked
    assert b"version-1 store" in r.stderr and b"--no-encrypt" in r.stderr, r.stderr
    r = bare(other, "protect", "vm", "--disk", f"{img2}={s3['url']}", "--no-encrypt",
             env=s3["env"])
    assert r.returncode == 0, r.stderr  # joined knowingly: a version-1 store stays so
    r = bare(other, "replicate", "vm", "--json", env=none)
    assert r.returncode == 0, r.stderr
    assert "dr/config" not in bucket(s3) and not keys(s3, "keys")
    put(s3, "dr/config", json.dumps({"format": "pydr-object-store", "version": 2,
                                     "id": uuid.uuid4().hex, "encryption": "none",
                                     "chunk_id": "xxh3-128", "created": 0}).encode())
    r = bare(s3, "replicate", "vm", env=none)
    assert r.returncode == 7 and b"version-1 store" in r.stderr, r.stderr


def test_a_fleet_worker_captures_with_the_keys_the_task_carries(s3, tmp_path, monkeypatch):
    """An encrypted item on a Dask worker whose environment has no
    passphrase: the coordinator unlocks the store, the task carries its
    keys; the chunks are sealed and the point is exact."""
    from test_fleet import make_cluster

    monkeypatch.delenv("PYDR_PASSPHRASE")  # the workers inherit no passphrase
    img = marked_disk(tmp_path / "hv.img", chunks=2)
    ok(cli(s3, "protect", "vm", "--host", "hv-a", "--disk", f"{img}={s3['url']}"))
    worker_env = {k: v for k, v in s3["env"].items() if k.startswith(("AWS_", "PYDR_S3"))}
    with make_cluster(["hv-a"], tmp_path, env=worker_env) as cluster:
        r = cli(s3, "replicate", "vm", "--scheduler", cluster.scheduler_address, "--json")
        assert r.returncode == 0, r.stderr
    pid = json.loads(r.stdout)["point_id"]
    assert all(is_sealed(body(s3, k)) and MARKER not in body(s3, k) for k in keys(s3, "chunks"))
    materializes(s3, pid, sha(img), disk="hv.img")


@pytest.mark.parametrize("point", ["keys.created", "keys.config"])
def test_a_protect_killed_while_it_makes_the_store_is_finished_by_running_it_again(s3, point):
    """Killed after the store's key file, or after its config: nothing is
    recorded; the same protect again finishes the store (encrypted, one
    passphrase key) and records it; its points are exact."""
    img = marked_disk(s3["tmp"] / "disk.img", chunks=2)
    r = cli(s3, "protect", "vm", "--disk", f"{img}={s3['url']}", env={"PYDR_CRASH_AT": point})
    assert r.returncode == -9, r.stderr
    assert len(keys(s3, "keys")) == 1 and ("dr/config" in bucket(s3)) == (point == "keys.config")
    with Vault(s3["vault"]) as v:
        assert v.items() == [] and v.object_store(s3["url"]) is None
    protect(s3, img)
    assert len(keys(s3, "keys")) == 1
    config = json.loads(body(s3, "dr/config"))
    with Vault(s3["vault"]) as v:
        rec = v.object_store(s3["url"])
        assert (rec.id, rec.encryption) == (config["id"], "aes-256-gcm")
    pid = replicate(s3)["point_id"]
    assert all(is_sealed(body(s3, k)) for k in keys(s3, "chunks"))
    materializes(s3, pid, sha(img))


def test_pydr_run_unlocks_with_its_passphrase_file(s3):
    """The service opens the vault each round with --passphrase-file's
    passphrase (none in its environment); without it, a cycle of another
    item fails for want of one and is recorded so."""
    img = marked_disk(s3["tmp"] / "disk.img", chunks=2)
    ok(cli(s3, "protect", "vm", "--disk", f"{img}={s3['url']}", "--rpo", "1h"))
    none = without_passphrase(s3)
    pfile = s3["tmp"] / "passphrase"
    pfile.write_text(PASSPHRASE)
    r = bare(s3, "run", "--once", "--json", "--passphrase-file", pfile, env=none)
    assert r.returncode == 0, r.stderr
    with Vault(s3["vault"]) as v:
        (point,) = v.points("vm")
    materializes(s3, point.id, sha(img))
    other = marked_disk(s3["tmp"] / "other.img", chunks=1)
    ok(cli(s3, "protect", "other", "--disk", f"{other}={s3['url']}", "--rpo", "1h"))
    r = bare(s3, "run", "--once", "--json", env=none)
    assert r.returncode != 0, r.stderr
    with Vault(s3["vault"]) as v:
        assert v.points("other") == [] and "no passphrase" in v.item("other")["last_error"]


def test_a_passphrase_is_asked_at_a_terminal_once(s3):
    """No passphrase given and standard input a terminal (a pty): asked
    once, naming the store; typed right, the point is restored; typed
    wrong, exit 4 and nothing written."""
    import pty
    import subprocess

    from conftest import pydr_command

    img = marked_disk(s3["tmp"] / "disk.img", chunks=2)
    protect(s3, img)
    pid = replicate(s3)["point_id"]

    def typed(answer, out):
        controller, terminal = pty.openpty()
        p = subprocess.Popen([*pydr_command(), "materialize", "vm", "--point", str(pid), "--to",
                              str(out), "--vault", s3["vault"]], stdin=terminal,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=without_passphrase(s3), start_new_session=True)
        try:
            seen, prompt = b"", f"passphrase of {s3['url']}: ".encode()
            while not seen.endswith(prompt):
                byte = p.stderr.read(1)
                assert byte, f"no prompt: {seen!r}"
                seen += byte
            os.write(controller, answer + b"\n")
            _, err = p.communicate(timeout=120)
        finally:
            p.kill()
            os.close(controller)
            os.close(terminal)
        assert prompt not in err  # once
        return p.returncode, err

    code, err = typed(b"wrong", s3["tmp"] / "wrong")
    assert code == 4 and s3["url"].encode() in err, err
    assert not (s3["tmp"] / "wrong" / "disk.img").exists()
    code, err = typed(PASSPHRASE.encode(), s3["tmp"] / "right")
    assert code == 0, err
    assert sha(s3["tmp"] / "right" / "disk.img") == sha(img)


def test_the_vault_keeps_the_key_check_and_refuses_a_config_vouching_for_another_key(s3):
    """The store's key check is recorded with it; someone who rewrites the
    config's key check and adds a key file of their own master key under
    the same passphrase (anyone who knows a passphrase can) is refused by
    the vault's record, exit 7 naming the store, and nothing is written."""
    from pydr.dr import storekeys
    from pydr.endpoints.s3 import ObjectStore
    from pydr.engine.sealing import key_check

    img = marked_disk(s3["tmp"] / "disk.img", chunks=2)
    protect(s3, img)
    replicate(s3)
    config = json.loads(body(s3, "dr/config"))
    with Vault(s3["vault"]) as v:
        assert v.object_store(s3["url"]).key_check == config["key_check"] is not None
    # a key file of a master key of their own, for this store's id, and a config to match
    store_id, master = bytes.fromhex(config["id"]), os.urandom(32)
    for key in keys(s3, "keys"):
        s3["client"].delete_object(Bucket=s3["bucket"], Key=key)
    storekeys._write_passphrase_key(ObjectStore(s3["url"]), store_id, master,
                                    PASSPHRASE.encode(), None)
    forged = {**config, "key_check": key_check(master, store_id)}
    assert forged["key_check"] != config["key_check"]
    put(s3, "dr/config", json.dumps(forged).encode())
    before_bucket, before_vault = bucket(s3), vault_rows(s3)
    r = cli(s3, "replicate", "vm")
    assert r.returncode == 7 and s3["url"].encode() in r.stderr, r.stderr
    assert bucket(s3) == before_bucket and vault_rows(s3) == before_vault


def test_sealed_objects_without_config_and_keys_are_never_joined_unencrypted(s3):
    """An encrypted store whose config and key files were deleted (a bucket
    without versions): a new vault's protect is refused even with
    --no-encrypt, exit 7 naming a sealed object: plain chunks are never
    written beside sealed ones."""
    img = marked_disk(s3["tmp"] / "disk.img", chunks=2)
    protect(s3, img)
    replicate(s3)
    for key in ["dr/config"] + keys(s3, "keys"):
        s3["client"].delete_object(Bucket=s3["bucket"], Key=key)
    other = s3["tmp"] / "vault2"
    assert run_cli("vault", "init", other).returncode == 0
    before = bucket(s3)
    for extra in ([], ["--no-encrypt"]):
        r = run_cli("protect", "vm", "--disk", f"{img}={s3['url']}", *extra, "--vault", other,
                    env=s3["env"])
        assert r.returncode == 7 and b"sealed objects" in r.stderr and b"dr/" in r.stderr, \
            (extra, r.stderr)
    assert bucket(s3) == before
    with Vault(other) as v:
        assert v.items() == []

"""A chunk index that others share, or that lost something: another vault's
points under the same prefix, chunks swept while a killed cycle waited, a
disk of the vault in the way of a failover, a store nested in another, a
chunk gone or corrupt. The same Swift as tests/dr/test_s3.py."""

import json
import os
import time

import pytest

from conftest import run_cli, sha
from pydr.dr.vault import Vault
from test_s3 import cli, keys, ok, protect, replicate, s3, swift  # noqa: F401  (fixtures)


def image(path, size=12 << 20):
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


def sweep(ctx, url=None):
    """gc with no grace, as if run a minute from now: the S3 server rounds an
    object's LastModified up to the second, which would make it "young"."""
    with Vault(ctx["vault"]) as v:
        return v.collect_garbage(url or ctx["url"], grace=0, now=time.time() + 60)


def materializes(ctx, pid, want, name="vm", disk="disk.img"):
    out = ctx["tmp"] / f"out-{os.path.basename(ctx['vault'])}-{pid}"
    ok(cli(ctx, "materialize", name, "--point", str(pid), "--to", out))
    assert sha(out / disk) == want


def test_a_cycle_never_deletes_another_vaults_indexes_in_a_shared_store(s3):
    """Two vaults, one s3:// prefix, an item of the same name in each: the
    cycles of one delete only the orphan indexes it logged itself."""
    tmp = s3["tmp"]
    other = {**s3, "vault": str(tmp / "vault2")}
    assert run_cli("vault", "init", other["vault"]).returncode == 0
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    a, b = image(tmp / "a" / "disk.img"), image(tmp / "b" / "disk.img")
    protect(s3, a)
    protect(other, b)
    history = []
    for ctx, img in ((s3, a), (other, b), (s3, a), (other, b)):
        history.append((ctx, replicate(ctx)["point_id"], sha(img)))
        with open(img, "r+b") as f:
            f.write(os.urandom(4096))
    assert len(keys(s3, "indexes")) == 4  # every point's index is there
    for ctx, pid, want in history:
        materializes(ctx, pid, want)


def test_a_damaged_byte_in_the_pending_log_spoils_its_line_only(s3):
    """A non-UTF-8 byte in objects/ITEM/pending (a disk that lies): the
    next cycle and gc go on; the log's good lines still count (the chunks a
    killed cycle uploaded are not sent again)."""
    img = image(s3["tmp"] / "disk.img", 24 << 20)  # six chunks
    protect(s3, img)
    r = cli(s3, "replicate", "vm", env={"PYDR_CRASH_AT": "s3.chunk:4"})
    assert r.returncode == -9
    pending = os.path.join(s3["vault"], "objects", "vm", "pending")
    with open(pending, "ab") as f:
        f.write(b"garbage\x00\xff line\n1 index \xfe\xff\n123 chunk zz\n")
    done = replicate(s3)
    assert done["bytes_written"] < 6 * (4 << 20)  # the logged uploads were trusted
    materializes(s3, done["point_id"], sha(img))
    with open(img, "r+b") as f:
        f.write(os.urandom(4096))
    materializes(s3, replicate(s3)["point_id"], sha(img))
    ok(cli(s3, "gc", "vm", "--json"))


def test_chunks_swept_after_a_killed_cycle_are_uploaded_again(s3):
    """A killed cycle logged its uploads; 'gc --grace 0' swept them (no
    index names them); the rerun asks the store before it reuses one."""
    img = image(s3["tmp"] / "disk.img", 40 << 20)  # ten chunks
    protect(s3, img)
    r = cli(s3, "replicate", "vm", env={"PYDR_CRASH_AT": "s3.chunk:6"})
    assert r.returncode == -9
    assert len(keys(s3, "chunks")) >= 6
    report = sweep(s3)
    assert report["swept"] >= 6 and keys(s3, "chunks") == []
    again = replicate(s3)
    assert len(keys(s3, "chunks")) == 10
    assert again["bytes_written"] >= 10 * (4 << 20)  # every chunk sent again
    materializes(s3, again["point_id"], sha(img))


def test_a_failover_never_brings_a_point_up_over_a_protected_disk(s3):
    """--to the directory of the item's own source: refused before anything
    is recorded or written, as materialise refuses."""
    img = image(s3["tmp"] / "disk.img")
    protect(s3, img)
    pid = replicate(s3)["point_id"]
    with open(img, "r+b") as f:
        f.write(os.urandom(4096))  # production moved on: a point over it would roll it back
    before = sha(img)
    r = cli(s3, "failover", "vm", "--point", str(pid), "--to", s3["tmp"])
    assert r.returncode == 15 and b"protects" in r.stderr and str(img).encode() in r.stderr, \
        r.stderr
    assert sha(img) == before
    st = ok(cli(s3, "status", "vm", "--json"))
    assert st["state"] == "protected" and not st["operation"]
    site_b = s3["tmp"] / "site-b"  # another directory works
    assert ok(cli(s3, "failover", "vm", "--point", str(pid), "--to", site_b, "--json"))["point"] == pid


def test_gc_never_sweeps_a_store_nested_under_its_chunks(s3):
    """s3://B/dr and s3://B/dr/chunks/nest: gc of the outer store sweeps
    only keys that are its own chunk keys."""
    tmp = s3["tmp"]
    outer, inner = image(tmp / "outer.img"), image(tmp / "inner.img")
    protect(s3, outer, name="outer")
    ok(cli(s3, "protect", "inner", "--disk", f"{inner}={s3['url']}/chunks/nest"))
    replicate(s3, "outer")
    pid = replicate(s3, "inner")["point_id"]
    report = sweep(s3)
    assert report["swept"] == 0 and report["chunks"] == 3, report
    materializes(s3, pid, sha(inner), name="inner", disk="inner.img")


def points_damaged(ctx, name="vm"):
    return {p["id"]: p["damaged"] for p in ok(cli(ctx, "points", name, "--json"))}


def test_change_point_to_a_point_with_a_missing_chunk_changes_nothing(s3):
    """The index is read and every chunk asked for before any state changes:
    exit 7 naming the chunk and its offset; the points that name it are
    marked; the failed-over disk and the item's state stay as they were."""
    tmp = s3["tmp"]
    img = image(tmp / "disk.img")
    protect(s3, img)
    first = replicate(s3)["point_id"]
    at_first, before = sha(img), set(keys(s3, "chunks"))
    with open(img, "r+b") as f:
        f.seek(8 << 20)  # the third chunk
        f.write(os.urandom(4096))
    second = replicate(s3)["point_id"]
    (new,) = set(keys(s3, "chunks")) - before
    site_b = tmp / "site-b"
    ok(cli(s3, "failover", "vm", "--point", str(first), "--to", site_b))
    s3["client"].delete_object(Bucket=s3["bucket"], Key=new)
    r = cli(s3, "change-point", "vm", "--point", str(second))
    assert r.returncode == 7, r.stderr
    assert new.rpartition("/")[2].encode() in r.stderr and b"offset 8388608" in r.stderr, r.stderr
    st = ok(cli(s3, "status", "vm", "--json"))
    assert st["state"] == "failed-over" and sha(site_b / "disk.img") == at_first
    damaged = points_damaged(s3)
    assert damaged[second] and not damaged[first]


def test_a_missing_chunk_is_marked_and_the_next_cycle_uploads_it_again(s3):
    """verify finds a chunk gone: exit 7, the points that name it marked; the
    next cycle does not carry it over from the last index (the disk did not
    change there): it reads and uploads it again, and its point is exact."""
    img = image(s3["tmp"] / "disk.img")
    protect(s3, img)
    first = replicate(s3)["point_id"]
    gone = sorted(keys(s3, "chunks"))[0]
    s3["client"].delete_object(Bucket=s3["bucket"], Key=gone)
    r = cli(s3, "verify", "vm", "--json")
    assert r.returncode == 7, r.stderr
    assert json.loads(r.stdout)["damaged_points"] == [first]
    assert points_damaged(s3)[first]
    again = replicate(s3)
    assert gone in keys(s3, "chunks")
    assert 4 << 20 <= again["bytes_written"] < 8 << 20  # that chunk alone
    materializes(s3, again["point_id"], sha(img))
    report = ok(cli(s3, "verify", "vm", "--point", str(again["point_id"]), "--json"))
    assert report["problems"] == [] and report["damaged_points"] == []
    r = cli(s3, "materialize", "vm", "--point", str(first), "--to", s3["tmp"] / "old")
    assert r.returncode == 7 and b"damaged" in r.stderr, r.stderr


def test_an_index_re_encoded_with_its_chunk_ids_swapped_is_refused(s3):
    """An unencrypted store's point index carries only an unkeyed checksum:
    whoever can write the bucket re-encodes it with two chunk ids swapped.
    The vault recorded each index's SHA-256: the next cycle (its local copy
    gone), materialize and verify exit 7 naming the index; the point is
    marked damaged and nothing wrong is written."""
    from pydr.engine.chunks import PointIndex

    img = image(s3["tmp"] / "disk.img")
    ok(cli(s3, "protect", "vm", "--disk", f"{img}={s3['url']}", "--no-encrypt"))
    first = replicate(s3)["point_id"]
    with open(img, "r+b") as f:
        f.write(os.urandom(4096))
    second = replicate(s3)["point_id"]
    with Vault(s3["vault"]) as v:
        index_keys = {p: v.index_of("vm", p).key for p in (first, second)}
        assert all(v.index_of("vm", p).digest for p in (first, second))

    def swap(pid):
        key = index_keys[pid].partition(f"s3://{s3['bucket']}/")[2] or index_keys[pid]
        index = PointIndex.decode(s3["client"].get_object(Bucket=s3["bucket"],
                                                          Key=key)["Body"].read())
        size, ids = index.disks[0]
        index.disks[0] = (size, [ids[1], ids[0], *ids[2:]])
        s3["client"].put_object(Bucket=s3["bucket"], Key=key, Body=index.encode())
        return key

    said = b"does not match the digest the vault recorded"
    here = os.path.join(s3["vault"], "objects", "vm")
    for local in os.listdir(here):
        if local.endswith(".pidx"):
            os.unlink(os.path.join(here, local))
    key = swap(second)
    r = cli(s3, "replicate", "vm")
    assert r.returncode == 7 and said in r.stderr and key.encode() in r.stderr, r.stderr
    key = swap(first)
    out = s3["tmp"] / "out"
    r = cli(s3, "materialize", "vm", "--point", str(first), "--to", out)
    assert r.returncode == 7 and said in r.stderr and key.encode() in r.stderr, r.stderr
    assert not (out / "disk.img").exists()
    r = cli(s3, "verify", "vm", "--json")
    assert r.returncode == 7, r.stderr
    report = json.loads(r.stdout)
    assert sorted(report["damaged_points"]) == [first, second], report
    assert any(said.decode() in p for p in report["problems"]), report
    damaged = points_damaged(s3)
    assert damaged[first] and damaged[second]


def test_an_oversized_chunk_is_refused_before_it_is_read_whole(s3):
    """A chunk object replaced by one larger than any pydr writes: verify
    and materialize exit 7 naming it, by its Content-Length, and the bound
    also holds while reading when the server sends no length."""
    from pydr.dr.chunkstore import MAX_CHUNK_OBJECT
    from pydr.endpoints.s3 import ObjectStore
    from pydr.errors import FormatError

    img = image(s3["tmp"] / "disk.img", 4 << 20)
    protect(s3, img)
    first = replicate(s3)["point_id"]
    (chunk,) = keys(s3, "chunks")
    s3["client"].put_object(Bucket=s3["bucket"], Key=chunk, Body=bytes(MAX_CHUNK_OBJECT + 1))
    said = f"{MAX_CHUNK_OBJECT + 1} bytes or more, more than the {MAX_CHUNK_OBJECT}".encode()
    r = cli(s3, "verify", "vm", "--json")
    assert r.returncode == 7, r.stderr
    problems = json.loads(r.stdout)["problems"]
    assert any(said.decode() in p and chunk in p for p in problems), problems
    r = cli(s3, "materialize", "vm", "--point", str(first), "--to", s3["tmp"] / "out")
    assert r.returncode == 7 and b"damaged" in r.stderr, r.stderr
    objects = ObjectStore(s3["url"])
    real = objects.client

    class NoLength:  # a server that sends no Content-Length: the read itself is bounded
        def __getattr__(self, name):
            return getattr(real, name)

        def get_object(self, **kw):
            r = real.get_object(**kw)
            r.pop("ContentLength", None)
            return r

    objects._client = NoLength()
    with pytest.raises(FormatError, match="more than the 1000 pydr ever writes"):
        objects.get(chunk, max_size=1000)
    assert len(objects.get(chunk, max_size=MAX_CHUNK_OBJECT + 1)) == MAX_CHUNK_OBJECT + 1

"""Replication cycles, points and materialisation for items whose replicas
are in an object store (s3://BUCKET/PREFIX; pydr.endpoints.s3, layout in
docs/FORMAT.md).

A cycle signs each source at 4 KiB and compares it with the signature of
the last point, kept in the vault (vault/objects/ITEM/), so the store is
never read back. The 4 MiB chunks holding a changed block are read, named
by their XXH3-128, and uploaded unless the store has that id already (the
last point names it, or this cycle's interrupted predecessor uploaded it:
its ids are logged in vault/objects/ITEM/pending). All-zero chunks are not
stored. Then the point index is uploaded, and only then the vault records
the point with the index's key: no recorded point names a chunk that is
not stored. The capture is pydr.dr.chunkcapture; this module holds the
rest: the store of an item, restore, verify and garbage collection.

Garbage collection (:func:`collect_garbage`) marks every chunk named by any
index under the prefix and sweeps the others, but never one younger than
the grace period: a cycle running meanwhile has uploaded its new chunks
within it (docs/FORMAT.md, "Garbage collection").
"""

import concurrent.futures as cf
import contextlib
import os
import threading
import time

from ..engine.chunks import ZERO_ID, PointIndex, decode_chunk
from ..engine.oserrors import naming
from ..errors import FormatError, InvalidState

BLOCK = 4096  # the comparison's block: what changed, in 4 KiB blocks
UPLOADS = 8   # chunks in flight
DEFAULT_GRACE = 24 * 3600.0
PENDING_TRUST = 0.5  # a logged upload is trusted for this share of the grace period


def is_object_item(vault, name):
    """Whether the item replicates to an object store."""
    return any(d["replica"].startswith("s3://") for d in vault.disks(name))


def has_object_points(vault, name):
    """Whether the item's points are in an object store (also after its
    failover moved its replicas to local disks)."""
    return vault.db.execute("SELECT 1 FROM object_indexes WHERE item=? LIMIT 1",
                            (name,)).fetchone() is not None


def store_of(vault, name):
    """The ObjectStore of the item's replicas, or of its points."""
    from ..endpoints.s3 import ObjectStore

    row = vault.db.execute("SELECT store FROM object_indexes WHERE item=? ORDER BY point DESC "
                           "LIMIT 1", (name,)).fetchone()
    if row is not None and not is_object_item(vault, name):
        return ObjectStore(row["store"])
    return vault.endpoint(name, vault.disks(name)[0]["replica"]).store


def _dir(vault, name):
    path = os.path.join(vault.dir, "objects", name)
    os.makedirs(path, mode=0o700, exist_ok=True)  # in the vault: private
    return path


def latest_index(vault, name):
    """(point id, index key, local name) of the item's newest point, or None."""
    row = vault.db.execute("SELECT point, key FROM object_indexes WHERE item=? ORDER BY point "
                           "DESC LIMIT 1", (name,)).fetchone()
    if row is None:
        return None
    return row["point"], row["key"], os.path.basename(row["key"])[:-len(".pidx")]


def drop_indexes(vault, name, points=None):
    """Delete the index objects of the item's points in `points` (all when
    None), then their records. A failure keeps both, for a later try."""
    store = store_of(vault, name)
    rows = vault.db.execute("SELECT point, key FROM object_indexes WHERE item=?",
                            (name,)).fetchall()
    rows = [r for r in rows if points is None or r["point"] in points]
    if not rows:
        return 0
    store.delete(r["key"] for r in rows)
    with vault.db:
        vault.db.execute("BEGIN IMMEDIATE")
        for r in rows:
            vault.db.execute("DELETE FROM object_indexes WHERE item=? AND point=?",
                             (name, r["point"]))
    return len(rows)


_coders = threading.local()  # a zstd decompressor per thread


def fetch_chunk(store, ident):
    """The verified bytes of chunk `ident`; FileNotFoundError if the store
    lacks it, FormatError (naming its key) if it is corrupt."""
    import zstandard

    key = store.chunk_key(ident)
    blob = store.get(key)
    if not hasattr(_coders, "zd"):
        _coders.zd = zstandard.ZstdDecompressor()
    return decode_chunk(blob, ident, _coders.zd, where=store.url(key))


def restore_disk(vault, name, point_id, disk, dest, *, threads=None, progress=None):
    """Write disk `disk` of `name` at `point_id` to the local path `dest`
    (replaced atomically): every chunk downloaded in parallel and verified
    against its id; zero chunks left as holes. A missing or corrupt chunk is
    reported with its id and offset, and nothing is renamed over `dest`."""
    row = vault.db.execute("SELECT key FROM object_indexes WHERE item=? AND point=?",
                           (name, point_id)).fetchone()
    if row is None:
        raise InvalidState(f"point {point_id} of {name!r} has no index in the vault",
                           path=vault.dir)
    store = store_of(vault, name)
    index = PointIndex.decode(store.get(row["key"]), store.url(row["key"]))
    if disk["idx"] not in index.disks:
        raise FormatError(f"the point index has no disk {disk['idx']}", path=store.url(row["key"]))
    size, ids = index.disks[disk["idx"]]
    from ..engine.restore import install

    tmp = dest + ".pydr-new"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the store keeps no bits: private (also a killed run's leftover)
            with naming(dest):
                os.ftruncate(fd, size)

            def fetch(i):
                try:
                    data = fetch_chunk(store, ids[i])
                except FileNotFoundError:
                    raise FormatError(f"chunk {ids[i].hex()} (disk {disk['idx']}, offset "
                                      f"{i * index.chunk_size}) is missing from the store",
                                      path=store.url(store.chunk_key(ids[i]))) from None
                with naming(dest):  # a full disk names the disk being restored
                    os.pwrite(fd, data, i * index.chunk_size)

            wanted = [i for i, ident in enumerate(ids) if ident != ZERO_ID]
            with cf.ThreadPoolExecutor(max_workers=threads or UPLOADS) as pool:
                for _ in pool.map(fetch, wanted):
                    pass
            install(tmp, dest, fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return "download"


def verify(vault, name, point_id=None, sample=100.0):
    """Check the item's point indexes (all, or `point_id`'s) and their chunks:
    every one downloaded and hashed, or a random `sample` percent of them.
    Returns {"points", "chunks", "checked", "problems": [text]}."""
    import random

    rows = vault.db.execute("SELECT point, key FROM object_indexes WHERE item=? ORDER BY point",
                            (name,)).fetchall()
    if point_id is not None:
        rows = [r for r in rows if r["point"] == point_id]
        if not rows:
            raise InvalidState(f"{name!r} has no point {point_id} in an object store",
                               path=vault.dir)
    store = store_of(vault, name)
    problems, chunks = [], {}
    for r in rows:
        try:
            index = PointIndex.decode(store.get(r["key"]), store.url(r["key"]))
        except (FormatError, FileNotFoundError) as exc:
            problems.append(f"point {r['point']}: {exc}")
            continue
        for idx, (_, ids) in index.disks.items():
            for i, ident in enumerate(ids):
                if ident != ZERO_ID:
                    chunks.setdefault(ident, (r["point"], idx, i * index.chunk_size))
    ids = sorted(chunks)
    if sample < 100.0:
        ids = random.sample(ids, max(1, round(len(ids) * sample / 100.0))) if ids else []
    def check(ident):
        point, idx, offset = chunks[ident]
        try:
            fetch_chunk(store, ident)
        except FileNotFoundError:
            return f"chunk {ident.hex()} is missing (point {point}, disk {idx}, offset {offset})"
        except FormatError as exc:
            return f"{exc} (point {point}, disk {idx}, offset {offset})"
        return None

    with cf.ThreadPoolExecutor(max_workers=UPLOADS) as pool:
        problems += [p for p in pool.map(check, ids) if p]
    return {"item": name, "points": len(rows), "chunks": len(chunks), "checked": len(ids),
            "problems": problems}


def collect_garbage(store, *, grace=DEFAULT_GRACE, dry_run=False, now=None):
    """Mark and sweep: delete the chunks under the store's prefix that no
    point index there names and that are older than `grace` seconds.
    Refuses to sweep when an index cannot be read (it might name them).
    Returns {"indexes", "chunks", "referenced", "swept", "young", "bytes"}."""
    start = time.time() if now is None else now
    referenced, indexes = set(), 0
    for key, _, _ in store.list("indexes"):
        if not key.endswith(".pidx"):
            continue
        try:
            referenced |= PointIndex.decode(store.get(key), store.url(key)).chunk_ids()
        except (FileNotFoundError, FormatError) as exc:
            raise InvalidState(f"garbage collection stopped before sweeping: {exc}; run "
                               f"'pydr verify' on the item, or remove that index",
                               path=store.url(key)) from None
        indexes += 1
    doomed, young, total, swept_bytes = [], 0, 0, 0
    for key, modified, size in store.list("chunks"):
        total += 1
        try:
            ident = bytes.fromhex(key.rpartition("/")[2])
        except ValueError:
            continue  # not ours
        if ident in referenced:
            continue
        if modified > start - grace:  # maybe a running cycle's: never swept
            young += 1
            continue
        doomed.append(key)
        swept_bytes += size
    if not dry_run:
        store.delete(doomed)
    return {"store": store.spec, "indexes": indexes, "chunks": total,
            "referenced": len(referenced), "swept": len(doomed), "young": young,
            "bytes": swept_bytes, "dry_run": dry_run}

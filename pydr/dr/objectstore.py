"""Replication cycles for items whose replicas are in an object store
(s3://BUCKET/PREFIX; pydr.endpoints.s3, layout in docs/FORMAT.md). Their
points -- materialising, failover, retention, verify and garbage
collection -- are the chunk index's (pydr.dr.pointstores.chunkindex).

A cycle signs each source at 4 KiB and compares it with the signature of
the last point, kept in the vault (vault/objects/ITEM/), so the store is
never read back. The 4 MiB chunks holding a changed block are read, named
by their XXH3-128, and uploaded unless the store has that id already (the
last point names it, or this cycle's interrupted predecessor uploaded it:
its ids are logged in vault/objects/ITEM/pending). All-zero chunks are not
stored. Then the point index is uploaded, and only then the vault records
the point with the index's key: no recorded point names a chunk that is
not stored.

Garbage collection (pydr.dr.pointstores.chunkindex.collect_garbage) never
sweeps a chunk younger than the grace period: a cycle running meanwhile has
uploaded its new chunks within it (docs/FORMAT.md, "Garbage collection").
"""

import concurrent.futures as cf
import contextlib
import os
import threading
import time
import uuid

from ..engine import crashpoints
from ..engine.chunks import CHUNK_SIZE, ZERO_ID, PointIndex, chunk_count, chunk_id, encode_chunk
from ..engine.oserrors import naming
from ..errors import FormatError, InvalidState
from .agent import item_cut

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


class _Limiter:
    """At most `rate` bytes a second across the upload threads (--bwlimit)."""

    def __init__(self, rate):
        self.rate, self.lock, self.next = rate, threading.Lock(), time.monotonic()

    def take(self, n):
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + n / self.rate
        if start > now:
            time.sleep(start - now)


class _Pending:
    """The chunk ids this item's cycles uploaded that no recorded point names
    yet: a cycle killed half-way is resumed without uploading them again."""

    def __init__(self, path, grace):
        self.path, self.ids, self.lock = path, set(), threading.Lock()
        trusted = time.time() - grace * PENDING_TRUST
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            for line in f:
                when, _, hexid = line.strip().partition(" ")
                with contextlib.suppress(ValueError):
                    if float(when) >= trusted and len(hexid) == 32:
                        self.ids.add(bytes.fromhex(hexid))
        self.f = open(path, "a")

    def add(self, ident):
        with self.lock, naming(self.path):
            self.ids.add(ident)
            self.f.write(f"{time.time():.3f} {ident.hex()}\n")
            self.f.flush()

    def close(self, done):
        self.f.close()
        if done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _disk_chunks(store, src_path, sig, prev_sig, prev_ids, known, pending, limiter, stats,
                 uploads):
    """The chunk ids of one disk; uploads the ones the store lacks."""
    import numpy as np
    import zstandard

    size = sig.size
    n = chunk_count(size)
    per = CHUNK_SIZE // BLOCK
    zero = sig.zero_mask
    if prev_sig is not None and prev_ids is not None and prev_sig.size == size:
        changed_blocks = sig.changed_blocks(prev_sig)
    else:
        changed_blocks = np.ones(sig.block_count, dtype=np.bool_)
    ids = [None] * n
    fd = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    local = threading.local()
    counted = threading.Lock()

    def count(**n):
        with counted:
            for k, v in n.items():
                stats[k] += v

    try:
        def one(i):
            start = i * per
            if zero[start:start + per].all():
                return i, ZERO_ID
            if not changed_blocks[start:start + per].any():
                return i, prev_ids[i]
            length = min(CHUNK_SIZE, size - i * CHUNK_SIZE)
            data = os.pread(fd, length, i * CHUNK_SIZE)
            count(read=len(data))
            ident = chunk_id(data)
            if ident in known or ident in pending.ids:
                count(reused=1)
                return i, ident
            if not hasattr(local, "zc"):
                local.zc = zstandard.ZstdCompressor(level=3)
            blob = encode_chunk(data, ident, local.zc)
            limiter.take(len(blob))
            store.put(store.chunk_key(ident), blob)
            pending.add(ident)
            count(uploaded=1, bytes=len(blob))
            crashpoints.reached("s3.chunk")
            return i, ident

        with cf.ThreadPoolExecutor(max_workers=uploads) as pool:
            for i, ident in pool.map(one, range(n)):
                ids[i] = ident
    finally:
        os.close(fd)
    return ids


def cycle_item(vault, name, *, app_consistent=False, resync_all=False, bwlimit=None,
               uploads=UPLOADS, grace=DEFAULT_GRACE):
    """The disks of one item into its object store; returns (index key,
    local name, stats, cut) for the caller to record."""
    from ..engine.signatures import Signature, signature

    store = store_of(vault, name)
    store.check()
    row = vault.item(name)
    here = _dir(vault, name)
    prev = None if resync_all else latest_index(vault, name)
    prev_index = None
    if prev is not None:
        local = os.path.join(here, f"{prev[2]}.pidx")
        try:
            with open(local, "rb") as f:
                prev_index = PointIndex.decode(f.read(), local)
        except (OSError, FormatError):  # the local copy is gone: the store has it
            prev_index = PointIndex.decode(store.get(prev[1]), store.url(prev[1]))
    known = prev_index.chunk_ids() if prev_index is not None else set()
    pending = _Pending(os.path.join(here, "pending"), grace)
    stats = {"read": 0, "uploaded": 0, "reused": 0, "bytes": 0}
    limiter = _Limiter(bwlimit)
    disks = vault.disks(name)
    sources = [vault.endpoint(name, d["source"]) for d in disks]
    for d, src in zip(disks, sources):
        if src.local_path is None:
            raise InvalidState(f"{d['source']}: an object-store replica needs a raw file or "
                               f"block device on this machine as its source", path=d["source"])
    hooks = (row["quiesce_hook"], row["thaw_hook"]) if app_consistent else (None, None)
    try:
        with item_cut(name, sources, *hooks) as (snaps, cut):
            crashpoints.reached("cycle.cut")
            new_name = uuid.uuid4().hex
            entries, sigs = {}, {}
            for d, src, snap in zip(disks, sources, snaps):
                path = (snap or src).local_path
                sig = signature(path, block_size=BLOCK, algorithm="xxh3-128")
                prev_sig = None
                if prev_index is not None and d["idx"] in prev_index.disks:
                    with contextlib.suppress(OSError, FormatError):
                        prev_sig = Signature.load(
                            os.path.join(here, f"{prev[2]}.{d['idx']}.sig"))
                prev_ids = prev_index.disks[d["idx"]][1] if prev_sig is not None else None
                ids = _disk_chunks(store, path, sig, prev_sig, prev_ids, known, pending, limiter,
                                   stats, uploads)
                entries[d["idx"]] = (sig.size, ids)
                sigs[d["idx"]] = sig
                crashpoints.reached("cycle.disk")
            blob = PointIndex(name, entries).encode()
            key = store.index_key(name, new_name)
            store.put(key, blob)  # after every chunk it names
            crashpoints.reached("s3.index")
            for idx, sig in sigs.items():  # the next cycle's baseline, once the point is recorded
                sig.save(os.path.join(here, f"{new_name}.{idx}.sig"))
            from ..engine.atomic import atomic_write

            with atomic_write(os.path.join(here, f"{new_name}.pidx")) as f:
                f.write(blob)
    finally:
        pending.close(False)
    return key, new_name, stats, cut


def forget_local(vault, name, keep):
    """Remove the item's local signatures and index copies but `keep`'s, and
    the pending upload log (its chunks are named by the point just recorded)."""
    here = _dir(vault, name)
    for f in os.listdir(here):
        if not f.startswith(keep + "."):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(here, f))


def forget_orphans(vault, name):
    """Delete the item's indexes in the store that no point records: those of
    cycles killed after they uploaded their index, before the point was
    recorded (the vault's lock keeps any other cycle of the item out)."""
    store = store_of(vault, name)
    recorded = {r["key"] for r in vault.db.execute(
        "SELECT key FROM object_indexes WHERE item=?", (name,))}
    store.delete(key for key, _, _ in store.list(f"indexes/{name}") if key not in recorded)


def replicate(vault, names, *, app_consistent=False, progress=None, threads=None,
              resync_all=False, bwlimit=None):
    """One cycle of items whose replicas are in object stores: each item
    uploads what changed, then all succeeded items are recorded with one
    point id. A failure marks the item's job failed and its health critical
    (refused credentials, a missing bucket) or warning (recoverable), and
    re-raises after the others are recorded."""
    from .replication import (CycleResult, check_can_replicate, check_hooks, check_not_stuck,
                              record_point)
    from .points import apply_retention
    from .retry import recoverable

    del progress, threads  # the upload's progress is its jobs'
    start = time.monotonic()
    rows = [vault.item(n) for n in names]
    check_can_replicate(vault, rows)
    check_not_stuck(vault, names, resync_all)
    if app_consistent:
        check_hooks(vault, rows)
    for r in rows:
        vault.begin(r["name"], "replicate", f"pydr replicate {r['name']}"
                    + (" --resync" if resync_all else ""))
    jobs = {r["name"]: vault.start_job("replicate", r["name"]) for r in rows}
    done, point_id, totals, error = [], None, {"bytes": 0, "read": 0}, None
    consistency = "app-consistent" if app_consistent else "crash-consistent"
    for r in rows:
        name = r["name"]
        try:
            key, local, stats, cut = cycle_item(vault, name, app_consistent=app_consistent,
                                                resync_all=resync_all, bwlimit=bwlimit)
            sent = stats["bytes"]
            point_id = record_point(
                vault, [name], consistency=consistency, cuts={name: cut},
                bytes_by_item={name: sent}, point_id=point_id,
                extra=lambda db, pid: db.execute(
                    "INSERT INTO object_indexes VALUES (?,?,?,?,?)",
                    (name, pid, store_of(vault, name).spec, key, sent)))
            crashpoints.reached("cycle.point")
            forget_local(vault, name, local)
            forget_orphans(vault, name)
            apply_retention(vault, name)
            vault.end_job(jobs[name], "succeeded", bytes_transferred=sent)
            crashpoints.reached("cycle.done")
            done.append(name)
            totals["bytes"] += sent
            totals["read"] += stats["read"]
        except BaseException as exc:
            vault.end_job(jobs[name], "cancelled" if isinstance(exc, KeyboardInterrupt)
                          else "failed", error=str(exc))
            vault.end(name, "replicate", health="warning" if recoverable(exc) else "critical",
                      last_error=str(exc))
            if not isinstance(exc, Exception):
                raise
            error = error or exc
    if error is not None:
        raise error
    return CycleResult(point_id, done, totals["bytes"], totals["read"],
                       time.monotonic() - start, consistency, list(jobs.values()))

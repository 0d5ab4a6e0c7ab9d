"""The capture of a chunk index: a cycle of an item whose points are in an
object store (s3://BUCKET/PREFIX; layout in docs/FORMAT.md, the rest in
pydr.dr.objectstore).

A cycle signs each source at 4 KiB and compares it with the signature of
the last point, kept in the vault (vault/objects/ITEM/), so the store is
never read back. The 4 MiB chunks holding a changed block are read, named
by their XXH3-128, and uploaded unless the store has that id already (the
last point names it, or this cycle's interrupted predecessor uploaded it:
its ids are logged in vault/objects/ITEM/pending, and a HEAD says it is
still there). Then the point index is uploaded -- its key logged in the
pending log first, so that an orphan is known as this vault's own -- and
only then the vault records the point with the index's key. Chunks found
missing or corrupt since are logged there as suspect: read and uploaded
again, never carried over from the last index.

:func:`capture_item` knows no vault: it runs here or on the item's host's
Dask worker with the plain dict that :func:`task` builds. Where the vault
is not on that host, the previous point's signatures are not at hand: every
chunk is read and hashed again (only the new ones are uploaded).
"""

import concurrent.futures as cf
import contextlib
import os
import threading
import time
import uuid

from ..endpoints import open_endpoint
from ..engine import crashpoints
from ..engine.atomic import atomic_write, fsync_dir
from ..engine.chunks import CHUNK_SIZE, ZERO_ID, ObjectRef, PointIndex, chunk_count
from ..engine.oserrors import naming
from ..errors import FormatError, InvalidState
from . import checkpoints  # noqa: F401 (registers the tracker of libvirt disks)
from . import tracking
from .agent import cut, worker_host
from .events import Emitter, check_cancel
from .objectstore import (DEFAULT_GRACE, UPLOADS, _dir, chunk_store, latest_index,
                          put_back_config, store_of)

BLOCK = 4096  # the comparison's block: what changed, in 4 KiB blocks
PENDING_TRUST = 0.5  # a logged upload is trusted for this share of the grace period


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
    yet: a cycle killed half-way is resumed without uploading them again.
    Each line is "TIME ID [VERSION RETAIN_UNTIL]" ("-" for none): the
    version a reuse must name, in a versioned bucket."""

    def __init__(self, path, grace):
        self.path, self.ids, self.lock, self.f = path, set(), threading.Lock(), None
        self.refs = {}  # id -> ObjectRef of its logged upload
        if path is None:  # the vault is not on this host: nothing is logged
            return
        trusted = time.time() - grace * PENDING_TRUST
        # errors="replace": a damaged byte spoils its line only (skipped below)
        with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as f:
            for line in f:
                fields = line.split()
                with contextlib.suppress(ValueError, IndexError):
                    # not an "index KEY" or "suspect ID" line
                    if float(fields[0]) >= trusted and len(fields[1]) == 32:
                        ident = bytes.fromhex(fields[1])
                        version, until = (fields[2:4] + ["-", "-"])[:2]
                        self.ids.add(ident)
                        self.refs[ident] = ObjectRef(None if version == "-" else version,
                                                     None if until == "-" else float(until))
        self.f = open(path, "a")

    def add(self, ident, ref=None):
        with self.lock:
            self.ids.add(ident)
            if ref is not None:
                self.refs[ident] = ref
            if self.f is not None:
                version = ref.version if ref is not None and ref.version else "-"
                until = ref.retain_until if ref is not None and ref.retain_until else None
                with naming(self.path):
                    self.f.write(f"{time.time():.3f} {ident.hex()} {version} "
                                 f"{'-' if until is None else f'{until:.0f}'}\n")
                    self.f.flush()

    def close(self, done):
        if self.f is not None:
            self.f.close()
        if done and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _disk_chunks(store, src_path, sig, prev_sig, prev_ids, known, bad, pending, limiter, stats,
                 uploads, *, cancel=None, on_chunk=None, refs=None, prev_refs=None):
    """The chunk ids of one disk; uploads the ones the store lacks, and
    those in `bad` (found missing or corrupt there) again. ``refs`` (a
    pydr.dr.objectlock.CycleRefs) gathers each chunk's ObjectRef, a reuse
    naming the version in ``prev_refs`` (the last point's) or the pending
    log; a chunk that cannot be reused so (its lock) is read and uploaded
    again. ``cancel`` is
    checked before each chunk (Cancelled); ``on_chunk(bytes done, bytes
    total)`` is told as chunks are done, in order."""
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
    device = None if isinstance(src_path, (str, os.PathLike)) else src_path
    if device is not None:  # a tracker's view (a libvirt backup job's export): one reader
        reading = threading.Lock()
        src_path = getattr(device, "name", None) or "the source"

        def pread(length, offset):
            with reading:
                return device.pread(length, offset)
    else:
        fd = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)

        def pread(length, offset):
            return os.pread(fd, length, offset)
    local = threading.local()
    counted = threading.Lock()

    def count(**n):
        with counted:
            for k, v in n.items():
                stats[k] += v

    prev_refs = prev_refs or {}

    def reuse(ident, ref, ask=False):
        if refs is not None:
            return refs.reuse(ident, ref, ask=ask)
        return not ask or store.has_chunk(ident, ref)

    try:
        def one(i):
            check_cancel(cancel, "the upload", src_path)
            start = i * per
            if zero[start:start + per].all():
                return i, ZERO_ID
            if not changed_blocks[start:start + per].any() and prev_ids[i] not in bad \
                    and reuse(prev_ids[i], prev_refs.get(prev_ids[i])):
                return i, prev_ids[i]
            length = min(CHUNK_SIZE, size - i * CHUNK_SIZE)
            data = pread(length, i * CHUNK_SIZE)
            count(read=len(data))
            ident = store.chunk_id(data)
            # the last point's index names it (gc keeps it); a logged upload of a killed
            # cycle may have been swept since (gc --grace shorter than our trust): asked
            if ident not in bad and ((ident in known and reuse(ident, prev_refs.get(ident)))
                                     or (ident in pending.ids and reuse(
                                         ident, pending.refs.get(ident), ask=True))):
                count(reused=1)
                return i, ident
            if not hasattr(local, "zc"):
                local.zc = zstandard.ZstdCompressor(level=3)
            ref, sent = store.put_chunk(ident, data, local.zc, throttle=limiter.take)
            pending.add(ident, ref)
            if refs is not None:
                refs.added(ident, ref)
            bad.discard(ident)  # sound again: the rest of this cycle may reuse it
            count(uploaded=1, bytes=sent)
            crashpoints.reached("s3.chunk")
            return i, ident

        with cf.ThreadPoolExecutor(max_workers=uploads) as pool:
            for i, ident in pool.map(one, range(n)):
                ids[i] = ident
                if on_chunk is not None:
                    on_chunk(min(size, (i + 1) * CHUNK_SIZE), size)
    finally:
        if device is None:
            os.close(fd)
    return ids


def _log(vault, name, kind, values):
    """Append (durably: the file and, once made, its directory) one line
    "TIME KIND VALUE" per value to the item's pending log."""
    path = os.path.join(_dir(vault, name), "pending")
    with naming(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, "".join(f"{time.time():.3f} {kind} {v}\n" for v in values).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path)


def _logged(vault, name, kind):
    """The values of the pending log's lines of `kind`, in order."""
    out = []
    with contextlib.suppress(FileNotFoundError), \
            open(os.path.join(_dir(vault, name), "pending"), errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) == 3 and fields[1] == kind and "\ufffd" not in line:
                out.append(fields[2])
    return out


def log_index(vault, name, key):
    """Log (durably) in the item's pending log that the index `key` is about
    to be uploaded: only keys logged so are ever deleted as orphans (other
    vaults may keep indexes of an item of that name in the same store)."""
    _log(vault, name, "index", [key])


def logged_indexes(vault, name):
    """The index keys the item's pending log names (see :func:`log_index`)."""
    return _logged(vault, name, "index")


def log_suspect(vault, name, idents):
    """Log (durably) in the item's pending log chunk ids found missing or
    corrupt in the store: the next cycle neither reuses them nor trusts
    the last index for the chunks that held them (it reads those again and
    uploads them); the log goes once that cycle's point is recorded."""
    _log(vault, name, "suspect", [i.hex() for i in idents])


def suspect_chunks(vault, name):
    """The chunk ids (hex) the item's pending log names as missing or corrupt."""
    out = set()
    for value in _logged(vault, name, "suspect"):
        with contextlib.suppress(ValueError):
            if len(value) == 32:
                out.add(bytes.fromhex(value).hex())
    return sorted(out)


def task(vault, name, opts, *, uploads=UPLOADS, grace=DEFAULT_GRACE):
    """The capture of item `name` as (function, plain dict) for an executor.
    The point index's name is chosen here, and logged before any upload."""
    row = vault.item(name)
    disks = vault.disks(name)
    for d in disks:
        src = vault.endpoint(name, d["source"])
        if src.local_path is None and src.tracking != "libvirt":
            raise InvalidState(f"{d['source']}: an object-store replica needs a raw file or "
                               f"block device as its source (here, or on its --host)",
                               path=d["source"])
    prev = None if opts.resync_all else latest_index(vault, name)
    prev_row = vault.latest_index(name) if prev is not None else None
    chunks = chunk_store(vault, name)  # an encrypted store is unlocked here, not on a worker
    store = chunks.objects
    repaired = put_back_config(vault, chunks)  # after an attack on it: the recorded config
    lock = _lock_terms(vault, name)
    if lock is not None and chunks.keys is not None:  # the keys the locked points need
        from .objectlock import LockTerms, lock_store_keys

        lock_store_keys(store, LockTerms.from_dict(lock))
    index_name = uuid.uuid4().hex
    log_index(vault, name, store.index_key(name, index_name))
    return capture_item, {
        "item": name, "store": store.spec, "here": _dir(vault, name), "index": index_name,
        "prev": list(prev) if prev is not None else None,
        "prev_digest": prev_row.digest if prev_row is not None else None,
        "disks": [{"idx": d["idx"], "source": d["source"]} for d in disks],
        "rsh": row["rsh"], "remote_pydr": row["remote_pydr"],
        "quiesce_hook": row["quiesce_hook"] if opts.app_consistent else None,
        "thaw_hook": row["thaw_hook"] if opts.app_consistent else None,
        "bwlimit": opts.bwlimit, "uploads": uploads, "grace": grace,
        "suspect": suspect_chunks(vault, name),
        "keys": chunks.keys.export() if chunks.keys is not None else None,
        "lock": lock, "repaired": repaired}


def _lock_terms(vault, name):
    """The Object Lock of the item's policy for a task (LockTerms.to_dict()),
    or None; a damaged lock field of the policy is an error, not no lock."""
    from .objectlock import LockTerms
    from .policy import readable_policy

    policy, damaged = readable_policy(vault, name)
    for field in ("lock_days", "lock_mode"):
        if field in damaged:
            raise damaged[field]
    lock = LockTerms.from_policy(policy)
    return lock.to_dict() if lock is not None else None


def capture_item(task, *, events=None, cancel=None, trackers=None):
    """The disks of one item into its object store. Returns {"item", "host",
    "key" (the point index uploaded), "version" and "retain_until" (its
    ObjectRef), "digest" (hex SHA-256 of it as stored), "local" (its name), "store", "cut",
    "cut_at", "read", "uploaded", "reused", "bytes"} for the caller to record.

    In this process (not on a worker): ``events``, an Emitter
    (pydr.dr.events) of the item, is given each disk's "compare" (its
    signature) and "upload" (its chunks) progress; ``cancel`` (a
    threading.Event) stops the work between chunks and in the signing.
    ``trackers``: per disk, its changed-block tracker or None (in this
    process: a libvirt domain's disks are cut by its backup job), each
    view read whole."""
    from ..endpoints.s3 import ObjectStore
    from ..engine.sealing import DataKeys
    from ..engine.signatures import Signature, signature
    from .chunkstore import ChunkStore, index_digest
    from .objectlock import CycleRefs, LockTerms

    name = task["item"]
    keys = DataKeys.imported(task["keys"]) if task.get("keys") else None
    store = ChunkStore(ObjectStore(task["store"]), keys, LockTerms.from_dict(task.get("lock")))
    refs = CycleRefs(store)
    store.objects.check()
    here = task["here"] if task["here"] and os.path.isdir(task["here"]) else None
    prev = task["prev"]
    prev_digest = task.get("prev_digest")  # what the vault recorded of it: checked
    prev_index = None
    if prev is not None:
        local = os.path.join(here, f"{prev[2]}.pidx") if here else None
        try:
            if local is None:
                raise FileNotFoundError(prev[1])
            with open(local, "rb") as f:
                prev_index = store.decode_index(f.read(), prev[1], local, prev_digest)
        except (OSError, FormatError):  # the local copy is gone: the store has it
            prev_index = store.get_index(prev[1], ObjectRef(*prev[3:5]) if len(prev) > 3
                                         else None, prev_digest)
    known = prev_index.chunk_ids() if prev_index is not None else set()
    bad = set()  # found missing or corrupt: uploaded again (then dropped from here)
    for hexid in task.get("suspect", ()):
        with contextlib.suppress(ValueError):
            bad.add(bytes.fromhex(hexid))
    known -= bad
    pending = _Pending(os.path.join(here, "pending") if here else None, task["grace"])
    pending.ids -= bad
    stats = {"read": 0, "uploaded": 0, "reused": 0, "bytes": 0}
    limiter = _Limiter(task["bwlimit"])
    disks = task["disks"]
    sources = [open_endpoint(d["source"], rsh=task["rsh"], remote_pydr=task["remote_pydr"])
               for d in disks]
    try:
        hooks = [(name, task["quiesce_hook"], task["thaw_hook"])]
        with cut(sources, trackers=trackers, full=True, hooks=hooks) as taken:
            crashpoints.reached("cycle.cut")
            new_name = task["index"]
            entries, sigs = {}, {}
            for d, view in zip(disks, taken.views):
                path = view.local_path if view.local_path is not None else view.dev
                check_cancel(cancel, "the upload", d["source"])
                shown = events.progress(disk=d["idx"], phase="compare", path=d["source"]) \
                    if events else None
                sig = signature(path, block_size=BLOCK, algorithm="xxh3-128", progress=shown,
                                cancel=cancel)
                prev_sig = None
                if here and prev_index is not None and d["idx"] in prev_index.disks:
                    with contextlib.suppress(OSError, FormatError):
                        prev_sig = Signature.load(
                            os.path.join(here, f"{prev[2]}.{d['idx']}.sig"))
                prev_ids = prev_index.disks[d["idx"]][1] if prev_sig is not None else None
                on_chunk = None
                if events:
                    def on_chunk(done, total, idx=d["idx"], where=d["source"]):
                        events.emit("progress", disk=idx, phase="upload", bytes_done=done,
                                    bytes_total=total, path=where)
                ids = _disk_chunks(store, path, sig, prev_sig, prev_ids, known, bad, pending,
                                   limiter, stats, task["uploads"], cancel=cancel,
                                   on_chunk=on_chunk, refs=refs, prev_refs=prev_index.refs
                                   if prev_index is not None else None)
                entries[d["idx"]] = (sig.size, ids)
                sigs[d["idx"]] = sig
                crashpoints.reached("cycle.disk")
            key = store.index_key(name, new_name)
            named = {i for _, ids in entries.values() for i in ids if i != ZERO_ID}
            ref, blob = store.put_index(key, PointIndex(name, entries, refs=refs.of(named)))
            crashpoints.reached("s3.index")
            if here:  # the next cycle's baseline, once the point is recorded
                for idx, sig in sigs.items():
                    sig.save(os.path.join(here, f"{new_name}.{idx}.sig"))
                with atomic_write(os.path.join(here, f"{new_name}.pidx")) as f:
                    f.write(blob)
    finally:
        pending.close(False)
    return {"item": name, "host": worker_host(), "key": key, "local": new_name,
            "version": ref.version, "retain_until": ref.retain_until,
            "digest": index_digest(blob), "store": store.spec, "cut": taken.kind,
            "cut_at": taken.at, "suspect": list(task.get("suspect", ())),
            "repaired": task.get("repaired"), **stats}


def adopt(vault, name, result):
    """What :func:`capture_item` returned, as the cycle driver records it:
    the point's index row with the point, then the local copies of older
    indexes and the orphans of killed cycles are forgotten."""
    sent = result["bytes"]

    def index_row(store, point_id):
        store.add_index(name, point_id, result["store"], result["key"], sent,
                        result.get("version"), result.get("retain_until"),
                        result.get("digest"))

    def forget():  # the orphans first: the pending log that names them goes with the rest
        handled = set(result.get("suspect", ()))  # a verify meanwhile may have found more
        late = [bytes.fromhex(h) for h in suspect_chunks(vault, name) if h not in handled]
        forget_orphans(vault, name)
        forget_local(vault, name, result["local"])
        if late:
            log_suspect(vault, name, late)
        if result.get("repaired"):  # the point is sound; the store was attacked: say so
            with vault.transaction():
                vault.set_item(name, health="warning", last_error=result["repaired"])

    return {"items": {name: {"cut": result["cut"], "cut_at": result.get("cut_at"),
                             "bytes": sent, "read": result["read"], "host": result["host"]}},
            "steps": [], "trackers": [], "extra": {name: index_row}, "after": [forget]}


def check(vault, names, opts):
    """Nothing to check before a cycle: the store is asked when it runs."""


def capture(vault, names, opts, jobs):
    """The capture of the items `names` (one, or a group's) in this process,
    one after the other; an index uploaded for an item whose group then
    fails is recorded by no point: the next cycle of the item deletes it."""
    captured = {"items": {}, "steps": [], "trackers": [], "extra": {}, "after": []}
    for name in names:
        check_cancel(opts.cancel, "the replication cycle")
        fn, argument = task(vault, name, opts)
        vault.update_job(jobs[name], state="running", started=time.time())
        shown = Emitter(opts.events, "replicate", name, jobs.get(name))
        # a libvirt domain's disks: cut by its tracker here (never on a worker)
        trackers = [tracking.tracker(vault, name, d) if d["tracking"] == "libvirt" else None
                    for d in vault.disks(name)]
        if not any(trackers):
            trackers = None
        try:
            one = adopt(vault, name, fn(argument, events=shown, cancel=opts.cancel,
                                        trackers=trackers))
        except BaseException:
            for t in trackers or ():
                if t is not None:
                    with contextlib.suppress(Exception):  # the next cycle deletes it
                        t.abort()
            raise
        if trackers:  # recorded with the point: the checkpoint, the domain's XML
            one["trackers"] = [t for t in trackers if t is not None]
            one["extra"] = {**one["extra"], f"{name}#machine": one["trackers"][0].point_extra()}
        for k, v in one.items():
            if isinstance(v, dict):
                captured[k].update(v)
            else:
                captured[k] += v
    return captured


def forget_local(vault, name, keep):
    """Remove the item's local signatures and index copies but `keep`'s, and
    the pending upload log (its chunks are named by the point just recorded)."""
    here = _dir(vault, name)
    for f in os.listdir(here):
        if not f.startswith(keep + "."):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(here, f))


def forget_orphans(vault, name):
    """Delete the indexes this vault's cycles of the item logged and no point
    records: those of cycles killed after they uploaded their index, before
    the point was recorded (the vault's lock keeps any other cycle of the
    item out). Never an index it did not log: another vault's item of the
    same name may keep its points under the same prefix. In a bucket with
    versions each of their versions goes (a delete marker would leave the
    index for gc to read); a locked one stays until its lock ends."""
    store = store_of(vault, name)
    recorded = vault.index_keys(name)
    mine = store.key("indexes", name) + "/"
    orphans = [key for key in dict.fromkeys(logged_indexes(vault, name))
               if key not in recorded and key.startswith(mine) and key.endswith(".pidx")
               and "/" not in key[len(mine):]]
    if orphans and store.versioned():
        gone = set(orphans)
        store.delete_versions([(k, v) for k, v, *_ in store.versions(f"indexes/{name}")
                               if k in gone and v is not None])  # the locked are refused
    else:
        store.delete(orphans)



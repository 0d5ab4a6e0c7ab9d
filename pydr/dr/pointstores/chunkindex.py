"""The chunk index: an item's points in an object store (s3://BUCKET/PREFIX;
pydr.endpoints.s3, layout in docs/FORMAT.md). pydr.dr.pointstores.base
describes the interface.

Each point is one point index naming the 4 MiB chunks of every disk by
their XXH3-128 (all-zero chunks are not stored). A point is materialised
by downloading its chunks in parallel, each checked against its id, into a
file renamed into place when whole. A failover downloads the point into
the directory given with --to, and the disks there are the item's replicas
from then on (its points stay in the store until commit drops their
indexes). Garbage collection (:func:`collect_garbage`) sweeps the chunks no
index names, never one younger than the grace period (docs/FORMAT.md,
"Garbage collection"). Capturing a cycle is pydr.dr.objectstore's.
"""

import concurrent.futures as cf
import errno
import contextlib
import functools
import os
import random
import time

from ...endpoints.s3 import SCHEME
from ...engine.chunks import ZERO_ID, ObjectRef
from ...engine.oserrors import naming
from ...engine.progress import Throttle
from ...engine.restore import install
from ...errors import (Cancelled, DamagedPoint, FormatError, InvalidArgument, InvalidState,
                       UnsupportedFile, VaultDamaged)
from ..objectstore import (DEFAULT_GRACE, UPLOADS, chunk_store, chunk_store_at,
                           has_object_points, is_object_item, store_of)
from .. import chunkcapture
from .base import PointStore, protected_disks
from .specs import check_one_kind

#: The states in which a failover has moved replicas to this machine.
FAILED_OVER = ("failing-over", "failed-over", "committing")


class ChunkIndex(PointStore):
    capture = chunkcapture
    kind = "chunk index"

    @classmethod
    def holds(cls, vault, name):
        """Replicas in an object store, or points there still (a failover
        moved the replicas to local disks; commit drops the indexes)."""
        return is_object_item(vault, name) or has_object_points(vault, name)

    @classmethod
    def check_records(cls, vault, name):
        """Every replica in one object store, no undo step, and every point
        with its index (but while a commit drops them). Replicas on this
        machine only where a failover brought the points up: in its --to
        directory, named like the disk, while the item is failed over."""
        row, disks = vault.item(name), vault.disks(name)

        def damaged(why):
            return VaultDamaged(f"item {name!r} keeps its points in a chunk index, but {why}",
                                path=vault.db.path)

        try:
            check_one_kind([d["replica"] for d in disks if d["replica"].startswith(SCHEME)])
        except ValueError as exc:
            raise damaged(f"its replicas are in more than one object store ({exc})") from None
        stepped = [d["idx"] for d in disks if vault.current_step(name, d["idx"])]
        if stepped:
            raise damaged(f"the vault records undo steps of its disks {stepped} (a step "
                          f"chain's points)")
        indexed = {r.point for r in vault.index_rows(name)}
        bare = [p["id"] for p in vault.points(name) if p["id"] not in indexed]
        if bare and row["state"] != "committing":
            raise damaged(f"its points {bare} have no point index (a step chain's points)")
        up = row["failover_dir"] if row["state"] in FAILED_OVER else None
        astray = [d["replica"] for d in disks if not d["replica"].startswith(SCHEME) and (
            up is None or d["replica"] != os.path.join(up, os.path.basename(d["replica"])))]
        if astray:
            raise damaged(f"its replicas {', '.join(astray)} are not in an object store, nor "
                          f"where a failover brought its points up")

    @classmethod
    def collector_at(cls, vault, spec):
        """collect_garbage for the store `spec` names (s3://BUCKET/PREFIX),
        whichever items use it; None for another spec."""
        if not spec.startswith(SCHEME):
            return None
        return functools.partial(collect_garbage, chunk_store_at(vault, spec))

    def _index_key(self, point_id):
        index = self.vault.index_of(self.name, point_id)
        if index is None:
            raise InvalidState(f"point {point_id} of {self.name!r} has no index in the vault",
                               path=self.vault.dir)
        return index.key

    # -- a point's disks ----------------------------------------------------------
    def check_point(self, point_id):
        """The point's index is downloaded and decoded, and the store asked
        (HEAD) for every chunk it names, before any state changes; a chunk
        gone marks the points that name it (exit 7, naming the chunk, its
        disk and offset). A corrupt chunk is found as it is downloaded
        (whole or not at all)."""
        key = self._index_key(point_id)
        row = self.vault.index_of(self.name, point_id)
        store = chunk_store(self.vault, self.name)
        try:
            index = store.get_index(key, index_ref(row), row.digest)
            for d in self.vault.disks(self.name):
                if d["idx"] not in index.disks:
                    raise FormatError(f"the point index has no disk {d['idx']}",
                                      path=store.url(key))
        except (FileNotFoundError, FormatError) as exc:
            reason = f"its point index cannot be read: {exc}"
            self.vault.mark_damaged(self.name, [point_id], reason)
            raise DamagedPoint(f"recovery point {point_id} of {self.name!r}: {reason}",
                               path=store.url(key)) from None
        where = {}  # chunk id -> (disk, offset) of its first use
        for idx, (_, ids) in sorted(index.disks.items()):
            for i, ident in enumerate(ids):
                if ident != ZERO_ID:
                    where.setdefault(ident, (idx, i * index.chunk_size))
        idents = sorted(where)
        refs = index.refs
        with cf.ThreadPoolExecutor(max_workers=UPLOADS) as pool:
            there = list(pool.map(lambda i: store.has_chunk(i, refs.get(i)), idents))
        missing = {i: f"chunk {i.hex()} (disk {where[i][0]}, offset {where[i][1]}) is missing "
                      f"from the store" for i, ok in zip(idents, there) if not ok}
        if missing:
            note_damage(self.vault, self.name, store, missing)
            first = min(missing, key=lambda i: where[i])
            raise DamagedPoint(f"recovery point {point_id} of {self.name!r} needs "
                               f"{missing[first]}", path=store.url(store.chunk_key(first)),
                               offset=where[first][1])

    def materialize_disk(self, point_id, disk, dest, *, threads=None, drill=False,
                         method="auto", progress=None, cancel=None):
        """Downloaded to a file on this machine ("download"; `method` "auto"
        or "copy": an object store cannot clone or overlay)."""
        self._refuse_method(method)
        if dest.local_path is None:
            raise InvalidState(f"{dest}: points of an object store are materialised on this "
                               f"machine: give a local directory", path=str(dest))
        if drill and dest.exists():
            # the same error as a step chain's drill (pydr.endpoints.local)
            raise FileExistsError(errno.EEXIST, "a test failover does not overwrite files",
                                  str(dest))
        used = restore_disk(self.vault, self.name, point_id, disk, dest.local_path,
                            threads=threads, progress=progress, cancel=cancel)
        self.vault.note_method(used)
        return used

    def _refuse_method(self, method):
        if method not in ("auto", "copy"):
            raise UnsupportedFile(f"the points of {self.name!r} are in an object store: they "
                                  f"are downloaded, never made by {method}",
                                  path=store_of(self.vault, self.name).spec, item=self.name,
                                  hint="leave out --as qcow2 and --reflink")

    # -- failover -----------------------------------------------------------------------
    def failover_dir(self, to):
        """--to DIR is needed: the disks are made there, on this machine, and
        never over a disk the vault protects (checked before anything is
        recorded)."""
        if to is None:
            raise InvalidArgument(f"{self.name!r} is replicated to an object store: a failover "
                                  f"needs a directory on this machine where its disks are made",
                                  item=self.name, hint="give --to DIR")
        to = os.path.abspath(os.fspath(to))
        for d in self.vault.disks(self.name):
            self._failover_path(d, to)
        return to

    def _failover_path(self, disk, to):
        """Where disk `disk` comes up: its replica once a failover made it a
        local disk, else DIR/NAME in the failover directory `to`, refused
        (InvalidState) when that is a disk the vault protects."""
        replica = self.vault.endpoint(self.name, disk["replica"])
        if replica.local_path is not None:  # made by this failover: the item's own replica
            return replica.local_path
        dest = os.path.join(to, replica.path)
        protected = protected_disks(self.vault)
        if os.path.realpath(dest) in protected:  # a typo in --to must not overwrite production
            raise InvalidState(f"refusing to bring a point up over a disk the vault protects "
                               f"({protected[os.path.realpath(dest)]})", path=dest,
                               item=self.name, hint="give another directory")
        return dest

    def bring_up_disk(self, point_id, disk, *, method="auto", progress=None, cancel=None):
        """Downloaded into the failover directory (again each time: exact);
        from then on that local disk is the disk's replica."""
        self._refuse_method(method)
        dest = self._failover_path(disk, self.vault.item(self.name)["failover_dir"])
        used = restore_disk(self.vault, self.name, point_id, disk, dest, progress=progress,
                            cancel=cancel)
        self.vault.note_method(used)
        self.vault.set_disk(self.name, disk["idx"], replica=dest)
        return used

    # -- letting points go ------------------------------------------------------------
    def thin(self, point_ids):
        """A point index holds its whole point (no step to merge): thinning
        is dropping, as retention drops the oldest (the records, then their
        indexes by :meth:`release`)."""
        return super().thin(point_ids)

    def release(self):
        """The index objects of points no longer kept, then their records (a
        failure keeps both for later, with a warning on the item)."""
        stale = self.vault.orphan_index_points(self.name)
        if not stale:
            return
        try:
            drop_indexes(self.vault, self.name, stale)
        except OSError as exc:  # kept for a later retention
            self.vault.set_item(self.name, health="warning", last_error=f"could not drop old "
                                f"point indexes in {store_of(self.vault, self.name).spec}: {exc}")

    def discard(self):
        """Every point index goes; the chunks are 'pydr gc''s to sweep."""
        store = store_of(self.vault, self.name).spec
        # killed cycles' orphan indexes first, while the recorded ones still name the store
        chunkcapture.forget_orphans(self.vault, self.name)
        locked = []
        dropped = drop_indexes(self.vault, self.name, forget_locked=True, locked=locked)
        notes = [f"removed the {dropped} point indexes from {store}: 'pydr gc {store}' sweeps "
                 f"their chunks"]
        if sum(locked):
            notes.append(f"{sum(locked)} point indexes are under Object Lock and stay in "
                         f"{store} until it ends, with the chunks they name")
        return notes

    # -- capabilities ------------------------------------------------------------------
    def verify(self, point_id=None, sample=100.0, *, events=None, cancel=None):
        """Every index downloaded and checked, and its chunks (or a sample);
        ``cancel`` is asked before each chunk (``events`` get no progress)."""
        return verify(self.vault, self.name, point_id, sample, cancel=cancel)

    def collect_garbage(self, **options):
        """Mark and sweep the item's object store (every item's indexes there)."""
        return collect_garbage(chunk_store(self.vault, self.name), **options)


def drop_indexes(vault, name, points=None, *, forget_locked=False, locked=None):
    """Delete the index objects of the item's points in `points` (all when
    None), each by its recorded version, then their records. A failure
    keeps both, for a later try. An index still under Object Lock is not
    deleted and keeps its record (a later retention deletes it), unless
    `forget_locked`; their number is added to `locked` (a list) if given.
    Returns how many were deleted."""
    from .chunkversions import drop_versions

    store = store_of(vault, name)
    rows = [r for r in vault.index_rows(name) if points is None or r.point in points]
    if not rows:
        return 0
    gone, kept = drop_versions(store, rows)
    if locked is not None:
        locked.append(len(kept))
    vault.drop_index_rows(name, [r.point for r in (rows if forget_locked else gone)])
    return len(gone)


def note_damage(vault, name, store, bad):
    """Chunks found missing or corrupt (`bad`: {chunk id: why}): mark the
    item's points whose index names one damaged (never restored), and log
    the ids for the next cycle, which reads those chunks from the source
    again and uploads them (chunkcapture.log_suspect)."""
    if bad:
        chunkcapture.log_suspect(vault, name, sorted(bad))
    rows = vault.index_rows(name)
    for r in rows:
        try:
            named = store.get_index(r.key, index_ref(r), r.digest).chunk_ids()
        except (FileNotFoundError, FormatError) as exc:
            vault.mark_damaged(name, [r["point"]], f"its point index cannot be read: {exc}")
            continue
        hit = sorted(i for i in bad if i in named)
        if hit:
            vault.mark_damaged(name, [r["point"]], bad[hit[0]])


def index_ref(row):
    """The ObjectRef of the index an IndexRecord names."""
    return ObjectRef(row.version, row.retain_until)


def restore_disk(vault, name, point_id, disk, dest, *, threads=None, progress=None,
                 cancel=None):
    """Write disk `disk` of `name` at `point_id` to the local path `dest`
    (replaced atomically): every chunk downloaded in parallel and verified
    against its id; zero chunks left as holes. A missing or corrupt chunk is
    reported with its id and offset, and nothing is renamed over `dest`.
    ``progress`` gets ProgressRecords as chunks arrive; a set ``cancel``
    event stops the downloads (Cancelled), `dest` left as it was."""
    row = vault.index_of(name, point_id)
    if row is None:
        raise InvalidState(f"point {point_id} of {name!r} has no index in the vault",
                           path=vault.dir)
    store = chunk_store(vault, name)
    index = store.get_index(row.key, index_ref(row), row.digest)
    refs = index.refs
    if disk["idx"] not in index.disks:
        raise FormatError(f"the point index has no disk {disk['idx']}", path=store.url(row["key"]))
    size, ids = index.disks[disk["idx"]]
    bad = {}  # chunk id -> why, found missing or corrupt on the way
    tmp = dest + ".pydr-new"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the store keeps no bits: private (also a killed run's leftover)
            with naming(dest):
                os.ftruncate(fd, size)

            def fetch(i):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled", path=dest)
                try:
                    data = store.get_chunk(ids[i], refs.get(ids[i]), check_name=False)
                except FileNotFoundError:
                    bad[ids[i]] = (f"chunk {ids[i].hex()} (disk {disk['idx']}, offset "
                                   f"{i * index.chunk_size}) is missing from the store")
                    raise FormatError(bad[ids[i]],
                                      path=store.url(store.chunk_key(ids[i]))) from None
                except FormatError as exc:
                    bad[ids[i]] = f"{exc} (disk {disk['idx']}, offset {i * index.chunk_size})"
                    raise
                with naming(dest):  # a full disk names the disk being restored
                    os.pwrite(fd, data, i * index.chunk_size)

            wanted = [i for i, ident in enumerate(ids) if ident != ZERO_ID]
            throttle = Throttle(progress, "download", dest, size)
            done = 0
            with cf.ThreadPoolExecutor(max_workers=threads or UPLOADS) as pool:
                for n, _ in enumerate(pool.map(fetch, wanted), 1):
                    done = min(size, (wanted[n - 1] + 1) * index.chunk_size)
                    throttle.report(done, n * index.chunk_size)
            throttle.report(size, done, finished=True)
            install(tmp, dest, fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if bad:
            note_damage(vault, name, store, bad)
        raise
    return "download"


def verify(vault, name, point_id=None, sample=100.0, *, cancel=None):
    """Check the item's point indexes (all, or `point_id`'s) and their chunks:
    every one downloaded and hashed (the version each point recorded), or a
    random `sample` percent of them; in a versioned bucket, every key the
    points name is compared with its current version (tampering).
    Returns {"points", "chunks", "checked", "problems": [text], "tampered":
    [{"kind", "object", "points", "versions", "current", "what", "text"}],
    "damaged_points", "locked_indexes"}: "points" counts the points kept;
    the indexes of points retention released whose objects are locked
    (awaiting deletion once the lock ends) are "locked_indexes", not
    checked."""
    awaiting = vault.orphan_index_points(name)
    rows = [r for r in vault.index_rows(name) if r.point not in awaiting]
    if point_id is not None:
        rows = [r for r in rows if r["point"] == point_id]
        if not rows:
            raise InvalidState(f"{name!r} has no point {point_id} in an object store",
                               path=vault.dir)
    store = chunk_store(vault, name)
    problems, chunks, unreadable, recorded, points_of = [], {}, False, {}, {}
    for r in rows:
        try:
            index = store.get_index(r.key, index_ref(r), r.digest)
        except (FormatError, FileNotFoundError) as exc:
            problems.append(f"point {r['point']}: {exc}")
            unreadable = True
            continue
        for ident in index.chunk_ids():
            points_of.setdefault(ident, []).append(r.point)
            if index.ref(ident).version:
                recorded.setdefault(ident, set()).add(index.ref(ident).version)
        for idx, (_, ids) in index.disks.items():
            for i, ident in enumerate(ids):
                if ident != ZERO_ID:  # each version a point names is checked
                    chunks.setdefault((ident, index.ref(ident).version),
                                      (r["point"], idx, i * index.chunk_size))
    ids = sorted(chunks, key=lambda named: (named[0], named[1] or ""))
    if sample < 100.0:
        ids = random.sample(ids, max(1, round(len(ids) * sample / 100.0))) if ids else []
    def check(named):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"the verify of {name!r} cancelled", path=vault.dir)
        point, idx, offset = chunks[named]
        ident = named[0]
        try:
            store.get_chunk(ident, ObjectRef(named[1]))
        except FileNotFoundError:
            return f"chunk {ident.hex()} is missing (point {point}, disk {idx}, offset {offset})"
        except FormatError as exc:
            return f"{exc} (point {point}, disk {idx}, offset {offset})"
        return None

    with cf.ThreadPoolExecutor(max_workers=UPLOADS) as pool:
        found = {i: p for i, p in zip(ids, pool.map(check, ids)) if p}
    problems += [found[i] for i in sorted(found, key=lambda i: chunks[i])]
    if found:  # the points that name them are never restored; the next cycle uploads them again
        note_damage(vault, name, store, {i[0]: p for i, p in found.items()})
    if unreadable:
        note_damage(vault, name, store, {})
    damaged = [p["id"] for p in vault.points(name) if p["damaged"]]
    if point_id is not None:
        damaged = [p for p in damaged if p == point_id]
    for pid in damaged:
        reason = vault.point(name, pid)["damaged"]
        if not any(reason in p for p in problems):  # marked by an earlier run
            problems.append(f"point {pid} is damaged: {reason}")
    from .chunkversions import tampering

    tampered = tampering(store, name, rows, recorded, points_of)
    # the config and keys, when the store was opened from their versions (not a key's
    # delete marker alone: `pydr key remove` leaves one above a locked version too)
    every = sorted({r.point for r in rows})  # every point needs them
    tampered = [{**t, "points": every} for t in store.tampered] + tampered
    return {"item": name, "points": len(rows), "chunks": len(chunks), "checked": len(ids),
            "problems": problems, "tampered": tampered, "damaged_points": damaged,
            "locked_indexes": len(awaiting)}


def collect_garbage(store, *, grace=DEFAULT_GRACE, dry_run=False, now=None):
    """Mark and sweep: delete the chunks under the store's prefix that no
    point index there names and that are older than `grace` seconds.
    Refuses to sweep when an index cannot be read (it might name them).
    In a bucket that keeps versions, versions are marked and swept, and
    locked ones skipped (pydr.dr.pointstores.chunkversions.collect_versions).
    Returns {"indexes", "chunks", "referenced", "swept", "young", "bytes",
    "dry_run", "locked" (versions the server refused to delete: locked),
    "foreign" (index versions that are no pydr index), "versions"}."""
    if store.objects.versioned():  # marked and swept by version
        from .chunkversions import collect_versions

        return collect_versions(store, grace=grace, dry_run=dry_run, now=now)
    start = time.time() if now is None else now
    referenced, indexes = set(), 0
    for key, _, _ in store.objects.list("indexes"):
        if not key.endswith(".pidx"):
            continue
        try:
            referenced |= store.get_index(key).chunk_ids()
        except (FileNotFoundError, FormatError) as exc:
            raise InvalidState(f"garbage collection stopped before sweeping: {exc}",
                               path=store.url(key),
                               hint="run 'pydr verify' on the item, or remove that index") from None
        indexes += 1
    doomed, young, total, swept_bytes = [], 0, 0, 0
    for key, modified, size in store.objects.list("chunks"):
        try:
            ident = bytes.fromhex(key.rpartition("/")[2])
        except ValueError:
            continue  # not ours
        if len(ident) != 16 or key != store.chunk_key(ident):
            continue  # not ours: another store nested under chunks/, or a stranger's object
        total += 1
        if ident in referenced:
            continue
        if modified > start - grace:  # maybe a running cycle's: never swept
            young += 1
            continue
        doomed.append(key)
        swept_bytes += size
    if not dry_run:
        store.objects.delete(doomed)
    return {"store": store.spec, "indexes": indexes, "chunks": total,
            "referenced": len(referenced), "swept": len(doomed), "young": young,
            "bytes": swept_bytes, "dry_run": dry_run, "locked": 0, "foreign": 0,
            "versions": False}



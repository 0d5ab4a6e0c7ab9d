"""Replication cycles, recovery points, retention and materialisation.

A cycle replicates every disk of one or more items (a replication group) and
ends in one recovery point per item, all with the same id. The first cycle of
an item is its initial replication (a sparse-aware full copy through resync);
every later one is a delta cycle that compares each source with the replica's
signature cache (the replica is not re-read) and keeps its undo journal as
the disk's next undo step.

The cut: where the sources' file system can clone files (reflink: XFS,
btrfs), every disk of every item in the cycle is cloned first (FICLONE, a
few milliseconds whatever the size) and the cycle reads the clones, so all
disks are read as of one instant: a crash-consistent point even while the
sources are written. Without reflink (ext4, block devices) the sources are
read as they are; the quiesce/thaw hooks then make the point consistent
(the writer is paused for the whole read). Each point records its cut:
"reflink", "quiesce" or "none" (consistent only if nothing wrote meanwhile).
A point is "app-consistent" when the quiesce hook succeeded before the cut.
"""

import contextlib
import os
import time

from ..engine import crashpoints
from ..engine.progress import Record
from ..errors import (AlreadyApplied, BaseMismatch, DamagedJournal, FormatError, HookFailed,
                      InvalidState, PydrError, TrackingLost)
from . import objectstore, ownership, replica_check, stepdigest, tracking
from .agent import steps_kept, transfer_disk
from .drills import check_no_overlay_drill
from .hooks import run_hook
from .points import apply_retention
from .retry import recoverable

JOB_UPDATE_INTERVAL = 0.5


def _cycle_disk(vault, name, d, source, step, has_point, on_progress, threads, resync_all,
                extents):
    """One disk's part of a cycle: resync the replica from `source` (the disk
    or its snapshot) and keep the undo journal as the disk's next step where
    the replica's endpoint keeps steps (the vault, or beside the replica on
    its host). The next step and the one after it are offered: a cycle killed
    after it kept its step, before it was recorded, left the first one
    committed, and it is recorded now. Returns (bytes moved, bytes read,
    [(step, spec, bytes)] to record)."""
    replica = vault.endpoint(name, d["replica"])
    offered = [replica.step_spec(name, d["idx"], step + i, vault.dir) for i in (0, 1)]
    me = owner_of(vault, name, d)
    ownership.record_state(me, replica, writing=True,  # what changes it now is this cycle
                           cache=vault.cache_path(name, d["idx"]))
    moved, read, kept, journal = transfer_disk(
        source, replica, offered=offered, cache=vault.cache_path(name, d["idx"]),
        has_point=has_point, resync_all=resync_all, extents=extents, progress=on_progress,
        threads=threads)
    ownership.record_state(me, replica, writing=False,  # binds the new cache to this replica
                           cache=vault.cache_path(name, d["idx"]))
    replica_check.adopted(vault, name)
    return moved, read, steps_kept(step, offered, kept, journal)


def owner_of(vault, name, d):
    """The Owner record of disk `d` of item `name`: this vault, the item, the disk."""
    return ownership.Owner(vault.vault_id(), vault.dir, name, d["idx"], d["replica"])


def check_one_writer(vault, name, resync_all):
    """Before a cycle of item `name`: each replica must be this item's
    (claimed here when no one owns it: a vault older than schema 8 adopts
    its replicas), and as the item's last cycle left it. A replica changed
    outside pydr breaks every point of the item (rolling steps back onto it
    no longer gives them): they are marked damaged, the signature cache
    dropped, and the item becomes resync-required unless this cycle is the
    --resync that repairs it. Returns the reason, or None."""
    points = vault.points(name)
    reason = None
    for d in vault.disks(name):
        replica = vault.endpoint(name, d["replica"])
        me = owner_of(vault, name, d)
        try:
            ownership.claim(replica, me, exists_in_vault=lambda item: item in vault.items())
        except InvalidState as exc:  # another writer: status says so, not only this command
            vault.set_item(name, health="critical", last_error=str(exc))
            raise
        try:
            recorded = ownership.read_state(vault.dir, name, d["idx"])
        except FormatError as exc:
            recorded = unknown_identity(vault, name, points, resync_all, replica, exc.path,
                                        f"of disk {d['idx']} is damaged ({exc.message} at "
                                        f"offset {exc.offset})")
        if recorded is None and points and not replica_check.adopting(vault, name):
            recorded = unknown_identity(vault, name, points, resync_all, replica,
                                        ownership.state_path(vault.dir, name, d["idx"]),
                                        f"of disk {d['idx']} is missing")
        if recorded is None or recorded.replica != d["replica"]:
            # nothing binds the cache to this replica (an older vault, a swapped
            # or moved replica): it is not used; this cycle reads the replica
            drop_cache(vault, name, d["idx"])
            continue
        if ownership.cache_unbound(recorded, vault.cache_path(name, d["idx"])):
            drop_cache(vault, name, d["idx"])  # put back or swapped: the replica is read
        changed = ownership.changed_outside(recorded, replica) if points else None
        if changed is not None and reason is None:
            reason = f"{changed} outside pydr since point {points[-1]['id']}"
        if changed is not None:
            drop_cache(vault, name, d["idx"])
    if reason is not None:
        broken_chain(vault, name, reason, resync_all)
    return reason


def unknown_identity(vault, name, points, resync_all, replica, path, what):
    """A disk's identity record is damaged or missing while the item has
    points: whether its replica was written outside pydr cannot be told.
    A plain cycle refuses (exit 7, the item resync-required); --resync, the
    repair, goes on without the cache. Returns None."""
    if points and not resync_all:
        reason = (f"the identity record {what}: whether replica {replica} was written "
                  f"outside pydr cannot be told")
        mark_resync_required(vault, name, reason)
        raise FormatError(f"{reason}: run 'pydr replicate {name} --resync'", path=path)
    return None


def broken_chain(vault, name, reason, resync_all):
    """The replicas of `name` are not what its points are rebuilt from: every
    point is marked damaged, and a plain cycle refuses until --resync."""
    vault.mark_damaged(name, [p["id"] for p in vault.points(name)], reason)
    if not resync_all:
        mark_resync_required(vault, name, reason)


def rows_holding(vault, rows, path):
    """The items among `rows` with a replica at `path` (all of them when
    none is: the error did not say which)."""
    holding = [r for r in rows if any(
        vault.endpoint(r["name"], d["replica"]).local_path == path
        for d in vault.disks(r["name"]))]
    return holding or rows


def drop_cache(vault, name, idx):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(vault.cache_path(name, idx))


def record_steps(vault, name, idx, steps):
    """Record the steps [(number, spec, bytes)] of disk `idx`, each with the
    digest of its file when it is on this machine (just written: read from
    the page cache); a step on another host is recorded without one (NULL:
    its size is checked)."""
    for number, spec, size in steps:
        local = vault.endpoint(name, spec).local_path
        found = None
        if local is not None:
            # a step that is not there or is a link: recorded without one, found by the checks
            with contextlib.suppress(FileNotFoundError, DamagedJournal):
                found = stepdigest.digest(local)
        vault.db.execute("INSERT INTO steps(item, idx, step, path, bytes, digest) "
                         "VALUES (?,?,?,?,?,?)", (name, idx, number, spec, size, found))


def record_point(vault, names, *, consistency, cuts, bytes_by_item, trackers=(), point_id=None,
                 steps=(), extra=None):
    """Record, in one transaction, the `steps` [(item, disk index, [(number,
    spec, bytes)])] not yet recorded and a recovery point of each item in
    `names` (cuts and bytes_by_item: by item) at the disks' current steps; the items
    become protected and their replicate operation ends. A new point id is
    allocated with them unless `point_id` is given (a fleet cycle's items
    share one). Returns the point id."""
    now = time.time()
    with vault.db:
        vault.db.execute("BEGIN IMMEDIATE")
        if point_id is None:  # allocated with the points: a failed cycle uses no id
            point_id = vault.db.execute(
                "SELECT value FROM counters WHERE name='point'").fetchone()[0] + 1
            vault.db.execute("UPDATE counters SET value=? WHERE name='point'", (point_id,))
        for name, idx, kept in steps:
            record_steps(vault, name, idx, kept)
        for name in names:
            vault.db.execute("INSERT INTO points(id, item, created, consistency, bytes, cut) VALUES (?,?,?,?,?,?)",
                             (point_id, name, now, consistency, bytes_by_item[name], cuts[name]))
            for d in vault.disks(name):
                vault.db.execute("INSERT INTO point_disks VALUES (?,?,?,?)",
                                 (point_id, name, d["idx"], vault.current_step(name, d["idx"])))
            vault.set_item(name, state="protected", health="ok", last_error=None)
            vault.db.execute("UPDATE items SET operation=NULL, operation_command=NULL, "
                             "operation_args=NULL WHERE name=? AND operation='replicate'", (name,))
        for t in trackers:  # the new bitmaps are the current ones, with the point
            t.record(vault.db)
        if extra is not None:  # more rows of the point (an object store's index): extra(db, id)
            extra(vault.db, point_id)
    return point_id


def check_can_replicate(vault, rows):
    for row in rows:
        if row["state"] not in ("protecting", "protected", "resync-required"):
            raise InvalidState(f"item {row['name']!r} cannot replicate in state {row['state']}",
                               path=vault.dir)
        check_no_overlay_drill(vault, row["name"], "a replication cycle")


def check_not_stuck(vault, names, resync_all):
    """Items in state resync-required replicate only with --resync."""
    stuck = [r for r in (vault.item(n) for n in names) if r["state"] == "resync-required"]
    if stuck and not resync_all:
        why = f" ({stuck[0]['last_error']})" if stuck[0]["last_error"] else ""
        raise InvalidState(f"{', '.join(r['name'] for r in stuck)} needs a resync{why}: run "
                           f"'pydr replicate {stuck[0]['name']} --resync'", path=vault.dir)


def check_hooks(vault, rows):
    missing = [r["name"] for r in rows if not r["quiesce_hook"]]
    if missing:
        raise InvalidState(f"--app-consistent needs quiesce/thaw hooks; items without: "
                           f"{', '.join(missing)}", path=vault.dir)


class CycleResult(Record):
    """point_id, items, bytes_written, bytes_read, seconds, consistency, jobs."""

    _fields = ("point_id", "items", "bytes_written", "bytes_read", "seconds", "consistency",
               "jobs")
    __slots__ = _fields


RESYNC_THRESHOLD = 0.5  # pending changes above this share of a disk need a resync


def mark_resync_required(vault, name, reason):
    vault.set_item(name, state="resync-required", health="warning", last_error=reason)


def replicate(vault, names, *, app_consistent=False, progress=None, threads=None,
              resync_all=False, changed_extents=None, tracking_lost=False, bwlimit=None):
    """Run one replication cycle for the items `names` (one point id shared
    by all of them). Returns CycleResult. Each item gets a job; a failure
    marks its job failed and the item's health critical (or warning when the
    error is recoverable), then re-raises.

    ``changed_extents``: {item: {disk index: [(offset, length), ...]}} from a
    change tracker; only those ranges are compared. ``tracking_lost``: the
    tracker was reset (or the source shut down uncleanly). Either that, or
    pending changes above half a disk, marks the items resync-required, and
    only ``resync_all=True`` (``--resync``: a checksum comparison of both
    sides, the replica re-read) replicates them then. ``bwlimit``: bytes a
    second for uploads to an object store (pydr.dr.objectstore).
    """
    start = time.monotonic()
    rows = [vault.item(n) for n in names]
    objects = [n for n in names if objectstore.is_object_item(vault, n)]
    if objects and len(objects) < len(names):
        raise InvalidState(f"a cycle cannot mix items replicated to object stores "
                           f"({', '.join(objects)}) with others: replicate them apart",
                           path=vault.dir)
    if objects:
        return objectstore.replicate(vault, names, app_consistent=app_consistent,
                                     resync_all=resync_all, bwlimit=bwlimit)
    fleet = getattr(vault, "fleet", None)
    if fleet is not None and all(r["direction"] == "forward" for r in rows):
        # the fleet checks and records the replicas' identities too
        return fleet.replicate(vault, names, app_consistent=app_consistent, progress=progress,
                               threads=threads, resync_all=resync_all)
    check_can_replicate(vault, rows)
    if tracking_lost:
        for r in rows:
            mark_resync_required(vault, r["name"], "change tracking was lost")
    for r in rows:
        for d in vault.disks(r["name"]) if changed_extents and r["name"] in changed_extents else ():
            pending = sum(int(n) for _, n in changed_extents[r["name"]].get(d["idx"], ()))
            source = vault.endpoint(r["name"], d["source"])
            size = source.size() if source.exists() else 0
            if size and pending > RESYNC_THRESHOLD * size:
                mark_resync_required(vault, r["name"],
                                     f"pending changes ({pending} bytes) exceed half of {d['source']}")
    trackers = {}  # (item, disk index) -> its changed-block tracker
    for r in rows:
        for d in vault.disks(r["name"]):
            t = tracking.tracker(vault, r["name"], d)
            if t is None:
                continue
            trackers[(r["name"], d["idx"])] = t
            if not resync_all and vault.points(r["name"]):
                try:
                    t.validate()
                except TrackingLost as exc:  # never a cycle that sends less than what changed
                    mark_resync_required(vault, r["name"], str(exc))
    for r in rows:
        try:
            check_one_writer(vault, r["name"], resync_all)
        except (OSError, PydrError) as exc:  # a dead site, a lost replica: a failed job, as
            if not isinstance(exc, InvalidState):  # any cycle's (another writer: said there)
                job = vault.start_job("replicate", r["name"])
                vault.end_job(job, "failed", error=str(exc))
                vault.set_item(r["name"], last_error=str(exc),
                               health="warning" if recoverable(exc) else "critical")
            raise
    check_not_stuck(vault, names, resync_all)
    rows = [vault.item(n) for n in names]
    if app_consistent:
        check_hooks(vault, rows)
    for r in rows:  # a killed cycle is finished by running this again
        vault.begin(r["name"], "replicate",
                    f"pydr replicate {r['name']}" + (" --resync" if resync_all else ""))
    jobs = {r["name"]: vault.start_job("replicate", r["name"], state="queued") for r in rows}
    started = set()
    quiesced = []
    snaps = {}
    views = contextlib.ExitStack()  # the cuts of tracked disks, held while they are read
    cuts = {}
    totals = {"written": 0, "read": 0}
    try:
        if app_consistent:
            for r in rows:
                run_hook(r["quiesce_hook"], f"quiesce hook of {r['name']!r}")
                quiesced.append(r)
        plans = []
        sizes = {}
        for r in rows:
            for d in vault.disks(r["name"]):
                source = vault.endpoint(r["name"], d["source"])  # here, or after a reprotect there
                sizes[d["source"]] = source.size()
                plans.append((r, d, source))
        # the cut: clone every disk first, so that all are read as of one instant; a
        # tracked disk starts its next dirty bitmap instead (and a live one is fleeced)
        kinds = set()
        for r, d, source in plans:
            t = trackers.get((r["name"], d["idx"]))
            if t is not None:
                cuts[d["source"]] = views.enter_context(
                    t.cut(full=resync_all or not vault.points(r["name"])))
                kinds.add("fleece" if t.kind == "qmp" else None)
            else:
                snaps[d["source"]] = source.snapshot()
                kinds.add("reflink" if snaps[d["source"]] else None)
        for r, d, source in plans:
            changed = cuts[d["source"]].changed if d["source"] in cuts else None
            pending = sum(n for _, n in changed or ())
            if changed is not None and pending > RESYNC_THRESHOLD * sizes[d["source"]]:
                reason = f"tracked changes ({pending} bytes) exceed half of {d['source']}"
                mark_resync_required(vault, r["name"], reason)
                raise InvalidState(f"{r['name']} needs a resync ({reason}): run 'pydr "
                                   f"replicate {r['name']} --resync'", path=vault.dir)
        cut = kinds.pop() if len(kinds) == 1 and None not in kinds else (
            "quiesce" if app_consistent else "none")
        crashpoints.reached("cycle.cut")
        if cut in ("reflink", "fleece"):
            for r in quiesced:  # the cut is taken: the applications may go on
                run_hook(r["thaw_hook"], f"thaw hook of {r['name']!r}")
            quiesced = []
        total = sum(sizes.values()) or 1
        done_before = 0
        per_item_bytes = {r["name"]: 0 for r in rows}
        for r, d, source in plans:
            name, idx = r["name"], d["idx"]
            if name not in started:
                vault.update_job(jobs[name], state="running", started=time.time())
                started.add(name)
            has_point = bool(vault.points(name))
            step = vault.current_step(name, idx) + 1
            last = [0.0]

            def on_progress(rec, name=name, base=done_before):
                now = time.monotonic()
                if now - last[0] >= JOB_UPDATE_INTERVAL or rec.finished:
                    last[0] = now
                    vault.update_job(jobs[name], progress=min(1.0, (base + rec.done_bytes) / total))
                if progress is not None:
                    progress(rec)

            extents = None
            if changed_extents and name in changed_extents and has_point and not resync_all:
                extents = changed_extents[name].get(idx, [])
            view = source
            if d["source"] in cuts:  # a tracked disk: its cut, and what changed before it
                view, extents = cuts[d["source"]].view, cuts[d["source"]].changed
            moved, read, steps = _cycle_disk(vault, name, d, snaps.get(d["source"]) or view,
                                             step, has_point, on_progress, threads, resync_all,
                                             extents)
            crashpoints.reached("cycle.disk")
            per_item_bytes[name] += moved
            totals["written"] += moved
            # 0 is "read on the source's host", unless a tracker said nothing changed
            totals["read"] += read if read or extents is not None else sizes[d["source"]]
            done_before += sizes[d["source"]]
            record_steps(vault, name, idx, steps)
            crashpoints.reached("cycle.steps")
            vault.update_job(jobs[name], bytes_transferred=per_item_bytes[name])
        views.close()
    except BaseException as exc:
        views.close()
        for t in trackers.values():  # what they tracked goes back into the recording bitmaps
            try:
                t.abort()
            except Exception as lost:  # the next cycle finds the bitmap lost, and resyncs
                vault.set_item(t.item, last_error=f"dirty bitmap not merged back: {lost}")
        for r in rows:
            vault.end_job(jobs[r["name"]], "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed",
                          error=str(exc), bytes_transferred=None)
            health = "critical" if not recoverable(exc) else "warning"
            vault.end(r["name"], "replicate", health=health, last_error=str(exc))
        if isinstance(exc, BaseMismatch) and not isinstance(exc, AlreadyApplied):
            # a replica does not hold what its signature cache said: its cache is
            # dropped, and its item's chain is in doubt
            for r in rows_holding(vault, rows, exc.path):
                for d in vault.disks(r["name"]):
                    drop_cache(vault, r["name"], d["idx"])
                broken_chain(vault, r["name"], f"the replica did not hold what the vault "
                             f"recorded ({exc})", resync_all=False)
        raise
    finally:
        for r in quiesced:
            try:
                run_hook(r["thaw_hook"], f"thaw hook of {r['name']!r}")
            except HookFailed as exc:
                vault.set_item(r["name"], health="warning", last_error=str(exc))
        for snap in snaps.values():
            if snap:
                with contextlib.suppress(OSError):
                    snap.remove_many([snap])
    consistency = "app-consistent" if app_consistent else "crash-consistent"
    point_id = record_point(vault, [r["name"] for r in rows], consistency=consistency,
                            cuts={r["name"]: cut for r in rows}, bytes_by_item=per_item_bytes,
                            trackers=trackers.values())
    crashpoints.reached("cycle.point")
    for t in trackers.values():
        t.commit()
    for r in rows:
        apply_retention(vault, r["name"])
        vault.end_job(jobs[r["name"]], "succeeded", bytes_transferred=per_item_bytes[r["name"]])
        crashpoints.reached("cycle.done")
    return CycleResult(point_id, [r["name"] for r in rows], totals["written"], totals["read"],
                       time.monotonic() - start, consistency, list(jobs.values()))


def replicate_with_retry(vault, names, *, policy=None, **kwargs):
    """replicate(), retried on the schedule of pydr.retry while the errors are
    recoverable; each scheduled retry is recorded on the items (attempts,
    next_retry) so `pydr status` shows it."""
    from .retry import RetryPolicy

    def record(attempt, when, exc):
        for n in names:
            vault.set_item(n, attempts=attempt, next_retry=when, last_error=str(exc))

    policy = policy or RetryPolicy()
    if policy.on_retry is None:
        policy.on_retry = record
    result = policy.run(lambda: replicate(vault, names, **kwargs))
    for n in names:
        vault.set_item(n, attempts=0, next_retry=None)
    return result



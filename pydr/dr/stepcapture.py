"""The capture of a step chain: a replica plus its undo steps (a local file,
a replica on an ssh host, a QEMU/NBD replica). A cycle resyncs each replica
from its source and keeps the undo journal as the disk's next step; the
first cycle of an item is its initial replication (a sparse-aware full
copy). The cycle driver (pydr.dr.cycle) runs it, here (:func:`capture`) or
on the item's host (:func:`task`, run there by pydr.dr.agent.cycle_item),
and records what it returns.

The cut: where the sources' file system can clone files (reflink: XFS,
btrfs), every disk of the unit is cloned first (one FICLONE per disk, a few
milliseconds whatever the size) and the cycle reads the clones, so each disk
is read as of one instant -- its own: the disks are cloned one after the
other. One disk is a crash-consistent point even while it is written;
several are "disk-consistent" (each as a power cut would leave it, not at
one instant), app-consistent when the quiesce hooks hold the writers until
the last disk is cut (pydr.dr.rpo.consistency_of). A disk with
changed-block tracking starts its next dirty bitmap instead (a live one is
fleeced, one QMP transaction per disk). Without either (ext4, block devices) the
sources are read as they are; the quiesce/thaw hooks then make the point
consistent (the writer is paused for the whole read). Each point records its
cut ("reflink", "fleece", "bitmap", "quiesce" or "none") and when it was
taken (pydr.dr.agent.cut; pydr.dr.rpo names what each cut makes a point)."""

import time

from ..engine import crashpoints
from ..errors import AlreadyApplied, BaseMismatch, InvalidState, PydrError, TrackingLost
from . import checkpoints  # noqa: F401 (registers the tracker of libvirt disks)
from . import ownership, replica_check, tracking
from .agent import NeedsResync, cut, cycle_item, extents_to_compare, steps_kept, transfer_disk
from .events import Emitter, check_cancel
from .cyclerecord import (RESYNC_THRESHOLD, broken_chain, check_one_writer, drop_cache,
                          mark_resync_required, owner_of, record_steps, rows_holding)
from .retry import recoverable

JOB_UPDATE_INTERVAL = 0.5


def check(vault, names, opts):
    """Before a unit's cycle: lost or overflowing tracking marks an item
    resync-required; each replica must be the item's and as its last cycle
    left it (pydr.dr.cyclerecord.check_one_writer)."""
    warm = opts.warm
    if warm is None:
        return _check(vault, names, opts)
    for n in names:  # an entry the vault no longer agrees with is dropped
        warm.begin(vault, n)
    try:
        _check(vault, names, opts)
    except BaseException:
        for n in names:  # on any doubt, the next cycle is a cold one
            warm.drop(n, vault.dir)
        raise
    for n in names:
        if vault.item(n)["state"] == "resync-required":  # lost tracking, found just now
            warm.drop(n, vault.dir)


def _check(vault, names, opts):
    rows = [vault.item(n) for n in names]
    warm = opts.warm
    if opts.tracking_lost:
        for r in rows:
            mark_resync_required(vault, r["name"], "change tracking was lost")
    extents = opts.changed_extents or {}
    for r in rows:
        for d in vault.disks(r["name"]) if r["name"] in extents else ():
            pending = sum(int(n) for _, n in extents[r["name"]].get(d["idx"], ()))
            source = vault.endpoint(r["name"], d["source"])
            size = source.size() if source.exists() else 0
            if size and pending > RESYNC_THRESHOLD * size:
                mark_resync_required(vault, r["name"],
                                     f"pending changes ({pending} bytes) exceed half of {d['source']}")
    for r in rows:
        if opts.on_hosts and r["host"] and r["direction"] == "forward":
            continue  # its host validates its bitmaps (pydr.dr.agent), where they are
        for d in vault.disks(r["name"]):
            t = tracking.tracker(vault, r["name"], d, warm)
            if t is not None and not opts.resync_all and vault.points(r["name"]):
                try:
                    t.validate()
                except TrackingLost as exc:  # never a cycle that sends less than what changed
                    mark_resync_required(vault, r["name"], str(exc))
                    if getattr(t, "raise_when_lost", False):  # a libvirt chain: exit 19
                        raise
    for r in rows:
        try:
            check_one_writer(vault, r["name"], opts.resync_all)
        except (OSError, PydrError) as exc:  # a dead site, a lost replica: a failed job, as
            if not isinstance(exc, InvalidState):  # any cycle's (another writer: said there)
                job = vault.start_job("replicate", r["name"])
                vault.end_job(job, "failed", error=str(exc))
                vault.set_item(r["name"], last_error=str(exc),
                               health="warning" if recoverable(exc) else "critical")
            raise


def _cycle_disk(vault, name, d, source, step, has_point, on_progress, threads, resync_all,
                extents, cancel=None):
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
        threads=threads, cancel=cancel)
    ownership.record_state(me, replica, writing=False,  # binds the new cache to this replica
                           cache=vault.cache_path(name, d["idx"]))
    replica_check.adopted(vault, name)
    return moved, read, steps_kept(step, offered, kept, journal)


def capture(vault, names, opts, jobs):
    """The cycle of one unit (`names`: an item, or the items of a group in
    the call) in this process: one cut of all their disks, then each disk
    replicated and its steps recorded. Returns the Captured the driver
    records: {"items": {name: {"cut", "cut_at", "bytes", "read"}}, "trackers", ...}.

    Events (opts.events): per item a "cut" step, then per disk "progress"
    in phase "transfer" (bytes done of the bytes compared, named by the
    replica). opts.cancel is checked before the cut, between disks and by
    the engine while it reads (Cancelled)."""
    rows = [vault.item(n) for n in names]
    emitters = {n: Emitter(opts.events, "replicate", n, jobs.get(n)) for n in names}
    check_cancel(opts.cancel, "the replication cycle")
    warm = opts.warm
    trackers = {}  # (item, disk index) -> its changed-block tracker
    for r in rows:
        for d in vault.disks(r["name"]):
            t = tracking.tracker(vault, r["name"], d, warm)
            if t is not None:
                trackers[(r["name"], d["idx"])] = t
    started = set()
    totals = {"written": 0, "read": 0}
    per_item_bytes = {r["name"]: 0 for r in rows}
    plans = [(r, d, tracking.warm_endpoint(vault, r["name"], d, d["source"], warm))
             for r in rows for d in vault.disks(r["name"])]  # here, or after a reprotect there
    hooks = [(r["name"], r["quiesce_hook"], r["thaw_hook"]) for r in rows] \
        if opts.app_consistent else []

    def thaw_failed(name, exc):
        vault.set_item(name, health="warning", last_error=str(exc))

    try:
        sizes = [source.size() for _, _, source in plans]
        for n in names:
            emitters[n].emit("progress", phase="cut")
        # the cut: each disk at its own instant (a clone, or a tracker's next bitmap)
        with cut([source for _, _, source in plans],
                 trackers=[trackers.get((r["name"], d["idx"])) for r, d, _ in plans],
                 full=[opts.resync_all or not vault.points(r["name"]) for r, _, _ in plans],
                 hooks=hooks, on_thaw_error=thaw_failed) as taken:
            crashpoints.reached("cycle.cut")
            total = sum(sizes) or 1
            done_before = 0
            for (r, d, _), size, view, changed in zip(plans, sizes, taken.views, taken.changed):
                name, idx = r["name"], d["idx"]
                check_cancel(opts.cancel, "the replication cycle")
                if name not in started:
                    vault.update_job(jobs[name], state="running", started=time.time())
                    started.add(name)
                has_point = bool(vault.points(name))
                step = vault.current_step(name, idx) + 1
                last = [0.0]
                shown = emitters[name].progress(disk=idx, phase="transfer", path=d["replica"],
                                                also=opts.progress)

                def on_progress(rec, name=name, base=done_before, shown=shown):
                    now = time.monotonic()
                    if now - last[0] >= JOB_UPDATE_INTERVAL or rec.finished:
                        last[0] = now
                        vault.update_job(jobs[name],
                                         progress=min(1.0, (base + rec.done_bytes) / total))
                    if shown is not None:
                        shown(rec)

                # a tracked disk: what changed before its cut (or all of it: over half)
                extents = extents_to_compare(changed, size)
                given = opts.changed_extents or {}
                if (r["name"], idx) not in trackers and name in given and has_point \
                        and not opts.resync_all:
                    extents = given[name].get(idx, [])
                moved, read, steps = _cycle_disk(vault, name, d, view, step, has_point,
                                                 on_progress, opts.threads, opts.resync_all,
                                                 extents, opts.cancel)
                crashpoints.reached("cycle.disk")
                per_item_bytes[name] += moved
                totals["written"] += moved
                # 0 is "read on the source's host", unless a tracker said nothing changed
                totals["read"] += read if read or extents is not None else size
                done_before += size
                record_steps(vault, name, idx, steps)
                crashpoints.reached("cycle.steps")
                vault.update_job(jobs[name], bytes_transferred=per_item_bytes[name])
            kind, cut_at = taken.kind, taken.at
    except BaseException as exc:
        if warm is not None:  # on any doubt, the next cycle is a cold one
            for r in rows:
                warm.drop(r["name"], vault.dir)
        for t in trackers.values():  # what they tracked goes back into the recording bitmaps
            try:
                t.abort()
            except Exception as lost:  # the next cycle finds the bitmap lost, and resyncs
                vault.set_item(t.item, last_error=f"dirty bitmap not merged back: {lost}")
        if isinstance(exc, TrackingLost):  # found at the cut (a libvirt checkpoint chain)
            for name in {t.item for t in trackers.values() if t.kind == "libvirt"}:
                mark_resync_required(vault, name, str(exc))
        if isinstance(exc, BaseMismatch) and not isinstance(exc, AlreadyApplied):
            # a replica does not hold what its signature cache said: its cache is
            # dropped, and its item's chain is in doubt
            for r in rows_holding(vault, rows, exc.path):
                for d in vault.disks(r["name"]):
                    drop_cache(vault, r["name"], d["idx"])
                broken_chain(vault, r["name"], f"the replica did not hold what the vault "
                             f"recorded ({exc})", resync_all=False)
        raise
    # what a tracker records with the point (a libvirt domain's XML at the cut)
    extra = {t.item: t.point_extra() for t in trackers.values() if hasattr(t, "point_extra")}
    read_by_item = {r["name"]: 0 for r in rows}
    read_by_item[rows[0]["name"]] = totals["read"]  # the unit's reads, counted once
    return {"items": {r["name"]: {"cut": kind, "cut_at": cut_at,
                                  "bytes": per_item_bytes[r["name"]],
                                  "read": read_by_item[r["name"]]} for r in rows},
            "trackers": list(trackers.values()), "steps": [], "extra": extra,
            "after": [] if warm is None else [lambda: [warm.cycle_ended(vault, r["name"])
                                                       for r in rows]]}


def task(vault, name, opts):
    """A fleet task for item `name`: (function, argument) run on its host's
    worker (pydr.dr.agent.cycle_item: it knows no vault)."""
    row = vault.item(name)
    has_point = bool(vault.points(name))
    disks = []
    for d in vault.disks(name):
        replica = vault.endpoint(name, d["replica"])
        step = vault.current_step(name, d["idx"]) + 1
        disks.append({"idx": d["idx"], "source": d["source"], "replica": d["replica"],
                      "step": step, "has_point": has_point, "resync": opts.resync_all,
                      "offered": [replica.step_spec(name, d["idx"], step + i, vault.dir)
                                  for i in (0, 1)],
                      "cache": vault.cache_path(name, d["idx"])})
        if d["tracking"]:  # its bitmaps are cut on the host
            disks[-1].update(tracking=d["tracking"], bitmap=d["bitmap"],
                             generation=d["generation"] or 0, granularity=d["granularity"],
                             full=opts.resync_all or not has_point)
        # what changes the replica now is this cycle
        ownership.record_state(owner_of(vault, name, d), replica, writing=True)
    return cycle_item, {
        "item": name, "vault": vault.dir, "rsh": row["rsh"], "remote_pydr": row["remote_pydr"],
        "threads": opts.threads,
        "quiesce_hook": row["quiesce_hook"] if opts.app_consistent else None,
        "thaw_hook": row["thaw_hook"] if opts.app_consistent else None, "disks": disks}


def adopt(vault, name, result):
    """What a fleet task of item `name` returned, as the driver records it
    (its steps go in with the point)."""
    for d in vault.disks(name):  # binds the cache the task wrote to the replica it left
        ownership.record_state(owner_of(vault, name, d), vault.endpoint(name, d["replica"]),
                               writing=False, cache=vault.cache_path(name, d["idx"]))
    replica_check.adopted(vault, name)
    return {"items": {name: {"cut": result["cut"], "cut_at": result.get("cut_at"),
                             "bytes": sum(d["moved"] for d in result["disks"]),
                             "read": sum(d["read"] or d["size"] for d in result["disks"]),
                             "host": result["host"]}},
            "steps": [(name, d["idx"], [tuple(s) for s in d["steps"]]) for d in result["disks"]],
            "trackers": [_HostBitmap(name, d["idx"], d["bitmap"], d["generation"])
                         for d in result["disks"] if d.get("bitmap")],
            "extra": {}, "after": []}


def failed(vault, name, exc):
    """A capture of `name` failed: tracking found lost or overflowing on its
    host makes it resync-required, as here."""
    if isinstance(exc, NeedsResync):
        mark_resync_required(vault, name, exc.reason)
    elif isinstance(exc, TrackingLost):
        mark_resync_required(vault, name, str(exc))


class _HostBitmap:
    """The bitmap a host's cut started, recorded with the point as the disk's
    current one. The one it replaced is dropped by the host's next cut."""

    def __init__(self, item, idx, bitmap, generation):
        self.item, self.idx, self.bitmap, self.generation = item, idx, bitmap, generation

    def record(self, store):
        store.set_bitmap(self.item, self.idx, self.bitmap, self.generation)

    def commit(self):
        pass

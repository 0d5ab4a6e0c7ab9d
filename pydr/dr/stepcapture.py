"""The capture of a step chain: a replica plus its undo steps (a local file,
a replica on an ssh host, a QEMU/NBD replica). A cycle resyncs each replica
from its source and keeps the undo journal as the disk's next step; the
first cycle of an item is its initial replication (a sparse-aware full
copy). The cycle driver (pydr.dr.cycle) runs it, here (:func:`capture`) or
on the item's host (:func:`task`, run there by pydr.dr.agent.cycle_item),
and records what it returns.

The cut: where the sources' file system can clone files (reflink: XFS,
btrfs), every disk of the unit is cloned first (FICLONE, a few milliseconds
whatever the size) and the cycle reads the clones, so all disks are read as
of one instant: a crash-consistent point even while the sources are
written. A disk with changed-block tracking starts its next dirty bitmap
instead (a live one is fleeced). Without either (ext4, block devices) the
sources are read as they are; the quiesce/thaw hooks then make the point
consistent (the writer is paused for the whole read). Each point records its
cut: "reflink", "fleece", "quiesce" or "none"."""

import contextlib
import time

from ..engine import crashpoints
from ..errors import AlreadyApplied, BaseMismatch, InvalidState, PydrError, TrackingLost
from . import ownership, replica_check, tracking
from .agent import cycle_item, steps_kept, transfer_disk
from .cyclerecord import (RESYNC_THRESHOLD, broken_chain, check_one_writer, drop_cache,
                          mark_resync_required, owner_of, record_steps, rows_holding)
from .hooks import run_hook
from .retry import recoverable

JOB_UPDATE_INTERVAL = 0.5


def check(vault, names, opts):
    """Before a unit's cycle: lost or overflowing tracking marks an item
    resync-required; each replica must be the item's and as its last cycle
    left it (pydr.dr.cyclerecord.check_one_writer)."""
    rows = [vault.item(n) for n in names]
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
        for d in vault.disks(r["name"]):
            t = tracking.tracker(vault, r["name"], d)
            if t is not None and not opts.resync_all and vault.points(r["name"]):
                try:
                    t.validate()
                except TrackingLost as exc:  # never a cycle that sends less than what changed
                    mark_resync_required(vault, r["name"], str(exc))
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


def capture(vault, names, opts, jobs):
    """The cycle of one unit (`names`: an item, or the items of a group in
    the call) in this process: one cut of all their disks, then each disk
    replicated and its steps recorded. Returns the Captured the driver
    records: {"items": {name: {"cut", "bytes", "read"}}, "trackers", ...}."""
    rows = [vault.item(n) for n in names]
    trackers = {}  # (item, disk index) -> its changed-block tracker
    for r in rows:
        for d in vault.disks(r["name"]):
            t = tracking.tracker(vault, r["name"], d)
            if t is not None:
                trackers[(r["name"], d["idx"])] = t
    started, quiesced, snaps, cuts = set(), [], {}, {}
    views = contextlib.ExitStack()  # the cuts of tracked disks, held while they are read
    totals = {"written": 0, "read": 0}
    per_item_bytes = {r["name"]: 0 for r in rows}
    try:
        if opts.app_consistent:
            for r in rows:
                run_hook(r["quiesce_hook"], f"quiesce hook of {r['name']!r}")
                quiesced.append(r)
        plans, sizes = [], {}
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
                    t.cut(full=opts.resync_all or not vault.points(r["name"])))
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
            "quiesce" if opts.app_consistent else "none")
        crashpoints.reached("cycle.cut")
        if cut in ("reflink", "fleece"):
            for r in quiesced:  # the cut is taken: the applications may go on
                run_hook(r["thaw_hook"], f"thaw hook of {r['name']!r}")
            quiesced = []
        total = sum(sizes.values()) or 1
        done_before = 0
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
                if opts.progress is not None:
                    opts.progress(rec)

            extents = None
            given = opts.changed_extents or {}
            if name in given and has_point and not opts.resync_all:
                extents = given[name].get(idx, [])
            view = source
            if d["source"] in cuts:  # a tracked disk: its cut, and what changed before it
                view, extents = cuts[d["source"]].view, cuts[d["source"]].changed
            moved, read, steps = _cycle_disk(vault, name, d, snaps.get(d["source"]) or view,
                                             step, has_point, on_progress, opts.threads,
                                             opts.resync_all, extents)
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
            except PydrError as exc:
                vault.set_item(r["name"], health="warning", last_error=str(exc))
        for snap in snaps.values():
            if snap:
                with contextlib.suppress(OSError):
                    snap.remove_many([snap])
    read_by_item = {r["name"]: 0 for r in rows}
    read_by_item[rows[0]["name"]] = totals["read"]  # the unit's reads, counted once
    return {"items": {r["name"]: {"cut": cut, "bytes": per_item_bytes[r["name"]],
                                  "read": read_by_item[r["name"]]} for r in rows},
            "trackers": list(trackers.values()), "steps": [], "extra": {}, "after": []}


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
    return {"items": {name: {"cut": result["cut"],
                             "bytes": sum(d["moved"] for d in result["disks"]),
                             "read": sum(d["read"] or d["size"] for d in result["disks"]),
                             "host": result["host"]}},
            "steps": [(name, d["idx"], [tuple(s) for s in d["steps"]]) for d in result["disks"]],
            "trackers": [], "extra": {}, "after": []}

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
import subprocess
import time

from . import journal as J
from .errors import PydrError
from .progress import Record
from .sites import by_site, is_remote, site_of
from .sync import resync
from .vault import HookFailed, InvalidState

JOB_UPDATE_INTERVAL = 0.5


def _cycle_disk(vault, name, d, source, step, has_point, on_progress, threads, resync_all,
                extents):
    """One disk's part of a cycle. Returns (bytes moved, bytes read, the step
    kept as (number, path) or None). A replica on another host is pushed to,
    its step kept beside it there; a step that a killed cycle left committed
    there but unregistered is registered first, as the vault does for local
    ones. An active disk on another host (after a reprotect) is pulled from."""
    site, replica = site_of(vault, name, d["replica"])
    if site.host is not None:
        # the next step, and the one after it in case a killed cycle left the
        # next one committed there but unregistered (the replica moved past it)
        offered = [site.step_path(replica, name, d["idx"], step + i) for i in (0, 1)]
        st, kept = site.push(source, replica, keep_undo=offered if has_point else None,
                             progress=on_progress, threads=threads)
        if kept == 1:
            vault.db.execute("INSERT INTO steps VALUES (?,?,?,?,?)",
                             (name, d["idx"], step, site.spec(offered[0]), 0))
        return (st.bytes_written + st.bytes_zeroed, os.path.getsize(source),
                (step + kept, site.spec(offered[kept])) if kept is not None else None)
    keep = vault.step_path(name, d["idx"], step) if has_point else None
    src_site, src_path = site_of(vault, name, source)
    if src_site.host is not None:
        st = src_site.pull(src_path, d["replica"], keep_undo=keep, progress=on_progress,
                           threads=threads)
        read = src_site.size(src_path)
    else:
        cache = vault.cache_path(name, d["idx"])
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        if resync_all:  # compare both sides: the replica is read again, the cache rebuilt
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cache)
        st = resync(source, d["replica"], signature_cache=cache, keep_undo=keep,
                    progress=on_progress, threads=threads, changed_extents=extents)
        read = st.bytes_read
    return st.bytes_written + st.bytes_zeroed, read, (step, keep) if keep else None


class CycleResult(Record):
    """point_id, items, bytes_written, bytes_read, seconds, consistency, jobs."""

    _fields = ("point_id", "items", "bytes_written", "bytes_read", "seconds", "consistency",
               "jobs")
    __slots__ = _fields


FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def snapshot(source):
    """A reflink clone of `source` beside it (".NAME.pydr-snap"), or None
    where the file system cannot clone (or `source` is not a regular file)."""
    import errno
    import fcntl
    import stat

    if not stat.S_ISREG(os.stat(source).st_mode):
        return None
    head, tail = os.path.split(os.path.abspath(source))
    snap = os.path.join(head, f".{tail}.pydr-snap")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(snap)
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            dst = os.open(snap, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:
            return None  # e.g. a read-only directory: no snapshot
        try:
            fcntl.ioctl(dst, FICLONE, src)
        except OSError as exc:
            os.close(dst)
            os.unlink(snap)
            if exc.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY,
                             errno.EPERM, errno.ENOSYS):
                return None
            raise
        os.close(dst)
        return snap
    finally:
        os.close(src)


def _run_hook(command, item, what):
    if not command:
        return
    r = subprocess.run(command, shell=True, capture_output=True, text=True)
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        raise HookFailed(f"{what} hook of {item!r} failed (exit {r.returncode}): {detail[0]}",
                         path=command)


RESYNC_THRESHOLD = 0.5  # pending changes above this share of a disk need a resync


def mark_resync_required(vault, name, reason):
    vault.set_item(name, state="resync-required", health="warning", last_error=reason)


def replicate(vault, names, *, app_consistent=False, progress=None, threads=None,
              resync_all=False, changed_extents=None, tracking_lost=False):
    """Run one replication cycle for the items `names` (one point id shared
    by all of them). Returns CycleResult. Each item gets a job; a failure
    marks its job failed and the item's health critical (or warning when the
    error is recoverable), then re-raises.

    ``changed_extents``: {item: {disk index: [(offset, length), ...]}} from a
    change tracker; only those ranges are compared. ``tracking_lost``: the
    tracker was reset (or the source shut down uncleanly). Either that, or
    pending changes above half a disk, marks the items resync-required, and
    only ``resync_all=True`` (``--resync``: a checksum comparison of both
    sides, the replica re-read) replicates them then.
    """
    start = time.monotonic()
    rows = [vault.item(n) for n in names]
    for row in rows:
        if row["state"] not in ("protecting", "protected", "resync-required"):
            raise InvalidState(f"item {row['name']!r} cannot replicate in state {row['state']}",
                               path=vault.dir)
    if tracking_lost:
        for r in rows:
            mark_resync_required(vault, r["name"], "change tracking was lost")
    for r in rows:
        for d in vault.disks(r["name"]) if changed_extents and r["name"] in changed_extents else ():
            pending = sum(int(n) for _, n in changed_extents[r["name"]].get(d["idx"], ()))
            size = os.path.getsize(d["source"]) if os.path.exists(d["source"]) else 0
            if size and pending > RESYNC_THRESHOLD * size:
                mark_resync_required(vault, r["name"],
                                     f"pending changes ({pending} bytes) exceed half of {d['source']}")
    rows = [vault.item(n) for n in names]
    if not resync_all:
        stuck = [r["name"] for r in rows if r["state"] == "resync-required"]
        if stuck:
            raise InvalidState(f"{', '.join(stuck)} needs a resync: run 'pydr replicate "
                               f"{stuck[0]} --resync'", path=vault.dir)
    if app_consistent:
        missing = [r["name"] for r in rows if not r["quiesce_hook"]]
        if missing:
            raise InvalidState(f"--app-consistent needs quiesce/thaw hooks; items without: "
                               f"{', '.join(missing)}", path=vault.dir)
    jobs = {r["name"]: vault.start_job("replicate", r["name"], state="queued") for r in rows}
    started = set()
    quiesced = []
    snaps = {}
    totals = {"written": 0, "read": 0}
    try:
        if app_consistent:
            for r in rows:
                _run_hook(r["quiesce_hook"], r["name"], "quiesce")
                quiesced.append(r)
        plans = []
        sizes = {}
        for r in rows:
            for d in vault.disks(r["name"]):
                if is_remote(d["source"]):  # after a reprotect: the active disk is there
                    site, path = site_of(vault, r["name"], d["source"])
                    sizes[d["source"]] = site.size(path)
                elif not os.path.exists(d["source"]):
                    raise FileNotFoundError(2, "source disk not found", d["source"])
                else:
                    sizes[d["source"]] = os.path.getsize(d["source"])
                plans.append((r, d))
        # the cut: clone every disk first, so that all are read as of one instant
        for _, d in plans:
            snaps[d["source"]] = None if is_remote(d["source"]) else snapshot(d["source"])
        cut = "reflink" if all(snaps.values()) else ("quiesce" if app_consistent else "none")
        if cut == "reflink":
            for r in quiesced:  # the cut is taken: the applications may go on
                _run_hook(r["thaw_hook"], r["name"], "thaw")
            quiesced = []
        total = sum(sizes.values()) or 1
        done_before = 0
        per_item_bytes = {r["name"]: 0 for r in rows}
        for r, d in plans:
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
            moved, read, kept = _cycle_disk(vault, name, d, snaps.get(d["source"]) or d["source"],
                                            step, has_point, on_progress, threads, resync_all,
                                            extents)
            per_item_bytes[name] += moved
            totals["written"] += moved
            totals["read"] += read
            done_before += sizes[d["source"]]
            if kept is not None:
                size = 0 if is_remote(kept[1]) else os.path.getsize(kept[1])
                vault.db.execute("INSERT INTO steps VALUES (?,?,?,?,?)", (name, idx, *kept, size))
            vault.update_job(jobs[name], bytes_transferred=per_item_bytes[name])
    except BaseException as exc:
        for r in rows:
            vault.end_job(jobs[r["name"]], "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed",
                          error=str(exc), bytes_transferred=None)
            health = "critical" if not _recoverable(exc) else "warning"
            vault.set_item(r["name"], health=health, last_error=str(exc))
        raise
    finally:
        for r in quiesced:
            try:
                _run_hook(r["thaw_hook"], r["name"], "thaw")
            except HookFailed as exc:
                vault.set_item(r["name"], health="warning", last_error=str(exc))
        for snap in snaps.values():
            if snap:
                with contextlib.suppress(OSError):
                    os.unlink(snap)
    consistency = "app-consistent" if app_consistent else "crash-consistent"
    now = time.time()
    with vault.db:
        vault.db.execute("BEGIN IMMEDIATE")
        # allocated with the points, in one transaction: a failed cycle uses no id
        point_id = vault.db.execute("SELECT value FROM counters WHERE name='point'").fetchone()[0] + 1
        vault.db.execute("UPDATE counters SET value=? WHERE name='point'", (point_id,))
        for r in rows:
            name = r["name"]
            vault.db.execute("INSERT INTO points VALUES (?,?,?,?,?,?)",
                             (point_id, name, now, consistency, per_item_bytes[name], cut))
            for d in vault.disks(name):
                vault.db.execute("INSERT INTO point_disks VALUES (?,?,?,?)",
                                 (point_id, name, d["idx"], vault.current_step(name, d["idx"])))
            vault.set_item(name, state="protected", health="ok", last_error=None)
    for r in rows:
        apply_retention(vault, r["name"])
        vault.end_job(jobs[r["name"]], "succeeded", bytes_transferred=per_item_bytes[r["name"]])
    return CycleResult(point_id, [r["name"] for r in rows], totals["written"], totals["read"],
                       time.monotonic() - start, consistency, list(jobs.values()))


def _recoverable(exc):
    from .retry import recoverable

    return recoverable(exc)


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


def apply_retention(vault, name, now=None):
    """Drop the points beyond the item's retention (count, and age when set;
    the newest point always stays), and the undo steps that only they needed
    (the oldest kept point needs none of its own)."""
    row = vault.item(name)
    points = vault.points(name)
    drop = points[:max(0, len(points) - row["retention"])]
    if row["retention_age"] is not None and points:
        limit = (time.time() if now is None else now) - row["retention_age"]
        drop = [p for p in points[:-1] if p in drop or p["created"] < limit]
    with vault.db:
        vault.db.execute("BEGIN IMMEDIATE")
        for p in drop:
            vault.db.execute("DELETE FROM points WHERE item=? AND id=?", (name, p["id"]))
            vault.db.execute("DELETE FROM point_disks WHERE item=? AND id=?", (name, p["id"]))
        doomed = []
        for d in vault.disks(name):
            row = vault.db.execute("SELECT MIN(step) FROM point_disks WHERE item=? AND idx=?",
                                   (name, d["idx"])).fetchone()
            oldest = row[0] if row[0] is not None else vault.current_step(name, d["idx"])
            for s in vault.db.execute("SELECT step, path FROM steps WHERE item=? AND idx=? AND step<=?",
                                      (name, d["idx"], oldest)).fetchall():
                doomed.append(s["path"])
                vault.db.execute("DELETE FROM steps WHERE item=? AND idx=? AND step=?",
                                 (name, d["idx"], s["step"]))
    # after the commit: a crash here leaves local files the next open removes;
    # an unreachable host keeps its steps until a later retention
    for site, paths in by_site(vault, name, doomed):
        try:
            site.remove(paths)
        except OSError as exc:
            vault.set_item(name, health="warning",
                           last_error=f"could not drop old steps on {site.host}: {exc}")


def materialize(vault, name, point_id, directory, *, threads=None):
    """Write each disk of `name` as it was at recovery point `point_id` into
    `directory`, as DIR/<replica file name>. Returns the paths written.
    Runs as a job ("materialize")."""
    vault.point(name, point_id)
    return vault.run_job("materialize", name,
                         lambda: _materialize(vault, name, point_id, directory, threads))


def baseline_path(replica):
    """Where a failover keeps the replica's latest state (the baseline of all
    undo steps): beside it, so that moving it there is an atomic rename."""
    head, tail = os.path.split(replica)
    return os.path.join(head, f".{tail}.pydr-base")


def latest_state(replica):
    """The file holding a disk's latest replicated state."""
    base = baseline_path(replica)
    return base if os.path.exists(base) else replica


def materialize_disk(vault, name, point_id, disk, dest, threads=None, drill=False):
    """Write one disk as it was at `point_id` to `dest` (replaced), on the
    site that holds its replica. ``drill``: a test failover's disk (a remote
    site records it, so that cleaning up may remove it)."""
    row = vault.db.execute("SELECT step FROM point_disks WHERE item=? AND id=? AND idx=?",
                           (name, point_id, disk["idx"])).fetchone()
    steps = vault.db.execute(
        "SELECT step, path FROM steps WHERE item=? AND idx=? AND step>? ORDER BY step DESC",
        (name, disk["idx"], row["step"])).fetchall()
    site, replica = site_of(vault, name, disk["replica"])
    there, path = site_of(vault, name, dest)
    if there.host != site.host:
        where = site.host or "this machine"
        raise InvalidState(f"a point of a replica on {where} is materialised there"
                           + (f": give {site.host}:DIR" if site.host else ""), path=dest)
    return site.materialize(replica, [site_of(vault, name, s["path"])[1] for s in steps], path,
                            threads, drill)


def materialize_file(source, steps, dest, threads=None):
    """Copy `source` to `dest` (replaced; sparse-aware) and roll the undo
    journals `steps` back onto the copy, newest first."""
    if os.path.exists(dest) and os.path.samefile(dest, source):
        raise InvalidState("refusing to materialise over the replicated state itself", path=dest)
    if os.path.lexists(dest):
        os.unlink(dest)
    try:
        resync(source, dest, threads=threads)  # sparse-aware copy of the latest state
        fd = os.open(dest, os.O_RDWR | os.O_CLOEXEC)
        try:
            for path in steps:  # newest first: each takes the copy one cycle back
                header, committed = J.read_journal(path)
                if header is None or not committed:
                    raise PydrError("undo step is damaged", path=path)
                J.rollback_fd(fd, path, dest, False)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:  # no half-made disk left behind to be mistaken for the point
        with contextlib.suppress(OSError):
            os.unlink(dest)
        raise
    return dest


def _materialize(vault, name, point_id, directory, threads, drill=False):
    if not is_remote(directory):
        os.makedirs(directory, exist_ok=True)
    out = []
    for d in vault.disks(name):
        dest = os.path.join(directory, os.path.basename(d["replica"]))
        if not is_remote(dest) and not is_remote(d["replica"]) and os.path.exists(dest) \
                and os.path.samefile(dest, d["replica"]):
            raise InvalidState("refusing to materialise over the replica itself", path=dest)
        out.append(materialize_disk(vault, name, point_id, d, dest, threads, drill))
    return out

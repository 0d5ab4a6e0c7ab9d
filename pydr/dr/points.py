"""Recovery points: retention, and materialising a point's disks.

A point records, per disk, the undo step its replica was at. Materialising
it asks the replica's endpoint to copy the latest state and roll the newer
steps back onto the copy, where the replica is (pydr.engine.restore)."""

import os
import time

from ..endpoints import remove_all
from ..engine import crashpoints
from ..errors import FormatError, InvalidState, UnknownName

SELECTORS = ("latest", "latest-processed", "latest-app-consistent")


def select_point(vault, name, point):
    """A point id from an id or a selector (latest-processed,
    latest-app-consistent; 'latest' is resolved by failover itself)."""
    points = vault.points(name)
    if not points:
        raise InvalidState(f"item {name!r} has no recovery point yet: run 'pydr replicate {name}'",
                           path=vault.dir)
    if point in (None, "latest", "latest-processed"):
        return points[-1]["id"]
    if point == "latest-app-consistent":
        app = [p for p in points if p["consistency"] == "app-consistent"]
        if not app:
            raise UnknownName(f"item {name!r} has no app-consistent recovery point", path=vault.dir)
        return app[-1]["id"]
    try:
        pid = int(point)
    except (TypeError, ValueError):
        raise ValueError(f"--point wants an id or one of {', '.join(SELECTORS)}, not {point!r}") from None
    vault.point(name, pid)
    return pid


def apply_retention(vault, name, now=None):
    """Drop the points beyond the item's retention (count, and age when set;
    the newest point always stays), and the undo steps that only they needed
    (the oldest kept point needs none of its own).

    In two transactions around the removal of the files: the points go
    first, the steps' records only once their files are gone, so that a kill
    in between leaves records that the next retention finds again, never
    files that nothing names (and never a point without its steps)."""
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
        doomed += [(d["idx"], s["step"], s["path"]) for s in vault.db.execute(
            "SELECT step, path FROM steps WHERE item=? AND idx=? AND step<=?",
            (name, d["idx"], oldest)).fetchall()]
    crashpoints.reached("retention.recorded")
    failed = set()

    def unreachable(ep, exc):  # that host keeps its steps until a later retention
        failed.add(ep.place)
        vault.set_item(name, health="warning",
                       last_error=f"could not drop old steps on {ep.place}: {exc}")

    steps = [(idx, step, vault.endpoint(name, path)) for idx, step, path in doomed]
    remove_all([ep for _, _, ep in steps], on_error=unreachable)
    _drop_indexes(vault, name)
    with vault.db:
        vault.db.execute("BEGIN IMMEDIATE")
        for idx, step, ep in steps:
            if ep.place not in failed:
                vault.db.execute("DELETE FROM steps WHERE item=? AND idx=? AND step=?",
                                 (name, idx, step))


def _drop_indexes(vault, name):
    """The point indexes in an object store of points no longer kept: the
    objects first, then their records (a failure keeps both for later)."""
    stale = {r["point"] for r in vault.db.execute(
        "SELECT point FROM object_indexes o WHERE item=? AND NOT EXISTS "
        "(SELECT 1 FROM points p WHERE p.item=o.item AND p.id=o.point)", (name,))}
    if not stale:
        return
    from .objectstore import drop_indexes, store_of

    try:
        drop_indexes(vault, name, stale)
    except OSError as exc:  # kept for a later retention
        vault.set_item(name, health="warning", last_error=f"could not drop old point indexes "
                       f"in {store_of(vault, name).spec}: {exc}")


def materialize(vault, name, point_id, directory, *, threads=None, method="auto",
                progress=None, methods=None):
    """Write each disk of `name` as it was at recovery point `point_id` into
    `directory`, as DIR/<replica file name>, by `method` (see
    pydr.endpoints.base.Endpoint.materialize). Returns the specs written;
    the methods used are appended to the list `methods`, if given, and
    recorded on the job ("materialize")."""
    check_points_usable(vault, name)
    vault.point(name, point_id)
    return vault.run_job("materialize", name, lambda: materialize_into(
        vault, name, point_id, directory, threads, method=method, progress=progress,
        methods=methods))


def materialize_disk(vault, name, point_id, disk, dest, threads=None, drill=False, *,
                     method="auto", progress=None):
    """Write one disk as it was at `point_id` to `dest` (a spec; replaced),
    at the place that holds its replica. ``drill``: a test failover's disk
    (never written over a file; a remote site records it, so that cleaning
    up may remove it). Returns the method used, also noted on the job."""
    steps = steps_needed(vault, name, point_id, disk)
    replica = vault.endpoint(name, disk["replica"])
    if getattr(replica, "point_store", False):  # a point index over chunks: downloaded
        from .objectstore import restore_disk

        dest_ep = vault.endpoint(name, dest)
        if dest_ep.local_path is None:
            raise InvalidState(f"{dest}: points of an object store are materialised on this "
                               f"machine: give a local directory", path=str(dest))
        if drill and dest_ep.exists():
            raise InvalidState("a drill never writes over a file", path=str(dest))
        used = restore_disk(vault, name, point_id, disk, dest_ep.local_path, threads=threads,
                            progress=progress)
        vault.note_method(used)
        return used
    used = replica.materialize([vault.endpoint(name, s["path"]) for s in steps],
                               vault.endpoint(name, dest), drill=drill, threads=threads,
                               method=method, progress=progress)
    vault.note_method(used)
    return used


def steps_needed(vault, name, point_id, disk):
    """The undo steps (rows: step, path, bytes) that take `disk` from its
    latest state back to `point_id`, newest first."""
    row = vault.db.execute("SELECT step FROM point_disks WHERE item=? AND id=? AND idx=?",
                           (name, point_id, disk["idx"])).fetchone()
    return vault.db.execute(
        "SELECT step, path, bytes FROM steps WHERE item=? AND idx=? AND step>? ORDER BY step DESC",
        (name, disk["idx"], row["step"])).fetchall()


def check_point_restorable(vault, name, point_id,
                           hint="nothing was changed, choose another point with --point"):
    """Before a failover, change-point or drill moves or writes anything:
    every undo step point `point_id` needs is there, has the size the vault
    recorded and (where this process can read it) ends in its commit. A
    point already marked damaged is refused with its reason. Otherwise
    FormatError (exit 7) names the step. Nothing is changed, not even the
    point's mark: a step on an unmounted file system may come back."""
    point = vault.point(name, point_id)
    if point["damaged"]:
        raise FormatError(f"point {point_id} of {name!r} cannot be restored: "
                          f"{point['damaged']}; {hint}", path=vault.dir)
    if getattr(vault.endpoint(name, vault.disks(name)[0]["replica"]), "point_store", False):
        return  # chunk indexes in an object store: checked as they are downloaded
    for d in vault.disks(name):
        for s in steps_needed(vault, name, point_id, d):
            step = vault.endpoint(name, s["path"])
            why = _step_problem(step, s["bytes"])
            if why is None:
                continue
            reason = f"undo step {s['step']} of disk {d['idx']} ({step}) {why}"
            raise FormatError(f"point {point_id} of {name!r} cannot be restored: {reason}; "
                              f"{hint}", path=step.spec)


def _step_problem(step, recorded):
    """Why a step cannot be used (words for a message), or None. The vault
    records a step's journal bytes without its COMMIT record (a cycle), the
    whole file (a step registered after a kill), or 0 (not known: a step a
    killed cycle kept); the file must match what was recorded."""
    from ..engine import bindings as B
    from ..engine import journal as J

    try:
        size = step.size() if step.local_path is None else os.path.getsize(step.local_path)
    except FileNotFoundError:
        return "is missing"
    if recorded and size not in (recorded, recorded + B.RECORD_HEADER):
        return f"has {size} bytes, the vault recorded {recorded + B.RECORD_HEADER}"
    if step.local_path is not None:
        header, committed = J.read_journal(step.local_path)
        if header is None or not committed:
            return "is damaged: no whole, committed undo journal"
    return None


def check_points_usable(vault, name):
    if vault.item(name)["state"] == "committing":
        raise InvalidState(f"{name!r} is committing its failover: its points are being removed; "
                           f"run 'pydr commit {name}' to finish", path=vault.dir)


def materialize_into(vault, name, point_id, directory, threads=None, drill=False, *,
                     method="auto", progress=None, methods=None):
    """Every disk of the point into `directory` (a spec), named like its
    replica; the replicas themselves are never written over. A drill keeps
    the disks that are there already (whole: a disk appears by a rename):
    the ones a killed drill finished."""
    check_points_usable(vault, name)
    where = vault.endpoint(name, directory)
    out = []
    for d in vault.disks(name):
        replica = vault.endpoint(name, d["replica"])
        dest = where.child(os.path.basename(replica.path))
        if dest.identity == replica.identity:
            raise InvalidState("refusing to materialise over the replica itself", path=str(dest))
        if not (drill and dest.exists()):
            used = materialize_disk(vault, name, point_id, d, dest, threads, drill,
                                    method=method, progress=progress)
            if methods is not None:
                methods.append(used)
            if drill:  # recorded with the disk: a resumed drill still says how it was made
                made = set(filter(None, (vault.item(name)["test_method"] or "").split("+")))
                vault.set_item(name, test_method="+".join(sorted(made | {used})))
                crashpoints.reached("drill.disk")
        out.append(str(dest))
    return out

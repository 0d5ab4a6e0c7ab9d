"""Recovery points: retention, and materialising a point's disks.

A point records, per disk, the undo step its replica was at. Materialising
it asks the replica's endpoint to copy the latest state and roll the newer
steps back onto the copy, where the replica is (pydr.engine.restore)."""

import os
import time

from ..endpoints import remove_all
from ..engine import crashpoints
from ..engine import journal as J
from ..errors import CorruptDelta, DamagedJournal, DamagedPoint, InvalidState, UnknownName
from . import stepdigest
from .replica_check import check_replicas

SELECTORS = ("latest", "latest-processed", "latest-app-consistent")


def select_point(vault, name, point):
    """A point id from an id or a selector (latest-processed,
    latest-app-consistent; 'latest' is resolved by failover itself)."""
    points = vault.points(name)
    if not points:
        raise InvalidState(f"item {name!r} has no recovery point yet: run 'pydr replicate {name}'",
                           path=vault.dir)
    if point in (None, "latest", "latest-processed", "latest-app-consistent"):
        # a selector never picks a point known to be damaged: the newest sound one
        kind = "app-consistent " if point == "latest-app-consistent" else ""
        if kind:
            points = [p for p in points if p["consistency"] == "app-consistent"]
        if not points:
            raise UnknownName(f"item {name!r} has no {kind}recovery point", path=vault.dir)
        sound = [p for p in points if not p["damaged"]]
        if not sound:
            raise DamagedPoint(f"every {kind}recovery point of {name!r} is damaged: "
                               f"{points[-1]['damaged']}", path=vault.dir)
        return sound[-1]["id"]
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
    check_point(vault, name, point_id)
    return vault.run_job("materialize", name, lambda: materialize_into(
        vault, name, point_id, directory, threads, method=method, progress=progress,
        methods=methods))


def steps_of(vault, name, point_id, idx):
    """The undo steps (rows: step, path, bytes) that take disk `idx` from its
    latest state back to point `point_id`, newest first."""
    row = vault.db.execute("SELECT step FROM point_disks WHERE item=? AND id=? AND idx=?",
                           (name, point_id, idx)).fetchone()
    if row is None:
        return []
    return vault.db.execute(
        "SELECT step, path, bytes, digest FROM steps WHERE item=? AND idx=? AND step>? "
        "ORDER BY step DESC",
        (name, idx, row["step"])).fetchall()


def check_point(vault, name, point_id):
    """Refuse point `point_id` unless every step it needs is there and
    sound, before anything is written or renamed: DamagedPoint (exit 7) for
    a point marked damaged, DamagedJournal (exit 7, naming the step and the
    offset) for a step found damaged now, which marks every point that needs
    it; DamagedPoint (exit 7) when the replica (or its baseline) is not the
    file the points were made on (pydr.dr.replica_check). Steps on this machine are read through and every record checked
    (journal.check_step); those at a remote place by their size against the
    vault's record (the place that materialises checks their records before
    it writes)."""
    row = vault.point(name, point_id)
    if row["damaged"]:
        raise DamagedPoint(f"recovery point {point_id} of {name!r} is damaged and is never "
                           f"restored: {row['damaged']}", path=vault.dir)
    for d in vault.disks(name):
        for s in steps_of(vault, name, point_id, d["idx"]):
            check_step(vault, name, d["idx"], s)
    check_replicas(vault, name)  # the file the steps are rolled back onto


def check_step(vault, name, idx, step, *, whole=True):
    """Check one step (a row of `steps`), see check_point; damage marks the
    points that need it and raises DamagedJournal. A missing step is
    refused without a mark: a mark is for bytes proven wrong, and a step on
    storage that is not mounted yet may come back whole."""
    ep = vault.endpoint(name, step["path"])
    which = f"undo step {step['step']} of disk {idx}"
    try:
        if ep.local_path is not None and os.path.islink(ep.local_path):
            raise DamagedJournal(f"{which} is damaged: it is a symlink, not a step file",
                                 path=str(ep), offset=0)
        size = ep.size()
        if not _size_as_recorded(size, step["bytes"]):
            raise DamagedJournal(f"{which} is damaged: {size} bytes, the vault recorded "
                                 f"{step['bytes']} (and a COMMIT record)", path=str(ep),
                                 offset=min(size, step["bytes"]))
        if ep.local_path is not None and whole:
            J.check_step(ep.local_path)
            stepdigest.check(ep.local_path, _digest_of(step))
    except FileNotFoundError:  # refused, but not marked: storage not mounted yet comes back
        raise DamagedJournal(f"{which} is missing", path=str(ep)) from None
    except CorruptDelta as found:
        exc = found if found.message.startswith(which) else DamagedJournal(
            f"{which}: {found.message}", path=found.path or str(ep), offset=found.offset)
    else:
        return
    mark_step_damaged(vault, name, idx, step["step"], exc)
    raise exc


def _digest_of(step):
    """The digest recorded with a step row (None: not recorded, or not read)."""
    return step["digest"] if "digest" in step.keys() else None


def _size_as_recorded(size, recorded):
    """A cycle records a step's journal before its COMMIT record (0 when a
    killed cycle's step is recorded by the next one: unknown); the vault's
    recovery records the whole file."""
    return recorded == 0 or size in (recorded, recorded + J.COMMIT_SIZE)


def mark_step_damaged(vault, name, idx, step, exc):
    """Every point of `name` that needs step `step` of disk `idx` is damaged."""
    vault.mark_damaged(name, vault.points_needing(name, idx, step), str(exc))


def _step_named(steps, path):
    """The step row whose file an error names (as here, or as host:PATH when
    a remote place raised it), or None."""
    def local(p):
        return p.split(":", 1)[1] if ":" in p and not p.startswith("/") else p

    for s in steps:
        if path is not None and local(path) == local(s["path"]):
            return s
    return None


def materialize_disk(vault, name, point_id, disk, dest, threads=None, drill=False, *,
                     method="auto", progress=None):
    """Write one disk as it was at `point_id` to `dest` (a spec; replaced),
    at the place that holds its replica. ``drill``: a test failover's disk
    (never written over a file; a remote site records it, so that cleaning
    up may remove it). Returns the method used, also noted on the job.
    A step found damaged marks the points that need it (DamagedJournal)."""
    steps = steps_of(vault, name, point_id, disk["idx"])
    for s in steps:  # cheap: sizes; the records are checked where they are read
        check_step(vault, name, disk["idx"], s, whole=False)
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
    try:
        used = replica.materialize([vault.endpoint(name, s["path"]) for s in steps],
                                   vault.endpoint(name, dest), drill=drill, threads=threads,
                                   method=method, progress=progress)
    except CorruptDelta as exc:
        damaged = _step_named(steps, exc.path)
        if damaged is not None:
            mark_step_damaged(vault, name, disk["idx"], damaged["step"], exc)
        raise
    vault.note_method(used)
    return used


def check_points_usable(vault, name):
    if vault.item(name)["state"] == "committing":
        raise InvalidState(f"{name!r} is committing its failover: its points are being removed; "
                           f"run 'pydr commit {name}' to finish", path=vault.dir)


def _protected_disks(vault):
    """{identity: what it is} of every source and replica of the vault."""
    out = {}
    for item in vault.items():
        for d in vault.disks(item):
            for role in ("source", "replica"):  # files here by their real path, others as given
                spec = d[role]
                key = os.path.realpath(spec) if spec.startswith("/") else spec
                out.setdefault(key, f"{role} of item {item!r}, disk {d['idx']}")
    return out


def materialize_into(vault, name, point_id, directory, threads=None, drill=False, *,
                     method="auto", progress=None, methods=None):
    """Every disk of the point into `directory` (a spec), named like its
    replica; the replicas themselves are never written over. A drill keeps
    the disks that are there already (whole: a disk appears by a rename):
    the ones a killed drill finished."""
    check_points_usable(vault, name)
    where = vault.endpoint(name, directory)
    protected = _protected_disks(vault)
    out = []
    for d in vault.disks(name):
        replica = vault.endpoint(name, d["replica"])
        dest = where.child(os.path.basename(replica.path))
        if dest.identity == replica.identity:
            raise InvalidState("refusing to materialise over the replica itself", path=str(dest))
        if dest.identity in protected:  # a typo in --to must not roll production back
            raise InvalidState(f"refusing to materialise over a disk the vault protects "
                               f"({protected[dest.identity]}); give another directory",
                               path=str(dest))
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

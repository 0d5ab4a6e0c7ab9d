"""Recovery points: retention, and materialising a point's disks.

A point records, per disk, the undo step its replica was at. Materialising
it asks the replica's endpoint to copy the latest state and roll the newer
steps back onto the copy, where the replica is (pydr.engine.restore)."""

import os
import time

from ..endpoints import remove_all
from ..errors import InvalidState


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
    def unreachable(ep, exc):
        vault.set_item(name, health="warning",
                       last_error=f"could not drop old steps on {ep.place}: {exc}")

    remove_all([vault.endpoint(name, p) for p in doomed], on_error=unreachable)


def materialize(vault, name, point_id, directory, *, threads=None):
    """Write each disk of `name` as it was at recovery point `point_id` into
    `directory`, as DIR/<replica file name>. Returns the specs written.
    Runs as a job ("materialize")."""
    vault.point(name, point_id)
    return vault.run_job("materialize", name,
                         lambda: materialize_into(vault, name, point_id, directory, threads))


def materialize_disk(vault, name, point_id, disk, dest, threads=None, drill=False):
    """Write one disk as it was at `point_id` to `dest` (a spec; replaced),
    at the place that holds its replica. ``drill``: a test failover's disk
    (never written over a file; a remote site records it, so that cleaning
    up may remove it). Returns the endpoint written."""
    row = vault.db.execute("SELECT step FROM point_disks WHERE item=? AND id=? AND idx=?",
                           (name, point_id, disk["idx"])).fetchone()
    steps = vault.db.execute(
        "SELECT step, path FROM steps WHERE item=? AND idx=? AND step>? ORDER BY step DESC",
        (name, disk["idx"], row["step"])).fetchall()
    replica = vault.endpoint(name, disk["replica"])
    return replica.materialize([vault.endpoint(name, s["path"]) for s in steps],
                               vault.endpoint(name, dest), drill=drill, threads=threads)


def materialize_into(vault, name, point_id, directory, threads=None, drill=False):
    """Every disk of the point into `directory` (a spec), named like its
    replica; the replicas themselves are never written over."""
    where = vault.endpoint(name, directory)
    out = []
    for d in vault.disks(name):
        replica = vault.endpoint(name, d["replica"])
        dest = where.child(os.path.basename(replica.path))
        if dest.identity == replica.identity:
            raise InvalidState("refusing to materialise over the replica itself", path=str(dest))
        out.append(str(materialize_disk(vault, name, point_id, d, dest, threads, drill)))
    return out

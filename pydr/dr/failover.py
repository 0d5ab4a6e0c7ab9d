"""Disaster recovery on top of the vault: test failover (drills), failover,
change-point, commit, reprotect and failback.

States of an item: protected -> failing-over -> failed-over -> (change-point)
-> failover-committed (direction "reverse"). A failover moves each replica
(the latest replicated state, the baseline of every undo step) aside to
".NAME.pydr-base" beside it -- an atomic rename -- and materialises the
chosen point at the replica's path. change-point re-materialises from that
untouched baseline, so it is exact even after the failed-over machine wrote
to its disks. commit discards the baseline, the points and their steps.
Every step can be run again after a crash: the state says where it stopped.
"""

import contextlib
import os

from ..endpoints import remove_all
from ..engine import names
from ..errors import HookFailed, InvalidState, PydrError, UnknownName
from .hooks import run_hook
from .points import materialize_disk, materialize_into
from .replication import replicate

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


def test_failover(vault, name, directory, point=None):
    """Drill: materialise a point into `directory`; replicas and replication
    are untouched. Returns (point id, paths)."""
    row = vault.item(name)
    if row["test_dir"]:
        raise InvalidState(f"a test failover of {name!r} is already in {row['test_dir']}: run "
                           f"'pydr cleanup-test-failover {name}' first", path=vault.dir)
    if row["state"] not in ("protected",):
        raise InvalidState(f"item {name!r} cannot be test-failed-over in state {row['state']}",
                           path=vault.dir)
    pid = select_point(vault, name, point)
    directory = vault.endpoint(name, directory).spec
    vault.set_item(name, test_dir=directory)  # first: a killed drill is still cleaned up
    paths = vault.run_job("test-failover", name,
                          lambda: materialize_into(vault, name, pid, directory, drill=True))
    return pid, paths


def cleanup_test_failover(vault, name):
    """Remove what test_failover wrote. Returns the paths removed."""
    row = vault.item(name)
    if not row["test_dir"]:
        raise InvalidState(f"item {name!r} has no test failover to clean up", path=vault.dir)

    def run():
        directory = vault.endpoint(name, row["test_dir"])
        disks = [directory.child(os.path.basename(vault.endpoint(name, d["replica"]).path))
                 for d in vault.disks(name)]
        removed = [str(d) for d in disks if d.exists()]
        directory.remove_drill(disks)  # the directory too, if that empties it
        vault.set_item(name, test_dir=None)
        return removed

    return vault.run_job("cleanup-test-failover", name, run)


def failover(vault, name, point="latest", *, planned=False, shutdown_hook=None):
    """Fail `name` over to a recovery point; afterwards its replica paths
    hold that point. Returns a dict with the point and what happened."""
    row = vault.item(name)
    if row["state"] == "failing-over":
        return _finish_failover(vault, name, row["failover_point"], notes=["resumed"])
    if row["state"] != "protected":
        raise InvalidState(f"item {name!r} cannot fail over in state {row['state']} "
                           f"(direction {row['direction']})", path=vault.dir)
    notes = []
    if shutdown_hook:
        try:
            run_hook(shutdown_hook, "shutdown hook")
        except HookFailed as exc:
            if planned:
                raise
            notes.append(f"shutdown hook failed, going on (unplanned): {exc}")
    if planned or point in (None, "latest"):
        try:
            replicate(vault, [name])  # the last changes first: lowest RPO
            notes.append("replicated the latest changes first")
        except (OSError, PydrError) as exc:
            if planned:
                raise
            notes.append(f"could not replicate the latest changes ({exc}); using the newest point")
    pid = select_point(vault, name, "latest" if planned else point)
    vault.set_item(name, state="failing-over", failover_point=pid)
    return _finish_failover(vault, name, pid, notes)


def _finish_failover(vault, name, pid, notes):
    def run():
        for d in vault.disks(name):
            replica = vault.endpoint(name, d["replica"])
            base = replica.sidecar(names.BASE)
            if not base.exists():
                replica.rename(base)  # atomic; the baseline of every step
            _materialize_over(vault, name, pid, d)
        vault.set_item(name, state="failed-over", failover_point=pid)
        return {"item": name, "point": pid, "notes": notes}

    return vault.run_job("failover", name, run)


def _materialize_over(vault, name, pid, d):
    """The point's disk at the replica path, replaced atomically."""
    replica = vault.endpoint(name, d["replica"])
    tmp = materialize_disk(vault, name, pid, d, replica.sidecar(names.NEW))
    tmp.rename(replica)


def change_point(vault, name, point):
    """After a failover and before commit: the replica paths hold another point."""
    row = vault.item(name)
    if row["state"] != "failed-over":
        raise InvalidState(f"change-point needs a failed-over item; {name!r} is {row['state']}",
                           path=vault.dir)
    pid = select_point(vault, name, point)

    def run():
        vault.set_item(name, state="failing-over", failover_point=pid)
        for d in vault.disks(name):
            _materialize_over(vault, name, pid, d)
        vault.set_item(name, state="failed-over")
        return {"item": name, "point": pid}

    return vault.run_job("change-point", name, run)


def commit(vault, name):
    """Make the failover final: site B is active (direction reverse); the
    recovery points, their steps and the old baselines are discarded."""
    row = vault.item(name)
    if row["state"] != "failed-over":
        raise InvalidState(f"commit needs a failed-over item; {name!r} is {row['state']}",
                           path=vault.dir)

    def run():
        steps = [r["path"] for r in vault.db.execute("SELECT path FROM steps WHERE item=?", (name,))]
        with vault.db:
            vault.db.execute("BEGIN IMMEDIATE")
            vault.db.execute("DELETE FROM point_disks WHERE item=?", (name,))
            vault.db.execute("DELETE FROM points WHERE item=?", (name,))
            vault.db.execute("DELETE FROM steps WHERE item=?", (name,))
            flipped = "reverse" if row["direction"] == "forward" else "forward"
            vault.set_item(name, state="failover-committed", direction=flipped,
                           failover_point=None)
        replicas = [vault.endpoint(name, d["replica"]) for d in vault.disks(name)]
        remove_all([vault.endpoint(name, p) for p in steps] + [r.sidecar(names.BASE)
                                                                for r in replicas])
        for d in vault.disks(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(vault.cache_path(name, d["idx"]))
        return {"item": name, "direction": vault.item(name)["direction"]}

    return vault.run_job("commit", name, run)


def reprotect(vault, name, *, progress=None):
    """After commit: replicate in the other direction. Each disk's replica
    (now active) becomes the source and its old source the replica, reused:
    the first cycle is a checksum resync that moves only differing blocks."""
    row = vault.item(name)
    if row["state"] != "failover-committed":
        raise InvalidState(f"reprotect needs a committed failover; {name!r} is {row['state']}",
                           path=vault.dir)
    with vault.db:
        vault.db.execute("BEGIN IMMEDIATE")
        for d in vault.disks(name):
            vault.db.execute("UPDATE disks SET source=?, replica=? WHERE item=? AND idx=?",
                             (d["replica"], d["source"], name, d["idx"]))
        vault.set_item(name, state="protecting")
    result = replicate(vault, [name], resync_all=True, progress=progress)
    return {"item": name, "direction": vault.item(name)["direction"], "point": result.point_id,
            "bytes_written": result.bytes_written, "bytes_read": result.bytes_read}


def failback(vault, name, *, alternates=None, shutdown_hook=None):
    """A planned failover in the reverse direction: a final cycle, nothing
    lost. With alternates {replica path: new path}, those disks are brought
    up at the new paths instead (the old ones are left as they are)."""
    row = vault.item(name)
    if row["direction"] != "reverse" or row["state"] != "protected":
        raise InvalidState(f"failback needs a reprotected item (direction reverse, protected); "
                           f"{name!r} is {row['state']}, direction {row['direction']}",
                           path=vault.dir)
    alternates = {vault.endpoint(name, k).spec: vault.endpoint(name, v).spec
                  for k, v in (alternates or {}).items()}
    replicas = {d["replica"] for d in vault.disks(name)}
    unknown = [k for k in alternates if k not in replicas]
    if unknown:
        raise UnknownName(f"not a replica of {name!r}: {', '.join(unknown)}", path=vault.dir)
    if shutdown_hook:
        run_hook(shutdown_hook, "shutdown hook")  # planned: it must succeed
    pid = replicate(vault, [name]).point_id  # the final cycle: nothing is lost
    for d in vault.disks(name):
        new = alternates.get(d["replica"])
        if new is None:
            continue
        if vault.endpoint(name, new).exists():
            raise InvalidState("the alternate location exists already", path=new)
        # the disk comes up at the new path; the old replica is left alone
        vault.run_job("materialize", name,
                      lambda d=d, new=new: materialize_disk(vault, name, pid, d, new))
        vault.db.execute("UPDATE disks SET replica=? WHERE item=? AND idx=?", (new, name, d["idx"]))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(vault.cache_path(name, d["idx"]))  # described the old path
    return failover(vault, name, pid)

"""Before a point is rolled back onto a replica: is the replica (or, once a
failover moved it aside, its baseline) the file the item's points were
made on?

Every point is a chain of undo steps rolled back onto that file, so a write
to it outside pydr makes every point come back wrong -- with no error.
Replication notices it at the next cycle (pydr.dr.replication
.check_one_writer); materialize, drills, failover, change-point and verify
check it here, through the same identity records (pydr.dr.ownership),
before anything moves. A file found different marks every point of the
item damaged; a record found damaged or missing means it cannot be told,
and nothing is restored from it (exit 7).

A vault migrated from schema 7 has items with points and no identity
records yet: the migration marks them (meta ``adopt-identity:ITEM``), and
only those are trusted without one, until their next cycle records it."""

from ..engine import names
from ..errors import DamagedPoint, FormatError
from . import ownership

ADOPT = "adopt-identity:"  # meta key prefix: an item from before identity records


def adopting(vault, name):
    """Whether item `name` comes from a vault older than identity records
    and has not recorded them yet."""
    return vault.has_meta(ADOPT + name)


def adopted(vault, name):
    """Every disk of `name` has its identity recorded: no longer adopting."""
    if all(ownership.read_state_exists(vault.dir, name, d["idx"]) for d in vault.disks(name)):
        vault.drop_meta(ADOPT + name)


def failed_over(vault, name):
    return vault.item(name)["state"] in ("failing-over", "failed-over")


def check_replicas(vault, name):
    """Refuse the points of `name`, a step chain (DamagedPoint, exit 7,
    naming the file) unless every file its steps are rolled back onto is as
    recorded. (A chunk index has no such file: its chunks are checked
    against their ids as they are read.)"""
    points = vault.points(name)
    if not points:
        return
    away = failed_over(vault, name)
    for d in vault.disks(name):
        replica = vault.endpoint(name, d["replica"])
        target, which, what = replica, ownership.REPLICA, "replica"
        if away:
            base = replica.sidecar(names.BASE)
            if base.exists():
                target, which, what = base, ownership.BASELINE, "baseline"
        where = ownership.state_path(vault.dir, name, d["idx"], which)
        try:
            recorded = ownership.read_state(vault.dir, name, d["idx"], which)
            if recorded is None and which == ownership.BASELINE:
                # killed between the rename and its record: the rename kept the
                # size and mtime the replica's record has, and changed the ctime
                recorded = _without_ctime(ownership.read_state(vault.dir, name, d["idx"]),
                                          target)
        except FormatError as exc:
            _refuse(vault, name, f"the identity record of disk {d['idx']} is damaged "
                    f"({exc.message} at offset {exc.offset}): whether {what} {target} was "
                    f"written outside pydr cannot be told", exc.path, away, damage=False)
        if recorded is None or recorded.replica != d["replica"]:
            if adopting(vault, name):
                continue
            _refuse(vault, name, f"the identity record of disk {d['idx']} is missing: whether "
                    f"{what} {target} was written outside pydr cannot be told", where, away,
                    damage=False)
        changed = ownership.changed_outside(recorded, target, what)
        if changed is not None:
            _refuse(vault, name, f"{changed} outside pydr since point {points[-1]['id']}",
                    target.spec, away, damage=True)


def _without_ctime(recorded, target):
    """`recorded` with the ctime of `target` now, where size and mtime are
    all a rename leaves to compare."""
    if recorded is None or recorded.writing or recorded.identity is None:
        return recorded
    now = ownership.identity(target)
    if not isinstance(now, tuple):
        return recorded
    size, mtime, _, inode, device = recorded.identity
    recorded.identity = (size, mtime, now[2], inode, device)
    return recorded


def _refuse(vault, name, reason, path, away, *, damage):
    """Record why the points of `name` cannot be restored and raise
    DamagedPoint. Changed (`damage`): every point is marked damaged, as a
    cycle would. A protected item becomes resync-required; a failed-over
    one keeps its state and its disks (nothing was moved)."""
    if damage:
        vault.mark_damaged(name, [p["id"] for p in vault.points(name)], reason)
    if away:
        vault.set_item(name, health="critical", last_error=reason)
        raise DamagedPoint(f"{reason}; its points cannot be made from it, and nothing was "
                           f"moved: the failed-over disks are left as they are", path=path,
                           item=name)
    vault.set_item(name, state="resync-required", health="warning", last_error=reason)
    raise DamagedPoint(reason, path=path, item=name, hint=f"run 'pydr replicate {name} --resync'")

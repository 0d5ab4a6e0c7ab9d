"""The vault's side of a replication cycle: the checks before it (state,
one writer, resync-required, hooks) and the records after it (steps, points,
the result). Used by the cycle driver (pydr.dr.cycle) whatever the kind of
the item's point store and wherever its capture ran."""

import contextlib
import os
import time

from ..endpoints import parse_remote
from ..errors import DamagedJournal, FormatError, InvalidState
from . import agent, ownership, replica_check, stepdigest
from .rpo import consistency_of, disks_cut_together
from .results import CycleResult, ItemOutcome  # noqa: F401  (where they were)


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
        raise FormatError(reason, path=path, item=name,
                          hint=f"run 'pydr replicate {name} --resync'")
    return None


def broken_chain(vault, name, reason, resync_all):
    """The replicas of `name` are not what its points are rebuilt from: every
    point is marked damaged, and a plain cycle refuses until --resync."""
    vault.mark_damaged(name, [p["id"] for p in vault.points(name)], reason)
    if not resync_all:
        mark_resync_required(vault, name, reason)


def rows_holding(vault, rows, path):
    """The items among `rows` with a replica at `path`: a local path, or
    host:PATH (a replica on another host, as its errors name it). All of
    them when none is: the error did not say which."""
    holding = [r for r in rows if r["name"] in items_at(vault, [r["name"]], path, ("replica",))]
    return holding or rows


def items_at(vault, names, path, roles=("source", "replica")):
    """The items among `names` with a disk (its `roles`) at `path`, a local
    path or host:PATH; none when `path` is None."""
    where = _place(path)
    if where is None:
        return []
    return [n for n in names if any(
        where in {_place(d[role]), _place(vault.endpoint(n, d[role]).local_path),
                  _place(vault.endpoint(n, d[role]).spec)}
        for d in vault.disks(n) for role in roles)]


def _place(spec):
    """(host, path) of host:PATH, (None, path) of a local path, None of None."""
    if spec is None:
        return None
    host, path = parse_remote(spec) or (None, os.fspath(spec))
    return host, os.path.normpath(path)


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
        vault.add_step(name, idx, number, spec, size, found)


def record_point(vault, names, *, cuts, bytes_by_item, hooks_ran=False, cut_times=None,
                 trackers=(), point_id=None, steps=(), extra=None):
    """Record, in one transaction, the `steps` [(item, disk index, [(number,
    spec, bytes)])] not yet recorded and a recovery point of each item in
    `names` at the disks' current steps; the items become protected, their
    replicate operation ends and their last_success_at is now. By item:
    `cuts` the cut kind (pydr.dr.agent.Taken.kind), `cut_times` when it was
    taken (epoch seconds; missing or None: not known), `bytes_by_item` the
    bytes moved. Each point's consistency label follows from its cut,
    `hooks_ran` and how many disks `names` have (all cut together: several
    are at different instants; pydr.dr.rpo.consistency_of). A new point id
    is allocated with them unless `point_id` is given (a call's items share
    one).
    Returns the point id."""
    now = time.time()
    cut_times = cut_times or {}
    disks = disks_cut_together(vault, names)
    with vault.transaction():
        if point_id is None:  # allocated with the points: a failed cycle uses no id
            point_id = vault.allocate_point_id()
        for name, idx, kept in steps:
            record_steps(vault, name, idx, kept)
        for name in names:
            cut_at = cut_times.get(name)
            if cut_at is not None:  # a host's clock ahead of ours: no data newer than its record
                cut_at = min(float(cut_at), now)
            vault.add_point(point_id, name, created=now, cut_at=cut_at,
                            consistency=consistency_of(cuts[name], hooks_ran=hooks_ran,
                                                       disks=disks),
                            size=bytes_by_item[name], cut=cuts[name])
            vault.set_item(name, state="protected", health="ok", last_error=None,
                           last_success_at=now)
            vault.clear_operation(name, "replicate")
        for t in trackers:  # the new bitmaps are the current ones, with the point
            t.record(vault)
        if extra is not None:  # more rows of the point (an object store's index): extra(vault, id)
            extra(vault, point_id)
    return point_id


def check_can_replicate(vault, rows, stores):
    """Each item's state allows a cycle, and no drill reads its replicas
    (`stores`: the items' point stores, by name)."""
    for row in rows:
        if row["state"] not in ("protecting", "protected", "resync-required"):
            raise InvalidState(f"item {row['name']!r} cannot replicate in state {row['state']}",
                               path=vault.dir)
        stores[row["name"]].refuse_writes_under_drill("a replication cycle")


def check_not_stuck(vault, names, resync_all):
    """Items in state resync-required replicate only with --resync."""
    stuck = [r for r in (vault.item(n) for n in names) if r["state"] == "resync-required"]
    if stuck and not resync_all:
        why = f" ({stuck[0]['last_error']})" if stuck[0]["last_error"] else ""
        raise InvalidState(f"{', '.join(r['name'] for r in stuck)} needs a resync{why}",
                           path=vault.dir, item=stuck[0]["name"],
                           hint=f"run 'pydr replicate {stuck[0]['name']} --resync'")


def check_hooks(vault, rows):
    missing = [r["name"] for r in rows if not r["quiesce_hook"]]
    if missing:
        raise InvalidState(f"an app-consistent cycle needs quiesce/thaw hooks; items without: "
                           f"{', '.join(missing)}", path=vault.dir, item=missing[0],
                           hint="protect them with --quiesce-hook and --thaw-hook, or replicate "
                                "without --app-consistent")


RESYNC_THRESHOLD = agent.RESYNC_THRESHOLD  # pending changes above this share need a resync


def mark_resync_required(vault, name, reason):
    vault.set_item(name, state="resync-required", health="warning", last_error=reason)

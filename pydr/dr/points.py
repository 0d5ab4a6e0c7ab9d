"""Recovery points: choosing one, retention, and materialising a point's disks.

What a point is made from -- undo steps beside a replica, or a point index
over chunks in an object store -- is its item's point store's business
(pydr.dr.pointstores): this module keeps the records every kind shares and
asks the store for the rest."""

import contextlib
import logging
import os
import time

from ..engine import crashpoints
from ..errors import DamagedPoint, InvalidArgument, InvalidState, UnknownName
from . import arguments, stepmerge
from .events import Emitter, check_cancel
from .pointstores import point_store
from .pointstores.base import protected_disks
from .policy import readable_policy
from .tiers import Tiers, points_to_keep

SELECTORS = ("latest", "latest-processed", "latest-app-consistent")
#: points retention tiers let go that may wait for their newer kept neighbour
#: to be kept for good (an hour of points every 10 s); more are thinned at once
MAX_WAITING = 360
_log = logging.getLogger("pydr.retention")


@contextlib.contextmanager
def operating(vault, name, operation):
    """The block is a workflow call of `operation` on item `name`: while it
    runs, the operation recorded on the item is not interrupted
    (Store.running); an exception it raises is about the item, and says
    so in ``.item`` (set on an OSError too, which keeps its builtin type)."""
    try:
        with vault.running(name, operation):
            yield
    except BaseException as exc:
        if getattr(exc, "item", None) is None:
            with contextlib.suppress(AttributeError):
                exc.item = name
        raise


def check_selector(point):
    """`point` as select_point takes it: None, a selector (SELECTORS), or a
    point id (an int, or its decimal digits as a str) as an int.
    InvalidArgument naming the forms accepted for anything else."""
    if point is None or point in SELECTORS:
        return point
    if isinstance(point, int) and not isinstance(point, bool) and point > 0:
        return point
    if isinstance(point, str) and point.isascii() and point.isdigit() and int(point) > 0:
        return int(point)
    raise InvalidArgument(f"a point must be a point id (a positive int, or its digits as a "
                          f"str) or one of {', '.join(map(repr, SELECTORS))}, not {point!r}")


def select_point(vault, name, point):
    """A point id from an id or a selector (latest-processed,
    latest-app-consistent; 'latest' is resolved by failover itself).
    InvalidArgument for a selector of another form (check_selector);
    InvalidState when the item has no point yet; UnknownName for an id it
    does not have, or no app-consistent point; DamagedPoint when every
    point the selector could pick is damaged."""
    point = check_selector(point)
    points = vault.points(name)
    if not points:
        raise InvalidState(f"item {name!r} has no recovery point yet", path=vault.dir, item=name,
                           hint=f"run 'pydr replicate {name}'")
    if point in (None, "latest", "latest-processed", "latest-app-consistent"):
        # a selector never picks a point known to be damaged: the newest sound one
        kind = "app-consistent " if point == "latest-app-consistent" else ""
        if kind:
            points = [p for p in points if p["consistency"] == "app-consistent"]
        if not points:
            raise UnknownName(f"item {name!r} has no {kind}recovery point", path=vault.dir,
                              item=name)
        sound = [p for p in points if not p["damaged"]]
        if not sound:
            raise DamagedPoint(f"every {kind}recovery point of {name!r} is damaged: "
                               f"{points[-1]['damaged']}", path=vault.dir, item=name)
        return sound[-1]["id"]
    vault.point(name, point)
    return point


def apply_retention(vault, name, now=None):
    """Drop the points beyond the item's retention, then let the item's
    point store release what only they needed (PointStore.release: undo
    steps, point indexes). Returns notes for a person (steps kept unmerged,
    and why), possibly none.

    The retention is the item's effective policy's tiers when it has
    ``keep`` (pydr.dr.tiers.points_to_keep at `now`, epoch seconds, default
    the clock): the points older than every kept one go as below; the
    others the tiers let go are thinned (PointStore.thin: a step chain
    merges each one's undo step into its newer neighbour, pydr.dr.stepmerge,
    once the next newer kept point is kept for good -- the newest of a
    period that is over -- so that the steps are merged once a period, not
    rewritten every cycle: until then they wait, at most MAX_WAITING of
    them; PointStore.thin_waits).
    Otherwise it is the item's count, and age when set (the newest point
    always stays); so too when its stored ``keep`` is damaged (a note and a
    warning in the log say so: never an error, so that a cycle, a failover
    or a reprotect still ends). Either way, the point a drill or a failover shows stays
    too, whatever its age, until cleanup-test-failover or commit lets it
    go: a resumed drill or failover makes the rest of its disks from it.
    Files a killed retention left to remove (``doomed_files``) go first.

    The points' records go first, in one transaction, and the store removes
    its files before their records, so that a kill in between leaves
    records that the next retention finds again, never files that nothing
    names (and never a point without what it is made from)."""
    row = vault.item(name)
    points = vault.points(name)
    now = time.time() if now is None else now
    stepmerge.remove_doomed(vault, name)
    shown = {row["test_point"], row["failover_point"]}  # a drill's or failover's point stays
    policy, damaged = readable_policy(vault, name)
    tiers = None if "keep" in damaged else policy.keep
    warnings = []
    if damaged:  # never a reason to stop a cycle, a failover or a reprotect
        warnings = [f"its policy is damaged ({error}): retention by its count and age"
                    if field == "keep" else f"its policy is damaged ({error})"
                    for field, error in damaged.items()]
        for warning in warnings:
            _log.warning("retention of %s: %s", name, warning)
    store = point_store(vault, name)
    thinned = []
    if tiers is not None:
        times = [(p.id, p.data_time) for p in points]
        keep = points_to_keep(times, tiers, now) | shown
        oldest_kept = min((p.id for p in points if p.id in keep), default=None)
        drop = [p for p in points if oldest_kept is not None and p.id < oldest_kept]
        thinned = [p.id for p in points if p.id not in keep
                   and (oldest_kept is None or p.id > oldest_kept)]
        if store.thin_waits:  # merged steps: once a period, not every cycle
            ready = _settled(thinned, keep, _kept_for_good(times, tiers, now) | (shown - {None}))
            if len(thinned) - len(ready) <= MAX_WAITING:  # else they would pile up
                thinned = ready
    else:
        drop = points[:max(0, len(points) - row["retention"])]
        if row["retention_age"] is not None and points:
            limit = now - row["retention_age"]
            drop = [p for p in points[:-1] if p in drop or p["created"] < limit]
    drop = [p for p in drop if p["id"] not in shown]
    with vault.transaction():
        vault.drop_points(name, [p.id for p in drop])
    crashpoints.reached("retention.recorded")
    notes = store.thin(thinned)
    for note in notes:
        _log.info("retention of %s: %s", name, note)
    return warnings + list(notes)


def _kept_for_good(times, tiers, now):
    """The points the period tiers keep that no newer point can displace:
    each the newest of a period older than the newest point's (the newest
    point, and a point kept only by `within`, are not)."""
    newest = max(times, key=lambda t: (t[1], t[0]), default=(None, 0))[0]
    periods = Tiers(hourly=tiers.hourly, daily=tiers.daily, weekly=tiers.weekly,
                    monthly=tiers.monthly)
    return points_to_keep(times, periods, now) - {newest}


def _settled(candidates, keep, settled):
    """The `candidates` (ids of points the tiers let go from the middle)
    whose next newer kept point is `settled`: thinned now. The others wait
    for it (the newest point's period is not over, or it is kept only by
    `within`): thinning them now would merge into a step that the next
    cycles merge again, rewriting the same bytes each cycle."""
    out = []
    for pid in candidates:
        upper = min((k for k in keep if k is not None and k > pid), default=None)
        if upper is not None and upper in settled:
            out.append(pid)
    return out


def materialize(vault, name, point_id, directory, *, threads=None, method="auto",
                progress=None, methods=None, events=None, cancel=None):
    """Write each disk of `name` as it was at recovery point `point_id` into
    `directory`, as DIR/<replica file name>, by `method` (see
    pydr.dr.pointstores.base.PointStore.materialize_disk). Returns the specs written;
    the methods used are appended to the list `methods`, if given, and
    recorded on the job ("materialize").

    ``events``: an EventSink (pydr.dr.events) given "started", per disk
    "progress" in phase "materialize" (named by the disk made, never its
    temporary file), then "finished", "failed" or "cancelled".
    ``cancel``: a threading.Event; once set, the work stops between disks
    and in the copy (Cancelled), every disk either made whole or not at all;
    running it again makes the rest."""
    directory = arguments.directory(directory, "materialize's directory")  # InvalidArgument
    em = Emitter(events, "materialize", name)

    def run():
        em.job = getattr(vault, "current_job", None)
        em.emit("started")
        return materialize_into(vault, name, point_id, directory, threads, method=method,
                                progress=progress, methods=methods, events=em, cancel=cancel)

    def checked():
        check_points_usable(vault, name)
        check_point(vault, name, point_id)
        return vault.run_job("materialize", name, run)

    with operating(vault, name, "materialize"):
        return em.run(checked, started=False, done=lambda paths: f"point {point_id}")


def check_point(vault, name, point_id):
    """Refuse point `point_id` before anything is written or renamed:
    DamagedPoint (exit 7) for a point marked damaged; else whatever its
    point store finds (PointStore.check_point: a damaged or missing step,
    DamagedJournal naming the step and the offset, which marks every point
    that needs it; a replica that is not the file the points were made on,
    DamagedPoint)."""
    row = vault.point(name, point_id)
    if row["damaged"]:
        raise DamagedPoint(f"recovery point {point_id} of {name!r} is damaged and is never "
                           f"restored: {row['damaged']}", path=vault.dir, item=name)
    point_store(vault, name).check_point(point_id)


def materialize_disk(vault, name, point_id, disk, dest, threads=None, drill=False, *,
                     method="auto", progress=None, cancel=None):
    """Write one disk as it was at `point_id` to `dest` (a spec or an
    endpoint; replaced), by its point store (PointStore.materialize_disk).
    ``drill``: a test failover's disk (never written over a file). Returns
    the method used, also noted on the job. ``cancel``: a threading.Event
    (Cancelled once set; `dest` is left as it was)."""
    check_cancel(cancel, "materialising the disk", dest)
    return point_store(vault, name).materialize_disk(
        point_id, disk, vault.endpoint(name, dest), threads=threads, drill=drill, method=method,
        progress=progress, cancel=cancel)


def check_points_usable(vault, name):
    if vault.item(name)["state"] == "committing":
        raise InvalidState(f"{name!r} is committing its failover: its points are being removed",
                           path=vault.dir, item=name, hint=f"run 'pydr commit {name}' to finish")


def destinations(vault, name, directory):
    """[(disk row, endpoint)]: where materialize_into makes each disk of
    `name` in `directory` (a spec), DIR/<replica file name>, every one
    checked before any is written. InvalidState naming the path when one
    would be made over a replica or a disk the vault protects, or two disks
    as one file (replicas that share a file name, of an item protected
    before protect refused them: one would silently stand for both)."""
    where = vault.endpoint(name, directory)
    protected = protected_disks(vault)
    out, made_as = [], {}
    for d in vault.disks(name):
        replica = vault.endpoint(name, d["replica"])
        dest = where.child(os.path.basename(replica.path))
        if dest.identity == replica.identity:
            raise InvalidState("refusing to materialise over the replica itself", path=str(dest),
                               item=name)
        if dest.identity in protected:  # a typo in --to must not roll production back
            raise InvalidState(f"refusing to materialise over a disk the vault protects "
                               f"({protected[dest.identity]})", path=str(dest), item=name,
                               hint="give another directory")
        if dest.identity in made_as:
            first = made_as[dest.identity]
            raise InvalidState(f"disks {first['idx']} and {d['idx']} of {name!r} would both be "
                               f"made as this file: their replicas {first['replica']} and "
                               f"{d['replica']} share a file name", path=str(dest), item=name)
        made_as[dest.identity] = d
        out.append((d, dest))
    return out


def materialize_into(vault, name, point_id, directory, threads=None, drill=False, *,
                     method="auto", progress=None, methods=None, events=None, cancel=None):
    """Every disk of the point into `directory` (a spec), named like its
    replica (see destinations); the replicas themselves are never written
    over. A drill keeps the disks that are there already (whole: a disk
    appears by a rename): the ones a killed drill finished. ``events``: an
    Emitter (pydr.dr.events) given each disk's progress in phase
    "materialize"; ``cancel``: checked between disks and in the copy."""
    check_points_usable(vault, name)
    events = events or Emitter(None, "materialize", name)
    out = []
    for d, dest in destinations(vault, name, directory):
        if not (drill and dest.exists()):
            shown = events.progress(disk=d["idx"], phase="materialize", path=str(dest),
                                    also=progress)
            used = materialize_disk(vault, name, point_id, d, dest, threads, drill,
                                    method=method, progress=shown, cancel=cancel)
            events.disk_done(disk=d["idx"], phase="materialize", endpoint=dest,
                             message=f"made ({used})")
            if methods is not None:
                methods.append(used)
            if drill:  # recorded with the disk: a resumed drill still says how it was made
                made = set(filter(None, (vault.item(name)["test_method"] or "").split("+")))
                vault.set_item(name, test_method="+".join(sorted(made | {used})))
                crashpoints.reached("drill.disk")
        out.append(str(dest))
    return out

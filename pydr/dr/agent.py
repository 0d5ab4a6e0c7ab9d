"""The part of a replication cycle that runs where an item's disks are: on
this machine for a cycle of its own, or on the item's host as a Dask task of
a fleet (pydr.dr.fleet).

It knows no vault (an import-linter contract keeps it so): a task is a
plain dict built by the coordinator, and what it returns is a small dict
that the coordinator records. Its work is idempotent, because Dask runs a
task again when the worker running it died: the replica's undo journal
makes a killed transfer resume, and of the two step specs offered for each
disk the first one a killed run committed is reported (kept == 1), so the
coordinator records each step once whether the task ran once or twice.
"""

import contextlib
import logging
import os
import time

from ..engine import crashpoints
from ..endpoints import open_endpoint
from ..endpoints.transfer import transfer
from ..errors import HookFailed, InvalidState
from .hooks import HookTimedOut, run_hook

_log = logging.getLogger(__name__)

#: A Dask worker serves host NAME when it has the resource pydr-host-NAME.
RESOURCE_PREFIX = "pydr-host-"
#: pending changes a caller reports (replicate(changed_extents=...)) above this
#: share of a disk make its item resync-required (pydr.dr.stepcapture.check)
RESYNC_THRESHOLD = 0.5
#: a tracked disk whose dirty extents cover more than this share of it is
#: compared whole in this cycle (:func:`extents_to_compare`)
WHOLE_DISK_SHARE = 0.5


def extents_to_compare(changed, size):
    """What a cycle compares of a disk of `size` bytes whose cut gave
    `changed`: its tracker's dirty extents ([(offset, length)], whole
    granules), or None -- the whole disk, the source read in full and the
    replica through its signature cache, as an untracked cycle does -- when
    they cover more than WHOLE_DISK_SHARE of it (a granule rounds every
    write up: at 64 MiB granules one 4 KiB write marks 64 MiB). Never less
    than the tracked compare: a dirty bitmap is a superset of what changed,
    and the whole disk a superset of the bitmap."""
    if changed is not None and sum(n for _, n in changed) > WHOLE_DISK_SHARE * size:
        return None
    return changed


def transfer_disk(source, replica, *, offered, cache, has_point, resync_all, extents=None,
                  progress=None, threads=None, cancel=None):
    """Resync `replica` from `source` (endpoints) and keep its undo journal
    at one of the `offered` step specs when the item has a point already.
    Returns (bytes moved, bytes read, kept index or None, journal bytes).
    ``cancel``: a threading.Event the engine checks while it works."""
    if cache is not None:
        os.makedirs(os.path.dirname(cache), mode=0o700, exist_ok=True)
        if resync_all:  # compare both sides: the replica is read again, the cache rebuilt
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cache)
    st, kept = transfer(source, replica, keep_undo=offered if has_point else None,
                        signature_cache=cache, changed_extents=extents, progress=progress,
                        threads=threads, cancel=cancel)
    return st.bytes_written + st.bytes_zeroed, st.bytes_read, kept, st.journal_bytes


def steps_kept(step, offered, kept, journal_bytes):
    """[(number, spec, bytes)] to record for a disk whose next step is
    `step`: the one a killed run left, then this run's."""
    steps = []
    if kept == 1:
        steps.append((step, offered[0], 0))
    if kept is not None:
        steps.append((step + kept, offered[kept], journal_bytes))
    return steps


def worker_host():
    """The host this Dask worker serves (from its pydr-host-NAME resource),
    or None outside a worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    names = sorted(r[len(RESOURCE_PREFIX):] for r in worker.state.total_resources
                   if r.startswith(RESOURCE_PREFIX))
    return ",".join(names) or None


#: what the dirty-bitmap cut of a tracked disk is, by its tracker's kind: a live
#: disk is fleeced (one QMP transaction); a qcow2 image is cut while no QEMU can
#: write it (qemu-img and the qemu-nbd that reads it take the image's lock)
TRACKED_CUTS = {"qmp": "fleece", "qcow2": "bitmap", "libvirt": "checkpoint"}
#: the cuts after which the writers may go on (the disks are cut; what is read is the cut's)
_CUT_TAKEN = ("reflink", "fleece", "checkpoint", "checkpoint-frozen")


class Taken:
    """A cut, as :func:`cut` yields it: ``views`` (per disk, the endpoint to
    read: a reflink clone, a tracker's view, or the source itself), ``changed``
    (per disk, [(offset, length)] a tracker says changed since its last
    cut, or None: compare everything), ``kind`` ("reflink", "fleece",
    "bitmap": how each disk was cut, each on its own; "quiesce" or "none")
    and ``at``: when it was taken (epoch seconds: after the quiesce hooks,
    before the first disk was cut; for "none", before the reads began), the
    time of the point's data."""

    def __init__(self, views, changed, kind, at):
        self.views, self.changed, self.kind, self.at = views, changed, kind, at


@contextlib.contextmanager
def cut(sources, *, trackers=None, full=False, hooks=(), on_thaw_error=None):
    """The one cut of a cycle's disks, here or on a host: every quiesce hook
    in `hooks` [(label, quiesce, thaw)], then each disk of `sources` cut in
    turn, each at its own instant -- a tracked disk (its tracker in
    `trackers`, same order) starts its next dirty bitmap (one QMP
    transaction, or one qemu-img call, per disk; `full`: compare everything,
    or a list per disk), the others are cloned where their file system can
    (one FICLONE per disk) -- and the thaw hooks as soon as that is a cut
    ("reflink", "fleece"), else after the reads. No step takes several
    disks at once: only the quiesce hooks, held until the last disk is cut,
    make several disks one moment's (pydr.dr.rpo.consistency_of labels a
    point of several disks without them "disk-consistent"). Yields a
    :class:`Taken` (``at``: when the first disk was cut, the data's time);
    the clones and views are released after. A thaw after the reads that
    fails calls `on_thaw_error(label, exc)` when given, else raises."""
    trackers = trackers or [None] * len(sources)
    fulls = full if isinstance(full, (list, tuple)) else [full] * len(sources)
    frozen, snaps, views, changed, kinds = [], [], [], [], set()
    held = contextlib.ExitStack()  # the tracked disks' views, held while they are read
    failing = []  # the cut is stopped by an error: a late thaw's failure must not hide it

    def thaw(late=False):
        while frozen:
            label, thaw_hook = frozen.pop(0)
            try:
                run_hook(thaw_hook, f"thaw hook of {label!r}")
            except HookFailed as exc:
                if not late or on_thaw_error is None:
                    raise
                on_thaw_error(label, exc)

    try:
        for label, quiesce_hook, thaw_hook in hooks:
            if quiesce_hook:
                try:
                    run_hook(quiesce_hook, f"quiesce hook of {label!r}")
                except HookTimedOut:  # it may have frozen before it hung: thaw (below)
                    frozen.append((label, thaw_hook))
                    raise
                frozen.append((label, thaw_hook))
        quiesced = bool(frozen)
        # the data's time: every write that ended before it is in the point;
        # with a clone, a bitmap or hooks no later one is (with none, some may be)
        at = time.time()
        for source, t, whole in zip(sources, trackers, fulls):
            if t is not None:
                c = held.enter_context(t.cut(full=whole))
                views.append(c.view)
                changed.append(c.changed)
                # a tracker may say more of its cut (a libvirt guest frozen at it)
                kinds.add(getattr(t, "cut_kind", None) or TRACKED_CUTS.get(t.kind))
            else:
                snap = source.snapshot()
                snaps.append(snap)
                views.append(snap or source)
                changed.append(None)
                kinds.add("reflink" if snap else None)
        kind = kinds.pop() if len(kinds) == 1 and None not in kinds else (
            "quiesce" if quiesced else "none")
        if kind in _CUT_TAKEN:  # a qcow2 image stays locked while it is read
            thaw()  # the cut is taken: the applications may go on
        yield Taken(views, changed, kind, at)
    except BaseException:
        failing.append(True)
        raise
    finally:
        try:
            held.close()
        finally:
            try:
                thaw(late=True)
            except HookFailed as exc:
                if not failing:
                    raise
                # the error that stopped the cut is the one to report (a hung quiesce)
                _log.warning("%s (after: the cut failed)", exc)
            finally:
                for snap in snaps:
                    if snap:
                        with contextlib.suppress(OSError, HookFailed):
                            snap.remove_many([snap])


def _tracker(item, d, source):
    """The tracker of a tracked disk of a task, or None. Bitmaps older than
    the one the vault recorded are dropped first: their changes are in the
    item's recorded points (what the coordinator's last record left)."""
    if not d.get("tracking"):
        return None
    from .tracking import PREFIX, QmpTracker, Qcow2Tracker

    cls = {"qcow2": Qcow2Tracker, "qmp": QmpTracker}[d["tracking"]]
    t = cls(None, item, d, source)
    if t.current is not None:
        for name in t.bitmaps():
            number = name[len(PREFIX):] if name.startswith(PREFIX) else ""
            if number.isdigit() and int(number) < t.generation:
                t.remove(name)
    if not d["full"]:
        t.validate()  # never a cycle that sends less than what changed
    return t


class NeedsResync(InvalidState):
    """Raised on a host when a tracked disk needs a checksum resync
    (``reason``); the coordinator marks the item resync-required. (Workers
    before the whole-disk compare of :func:`extents_to_compare` raised it
    for tracked changes over half a disk; kept so that their errors still
    unpickle and are recorded.)"""

    def __init__(self, message, reason=None, **kwargs):
        super().__init__(message, **kwargs)
        self.reason = reason


def cycle_item(task):
    """One item's cycle on its host. `task`: {"item", "vault", "rsh", "remote_pydr",
    "quiesce_hook", "thaw_hook" (None unless app-consistent), "threads",
    "disks": [{"idx", "source", "replica", "step", "offered": [spec, spec],
    "cache" (a path, or None), "has_point", "resync", and for a tracked disk
    "tracking" (qcow2 or qmp), "bitmap", "generation", "granularity" (None:
    the default), "full"}]}.

    The item's disks are cut in one :func:`cut` (each disk in turn; a
    group's members, each a task, at their own times). Returns {"item",
    "host", "cut", "cut_at" (when the cut was taken, epoch seconds),
    "disks": [{"idx", "size", "moved", "read", "steps": [[number, spec,
    bytes]], and for a tracked disk "bitmap", "generation":
    the bitmap that records from the cut on]}. A failure after a tracked
    cut merges what was tracked back into the bitmap the vault knows."""
    item = task["item"]
    reach = dict(rsh=task.get("rsh"), remote_pydr=task.get("remote_pydr"))
    disks = task["disks"]
    sources = [open_endpoint(d["source"], **reach) for d in disks]
    sizes = [s.size() for s in sources]
    trackers = [_tracker(item, d, s) for d, s in zip(disks, sources)]
    hooks = [(item, task.get("quiesce_hook"), task.get("thaw_hook"))]
    try:
        with cut(sources, trackers=trackers, full=[d.get("full", False) for d in disks],
                 hooks=hooks) as taken:
            results = []
            for d, view, changed, size in zip(disks, taken.views, taken.changed, sizes):
                changed = extents_to_compare(changed, size)
                replica = open_endpoint(d["replica"], **reach)
                cache = d.get("cache")
                if cache is not None and not os.path.isdir(task.get("vault") or ""):
                    cache = None  # the vault is not on this host: compare both sides instead
                moved, read, kept, journal = transfer_disk(
                    view, replica, offered=d["offered"], cache=cache,
                    has_point=d["has_point"], resync_all=d["resync"], extents=changed,
                    threads=task.get("threads"))
                crashpoints.reached("agent.disk")
                results.append({"idx": d["idx"], "size": size, "moved": moved, "read": read,
                                "steps": steps_kept(d["step"], d["offered"], kept, journal)})
    except BaseException:
        for t in trackers:  # what was tracked goes back into the bitmap the vault knows
            if t is not None and t.new is not None:
                with contextlib.suppress(Exception):  # else the next cut merges it
                    t.normalize()
        raise
    for r, t in zip(results, trackers):
        if t is not None:
            r.update(bitmap=t.new, generation=t.generation)
    return {"item": item, "host": worker_host(), "cut": taken.kind, "cut_at": taken.at,
            "disks": results}

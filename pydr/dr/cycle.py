"""The cycle driver: one replication cycle over many items, whatever their
kind and wherever their work runs.

A call plans once into units: the items of one group that are in the call
form one unit (all-or-nothing, one cut, one shared point), every other item
is a unit of its own. Each unit is checked (state, one writer, resync
needed, hooks), then its capture runs through an executor -- this process
(:class:`LocalExecutor`) or the item's host's Dask worker
(pydr.dr.fleet.FleetExecutor) -- and its outcome is recorded on its own: a
success gets its points (the items of a call share one point id, allocated
by the first success), a failure sets only its items' health, last_error
and jobs. When some unit failed, the others recorded, :class:`CycleFailed`
carries the CycleResult; a call of one unit raises that unit's own error.

The capture is the item's point store's (``PointStore.capture``; the kind
is picked by pydr.dr.pointstores.point_store): a step chain's is
pydr.dr.stepcapture, a chunk index's pydr.dr.chunkcapture.
Each offers check(vault, names, opts), capture(vault, names, opts, jobs)
(here), task(vault, name, opts) -> (function, plain dict) and adopt(vault,
name, result) (on a worker), and returns a "captured" dict the driver
records: {"items": {name: {"cut", "cut_at", "bytes", "read", "host"?}}, "steps",
"trackers", "extra": {name: fn(store, point id)}, "after": [fn()]}.
"""

import contextlib
import logging
import time

from ..engine import crashpoints
from ..engine.progress import Record
from ..errors import (Cancelled, CycleFailed, InvalidArgument, InvalidState, PassphraseRequired,
                      UnknownName, WrongPassphrase, exit_code_for)
from .events import Emitter, check_cancel, interrupted
from .hooks import hook_timeout
from .pointstores import point_store
from .cyclerecord import (CycleResult, ItemOutcome, check_can_replicate, check_hooks,
                          check_not_stuck, items_at, record_point, record_steps)
from .points import apply_retention
from .retry import RetryPolicy, recoverable

#: how an item's failure to open its encrypted object store begins (pydr run alerts on it)
PASSPHRASE_FAILURE = "the object store's passphrase: "
from .rpo import consistency_of, disks_cut_together, weakest

_log = logging.getLogger("pydr.retention")


class Options(Record):
    """What every unit of a call is replicated with (see :func:`replicate`)."""

    _fields = ("app_consistent", "progress", "threads", "resync_all", "changed_extents",
               "tracking_lost", "bwlimit", "on_hosts", "events", "cancel", "warm")
    __slots__ = _fields
    _default_on_hosts = False  # the executor runs forward items on their hosts
    _default_app_consistent = False
    _default_resync_all = False
    _default_tracking_lost = False


class Unit:
    """Items replicated all-or-nothing: a group's members in the call, or one item."""

    def __init__(self, names, capture):
        self.names, self.capture = names, capture
        self.jobs = {}
        self.started = False  # its capture began (an executor sets it)
        self.done = False
        self.blame = ()  # the members a failed check was about (the others failed with them)
        self.check_recorded = True  # a failed check recorded its finding on the item itself


def _capture_for(vault, name):
    """The capture of item `name`'s point store (pydr.dr.pointstores picks
    the kind, in one place)."""
    return point_store(vault, name).require("capture")


class LocalExecutor:
    """Runs each unit's capture in this process, one unit after the other."""

    point_reached = "cycle.point"  # the crash point passed once a unit's point is recorded
    rerun = ""  # what a rerun of an interrupted cycle adds to 'pydr replicate ITEM'
    on_hosts = False

    def check(self, vault, rows):
        """Refuse, before anything is recorded, an item this executor cannot run."""

    def run(self, vault, units, opts, finish):
        for unit in units:
            check_cancel(opts.cancel, "the replication cycle")  # the units after: not started
            unit.started = True
            try:
                captured = unit.capture.capture(vault, unit.names, opts, unit.jobs)
            except Exception as exc:
                finish(unit, error=exc)
                continue
            finish(unit, captured)


def item_names(vault, names):
    """The items a call names, in order, each once: `names` is an item's
    or a group's name, or a list of them; a group's name stands for its
    members (protect never lets one name be both). InvalidArgument when
    `names` is not a name or a list of names, UnknownName naming what is
    neither an item nor a group."""
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InvalidArgument(f"the items to replicate must be an item's or a group's name, or "
                              f"a list of them, not {names!r}")
    out = []
    for name in names:
        if vault.has_item(name):
            out.append(name)
            continue
        try:
            out += vault.items(group=name)
        except UnknownName:
            raise UnknownName(f"no protected item or replication group named {name!r}",
                              path=vault.dir, item=name) from None
    return list(dict.fromkeys(out))


def _unit_names(vault, names):
    """The names of each unit of a call: a group's members in it, or one item."""
    units, by_group = [], {}
    for name in dict.fromkeys(names):
        grp = vault.item(name)["grp"]  # an unknown name stops the call: nothing ran
        if grp and grp in by_group:
            by_group[grp].append(name)
            continue
        units.append([name])
        if grp:
            by_group[grp] = units[-1]
    return units


def _plan(vault, names):
    return [Unit(unit, _capture_for(vault, unit[0])) for unit in _unit_names(vault, names)]


def _last_job(vault, name):
    """The id of item `name`'s newest job, or None."""
    newest = vault.find_jobs(item=name, limit=1)
    return newest[0].id if newest else None


def _marks(row):
    """What a failed check records on an item (its state, health, last_error)."""
    return row["state"], row["health"], row["last_error"]


class _Cycle:
    def __init__(self, vault, opts, executor, names):
        self.vault, self.opts, self.executor = vault, opts, executor
        self.names = list(dict.fromkeys(names))
        self.consistency = None  # the weakest label of the points it recorded (pydr.dr.rpo)
        self.point_id = None
        self.outcomes, self.errors = {}, {}
        self.jobs = []
        self.totals = {"written": 0, "read": 0}
        self.events = Emitter(opts.events, "replicate")

    def prepare(self, unit):
        """The checks of one unit, then its operation and jobs begin."""
        vault = self.vault
        if any(_capture_for(vault, n) is not unit.capture for n in unit.names):
            raise InvalidState(f"group {vault.item(unit.names[0])['grp']!r} mixes items "
                               f"replicated to object stores with others: a group's items "
                               f"share one kind of replica", path=vault.dir)
        rows = [vault.item(n) for n in unit.names]
        before = {r["name"]: _marks(r) for r in rows}
        for row in rows:  # a member's own checks: a failure is about that member
            unit.blame = (row["name"],)
            check_can_replicate(vault, [row], {row["name"]: point_store(vault, row["name"])})
            self.executor.check(vault, [row])
        unit.blame = ()
        jobs_before = {n: _last_job(vault, n) for n in unit.names}
        try:
            unit.capture.check(vault, unit.names, self.opts)
        except BaseException:  # it records its failure on the member it is about
            unit.blame = tuple(n for n in unit.names if _marks(vault.item(n)) != before[n])
            # (its marks, or a failed job: the same failure again leaves the marks as they
            # were) -- or nothing (an image that cannot be read): then failed() records it
            unit.check_recorded = bool(unit.blame) or any(
                _last_job(vault, n) != jobs_before[n] for n in unit.names)
            raise
        if not self.opts.resync_all:
            unit.blame = tuple(n for n in unit.names
                               if vault.item(n)["state"] == "resync-required")
        check_not_stuck(vault, unit.names, self.opts.resync_all)
        for row in rows if self.opts.app_consistent else ():
            unit.blame = (row["name"],)
            check_hooks(vault, [row])
        unit.blame = ()
        again = self.executor.rerun + (" --resync" if self.opts.resync_all else "")
        for n in unit.names:  # a killed cycle is finished by running this again
            vault.begin(n, "replicate", f"pydr replicate {n}{again}")
        unit.jobs = {n: vault.start_job("replicate", n, state="queued") for n in unit.names}
        self.jobs += unit.jobs.values()
        for n in unit.names:
            self.events.for_item(n, unit.jobs[n]).emit("started")

    def finish(self, unit, captured=None, error=None):
        """Record a unit's outcome: its points, or its failure. A failure
        while recording (the vault's disk, retention, an object store's
        clean-up) is that unit's failure too."""
        if error is not None:
            self.failed(unit, error, partial=captured)
            return
        try:
            self._record(unit, captured)
        except Exception as exc:
            self.failed(unit, exc)
            return
        unit.done = True

    def _record(self, unit, captured):
        vault = self.vault
        items = captured["items"]
        extras = captured["extra"]
        cuts = {n: items[n]["cut"] for n in unit.names}
        for n in unit.names:
            self.events.for_item(n, unit.jobs[n]).emit("progress", phase="record")
        point_id = record_point(
            vault, unit.names, cuts=cuts, hooks_ran=self.opts.app_consistent,
            cut_times={n: items[n].get("cut_at") for n in unit.names},
            bytes_by_item={n: items[n]["bytes"] for n in unit.names},
            trackers=captured["trackers"], point_id=self.point_id, steps=captured["steps"],
            extra=(lambda store, pid: [fn(store, pid) for fn in extras.values()])
            if extras else None)
        self.point_id = point_id
        self.consistency = weakest([self.consistency] + [
            consistency_of(cut, hooks_ran=self.opts.app_consistent,
                           disks=disks_cut_together(vault, unit.names)) for cut in cuts.values()])
        crashpoints.reached(self.executor.point_reached)
        for t in captured["trackers"]:
            t.commit()
        for fn in captured["after"]:
            fn()
        for n in unit.names:
            note = self._retain(n)
            if items[n].get("host"):
                vault.update_job(unit.jobs[n], host=items[n]["host"])
            vault.end_job(unit.jobs[n], "succeeded", bytes_transferred=items[n]["bytes"])
            self.outcomes[n] = ItemOutcome(n, "succeeded", point_id=point_id,
                                           bytes=items[n]["bytes"],
                                           bytes_read=items[n]["read"])
            self.totals["written"] += items[n]["bytes"]
            self.totals["read"] += items[n]["read"]
            self.events.for_item(n, unit.jobs[n]).emit(
                "finished", bytes_done=items[n]["bytes"],
                message=f"point {point_id}" + (f"; {note}" if note else ""))
            crashpoints.reached("cycle.done")

    def _retain(self, name):
        """The item's retention once its point is recorded. A failure (an
        I/O error, a file it cannot remove) fails no cycle: the point is
        there, the item protected. The item's health becomes warning, its
        last_error names the problem, and the next retention tries again.
        Returns that note, or None. A stop (Ctrl-C, cancel) goes on up."""
        try:
            apply_retention(self.vault, name)
        except Exception as exc:
            if interrupted(exc):
                raise
            note = f"retention failed after the point was recorded: {exc}"
            _log.warning("%s: %s", name, note)
            with self.vault.transaction():
                self.vault.set_item(name, health="warning", last_error=note)
            return note
        return None

    def failed(self, unit, exc, *, partial=None):
        """A unit failed: only its items' jobs, health and last_error say so.
        Steps its members kept on their hosts (a group whose other member
        failed) are recorded, without a point."""
        vault = self.vault
        unit.done = True
        for name, idx, kept in (partial or {}).get("steps", ()):
            with vault.transaction():
                record_steps(vault, name, idx, kept)
        cancelled = interrupted(exc)
        # an operator's stop is no fault: as a kill, it leaves health and last_error as they
        # were (the job says "cancelled"; running the same command again is the way out)
        health = "warning" if recoverable(exc) else "critical"
        error = str(exc) or (f"interrupted ({type(exc).__name__})" if cancelled
                             else type(exc).__name__)
        if isinstance(exc, (PassphraseRequired, WrongPassphrase)):  # `pydr run` says how
            error = f"{PASSPHRASE_FAILURE}{error}" + (f": {exc.hint}" if exc.hint else "")
        if unit.jobs and len(unit.names) > 1 and not unit.blame:
            # the group's capture failed: the member whose disk the error names, if any
            unit.blame = tuple(items_at(vault, unit.names, _where(exc)))
        for n in unit.names:
            if n in self.outcomes:  # ended already (its point and job recorded)
                continue
            checked = n not in unit.jobs  # its unit failed a check before its jobs began
            if unit.blame and n not in unit.blame:
                why = f"group member {', '.join(unit.blame)} failed: {error}"
            elif checked and unit.check_recorded and (unit.blame or len(unit.names) == 1):
                why = None  # the check recorded what it found on the item it is about
            else:
                why = error
            if why is not None:
                if checked:
                    unit.jobs[n] = vault.start_job("replicate", n)
                    self.jobs.append(unit.jobs[n])
                vault.end_job(unit.jobs[n], "cancelled" if cancelled else "failed",
                              error=why, bytes_transferred=None)
                if cancelled:
                    vault.end(n, "replicate")
                else:
                    vault.end(n, "replicate", health=health, last_error=why)
            self.outcomes[n] = ItemOutcome(n, "failed", error=why or error,
                                           exit_code=exit_code_for(exc),
                                           recoverable=recoverable(exc))
            self.events.for_item(n, unit.jobs.get(n)).emit(
                "cancelled" if cancelled else "failed", message=why or error)
        self.errors[tuple(unit.names)] = exc

    NOT_BEGUN = "the call stopped before this item's cycle began"

    def not_started(self, unit, exc):
        """A unit whose capture never began when the call stopped (with
        `exc`): its jobs are cancelled and its operation ended; its health
        stays as it was. Its outcome says so (exit code: `exc`'s)."""
        unit.done = True
        for n in unit.names:
            if n in unit.jobs:
                self.vault.end_job(unit.jobs[n], "cancelled", error=self.NOT_BEGUN,
                                   bytes_transferred=None)
            self.vault.end(n, "replicate")
            self.outcomes[n] = ItemOutcome(n, "failed", error=self.NOT_BEGUN,
                                           exit_code=exit_code_for(exc), recoverable=False)
            self.events.for_item(n, unit.jobs.get(n)).emit("cancelled", message=self.NOT_BEGUN)

    def result(self, seconds):
        outcomes = [self.outcomes[n] for n in self.names if n in self.outcomes]
        done = [o.item for o in outcomes if o.status == "succeeded"]
        return CycleResult(self.point_id, done, self.totals["written"], self.totals["read"],
                           seconds, self.consistency, list(self.jobs), outcomes)


def replicate(vault, names, *, executor=None, app_consistent=False, progress=None,
              threads=None, resync_all=False, changed_extents=None, tracking_lost=False,
              bwlimit=None, events=None, cancel=None, warm=None):
    """Run one replication cycle of the items `names` (an item's or a
    group's name, or a list of them: see :func:`item_names`); returns
    CycleResult.

    The items of a group that are in `names` are replicated together, all
    or nothing, with one cut; every other item on its own. Each item gets a
    job; a failed unit marks its items' jobs failed and their health
    critical (or warning when the error is recoverable), and the others go
    on. Then, if some unit failed: a call of one unit raises its error, a
    call of several raises CycleFailed (its .result the CycleResult).

    ``executor``: where the captures run (default LocalExecutor: here; a
    pydr.dr.fleet.FleetExecutor: on each item's host's Dask worker).
    ``changed_extents``: {item: {disk index: [(offset, length), ...]}} from a
    change tracker; only those ranges are compared. ``tracking_lost``: the
    tracker was reset (or the source shut down uncleanly). Either that, or
    pending changes above half a disk, marks the items resync-required, and
    only ``resync_all=True`` (``--resync``: a checksum comparison of both
    sides, the replica re-read) replicates them then. ``bwlimit``: bytes a
    second for uploads to an object store.

    ``events``: an EventSink (pydr.dr.events) given, for each item, a
    "started" event (its job queued), "progress" events per disk and phase
    (bytes done and total), and "finished" (its point), "failed" or
    "cancelled". ``cancel``: a threading.Event; once set, the cycle stops
    at the next check (between units and disks, and in the engine's reads,
    within about 16 MiB or a second): the items being replicated end as a
    kill leaves them, their jobs "cancelled" and their health and
    last_error as they were (an operator's stop is no fault; a rerun
    finishes them), the ones not begun are untouched, and Cancelled
    (exit 130) is raised. Items recorded before it keep their points; its
    ``.result`` is the CycleResult (an outcome "failed" with exit code 130
    for each item stopped or not begun). Ctrl-C ends the same way.

    ``warm``: a pydr.dr.warm.WarmState kept by a long-running service
    (pydr run): what a tracked cycle would rebuild each time (QMP
    connections, signature caches) is kept in it; None: a cold cycle.

    An error of a call about one item carries it in ``.item`` (an
    OSError too: it keeps its builtin type).
    """
    start = time.monotonic()
    if app_consistent:
        hook_timeout()  # a bad PYDR_HOOK_TIMEOUT stops the call before any item ran
    opts = Options(app_consistent=app_consistent, progress=progress, threads=threads,
                   resync_all=resync_all, changed_extents=changed_extents,
                   tracking_lost=tracking_lost, bwlimit=bwlimit,
                   on_hosts=getattr(executor, "on_hosts", False), events=events, cancel=cancel,
                   warm=warm)
    executor = executor or LocalExecutor()
    cycle = _Cycle(vault, opts, executor, item_names(vault, names))
    with contextlib.ExitStack() as running:  # status: the items' cycles run now, in this process
        for n in cycle.names:
            running.enter_context(vault.running(n, "replicate"))
        return _run(vault, cycle, executor, opts, start)


def _run(vault, cycle, executor, opts, start):
    """The body of replicate(): plan, check, capture and record every unit."""
    units = _plan(vault, cycle.names)
    try:
        ready = []
        for unit in units:
            try:
                cycle.prepare(unit)
            except Exception as exc:  # this unit's failure: the others go on
                cycle.failed(unit, exc)
                continue
            ready.append(unit)
        executor.run(vault, ready, opts, cycle.finish)
    except BaseException as exc:  # Ctrl-C: the running units are cancelled, the rest untouched
        for unit in units:
            if unit.done:
                continue
            if unit.started:
                cycle.failed(unit, exc)
            else:
                cycle.not_started(unit, exc)
        if isinstance(exc, Cancelled):  # what the call did before it stopped
            exc.result = exc.cycle_result = cycle.result(time.monotonic() - start)
        _about_one_item(exc, cycle.names)
        raise
    result = cycle.result(time.monotonic() - start)
    if cycle.errors:
        stopped = [e for e in cycle.errors.values() if interrupted(e)]
        if stopped:  # cancelled: the call ends as a kill would, whatever the others did
            with contextlib.suppress(AttributeError):
                stopped[0].cycle_result = result
            if isinstance(stopped[0], Cancelled):  # .result, as CycleFailed's
                stopped[0].result = result
            _about_one_item(stopped[0], cycle.names)
            raise stopped[0]
        if len(units) == 1:
            exc = next(iter(cycle.errors.values()))
            with contextlib.suppress(AttributeError):  # for --json: every item's outcome
                exc.cycle_result = result
            _about_one_item(exc, cycle.names)
            raise exc
        # chained to an item's internal error first (a bug: exit 1 at the CLI), else its first
        errors = list(cycle.errors.values())
        cause = next((e for e in errors if exit_code_for(e) == 1), errors[0])
        hints = dict.fromkeys(e.hint for e in errors if getattr(e, "hint", None))
        raise _some_failed(vault, result, "; ".join(hints) or None) from cause
    return result


def _about_one_item(exc, names):
    """A call about one item raises an error that names it (``.item``; set
    on an OSError too, which keeps its builtin type)."""
    if len(names) == 1 and getattr(exc, "item", None) is None:
        with contextlib.suppress(AttributeError):
            exc.item = names[0]


def _where(exc):
    """The path an error names (a PydrError's path, an OSError's file name)."""
    return getattr(exc, "path", None) or getattr(exc, "filename", None)


def _some_failed(vault, result, hint=None):
    failed = result.failed
    return CycleFailed(f"{len(failed)} of {len(result.outcomes)} items failed ("
                       + "; ".join(f"{o.item}: {o.error}" for o in failed[:3])
                       + ("; ..." if len(failed) > 3 else "")
                       + "); the others have their points", result, path=vault.dir, hint=hint)


def replicate_with_retry(vault, names, *, policy=None, events=None, cancel=None, **kwargs):
    """replicate(), retried on the schedule of pydr.dr.retry while some items'
    errors are recoverable; only those items (with their groups' members in
    the call) run again. Each scheduled retry is recorded on the items it
    retries (attempts, next_retry) so `pydr status` shows it; once the
    retries end, so does every item's schedule. The result (or
    CycleFailed's) has every item's last outcome; its point_id is the one
    the items that succeeded share (None when attempts gave them different
    ones: each outcome has its own). A call of several units that ends with
    some failed raises CycleFailed, even when the last attempt retried one
    unit; a call of one unit raises that unit's own error.

    ``events`` and ``cancel`` are replicate()'s, for every attempt; a set
    ``cancel`` also ends the waits between attempts (Cancelled is raised,
    the schedule cleared)."""
    kwargs.update(events=events, cancel=cancel)
    names = item_names(vault, names)
    pending = list(names)
    outcomes = {}
    state = {"jobs": [], "written": 0, "read": 0, "consistency": None}

    def attempt():
        try:
            r = replicate(vault, pending, **kwargs)
        except CycleFailed as exc:
            keep(exc.result)
            exc.result = merged(exc.result)
            raise
        except Exception as exc:  # one unit's own error: its outcomes are kept all the same
            if getattr(exc, "cycle_result", None) is not None:
                keep(exc.cycle_result)
                exc.cycle_result = merged(exc.cycle_result)
                if isinstance(exc, Cancelled):  # .result too: every attempt's outcomes
                    exc.result = exc.cycle_result
            raise
        keep(r)
        return merged(r)

    def keep(r):
        outcomes.update((o.item, o) for o in r.outcomes)
        state["jobs"] += r.jobs
        state["written"] += r.bytes_written
        state["read"] += r.bytes_read
        state["consistency"] = weakest([state["consistency"], r.consistency])

    def merged(r):
        every = [outcomes[n] for n in names if n in outcomes]
        points = {o.point_id for o in every if o.status == "succeeded"}
        return CycleResult(points.pop() if len(points) == 1 else None,
                           [o.item for o in every if o.status == "succeeded"],
                           state["written"], state["read"], r.seconds, state["consistency"],
                           list(state["jobs"]), every)

    def record(n, when, exc):
        again = retried(exc)
        for name in again:
            vault.set_item(name, attempts=n, next_retry=when, last_error=outcome_error(name, exc))
        pending[:] = again

    def retried(exc):
        if isinstance(exc, CycleFailed):  # the recoverable items, each with its group
            wanted = {o.item for o in exc.result.failed if o.recoverable}
            groups = {vault.item(n)["grp"] for n in wanted} - {None}
            return [n for n in pending if n in wanted or vault.item(n)["grp"] in groups]
        return list(pending)

    def outcome_error(name, exc):
        o = outcomes.get(name)
        return o.error if o is not None and o.error else str(exc)

    policy = policy or RetryPolicy()
    if policy.on_retry is None:
        policy.on_retry = record
    if cancel is not None:
        policy.cancel = cancel
    try:
        result = policy.run(attempt)
        if result.failed:  # the last attempt retried the others, and they made it
            raise _some_failed(vault, result)
    except Exception as exc:
        last = getattr(exc, "cycle_result", None)
        if last is not None and not interrupted(exc) and len(_unit_names(vault, names)) > 1:
            # the last attempt ran one unit of several: the call's outcome is every item's
            raise _some_failed(vault, last) from exc
        raise
    finally:  # no retry runs after this: none is scheduled
        for n in names:
            vault.set_item(n, attempts=0, next_retry=None)
    return result

"""A fleet: replication cycles of items on many hosts, through Dask
distributed (docs/SCALE.md).

Each item has a host (``pydr protect --host NAME``): its disks are paths
there. A host is served by Dask workers that carry the resource
``pydr-host-NAME`` (``pydr worker --host NAME``, or a plain ``dask worker
--resources pydr-host-NAME=N``). This process, the coordinator, holds the
vault and is its only writer. Its :class:`FleetExecutor` is an executor of
the cycle driver (pydr.dr.cycle): it submits one task per item (the item's
capture: pydr.dr.agent.cycle_item for a step chain,
pydr.dr.chunkcapture.capture_item for an object store), pinned to its
host's workers by that resource, and hands each unit (an item, or a group's
members) to the driver to record -- steps, point, job -- as soon as its
tasks are back, then releases the tasks' futures.

A group's members are each a task, cut on their own host at their own time
(their points' cut_at differ): the group's point is "disk-consistent"
without hooks, never crash-consistent (pydr.dr.rpo.consistency_of), and
app-consistent with hooks means each member's application was quiesced
at its own cut.

Dask runs a task again when the worker running it dies (a Nanny restarts
workers). The task's work is idempotent (see pydr.dr.agent), and a result
is recorded once, whichever run delivered it.

A host without a live worker does not hang the cycle: once no worker has
served it for ``host_timeout`` seconds, its items' tasks are cancelled and
the items fail with "no worker for host NAME" (recoverable: a later run,
once a worker is back, replicates them). The other items go on.

Cancel (replicate's ``cancel=``): once the event is set, the coordinator
stops waiting (it looks every half second): the tasks not back are
cancelled on the scheduler -- one not yet started never runs; one running
on a worker cannot be stopped there, it runs to its end and what it
returns is dropped -- and their items end as a killed cycle leaves them
(jobs "cancelled", health as it was). What a dropped task did on its host
(a replica resynced, an undo step kept) is what a rerun finds and
finishes: the work is idempotent, its step is offered again.
"""

import asyncio
import concurrent.futures
import contextlib
import time
import uuid

from ..errors import Cancelled, FleetError, InvalidState, NoWorkerForHost, SchedulerLost
from .agent import RESOURCE_PREFIX
from .cycle import LocalExecutor
from .events import Emitter

DEFAULT_HOST_TIMEOUT = 300.0  # seconds a host may be without a worker
POLL = 0.5  # seconds between looks at the cluster while tasks run
CONNECT_TIMEOUT = 30.0


def resource(host):
    return RESOURCE_PREFIX + host


class Fleet:
    """A connection to a Dask scheduler. ``events``: an EventSink
    (pydr.dr.events) given the fleet's Events (see :class:`FleetExecutor`)
    when the call itself was given none. Use as a context manager, or call
    close()."""

    def __init__(self, scheduler, *, host_timeout=DEFAULT_HOST_TIMEOUT, events=None):
        try:
            from distributed import Client
        except ImportError:
            raise FleetError("a fleet needs Dask distributed, which is not installed",
                             hint="pip install 'pydr[fleet]' (or distributed)") from None
        if host_timeout <= 0:
            raise ValueError("the host timeout must be a positive number of seconds")
        self.scheduler = scheduler
        self.host_timeout = host_timeout
        self.events = events
        try:
            self.client = Client(scheduler, timeout=min(CONNECT_TIMEOUT, host_timeout),
                                 set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise FleetError(f"cannot reach the Dask scheduler at {scheduler}: {exc}",
                             path=scheduler) from None

    def close(self):
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def hosts(self):
        """{host: number of live workers serving it}."""
        served = {}
        for w in self.client.scheduler_info(n_workers=-1)["workers"].values():
            for r in w.get("resources") or {}:
                if r.startswith(RESOURCE_PREFIX):
                    host = r[len(RESOURCE_PREFIX):]
                    served[host] = served.get(host, 0) + 1
        return served

    def executor(self):
        """The executor that runs cycles on this fleet (pydr.dr.cycle)."""
        return FleetExecutor(self)


class FleetExecutor:
    """Runs each item's capture on a Dask worker of the item's host (a task
    per item, pinned by the host's resource) and gives each unit to the
    driver (pydr.dr.cycle) once all of its items' tasks ended.

    Events (pydr.dr.events, to the call's ``events`` or else
    ``fleet.events``), besides the cycle driver's per item ("started",
    "finished" with its point, "failed", "cancelled"): per item "progress"
    in phase "submitted" (its task went to host H: ``message``), per item
    "progress" in phase "transfer" once its task is back (``bytes_done``:
    what it moved; ``message``: the host), and per disk of a step chain
    "progress" in phase "transfer" with its size done; "started" with
    ``item`` None once every task is submitted, and "finished" (or
    "cancelled" after a cancel dropped tasks) with ``item`` None at the end (``message``: items, succeeded, failed,
    seconds, and the coordinator's seconds: the time not spent waiting for
    workers)."""

    point_reached = "fleet.recorded"
    on_hosts = True

    def __init__(self, fleet):
        self.fleet = fleet
        self.rerun = f" --scheduler {fleet.scheduler}"

    def check(self, vault, rows):
        hosted = {bool(r["host"]) for r in rows if r["direction"] == "forward"}
        if len(hosted) > 1:
            raise InvalidState(f"group {rows[0]['grp']!r} mixes items with a --host and items "
                               f"without: its members are read on one side", path=vault.dir)

    @staticmethod
    def _here(vault, unit):
        """Whether a unit is read on this machine: items without a host (their
        disks are here), and after a reprotect (the replicas' side)."""
        return any(not vault.item(n)["host"] or vault.item(n)["direction"] != "forward"
                   for n in unit.names)

    def run(self, vault, units, opts, finish):
        here = [u for u in units if self._here(vault, u)]
        LocalExecutor().run(vault, here, opts, finish)
        units = [u for u in units if u not in here]
        fleet = self.fleet
        em = Emitter(opts.events or fleet.events, "replicate")
        cancel = opts.cancel
        start = time.monotonic()
        futures, host_of, disks_of, waiting = {}, {}, {}, {}
        cycle = uuid.uuid4().hex[:12]
        for unit in units:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the replication cycle cancelled")  # the rest: not started
            unit.started = True
            try:  # every task of the unit is built before any is submitted
                tasks = [(n, *unit.capture.task(vault, n, opts)) for n in unit.names]
            except Exception as exc:
                finish(unit, error=exc)
                continue
            waiting[id(unit)] = (unit, {})
            for name, fn, argument in tasks:
                host_of[name] = vault.item(name)["host"]
                disks_of[name] = len(vault.disks(name))
                f = fleet.client.submit(fn, argument, key=f"pydr-cycle-{name}-{cycle}",
                                        resources={resource(host_of[name]): 1}, pure=False)
                futures[f] = (unit, name)
                vault.update_job(unit.jobs[name], state="running", started=time.time())
                em.for_item(name, unit.jobs[name]).emit(
                    "progress", phase="submitted", message=f"to host {host_of[name]}")
        items, total_disks = len(host_of), sum(disks_of.values())
        em.emit("started", message=f"{items} items ({total_disks} disks) submitted")
        counts = {"done": 0, "failed": 0, "disks": 0, "bytes": 0}
        absent_since = {}  # host -> when it was first seen without a worker
        idle = 0.0  # seconds spent waiting for the workers: the rest is the coordinator's

        def ended(unit, name, result=None, error=None):
            outcome = waiting[id(unit)][1]
            if error is None:
                try:
                    outcome[name] = unit.capture.adopt(vault, name, result)
                except Exception as exc:  # what a worker returned cannot be recorded
                    error = exc
            if error is None and em:
                _disks_back(em.for_item(name, unit.jobs.get(name)), vault, name, result)
            if error is not None:
                outcome[name] = error
                counts["failed"] += 1
                if hasattr(unit.capture, "failed"):  # what the host found, as the vault says it
                    unit.capture.failed(vault, name, error)
            else:
                counts["done"] += 1
                counts["disks"] += disks_of[name]
                counts["bytes"] += outcome[name]["items"][name]["bytes"]
                em.for_item(name, unit.jobs.get(name)).emit(
                    "progress", phase="transfer",
                    bytes_done=outcome[name]["items"][name]["bytes"],
                    message=f"back from host {host_of[name]}")
            if len(outcome) == len(unit.names):  # the whole unit is back: recorded now
                del waiting[id(unit)]
                _unit_done(unit, outcome, finish)

        lost_errors = _connection_lost_errors()
        try:
            while futures:
                from distributed import wait

                if cancel is not None and cancel.is_set():  # what is not back: dropped
                    for f, (unit, name) in list(futures.items()):
                        del futures[f]
                        with contextlib.suppress(*lost_errors):
                            f.cancel()
                        ended(unit, name, error=Cancelled(
                            f"the replication cycle cancelled before {name}'s task on host "
                            f"{host_of[name]} was back", path=fleet.scheduler))
                    break

                waited = time.monotonic()
                back, lost, served = [], None, None
                try:
                    try:
                        with fleet.client.as_current():  # wait() asks for the current client
                            wait(list(futures), timeout=POLL, return_when="FIRST_COMPLETED")
                    except TimeoutError:
                        pass
                    idle += time.monotonic() - waited
                    for f in [f for f in futures if f.done()]:
                        if f.status == "cancelled" and fleet.client.status != "running":
                            raise SchedulerLost(f"the client's connection is {fleet.client.status}")
                        back.append((f, f.result() if f.status == "finished" else None))
                    if len(back) < len(futures):
                        served = fleet.hosts()
                except lost_errors as exc:  # what is not back fails, recoverably: rerun it
                    lost = SchedulerLost(f"lost the Dask scheduler at {fleet.scheduler} before "
                                         f"this item's cycle was back: {exc}",
                                         path=fleet.scheduler)
                for f, result in back:
                    unit, name = futures.pop(f)
                    if f.status == "finished":
                        ended(unit, name, result=result)
                    else:
                        ended(unit, name, error=_task_error(f, host_of[name]))
                    with contextlib.suppress(*lost_errors):
                        f.release()
                if lost is not None:
                    for f, (unit, name) in list(futures.items()):
                        del futures[f]
                        with contextlib.suppress(*lost_errors):
                            f.cancel()
                        ended(unit, name, error=lost)
                elif futures:
                    _watch_hosts(fleet, served, futures, host_of, absent_since,
                                 lambda unit, name, exc: ended(unit, name, error=exc))
        except BaseException:
            for f in futures:  # not recorded: they count as not run
                with contextlib.suppress(*lost_errors):
                    f.cancel()
            raise
        seconds = time.monotonic() - start
        stopped = cancel is not None and cancel.is_set() and counts["failed"]
        em.emit("cancelled" if stopped else "finished",
                message=f"{items} items: {counts['done']} succeeded, "
                f"{counts['failed']} failed in {seconds:.3f} s (coordinator "
                f"{seconds - idle:.3f} s)")


def _disks_back(em, vault, name, result):
    """A "progress" Event for each disk a step chain's task reports (its
    whole size compared, named by its replica)."""
    replicas = {d["idx"]: d["replica"] for d in vault.disks(name)}
    for d in result.get("disks", ()) if isinstance(result, dict) else ():
        if isinstance(d, dict) and "idx" in d and "size" in d:
            em.emit("progress", disk=d["idx"], phase="transfer", bytes_done=d["size"],
                    bytes_total=d["size"], path=replicas.get(d["idx"]))


def _connection_lost_errors():
    """What distributed raises when the client has lost its scheduler."""
    from distributed.client import FutureCancelledError, FuturesCancelledError
    from distributed.comm.core import CommClosedError

    return (FuturesCancelledError, FutureCancelledError, concurrent.futures.CancelledError,
            asyncio.CancelledError, CommClosedError, OSError, SchedulerLost)


def _unit_done(unit, outcome, finish):
    """All of a unit's tasks ended: one captured, or the unit's failure (the
    steps its other members kept are recorded with it)."""
    captured = {"items": {}, "steps": [], "trackers": [], "extra": {}, "after": []}
    error = None
    for name in unit.names:
        one = outcome[name]
        if isinstance(one, BaseException):
            error = error or one
            continue
        for k, v in one.items():
            if isinstance(v, dict):
                captured[k].update(v)
            else:
                captured[k] += v
    if error is not None:
        finish(unit, captured=captured, error=error)
    else:
        finish(unit, captured)


def _task_error(future, host):
    """The exception of a failed task, as pydr reports it."""
    exc = future.exception()
    if type(exc).__name__ == "KilledWorker":
        return FleetError(f"the workers of host {host} died while running this item's cycle "
                          f"(Dask gave up after repeated losses)",
                          hint="look at their logs, then run the same command again")
    if future.status == "cancelled":
        return FleetError("its task was cancelled on the scheduler")
    return exc


def _watch_hosts(fleet, served, futures, host_of, absent_since, fail):
    """Fail the items of hosts that no worker has served for host_timeout
    (`served`: Fleet.hosts())."""
    now = time.monotonic()
    for host in {host_of[name] for _, name in futures.values()}:
        if served.get(host):
            absent_since.pop(host, None)
            continue
        since = absent_since.setdefault(host, now)
        if now - since < fleet.host_timeout:
            continue
        for f, (unit, name) in [(f, v) for f, v in futures.items() if host_of[v[1]] == host]:
            f.cancel()
            del futures[f]
            fail(unit, name, NoWorkerForHost(
                f"no worker for host {host} within {fleet.host_timeout:g} s", item=name,
                hint=f"start one with 'pydr worker --scheduler {fleet.scheduler} --host {host}'"))

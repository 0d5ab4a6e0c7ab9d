"""A fleet: replication cycles of items on many hosts, through Dask
distributed (docs/SCALE.md).

Each item has a host (``pydr protect --host NAME``): its disks are paths
there. A host is served by Dask workers that carry the resource
``pydr-host-NAME`` (``pydr worker --host NAME``, or a plain ``dask worker
--resources pydr-host-NAME=N``). This process, the coordinator, holds the
vault and is its only writer: it submits one task per item
(pydr.dr.agent.cycle_item), pinned to its host's workers by that resource,
and records what each task returns -- steps, point, job -- as it arrives,
then releases the task's future.

Dask runs a task again when the worker running it dies (a Nanny restarts
workers). The task's work is idempotent (see pydr.dr.agent), and a result
is recorded once, whichever run delivered it.

A host without a live worker does not hang the cycle: once no worker has
served it for ``host_timeout`` seconds, its items' tasks are cancelled and
the items fail with "no worker for host NAME" (recoverable: a later run,
once a worker is back, replicates them). The other items go on.
"""

import time
import uuid

from ..engine import crashpoints
from ..errors import FleetError, InvalidState, NoWorkerForHost
from . import ownership, replica_check
from .agent import RESOURCE_PREFIX, cycle_item
from .points import apply_retention
from .replication import (CycleResult, check_can_replicate, check_hooks, check_not_stuck,
                          check_one_writer, owner_of, record_point)
from .retry import recoverable

DEFAULT_HOST_TIMEOUT = 300.0  # seconds a host may be without a worker
POLL = 0.5  # seconds between looks at the cluster while tasks run
CONNECT_TIMEOUT = 30.0


def resource(host):
    return RESOURCE_PREFIX + host


class Fleet:
    """A connection to a Dask scheduler. ``events``: fn(dict) called with
    progress events (see :func:`replicate`). Use as a context manager, or
    call close()."""

    def __init__(self, scheduler, *, host_timeout=DEFAULT_HOST_TIMEOUT, events=None):
        try:
            from distributed import Client
        except ImportError:
            raise FleetError("--scheduler needs Dask distributed: pip install 'pydr[fleet]' "
                             "(or distributed)") from None
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

    def emit(self, **event):
        if self.events is not None:
            self.events(event)

    def replicate(self, vault, names, **options):
        return replicate(self, vault, names, **options)


def _task(vault, row, *, app_consistent, threads, resync_all):
    name = row["name"]
    has_point = bool(vault.points(name))
    disks = []
    for d in vault.disks(name):
        replica = vault.endpoint(name, d["replica"])
        step = vault.current_step(name, d["idx"]) + 1
        disks.append({"idx": d["idx"], "source": d["source"], "replica": d["replica"],
                      "step": step, "has_point": has_point, "resync": resync_all,
                      "offered": [replica.step_spec(name, d["idx"], step + i, vault.dir)
                                  for i in (0, 1)],
                      "cache": vault.cache_path(name, d["idx"])})
    return {"item": name, "vault": vault.dir, "rsh": row["rsh"],
            "remote_pydr": row["remote_pydr"], "threads": threads,
            "quiesce_hook": row["quiesce_hook"] if app_consistent else None,
            "thaw_hook": row["thaw_hook"] if app_consistent else None, "disks": disks}


def replicate(fleet, vault, names, *, app_consistent=False, progress=None, threads=None,
              resync_all=False):
    """One cycle of the items `names` on their hosts' workers. The items
    that succeed share one point id; each is recorded as its task returns.
    Returns CycleResult of those. If some failed, raises FleetError after
    the others are recorded (its .result is that CycleResult, its .failed
    {item: reason}).

    Events (``fleet.events``): {"event": "submitted", "items", "disks"},
    then per item {"event": "item", "item", "host", "status": "succeeded" |
    "failed", "error"?, "items_done", "items", "disks_done", "disks",
    "bytes", "bytes_per_second"}, and at the end {"event": "done", "items",
    "succeeded", "failed", "seconds", "coordinator_seconds" (the time not
    spent waiting for workers: checks, submitting, recording)}."""
    del progress  # the bytes of a host's transfer are not streamed back: events say what is done
    start = time.monotonic()
    rows = [vault.item(n) for n in names]
    check_can_replicate(vault, rows)
    homeless = [r["name"] for r in rows if not r["host"]]
    if homeless:
        raise InvalidState(f"{', '.join(homeless)} has no host: a fleet replicates items "
                           f"protected with --host NAME (run without --scheduler for the "
                           f"others)", path=vault.dir)
    tracked = [r["name"] for r in rows if any(d["tracking"] for d in vault.disks(r["name"]))]
    if tracked:
        raise InvalidState(f"{', '.join(tracked)} uses changed-block tracking, which a fleet "
                           f"does not run yet: replicate it without --scheduler", path=vault.dir)
    for r in rows:  # one writer, and each replica as its last cycle left it
        check_one_writer(vault, r["name"], resync_all)
    check_not_stuck(vault, names, resync_all)
    if app_consistent:
        check_hooks(vault, rows)
    rerun = f" --scheduler {fleet.scheduler}" + (" --resync" if resync_all else "")
    for r in rows:
        vault.begin(r["name"], "replicate", f"pydr replicate {r['name']}{rerun}")
    jobs = {r["name"]: vault.start_job("replicate", r["name"], state="queued") for r in rows}
    host_of = {r["name"]: r["host"] for r in rows}
    disk_count = {r["name"]: len(vault.disks(r["name"])) for r in rows}
    total_disks = sum(disk_count.values())
    consistency = "app-consistent" if app_consistent else "crash-consistent"
    futures = {}
    cycle = uuid.uuid4().hex[:12]
    for r in rows:
        for d in vault.disks(r["name"]):  # what changes the replica now is this cycle
            ownership.record_state(owner_of(vault, r["name"], d),
                                   vault.endpoint(r["name"], d["replica"]), writing=True)
        task = _task(vault, r, app_consistent=app_consistent, threads=threads,
                     resync_all=resync_all)
        f = fleet.client.submit(cycle_item, task, key=f"pydr-cycle-{r['name']}-{cycle}",
                                resources={resource(r["host"]): 1}, pure=False)
        futures[f] = r["name"]
        vault.update_job(jobs[r["name"]], state="running", started=time.time())
    fleet.emit(event="submitted", items=len(rows), disks=total_disks)
    point_id = None
    done, failed = [], {}
    moved = {"bytes": 0, "read": 0, "disks": 0}
    absent_since = {}  # host -> when it was first seen without a worker
    idle = 0.0  # seconds spent waiting for the workers: the rest is the coordinator's

    def finished(name, status, error=None):
        event = {"event": "item", "item": name, "host": host_of[name], "status": status,
                 "items_done": len(done) + len(failed), "items": len(rows),
                 "disks_done": moved["disks"], "disks": total_disks, "bytes": moved["bytes"],
                 "bytes_per_second": moved["bytes"] / max(time.monotonic() - start, 1e-9)}
        if error is not None:
            event["error"] = error
        fleet.emit(**event)

    def fail(name, exc):
        failed[name] = str(exc)
        vault.end_job(jobs[name], "failed", error=str(exc))
        vault.end(name, "replicate", health="warning" if recoverable(exc) else "critical",
                  last_error=str(exc))
        finished(name, "failed", str(exc))

    try:
        while futures:
            from distributed import wait

            waited = time.monotonic()
            try:
                with fleet.client.as_current():  # wait() asks for the current client
                    wait(list(futures), timeout=POLL, return_when="FIRST_COMPLETED")
            except TimeoutError:
                pass
            idle += time.monotonic() - waited
            for f in [f for f in futures if f.done()]:
                name = futures.pop(f)
                if f.status == "finished":
                    point_id = _record(vault, name, f.result(), jobs[name], consistency,
                                       point_id, moved)
                    done.append(name)
                    finished(name, "succeeded")
                else:
                    fail(name, _task_error(f, host_of[name]))
                f.release()
            if futures:
                _watch_hosts(fleet, futures, host_of, absent_since, fail)
    except BaseException as exc:
        for f, name in futures.items():  # not recorded: they count as not run
            f.cancel()
            vault.end_job(jobs[name], "cancelled" if isinstance(exc, KeyboardInterrupt)
                          else "failed", error=str(exc) or type(exc).__name__)
            vault.end(name, "replicate", health="warning", last_error=str(exc) or None)
        raise
    result = CycleResult(point_id, done, moved["bytes"], moved["read"],
                         time.monotonic() - start, consistency, list(jobs.values()))
    fleet.emit(event="done", items=len(rows), succeeded=len(done), failed=len(failed),
               seconds=result.seconds, coordinator_seconds=result.seconds - idle)
    if failed:
        first = next(iter(failed.items()))
        exc = FleetError(f"{len(failed)} of {len(rows)} items failed ({first[0]}: {first[1]}); "
                         f"'pydr status' says why; run the same command again to replicate "
                         f"them", path=vault.dir)
        exc.result, exc.failed = result, failed
        raise exc
    return result


def _record(vault, name, result, job, consistency, point_id, moved):
    """Record one task's result: its steps and point in one transaction,
    then retention, then its job. Returns the cycle's point id."""
    for d in vault.disks(name):  # binds the cache the task wrote to the replica it left
        ownership.record_state(owner_of(vault, name, d), vault.endpoint(name, d["replica"]),
                               writing=False, cache=vault.cache_path(name, d["idx"]))
    replica_check.adopted(vault, name)
    steps = [(name, d["idx"], [tuple(s) for s in d["steps"]]) for d in result["disks"]]
    item_bytes = sum(d["moved"] for d in result["disks"])
    point_id = record_point(vault, [name], consistency=consistency, cuts={name: result["cut"]},
                            bytes_by_item={name: item_bytes}, point_id=point_id, steps=steps)
    crashpoints.reached("fleet.recorded")
    apply_retention(vault, name)
    vault.update_job(job, host=result["host"])
    vault.end_job(job, "succeeded", bytes_transferred=item_bytes)
    moved["bytes"] += item_bytes
    moved["read"] += sum(d["read"] or d["size"] for d in result["disks"])
    moved["disks"] += len(result["disks"])
    return point_id


def _task_error(future, host):
    """The exception of a failed task, as pydr reports it."""
    exc = future.exception()
    if type(exc).__name__ == "KilledWorker":
        return FleetError(f"the workers of host {host} died while running this item's cycle "
                          f"(Dask gave up after repeated losses): look at their logs, then "
                          f"run the same command again")
    if future.status == "cancelled":
        return FleetError("its task was cancelled on the scheduler")
    return exc


def _watch_hosts(fleet, futures, host_of, absent_since, fail):
    """Fail the items of hosts that no worker has served for host_timeout."""
    served = fleet.hosts()
    now = time.monotonic()
    for host in {host_of[n] for n in futures.values()}:
        if served.get(host):
            absent_since.pop(host, None)
            continue
        since = absent_since.setdefault(host, now)
        if now - since < fleet.host_timeout:
            continue
        for f, name in [(f, n) for f, n in futures.items() if host_of[n] == host]:
            f.cancel()
            del futures[f]
            fail(name, NoWorkerForHost(f"no worker for host {host} within "
                                       f"{fleet.host_timeout:g} s (start one with 'pydr worker "
                                       f"--scheduler {fleet.scheduler} --host {host}')"))

"""The vault as a caller sees it: the DR workflow as methods of one object,
each answering a result of pydr.dr.results, so that a higher-level tool
needs only ``pydr.Vault``.

    with pydr.Vault("/srv/vault", writer=True) as v:
        v.protect("web", [("/img/web.img", "/dr/web.img")])
        cycle = v.replicate("web")
        print(v.status("web").rpo_seconds)
        drill = v.test_failover("web", "/tmp/drill", point="latest-processed")

A Vault holds one open store (pydr.dr.store.Store: the SQLite database and
its lock); the workflow modules get that store, never the Vault, so the
results here are a presentation only. The store's own methods (items,
disks, the tables) are reachable on the Vault too, for tools that need the
raw records (at run time; a type checker knows the Vault's own methods
only: typed callers reach the store as ``v.store``).

Long operations take ``events`` (a callable given each pydr.dr.events.Event)
and ``cancel`` (a threading.Event: set, the operation stops as a kill
would; run it again to finish it). An exception from ``events`` is logged
(logger "pydr.events") and never fails the operation. Arguments are checked
before any work: a bad one is pydr.errors.InvalidArgument.
"""

from __future__ import annotations

import math
import os
import threading
from datetime import datetime
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence, Tuple, Union, cast)

from ..errors import Cancelled, InvalidArgument, PlanFailed
from . import arguments
from . import drills as D
from . import failover as F
from . import plans as plans_
from . import pointstores
from . import points as points_
from . import protection
from . import replication as R
from . import report
from .events import Emitter, EventSink, check_cancel_event, check_events
from .retry import RetryPolicy
from .results import (CycleResult, ItemError, ItemStatus, JobInfo, OperationResult, PlanHook,
                      PlanReport, PlanStep, PointInfo)
from .schema import init_vault as init_vault  # pydr.dr.vault.init_vault, pydr.init_vault
from .store import Store
from .store_records import DiskRecord, ItemRecord, PlanRecord

Progress = Callable[[Any], None]
PointSelector = Union[int, str, None]


def _extra(events: Optional[EventSink], cancel: Optional[threading.Event]) -> Dict[str, Any]:
    """events/cancel as keyword arguments of a workflow function, only when
    given (the workflow functions take them from issue 21 on). InvalidArgument
    when `events` is not callable or `cancel` has no is_set(): refused at the
    door, before a job is started."""
    check_events(events)
    check_cancel_event(cancel)
    out: Dict[str, Any] = {}
    if events is not None:
        out["events"] = events
    if cancel is not None:
        out["cancel"] = cancel
    return out


def _point(point: Any, *, selector: bool = True) -> Any:
    """A point id or selector as the workflow takes it: an int id (its
    digits as a str become the int), or with `selector` None or one of
    points.SELECTORS. InvalidArgument for anything else, an id below 1 or
    one beyond what the vault can hold."""
    digits = isinstance(point, str) and point.isascii() and point.isdigit()
    if ((isinstance(point, int) and not isinstance(point, bool) and point > arguments.MAX_ID)
            or (digits and int(point) > arguments.MAX_ID)):
        raise InvalidArgument(f"no point id is that large: {point!r}")
    if not selector and (point is None or point in points_.SELECTORS):
        return point
    return points_.check_selector(point)


class Vault:
    """An open vault with the DR workflow.

    Open it as a context manager; ``writer=True`` takes the vault's lock
    (one changing process at a time; readers never wait) and finishes what
    a killed command left. Every method that changes the vault needs a
    writer. A Vault is used from the thread that opened it.

    Args:
        directory: the vault's directory (made by init_vault / ``pydr vault init``).
        writer: take the writer lock.
        lock_timeout: with ``writer``, seconds to wait for the lock when
            another process holds it (None or 0: fail at once). A reader
            takes no lock: giving it one is InvalidArgument.

    Raises:
        InvalidArgument: `directory` is not a path; `lock_timeout` is not a
            number of seconds >= 0, or is given without ``writer``.
        VaultError: not a vault, a vault of another schema, or (writer) the
            lock is held by another process.

    Every method raises VaultError once the Vault is closed, and WrongThread
    when called from a thread other than the one that opened it.
    """

    def __init__(self, directory: Union[str, os.PathLike[str]], *, writer: bool = False,
                 lock_timeout: Optional[float] = None) -> None:
        options: Dict[str, Any] = {} if lock_timeout is None else {"lock_timeout": lock_timeout}
        self.store: Store = Store(directory, writer=writer, **options)

    # -- the store -----------------------------------------------------------------
    @property
    def dir(self) -> str:
        """The vault's directory."""
        return self.store.dir

    @property
    def writer(self) -> bool:
        """Whether this Vault holds the writer lock."""
        return bool(self.store.writer)

    def close(self) -> None:
        """Close the database and release the lock (if held). Closing twice
        is no error; any other use after it is VaultError.

        Raises:
            WrongThread: called from a thread other than the one that opened
                the Vault: it stays open and keeps its lock.
        """
        self.store.close()

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    if not TYPE_CHECKING:
        # The store's other methods (the tables), for pydr's own tests and
        # tools that know the store. Hidden from type checkers: a typo
        # (v.replicat) is an error there, and the public surface is the
        # methods defined here.
        def __getattr__(self, name: str) -> Any:
            if name == "store" or name.startswith("__"):  # never during set-up or copy
                raise AttributeError(f"'Vault' object has no attribute {name!r}")
            try:
                return getattr(self.store, name)
            except AttributeError:
                raise AttributeError(f"'Vault' object has no attribute {name!r}") from None

    def disks(self, name: str) -> List[DiskRecord]:
        """The raw records of item `name`'s disks, by index: ``idx``,
        ``source``, ``replica`` (as protect() was given them), ``tracking``,
        ``bitmap``, ``generation``. For what a person reads, use status().

        Args:
            name: the item.

        Returns:
            A DiskRecord per disk (read-only).

        Raises:
            UnknownName: no item of that name is protected.
        """
        self.store.item(name)
        return list(self.store.disks(name))

    def plans(self) -> List[str]:
        """The names of the recovery plans, sorted (see plan(), run_plan()).

        Returns:
            The plan names; an empty list when there are none.
        """
        return [str(n) for n in self.store.plan_names()]

    def vault_id(self) -> str:
        """This vault's identity (a hex string), which its replicas record
        as their owner: another vault never writes over them."""
        return str(self.store.vault_id())

    def integrity_check(self) -> List[str]:
        """SQLite's check of the vault's database.

        Returns:
            [] when the database is sound, else SQLite's findings.
        """
        return list(self.store.integrity_check())

    def items(self, group: Optional[str] = None) -> List[str]:
        """The names of the protected items (of `group`, if given), sorted.

        Args:
            group: only the members of this group.

        Returns:
            The item names; an empty list when there are none.
        """
        return list(self.store.items(group=group))

    def item(self, name: str) -> ItemRecord:
        """The raw record of item `name` (its row of the items table: every
        column as an attribute, see docs/VAULT.md). For what a person or a
        tool reads, use status().

        Args:
            name: the item.

        Returns:
            Its ItemRecord (read-only).

        Raises:
            UnknownName: no item of that name is protected.
        """
        return cast(ItemRecord, self.store.item(name))

    # -- protection and status -------------------------------------------------------
    def protect(self, name: str, disks: Sequence[Tuple[str, str]], *,
                group: Optional[str] = None, retention: int = 24,
                retention_age: Optional[float] = None, quiesce_hook: Optional[str] = None,
                thaw_hook: Optional[str] = None, rsh: Optional[str] = None,
                remote_pydr: Optional[str] = None, cbt: bool = False,
                host: Optional[str] = None) -> ItemStatus:
        """Register item `name`, a machine whose disks are replicated. Its
        first replicate() is the initial (full, sparse-aware) copy.

        Args:
            name: the item's name (letters, digits, ".", "_", "-").
            disks: [(source, replica)]: each source (an image, a block
                device, a qcow2/vmdk image, nbd://..., qmp:SOCKET:NODE) and
                its replica (a path, [user@]host:PATH, or s3://BUCKET/PREFIX).
            group: replicate with the other items of this group, one cut
                and one point id for all.
            retention: recovery points kept (the newest `retention`).
            retention_age: also drop points older than this many seconds
                (the newest is always kept).
            quiesce_hook: a shell command run before the cut (then points
                are app-consistent with replicate(app_consistent=True)).
            thaw_hook: a shell command run after the cut.
            rsh: the remote shell for host:PATH replicas (default ssh).
            remote_pydr: the pydr command on the replicas' host.
            cbt: read only what a QEMU dirty bitmap says changed (qcow2
                images, qmp: sources).
            host: the sources are paths on that host, read there by a
                Dask worker of a fleet (pydr.dr.fleet).

        Returns:
            The new item's ItemStatus (state "protecting").

        Raises:
            InvalidState: the name is taken, a replica is another item's or
                the source itself, or another vault owns a replica.
            ValueError: a bad name or option.
            OSError: a source cannot be read.
        """
        protection.protect(self.store, name, disks, group=group, retention=retention,
                           retention_age=retention_age, quiesce_hook=quiesce_hook,
                           thaw_hook=thaw_hook, rsh=rsh, remote_pydr=remote_pydr, cbt=cbt,
                           host=host)
        return self.status(name)

    def status(self, name: str) -> ItemStatus:
        """What the vault knows of item `name`: state, direction, health,
        disks, points, RPO, errors, retries and the operation running on it.

        Args:
            name: the item.

        Returns:
            Its ItemStatus; ``rpo_seconds`` is measured now.

        Raises:
            UnknownName: no item of that name.
        """
        return report.item_status(self.store, name)

    def points(self, name: str) -> List[PointInfo]:
        """Item `name`'s recovery points, oldest first.

        Args:
            name: the item.

        Returns:
            A PointInfo for each point (damaged ones say why in ``damaged``).

        Raises:
            UnknownName: no item of that name.
        """
        self.store.item(name)
        return [PointInfo.from_record(p) for p in self.store.points(name)]

    def point(self, name: str, point_id: int) -> PointInfo:
        """Recovery point `point_id` of item `name`.

        Args:
            name: the item.
            point_id: the point's id.

        Returns:
            Its PointInfo.

        Raises:
            InvalidArgument: `point_id` is not an int >= 1.
            UnknownName: no such item, or the item has no such point.
        """
        wanted = arguments.count(point_id, "a point id", low=1)
        return PointInfo.from_record(self.store.point(name, wanted))

    def jobs(self, *, item: Optional[str] = None, state: Union[str, Iterable[str], None] = None,
             since: Union[datetime, float, None] = None,
             limit: Optional[int] = None) -> List[JobInfo]:
        """The jobs (what each command did to which item), newest first.

        Args:
            item: only this item's jobs.
            state: only jobs in this state ("queued", "running",
                "succeeded", "failed", "cancelled") or in one of these states.
            since: only jobs started at or after this time (a tz-aware
                datetime, or epoch seconds).
            limit: at most this many (the newest).

        Returns:
            A JobInfo per job.

        Raises:
            InvalidArgument: `item` is not a str, `state` names no job
                state, `since` is not a tz-aware datetime or epoch seconds,
                or `limit` is not an int >= 0.
        """
        if item is not None and not isinstance(item, str):
            raise InvalidArgument(f"item must be an item's name (a str), not {item!r}")
        states = arguments.job_states(state)
        since_epoch = arguments.epoch(since)
        limit = arguments.count(limit, "limit", low=0)
        return [JobInfo.from_record(j) for j in self.store.find_jobs(
            item=item, state=states, since=since_epoch, limit=limit)]

    def job(self, job_id: int) -> JobInfo:
        """Job `job_id`.

        Args:
            job_id: the job's id (JobInfo.id, CycleResult.jobs).

        Returns:
            Its JobInfo.

        Raises:
            InvalidArgument: `job_id` is not an int >= 1.
            UnknownName: there is no such job.
        """
        return JobInfo.from_record(self.store.job(arguments.count(job_id, "a job id", low=1)))

    # -- replication -----------------------------------------------------------------
    def replicate(self, names: Union[str, Iterable[str]], *, app_consistent: bool = False,
                  resync: bool = False, retry: bool = False, max_attempts: Optional[int] = None,
                  policy: Optional[RetryPolicy] = None, executor: Any = None, threads: Optional[int] = None,
                  bwlimit: Optional[int] = None, progress: Optional[Progress] = None,
                  events: Optional[EventSink] = None,
                  cancel: Optional[threading.Event] = None) -> CycleResult:
        """One replication cycle of the items `names`: a group's members
        together (all or nothing, one cut), every other item on its own;
        each item that succeeds gets a recovery point (one id shared by
        all of them).

        Args:
            names: an item name or several.
            app_consistent: run the items' quiesce hooks before the cut and
                their thaw hooks after it (app-consistent points).
            resync: compare both sides by checksum, re-reading the replicas
                (needed by items in state resync-required).
            retry: retry the items whose errors are recoverable, on the
                schedule of pydr.dr.retry (this call then sleeps).
            max_attempts: with `retry`, give up after this many attempts.
            policy: with `retry`, the schedule (a pydr.dr.retry.RetryPolicy;
                its clock and sleep can be replaced); overrides `max_attempts`.
            executor: where the captures run (default: this process; a
                pydr.dr.fleet.FleetExecutor: each item's host).
            threads: comparison threads per disk (default: the CPUs).
            bwlimit: bytes a second for uploads to an object store.
            progress: a callable given each engine ProgressRecord (a
                progress bar; tools use `events`).
            events: a callable given each Event of the cycle.
            cancel: set it to stop the cycle as a kill would.

        Returns:
            The CycleResult, with an ItemOutcome for every item.

        Raises:
            InvalidArgument: `names` is not a name or names (str), or is
                empty; `threads`, `bwlimit` or `max_attempts` is not a
                positive int; `events` is not callable; `cancel` has no
                is_set().
            CycleFailed: several units and some failed (``.result`` is the
                CycleResult; the others got their points).
            UnknownName: an item is not protected.
            InvalidState: an item cannot replicate now (its state, a drill,
                resync-required without `resync`).
            PydrError, OSError: the error of a call of one unit.
        """
        names = arguments.item_names(names)
        for what, count in (("threads", threads), ("bwlimit", bwlimit),
                            ("max_attempts", max_attempts)):
            arguments.count(count, what, low=1)
        kwargs: Dict[str, Any] = dict(executor=executor, app_consistent=app_consistent,
                                      resync_all=resync, **_extra(events, cancel))
        for key, value in (("threads", threads), ("bwlimit", bwlimit), ("progress", progress)):
            if value is not None:
                kwargs[key] = value
        if retry:
            if policy is None and max_attempts is not None:
                policy = RetryPolicy(max_attempts=max_attempts)
            if policy is not None:
                kwargs["policy"] = policy
            return cast(CycleResult, R.replicate_with_retry(self.store, names, **kwargs))
        return cast(CycleResult, R.replicate(self.store, names, **kwargs))

    def apply_retention(self, name: str, now: Optional[float] = None) -> None:
        """Drop the points of item `name` beyond its retention (count and
        age) and what only they needed; a drill's or failover's point stays.
        Every cycle does this already.

        Args:
            name: the item.
            now: epoch seconds the ages are measured at (default: the clock).

        Raises:
            InvalidArgument: `now` is not a finite number of seconds.
            UnknownName: no item of that name.
        """
        if now is not None and (isinstance(now, bool) or not isinstance(now, (int, float))
                                or not math.isfinite(now)):
            raise InvalidArgument(f"now must be epoch seconds (a finite number), not {now!r}")
        points_.apply_retention(self.store, name, now)

    def materialize(self, name: str, point: PointSelector, directory: str, *,
                    method: str = "auto",
                    threads: Optional[int] = None, progress: Optional[Progress] = None,
                    events: Optional[EventSink] = None,
                    cancel: Optional[threading.Event] = None) -> OperationResult:
        """Write each disk of item `name` as it was at recovery point `point`
        into `directory`, named like its replica. The replicas are not
        touched.

        Args:
            name: the item.
            point: the point's id (its digits as a str: the same), or
                "latest-processed" (None: the same) or
                "latest-app-consistent" (the newest such sound point).
            directory: a directory (made if missing), or host:DIR on the
                host that holds the replicas.
            method: "auto" (a reflink clone where the file system can, else
                a copy), "reflink", "copy" or "qcow2" (an overlay on the
                replica, which must then stay as it is).
            threads: copy threads.
            progress: a callable given each engine ProgressRecord.
            events: a callable given each Event.
            cancel: set it to stop as a kill would.

        Returns:
            An OperationResult ("materialize": point, paths, method).

        Raises:
            InvalidArgument: a bad point, method, threads, events or cancel.
            UnknownName: no such item or point.
            DamagedPoint, DamagedJournal: the point cannot be restored.
            InvalidState: a destination is a replica or a protected disk.
        """
        arguments.method(method, "materialize")
        arguments.count(threads, "threads", low=1)
        extra = _extra(events, cancel)
        wanted = _point(point)
        point_id: int = (wanted if isinstance(wanted, int)
                         else points_.select_point(self.store, name, wanted))
        methods: List[str] = []
        paths = points_.materialize(self.store, name, point_id, directory, threads=threads,
                                    method=method, progress=progress, methods=methods,
                                    **extra)
        return OperationResult(item=name, operation="materialize", point=point_id,
                               paths=tuple(str(p) for p in paths),
                               method="+".join(sorted(set(methods))) or None,
                               direction=self.store.item(name).direction)

    # -- drills and failover ---------------------------------------------------------
    def _result(self, operation: str, answer: Mapping[str, Any]) -> OperationResult:
        return OperationResult.from_workflow(
            operation, answer, direction=self.store.item(answer["item"]).direction)

    def test_failover(self, name: str, directory: str, point: PointSelector = None, *,
                      method: str = "auto", progress: Optional[Progress] = None,
                      events: Optional[EventSink] = None,
                      cancel: Optional[threading.Event] = None) -> OperationResult:
        """A DR drill: write item `name`'s disks as they were at a recovery
        point into `directory`, without touching the replicas or stopping
        replication. Undo it with cleanup_test_failover(). An interrupted
        drill is finished by the same call; a finished one is left as it is
        (``already_done``).

        Args:
            name: the item.
            directory: where the disks go (made if missing; host:DIR for
                replicas on another host). A drill never overwrites a file.
            point: a point id, or "latest-processed" (None: the same), or
                "latest-app-consistent".
            method: "auto" (reflink clones where the file system can, else
                copies), "reflink", "copy" or "qcow2" (overlays backed by
                the replicas; the item is not replicated until clean-up).
            progress: a callable given each engine ProgressRecord.
            events: a callable given each Event.
            cancel: set it to stop as a kill would.

        Returns:
            An OperationResult ("test-failover": point, paths, method, notes).

        Raises:
            InvalidArgument: a bad point, method, events or cancel.
            InvalidState: another drill is in place, or the item's state
                does not allow one.
            UnknownName: no such item or point.
            DamagedPoint, DamagedJournal: the point cannot be restored.
        """
        arguments.method(method, "test_failover")
        extra = _extra(events, cancel)
        return self._result("test-failover", D.test_failover(
            self.store, name, directory, _point(point), method=method, progress=progress,
            **extra))

    def cleanup_test_failover(self, name: str, *, events: Optional[EventSink] = None,
                              cancel: Optional[threading.Event] = None) -> OperationResult:
        """Remove the disks test_failover() wrote for item `name` (and its
        directory if that leaves it empty); files it did not write stay.

        Args:
            name: the item.
            events: a callable given each Event.
            cancel: set it to stop as a kill would.

        Returns:
            An OperationResult ("cleanup-test-failover": removed; already_done
            when there was no drill).

        Raises:
            UnknownName: no item of that name.
        """
        return self._result("cleanup-test-failover",
                            D.cleanup_test_failover(self.store, name, **_extra(events, cancel)))

    def failover(self, name: str, point: PointSelector = "latest", *, planned: bool = False,
                 shutdown_hook: Optional[str] = None, method: str = "auto",
                 directory: Optional[str] = None, executor: Any = None,
                 progress: Optional[Progress] = None, events: Optional[EventSink] = None,
                 cancel: Optional[threading.Event] = None) -> OperationResult:
        """Fail item `name` over: its replica paths (or `directory`, for an
        item replicated to an object store) hold a recovery point, each
        replica kept aside as the baseline. Until commit(), change_point()
        switches to another point. Running it again after an interruption
        finishes it; after it finished, it changes nothing (``already_done``).

        Args:
            name: the item.
            point: "latest" (replicate what the source still has first; if
                that fails, the newest point), "latest-processed" (the newest
                existing point), "latest-app-consistent", or a point id.
            planned: run `shutdown_hook` (which must then succeed) and a
                final cycle first: nothing is lost.
            shutdown_hook: a shell command that stops the machine.
            method: "auto", "reflink", "copy" or "qcow2" (an overlay on the
                baseline).
            directory: for an item replicated to an object store: the local
                directory its disks are made in.
            executor: where a planned failover's last cycle runs (a fleet's).
            progress: a callable given each engine ProgressRecord.
            events: a callable given each Event.
            cancel: set it to stop as a kill would.

        Returns:
            An OperationResult ("failover": point, method, notes).

        Raises:
            InvalidArgument: a bad point, method, events or cancel.
            InvalidState: the item's state does not allow a failover (or it
                is failed over to another point: use change_point()).
            HookFailed: a planned failover's shutdown hook failed.
            DamagedPoint, DamagedJournal: the point cannot be brought up.
        """
        arguments.method(method, "failover")
        extra = _extra(events, cancel)
        point = _point(point, selector=False)
        return self._result("failover", F.failover(
            self.store, name, point, planned=planned, shutdown_hook=shutdown_hook, method=method,
            progress=progress, to=directory, executor=executor, **extra))

    def change_point(self, name: str, point: PointSelector, *, method: Optional[str] = None,
                     progress: Optional[Progress] = None, events: Optional[EventSink] = None,
                     cancel: Optional[threading.Event] = None) -> OperationResult:
        """After failover() and before commit(): make item `name`'s disks
        hold another point, rebuilt from the untouched baselines (exact even
        after the failed-over machine wrote to its disks).

        Args:
            name: the item.
            point: a point id or a selector (see failover()).
            method: how to make the disks (default: as the failover did).
            progress: a callable given each engine ProgressRecord.
            events: a callable given each Event.
            cancel: set it to stop as a kill would.

        Returns:
            An OperationResult ("change-point": point, method, notes).

        Raises:
            InvalidArgument: a bad point, method, events or cancel.
            InvalidState: the item is not failed over.
            UnknownName: no such item or point.
            DamagedPoint, DamagedJournal: the point cannot be brought up.
        """
        arguments.method(method, "change_point", default_ok=True)
        extra = _extra(events, cancel)
        return self._result("change-point", F.change_point(
            self.store, name, _point(point, selector=False), method=method, progress=progress,
            **extra))

    def commit(self, name: str, *, events: Optional[EventSink] = None,
               cancel: Optional[threading.Event] = None) -> OperationResult:
        """Make item `name`'s failover final: the replica site is active (the
        direction flips), the recovery points, their steps and the baselines
        are removed. A qcow2 overlay is flattened into its baseline.

        Args:
            name: the item.
            events: a callable given each Event.
            cancel: set it to stop as a kill would.

        Returns:
            An OperationResult ("commit": direction, notes).

        Raises:
            InvalidState: the item is not failed over.
        """
        return self._result("commit", F.commit(self.store, name, **_extra(events, cancel)))

    def reprotect(self, name: str, *, progress: Optional[Progress] = None,
                  events: Optional[EventSink] = None,
                  cancel: Optional[threading.Event] = None) -> OperationResult:
        """After commit(): replicate item `name` the other way. Each disk's
        source and replica swap; the old sources are reused, so the first
        cycle (a checksum resync) moves only the blocks that differ.

        Args:
            name: the item.
            progress: a callable given each engine ProgressRecord.
            events: a callable given each Event.
            cancel: set it to stop as a kill would.

        Returns:
            An OperationResult ("reprotect": direction, point, and the
            ``cycle`` it ran; already_done with no cycle when it was done).

        Raises:
            InvalidState: the failover is not committed.
            PydrError, OSError: the cycle's error.
        """
        return self._result("reprotect", F.reprotect(self.store, name, progress=progress,
                                                     **_extra(events, cancel)))

    def failback(self, name: str, *, alternates: Optional[Mapping[str, str]] = None,
                 shutdown_hook: Optional[str] = None, events: Optional[EventSink] = None,
                 cancel: Optional[threading.Event] = None) -> OperationResult:
        """A planned failover of a reprotected item `name` back to its first
        site: `shutdown_hook` (must succeed), a final cycle, nothing lost.
        Then commit() and reprotect() give back the first direction.

        Args:
            name: the item.
            alternates: {replica: new path}: those disks come up at the new
                paths instead (the old ones are left as they are).
            shutdown_hook: a shell command that stops the machine.
            events: a callable given each Event.
            cancel: set it to stop as a kill would.

        Returns:
            An OperationResult ("failback": point, method, notes).

        Raises:
            InvalidState: the item is not reprotected, or an alternate exists.
            UnknownName: an alternate names no replica of the item.
            HookFailed: the shutdown hook failed.
        """
        return self._result("failback", F.failback(
            self.store, name, alternates=dict(alternates) if alternates else None,
            shutdown_hook=shutdown_hook, **_extra(events, cancel)))

    # -- checks and garbage ------------------------------------------------------------
    def verify(self, name: str, point: Optional[int] = None, sample: float = 100.0, *,
               events: Optional[EventSink] = None,
               cancel: Optional[threading.Event] = None) -> Any:
        """Check an item's points where they are (the "verify" capability of
        its point store: the undo steps, signature caches and replicas of a
        step chain; the indexes and chunks of a chunk index).

        Args:
            name: the item.
            point: only what this point needs (default: every point).
            sample: the percentage of steps or chunks read (above 0, at
                most 100).
            events: given "started", each replica's "progress" in phase
                "verify", then "finished", "failed" or "cancelled".
            cancel: asked between steps, windows and chunks (Cancelled).

        Returns:
            The point store's report (a dict; "problems" lists what was found).

        Raises:
            InvalidArgument: `point` is not a point id, `sample` is not a
                percentage above 0 and at most 100, a bad events or cancel.
            UnknownName: no such item or point.
            Cancelled: ``cancel`` was set.
        """
        _extra(events, cancel)
        if point is not None:
            _point(point)
            point = arguments.count(points_.check_selector(point), "point", low=1)
        if (isinstance(sample, bool) or not isinstance(sample, (int, float))
                or not 0 < sample <= 100):
            raise InvalidArgument(f"sample must be a percentage above 0 and at most 100, "
                                  f"not {sample!r}")
        em = Emitter(events, "verify", name)
        check = pointstores.point_store(self.store, name).require("verify")
        report: Any = em.run(lambda: check(point, sample, events=em, cancel=cancel),
                             done=lambda r: f"{len(r['problems'])} problems")
        return report

    def collect_garbage(self, target: str, *, grace: Optional[float] = None,
                        dry_run: bool = False, now: Optional[float] = None) -> Any:
        """Mark and sweep what no point names: in the point store of item
        `target`, or in the store a spec names (s3://BUCKET/PREFIX).

        Args:
            target: an item, or an object store's spec.
            grace: keep unnamed chunks younger than this many seconds
                (default: the kind's).
            dry_run: count, remove nothing.
            now: epoch seconds the ages are measured at (default: the clock).

        Returns:
            The kind's report (a dict).

        Raises:
            UnsupportedFile: the item's kind keeps no garbage.
        """
        options: Dict[str, Any] = {"dry_run": dry_run}
        if grace is not None:
            options["grace"] = grace
        if now is not None:
            options["now"] = now
        return pointstores.collect_garbage(self.store, target, **options)

    # -- recovery plans --------------------------------------------------------------
    def create_plan(self, name: str, groups: Sequence[Any]) -> List[Dict[str, Any]]:
        """Define recovery plan `name`: groups of items run in order, the
        items of a group in parallel.

        Args:
            name: the plan's name.
            groups: each group a list of item names, or a dict {"items":
                [item, ...], "pre": CMD or None, "post": CMD or None} (shell
                commands run before and after the group).

        Returns:
            The plan's definition as stored (a list of such dicts).

        Raises:
            InvalidState: a plan of that name exists.
            UnknownName: an item is not protected.
            ValueError: a bad name, an empty group, an item in two groups.
        """
        return cast(List[Dict[str, Any]], plans_.create_plan(self.store, name, groups))

    def plan(self, name: str) -> PlanRecord:
        """Recovery plan `name` as stored (name, definition, created).

        Raises:
            UnknownName: there is no such plan.
        """
        return cast(PlanRecord, self.store.plan(name))

    def run_plan(self, name: str, operation: str, *, point: PointSelector = None,
                 directory: Optional[str] = None, planned: bool = False,
                 shutdown_hook: Optional[str] = None, fleet: Any = None,
                 events: Optional[EventSink] = None,
                 cancel: Optional[threading.Event] = None) -> PlanReport:
        """Run `operation` over recovery plan `name`: its groups in order,
        the items of a group in parallel, each group's pre and post hooks
        around it. The first failure stops the plan.

        Args:
            name: the plan.
            operation: "failover", "test-failover", "cleanup-test-failover",
                "commit", "reprotect" or "failback".
            point: failover / test-failover: the point (see failover()).
            directory: test-failover: each item's disks go to DIRECTORY/ITEM.
            planned: failover: planned (see failover()).
            shutdown_hook: failover / failback: the machines' shutdown hook.
            fleet: a pydr.dr.fleet.Fleet: items' replication runs on their
                hosts' workers.
            events: a callable given each Event.
            cancel: set it to stop as a kill would.

        Returns:
            The PlanReport (ok), with each item's OperationResult.

        Raises:
            PlanFailed: a hook or an item failed; ``.result`` is the
                PlanReport (not ok) saying what ran and what did not.
            UnknownName: there is no such plan.
            InvalidArgument: an unknown operation, an option it does not
                take, test-failover without `directory`, a bad point.
        """
        # plans.check_operation refuses a bad operation or option (InvalidArgument)
        options: Dict[str, Any] = {"point": point, "planned": planned,
                                   "shutdown_hook": shutdown_hook, "directory": directory,
                                   **_extra(events, cancel)}
        if fleet is not None:
            options["fleet"] = fleet
        groups = self.store.plan(name).definition
        try:
            entries = plans_.run_plan(self.store, name, operation, **options)
        except (PlanFailed, Cancelled) as exc:  # the report of what ran, as a PlanReport
            ran = getattr(exc, "report", None)
            if ran is not None:
                setattr(exc, "result", self._plan_report(name, operation, groups, ran, str(exc)))
            raise
        return self._plan_report(name, operation, groups, entries, None)

    def _plan_report(self, name: str, operation: str, groups: Sequence[Mapping[str, Any]],
                     entries: Sequence[Mapping[str, Any]], error: Optional[str]) -> PlanReport:
        """The PlanReport of run_plan's entries (pydr.dr.plans)."""
        steps = []
        for number, group in enumerate(groups, 1):
            mine = [e for e in entries if e["group"] == number]
            outcomes: Dict[str, Union[OperationResult, ItemError]] = {}
            for e in mine:
                if "item" not in e or e["status"] == "not run":
                    continue
                if e["status"] == "succeeded":
                    outcomes[e["item"]] = self._result(operation, e["result"])
                else:
                    exc = e.get("exception")
                    outcomes[e["item"]] = (ItemError.from_exception(e["item"], exc)
                                           if exc is not None else
                                           ItemError(item=e["item"], error=str(e.get("error")),
                                                     exit_code=1))
            steps.append(PlanStep(
                group=number, items=tuple(group["items"]), outcomes=outcomes,
                not_run=tuple(i for i in group["items"] if i not in outcomes),
                hooks=tuple(PlanHook(hook=e["hook"], ok=e["status"] == "ok",
                                     exit_code=e["exit"]) for e in mine if "hook" in e)))
        return PlanReport(plan=name, operation=operation, ok=error is None, steps=tuple(steps),
                          error=error)

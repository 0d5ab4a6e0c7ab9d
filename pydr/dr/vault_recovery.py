"""The recovery half of pydr.Vault: drills, failover, change-point, commit,
reprotect, failback and recovery plans, each answering an OperationResult or
a PlanReport (pydr.dr.results). pydr.dr.vault.Vault inherits these methods;
this module holds them so that neither module grows past what one reader
keeps in mind. Also the argument helpers both halves share.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union, cast

from ..errors import Cancelled, InvalidArgument, PlanFailed, VerificationFailed
from . import arguments
from . import drills as D
from . import failover as F
from . import plans as plans_
from . import points as points_
from .events import EventSink, check_cancel_event, check_events
from .results import ItemError, OperationResult, PlanHook, PlanReport, PlanStep
from .store import Store
from .store_records import PlanRecord

Progress = Callable[[Any], None]
PointSelector = Union[int, str, None]


def forwarded(events: Optional[EventSink], cancel: Optional[threading.Event]) -> Dict[str, Any]:
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


def checked_point(point: Any, *, selector: bool = True) -> Any:
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


class RecoveryOperations:
    """The Vault's methods that bring points up and move the protection's
    direction, and its recovery plans (see pydr.Vault)."""

    store: Store  # the open store (set by Vault.__init__)

    # -- drills and failover ---------------------------------------------------------
    def _result(self, operation: str, answer: Mapping[str, Any]) -> OperationResult:
        return OperationResult.from_workflow(
            operation, answer, direction=self.store.item(answer["item"]).direction)

    def _verified(self, operation: str, run: Callable[[], Mapping[str, Any]]) -> OperationResult:
        """self._result(operation, run()); a VerificationFailed gains
        ``.result``: the command's OperationResult with its verification."""
        try:
            answer = run()
        except VerificationFailed as exc:
            if getattr(exc, "answer", None) is not None:
                exc.result = self._result(operation, exc.answer)  # type: ignore[attr-defined]
            raise
        return self._result(operation, answer)

    def test_failover(self, name: str, directory: str, point: PointSelector = None, *,
                      method: str = "auto", progress: Optional[Progress] = None,
                      events: Optional[EventSink] = None,
                      cancel: Optional[threading.Event] = None,
                      machine: Optional[Mapping[str, Any]] = None) -> OperationResult:
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
            machine: for an item that is a machine: {"connect": URI,
                "drill_network": NET or "none", "verify":
                pydr.dr.probes.Probes} (pydr.dr.bringup.check_options); its
                drill domain pydr-drill-ITEM is defined and started.

        Returns:
            An OperationResult ("test-failover": point, paths, method, notes,
            and for a machine ``machine`` and ``verification``).

        Raises:
            InvalidArgument: a bad point, method, events or cancel.
            InvalidState: another drill is in place, or the item's state
                does not allow one.
            UnknownName: no such item or point.
            DamagedPoint, DamagedJournal: the point cannot be restored.
            MachineError: libvirt or the bring-up hook failed (exit 22).
            VerificationFailed: a probe failed (exit 23); the drill stays.
                Its ``.result`` is this call's OperationResult, with the
                failed verification.
        """
        arguments.method(method, "test_failover")
        extra = forwarded(events, cancel)
        return self._verified("test-failover", lambda: D.test_failover(
            self.store, name, directory, checked_point(point), method=method, progress=progress,
            machine=dict(machine) if machine else None, **extra))

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
                            D.cleanup_test_failover(self.store, name, **forwarded(events, cancel)))

    def failover(self, name: str, point: PointSelector = "latest", *, planned: bool = False,
                 shutdown_hook: Optional[str] = None, method: str = "auto",
                 directory: Optional[str] = None, executor: Any = None,
                 progress: Optional[Progress] = None, events: Optional[EventSink] = None,
                 cancel: Optional[threading.Event] = None,
                 machine: Optional[Mapping[str, Any]] = None) -> OperationResult:
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
            machine: for an item that is a machine: {"connect": URI,
                "network_map": {SRC: DST}, "name": NAME, "verify":
                pydr.dr.probes.Probes} (pydr.dr.bringup.check_options); its
                domain is defined and started at the recovery connection.

        Returns:
            An OperationResult ("failover": point, method, notes, and for a
            machine ``machine`` and ``verification``).

        Raises:
            InvalidArgument: a bad point, method, events or cancel.
            InvalidState: the item's state does not allow a failover (or it
                is failed over to another point: use change_point()).
            HookFailed: a planned failover's shutdown hook failed.
            DamagedPoint, DamagedJournal: the point cannot be brought up.
            MachineError: libvirt or the bring-up hook failed (exit 22).
            VerificationFailed: a probe failed (exit 23); its ``.result``
                is this call's OperationResult, with the failed verification.
        """
        arguments.method(method, "failover")
        extra = forwarded(events, cancel)
        point = checked_point(point, selector=False)
        return self._verified("failover", lambda: F.failover(
            self.store, name, point, planned=planned, shutdown_hook=shutdown_hook, method=method,
            progress=progress, to=directory, executor=executor,
            machine=dict(machine) if machine else None, **extra))

    def change_point(self, name: str, point: PointSelector, *, method: Optional[str] = None,
                     progress: Optional[Progress] = None, events: Optional[EventSink] = None,
                     cancel: Optional[threading.Event] = None) -> OperationResult:
        """After failover() and before commit(): make item `name`'s disks
        hold another point, rebuilt from the untouched baselines (exact even
        after the failed-over machine wrote to its disks). A machine's
        failover domain is stopped first and started again on the new disks.

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
        extra = forwarded(events, cancel)
        return self._result("change-point", F.change_point(
            self.store, name, checked_point(point, selector=False), method=method,
            progress=progress, **extra))

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
        return self._result("commit", F.commit(self.store, name, **forwarded(events, cancel)))

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
                                                     **forwarded(events, cancel)))

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
            shutdown_hook=shutdown_hook, **forwarded(events, cancel)))

    def attach_machine(self, name: str, xml: Optional[str] = None, *, uri: Optional[str] = None,
                       recovery_uri: Optional[str] = None,
                       bring_up_hook: Optional[str] = None) -> None:
        """Make the protected item `name` a machine that failover and drills
        bring up: either the libvirt domain of `xml` (its disks, in order,
        are the item's; the XML is kept with every point it has: for disks
        protected while the domain was shut off), or, with `bring_up_hook`,
        a machine that shell command brings up (JSON on its stdin; see
        pydr.dr.bringup).

        Args:
            name: the protected item.
            xml: the domain's XML (libvirt's inactive XML).
            uri: the libvirt connection of the protected domain.
            recovery_uri: where bring-up defines it (None: `uri`).
            bring_up_hook: the command of a hook machine (then no `xml`).

        Raises:
            InvalidArgument: both or neither of `xml` and `bring_up_hook`;
                the XML's disks do not match the item's.
            FormatError: hostile or malformed XML.
            UnknownName: no such item.
        """
        from . import bringup

        self.store.item(name)
        if (xml is None) == (bring_up_hook is None):
            raise InvalidArgument("attach_machine needs a domain's XML or a bring-up hook "
                                  "(one of them)", item=name)
        if xml is None:
            if not str(bring_up_hook).strip():
                raise InvalidArgument("--bring-up-hook must not be empty", item=name)
            self.store.put_machine(name, kind="hook", bring_up_hook=bring_up_hook)
            return
        bringup.attach_domain(self.store, name, xml, uri=uri, recovery_uri=recovery_uri)

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
                 cancel: Optional[threading.Event] = None,
                 verify: Optional[Mapping[str, Any]] = None) -> PlanReport:
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
            verify: test-failover: verify each machine of a group before
                the next group starts: {} (defaults) or {"console", "tcp",
                "script", "timeout"} (see pydr.dr.probes); None: no.

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
                                   **forwarded(events, cancel)}
        if verify is not None:
            options["verify"] = True
            options.update({f"verify_{k}": v for k, v in verify.items()})
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

"""pydr run: a long-running service that keeps every item inside its
target RPO (docs/SERVICE.md).

Each **round** opens the vault as a writer -- after any operator command
that waits for it (pydr.dr.store_lock.take_after_waiters) -- asks the
schedule (pydr.dr.schedule) what is due, replicates it (at most ``jobs``
units at once: pydr.dr.parallel_executor, or a Dask fleet with
``scheduler``), records each failure's next retry, checks the items' RPO
health (pydr.dr.health), updates the metrics and closes the vault, so
that operator commands get in between rounds. Then it waits until the
next item is due, or until stop() or reload() wakes it.

One service per vault: ``run.lock`` in the vault's directory is flock()ed
for the service's life. An item's failure is its own: a cycle that raises
a pydr bug is logged with its traceback, the item marked, and the service
goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from ..engine.oserrors import naming
from ..errors import (EXIT_SOME_FAILED, EXIT_VAULT, Cancelled, CycleFailed, InvalidArgument,
                      VaultError, exit_code_for)
from . import schedule, sdnotify, store_lock
from .cycle import replicate
from .events import Emitter, EventSink, interrupted
from .parallel_executor import ParallelExecutor
from .retry import attempt_offset, recoverable
from .service_parts import Parts, round_passphrase

_log = logging.getLogger("pydr.service")

RUN_LOCK = store_lock.RUN_LOCK
#: the longest wait between rounds: policies and items added without a
#: SIGHUP are seen within it
MAX_IDLE = 60.0
#: why a due item was not begun: the service was told to stop (--once exits 130)
STOPPING = "the service is stopping"
#: the shortest wait before a failed item's cycle is tried again: the retry
#: schedule (pydr.dr.retry), capped at half the item's target RPO, never below this
MIN_RETRY = 5.0


@dataclass
class RoundResult:
    """What one round of :class:`Service` did.

    Attributes:
        due: the items that were due, in the order they were started.
        succeeded: the items that got a new point.
        failed: {item: error} of the items whose cycle failed.
        skipped: {item: why} of the items not replicated: "paused: STATE",
            "no target RPO", "not due until T", "retry at T (attempt N)".
        transitions: the RPO health changes recorded (each a dict: item,
            old, new, rpo_seconds, target_rpo, at (ISO 8601 UTC), message).
        seconds: how long the round took.
        exit_codes: {item: the exit code of its error alone} of the failed items.
    """

    due: List[str] = field(default_factory=list)
    succeeded: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    transitions: List[Dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    exit_codes: Dict[str, int] = field(default_factory=dict)

    def exit_code(self) -> int:
        """The round's outcome as ``pydr run --once`` exits: 0 when every
        due cycle succeeded (or none was due), the failed item's exit code
        for one, CycleFailed's (21) for several; Cancelled's (130) when a
        stop left due items not begun (their work was not done)."""
        if STOPPING in self.skipped.values():
            return Cancelled.exit_code
        if not self.failed:
            return 0
        if len(self.failed) == 1:
            return next(iter(self.exit_codes.values()), EXIT_SOME_FAILED)
        return EXIT_SOME_FAILED

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: {"type": "round", "version": 1, every field}."""
        return {"type": "round", "version": 1, "due": list(self.due),
                "succeeded": list(self.succeeded), "failed": dict(self.failed),
                "skipped": dict(self.skipped), "transitions": list(self.transitions),
                "seconds": self.seconds, "exit_codes": dict(self.exit_codes)}


class Service:
    """pydr run over the vault in `directory` (see pydr.dr.service).

    Args:
        directory: the vault's directory.
        jobs: units (items, or a group's members) replicated at once (>= 1).
        scheduler: a Dask scheduler's address: the cycles run on the
            items' hosts (pydr.dr.fleet); None: in this process.
        metrics: "HOST:PORT" to serve Prometheus metrics on (port 0: any;
            :attr:`metrics_port` tells), None: none.
        events: an EventSink given every Event: the cycles' own, a
            "started" and "finished" per round (operation "run", item
            None) and a "health" per RPO health change.
        clock: the time (epoch seconds) the schedule uses (tests pass a
            fake one; the waits between rounds are real).
        warm: keep per-item state between cycles (pydr.dr.warm).
        notify: called with each sd_notify state ("READY=1", ...);
            default pydr.dr.sdnotify.notify.
        passphrase: of the encrypted object stores the cycles write
            (Vault's `passphrase`); None: the environment's, read each round.
        passphrase_file: a file holding it, read each round (wins).

    Raises:
        InvalidArgument: `jobs` is not an int >= 1, `metrics` not HOST:PORT.
    """

    metrics_port: Optional[int]

    def __init__(self, directory: Union[str, "os.PathLike[str]"], *, jobs: int = 2, scheduler: Optional[str] = None,
                 metrics: Optional[str] = None, events: Optional[EventSink] = None,
                 clock: Callable[[], float] = time.time, warm: bool = True,
                 notify: Optional[Callable[[str], Any]] = None,
                 passphrase: Optional[Union[str, bytes]] = None,
                 passphrase_file: Optional[Union[str, "os.PathLike[str]"]] = None) -> None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise InvalidArgument(f"jobs must be an int >= 1, not {jobs!r}")
        self.directory = os.fspath(directory)
        self.jobs = jobs
        self.scheduler = scheduler
        self.metrics_address = _host_port(metrics) if metrics is not None else None
        self.events = events
        self.clock = clock
        self.warm = warm
        self.notify = notify if notify is not None else sdnotify.notify
        self._passphrase, self._passphrase_file = passphrase, passphrase_file
        self.metrics_port = None
        self._stopping = threading.Event()  # finish the running cycles, then end
        self._cancel = threading.Event()  # stop the running cycles as a kill would
        self._wake = threading.Event()
        self._last_durations: Dict[str, float] = {}
        self._targets: Dict[str, Optional[float]] = {}  # each item's target RPO, as last read
        self._warned_idle = False  # "nothing is scheduled" said once
        self._next_due: Optional[float] = None
        self._parts = Parts(events)
        self._warm_state: Any = None
        self._fleet: Any = None
        self._monotonic = time.monotonic  # (a test gives another)
        self._progress_guard = threading.Lock()
        self._progress = 0.0  # when the running cycles last gave an event (self._monotonic)
        self._cycling = False  # whether cycles run now

    # -- control (any thread, or a signal handler) ------------------------------------
    def stop(self, finish: bool = True) -> None:
        """End the service: with `finish`, after the running cycles end
        (none starts after); without, the running cycles are cancelled too
        (they end as a kill leaves them: the next run finishes them).
        Thread-safe and safe in a signal handler."""
        self._stopping.set()
        if not finish:
            self._cancel.set()
        self._wake.set()

    def reload(self) -> None:
        """Re-read the policies now: the wait for the next round ends (each
        round reads them from the vault). Safe in a signal handler."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        """Whether stop() was called."""
        return self._stopping.is_set()

    # -- running ----------------------------------------------------------------------
    def run(self) -> None:
        """Run rounds until stop(): READY=1 after the first, STATUS and
        WATCHDOG=1 after each, STOPPING=1 at the end. Under a systemd
        watchdog ($WATCHDOG_USEC) a thread also sends WATCHDOG=1 every
        half of it while the service makes progress: during long cycles
        too (a first full copy may take hours) as long as their events
        come, but not for a cycle that hangs (no event for the whole
        watchdog time: systemd restarts the service).

        A round that fails after the first (the vault cannot be opened or
        read for a while: a storage hiccup, a restore of the vault) is logged
        and tried again after 5, 10, 20, 40, then 60 s: the service stays up.

        Raises:
            VaultError: another pydr run serves the vault (its pid named),
                or `directory` is not a vault (at the first round).
            OSError: the metrics port cannot be bound.
        """
        with self._running():
            ended = threading.Event()
            interval = sdnotify.watchdog_interval()
            if interval is not None:
                threading.Thread(target=self._keep_alive, args=(interval, ended),
                                 name="pydr-watchdog", daemon=True).start()
            ready, failures = False, 0
            try:
                while not self._stopping.is_set():
                    try:
                        result = self._round()
                    except Exception as exc:  # the vault could not be opened or read
                        if not ready:  # the first round: a wrong vault, told at once
                            raise
                        failures += 1
                        wait = min(MAX_IDLE, MIN_RETRY * 2 ** min(failures - 1, 4))
                        _log.error("a round failed (%s); the next in %.0f s: %s",
                                   type(exc).__name__, wait, exc)
                        self.notify(f"STATUS=round failed, next in {wait:.0f} s: {exc}")
                        self._wake.wait(wait)
                        self._wake.clear()
                        continue
                    failures = 0
                    if not ready:
                        self.notify("READY=1")
                        ready = True
                    if result is not None:
                        self.notify(f"STATUS={self._status_line(result)}")
                    self.notify("WATCHDOG=1")
                    self._wait_next()
            finally:
                ended.set()
                self.notify("STOPPING=1")

    def run_once(self) -> RoundResult:
        """One round of what is due now (``pydr run --once``), with the run
        lock taken as run() does.

        Returns:
            The RoundResult.

        Raises:
            VaultError: another pydr run serves the vault, or not a vault.
            Cancelled: stop() came before the round began (while it waited
                for the vault's lock): nothing was looked at.
        """
        with self._running():
            result = self._round()
        if result is None:
            raise Cancelled("pydr run --once was stopped before its round began",
                            path=self.directory)
        return result

    def _keep_alive(self, interval: float, ended: threading.Event) -> None:
        while not ended.wait(interval):
            if self._progressing(2 * interval):
                self.notify("WATCHDOG=1")

    def _progressing(self, stall: float) -> bool:
        """Whether the service makes progress (the watchdog thread pings
        only then): between cycles it does (waiting for the next round, or
        for an operator's command to let the vault's lock go); while cycles
        run, only while their events come, the last less than `stall`
        seconds ago. A hung cycle stops the pings: systemd restarts the
        service, and the next start finishes the cycle."""
        with self._progress_guard:
            return not self._cycling or self._monotonic() - self._progress < stall

    def _progressed(self, event: Any = None) -> None:
        """An event of the running cycles (the EventSink they are given):
        progress; passed on to the service's own sink."""
        with self._progress_guard:
            self._progress = self._monotonic()
        if event is not None and self.events is not None:
            self.events(event)

    def _wait_next(self) -> None:
        """Wait until the next item is due (at most MAX_IDLE), or a wake-up."""
        left = MAX_IDLE if self._next_due is None else self._next_due - self.clock()
        left = min(max(left, 0.0), MAX_IDLE)
        if left > 0 and not self._stopping.is_set():
            self._wake.wait(left)
        self._wake.clear()

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        with _run_lock(self.directory):
            try:
                if self.metrics_address is not None:
                    self.metrics_port = self._parts.serve_metrics(*self.metrics_address,
                                                                  clock=self.clock)
                if self.warm:
                    self._warm_state = _warm_state()
                if self.scheduler is not None:
                    from .fleet import Fleet

                    self._fleet = Fleet(self.scheduler, events=self.events)
                yield
            finally:
                for thing in (self._fleet, self._warm_state):
                    if thing is not None:
                        with contextlib.suppress(Exception):
                            thing.close()
                self._fleet = self._warm_state = None
                self._parts.close()

    # -- one round --------------------------------------------------------------------
    def _open_vault(self) -> Any:
        from .vault import Vault

        passphrase = round_passphrase(self._passphrase, self._passphrase_file)
        return store_lock.take_after_waiters(
            self.directory, lambda: Vault(self.directory, writer=True,
                                          passphrase=passphrase), cancel=self._stopping)

    def _round(self) -> Optional[RoundResult]:
        started = time.monotonic()
        vault = self._open_vault()
        if vault is None:  # stopped while waiting for the lock
            return None
        em = Emitter(self.events, "run")
        result = RoundResult()
        alerts: List[Tuple[Any, Any]] = []
        try:
            store = vault.store
            names = store.items()
            now = self.clock()
            policies, unreadable = self._parts.policies(store, names)
            self._targets = {n: getattr(p, "target_rpo", None) for n, p in policies.items()}
            if not self._warned_idle and names and not any(self._targets.values()):
                _log.warning("no item of %s has a target RPO: nothing is scheduled (set one "
                             "with 'pydr policy ITEM --rpo 5m')", self.directory)
                self._warned_idle = True
            drills = self._parts.find_drills(store, names)
            plans = schedule.plans(store, policies, now, self._last_durations, drills)
            due = [p for p in sorted((p for p in plans if p.status == "due"),
                                     key=schedule._order)]
            result.due = [p.item for p in due]
            result.skipped = {n: why for n, why in schedule.summary(plans).items()
                              if n not in unreadable}
            for n, why in unreadable.items():  # not replicated: a failure, its health critical
                result.failed[n] = why
                result.exit_codes[n] = EXIT_VAULT
            em.emit("started", message=f"round: {len(due)} of {len(names)} items due")
            self._parts.set_queue(len(due))
            for call in _calls(store, due, policies, now, drills):
                if self._stopping.is_set():  # stop(): none starts after
                    for n in call.names:
                        result.skipped.setdefault(n, STOPPING)
                        if n in result.due:
                            result.due.remove(n)
                    continue
                self._replicate(store, call, result)
            self._forget_warm(plans, result)
            now = self.clock()
            with _reporting("the RPO health check"):  # never stops the protection itself
                result.transitions, alerts = self._parts.health(store, names, now, policies, em)
            with _reporting("the metrics update"):
                self._parts.update_items(store, names, now, policies)
            # only the items replicated (or tried) changed since the plans were made
            now = self.clock()
            tried = set(result.succeeded) | set(result.failed)
            self._next_due = schedule.earliest(
                [schedule.plan_item(store, p.item, policies[p.item], now,
                                    self._last_durations.get(p.item, 0.0), p.item in drills)
                 if p.item in tried and store.has_item(p.item) else p for p in plans], now)
            # a paused item resumes by an operator's command (cleanup-test-failover,
            # reprotect) that wakes no one: look again within half its target
            paused = [self._targets.get(p.item) for p in plans if p.status == "paused"]
            paused = [t / 2 for t in paused if t]
            if paused:
                recheck = now + max(1.0, min(paused))
                self._next_due = recheck if self._next_due is None else min(self._next_due,
                                                                             recheck)
        finally:
            vault.close()
        for commands, transition in alerts:  # in the alert thread: the next round never waits
            with _reporting(f"the alert commands of {transition.item}"):
                self._parts.queue_alert(commands, transition, self.directory)
        result.seconds = time.monotonic() - started
        self._parts.set_queue(0)
        self._parts.round_ended(self.clock())
        em.emit("finished", message=_round_message(result))
        return result

    def _forget_warm(self, plans: List[schedule.Plan], result: RoundResult) -> None:
        """What the warm state keeps of an item that failed, is paused or
        gone is dropped: its next cycle starts cold (pydr.dr.warm)."""
        warm = self._warm_state
        if warm is None:
            return
        for name in result.failed:
            warm.drop(name, self.directory)
        warm.keep_only([p.item for p in plans if p.status != "paused"])

    def _replicate(self, store: Any, call: "_Call", result: RoundResult) -> None:
        """One cycle call; every outcome recorded in `result` and on the items."""
        executor = (self._fleet.executor() if self._fleet is not None
                    else ParallelExecutor(self.jobs))
        begun = time.monotonic()
        self._progressed()
        self._cycling = True
        try:
            cycle = replicate(store, call.names, executor=executor,
                              app_consistent=call.app_consistent, resync_all=call.resync,
                              bwlimit=call.bwlimit, events=self._progressed, cancel=self._cancel,
                              warm=self._warm_state)
            outcomes = list(cycle.outcomes)
        except Exception as exc:  # each item's failure is its own: the service goes on
            cycle = (exc.result if isinstance(exc, (CycleFailed, Cancelled))
                     else getattr(exc, "cycle_result", None))
            if exit_code_for(exc.__cause__ or exc) == 1:
                _log.error("a replication cycle of %s hit a pydr bug",
                           ", ".join(call.names), exc_info=exc.__cause__ or exc)
            if cycle is None:  # it escaped the driver: nothing recorded it on the items
                outcomes = [_Outcome(n, "failed", str(exc) or type(exc).__name__,
                                     exit_code_for(exc)) for n in call.names]
                _mark(store, call.names, outcomes[0].error, exc)
            else:
                outcomes = list(cycle.outcomes)
        finally:
            self._cycling = False
        seconds = time.monotonic() - begun
        for o in outcomes:
            self._parts.observe_cycle(o, seconds)  # and a passphrase failure kept
            result.skipped.pop(o.item, None)  # a group's member that came with a due one
            if o.status == "succeeded":
                result.succeeded.append(o.item)
                # the call's time: an upper bound of the item's (the next cut comes earlier)
                self._last_durations[o.item] = seconds
                store.set_item(o.item, attempts=0, next_retry=None)
                continue
            result.failed[o.item] = o.error or "failed"
            result.exit_codes[o.item] = o.exit_code or 1
            if o.exit_code == 130:  # stopped by the operator: no fault, nothing to retry
                continue
            row = store.item(o.item)
            attempts = (row["attempts"] or 0) + 1
            # the retry schedule's gap after this attempt (pydr.dr.retry, as replicate_with_retry)
            wait = attempt_offset(attempts) - attempt_offset(attempts - 1)
            target = self._targets.get(o.item)
            if target is not None:  # a minutes-long back-off would breach a seconds-long RPO
                wait = min(wait, max(MIN_RETRY, target / 2))
            store.set_item(o.item, attempts=attempts, next_retry=self.clock() + wait,
                           last_error=o.error)
            _log.warning("%s: cycle failed (exit %s), retry in %.0f s: %s", o.item,
                         o.exit_code, wait, o.error)

    def _status_line(self, result: RoundResult) -> str:
        worst = self._parts.worst_health()
        items = len(self._parts.healths)
        return (f"{items} items" + (f", worst RPO health {worst}" if worst else "")
                + f"; last round: {len(result.succeeded)} replicated, "
                f"{len(result.failed)} failed")


def _round_message(result: RoundResult) -> str:
    """The "finished" Event's message of a round: what it did, by item."""
    def names(items: Any) -> str:
        return f" ({', '.join(items)})" if items else ""

    paused = [n for n, why in result.skipped.items() if why.startswith("paused")]
    return (f"round: {len(result.succeeded)} succeeded{names(result.succeeded)}, "
            f"{len(result.failed)} failed{names(result.failed)}, {len(paused)} paused"
            f"{names(paused)}, {len(result.skipped) - len(paused)} not due, in "
            f"{result.seconds:.3f} s")


class _Outcome:
    """An item's failure when the cycle driver did not record one."""

    def __init__(self, item: str, status: str, error: str, exit_code: int) -> None:
        self.item, self.status, self.error, self.exit_code = item, status, error, exit_code
        self.bytes = self.bytes_read = 0
        self.point_id = None


@dataclass
class _Call:
    """Items replicated in one cycle call, with the options they share."""

    names: List[str]
    resync: bool
    app_consistent: bool
    bwlimit: Optional[int]


def _calls(store: Any, due: List[schedule.Plan], policies: Dict[str, Any],
           now: float, drills: Any = ()) -> List[_Call]:
    """The due items as cycle calls: the items that share options in one
    call (its units run in parallel), a due group member with its group's
    other members that may replicate (a group is all or nothing)."""
    calls: Dict[Tuple[bool, bool, Optional[int]], _Call] = {}
    taken = set()
    for plan in due:
        if plan.item in taken:
            continue
        row = store.item(plan.item)
        members = [plan.item]
        if row["grp"]:
            members = [n for n in store.items(group=row["grp"])
                       if schedule.paused_why(store.item(n), n in drills) is None]
        taken.update(members)
        policy = policies.get(plan.item)
        resync = any(store.item(n)["state"] == "resync-required" for n in members)
        app = all(_app_consistent_due(store, n, policies.get(n), now) for n in members)
        bwlimit = _bwlimit(policy, now)
        key = (resync, app, bwlimit)
        if key not in calls:
            calls[key] = _Call([], resync, app, bwlimit)
        calls[key].names.extend(members)
    return list(calls.values())


def _bwlimit(policy: Any, now: float) -> Optional[int]:
    at = getattr(policy, "bwlimit_at", None)
    return at(now) if at is not None else getattr(policy, "bwlimit", None)


def _app_consistent_due(store: Any, name: str, policy: Any, now: float) -> bool:
    """Whether item `name`'s next cycle is app-consistent: its policy asks
    every so often, it has hooks, and its newest app-consistent point is
    older than that (or it has none)."""
    every = getattr(policy, "app_consistent_every", None)
    if not every or not store.item(name)["quiesce_hook"]:
        return False
    times = [p.data_time for p in store.points(name)
             if p.consistency == "app-consistent" and not p.damaged]
    return not times or now - max(times) >= every


def _mark(store: Any, names: List[str], error: str, exc: BaseException) -> None:
    """Record a failure the cycle driver did not (it escaped it) on
    `names`, as the driver would: health warning when a retry may succeed,
    else critical (a cancel leaves health as it was)."""
    if interrupted(exc):
        return
    for n in names:
        with contextlib.suppress(Exception):  # the vault itself may be what failed
            store.set_item(n, health="warning" if recoverable(exc) else "critical",
                           last_error=error)


@contextlib.contextmanager
def _reporting(what: str) -> Iterator[None]:
    """Run a reporting step (health, metrics, alerts): its failure is
    logged -- a pydr bug with its traceback -- and the service goes on:
    reporting never stops the protection."""
    try:
        yield
    except Exception as exc:
        if exit_code_for(exc) == 1:
            _log.error("%s hit a pydr bug", what, exc_info=exc)
        else:
            _log.warning("%s failed: %s", what, exc)


def _host_port(text: str) -> Tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"metrics wants HOST:PORT (port 0: any free one), not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _warm_state() -> Any:
    """E's pydr.dr.warm.WarmState, when this pydr has it."""
    try:
        from .warm import WarmState
    except ImportError:
        return None
    return WarmState()


@contextlib.contextmanager
def _run_lock(directory: str) -> Iterator[None]:
    """flock `directory`/run.lock for the service's life: one pydr run per
    vault. VaultError naming the holder's pid when another has it."""
    if not os.path.isfile(os.path.join(directory, "vault.db")):
        raise VaultError("not a pydr vault (no vault.db)", path=directory,
                         hint=f"create one with 'pydr vault init {directory}'")
    path = os.path.join(directory, RUN_LOCK)
    with naming(path):  # never a symlink: created in the vault, never followed out of it
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                     0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise VaultError(f"{RUN_LOCK} is not a regular file", path=path,
                             hint=f"pydr run creates {RUN_LOCK} as a regular file: "
                                  f"remove what is there")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise VaultError(f"another pydr run serves this vault"
                             + (f" (pid {holder})" if holder else ""), path=directory,
                             hint="one service per vault: stop that one first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)

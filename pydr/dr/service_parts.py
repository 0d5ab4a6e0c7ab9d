"""What pydr run (pydr.dr.service) asks of the issue's other parts: each
item's effective policy (pydr.dr.policy), its RPO health and the
transitions to alert about (pydr.dr.health, pydr.dr.alerting), and the
Prometheus metrics (pydr.dr.metrics). Kept apart so the service's loop
reads as the loop."""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Dict, List, Optional, Tuple, Union

from .events import Emitter, EventSink
from .rpo import rpo_facts

_log = logging.getLogger("pydr.service")

#: worst first: the health a STATUS line names
_SEVERITY = ("critical", "warning", "unknown", "ok", "paused")


class Parts:
    """The policies, health, alerts and metrics of one service.

    Args:
        events: the service's EventSink (given "health" events), or None.
    """

    def __init__(self, events: Optional[EventSink]) -> None:
        self.events = events
        self.metrics: Any = None
        self.healths: Dict[str, str] = {}
        self.damaged: Dict[str, str] = {}  # {item: why its policy cannot be read}
        self.locked_out: Dict[str, str] = {}  # {item: why its object store did not open}
        self._readable: Dict[str, Any] = {}
        self.drills: Any = set()  # the items in a drill that lets their replicas be written
        self._alert_guard = threading.Lock()
        self._alert_thread: Optional[threading.Thread] = None
        self._alert_queue: Any = None
        self._alert_abandon = threading.Event()

    # -- policies --------------------------------------------------------------------
    def policies(self, store: Any, names: List[str]) -> Tuple[Dict[str, Any], Dict[str, str]]:
        """({item: its effective policy}, {item: why its policy cannot be
        read}): an item whose stored policy is damaged is not scheduled, its
        RPO health is "critical" (:meth:`health`), the message naming the
        damaged field and how to clear it; the others go on."""
        from .policy import readable_policy

        found, bad = {}, {}
        self._readable = {}
        for n in names:
            policy, damaged = readable_policy(store, n)
            if not damaged:
                found[n] = policy
                continue
            self._readable[n] = policy  # its alert commands that can be read
            bad[n] = "; ".join(f"its policy cannot be read: {e.message}: {e.hint}"
                               for e in damaged.values())
            _log.warning("item %s is not scheduled: %s", n, bad[n])
        self.damaged = bad
        return found, bad

    def find_drills(self, store: Any, names: List[str]) -> Any:
        """The items of `names` in a drill that lets their replicas be
        written (their point store does not refuse writes under it:
        PointStore.refuse_writes_under_drill); kept for the round's health."""
        from ..errors import InvalidState
        from .pointstores import point_store

        found = set()
        for n in names:
            if not store.item(n)["test_dir"]:
                continue
            try:
                point_store(store, n).refuse_writes_under_drill("a replication cycle")
            except InvalidState:
                continue
            except Exception as exc:  # cannot tell: treated as blocking (paused, then critical)
                _log.warning("whether the drill of %s blocks replication is not known: %s",
                             n, exc)
                continue
            found.add(n)
        self.drills = found
        return found

    # -- health and alerts -------------------------------------------------------------
    def health(self, store: Any, names: List[str], now: float, policies: Dict[str, Any],
               em: Emitter) -> Tuple[List[Dict[str, Any]], List[Tuple[Any, Any]]]:
        """Record the items' RPO health changes (pydr.dr.health.check_transitions),
        emit a "health" Event for each; returns (the transitions as dicts,
        [(alert commands, transition)] to run once the vault is closed)."""
        from .health import check_transitions

        found, alerts = [], []
        damaged = {**self.locked_out, **self.damaged}
        for t in check_transitions(store, names, now, policies, damaged=damaged,
                                   drills_replicated=self.drills):
            found.append(t.to_dict())
            em.for_item(t.item).emit("health", message=t.message)
            policy = policies.get(t.item, self._readable.get(t.item))
            commands = tuple(getattr(policy, "alert_commands", ()) or ())
            if commands:
                alerts.append((commands, t))
        return found, alerts

    def note_passphrase(self, outcome: Any) -> None:
        """Keep whether an item's cycle failed to open its encrypted object
        store (no passphrase, or a wrong one: pydr.dr.cycle.PASSPHRASE_FAILURE):
        its RPO health is "critical" at once, an alert of its own, until a
        cycle of it succeeds -- a retry cannot mend it, an operator must."""
        from .cycle import PASSPHRASE_FAILURE

        if outcome.status == "succeeded":
            self.locked_out.pop(outcome.item, None)
        elif (outcome.error or "").startswith(PASSPHRASE_FAILURE):
            self.locked_out[outcome.item] = outcome.error

    def queue_alert(self, commands: Any, transition: Any, vault: str) -> None:
        """Run an item's alert commands for `transition` (pydr.dr.alerting)
        in the alert thread, one transition after another, off the service's
        loop: a hanging command never holds the next round. A failing one is
        logged there, never the service's failure. `vault`: the vault's
        directory (the alert names it absolutely)."""
        from .alerting import alert_event

        with self._alert_guard:
            if self._alert_thread is None:
                self._alert_queue = queue.Queue()
                self._alert_abandon = threading.Event()
                self._alert_thread = threading.Thread(
                    target=_deliver, args=(self._alert_queue, self._alert_abandon),
                    name="pydr-alerts", daemon=True)
                self._alert_thread.start()
            self._alert_queue.put((list(commands), alert_event(transition,
                                                               os.path.abspath(vault))))

    def finish_alerts(self, timeout: float) -> None:
        """Let the alert thread deliver what is queued, waiting for it at
        most `timeout` seconds; alerts it has not started by then are
        dropped (logged), the one it runs is killed at its own timeout."""
        with self._alert_guard:
            thread, alerts, abandon = (self._alert_thread, self._alert_queue,
                                       self._alert_abandon)
            self._alert_thread = self._alert_queue = None
        if thread is None:
            return
        alerts.put(None)
        thread.join(timeout)
        if thread.is_alive():
            abandon.set()
            _log.warning("the alert commands did not finish within %g s of the stop: the "
                         "alerts not yet delivered are dropped", timeout)

    def update_items(self, store: Any, names: List[str], now: float,
                     policies: Dict[str, Any]) -> None:
        """Note each item's RPO health, and give the metrics its RPO,
        target and health."""
        from .health import rpo_health

        if self.metrics is None:  # the STATUS line's worst health: what the round recorded
            self.healths = {r["name"]: r["rpo_health"] for r in store.item_records()
                            if r["rpo_health"]}
            return
        for n in names:
            facts = rpo_facts(store, n, now=now)
            policy = policies.get(n)
            row = store.item(n)
            damaged = self.damaged.get(n) or self.locked_out.get(n)
            drill = n in self.drills
            self.healths[n] = rpo_health(policy, facts, row, now, damaged=damaged,
                                         drill_replicated=drill)
            # what a scrape judges the health from, later, without the vault
            kept = {"state": row["state"], "test_dir": row["test_dir"],
                    "created": row["created"]}
            self.metrics.track_item(n, facts.latest_point_at, getattr(policy, "target_rpo", None),
                                    _health_at(policy, facts, kept, damaged, drill))
        for gone in set(self.healths) - set(names):
            del self.healths[gone]
            if self.metrics is not None:
                self.metrics.forget_item(gone)

    def worst_health(self) -> Optional[str]:
        """The worst RPO health of the items (None when there are none)."""
        found = set(self.healths.values())
        return next((h for h in _SEVERITY if h in found), None)

    # -- metrics ----------------------------------------------------------------------
    def serve_metrics(self, host: str, port: int, clock: Any) -> int:
        """Serve the metrics on `host`:`port`, the RPOs measured with
        `clock` (the service's); returns the bound port."""
        from .metrics import ServiceMetrics

        self.metrics = ServiceMetrics(clock=clock)
        return int(self.metrics.serve(host, port))

    def round_ended(self, when: float) -> None:
        if self.metrics is not None:
            self.metrics.set_round_end(when)

    def set_queue(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.set_queue(n)

    def observe_cycle(self, outcome: Any, seconds: float) -> None:
        self.note_passphrase(outcome)
        if self.metrics is not None:
            # sent: what reached the replica's place; no transfer reports more than
            # what it wrote there, so that (for a local replica, exactly that)
            written = int(getattr(outcome, "bytes", 0) or 0)
            read = int(getattr(outcome, "bytes_read", 0) or 0)
            self.metrics.observe_cycle(outcome.item, seconds, read, written, written,
                                       outcome.status == "succeeded")

    def close(self) -> None:
        from .alerting import TIMEOUT

        self.finish_alerts(TIMEOUT)
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None



def _deliver(alerts: "queue.Queue[Any]", abandon: threading.Event) -> None:
    """The alert thread: run each queued (commands, alert) until None (the
    end), or until `abandon` is set (the rest dropped)."""
    from .alerting import run_alert_commands

    while True:
        job = alerts.get()
        if job is None or abandon.is_set():
            return
        commands, event = job
        try:
            run_alert_commands(commands, event)
        except Exception as exc:  # alerting never stops the protection
            _log.error("the alert commands of %s hit a pydr bug", event.get("item"),
                       exc_info=exc)


def _health_at(policy: Any, facts: Any, row: Dict[str, Any], damaged: Optional[str],
               drill: bool) -> Any:
    """The RPO health of an item at a later time, from what a round kept of
    it (pydr.dr.health's rules; no vault read)."""
    from .health import rpo_health
    from .rpo import RpoFacts

    def health_at(now: float) -> str:
        at = facts.latest_point_at
        later = RpoFacts(facts.latest_point, at, None if at is None else max(0.0, now - at),
                         facts.last_success_at)
        return rpo_health(policy, later, row, now, damaged=damaged, drill_replicated=drill)

    return health_at


def round_passphrase(passphrase: Optional[Union[str, bytes]],
                     path: Optional[Union[str, "os.PathLike[str]"]]) -> Optional[Union[str, bytes]]:
    """The passphrase a round of the service opens the vault with: the
    file's at `path` as it is now (a `pydr key passwd` and an update of the
    file need no restart), else `passphrase` (None: the environment's, read
    when a store is opened).

    Raises:
        FileNotFoundError, PermissionError: the file cannot be read.
        InvalidArgument: it is empty.
    """
    from .passphrases import passphrase_from

    return passphrase if path is None else passphrase_from(path)

"""What pydr run (pydr.dr.service) asks of the issue's other parts: each
item's effective policy (pydr.dr.policy), its RPO health and the
transitions to alert about (pydr.dr.health, pydr.dr.alerting), and the
Prometheus metrics (pydr.dr.metrics). Kept apart so the service's loop
reads as the loop."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

from ..errors import VaultError
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

    # -- policies --------------------------------------------------------------------
    def policies(self, store: Any, names: List[str]) -> Tuple[Dict[str, Any], Dict[str, str]]:
        """({item: its effective policy}, {item: why it has none}): a
        damaged stored policy leaves its item unscheduled (logged), never
        the others."""
        from .policy import effective_policy

        found, bad = {}, {}
        for n in names:
            try:
                found[n] = effective_policy(store, n)
            except VaultError as exc:
                _log.warning("item %s is not scheduled: %s", n, exc)
                bad[n] = f"not scheduled: its policy cannot be read: {exc}"
        return found, bad

    # -- health and alerts -------------------------------------------------------------
    def health(self, store: Any, names: List[str], now: float, policies: Dict[str, Any],
               em: Emitter) -> Tuple[List[Dict[str, Any]], List[Tuple[Any, Any]]]:
        """Record the items' RPO health changes (pydr.dr.health.check_transitions),
        emit a "health" Event for each; returns (the transitions as dicts,
        [(alert commands, transition)] to run once the vault is closed)."""
        from .health import check_transitions

        found, alerts = [], []
        for t in check_transitions(store, names, now, policies):
            found.append(t.to_dict())
            em.for_item(t.item).emit("health", message=t.message)
            commands = tuple(getattr(policies.get(t.item), "alert_commands", ()) or ())
            if commands:
                alerts.append((commands, t))
        return found, alerts

    def run_alert(self, commands: Any, transition: Any, vault: str) -> None:
        """Run an item's alert commands for `transition` (pydr.dr.alerting);
        a failing one is logged there, never the service's failure."""
        from .alerting import alert_event, run_alert_commands

        run_alert_commands(list(commands), alert_event(transition, vault))

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
            self.healths[n] = rpo_health(policy, facts, store.item(n), now)
            if self.metrics is not None:
                self.metrics.set_item(n, facts.rpo_seconds,
                                      getattr(policy, "target_rpo", None), self.healths[n])
        for gone in set(self.healths) - set(names):
            del self.healths[gone]
            if self.metrics is not None:
                self.metrics.forget_item(gone)

    def worst_health(self) -> Optional[str]:
        """The worst RPO health of the items (None when there are none)."""
        found = set(self.healths.values())
        return next((h for h in _SEVERITY if h in found), None)

    # -- metrics ----------------------------------------------------------------------
    def serve_metrics(self, host: str, port: int) -> int:
        """Serve the metrics on `host`:`port`; returns the bound port."""
        from .metrics import ServiceMetrics

        self.metrics = ServiceMetrics()
        return int(self.metrics.serve(host, port))

    def set_queue(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.set_queue(n)

    def observe_cycle(self, outcome: Any, seconds: float) -> None:
        if self.metrics is not None:
            # sent: what reached the replica's place; no transfer reports more than
            # what it wrote there, so that (for a local replica, exactly that)
            written = int(getattr(outcome, "bytes", 0) or 0)
            read = int(getattr(outcome, "bytes_read", 0) or 0)
            self.metrics.observe_cycle(outcome.item, seconds, read, written, written,
                                       outcome.status == "succeeded")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


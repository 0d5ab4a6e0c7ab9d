"""What pydr run (pydr.dr.service) asks of the issue's other parts: each
item's effective policy (pydr.dr.policy), its RPO health and the
transitions to alert about (pydr.dr.health, pydr.dr.alerting), and the
Prometheus metrics (pydr.dr.metrics). Kept apart so the service's loop
reads as the loop."""

from __future__ import annotations

import datetime
import logging
from typing import Any, Dict, List, Optional, Tuple

from .events import Emitter, EventSink, KINDS, iso_utc
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
    def policy(self, store: Any, name: str) -> Any:
        """Item `name`'s effective policy (pydr.dr.policy.effective_policy)."""
        try:
            from .policy import effective_policy
        except ImportError:  # before pydr.dr.policy lands: the rows, item over group
            return _RowPolicy(store, name)
        return effective_policy(store, name)

    # -- health and alerts -------------------------------------------------------------
    def health(self, store: Any, names: List[str], now: float, policies: Dict[str, Any],
               em: Emitter) -> Tuple[List[Dict[str, Any]], List[Tuple[Any, Dict[str, Any]]]]:
        """Record the items' RPO health changes (pydr.dr.health.check_transitions),
        emit a "health" Event for each; returns (the transitions as dicts,
        [(alert commands, alert event)] to run once the vault is closed)."""
        try:
            from .health import check_transitions
        except ImportError:
            return [], []
        found, alerts = [], []
        for t in check_transitions(store, names, now, policies):
            found.append({"item": t.item, "old": t.old, "new": t.new,
                          "rpo_seconds": t.rpo_seconds, "target_rpo": t.target_rpo,
                          "at": t.at, "message": t.message})
            if "health" in KINDS:
                em.for_item(t.item).emit("health", message=t.message)
            commands = tuple(getattr(policies.get(t.item), "alert_commands", ()) or ())
            if commands:
                alerts.append((commands, {
                    "type": "alert", "version": 1, "item": t.item, "old": t.old, "new": t.new,
                    "rpo_seconds": t.rpo_seconds, "target_rpo": t.target_rpo,
                    "at": iso_utc(datetime.datetime.fromtimestamp(t.at, datetime.timezone.utc)),
                    "message": t.message}))
        return found, alerts

    def run_alert(self, commands: Any, event: Dict[str, Any], vault: str) -> None:
        """Run an item's alert commands with `event` (pydr.dr.alerting);
        a failing one is logged there, never the service's failure."""
        from .alerting import run_alert_commands

        run_alert_commands(list(commands), dict(event, vault=vault))

    def update_items(self, store: Any, names: List[str], now: float,
                     policies: Dict[str, Any]) -> None:
        """Note each item's RPO health, and give the metrics its RPO,
        target and health."""
        try:
            from .health import rpo_health
        except ImportError:
            return
        for n in names:
            facts = rpo_facts(store, n, now=now)
            self.healths[n] = rpo_health(policies[n], facts, store.item(n), now)
            if self.metrics is not None:
                self.metrics.set_item(n, facts.rpo_seconds, policies[n].target_rpo,
                                      self.healths[n])
        for gone in set(self.healths) - set(names):
            del self.healths[gone]

    def worst_health(self) -> Optional[str]:
        """The worst RPO health of the items (None when there are none)."""
        found = set(self.healths.values())
        return next((h for h in _SEVERITY if h in found), None)

    # -- metrics ----------------------------------------------------------------------
    def serve_metrics(self, host: str, port: int) -> int:
        """Serve the metrics on `host`:`port`; returns the bound port."""
        try:
            from .metrics import ServiceMetrics
        except ImportError:
            raise OSError("this pydr has no metrics module (pydr.dr.metrics)") from None

        self.metrics = ServiceMetrics()
        return int(self.metrics.serve(host, port))

    def set_queue(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.set_queue(n)

    def observe_cycle(self, outcome: Any, seconds: float) -> None:
        if self.metrics is not None:
            moved = int(getattr(outcome, "bytes", 0) or 0)
            self.metrics.observe_cycle(outcome.item, seconds, moved, moved, moved,
                                       outcome.status == "succeeded")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


class _RowPolicy:
    """The policy fields the schedule reads, from the policies rows (item
    over group), for a pydr without pydr.dr.policy."""

    def __init__(self, store: Any, name: str) -> None:
        rows = [store.policy_row("item", name)]
        grp = store.item(name)["grp"]
        if grp:
            rows.append(store.policy_row("group", grp))
        rows = [r for r in rows if r is not None]

        def pick(field: str) -> Any:
            return next((r[field] for r in rows if r[field] is not None), None)

        self.target_rpo = pick("target_rpo")
        self.rpo_critical = pick("rpo_critical")
        self.app_consistent_every = pick("app_consistent_every")
        self.bwlimit = pick("bwlimit")
        self.priority = pick("priority") or 0
        self.alert_commands = ()

    def bwlimit_at(self, when: float) -> Optional[int]:
        return self.bwlimit

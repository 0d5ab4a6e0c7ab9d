"""When pydr run replicates each item: pure functions over the vault's
records and the items' policies, so a fake clock tests them.

An item is scheduled only when its effective policy has a target RPO. It is
**due** when it has no point yet, or when its newest point's data age plus
its last cycle's duration reaches half the target (so the next point lands
well before the target is passed), and never before its ``next_retry`` (a
failed cycle's back-off). An item in state resync-required is due like any
other, its cycle a resync (``resync_all``). Items failed over (or failing
over, committing, committed) are **paused**: not scheduled, never alerted
about. An item in a drill (a test failover) is scheduled like any other
(its replicas go on, as ASR replicates during a test failover), unless the
drill reads its replicas (qcow2 overlays: its point store refuses writes
under the drill, PointStore.refuse_writes_under_drill): then it is paused
(pydr.dr.health makes it "critical" past its critical RPO).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Container, Dict, List, Mapping, Optional, Tuple

from .health import REPLICATING_STATES
from .rpo import rpo_facts

#: the item states a replication cycle runs in (pydr.dr.cyclerecord.check_can_replicate)


@dataclass(frozen=True)
class Plan:
    """What the schedule says about one item at one instant.

    Attributes:
        item: the item's name.
        status: "due", "waiting" (a target, not due yet), "retry" (due but
            its next_retry is later), "paused" (failed over, committed, a
            drill) or "unscheduled" (no target RPO).
        when: epoch seconds it is (or was) due at; None for paused and
            unscheduled items.
        resync: its cycle must be a resync (state resync-required).
        why: a short reason a person reads ("paused: failed-over").
        overdue: seconds past `when` at the instant asked (0 or more).
        priority: its policy's priority (higher runs first).
    """

    item: str
    status: str
    when: Optional[float]
    resync: bool = False
    why: str = ""
    overdue: float = 0.0
    priority: int = 0


def _at(when: float) -> str:
    """`when` (epoch seconds) as a person reads it: ISO 8601 UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def paused_why(row: Any, drill_replicated: bool = False) -> Optional[str]:
    """Why item `row` (an ItemRecord) is paused, or None when it may
    replicate: its state is not one a cycle runs in (failed over, failing
    over, committing, committed), or a test failover (drill) of it is up
    that blocks replication (`drill_replicated` False: its point store
    refuses writes under it)."""
    if row["state"] not in REPLICATING_STATES:
        return f"paused: {row['state']}"
    if row["test_dir"] and not drill_replicated:
        return "paused: a test failover (drill) on the replicas blocks replication"
    return None


def plan_item(store: Any, name: str, policy: Any, now: float,
              last_duration: float = 0.0, drill_replicated: bool = False) -> Plan:
    """The schedule of item `name` at `now`.

    Args:
        store: an open vault (pydr.dr.store.Store or a Vault).
        name: the item.
        policy: its effective policy (pydr.dr.policy.Policy: ``target_rpo``,
            ``priority``).
        now: epoch seconds.
        last_duration: seconds its last cycle took (0 when not known).
        drill_replicated: a drill of it, if up, lets its replicas be
            written (see the module's docstring); False: it pauses it.

    Returns:
        The item's :class:`Plan`.

    Raises:
        UnknownName: `name` is not protected.
    """
    row = store.item(name)
    priority = int(getattr(policy, "priority", 0) or 0)
    why = paused_why(row, drill_replicated)
    if why is not None:
        return Plan(name, "paused", None, why=why, priority=priority)
    target = getattr(policy, "target_rpo", None)
    if not target:
        return Plan(name, "unscheduled", None, why="no target RPO", priority=priority)
    resync = row["state"] == "resync-required"
    facts = rpo_facts(store, name, now=now)
    if facts.latest_point_at is None:
        when = now  # no point yet: at once
    else:
        when = facts.latest_point_at + target / 2.0 - max(0.0, last_duration)
    if row["next_retry"] is not None and row["next_retry"] > max(when, now):
        return Plan(name, "retry", row["next_retry"], resync,
                    why=f"retry at {_at(row['next_retry'])} (attempt {(row['attempts'] or 0) + 1})",
                    priority=priority)
    if when <= now:
        return Plan(name, "due", when, resync, why="resync required" if resync else "due",
                    overdue=now - when, priority=priority)
    return Plan(name, "waiting", when, resync, why=f"not due until {_at(when)}",
                priority=priority)


def plans(store: Any, policies: Mapping[str, Any], now: float,
          last_durations: Optional[Mapping[str, float]] = None,
          drills_replicated: Container[str] = ()) -> List[Plan]:
    """:func:`plan_item` of every item of `policies` ({name: Policy}), in
    the order of `policies`; `drills_replicated`: the items whose drill
    lets their replicas be written."""
    last_durations = last_durations or {}
    return [plan_item(store, n, p, now, last_durations.get(n, 0.0), n in drills_replicated)
            for n, p in policies.items()]


def _order(plan: Plan) -> Tuple[int, float, str]:
    return (-plan.priority, -plan.overdue, plan.item)


def due_items(store: Any, policies: Mapping[str, Any], now: float,
              last_durations: Optional[Mapping[str, float]] = None) -> List[str]:
    """The items due at `now`, by priority (highest first), then the most
    overdue first, then by name.

    Args:
        store: an open vault.
        policies: {item: its effective Policy} of the items to consider.
        now: epoch seconds.
        last_durations: {item: seconds its last cycle took}.

    Returns:
        The names of the due items.
    """
    due = [p for p in plans(store, policies, now, last_durations) if p.status == "due"]
    return [p.item for p in sorted(due, key=_order)]


def next_due(store: Any, policies: Mapping[str, Any], now: float,
             last_durations: Optional[Mapping[str, float]] = None) -> Optional[float]:
    """When the next item is due (epoch seconds; `now` when one is due
    already), or None when no item is scheduled (every one paused or
    without a target). Arguments as :func:`due_items`."""
    return earliest(plans(store, policies, now, last_durations), now)


def earliest(items_plans: List[Plan], now: float) -> Optional[float]:
    """When the first of `items_plans` is due (`now` at the earliest), or
    None when none is scheduled."""
    whens = [p.when for p in items_plans
             if p.status in ("due", "waiting", "retry") and p.when is not None]
    return max(now, min(whens)) if whens else None


def summary(items_plans: List[Plan]) -> Dict[str, str]:
    """{item: why} of the plans that are not due (RoundResult.skipped)."""
    return {p.item: p.why for p in items_plans if p.status != "due"}

"""RPO health: whether an item's newest point is as fresh as its policy's
target RPO asks, and the changes of it that ``pydr run`` records and alerts on.

The rules (:func:`rpo_health`), with ``rpo`` the achieved RPO (the age of
the newest undamaged point's data, pydr.dr.rpo.rpo_facts), ``target`` the
policy's target_rpo and ``critical`` its critical_after() (rpo_critical,
else 2 x target):

* "paused": the item is failing over, failed over, committing or
  committed: pydr run does not replicate it, so its RPO is not held
  against it (no alert); or it is in a drill that blocks replication (a
  qcow2 overlay on its replicas), up to its critical RPO: past it,
  "critical" (a forgotten drill must not stop protection unnoticed). A
  drill that does not block replication is judged as any item;
* "critical" too when its stored policy cannot be read (damaged): pydr
  run does not replicate it until `pydr policy ITEM --clear FIELD`;
* "unknown": no target is set, or no point yet and the item was protected
  no more than one target ago (its first cycle may still be running);
* "critical": rpo > critical, or no point yet more than critical after
  the item was protected;
* "warning": rpo > target, or no point yet more than one target after the
  item was protected;
* "ok": otherwise.

This is separate from ``items.health`` (how the item's last cycle went);
``pydr status`` shows both. ``items.rpo_health`` keeps the health pydr run
last recorded: :func:`check_transitions` compares with it, records each
change in the alerts table, and returns the changes for the caller to run
the alert commands (pydr.dr.alerting) and emit "health" events.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Container, Dict, Iterable, List, Mapping, Optional,
                    Protocol, Tuple)

from .events import iso_utc
from .rpo import RpoFacts, rpo_facts

if TYPE_CHECKING:  # (not pydr.dr.policy nor vault: they may import this module)
    from .store import Store

__all__ = ["HEALTHS", "rpo_health", "Transition", "check_transitions", "RpoPolicy"]

#: Every RPO health, best first ("unknown" and "paused" are not ranked).
HEALTHS = ("ok", "warning", "critical", "unknown", "paused")

#: the item states in which cycles replicate it (the others are a failover's)
#: the states an item replicates in (pydr run schedules it; any other pauses it)
REPLICATING_STATES = ("protecting", "protected", "resync-required")
#: the healths whose coming and going is alerted on
_TROUBLE = ("warning", "critical")


class RpoPolicy(Protocol):
    """What the health rules read of a policy: pydr.dr.policy.Policy has it."""

    @property
    def target_rpo(self) -> Optional[float]:
        """The target RPO in seconds, or None (not set)."""

    def critical_after(self) -> Optional[float]:
        """The RPO in seconds at which health is "critical" (None: no target)."""


def _seconds(value: float) -> str:
    """`value` seconds for a person: "12 s", "2.5 s"."""
    return f"{round(value, 1):g} s"


def _field(row: Any, name: str) -> Any:
    """Field `name` of an item row (an ItemRecord, or a Vault's dict)."""
    return row[name] if isinstance(row, Mapping) else getattr(row, name)


def _judge(policy: Optional[RpoPolicy], facts: RpoFacts, item_row: Any, now: float,
           damaged: Optional[str] = None, drill_replicated: bool = False) -> Tuple[str, str]:
    """(health, why) for :func:`rpo_health`; `why` states the facts."""
    state = _field(item_row, "state")
    if state not in REPLICATING_STATES:
        return "paused", state
    if _field(item_row, "test_dir") and not drill_replicated:
        critical = policy.critical_after() if policy is not None else None
        rpo = facts.rpo_seconds
        if critical is not None and rpo is not None and rpo > critical:
            return "critical", (f"RPO {_seconds(rpo)} > critical {_seconds(critical)}: a drill "
                                f"(test failover) on its replicas blocks replication")
        return "paused", "in a drill that blocks replication"
    if damaged:
        return "critical", f"not replicated: {damaged}"
    if policy is None or policy.target_rpo is None:
        return "unknown", "no target RPO"
    target = policy.target_rpo
    critical = policy.critical_after()
    assert critical is not None  # a target is set
    rpo = facts.rpo_seconds
    if rpo is None:
        since = max(0.0, now - (_field(item_row, "created") or now))
        if since > critical:
            return "critical", (f"no point {_seconds(since)} after protect > critical "
                                f"{_seconds(critical)}")
        if since > target:
            return "warning", f"no point {_seconds(since)} after protect > target {_seconds(target)}"
        return "unknown", f"no point yet, protected {_seconds(since)} ago"
    if rpo > critical:
        return "critical", f"RPO {_seconds(rpo)} > critical {_seconds(critical)}"
    if rpo > target:
        return "warning", f"RPO {_seconds(rpo)} > target {_seconds(target)}"
    return "ok", f"RPO {_seconds(rpo)} <= target {_seconds(target)}"


def rpo_health(policy: Optional[RpoPolicy], facts: RpoFacts, item_row: Any, now: float,
               damaged: Optional[str] = None, drill_replicated: bool = False) -> str:
    """The RPO health of an item (one of :data:`HEALTHS`; the rules are in
    the module's docstring).

    policy: its effective pydr.dr.policy.Policy (an :class:`RpoPolicy`:
        ``target_rpo`` and ``critical_after()`` are read), or None (no policy: "unknown"
        unless paused).
    facts: its pydr.dr.rpo.RpoFacts, measured at `now`.
    item_row: its items row (a store ItemRecord, or the dict Vault.item
        returns): ``state``, ``test_dir`` and ``created`` are read.
    now: the time to judge at (epoch seconds).
    damaged: why its stored policy cannot be read, if it cannot: then it
        is not replicated, and "critical" unless paused.
    drill_replicated: a drill of it, if up, lets its replicas be written
        (pydr.dr.schedule): it is judged as any item; False: the drill
        blocks replication, "paused" up to the critical RPO, then "critical".

    Returns the health. Raises nothing of its own (a row without those
    fields is the caller's bug: AttributeError/KeyError).
    """
    return _judge(policy, facts, item_row, now, damaged, drill_replicated)[0]


@dataclass(frozen=True)
class Transition:
    """A change of an item's RPO health that :func:`check_transitions` recorded.

    Attributes:
        item: the item.
        old: the health recorded before (one of :data:`HEALTHS`), or None
            if pydr run had recorded none.
        new: the health now (one of :data:`HEALTHS`).
        rpo_seconds: the achieved RPO at ``at``, or None (no point).
        target_rpo: the policy's target RPO, or None.
        at: when it was judged (epoch seconds).
        message: what changed and why, for a person:
            "ok -> warning: RPO 12 s > target 10 s".
    """

    item: str
    old: Optional[str]
    new: str
    rpo_seconds: Optional[float]
    target_rpo: Optional[float]
    at: float
    message: str

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: every field, ``at`` as ISO 8601 UTC ("...Z")."""
        return {"item": self.item, "old": self.old, "new": self.new,
                "rpo_seconds": self.rpo_seconds, "target_rpo": self.target_rpo,
                "at": iso_utc(datetime.datetime.fromtimestamp(self.at, datetime.timezone.utc)),
                "message": self.message}


def _alerts_for(old: Optional[str], new: str) -> bool:
    """Whether a change from `old` to `new` is news to alert on and log:
    into, out of or between "warning" and "critical" -- except into
    "paused", which is the operator's doing (no alert on paused items)."""
    return new != "paused" and (old in _TROUBLE or new in _TROUBLE)


def check_transitions(store: Store, names: Iterable[str], now: float,
                      policies: Mapping[str, RpoPolicy],
                      damaged: Optional[Mapping[str, str]] = None,
                      drills_replicated: Container[str] = ()) -> List[Transition]:
    """Judge the RPO health of items `names` at `now` and record the changes.

    store: an open vault (pydr.dr.store.Store, or a Vault), open as its
        writer.
    names: the items to judge; a name no longer in the vault is skipped.
    now: the time to judge at (epoch seconds).
    policies: each item's effective pydr.dr.policy.Policy by name (a name
        missing: no policy, see :func:`rpo_health`).
    damaged: {item: why its stored policy cannot be read}: such an item is
        "critical" (unless paused), the message saying why.
    drills_replicated: the items whose drill lets their replicas be
        written (see :func:`rpo_health`).

    Every item whose health differs from its ``items.rpo_health`` gets the
    new one recorded there. A change into, out of or between "warning" and
    "critical" (a recovery to "ok" too) is also logged in the alerts table
    and returned -- except a change into "paused" (pydr run does not alert
    on paused items); the others (a first "ok", "ok" <-> "unknown", into
    or out of "paused" while fine) are recorded silently. An unchanged
    health records nothing. All changes are written in one transaction.

    Returns the transitions, in the order of `names`; the caller runs the
    alert commands (pydr.dr.alerting) and emits the "health" events.

    Raises VaultError (or sqlite3 errors the store lets through) if the
    vault cannot be read or written; nothing is recorded then.
    """
    records: Any = getattr(store, "store", store)  # a Vault: use its store's records
    changes = []
    for name in names:
        if not records.has_item(name):
            continue
        row = records.item(name)
        policy = policies.get(name)
        facts = rpo_facts(records, name, now=now)
        new, why = _judge(policy, facts, row, now, (damaged or {}).get(name),
                          name in drills_replicated)
        old = row.rpo_health
        if new == old:
            continue
        target = policy.target_rpo if policy is not None else None
        changes.append((Transition(name, old, new, facts.rpo_seconds, target, now,
                                   f"{old or 'none'} -> {new}: {why}"), _alerts_for(old, new)))
    if not changes:
        return []
    with records.transaction():
        for transition, alert in changes:
            records.set_rpo_health(transition.item, transition.new)
            if alert:
                records.add_alert(transition.at, transition.item, transition.old, transition.new,
                                  transition.rpo_seconds, transition.target_rpo,
                                  transition.message)
    return [transition for transition, alert in changes if alert]

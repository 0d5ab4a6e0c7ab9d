"""What ``pydr status`` (and ``Vault.status``) shows of an item: an
ItemStatus (pydr.dr.results) built from the store's facts (its ItemRecord,
DiskRecords, PointRecords, the operation recorded on it) and its RPO. The
store answers facts; this is their presentation, shared by the API and the
CLI."""

from __future__ import annotations

import time
from typing import Any, Optional

from .health import rpo_health
from .policy import effective_policy
from .results import (DiskStatus, Hooks, ItemStatus, RunningOperation, Tracking, utc,
                      verification_summary)
from .rpo import rpo_facts
from .tracking import DEFAULT_GRANULARITY


def item_status(store: Any, name: str, *, now: Optional[float] = None) -> ItemStatus:
    """The ItemStatus of item `name` (UnknownName if it is not protected);
    `now` (epoch seconds, default: the clock) is when rpo_seconds is
    measured."""
    row = store.item(name)
    now = time.time() if now is None else now
    points = store.points(name)
    facts = rpo_facts(store, name, now=now)  # the newest undamaged point and its age
    op = store.operation(name)
    policy = effective_policy(store, name)
    return ItemStatus(
        item=name, state=row.state, direction=row.direction, health=row.health,
        group=row.grp, host=row.host, retention=row.retention,
        retention_age=row.retention_age,
        # whether hooks are set, never their command lines (they may hold a password)
        hooks=Hooks(quiesce=bool(row.quiesce_hook), thaw=bool(row.thaw_hook)),
        disks=tuple(DiskStatus(index=d.idx, source=d.source, replica=d.replica,
                               tracking=Tracking(d.tracking, d.bitmap, DEFAULT_GRANULARITY
                                                 if d.granularity is None else d.granularity)
                               if d.tracking else None)
                    for d in store.disks(name)),
        point_count=len(points),
        latest_point=facts.latest_point,
        latest_point_at=utc(facts.latest_point_at),
        rpo_seconds=facts.rpo_seconds,
        last_success_at=utc(facts.last_success_at),
        damaged_points=tuple(p.id for p in points if p.damaged),
        last_error=row.last_error,
        failed_attempts=row.attempts,
        next_retry=utc(row.next_retry),
        test_failover=row.test_dir,
        test_point=row.test_point,
        test_method=row.test_method,
        failover_point=row.failover_point,
        operation=None if op is None else RunningOperation(op["name"], op["command"],
                                                           bool(op["interrupted"])),
        verification=verification_summary(store.last_verification(name)),
        target_rpo=policy.target_rpo,
        rpo_health=rpo_health(policy, facts, row, now,
                              drill_replicated=_drill_replicated(store, name, row)),
    )


def _drill_replicated(store: Any, name: str, row: Any) -> bool:
    """Whether item `name` is in a drill that lets its replicas be written
    (pydr run goes on replicating it): its point store does not refuse
    writes under the drill."""
    if not row.test_dir:
        return False
    from ..errors import PydrError
    from .pointstores import point_store

    try:
        point_store(store, name).refuse_writes_under_drill("a replication cycle")
    except PydrError:
        return False
    return True

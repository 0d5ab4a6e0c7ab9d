"""What ``pydr status`` (and ``Vault.status``) shows of an item: a dict
built from the store's facts (its ItemRecord, DiskRecords, PointRecords
and the operation recorded on it). The store answers facts; this is their
presentation, shared by the API and the CLI."""

from .rpo import rpo_facts


def item_status(store, name):
    """The status dict of item `name` (UnknownName if it is not protected)."""
    row = store.item(name)
    points = store.points(name)
    rpo = rpo_facts(store, name)
    return {
        "item": name, "state": row.state, "direction": row.direction,
        "health": row.health, "group": row.grp, "host": row.host,
        "retention": row.retention,
        "retention_age": row.retention_age,
        # whether hooks are set, never their command lines (they may hold a password)
        "hooks": {"quiesce": bool(row.quiesce_hook), "thaw": bool(row.thaw_hook)},
        "disks": [{"source": d.source, "replica": d.replica,
                   "tracking": {"mode": d.tracking, "bitmap": d.bitmap}
                   if d.tracking else None} for d in store.disks(name)],
        "points": len(points),
        "latest_point": points[-1].id if points else None,
        # the newest undamaged point: when its data was taken, its age (pydr.dr.rpo)
        "latest_point_at": rpo.latest_point_at,
        "rpo_seconds": rpo.rpo_seconds,
        "last_success_at": rpo.last_success_at,
        "damaged_points": [p.id for p in points if p.damaged],
        "last_error": row.last_error,
        "failed_attempts": row.attempts,
        "next_retry": row.next_retry,
        "test_failover": row.test_dir,
        "test_point": row.test_point,
        "test_method": row.test_method,
        "failover_point": row.failover_point,
        "operation": store.operation(name),
    }

"""Verifying a step chain (StepChain.verify): `pydr verify ITEM` for an item
whose points are undo steps beside its replicas (a chunk index checks its
own: pydr.dr.pointstores.chunkindex).

Every step is read through and checked as a restore would read it (header,
every record and its payload hash, the COMMIT, the size the vault recorded;
pydr.engine.journal.check_step), and so is every signature cache of the
item (its whole-file checksum), and the identity of the replica (or its
baseline) against the vault's record (pydr.dr.replica_check). A damaged
step marks the points that need it: they are never restored. The replicas
themselves are read back and compared with their signature caches
(pydr.dr.scrub)."""

import os
import random

from ...engine.sigcache_any import load_any
from ...errors import Cancelled, CorruptDelta, FormatError
from ..replica_check import check_replicas
from ..scrub import scrub_item
from .steps import all_steps, check_step, steps_of


def verify_steps(vault, name, point_id=None, sample=100.0, *, events=None, cancel=None):
    """Check the item's steps (all, or those point `point_id` needs; a
    random `sample` percent of them) and its signature caches. Returns
    {"item", "points", "steps", "checked", "bytes", "size_only", "caches",
    "problems": [text], "damaged_points": [id], "replicas_scrubbed",
    "replica_bytes_read", "scrub_skipped": [text]}: steps at a remote place are
    checked by size only (the place checks their records as it restores).
    ``events`` (an Emitter) and ``cancel`` go to the replicas' scrub
    (pydr.dr.scrub.scrub_item); ``cancel`` is also asked between steps."""
    points = vault.points(name)
    if point_id is not None:
        vault.point(name, point_id)
        points = [p for p in points if p["id"] == point_id]
    steps = {}
    for d in vault.disks(name):
        for p in points:  # VaultDamaged naming the point: a step it needs is not recorded
            steps_of(vault, name, p["id"], d["idx"])
        if point_id is None:
            rows = all_steps(vault, name, d["idx"])
        else:
            rows = steps_of(vault, name, point_id, d["idx"])
        steps.update({(d["idx"], r["step"]): r for r in rows})
    keys = sorted(steps)
    if sample < 100.0 and keys:
        keys = sorted(random.sample(keys, max(1, round(len(keys) * sample / 100.0))))
    problems, checked, size_only, nbytes = [], 0, 0, 0
    for idx, number in keys:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"the verify of {name!r} cancelled", path=vault.dir)
        row = steps[(idx, number)]
        try:
            check_step(vault, name, idx, row)  # marks the points that need a damaged one
        except ConnectionError:  # a site that cannot be reached says nothing of its steps
            raise
        except (CorruptDelta, OSError) as exc:
            problems.append(f"disk {idx}, step {number}: {exc}")
        checked += 1
        nbytes += row["bytes"]
        size_only += vault.endpoint(name, row["path"]).local_path is None
    try:  # the file the steps are rolled back onto is the one they were made on
        check_replicas(vault, name)
    except (FormatError, OSError) as exc:
        problems.append(f"{exc}")
    caches = 0
    for d in vault.disks(name):
        cache = vault.cache_path(name, d["idx"])
        if not os.path.exists(cache):
            continue
        caches += 1
        try:
            load_any(cache, verify=True).close()
        except (FormatError, OSError) as exc:
            problems.append(f"disk {d['idx']}, signature cache: {exc} (the next cycle reads the "
                            "replica instead and writes it again)")
    scrubbed, scrub_bytes, scrub_problems, scrub_skipped = scrub_item(
        vault, name, sample, events=events, cancel=cancel)
    problems += scrub_problems
    damaged = [p["id"] for p in vault.points(name) if p["damaged"]]
    if point_id is not None:
        damaged = [p for p in damaged if p == point_id]
    for pid in damaged:
        reason = vault.point(name, pid)["damaged"]
        line = f"point {pid} is damaged: {reason}"
        if not any(reason in p for p in problems):  # marked by an earlier run
            problems.append(line)
    return {"item": name, "points": len(points), "steps": len(steps), "checked": checked,
            "bytes": nbytes, "size_only": size_only, "caches": caches, "problems": problems,
            "damaged_points": damaged, "replicas_scrubbed": scrubbed,
            "replica_bytes_read": scrub_bytes, "scrub_skipped": scrub_skipped}

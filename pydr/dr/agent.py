"""The part of a replication cycle that runs where an item's disks are: on
this machine for a cycle of its own, or on the item's host as a Dask task of
a fleet (pydr.dr.fleet).

It knows no vault (an import-linter contract keeps it so): a task is a
plain dict built by the coordinator, and what it returns is a small dict
that the coordinator records. Its work is idempotent, because Dask runs a
task again when the worker running it died: the replica's undo journal
makes a killed transfer resume, and of the two step specs offered for each
disk the first one a killed run committed is reported (kept == 1), so the
coordinator records each step once whether the task ran once or twice.
"""

import contextlib
import os

from ..engine import crashpoints
from ..endpoints import open_endpoint
from ..endpoints.transfer import transfer
from ..errors import HookFailed
from .hooks import run_hook

#: A Dask worker serves host NAME when it has the resource pydr-host-NAME.
RESOURCE_PREFIX = "pydr-host-"


def transfer_disk(source, replica, *, offered, cache, has_point, resync_all, extents=None,
                  progress=None, threads=None):
    """Resync `replica` from `source` (endpoints) and keep its undo journal
    at one of the `offered` step specs when the item has a point already.
    Returns (bytes moved, bytes read, kept index or None, journal bytes)."""
    if cache is not None:
        os.makedirs(os.path.dirname(cache), mode=0o700, exist_ok=True)
        if resync_all:  # compare both sides: the replica is read again, the cache rebuilt
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cache)
    st, kept = transfer(source, replica, keep_undo=offered if has_point else None,
                        signature_cache=cache, changed_extents=extents, progress=progress,
                        threads=threads)
    return st.bytes_written + st.bytes_zeroed, st.bytes_read, kept, st.journal_bytes


def steps_kept(step, offered, kept, journal_bytes):
    """[(number, spec, bytes)] to record for a disk whose next step is
    `step`: the one a killed run left, then this run's."""
    steps = []
    if kept == 1:
        steps.append((step, offered[0], 0))
    if kept is not None:
        steps.append((step + kept, offered[kept], journal_bytes))
    return steps


def worker_host():
    """The host this Dask worker serves (from its pydr-host-NAME resource),
    or None outside a worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    names = sorted(r[len(RESOURCE_PREFIX):] for r in worker.state.total_resources
                   if r.startswith(RESOURCE_PREFIX))
    return ",".join(names) or None


@contextlib.contextmanager
def item_cut(item, sources, quiesce_hook=None, thaw_hook=None):
    """The cut of one item's disks: its quiesce hook, a reflink clone of each
    source where its file system can, and the thaw hook as soon as the cut
    is taken (after the reads when there are no clones). Yields ([snapshot
    or None], cut: "reflink", "quiesce" or "none"); the clones are removed
    after."""
    snaps, frozen = [], False
    try:
        if quiesce_hook:
            run_hook(quiesce_hook, f"quiesce hook of {item!r}")
            frozen = True
        snaps = [s.snapshot() for s in sources]
        cut = "reflink" if all(snaps) else ("quiesce" if frozen else "none")
        if frozen and cut == "reflink":
            frozen = False
            run_hook(thaw_hook, f"thaw hook of {item!r}")
        yield snaps, cut
    finally:
        if frozen:
            run_hook(thaw_hook, f"thaw hook of {item!r}")
        for snap in snaps:
            if snap:
                with contextlib.suppress(OSError, HookFailed):
                    snap.remove_many([snap])


def cycle_item(task):
    """One item's cycle on its host. `task`: {"item", "vault", "rsh", "remote_pydr",
    "quiesce_hook", "thaw_hook" (None unless app-consistent), "threads",
    "disks": [{"idx", "source", "replica", "step", "offered": [spec, spec],
    "cache" (a path, or None), "has_point", "resync"}]}.

    The item's disks are cut together where their file system clones files
    (reflink), after its quiesce hook; the thaw hook runs once the cut is
    taken, or after the reads. Returns {"item", "host", "cut", "disks":
    [{"idx", "size", "moved", "read", "steps": [[number, spec, bytes]]}]}."""
    item = task["item"]
    reach = dict(rsh=task.get("rsh"), remote_pydr=task.get("remote_pydr"))
    disks = task["disks"]
    sources = [open_endpoint(d["source"], **reach) for d in disks]
    sizes = [s.size() for s in sources]
    with item_cut(item, sources, task.get("quiesce_hook"), task.get("thaw_hook")) as (snaps, cut):
        results = []
        for d, source, snap, size in zip(disks, sources, snaps, sizes):
            replica = open_endpoint(d["replica"], **reach)
            cache = d.get("cache")
            if cache is not None and not os.path.isdir(task.get("vault") or ""):
                cache = None  # the vault is not on this host: compare both sides instead
            moved, read, kept, journal = transfer_disk(
                snap or source, replica, offered=d["offered"], cache=cache,
                has_point=d["has_point"], resync_all=d["resync"], threads=task.get("threads"))
            crashpoints.reached("agent.disk")
            results.append({"idx": d["idx"], "size": size, "moved": moved, "read": read,
                            "steps": steps_kept(d["step"], d["offered"], kept, journal)})
    return {"item": item, "host": worker_host(), "cut": cut, "disks": results}

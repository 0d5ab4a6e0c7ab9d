"""Crash points: the named durable steps of every operation, where a test can
stop the process (a testing facility, documented in docs/RELIABILITY.md).

    PYDR_CRASH_AT=NAME[:N]   SIGKILL this process the Nth time (default 1st)
                             it passes NAME
    PYDR_STOP_AT=NAME[:N]    SIGSTOP it there instead (a test continues it
                             with SIGCONT): two commands at a known moment
    PYDR_CRASH_LOG=FILE      append the name of every point passed to FILE
    PYDR_CRASH_ONCE=FILE     with PYDR_CRASH_AT: only the process that creates
                             FILE (O_EXCL) is killed, so a process started
                             again (a Dask worker its Nanny restarts) is not

Unset, a point costs one attribute test. Every name passed must be in
POINTS, the registry; the crash-matrix tests reach each of them.
"""

import os

#: name -> what is durable when the process passes it
POINTS = {
    # the engine: apply and resync under the undo journal
    "journal.created": "the undo journal's header is on disk, the target untouched",
    "apply.journaled": "a batch's old contents are journaled, the batch not yet written",
    "apply.written": "a batch is written to the target",
    "apply.synced": "the whole result is on disk, the journal not yet committed",
    "apply.committed": "the journal ends in COMMIT, not yet removed or kept",
    "apply.kept": "a committed journal was kept as a recovery-point step",
    "sigcache.updating": "the target is durable, its signature cache marked being updated, "
                         "the changed blocks not yet written into it",
    "resync.cache": "the signature cache describes the new target",
    "rollback.restored": "an interrupted apply was undone, its journal still there",
    "restore.copied": "a point's disk is cloned, copied or overlaid on the latest state, steps "
                      "not rolled back",
    "restore.step": "one more undo step is rolled back onto a point's disk",
    "restore.written": "a point's disk is whole beside its destination, not yet renamed over it",
    # the vault: a replication cycle
    "cycle.cut": "every disk of a cycle is cut (cloned, fleeced or a new bitmap started), none read",
    "cycle.disk": "one disk of a cycle is replicated, its step not yet recorded",
    "cycle.steps": "one disk's steps are recorded",
    "cycle.point": "the cycle's recovery point is recorded, retention not yet applied",
    "retention.recorded": "old points and steps are dropped from the vault, files not yet",
    "retention.merged": "a thinned point's merged undo step is durable beside its newer step, "
                        "no row names it yet",
    "retention.swapped": "the merged step's row and the thinned point are recorded, the two old "
                         "step files not yet removed (doomed_files names them)",
    "cycle.done": "the cycle's job is ended",
    # a libvirt domain's cut (pydr.transport.libvirt_backup)
    "libvirt.frozen": "the guest's file systems are frozen, no backup job begun yet",
    "libvirt.backup-begun": "a pull-mode backup job and its new checkpoint are begun (the "
                            "guest thawed), nothing read or recorded",
    # a fleet: the work on an item's host, and its record by the coordinator
    "agent.disk": "a fleet task replicated one disk on its host, nothing recorded",
    "fleet.recorded": "a fleet task's steps and point are recorded, its job not yet ended",
    # a cycle to an object store
    "s3.chunk": "one more chunk is uploaded (and logged as pending), no index names it yet",
    "s3.index": "the cycle's point index is uploaded, the point not yet recorded",
    # the keys of an encrypted object store (pydr.dr.storekeys)
    "keys.created": "a new store's first key file is stored, its config not yet",
    "keys.config": "a store's config is stored: the store is made",
    "keys.added": "a key file is added (a new passphrase's, a recovery key's), the old one "
                  "not yet removed",
    "keys.removed": "a key file is removed (a changed passphrase's old key)",
    # drills
    "drill.recorded": "a drill's directory and point are recorded",
    "drill.disk": "one disk of a drill is materialised",
    "drill.cleaned": "a drill's disks are removed, the drill not yet forgotten",
    # failover, change-point, commit, reprotect, failback
    "failover.marked": "the item is failing over to a recorded point",
    "failover.baseline": "one replica is moved aside to its baseline",
    "failover.disk": "one replica path holds the point",
    "commit.marked": "the item is committing: its points are no longer to be used",
    "commit.flattened": "a qcow2 overlay's blocks are in its baseline, not yet renamed over it",
    "commit.removed": "the steps, baselines and caches are removed",
    "reprotect.swapped": "sources and replicas are swapped, the first cycle not yet run",
    "failback.cycle": "the final cycle of a failback is done",
    "failback.alternate": "one disk is brought up at its alternate path",
    "plan.group": "one group of a recovery plan is done",
    # bring-up of a machine at the recovery site (pydr.dr.bringup)
    "bringup.defined": "the recovered domain is defined and recorded, not yet started",
    "bringup.started": "the recovered domain is started, the bring-up not yet reported",
    # the server of pydr's protocol
    "server.applied": "a pushed disk is committed on the server, APPLY_OK not yet sent",
}

def _arm():
    """(action, name, n) from the environment, or None: read once, at import."""
    for var, action in (("PYDR_CRASH_AT", "kill"), ("PYDR_STOP_AT", "stop")):
        spec = os.environ.get(var)
        if spec:
            name, _, n = spec.partition(":")
            return action, name, int(n or 1)
    return ("log", None, 0) if os.environ.get("PYDR_CRASH_LOG") else None


_armed = _arm()
_counts = {}


def reached(name):
    """Mark the durable step `name` as passed (see the module's docstring)."""
    if _armed is None:
        return
    if name not in POINTS:
        raise AssertionError(f"crash point {name!r} is not in pydr.engine.crashpoints.POINTS")
    log = os.environ.get("PYDR_CRASH_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{name}\n")
    action, target, n = _armed
    if name != target:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == n:
        import signal

        once = os.environ.get("PYDR_CRASH_ONCE")
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # another process was killed here already

        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)

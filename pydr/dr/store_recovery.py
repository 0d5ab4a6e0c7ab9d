"""Recovery after a killed command, run by every command that takes the
vault's lock (pydr.dr.store.Store with ``writer=True``), before it changes
anything: jobs of dead processes fail, and committed undo journals that
were moved into the vault but not yet recorded are recorded (the replica
already moved past them). What was running stays recorded on its item:
running its command again finishes it (docs/RELIABILITY.md)."""

import os
import re

from ..errors import CorruptDelta
from . import stepdigest

STEP_FILE = re.compile(r"(\d+)-(\d+)\.undo")  # IDX-STEP.undo


def recover(store):
    """Bring the vault of `store` back to a consistent state; returns
    {item: operation} of what was running when the last writer died
    (status calls it interrupted)."""
    interrupted = store.recorded_operations()
    for job in store.unfinished_jobs():
        if job.pid is None or not _alive(job.pid):
            store.end_job(job.id, "failed", error="interrupted: the process running it is gone")
    undo_root = os.path.join(store.dir, "undo")
    for item in os.listdir(undo_root) if os.path.isdir(undo_root) else ():
        for name in os.listdir(os.path.join(undo_root, item)):
            _recover_step(store, item, name, os.path.join(undo_root, item, name))
    return interrupted


def _recover_step(store, item, name, path):
    """One file of undo/ITEM/: a step a kill left unrecorded is recorded."""
    from ..engine import journal as J

    if name.endswith(".pydr-new"):
        os.unlink(path)  # a copy into the vault that a kill interrupted
        return
    named = STEP_FILE.fullmatch(name)
    if named is None:  # not pydr's: left alone ('pydr vault check' names it)
        return
    idx, step = int(named[1]), int(named[2])
    if store.has_step(item, idx, step):
        return
    if step <= store.current_step(item, idx):
        os.unlink(path)  # one that retention dropped before a kill
        return
    # Only a committed journal is moved here (a copy from another file
    # system arrives as .pydr-new first): this one the replica moved past.
    # If it fails its checks, that is damage, not a kill: it is recorded
    # all the same (the chain stays whole) and its points are marked.
    found = None
    try:
        J.check_step(path)
        found = stepdigest.digest(path)  # the file as it is now: page cache
    except CorruptDelta as exc:
        store.mark_damaged(item, store.points_needing(item, idx, step), str(exc))
    store.add_step(item, idx, step, path, os.lstat(path).st_size, found)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

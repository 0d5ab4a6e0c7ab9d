"""The files pydr keeps beside a disk, and their names.

Every one is hidden (a leading dot) and named after the disk, in the disk's
own directory, so that moving one into place is an atomic rename:

    .NAME.pydr-undo      the undo journal of an apply or resync in progress
    .NAME.pydr-base      a failover's baseline: the latest replicated state
    .NAME.pydr-new       a disk being materialised, renamed over NAME when whole
    .NAME.pydr-snap      a reflink snapshot taken for a replication cycle's cut
    .NAME.pydr-steps/    recovery-point steps kept beside a replica on another host

The server of pydr's protocol allows renames and removals of these files
only (pydr.transport.server), so they are named in one place.
"""

import os

UNDO, BASE, NEW, SNAP, STEPS = ".pydr-undo", ".pydr-base", ".pydr-new", ".pydr-snap", ".pydr-steps"


def beside(path, suffix):
    """The hidden file `suffix` of the disk at `path`, in its directory."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}{suffix}")


def baseline(path):
    """Where a failover keeps the replica's latest state."""
    return beside(path, BASE)


def latest_state(path):
    """The file holding a disk's latest replicated state: its failover
    baseline when there is one, else the disk itself."""
    base = baseline(path)
    return base if os.path.exists(base) else path


def step(replica, item, idx, number):
    """A recovery-point step kept beside a replica (on a host that is not
    the vault's)."""
    return os.path.join(beside(replica, STEPS), f"{item}-{idx}-{number}.undo")


def is_step(path):
    parent = os.path.basename(os.path.dirname(path))
    return path.endswith(".undo") and parent.startswith(".") and parent.endswith(STEPS)


def is_sidecar(path):
    """A file pydr makes beside a replica and may remove: a step, a
    baseline or a half-made disk."""
    name = os.path.basename(path)
    return is_step(path) or (name.startswith(".") and name.endswith((BASE, NEW)))


def is_failover_rename(src, dst):
    """The two renames of a failover: REPLICA -> .REPLICA.pydr-base, and
    .REPLICA.pydr-new -> REPLICA, in one directory."""
    head, tail = os.path.split(dst)
    shead, stail = os.path.split(src)
    return shead == head and (tail == f".{stail}{BASE}" or stail == f".{tail}{NEW}")


#: The owner file of a replica: the vault and item that write it
#: (pydr.dr.ownership).
OWNER = ".pydr-owner"

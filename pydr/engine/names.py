"""The files pydr keeps beside a disk, and their names.

Every one is hidden (a leading dot) and named after the disk, in the disk's
own directory, so that moving one into place is an atomic rename:

    .NAME.pydr-undo      the undo journal of an apply or resync in progress
                         (in journal_dir() for a block device or an NBD export)
    .NAME.pydr-base      a failover's baseline: the latest replicated state
    .NAME.pydr-new       a disk being materialised, renamed over NAME when whole
    .NAME.pydr-snap      a reflink snapshot taken for a replication cycle's cut
    .NAME.pydr-steps/    recovery-point steps kept beside a replica on another host

The server of pydr's protocol allows renames and removals of these files
only (pydr.transport.server), so they are named in one place.
"""

import os
import stat

UNDO, BASE, NEW, SNAP, STEPS = ".pydr-undo", ".pydr-base", ".pydr-new", ".pydr-snap", ".pydr-steps"
JOURNAL_DIR = "/var/lib/pydr/journal"


def beside(path, suffix):
    """The hidden file `suffix` of the disk at `path`, in its directory."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}{suffix}")


def journal_dir():
    """Where the undo journals of disks without a directory of their own
    live (block devices, NBD exports), and of every disk when
    $PYDR_JOURNAL_DIR is set: that directory, or /var/lib/pydr/journal."""
    return os.environ.get("PYDR_JOURNAL_DIR") or JOURNAL_DIR


def journal(path):
    """Where the undo journal of an apply to the disk at `path` lives:
    beside it (.NAME.pydr-undo); for a block device, and for every disk when
    $PYDR_JOURNAL_DIR is set, in journal_dir(), named after its real path."""
    target = os.path.realpath(os.fspath(path))
    try:
        is_block = stat.S_ISBLK(os.stat(target).st_mode)
    except OSError:
        is_block = False
    if is_block or os.environ.get("PYDR_JOURNAL_DIR"):
        return os.path.join(journal_dir(), target.strip("/").replace("/", "_") + UNDO)
    return beside(target, UNDO)


def export_journal(name):
    """Where the undo journal of an apply to the NBD export named `name`
    lives: in journal_dir()."""
    import re  # ~3 ms that `import pydr` need not pay

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    return os.path.join(journal_dir(), safe + UNDO)


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

"""A disk as it was at a recovery point: the latest state, with the newer
undo steps (reverse deltas) rolled back onto it, newest first.

The latest state is cloned (reflink) where the file system can, so the cost
is what changed since the point; elsewhere it is copied (sparse-aware), and
the cost is the disk. pydr.transport.qemu makes the third kind, a qcow2
overlay on the latest state."""

import contextlib
import os

from ..errors import InvalidState, UnsupportedFile
from . import crashpoints
from . import journal as J
from . import names
from .atomic import check_safe_dir, fsync_dir
from .clone import clone_file
from .oserrors import naming
from .resync import resync

METHODS = ("auto", "reflink", "copy")


def check_steps(steps):
    """Every step must be a whole, committed undo journal, every record and
    payload checked (journal.check_step): raises DamagedJournal (exit 7)
    naming the step and the offset, before anything is written. Returns
    what each step holds (journal.JournalScan, in the order of `steps`), so
    that rolling them back does not read them through again."""
    return [J.scan(path, step=True) for path in steps]


def materialize_file(source, steps, dest, threads=None, *, method="auto", progress=None,
                     cancel=None):
    """Write `source` with the undo journals `steps` rolled back onto it,
    newest first, to `dest`; returns the method used: "reflink" (a clone of
    `source`, then only the steps written) or "copy". ``method`` "auto"
    clones where it can and copies elsewhere; "reflink" refuses where the
    file system cannot clone; "copy" always copies (``progress`` gets its
    records; a set ``cancel`` event stops it with Cancelled).

    It is made beside `dest` (.NAME.pydr-new) and renamed over it when
    whole, so `dest` is only ever the old file or the point; a half-made one
    is removed on an error, and replaced by the next run after a kill."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    if os.path.exists(dest) and os.path.samefile(dest, source):
        raise InvalidState("refusing to materialise over the replicated state itself", path=dest)
    scans = check_steps(steps)
    check_safe_dir(os.path.dirname(os.path.abspath(dest)))
    tmp = names.beside(dest, names.NEW)
    remove_leftovers(tmp)  # of a run that was killed
    try:
        used = "copy"
        if method != "copy" and clone_file(source, tmp):
            used = "reflink"
        elif method == "reflink":
            raise UnsupportedFile(f"the file system cannot clone {source} into "
                                  f"{os.path.dirname(dest) or '.'} (reflink needs XFS with "
                                  "reflink=1 or btrfs, and both in one file system); leave out "
                                  "--reflink to copy instead", path=dest)
        else:
            resync(source, tmp, threads=threads, progress=progress,  # sparse-aware
                   cancel=cancel)
        crashpoints.reached("restore.copied")
        fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
        try:
            for path, found in zip(steps, scans):  # newest first: each takes it one cycle back
                # checked above; each payload again as it is written; synced once, by install
                J.rollback_fd(fd, path, tmp, False, step=True, found=found, sync=False)
                crashpoints.reached("restore.step")
            install(tmp, dest, fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            remove_leftovers(tmp)
        raise
    return used


def install(tmp, dest, fd=None):
    """Put a point's disk, made whole at `tmp`, at `dest`: fsync it (`fd`,
    or opened here), then rename it over `dest` and fsync the directory. A
    kill before the rename leaves `dest` as it was."""
    with naming(dest):  # a full disk (fsync writes back) names the disk being made
        if fd is None:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            os.fsync(fd)
    crashpoints.reached("restore.written")
    os.replace(tmp, dest)
    fsync_dir(dest)


def remove_leftovers(tmp):
    for leftover in (tmp, J.journal_path(tmp)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)

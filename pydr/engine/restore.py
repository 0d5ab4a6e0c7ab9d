"""A disk as it was at a recovery point: the latest state, copied, with the
newer undo steps (reverse deltas) rolled back onto the copy, newest first.
The cost is the copy plus what changed since the point."""

import contextlib
import os

from ..errors import InvalidState, PydrError
from . import journal as J
from .resync import resync


def materialize_file(source, steps, dest, threads=None):
    """Copy `source` to `dest` (replaced; sparse-aware) and roll the undo
    journals `steps` back onto the copy, newest first. On any error `dest`
    is removed, so no half-made disk is mistaken for the point."""
    if os.path.exists(dest) and os.path.samefile(dest, source):
        raise InvalidState("refusing to materialise over the replicated state itself", path=dest)
    if os.path.lexists(dest):
        os.unlink(dest)
    try:
        resync(source, dest, threads=threads)  # sparse-aware copy of the latest state
        fd = os.open(dest, os.O_RDWR | os.O_CLOEXEC)
        try:
            for path in steps:  # newest first: each takes the copy one cycle back
                header, committed = J.read_journal(path)
                if header is None or not committed:
                    raise PydrError("undo step is damaged", path=path)
                J.rollback_fd(fd, path, dest, False)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(dest)
        raise
    return dest

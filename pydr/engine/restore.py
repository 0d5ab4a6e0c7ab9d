"""A disk as it was at a recovery point: the latest state, copied, with the
newer undo steps (reverse deltas) rolled back onto the copy, newest first.
The cost is the copy plus what changed since the point."""

import contextlib
import os

from ..errors import InvalidState, PydrError
from . import crashpoints
from . import journal as J
from . import names
from .atomic import fsync_dir
from .resync import resync


def materialize_file(source, steps, dest, threads=None):
    """Write `source` with the undo journals `steps` rolled back onto it,
    newest first, to `dest`. It is made beside `dest` (.NAME.pydr-new) and
    renamed over it when whole, so `dest` is only ever the old file or the
    point; a half-made one is removed on an error, and replaced by the next
    run after a kill."""
    if os.path.exists(dest) and os.path.samefile(dest, source):
        raise InvalidState("refusing to materialise over the replicated state itself", path=dest)
    tmp = names.beside(dest, names.NEW)
    for leftover in (tmp, J.journal_path(tmp)):  # of a run that was killed
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    try:
        resync(source, tmp, threads=threads)  # sparse-aware copy of the latest state
        crashpoints.reached("restore.copied")
        fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
        try:
            for path in steps:  # newest first: each takes the copy one cycle back
                header, committed = J.read_journal(path)
                if header is None or not committed:
                    raise PydrError("undo step is damaged", path=path)
                J.rollback_fd(fd, path, tmp, False)
                crashpoints.reached("restore.step")
            os.fsync(fd)
        finally:
            os.close(fd)
        crashpoints.reached("restore.written")
        os.replace(tmp, dest)
        fsync_dir(dest)
    except BaseException:
        for leftover in (tmp, J.journal_path(tmp)):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        raise
    return dest

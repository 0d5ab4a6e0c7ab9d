"""The digest of a recovery-point step: the vault records it with the step
(``steps.digest``) and checks it wherever the step is read whole, so that a
step swapped for another valid one (another disk's, a neighbour, a symlink
to one) is damage, not another state restored.

The digest is BLAKE2b-128 (hex) of the whole file as recorded. A step is
opened without following links: a symlink in place of a step is damage."""

import errno
import hashlib
import os
import stat

from ..errors import DamagedJournal

_CHUNK = 1 << 20


def digest(path):
    """The hex digest of the step file `path`; DamagedJournal for a file
    that is not a regular file (a symlink, a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DamagedJournal("undo step is damaged: it is a symlink, not a step file",
                                 path=os.fspath(path), offset=0) from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DamagedJournal("undo step is damaged: it is not a regular file",
                                 path=os.fspath(path), offset=0)
        h = hashlib.blake2b(digest_size=16)
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check(path, recorded):
    """Raise DamagedJournal unless the step at `path` has the `recorded`
    digest (None: recorded before digests, or kept on another host: only a
    symlink is refused)."""
    found = digest(path)
    if recorded is not None and found != recorded:
        raise DamagedJournal(f"undo step is damaged: its contents are not the step the vault "
                             f"recorded (digest {found}, recorded {recorded}): another file "
                             "in its place", path=os.fspath(path), offset=0)

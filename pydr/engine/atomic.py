"""Crash-safe file replacement: temp file, fsync, rename, fsync directory."""

import contextlib
import os


@contextlib.contextmanager
def atomic_write(path):
    """Yield a binary file; on success it atomically replaces ``path``.

    On any error the temp file is removed and ``path`` is left as it was.
    """
    import tempfile  # lazily: 4 ms of start-up for every command otherwise

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".pydr-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

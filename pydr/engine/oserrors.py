"""OSErrors that say which file: calls on a file descriptor (os.write,
os.fsync, os.ftruncate, ...) raise them without a name, and "No space left
on device" alone does not tell an operator which disk is full."""

import contextlib
import os


@contextlib.contextmanager
def naming(path):
    """Inside, an OSError that names no file names `path`."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            exc.filename = os.fspath(path)
        raise


class NamedFile:
    """A binary file object (``os.fdopen``'s names only its fd) whose
    failing writes name `path`; reads and the rest pass through."""

    def __init__(self, f, path):
        self._f, self.path = f, os.fspath(path)

    def write(self, data):
        with naming(self.path):
            return self._f.write(data)

    def flush(self):
        with naming(self.path):
            self._f.flush()

    def __getattr__(self, name):
        return getattr(self._f, name)

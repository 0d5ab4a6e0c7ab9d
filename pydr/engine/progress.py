"""Progress records passed to ``progress=`` callbacks, and their throttling."""

from __future__ import annotations

import time

# Callbacks are called at most this often (plus once at the end).
REPORT_INTERVAL = 0.1


class Record:
    """A small immutable record (dataclasses would cost 16 ms of start-up)."""

    __slots__ = ()
    _fields = ()

    def __init__(self, *args, **kwargs):
        values = dict(zip(self._fields, args), **kwargs)
        for name in self._fields:
            object.__setattr__(self, name, values.get(name, getattr(type(self), "_default_" + name, None)))

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, f) == getattr(other, f) for f in self._fields)

    __hash__ = None

    def _asdict(self):
        return {f: getattr(self, f) for f in self._fields}

    def __reduce__(self):  # read-only slots: pickled (to a worker, a process pool) by value
        return type(self), tuple(getattr(self, f) for f in self._fields)

    def __repr__(self):
        body = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({body})"


class ProgressRecord(Record):
    """What a long operation has done so far: what a ``progress=`` callback
    is called with, about 10 times a second and once at the end. Read-only.

    Attributes:
        operation: What is running: ``"signature"``, ``"resync"``,
            ``"apply"``, ...
        path: The disk it works on.
        done_bytes: Bytes of ``total_bytes`` covered so far (holes included).
        total_bytes: Bytes the operation covers in all.
        read_bytes: Bytes actually read from disk (holes are not read).
        elapsed: Seconds since the operation started.
        finished: True in the last record of the operation.
    """

    _fields = ("operation", "path", "done_bytes", "total_bytes", "read_bytes",
               "elapsed", "finished")
    __slots__ = _fields
    _default_finished = False
    operation: str
    path: str
    done_bytes: int
    total_bytes: int
    read_bytes: int
    elapsed: float
    finished: bool

    @property
    def fraction(self) -> float:
        """``done_bytes / total_bytes`` (1.0 for an empty disk)."""
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0

    @property
    def bytes_per_second(self) -> float:
        """The speed so far in bytes per second, ``done_bytes / elapsed``
        (0.0 at the start)."""
        return self.done_bytes / self.elapsed if self.elapsed > 0 else 0.0


class Throttle:
    """Calls ``callback`` with a record at most every REPORT_INTERVAL seconds."""

    def __init__(self, callback, operation, path, total_bytes):
        self.callback = callback
        self.operation = operation
        self.path = str(path)
        self.total = total_bytes
        self.start = time.monotonic()
        self.last = None

    def report(self, done, read, finished=False):
        if self.callback is None:
            return
        now = time.monotonic()
        if not finished and self.last is not None and now - self.last < REPORT_INTERVAL:
            return
        self.last = now
        self.callback(
            ProgressRecord(
                self.operation, self.path, done, self.total, read,
                now - self.start, finished,
            )
        )

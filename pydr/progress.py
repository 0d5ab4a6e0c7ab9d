"""Progress records passed to ``progress=`` callbacks, and their throttling."""

import time
from dataclasses import dataclass

# Callbacks are called at most this often (plus once at the end).
REPORT_INTERVAL = 0.1


@dataclass(frozen=True)
class ProgressRecord:
    """What a long operation has done so far.

    ``done_bytes`` of ``total_bytes`` are covered (holes included);
    ``read_bytes`` were actually read from disk; ``elapsed`` is in seconds.
    """

    operation: str
    path: str
    done_bytes: int
    total_bytes: int
    read_bytes: int
    elapsed: float
    finished: bool = False

    @property
    def fraction(self):
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0

    @property
    def bytes_per_second(self):
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

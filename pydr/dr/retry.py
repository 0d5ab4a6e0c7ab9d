"""Retry policy for replication: when to try again after an error.

Recoverable errors (I/O hiccups, no space, lost connections, timeouts) are
retried at 1, 2, 4, 8 and 10 minutes after the first attempt, then every 30
minutes. Anything else (a vanished disk, permissions, a broken journal chain,
an invalid state, ...) stops at once: the item's health is critical until an
operator acts. The clock and the sleep are injectable for tests.
"""

import errno
import time

from ..errors import Cancelled, PydrError

#: Seconds after the first attempt at which attempts 2..6 start.
SCHEDULE = (60, 120, 240, 480, 600)
#: Then one more attempt every this many seconds.
EVERY = 1800

_RECOVERABLE_ERRNOS = {errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.ETIMEDOUT,
                       errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                       errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EBUSY}


def recoverable(exc):
    """Whether an error is worth retrying without an operator (a cycle of
    several items: whether one of the items that failed is). A cancel or
    Ctrl-C never is, whatever the other items of its call did."""
    if isinstance(exc, Cancelled) or not isinstance(exc, Exception):
        return False
    failed = getattr(getattr(exc, "result", None), "failed", None)
    if failed is not None and isinstance(exc, PydrError):
        return any(o.recoverable for o in failed)
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, PydrError):
        return exc.errno in _RECOVERABLE_ERRNOS
    return False


def attempt_offset(n):
    """Seconds after the first attempt at which attempt n (0-based) starts."""
    if n == 0:
        return 0
    if n <= len(SCHEDULE):
        return SCHEDULE[n - 1]
    return SCHEDULE[-1] + EVERY * (n - len(SCHEDULE))


class RetryPolicy:
    """Runs a callable until it succeeds, retrying recoverable errors on the
    schedule. ``on_retry(attempt, when, exc)`` is told of every scheduled
    retry (the vault records it); ``max_attempts`` bounds the total.
    ``cancel`` (a threading.Event): once set, no attempt starts and a wait
    for one ends with Cancelled."""

    def __init__(self, *, clock=time.time, sleep=time.sleep, max_attempts=None, on_retry=None,
                 cancel=None):
        self.clock, self.sleep = clock, sleep
        self.max_attempts = max_attempts
        self.on_retry = on_retry
        self.cancel = cancel

    def _wait(self, seconds):
        """Sleep `seconds`, or until `cancel` is set (then Cancelled)."""
        if self.cancel is None:
            self.sleep(seconds)
        elif self.sleep is time.sleep:
            self.cancel.wait(seconds)
        else:  # an injected clock's sleep (tests): cancel is asked after it
            self.sleep(seconds)
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the retries were cancelled")

    def run(self, fn):
        first = self.clock()
        n = 0
        while True:
            try:
                return fn()
            except BaseException as exc:
                n += 1
                if not recoverable(exc) or (self.max_attempts is not None and n >= self.max_attempts):
                    raise
                when = first + attempt_offset(n)
                if self.on_retry is not None:
                    self.on_retry(n, when, exc)
                self._wait(max(0.0, when - self.clock()))

"""Run a C call over disjoint chunks of a range on N threads.

The C core is reentrant and cffi releases the GIL around each call, so plain
Python threads give real parallelism; the main thread only polls progress and
cancellation. Chunks are handed out in order from a shared counter, so work
stays balanced even when some chunks are holes (free) and others are data.
"""

import itertools
import os
import threading

from ..errors import Cancelled

POLL_INTERVAL = 0.05
#: A long operation looks at its ``cancel`` event (and gives progress a
#: chance) at least every this many bytes of data handled per thread: a set
#: event stops it within about this much I/O, or within POLL_INTERVAL when
#: one piece takes longer (a slow device).
CANCEL_BYTES = 16 << 20


def check_cancel(cancel, path=None):
    """Raise :class:`pydr.errors.Cancelled` if the ``cancel`` event is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled", path=path)


def default_threads():
    """Threads used when the caller passes ``threads=None``."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def check_threads(threads):
    if threads is None:
        return default_threads()
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, not {threads!r}")
    return threads


def run_chunks(nchunks, threads, make_worker_state, do_chunk, progress, throttle,
               cancel=None, final_report=True):
    """Call ``do_chunk(state, i)`` for i in range(nchunks) on ``threads`` threads.

    ``make_worker_state()`` gives each thread its own state (e.g. a C signer).
    ``progress`` is the shared C progress record; ``throttle`` reports it. A
    set ``cancel`` event (or Ctrl-C in the main thread) stops every worker
    within one I/O buffer and raises :class:`pydr.errors.Cancelled`: set by
    the progress callback itself, at once; by another thread, within
    POLL_INTERVAL (a ``do_chunk`` that also looks at ``cancel`` itself, as
    sign_range's does per CANCEL_BYTES, stops sooner). The first real error
    of any worker is re-raised here.
    """
    counter = itertools.count()  # next() is atomic under the GIL
    errors = []
    count = max(1, min(threads, nchunks))
    done = [threading.Event() for _ in range(count)]

    def worker(k):
        try:
            work()
        finally:
            done[k].set()

    def work():
        try:
            state = make_worker_state()
            try:
                while not errors:
                    i = next(counter)
                    if i >= nchunks:
                        return
                    do_chunk(state, i)
            finally:
                close = getattr(state, "close", None)
                if close:
                    close()
        except BaseException as exc:  # handed to the main thread below
            errors.append(exc)
            progress.request_cancel()

    pool = [threading.Thread(target=worker, args=(k,), name=f"pydr-worker-{k}", daemon=True)
            for k in range(count)]
    if cancel is not None and cancel.is_set():
        progress.request_cancel()

    def tick():
        throttle.report(progress.done, progress.read)
        # after the report: a callback that sets the event stops the workers now
        if cancel is not None and cancel.is_set():
            progress.request_cancel()

    tick()  # a first record before any read: a caller sees the start, whatever the load
    try:
        start_all(pool, done, progress.request_cancel)
        wait_all(done, tick, progress.request_cancel)
    except KeyboardInterrupt as exc:
        progress.request_cancel()  # Ctrl-C between the two: the workers still finish first
        wait_all(done, lambda: None, progress.request_cancel)
        raise Cancelled("interrupted", path=throttle.path) from exc
    real = [e for e in errors if not isinstance(e, Cancelled)]
    if real:
        raise real[0]
    if errors:
        raise Cancelled("cancelled", path=throttle.path)
    if final_report:
        throttle.report(progress.done, progress.read, finished=True)


def start_all(pool, done, stop):
    """Start the threads of `pool`. Ctrl-C part-way stops the ones started
    (``stop()``), marks the others done, waits for all, and is re-raised."""
    for k, t in enumerate(pool):
        try:
            t.start()
        except KeyboardInterrupt:
            stop()
            for ev in done[k:]:
                ev.set()
            wait_all(done, lambda: None, stop)
            raise


def wait_all(done, tick, stop):
    """Wait until every worker has set its event in `done`, calling tick()
    every POLL_INTERVAL. Ctrl-C calls stop() (the workers then stop within
    one buffer) and still waits for every worker -- they write into buffers
    and read files that the caller frees and closes -- before it is raised.

    It waits on events, not Thread.join(): a join interrupted by Ctrl-C may
    leave a thread that still runs marked as stopped (CPython before 3.13),
    and freeing its buffers then crashed pydr (SIGSEGV) under load."""
    interrupted = None
    for ev in done:
        while True:
            try:
                if ev.wait(POLL_INTERVAL):
                    break
                if interrupted is None:
                    tick()
            except KeyboardInterrupt as exc:
                interrupted = interrupted or exc
                stop()
    if interrupted is not None:
        raise interrupted

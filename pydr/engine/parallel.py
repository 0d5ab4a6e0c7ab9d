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
    within one I/O buffer and raises :class:`pydr.errors.Cancelled`. The first
    real error of any worker is re-raised here.
    """
    counter = itertools.count()  # next() is atomic under the GIL
    errors = []

    def worker():
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

    pool = [
        threading.Thread(target=worker, name=f"pydr-worker-{k}", daemon=True)
        for k in range(max(1, min(threads, nchunks)))
    ]
    if cancel is not None and cancel.is_set():
        progress.request_cancel()
    for t in pool:
        t.start()
    interrupted = None
    try:
        for t in pool:
            while t.is_alive():
                t.join(POLL_INTERVAL)
                if cancel is not None and cancel.is_set():
                    progress.request_cancel()
                throttle.report(progress.done, progress.read)
    except KeyboardInterrupt as exc:
        interrupted = exc
        progress.request_cancel()
        for t in pool:
            t.join()
    if interrupted is not None:
        raise Cancelled("interrupted", path=throttle.path) from interrupted
    real = [e for e in errors if not isinstance(e, Cancelled)]
    if real:
        raise real[0]
    if errors:
        raise Cancelled("cancelled", path=throttle.path)
    if final_report:
        throttle.report(progress.done, progress.read, finished=True)

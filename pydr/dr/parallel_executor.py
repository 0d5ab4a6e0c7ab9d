"""ParallelExecutor: an executor of the cycle driver (pydr.dr.cycle) that
runs up to ``jobs`` units' work at once, the vault staying on the calling
thread (a Vault is used from the thread that opened it).

A unit of one item whose capture splits as a fleet's does (pydr.dr.fleet:
``task(vault, name, opts) -> (function, plain dict)`` built here,
``adopt(vault, name, result)`` recorded here) has its function run on a
thread of a pool; the driver records it here as soon as it is back. A unit
that cannot be split that way runs on the calling thread, while the pool
works (so does every unit of a call of one unit, or with ``jobs`` 1: as
``pydr replicate``): a group's members (cut together, one instant: a task per member
would cut each at its own time), a capture without ``task`` (an object
store's chunks), and every unit when the call carries warm state
(``opts.warm``: what pydr.dr.warm keeps lives with the calling thread's
capture; warm cycles are cheap).

Cancel (``opts.cancel``): the units whose work has not begun never run
(they end "cancelled"); the work already running on a thread cannot be
interrupted there: it runs to its end and is recorded.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, Dict, List

from ..errors import Cancelled, InvalidArgument
from .cycle import LocalExecutor
from .events import Emitter, check_cancel

# seconds between looks at `cancel` while the pool works
_CANCEL_LOOK = 0.2


class ParallelExecutor(LocalExecutor):
    """Runs the work of up to `jobs` units at once (see
    pydr.dr.parallel_executor).

    Args:
        jobs: how many units' work may run at the same time (>= 1).

    Raises:
        InvalidArgument: `jobs` is not an int >= 1.
    """

    def __init__(self, jobs: int = 2) -> None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise InvalidArgument(f"jobs must be an int >= 1, not {jobs!r}")
        self.jobs = jobs

    @staticmethod
    def splits(unit: Any, opts: Any) -> bool:
        """Whether `unit`'s work may run on a pool thread (see the module)."""
        return (len(unit.names) == 1 and getattr(opts, "warm", None) is None
                and hasattr(unit.capture, "task") and hasattr(unit.capture, "adopt"))

    def run(self, vault: Any, units: List[Any], opts: Any,
            finish: Callable[..., None]) -> None:
        """Capture each unit and hand its outcome to `finish` (the driver
        records it), up to `jobs` at once.

        Raises:
            Cancelled: `opts.cancel` was set before a unit run here began
                (the driver ends the others as a kill leaves them).
        """
        pooled = [u for u in units if self.splits(u, opts)]
        here = [u for u in units if u not in pooled]
        if self.jobs < 2 or len(units) < 2 or not pooled:  # nothing to run beside another
            super().run(vault, units, opts, finish)
            return
        em = Emitter(opts.events, "replicate")
        with concurrent.futures.ThreadPoolExecutor(self.jobs - 1 if here else self.jobs,
                                                   thread_name_prefix="pydr-cycle") as pool:
            running: Dict[concurrent.futures.Future, Any] = {}
            for unit in pooled:
                check_cancel(opts.cancel, "the replication cycle")  # the rest: not started
                unit.started = True
                name = unit.names[0]
                try:  # its job is running from here: its replica is being written
                    fn, argument = unit.capture.task(vault, name, opts)
                except Exception as exc:
                    finish(unit, error=exc)
                    continue
                vault.update_job(unit.jobs[name], state="running", started=time.time())
                running[pool.submit(fn, argument)] = unit
            try:
                super().run(vault, here, opts, finish)  # on this thread, while the pool works
            finally:
                self._collect(vault, running, opts, finish, em)

    def _collect(self, vault: Any, running: Dict[concurrent.futures.Future, Any], opts: Any,
                 finish: Callable[..., None], em: Emitter) -> None:
        """Record each pooled unit as its work comes back; after a cancel,
        the ones not begun end cancelled."""
        cancel = opts.cancel
        while running:
            done, _ = concurrent.futures.wait(
                list(running), timeout=_CANCEL_LOOK if cancel is not None else None,
                return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                unit = running.pop(f)
                name = unit.names[0]
                error, captured = None, None
                try:
                    captured = unit.capture.adopt(vault, name, f.result())
                except Exception as exc:  # its work failed, or what it returned cannot be recorded
                    error = exc
                    if hasattr(unit.capture, "failed"):  # what it found, as the vault says it
                        unit.capture.failed(vault, name, exc)
                else:
                    _disks_back(em.for_item(name, unit.jobs.get(name)), vault, name, f.result())
                finish(unit, captured, error)
            if cancel is not None and cancel.is_set():
                for f in [f for f in running if f.cancel()]:  # not begun: never runs
                    unit = running.pop(f)
                    finish(unit, error=Cancelled("the replication cycle was cancelled before "
                                                 f"{unit.names[0]}'s work began",
                                                 path=vault.dir))


def _disks_back(em: Emitter, vault: Any, name: str, result: Any) -> None:
    """A "progress" Event in phase "transfer" for each disk the work reports
    (its size compared), named by its replica."""
    replicas = {d["idx"]: d["replica"] for d in vault.disks(name)}
    for d in result.get("disks", ()) if isinstance(result, dict) else ():
        if isinstance(d, dict) and "idx" in d and "size" in d:
            em.emit("progress", disk=d["idx"], phase="transfer", bytes_done=d["size"],
                    bytes_total=d["size"], path=replicas.get(d["idx"]))

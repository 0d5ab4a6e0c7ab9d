"""Retention tiers: which recovery points a short RPO keeps, in the manner
of sanoid, restic's --keep-* and Zerto's journal: every point of the last
`within` seconds, then the newest point of each of the last `hourly` clock
hours, `daily` days, `weekly` ISO weeks and `monthly` calendar months (UTC).
The newest point always stays. A point the tiers let go is thinned: its
record goes and its undo step is merged into its newer neighbour's
(pydr.dr.stepmerge), so the points kept stay exact and the space of the
ones let go is freed."""

from __future__ import annotations

import datetime
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, Optional, Set, Tuple

from ..errors import InvalidArgument

#: the tiers that keep one point per period, and their sizes in a policy
PERIODS = ("hourly", "daily", "weekly", "monthly")
_MAX_COUNT = 100_000


@dataclass(frozen=True)
class Tiers:
    """How many points of each age an item keeps (see the module's docstring).

    within: seconds: every point whose data is newer than this stays (None: none).
    hourly, daily, weekly, monthly: how many periods keep their newest point.
    """

    within: Optional[float] = None
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def to_dict(self) -> Dict[str, Any]:
        """The tiers as JSON-ready values (the policies table keeps this)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> Tiers:
        """The tiers `data` (from :meth:`to_dict`) describe; InvalidArgument
        for anything else."""
        if not isinstance(data, dict) or set(data) - {"within", *PERIODS}:
            raise InvalidArgument(f"not retention tiers: {data!r}")
        return parse_keep(**data)

    def describe(self) -> str:
        """For a person: "all of 30m, 24 hourly, 30 daily"."""
        parts = [] if self.within is None else [f"all of {self.within:g} s"]
        parts += [f"{getattr(self, p)} {p}" for p in PERIODS if getattr(self, p)]
        return ", ".join(parts) or "the newest point only"


def parse_keep(within: Optional[float] = None, hourly: int = 0, daily: int = 0,
               weekly: int = 0, monthly: int = 0) -> Tiers:
    """Tiers from their values, checked: `within` seconds > 0 (or None),
    each count an int from 0 to 100000; InvalidArgument otherwise."""
    if within is not None and (isinstance(within, bool) or not isinstance(within, (int, float))
                               or not math.isfinite(within) or within <= 0):
        raise InvalidArgument(f"--keep-within must be a duration > 0, not {within!r}")
    counts = {"hourly": hourly, "daily": daily, "weekly": weekly, "monthly": monthly}
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= _MAX_COUNT:
            raise InvalidArgument(f"--keep-{name} must be a count from 0 to {_MAX_COUNT}, "
                                  f"not {n!r}")
    return Tiers(None if within is None else float(within), **counts)


def _period(when: float, period: str) -> Tuple[int, ...]:
    """The UTC clock period (hour, day, ISO week, month) `when` falls in."""
    t = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    if period == "hourly":
        return (t.year, t.month, t.day, t.hour)
    if period == "daily":
        return (t.year, t.month, t.day)
    if period == "weekly":
        return tuple(t.isocalendar()[:2])
    return (t.year, t.month)


def points_to_keep(points: Iterable[Tuple[int, float]], tiers: Tiers, now: float) -> Set[int]:
    """The ids of `points` ((id, data time in epoch seconds), any order)
    that `tiers` keep at `now`: every point newer than ``now - within``, and
    for each period the newest point of each of the `n` most recent periods
    that have one -- restic's rule, so that a gap (a site down for a day)
    does not use up the tier. The newest point always stays."""
    points = sorted(points, key=lambda p: (p[1], p[0]))
    if not points:
        return set()
    keep = {points[-1][0]}
    if tiers.within is not None:
        keep |= {pid for pid, at in points if at >= now - tiers.within}
    for period in PERIODS:
        wanted = getattr(tiers, period)
        seen = set()
        for pid, at in reversed(points):  # newest first: each period's newest point
            if len(seen) >= wanted:
                break
            key = _period(at, period)
            if key not in seen:
                seen.add(key)
                keep.add(pid)
    return keep

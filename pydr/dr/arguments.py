"""Arguments checked at the door: what a caller of the vault API gives is
checked before anything is read or written, and refused with
:class:`pydr.errors.InvalidArgument` naming what was given and what was
expected -- never a TypeError or KeyError from deep inside."""

from __future__ import annotations

import math
import os
from datetime import datetime
from typing import Any, Iterable, List, Mapping, Optional, Union

from ..errors import InvalidArgument

#: the states a job can be in (JobInfo.state)
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
#: how test_failover, failover and materialize can make disks
METHODS = ("auto", "reflink", "copy", "qcow2")
MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger id names nothing


def directory(value: Any, what: str = "directory") -> str:
    """`value` as a str path: a non-empty str or os.PathLike naming a str.
    `what` names the argument in the refusal ("the vault's directory")."""
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if isinstance(path, str) and path:
            return path
    raise InvalidArgument(f"{what} must be a path (a non-empty str or os.PathLike), "
                          f"not {value!r}")


def epoch(when: Union[datetime, float, int, None]) -> Optional[float]:
    """`since` as epoch seconds; InvalidArgument for anything but None, a
    tz-aware datetime or a finite number."""
    if when is None:
        return None
    if isinstance(when, (int, float)) and not isinstance(when, bool):
        if not math.isfinite(when):
            raise InvalidArgument(f"since={when!r} is not a time: give a tz-aware datetime "
                                  "or epoch seconds")
        return float(when)
    if not isinstance(when, datetime):
        raise InvalidArgument(f"since must be a tz-aware datetime or epoch seconds, "
                              f"not {when!r}")
    if when.tzinfo is None:
        raise InvalidArgument(f"since={when!r} has no time zone: give a tz-aware datetime "
                              "or epoch seconds")
    return when.timestamp()


def job_states(state: Any) -> Optional[List[str]]:
    """Vault.jobs' `state` (None, a state or a collection of states) as a
    list of JOB_STATES, or None; InvalidArgument for anything else."""
    if state is None:
        return None
    states = [state] if isinstance(state, str) else (
        list(state) if isinstance(state, Iterable) else [state])
    if not states or any(not isinstance(s, str) or s not in JOB_STATES for s in states):
        raise InvalidArgument(f"state must be one of {', '.join(map(repr, JOB_STATES))} "
                              f"or a collection of them, not {state!r}")
    return states


def count(value: Any, what: str, *, low: int) -> Optional[int]:
    """`value` (None or an int >= `low`, not a bool) or InvalidArgument."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_ID:
        raise InvalidArgument(f"{what} must be an int >= {low}, not {value!r}")
    return value


def item_names(names: Any) -> List[str]:
    """replicate's `names` as a list: one name (a str) or an iterable of
    them, at least one; InvalidArgument for anything else."""
    if isinstance(names, str):
        listed: List[Any] = [names]
    elif isinstance(names, Iterable) and not isinstance(names, (bytes, bytearray, Mapping)):
        listed = list(names)
    else:
        listed = [names]
    if not listed or any(not isinstance(n, str) or not n for n in listed):
        raise InvalidArgument(f"names must be an item's name (a str) or several, not "
                              f"{names!r}")
    return listed


def method(value: Any, what: str, *, default_ok: bool = False) -> Any:
    """`value` if it is one of METHODS (or None with `default_ok`), else
    InvalidArgument; `what` names the call ("failover")."""
    if (value is None and default_ok) or (isinstance(value, str) and value in METHODS):
        return value
    raise InvalidArgument(f"{what}'s method must be one of {', '.join(map(repr, METHODS))}, "
                          f"not {value!r}")

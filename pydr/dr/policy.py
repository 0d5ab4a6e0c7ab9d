"""Protection policies: what `pydr run` keeps an item at -- its target RPO
and the RPO at which it is critical, how often a point is app-consistent,
retention tiers, an upload bandwidth limit with time-of-day windows, a
priority, the commands an RPO health change runs, and for an object store
the Object Lock every point's objects get (pydr.dr.objectlock).

A policy is kept per item and per group (the vault's policies table, one row
per scope and name, each field NULL where it is not set). An item's
effective policy takes each field from the item's own policy where it sets
it, else from its group's, else the default (:class:`Policy`'s). Every value
is checked before anything is recorded: a bad one is InvalidArgument and
the vault is unchanged.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from ..errors import InvalidArgument, VaultError
from .tiers import Tiers

#: the fields of a policy, in the order they are shown
FIELDS = ("target_rpo", "rpo_critical", "app_consistent_every", "keep", "bwlimit",
          "bwlimit_windows", "priority", "alert_commands", "lock_days", "lock_mode")
#: where an effective policy's field comes from
SOURCES = ("item", "group", "default")
PRIORITY_RANGE = (-1000, 1000)
#: Object Lock modes (S3's, in lower case); the first is the default
LOCK_MODES = ("compliance", "governance")
MAX_LOCK_DAYS = 36500.0

_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_RATE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b?)?(?:/s)?\s*", re.IGNORECASE)
_CLOCK = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
# a duration of more than ten years is a typing error, not a policy
_MAX_SECONDS = 10 * 366 * 86400.0
_MAX_RATE = 1 << 50
_MAX_COMMANDS = 64
_MAX_WINDOWS = 64

Duration = Union[float, int, str]


@dataclass(frozen=True)
class Policy:
    """An item's protection policy (every field as `pydr run` uses it).

    Attributes:
        target_rpo: seconds: the newest point's data should stay younger
            than this (None: not set; pydr run does not schedule the item).
        rpo_critical: seconds: the RPO at which its health is "critical"
            (None: twice the target).
        app_consistent_every: seconds: a cycle runs the item's quiesce hooks
            when its newest app-consistent point is older than this (None:
            never).
        keep: retention tiers (pydr.dr.tiers.Tiers); None: the item's
            count/age retention.
        bwlimit: upload limit in bytes per second outside every window
            (None: none).
        bwlimit_windows: (start "HH:MM", end "HH:MM", bytes per second) in
            local time; a window whose end is not after its start wraps
            midnight.
        priority: -1000 to 1000; higher runs first when more items are due
            than there are slots.
        alert_commands: shell command lines run on a change of RPO health.
        lock_days: days each new point's objects in an object store stay
            under S3 Object Lock retention (None: no lock).
        lock_mode: "compliance" (nobody can shorten or remove the lock) or
            "governance" (who has s3:BypassGovernanceRetention can); None:
            compliance, when lock_days is set.
    """

    target_rpo: Optional[float] = None
    rpo_critical: Optional[float] = None
    app_consistent_every: Optional[float] = None
    keep: Optional[Tiers] = None
    bwlimit: Optional[int] = None
    bwlimit_windows: Tuple[Tuple[str, str, int], ...] = ()
    priority: int = 0
    alert_commands: Tuple[str, ...] = ()
    lock_days: Optional[float] = None
    lock_mode: Optional[str] = None

    def lock(self) -> Optional[Tuple[str, float]]:
        """(mode, seconds) of the Object Lock new points get, or None."""
        if self.lock_days is None:
            return None
        return self.lock_mode or LOCK_MODES[0], self.lock_days * 86400.0

    def critical_after(self) -> Optional[float]:
        """The RPO in seconds at which health turns "critical": rpo_critical,
        else twice target_rpo, else None (no target)."""
        if self.rpo_critical is not None:
            return self.rpo_critical
        return None if self.target_rpo is None else 2 * self.target_rpo

    def bwlimit_at(self, when: float) -> Optional[int]:
        """The upload limit (bytes/s, None: none) at `when` (epoch seconds,
        read in local time): the rate of the first window `when` falls in
        (start included, end excluded), else ``bwlimit``."""
        local = datetime.datetime.fromtimestamp(when)
        minute = local.hour * 60 + local.minute
        for start, end, rate in self.bwlimit_windows:
            if _in_window(minute, _minutes(start), _minutes(end)):
                return rate
        return self.bwlimit

    def to_dict(self) -> Dict[str, Any]:
        """The policy as JSON-ready values: durations in seconds, ``keep``
        as Tiers.to_dict() (or None), windows as [start, end, rate] lists."""
        return {
            "target_rpo": self.target_rpo,
            "rpo_critical": self.rpo_critical,
            "rpo_critical_effective": self.critical_after(),
            "app_consistent_every": self.app_consistent_every,
            "keep": None if self.keep is None else self.keep.to_dict(),
            "bwlimit": self.bwlimit,
            "bwlimit_windows": [list(w) for w in self.bwlimit_windows],
            "priority": self.priority,
            "alert_commands": list(self.alert_commands),
            "lock_days": self.lock_days,
            "lock_mode": self.lock_mode or (LOCK_MODES[0] if self.lock_days else None),
        }


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def _in_window(minute: int, start: int, end: int) -> bool:
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end  # wraps midnight


# -- parsing --------------------------------------------------------------------------
def parse_duration(text: str) -> float:
    """Seconds from `text`: a number with an optional unit s, m, h, d or w
    ("30", "30s", "5m", "1.5h", "1d"). Returns a float > 0.

    Raises InvalidArgument for anything else, zero, or more than ten years.
    """
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidArgument(f"not a duration: {text!r} (expected a number of seconds, "
                              "or one with a unit: 30s, 5m, 2h, 1d)")
    return _check_seconds(float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()],
                          text)


def _check_seconds(value: Any, given: Any, what: str = "a duration") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 < value <= _MAX_SECONDS:
        raise InvalidArgument(f"{what} must be more than 0 s and at most ten years, "
                              f"not {given!r}")
    return float(value)


def parse_rate(text: str) -> int:
    """Bytes per second from `text`: a number with an optional unit K, M,
    G or T (powers of 1024; "512K", "10M", "1.5G", "10MiB/s"). Returns an
    int > 0.

    Raises InvalidArgument for anything else, or a rate that rounds to 0.
    """
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidArgument(f"not a rate: {text!r} (expected bytes per second, or a "
                              "number with a unit: 512K, 10M, 1G)")
    return _check_rate(int(float(match.group(1)) * _RATE_UNITS[match.group(2).lower()]), text)


def _check_rate(value: Any, given: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_RATE:
        raise InvalidArgument(f"a bandwidth limit must be a whole number of bytes per "
                              f"second from 1 to {_MAX_RATE}, not {given!r}")
    return value


def parse_window(text: str) -> Tuple[str, str, int]:
    """A bandwidth window from "HH:MM-HH:MM=RATE" (local time, 24-hour
    clock; "22:00-06:00=100M" wraps midnight). Returns (start, end, bytes
    per second).

    Raises InvalidArgument for anything else, a bad rate, or equal start
    and end.
    """
    if not isinstance(text, str) or "=" not in text or "-" not in text.split("=", 1)[0]:
        raise InvalidArgument(f"not a bandwidth window: {text!r} (expected "
                              "HH:MM-HH:MM=RATE, such as 08:00-18:00=10M)")
    span, rate = text.split("=", 1)
    start, end = (part.strip() for part in span.split("-", 1))
    return _check_window((start, end, parse_rate(rate)), text)


def _check_window(window: Any, given: Any) -> Tuple[str, str, int]:
    if isinstance(window, str):
        return parse_window(window)
    if not isinstance(window, (list, tuple)) or len(window) != 3:
        raise InvalidArgument(f"not a bandwidth window: {given!r} (expected "
                              "HH:MM-HH:MM=RATE or (start, end, rate))")
    start, end, rate = window
    for clock in (start, end):
        if not isinstance(clock, str) or not _CLOCK.fullmatch(clock):
            raise InvalidArgument(f"bandwidth window {given!r}: {clock!r} is not a time "
                                  "of day HH:MM (00:00 to 23:59)")
    if start == end:
        raise InvalidArgument(f"bandwidth window {given!r}: its start and end are the same")
    return (start, end, _check_rate(rate, given))


# -- checking each field --------------------------------------------------------------
def _duration_value(value: Duration, field: str) -> float:
    if isinstance(value, str):
        return parse_duration(value)
    return _check_seconds(value, value, _option(field))


def _option(field: str) -> str:
    return {"target_rpo": "--rpo", "bwlimit_windows": "--bwlimit-window",
            "alert_commands": "--alert-command", "lock_days": "--lock"}.get(field, "--" + field.replace("_", "-"))


def check_field(field: str, value: Any) -> Any:
    """`value` for policy field `field` in the form :class:`Policy` holds,
    checked (durations may be given as text "5m", rates as "10M", windows
    as "HH:MM-HH:MM=RATE", keep as Tiers or its dict). None stays None
    (the field is not set).

    Raises InvalidArgument naming the field and the value.
    """
    if field not in FIELDS:
        raise InvalidArgument(f"no policy field {field!r} (fields: {', '.join(FIELDS)})")
    if value is None:
        return None
    try:
        return _checked(field, value)
    except InvalidArgument as exc:  # name the option, as the command line spells it
        if str(exc).startswith(_option(field)):
            raise
        raise InvalidArgument(f"{_option(field)}: {exc}") from None


def _checked(field: str, value: Any) -> Any:
    if field in ("target_rpo", "rpo_critical", "app_consistent_every"):
        return _duration_value(value, field)
    if field == "keep":
        if isinstance(value, Tiers):
            return Tiers.from_dict(value.to_dict())  # checks it
        return Tiers.from_dict(value)
    if field == "bwlimit":
        return parse_rate(value) if isinstance(value, str) else _check_rate(value, value)
    if field == "bwlimit_windows":
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            value = [value]
        if len(value) > _MAX_WINDOWS:
            raise InvalidArgument(f"at most {_MAX_WINDOWS} bandwidth windows, not {len(value)}")
        return tuple(_check_window(w, w) for w in value)
    if field == "priority":
        low, high = PRIORITY_RANGE
        if isinstance(value, str):
            try:
                value = int(value, 10)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidArgument(f"--priority must be a whole number from {low} to {high}, "
                                  f"not {value!r}")
        return value
    if field == "lock_days":
        return _check_lock_days(value)
    if field == "lock_mode":
        mode = value.strip().lower() if isinstance(value, str) else value
        if mode not in LOCK_MODES:
            raise InvalidArgument(f"--lock-mode must be one of {', '.join(LOCK_MODES)}, "
                                  f"not {value!r}")
        return mode
    # alert_commands
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        value = [value]
    if len(value) > _MAX_COMMANDS:
        raise InvalidArgument(f"at most {_MAX_COMMANDS} alert commands, not {len(value)}")
    for command in value:
        if not isinstance(command, str) or not command.strip() or "\0" in command:
            raise InvalidArgument(f"--alert-command must be a non-empty command line "
                                  f"without NUL, not {command!r}")
    return tuple(value)


def _check_lock_days(value: Any) -> float:
    given = value
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            value = float(text[:-1] if text.endswith("d") else text)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 < value <= MAX_LOCK_DAYS:
        raise InvalidArgument(f"--lock must be a number of days above 0 and at most "
                              f"{MAX_LOCK_DAYS:g}, not {given!r}")
    return float(value)


def _check_critical(policy: Policy, what: str) -> None:
    if policy.rpo_critical is not None and policy.target_rpo is not None \
            and policy.rpo_critical < policy.target_rpo:
        raise InvalidArgument(f"{what}: --rpo-critical ({policy.rpo_critical:g} s) must not "
                              f"be less than the target RPO ({policy.target_rpo:g} s)")


# -- the stored form ------------------------------------------------------------------
def _to_column(field: str, value: Any) -> Any:
    if value is None:
        return None
    if field == "keep":
        return json.dumps(value.to_dict(), sort_keys=True)
    if field == "bwlimit_windows":
        return json.dumps([list(w) for w in value])
    if field == "alert_commands":
        return json.dumps(list(value))
    return value


def _from_row(store: Any, record: Any, skip: Iterable[str] = (),
              damaged: Optional[Dict[str, VaultError]] = None) -> Dict[str, Any]:
    """The fields `record` (a PolicyRecord) sets, but those in `skip` (about
    to be replaced: a damaged one can be), checked as read: a vault is a file
    someone may have edited. A damaged field raises VaultError, or, given
    `damaged`, is left out and its error put there by field."""
    fields = {}
    for field in FIELDS:
        stored = getattr(record, field)
        if stored is None or field in skip:
            continue
        try:
            value = json.loads(stored) if field in ("keep", "bwlimit_windows",
                                                    "alert_commands") else stored
            if field in ("bwlimit_windows", "alert_commands") and not isinstance(value, list):
                raise ValueError("not a JSON list")  # as written: the lists only
            fields[field] = check_field(field, value)
        except (ValueError, TypeError) as exc:  # InvalidArgument is a ValueError
            group = " --group" if record.scope == "group" else ""
            error = VaultError(f"the {record.scope} policy of {record.name!r}: its {field} "
                               f"{stored!r} is damaged: {exc}", path=store.dir,
                               hint=f"'pydr policy {record.name}{group} --clear "
                                    f"{_option(field)[2:]}' removes it")
            if damaged is None:
                raise error from None
            damaged[field] = error
    return fields


def check_stored(store: Any, record: Any) -> Dict[str, Any]:
    """The fields a stored policy (a PolicyRecord) sets, checked as read.

    Raises VaultError naming the policy and the field for a damaged value.
    """
    return _from_row(_store(store), record)


def _policy_fields(store: Any, scope: str, name: str,
                   skip: Iterable[str] = ()) -> Dict[str, Any]:
    record = store.policy_row(scope, name)
    return {} if record is None else _from_row(store, record, skip)


def _store(store: Any) -> Any:
    return getattr(store, "store", store)  # a Vault: its Store


# -- resolution ------------------------------------------------------------------------
def resolve_policy(store: Any, name: str) -> Tuple[Policy, Dict[str, str]]:
    """Item `name`'s effective policy and where each field comes from.

    store: an open vault (pydr.dr.store.Store, or a Vault).
    name: the item.

    Returns (Policy, {field: "item" | "group" | "default"}): each field is
    the item's own where its policy sets it, else its group's, else the
    default.

    Raises UnknownName if `name` is not protected, VaultError if a stored
    policy is damaged.
    """
    store = _store(store)
    row = store.item(name)
    fields: Dict[str, Any] = {}
    sources = dict.fromkeys(FIELDS, "default")
    layers = [("group", row.grp)] if row.grp else []
    for scope, key in layers + [("item", name)]:
        for field, value in _policy_fields(store, scope, key).items():
            fields[field] = value
            sources[field] = scope
    return Policy(**fields), sources


def readable_policy(store: Any, name: str) -> Tuple[Policy, Dict[str, VaultError]]:
    """Item `name`'s effective policy made of what can be read: a damaged
    stored field is left out (the next layer's, or the default, stands in),
    and a combination of fields that is no policy gives the default one.

    Returns (Policy, {field: the VaultError naming it and the policy});
    the dict is empty when every stored policy of the item is sound.
    Raises UnknownName if `name` is not protected.
    """
    store = _store(store)
    row = store.item(name)
    fields: Dict[str, Any] = {}
    damaged: Dict[str, VaultError] = {}
    for scope, key in ([("group", row.grp)] if row.grp else []) + [("item", name)]:
        record = store.policy_row(scope, key)
        if record is not None:
            fields.update(_from_row(store, record, damaged=damaged))
    try:
        return Policy(**fields), damaged
    except (ValueError, TypeError):
        return Policy(), damaged


def group_policy(store: Any, group: str) -> Tuple[Policy, Dict[str, str]]:
    """Group `group`'s own policy (every field it does not set at the
    default) and where each field comes from ("group" or "default").

    Raises VaultError if the stored policy is damaged.
    """
    fields = _policy_fields(_store(store), "group", group)
    sources = {f: "group" if f in fields else "default" for f in FIELDS}
    return Policy(**fields), sources


def effective_policy(store: Any, name: str) -> Policy:
    """Item `name`'s effective policy: each field from the item's own policy
    where set, else from its group's, else the default.

    store: an open vault (pydr.dr.store.Store, or a Vault).
    name: the item.

    Returns a :class:`Policy`. Raises UnknownName if `name` is not
    protected, VaultError if a stored policy is damaged.
    """
    return resolve_policy(store, name)[0]


def effective_policies(store: Any) -> Dict[str, Policy]:
    """Every item's effective policy, by item name (for a service round).

    Raises VaultError if a stored policy is damaged.
    """
    return {name: effective_policy(store, name) for name in _store(store).items()}


def _scope_members(store: Any, scope: str, name: str) -> List[str]:
    """The items a policy of `scope` `name` applies to; UnknownName if none."""
    if scope == "item":
        store.item(name)  # UnknownName if not protected
        return [name]
    if scope == "group":
        return list(store.items(group=name))  # UnknownName: a group with no members
    raise InvalidArgument(f"a policy's scope is 'item' or 'group', not {scope!r}")


def _write(store: Any, scope: str, name: str, new_fields: Dict[str, Any],
           cleared: Iterable[str]) -> None:
    """Check the result of changing the policy of `scope` `name` for every
    item it applies to, then record it in one transaction."""
    members = _scope_members(store, scope, name)
    cleared = list(cleared)
    merged = _policy_fields(store, scope, name, skip=set(new_fields) | set(cleared))
    merged.update(new_fields)
    for field in cleared:
        merged.pop(field, None)
    _check_critical(Policy(**merged), f"the {scope} policy of {name!r}")
    if "lock_days" in new_fields:  # each item's store must keep locks (asked before writing)
        from .objectlock import check_lockable

        for member in members:
            check_lockable(store, member)
    with store.transaction():
        columns = {f: _to_column(f, merged.get(f)) for f in FIELDS}
        if any(v is not None for v in columns.values()):
            store.put_policy(scope, name, **columns)
        else:
            store.drop_policy(scope, name)
        for member in members:  # the combination must hold too (rolled back if not)
            _check_critical(effective_policy(store, member), f"item {member!r}")


def set_policy(store: Any, scope: str, name: str, **fields: Any) -> None:
    """Set fields of the policy of item or group `name`; the fields not
    given stay as they are.

    store: an open vault, as a writer (pydr.dr.store.Store, or a Vault).
    scope: "item" or "group".
    name: the item or group.
    fields: policy fields (see :data:`FIELDS` and :class:`Policy`):
        durations as seconds or text ("5m"), rates as bytes/s or text
        ("10M"), windows as "HH:MM-HH:MM=RATE" or (start, end, rate),
        keep as Tiers or its dict; None clears a field.

    Every value is checked, and rpo_critical against the target (of the
    policy and of each item's effective policy), before anything is
    recorded.

    Raises InvalidArgument for a bad field or value, UnknownName for an
    item that is not protected or a group with no members, VaultError if
    the vault cannot be written.
    """
    store = _store(store)
    checked = {field: check_field(field, value) for field, value in fields.items()}
    _write(store, scope, name, {f: v for f, v in checked.items() if v is not None},
           [f for f, v in checked.items() if v is None])


def check_new_item_policy(store: Any, group: Optional[str],
                          fields: Dict[str, Any], replicas: Iterable[str] = ()
                          ) -> Dict[str, Any]:
    """Check the policy `fields` of an item about to be protected (in
    `group`, or None) as set_policy would, with its group's policy, before
    the item is recorded. With a lock, its `replicas` must be in object
    stores with Object Lock (UnsupportedFile otherwise).

    Returns the policy as columns of the policies table (the fields set,
    for Store.put_policy in the item's own transaction).

    Raises InvalidArgument for a bad field or value, UnsupportedFile for a
    lock the replicas cannot keep.
    """
    store = _store(store)
    if not isinstance(fields, dict):
        raise InvalidArgument(f"a policy is a dict of policy fields, not {fields!r}")
    checked = {field: check_field(field, value) for field, value in fields.items()}
    own = {f: v for f, v in checked.items() if v is not None}
    merged = _policy_fields(store, "group", group) if group else {}
    merged.update(own)
    _check_critical(Policy(**merged), "the new item's policy")
    if merged.get("lock_days") is not None:
        from .objectlock import check_lockable_specs

        check_lockable_specs(replicas)
    return {f: _to_column(f, v) for f, v in own.items()}


def clear_policy(store: Any, scope: str, name: str, fields: Iterable[str]) -> None:
    """Clear `fields` of the policy of item or group `name` (they are then
    taken from the group, or the default). Clearing every field removes the
    policy.

    store: an open vault, as a writer.
    scope: "item" or "group".
    name: the item or group.
    fields: names from :data:`FIELDS`, or "all" for every field.

    Raises InvalidArgument for an unknown field, UnknownName for an item
    that is not protected or a group with no members.
    """
    store = _store(store)
    fields = list(fields)
    if "all" in fields:
        fields = list(FIELDS)
    for field in fields:
        if field not in FIELDS:
            raise InvalidArgument(f"no policy field {field!r} (fields: {', '.join(FIELDS)}, all)")
    _write(store, scope, name, {}, fields)

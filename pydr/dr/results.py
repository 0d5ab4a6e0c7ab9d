"""What the vault's calls return: frozen dataclasses, one per kind of answer.

Every result is read-only (``@dataclass(frozen=True)``), its collections are
tuples, its times tz-aware ``datetime`` objects in UTC. ``to_dict()`` gives
the JSON-ready form that ``pydr ... --json`` prints unchanged: times as ISO
8601 UTC strings with microseconds and a ``Z`` ("2026-12-06T22:45:10.123456Z"),
tuples as lists, nested results as dicts, and ``"type"`` and ``"version"``
first in every named result. ``from_dict()`` reads that form back.

The shapes and the version rule are in docs/JSON.md: a field is added
without a version change; a rename or a removal bumps ``version``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Union, overload

VERSION = 1

# -- time ----------------------------------------------------------------------------


@overload
def utc(epoch: float) -> datetime: ...


@overload
def utc(epoch: None) -> None: ...


@overload
def utc(epoch: Optional[float]) -> Optional[datetime]: ...


def utc(epoch: Optional[float]) -> Optional[datetime]:
    """The tz-aware UTC datetime of epoch seconds (None for None)."""
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=timezone.utc)


def iso(when: Optional[datetime]) -> Optional[str]:
    """ISO 8601 UTC with microseconds and "Z" (None for None)."""
    if when is None:
        return None
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: Optional[str]) -> Optional[datetime]:
    """The datetime of iso()'s text (None for None)."""
    if text is None:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


# -- the common part -----------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a field's value."""
    if isinstance(value, _Result):
        return value.to_dict()
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class _Result:
    """to_dict()/from_dict() of a frozen dataclass. A subclass names its
    ``TYPE`` (None for a part that never stands alone: no "type"/"version"),
    its datetime fields (``_TIMES``) and its nested results (``_NESTED``:
    field -> class, or "any" for a mapping of results told apart by type)."""

    TYPE: ClassVar[Optional[str]] = None
    _TIMES: ClassVar[Tuple[str, ...]] = ()
    _NESTED: ClassVar[Dict[str, Any]] = {}

    def to_dict(self) -> Dict[str, Any]:
        """The JSON-ready dict of this result (docs/JSON.md)."""
        out: Dict[str, Any] = {}
        if self.TYPE is not None:
            out["type"] = self.TYPE
            out["version"] = VERSION
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """The result to_dict() gave `data` for (unknown keys are ignored: a
        newer pydr may add fields). ValueError if `data` is another type or a
        newer version."""
        if cls.TYPE is not None:
            if data.get("type") != cls.TYPE:
                raise ValueError(f"not a {cls.TYPE} record: type {data.get('type')!r}")
            if not isinstance(data.get("version"), int) or data["version"] > VERSION:
                raise ValueError(f"{cls.TYPE} version {data.get('version')!r} is not "
                                 f"supported (this pydr reads version {VERSION})")
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                continue
            values[f.name] = cls._read(f.name, data[f.name])
        return cls(**values)

    @classmethod
    def _read(cls, name: str, value: Any) -> Any:
        if value is None:
            return None
        if name in cls._TIMES:
            return parse_iso(value)
        nested = cls._NESTED.get(name)
        if nested == "any":
            return {k: result_from_dict(v) for k, v in value.items()}
        if nested is not None:
            if isinstance(value, list):
                return tuple(nested.from_dict(v) for v in value)
            return nested.from_dict(value)
        if isinstance(value, list):
            return tuple(tuple(v) if isinstance(v, list) else v for v in value)
        return value


def _tuples(obj: Any, *names: str) -> None:
    """Make the fields `names` of a frozen dataclass tuples (a caller may pass lists)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not isinstance(value, tuple):
            object.__setattr__(obj, name, tuple(value))


# -- item status ---------------------------------------------------------------------


@dataclass(frozen=True)
class Tracking(_Result):
    """Changed-block tracking of a disk: ``mode`` ("qcow2": a dirty bitmap
    in a qcow2 image; "qmp": one of a running QEMU) and ``bitmap``, the
    name of the bitmap the next cycle reads (None before the first);
    ``granularity``: bytes per bit of the bitmaps its cycles add (a bitmap
    added before schema 10 may have another until the next cycle replaces
    it; docs/QEMU.md), None when not known (a result of an older pydr)."""

    mode: str
    bitmap: Optional[str] = None
    granularity: Optional[int] = None


@dataclass(frozen=True)
class Hooks(_Result):
    """Whether an item has a quiesce and a thaw hook (never their command
    lines: they may hold a password)."""

    quiesce: bool
    thaw: bool


@dataclass(frozen=True)
class RunningOperation(_Result):
    """The operation recorded on an item: ``name`` ("replicate",
    "failover", ...), the ``command`` that finishes it, and whether it is
    ``interrupted`` (no process runs it: run the command again)."""

    name: str
    command: Optional[str]
    interrupted: bool


@dataclass(frozen=True)
class DiskStatus(_Result):
    """Disk ``index`` of an item: its ``source`` and ``replica`` (a path,
    host:PATH or URI) and its changed-block ``tracking`` (None without)."""

    TYPE: ClassVar[Optional[str]] = "disk-status"
    _NESTED: ClassVar[Dict[str, Any]] = {"tracking": Tracking}

    index: int
    source: str
    replica: str
    tracking: Optional[Tracking] = None


@dataclass(frozen=True)
class ItemStatus(_Result):
    """What the vault knows of a protected item (Vault.status, Vault.protect).

    ``latest_point_at`` is when the newest point's data was taken (its cut,
    not when it was recorded); ``rpo_seconds`` the age of that data when the
    status was read (None without a point); ``last_success_at`` the end of
    the last cycle that made a point. ``next_retry``: when a --retry run
    tries a failed item again. ``test_failover``/``test_point``/
    ``test_method``: the drill in place (its directory, point and method);
    ``failover_point``: the point a failover brought up; ``operation``: the
    operation recorded on the item, or None. ``target_rpo``: the target RPO
    of its effective policy (seconds; None: not set, pydr run does not
    schedule it); ``rpo_health``: its RPO measured against that target now:
    "ok", "warning" (over the target), "critical" (over the policy's
    rpo_critical, by default twice the target), "unknown" (no target, or
    no point yet within one target of protecting it) or "paused" (failed
    over, committing or in a drill). ``health`` is the last cycle's own.
    ``verification``: the item's last verification of a recovered machine
    ({"point", "kind", "passed", "rto", "failed_probe", "ended"}), or None."""

    TYPE: ClassVar[Optional[str]] = "item-status"
    _TIMES: ClassVar[Tuple[str, ...]] = ("latest_point_at", "last_success_at", "next_retry")
    _NESTED: ClassVar[Dict[str, Any]] = {"hooks": Hooks, "disks": DiskStatus,
                                         "operation": RunningOperation}

    item: str
    state: str
    direction: str
    health: str
    group: Optional[str]
    host: Optional[str]
    retention: int
    retention_age: Optional[float]
    hooks: Hooks
    disks: Tuple[DiskStatus, ...]
    point_count: int
    latest_point: Optional[int]
    latest_point_at: Optional[datetime]
    rpo_seconds: Optional[float]
    last_success_at: Optional[datetime]
    damaged_points: Tuple[int, ...]
    last_error: Optional[str]
    failed_attempts: int
    next_retry: Optional[datetime]
    test_failover: Optional[str]
    test_point: Optional[int]
    test_method: Optional[str]
    failover_point: Optional[int]
    operation: Optional[RunningOperation]
    target_rpo: Optional[float] = None
    rpo_health: Optional[str] = None
    verification: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        _tuples(self, "disks", "damaged_points")


# -- points and jobs -----------------------------------------------------------------


def verification_summary(record: Any) -> Optional[Dict[str, Any]]:
    """A store VerificationRecord as points and status show it: {"point",
    "kind", "passed", "rto", "failed_probe", "ended"} (None for None)."""
    import json

    if record is None:
        return None
    try:
        probes = json.loads(record.probes or "[]")
    except ValueError:
        probes = []
    failed = next((p.get("probe") for p in probes if isinstance(p, dict)
                   and not p.get("passed")), None) if isinstance(probes, list) else None
    return {"point": record.point, "kind": record.kind, "passed": bool(record.passed),
            "rto": record.rto, "failed_probe": failed, "ended": record.ended}


@dataclass(frozen=True)
class PointInfo(_Result):
    """A recovery point of an item (Vault.points, Vault.point).

    ``created_at``: when it was recorded; ``cut_at``: when its data was
    taken (the cut; its ``created_at`` for points recorded before cut times
    were). ``consistency``: "app-consistent", "crash-consistent",
    "disk-consistent" or "inconsistent" (docs/VAULT.md); ``cut``: how the cut was made;
    ``bytes``: what its cycle moved; ``damaged``: why it can no longer be
    restored, or None; ``verification``: the last verification of a machine
    recovered from it ({"point", "kind", "passed", "rto", "failed_probe",
    "ended"}; pydr.dr.probes), or None; ``frozen``: for a machine's point,
    whether the guest agent had its file systems frozen at the cut (None:
    the point keeps no domain)."""

    TYPE: ClassVar[Optional[str]] = "point"
    _TIMES: ClassVar[Tuple[str, ...]] = ("created_at", "cut_at")

    id: int
    item: str
    created_at: datetime
    cut_at: datetime
    consistency: str
    cut: Optional[str]
    bytes: Optional[int]
    damaged: Optional[str]
    verification: Optional[Dict[str, Any]] = None
    frozen: Optional[bool] = None

    @classmethod
    def from_record(cls, record: Any, verification: Optional[Dict[str, Any]] = None,
                    frozen: Optional[bool] = None) -> PointInfo:
        """The PointInfo of a store PointRecord (its last verification, and
        whether a machine's point was frozen)."""
        cut_at = getattr(record, "cut_at", None)
        return cls(id=record.id, item=record.item, created_at=utc(record.created),
                   cut_at=utc(record.created if cut_at is None else cut_at),
                   consistency=record.consistency, cut=record.cut, bytes=record.bytes,
                   damaged=record.damaged, verification=verification, frozen=frozen)


@dataclass(frozen=True)
class JobInfo(_Result):
    """A job: one command's work on an item (Vault.jobs, Vault.job).

    ``kind``: "replicate", "failover", "test-failover", ...; ``state``:
    "queued", "running", "succeeded", "failed" or "cancelled";
    ``progress``: 0.0 to 1.0; ``pid``: the process that ran it;
    ``method``: how it made disks ("reflink", "qcow2", "copy", several
    joined by "+"); ``host``: where its work ran (a fleet host), or None."""

    TYPE: ClassVar[Optional[str]] = "job"
    _TIMES: ClassVar[Tuple[str, ...]] = ("started_at", "ended_at")

    id: int
    kind: str
    item: Optional[str]
    state: str
    progress: Optional[float]
    bytes_transferred: Optional[int]
    started_at: Optional[datetime]
    ended_at: Optional[datetime]
    error: Optional[str]
    pid: Optional[int]
    method: Optional[str]
    host: Optional[str]

    @classmethod
    def from_record(cls, record: Any) -> JobInfo:
        """The JobInfo of a store JobRecord."""
        return cls(id=record.id, kind=record.kind, item=record.item, state=record.state,
                   progress=record.progress, bytes_transferred=record.bytes_transferred,
                   started_at=utc(record.started), ended_at=utc(record.ended),
                   error=record.error, pid=record.pid, method=record.method, host=record.host)


@dataclass(frozen=True)
class AlertInfo(_Result):
    """A change of an item's RPO health that pydr run recorded (Vault.alerts).

    ``id``: its number in the alerts log; ``at``: when it was found;
    ``old``/``new``: the health before and after ("ok", "warning",
    "critical", "unknown", "paused"; ``old`` None for the item's first);
    ``rpo_seconds``: the achieved RPO then (None: no point); ``target_rpo``:
    the target then (seconds); ``message``: the change for a person
    ("ok -> warning: RPO 12 s > target 10 s")."""

    TYPE: ClassVar[Optional[str]] = "alert"
    _TIMES: ClassVar[Tuple[str, ...]] = ("at",)

    id: int
    at: datetime
    item: str
    old: Optional[str]
    new: str
    rpo_seconds: Optional[float]
    target_rpo: Optional[float]
    message: str

    @classmethod
    def from_record(cls, record: Any) -> AlertInfo:
        """The AlertInfo of a store AlertRecord."""
        return cls(id=record.id, at=utc(record.at), item=record.item, old=record.old,
                   new=record.new, rpo_seconds=record.rpo_seconds,
                   target_rpo=record.target_rpo, message=record.message)


# -- errors of one item among many ---------------------------------------------------


@dataclass(frozen=True)
class ItemError(_Result):
    """An item's failure inside a result about several items: the message,
    the exit code pydr gives that error alone (pydr.errors), whether a retry
    may succeed without an operator, and advice for a person (or None)."""

    TYPE: ClassVar[Optional[str]] = "item-error"

    item: str
    error: str
    exit_code: int
    recoverable: bool = False
    hint: Optional[str] = None

    @classmethod
    def from_exception(cls, item: str, exc: BaseException) -> ItemError:
        """The ItemError of `exc`, raised by the work on `item`."""
        from ..errors import exit_code_for
        from .retry import recoverable

        return cls(item=item, error=str(exc) or type(exc).__name__,
                   exit_code=exit_code_for(exc), recoverable=bool(recoverable(exc)),
                   hint=getattr(exc, "hint", None))


# -- replication cycles --------------------------------------------------------------


@dataclass(frozen=True)
class ItemOutcome(_Result):
    """One item's outcome in a cycle: ``status`` "succeeded" (``point_id``
    its new point) or "failed" (``error`` the message, ``exit_code`` the
    one pydr exits with for that error alone, ``recoverable`` whether a
    retry may succeed without an operator); ``bytes`` moved for it (written
    to its replicas), ``bytes_read`` what its cycle read."""

    TYPE: ClassVar[Optional[str]] = "item-outcome"

    item: str
    status: str
    point_id: Optional[int] = None
    error: Optional[str] = None
    exit_code: Optional[int] = None
    bytes: int = 0
    recoverable: Optional[bool] = None  # said of failures only
    bytes_read: int = 0


@dataclass(frozen=True)
class CycleResult(_Result):
    """A replication cycle (Vault.replicate): ``point_id`` shared by the
    items that succeeded (None if none did, or if retried items got points
    of their own), ``items`` those that succeeded, ``bytes_written``,
    ``bytes_read``, ``seconds``, ``consistency``, ``jobs`` (job ids) and
    ``outcomes``: an ItemOutcome for every item of the call, in the order
    given."""

    TYPE: ClassVar[Optional[str]] = "cycle-result"
    _NESTED: ClassVar[Dict[str, Any]] = {"outcomes": ItemOutcome}

    point_id: Optional[int]
    items: Tuple[str, ...]
    bytes_written: int
    bytes_read: int
    seconds: float
    consistency: Optional[str]
    jobs: Tuple[int, ...]
    outcomes: Tuple[ItemOutcome, ...] = ()

    def __post_init__(self) -> None:
        _tuples(self, "items", "jobs", "outcomes")

    @property
    def failed(self) -> Tuple[ItemOutcome, ...]:
        """The outcomes of the items that failed."""
        return tuple(o for o in self.outcomes if o.status == "failed")

    @property
    def by_item(self) -> Dict[str, ItemOutcome]:
        """Each item's ItemOutcome, by the item's name."""
        return {o.item: o for o in self.outcomes}


# -- DR operations -------------------------------------------------------------------

OPERATIONS = ("test-failover", "cleanup-test-failover", "failover", "change-point", "commit",
              "reprotect", "failback", "materialize")


@dataclass(frozen=True)
class OperationResult(_Result):
    """What a DR operation on one item did (Vault.test_failover,
    cleanup_test_failover, failover, change_point, commit, reprotect,
    failback, materialize; each outcome of a plan).

    ``operation``: one of OPERATIONS; ``point``: the point it brought up,
    materialised or (reprotect) made; ``paths``: the disks it wrote (a
    drill, materialize); ``removed``: the files it removed (clean-up);
    ``method``: how it made disks ("reflink", "qcow2", "copy", joined by
    "+"); ``direction``: the item's direction afterwards; ``already_done``:
    it had been done before and nothing changed; ``notes``: what a person
    should know ("resumed", ...); ``cycle``: the replication cycle it ran
    (reprotect), or None; ``machine``: the machine brought up (failover,
    test-failover, failback of a machine: {"kind", "domain", "uuid", "uri",
    "console", "agent", "started", "seconds"}), or None; ``verification``:
    its verification ({"id", "passed", "rto", "parts", "probes", "error",
    "failed_probe"}; pydr.dr.probes), or None. Fields an operation has no
    use for are None or ()."""

    TYPE: ClassVar[Optional[str]] = "operation-result"
    _NESTED: ClassVar[Dict[str, Any]] = {"cycle": CycleResult}

    item: str
    operation: str
    point: Optional[int] = None
    paths: Tuple[str, ...] = ()
    removed: Tuple[str, ...] = ()
    method: Optional[str] = None
    direction: Optional[str] = None
    already_done: bool = False
    notes: Tuple[str, ...] = ()
    cycle: Optional[CycleResult] = None
    machine: Optional[Dict[str, Any]] = None
    verification: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        _tuples(self, "paths", "removed", "notes")

    @classmethod
    def from_workflow(cls, operation: str, answer: Mapping[str, Any], *,
                      direction: Optional[str] = None) -> OperationResult:
        """The result of the dict a workflow function (pydr.dr.drills,
        pydr.dr.failover) answered for `operation`; `direction` fills in
        the item's direction where the answer does not say it."""
        notes = tuple(answer.get("notes") or ())
        cycle = answer.get("cycle")
        return cls(item=answer["item"], operation=operation, point=answer.get("point"),
                   paths=tuple(str(p) for p in answer.get("paths") or ()),
                   removed=tuple(str(p) for p in answer.get("removed") or ()),
                   method=answer.get("method") or None,
                   direction=answer.get("direction") or direction,
                   already_done=any(n.startswith("already") or "nothing to do" in n
                                    for n in notes),
                   notes=notes, cycle=cycle if isinstance(cycle, CycleResult) else None,
                   machine=answer.get("machine"), verification=answer.get("verification"))


# -- recovery plans ------------------------------------------------------------------


@dataclass(frozen=True)
class PlanHook(_Result):
    """A group's ``hook`` ("pre" or "post") that ran: whether it
    succeeded and its exit code (never its command line)."""

    hook: str
    ok: bool
    exit_code: int


@dataclass(frozen=True)
class PlanStep(_Result):
    """Group ``group`` (1 for the first) of a plan run: its ``items``,
    the ``outcomes`` of those that ran ({item: OperationResult or
    ItemError}), those that did not run (``not_run``: an earlier failure
    stopped the plan) and the ``hooks`` that ran."""

    TYPE: ClassVar[Optional[str]] = "plan-step"
    _NESTED: ClassVar[Dict[str, Any]] = {"outcomes": "any", "hooks": PlanHook}

    group: int
    items: Tuple[str, ...]
    outcomes: Mapping[str, Union[OperationResult, ItemError]] = field(default_factory=dict)
    not_run: Tuple[str, ...] = ()
    hooks: Tuple[PlanHook, ...] = ()

    def __post_init__(self) -> None:
        _tuples(self, "items", "not_run", "hooks")


@dataclass(frozen=True)
class PlanReport(_Result):
    """A plan run (Vault.run_plan; PlanFailed's ``result`` when it
    stopped): ``ok`` whether every group ran and succeeded, ``steps`` one
    PlanStep a group of the plan, in order, and ``error`` why it stopped
    (None when ok)."""

    TYPE: ClassVar[Optional[str]] = "plan-report"
    _NESTED: ClassVar[Dict[str, Any]] = {"steps": PlanStep}

    plan: str
    operation: str
    ok: bool
    steps: Tuple[PlanStep, ...] = ()
    error: Optional[str] = None

    def __post_init__(self) -> None:
        _tuples(self, "steps")

    @property
    def outcomes(self) -> Dict[str, Union[OperationResult, ItemError]]:
        """The outcome of every item that ran, over all groups, by the
        item's name."""
        return {i: o for s in self.steps for i, o in s.outcomes.items()}


RESULTS = {cls.TYPE: cls for cls in (DiskStatus, ItemStatus, PointInfo, JobInfo, AlertInfo,
                                     ItemError, ItemOutcome, CycleResult, OperationResult, PlanStep,
                                     PlanReport)}


def result_from_dict(data: Mapping[str, Any]) -> Any:
    """The result of any to_dict() output, told by its "type"; ValueError
    for an unknown type."""
    cls = RESULTS.get(data.get("type"))
    if cls is None:
        raise ValueError(f"unknown result type {data.get('type')!r}")
    return cls.from_dict(data)

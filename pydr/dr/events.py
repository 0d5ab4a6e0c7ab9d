"""Events: typed records of what a vault operation is doing, for the
``events=`` callback of every workflow call (replicate, test_failover,
failover, change_point, commit, reprotect, failback, materialize, verify,
run_plan, a Fleet), and the ``cancel=`` event those calls honour.

An :class:`Event` names the operation, the item, the disk (its index), the
job (the jobs row id, as ``pydr jobs`` lists it) and the phase, with bytes
done and total where there are bytes to count. Its ``path`` is one a person
knows: the disk as the vault names it, never a hidden ``.NAME.pydr-new``
or ``.NAME.pydr-snap`` file the work goes through.

The kinds (:data:`KINDS`):

- ``started``: an item's operation began (its job is named); with ``item``
  None, a call over many items began (a fleet's tasks were submitted);
- ``progress``: work on a disk (``disk``, ``phase``, ``bytes_done`` of
  ``bytes_total``, ``path``), or a step of an item without bytes
  (``phase`` "record": its point is being recorded);
- ``finished``: an item's operation ended well (``message`` says what it
  made, e.g. "point 7"); with ``item`` None, the whole call ended;
- ``failed``: an item's operation failed (``message``: the error);
- ``cancelled``: an item's operation was stopped by ``cancel`` or Ctrl-C;
  it is left as a kill leaves it: run the same call again to finish it;
- ``hook``: a recovery plan's pre or post hook ran (``message``: which, and
  its exit status);
- ``plan-step``: a recovery plan's group began or ended, or an item of it
  ended (``message`` says which);
- ``health``: ``pydr run`` found an item's RPO health changed (operation
  "run"; ``message``: "ok -> warning: RPO 12 s > target 10 s", see
  pydr.dr.health).

The phases (:data:`PHASES`): "cut" (the disks are cut at one instant),
"compare" (a source is signed and compared), "transfer" (changed blocks are
written to a replica), "upload" (chunks go to an object store), "record"
(the point is recorded), "materialize" (a point's disk is made), "bring-up"
(a failover makes a point's disk at the replica's path), "submitted" (a
fleet task went to a host's worker), "verify" (a replica is read back and
compared with its signature cache).

The callback runs in the thread doing the work: the calling thread, or
for a recovery plan the thread of each item of a group (several at
once); a callback that keeps state must lock it. It must return quickly.
An exception it raises is the caller's bug, not a fact about the DR copy:
it is logged (logger "pydr.events": the first of an operation as an
error with its traceback, the others at debug level) and the operation
goes on; it never fails the operation nor marks the item
unhealthy, and the callback still gets the events after it. To stop an
operation, set ``cancel``. (Ctrl-C, a KeyboardInterrupt, still stops it.)

``events`` must be callable and ``cancel`` must have ``is_set()`` (a
threading.Event): anything else is InvalidArgument before the work begins
(``check_events``, ``check_cancel_event``).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from ..engine import names
from ..errors import Cancelled, InvalidArgument, PydrError

__all__ = ["Event", "EventSink", "KINDS", "PHASES"]

_log = logging.getLogger("pydr.events")

#: Every kind of Event (see the module's docstring).
KINDS = ("started", "progress", "finished", "failed", "cancelled", "hook", "plan-step",
         "health")
#: Every phase an Event may name.
PHASES = ("cut", "compare", "transfer", "upload", "record", "materialize", "bring-up",
          "submitted", "verify")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso_utc(when: datetime.datetime) -> str:
    """`when` as ISO 8601 in UTC with a trailing "Z": 2026-12-06T22:45:10.123456Z."""
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Event:
    """One thing a vault operation did or is doing (see pydr.dr.events).

    Attributes:
        kind: one of :data:`~pydr.dr.events.KINDS`.
        operation: the operation: "replicate", "test-failover",
            "cleanup-test-failover", "failover", "change-point", "commit",
            "reprotect", "failback", "materialize", "verify", or a plan's
            operation.
        item: the item it is about, or None for a whole call.
        disk: the index of the disk it is about, or None.
        job: the id of the item's job (``Vault.jobs``), or None.
        phase: one of :data:`~pydr.dr.events.PHASES`, or None.
        bytes_done: bytes covered so far (holes included), or None.
        bytes_total: bytes to cover in this phase, or None.
        path: the disk as a person knows it (the vault's name for it), or None.
        message: text for a person (a point made, an error), or None.
        at: when it happened (UTC, tz-aware).
    """

    kind: str
    operation: str
    item: Optional[str] = None
    disk: Optional[int] = None
    job: Optional[int] = None
    phase: Optional[str] = None
    bytes_done: Optional[int] = None
    bytes_total: Optional[int] = None
    path: Optional[str] = None
    message: Optional[str] = None
    at: datetime.datetime = field(default_factory=_now)

    def to_dict(self) -> Dict[str, Any]:
        """The event as JSON-ready values: {"type": "event", "version": 1,
        every field, "at" as ISO 8601 UTC ("...Z")}. ``pydr ... --events``
        prints exactly this, one JSON object a line."""
        return {"type": "event", "version": 1, "kind": self.kind, "operation": self.operation,
                "item": self.item, "disk": self.disk, "job": self.job, "phase": self.phase,
                "bytes_done": self.bytes_done, "bytes_total": self.bytes_total,
                "path": self.path, "message": self.message, "at": iso_utc(self.at)}


#: What ``events=`` takes: a callable given each Event.
EventSink = Callable[[Event], None]


# -- internal helpers of the workflow modules ------------------------------------------------


def person_path(path: Any) -> Optional[str]:
    """`path` as a person knows it: a hidden file pydr works through beside a
    disk (.NAME.pydr-new, .NAME.pydr-snap, ...) is named by its disk, NAME."""
    if path is None:
        return None
    text = os.fspath(path) if not isinstance(path, str) else path
    head, tail = os.path.split(text)
    for suffix in (names.NEW, names.SNAP, names.BASE, names.UNDO):
        if tail.startswith(".") and tail.endswith(suffix) and len(tail) > len(suffix) + 1:
            return os.path.join(head, tail[1:-len(suffix)])
    return text


# a hidden work file beside a disk: its directory part (kept) and NAME
_HIDDEN = re.compile(r"(^|[/\s'\"(:])\.([^/\s'\"]+?)(?:%s)(?=$|[/\s'\"):,;])"
                     % "|".join(re.escape(s) for s in (names.NEW, names.SNAP, names.BASE,
                                                      names.UNDO)))


def person_text(text: Optional[str]) -> Optional[str]:
    """`text` (a message) with every hidden work file named by its disk,
    as person_path does for one path."""
    if not text:
        return text
    return _HIDDEN.sub(lambda m: m.group(1) + m.group(2), text)


def hide_work_files(exc: BaseException) -> BaseException:
    """`exc` (a pydr error) naming the disks a person knows, never the hidden
    files pydr worked through (its ``path`` and ``message`` rewritten in
    place); returns it."""
    if isinstance(exc, PydrError):
        exc.path = person_path(exc.path)
        exc.message = person_text(exc.message) or exc.message
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (exc.message,) + exc.args[1:]
    return exc


def check_events(events: Any) -> None:
    """InvalidArgument unless `events` is None or callable (an EventSink)."""
    if events is not None and not callable(events):
        raise InvalidArgument(f"events must be a callable given each Event (or None), "
                              f"not {events!r}")


def check_cancel_event(cancel: Any) -> None:
    """InvalidArgument unless `cancel` is None or has is_set() (a threading.Event)."""
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise InvalidArgument(f"cancel must be a threading.Event (anything with is_set()) "
                              f"or None, not {cancel!r}")


def check_cancel(cancel: Optional[threading.Event], what: str, path: Any = None) -> None:
    """Raise Cancelled ("`what` cancelled") when `cancel` is set; `path` is
    named as a person knows it (person_path)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} cancelled", path=person_path(path))


def interrupted(exc: BaseException) -> bool:
    """Ctrl-C, or a cancel= event: the work was stopped, nothing is damaged."""
    return not isinstance(exc, Exception) or isinstance(exc, Cancelled)


class Emitter:
    """Sends Events of one operation to a sink (nothing without one).

    ``item`` and ``job`` are filled in for every event unless given."""

    def __init__(self, sink: Optional[EventSink], operation: str, item: Optional[str] = None,
                 job: Optional[int] = None, *, _failures: Optional[List[int]] = None) -> None:
        self.sink, self.operation, self.item, self.job = sink, operation, item, job
        # the sink's errors so far, shared with for_item()'s emitters: the
        # first is logged with its traceback, the others without flooding
        self.failures = _failures if _failures is not None else [0]

    def __bool__(self) -> bool:
        return self.sink is not None

    def for_item(self, item: Optional[str], job: Optional[int] = None) -> Emitter:
        """The same sink and operation, about `item` (and its `job`)."""
        return Emitter(self.sink, self.operation, item, job, _failures=self.failures)

    def emit(self, kind: str, **fields: Any) -> None:
        if self.sink is None:
            return
        fields.setdefault("item", self.item)
        fields.setdefault("job", self.job)
        if "path" in fields:
            fields["path"] = person_path(fields["path"])
        if fields.get("message") and kind != "failed":  # an error names the file it is about
            fields["message"] = person_text(fields["message"])
        event = Event(kind, self.operation, **fields)
        try:
            self.sink(event)
        except Exception as exc:  # the caller's bug: logged, never the operation's failure
            self.failures[0] += 1
            if self.failures[0] == 1:
                _log.exception("the events callback %r raised on %s %s of %r (ignored: the "
                               "operation goes on)", self.sink, event.operation, event.kind,
                               event.item)
            else:
                _log.debug("the events callback raised again on %s %s of %r: %r",
                           event.operation, event.kind, event.item, exc)

    def ended(self, exc: BaseException, **fields: Any) -> None:
        """The item's operation stopped with `exc`: "cancelled" for Ctrl-C
        or a cancel= event, else "failed"; the message is the error. A
        cancel's hidden work files are renamed in place by their disks
        (hide_work_files), for the event and for whoever catches it; an
        error keeps the file it is about, hidden or not (a damaged baseline
        or journal is that file, and a person must find it)."""
        if interrupted(exc):
            hide_work_files(exc)
        message = str(exc) or type(exc).__name__
        self.emit("cancelled" if interrupted(exc) else "failed", message=message, **fields)

    def progress(self, *, disk: Optional[int], phase: str, path: Any,
                 also: Optional[Callable[[Any], None]] = None
                 ) -> Optional[Callable[[Any], None]]:
        """A ``progress=`` callback for the engine: each ProgressRecord
        becomes a "progress" Event of disk `disk` in `phase`, named by `path`
        (the disk as the vault names it, whatever file the engine reports);
        `also` (an older ``progress=`` callback) gets the record too. None
        when there is neither a sink nor `also`: the engine reports nothing."""
        if self.sink is None:
            return also
        shown = person_path(path)

        def on_progress(rec: Any) -> None:
            if also is not None:
                also(rec)
            self.emit("progress", disk=disk, phase=phase, bytes_done=int(rec.done_bytes),
                      bytes_total=int(rec.total_bytes), path=shown)

        return on_progress

    def disk_done(self, *, disk: int, phase: str, endpoint: Any,
                  message: Optional[str] = None) -> None:
        """A "progress" event of a disk whose `phase` ended: its whole size
        (``endpoint.size()``) done, whatever the engine reported on the way
        (a reflink clone reports nothing)."""
        if self.sink is None:
            return
        size: Optional[int]
        try:
            size = int(endpoint.size())
        except Exception:  # a size it cannot give is left out of the event
            size = None
        self.emit("progress", disk=disk, phase=phase, bytes_done=size, bytes_total=size,
                  path=str(endpoint), message=message)

    def run(self, fn: Callable[[], Any], *, started: bool = True,
            done: Optional[Callable[[Any], Optional[str]]] = None) -> Any:
        """fn() between a "started" event and a "finished" one (``done``
        gives its message from the result), or a "failed"/"cancelled" one
        when it raises."""
        if started:
            self.emit("started")
        try:
            result = fn()
        except BaseException as exc:
            self.ended(exc)
            raise
        self.emit("finished", message=done(result) if done is not None else None)
        return result

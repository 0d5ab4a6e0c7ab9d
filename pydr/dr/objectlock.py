"""S3 Object Lock of an item's points (policy fields lock_days and
lock_mode; docs/FORMAT.md, "Object Lock and versions").

With a lock, a cycle puts every chunk and the point index with Object Lock
retention until now + the lock + a slack, and records each object's S3
version and retain-until in the point index (version 2) and the index's in
the vault: restores read those versions, whatever was put or deleted on
the keys since. A chunk a new point reuses whose recorded retain-until
would end before the new point's lock is extended (on its version); the
slack makes that happen at most once per slack, not every cycle. Retention
and garbage collection never delete a locked version early, and do not
fail on one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from ..endpoints.s3 import SCHEME, ObjectStore
from ..errors import InvalidState, UnsupportedFile

DAY = 86400.0
#: the slack added to a lock: 10% of it, at least a day. A shared chunk's
#: retention is extended at most once per slack, and objects stay locked up
#: to a slack longer than asked.
SLACK_SHARE = 0.1
MIN_SLACK = DAY


@dataclass(frozen=True)
class LockTerms:
    """The Object Lock a point's objects get: `mode` "compliance" or
    "governance", for `seconds` from when they are put."""

    mode: str
    seconds: float

    @property
    def slack(self) -> float:
        """Seconds added to the lock (see SLACK_SHARE, MIN_SLACK)."""
        return max(self.seconds * SLACK_SHARE, MIN_SLACK)

    def until(self, now: Optional[float] = None) -> float:
        """The retain-until (POSIX seconds, whole) of an object put `now`."""
        return float(int((time.time() if now is None else now) + self.seconds + self.slack))

    def needs_extension(self, retain_until: Optional[float], now: Optional[float] = None
                        ) -> bool:
        """Whether an object locked until `retain_until` (None: not locked)
        ends its lock before a point made `now` must be kept."""
        now = time.time() if now is None else now
        return retain_until is None or retain_until < now + self.seconds

    def to_dict(self) -> dict:
        """{"mode", "seconds"}: what :meth:`from_dict` reads (a task's)."""
        return {"mode": self.mode, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, value: Optional[dict]) -> Optional["LockTerms"]:
        """The terms :meth:`to_dict` gave, None for None."""
        return None if not value else cls(str(value["mode"]), float(value["seconds"]))

    @classmethod
    def from_policy(cls, policy: Any) -> Optional["LockTerms"]:
        """The terms of a pydr.dr.policy.Policy, None when it sets no lock."""
        lock = policy.lock()
        return None if lock is None else cls(*lock)


def check_lockable_specs(replicas: Iterable[str], item: Optional[str] = None) -> None:
    """Refuse a lock unless every one of `replicas` is in an object store
    (else UnsupportedFile, exit 10) whose bucket has an Object Lock
    configuration (else InvalidState, exit 15: the bucket's state, not the
    replica's kind, is what is wrong) (asked of the server: its errors are raised as they are,
    PermissionError, ConnectionError, ...)."""
    replicas = list(replicas)
    astray = [r for r in replicas if not r.startswith(SCHEME)]
    if astray or not replicas:
        raise UnsupportedFile("Object Lock keeps the points of an object store: "
                              f"{', '.join(astray) or 'no replica'} is not one", item=item,
                              path=astray[0] if astray else None,
                              hint="leave out --lock for items replicated to disks")
    seen = set()
    for spec in replicas:
        store = ObjectStore(spec.partition("#")[0])
        if store.bucket in seen:
            continue
        seen.add(store.bucket)
        if store.lock_configuration() is None:
            raise InvalidState(f"bucket {store.bucket!r} has no Object Lock configuration: "
                                  f"its objects cannot be locked", path=f"{SCHEME}{store.bucket}",
                                  item=item, hint="use a bucket made with Object Lock enabled "
                                  "('aws s3api create-bucket --object-lock-enabled-for-bucket')")


def check_lockable(store: Any, name: str) -> None:
    """Refuse a lock for item `name` (see :func:`check_lockable_specs`);
    `store` is the open vault's Store."""
    check_lockable_specs([d["replica"] for d in store.disks(name)], item=name)


class CycleRefs:
    """The ObjectRef of each chunk a cycle's new point names, gathered as
    the upload threads go (thread-safe): the version each chunk was put as,
    or the version an earlier point or a killed cycle's upload recorded,
    its retention extended by the ChunkStore's lock where needed."""

    def __init__(self, store: Any) -> None:
        self.store = store  # the cycle's pydr.dr.chunkstore.ChunkStore
        self.refs: dict = {}
        self._lock = threading.Lock()

    def added(self, ident: bytes, ref: Any) -> None:
        """Chunk `ident` was just put as `ref`."""
        with self._lock:
            self.refs[ident] = ref

    def reuse(self, ident: bytes, ref: Any, *, ask: bool = False) -> bool:
        """Whether the new point may name chunk `ident`, stored as `ref` (an
        ObjectRef, or None: its current object), without uploading it again
        (ChunkStore.keep; with `ask`, a HEAD first says it is still there);
        its ref is then recorded."""
        with self._lock:
            if ident in self.refs:
                return True
        if ask and not self.store.has_chunk(ident, ref):
            return False
        kept = self.store.keep(ident, ref)
        if kept is None:
            return False
        with self._lock:
            self.refs.setdefault(ident, kept)
        return True

    def of(self, ids: Iterable[bytes]) -> dict:
        """{id: ObjectRef} of the chunks `ids` that have a version or a lock."""
        with self._lock:
            return {i: self.refs[i] for i in set(ids) if i in self.refs and (
                self.refs[i].version or self.refs[i].retain_until)}


def lock_store_keys(objects: ObjectStore, lock: LockTerms, now: Optional[float] = None
                    ) -> int:
    """Lock the config and the current version of every key file of an
    encrypted store as its points' chunks are locked: a point under
    Object Lock is only as safe as the keys that open it. A HEAD of each
    object (its version and retention); a retention that would end before
    a point made `now` must be kept is extended to ``lock.until(now)`` (so
    at most once per slack). A version in compliance mode stays in it. An
    object the server will not extend (gone since listed, a mode it cannot
    take) is left as it is: the next cycle tries again.

    Args:
        objects: the store (pydr.endpoints.s3.ObjectStore).
        lock: the terms of the new point's lock.
        now: the time of the point (default: now).

    Returns:
        How many objects had their retention put or extended.

    Raises:
        The S3 errors of pydr.endpoints.s3 for the list and the HEADs
        (PermissionError, ConnectionError, OSError).
    """
    from .keysearch import CONFIG, key_names

    now = time.time() if now is None else now
    extended = 0
    for name in [objects.key(CONFIG)] + key_names(objects):
        head = objects.head(name)
        if head is None or not head.get("version"):
            continue  # gone since, or no versions: nothing a retention could hold
        if not lock.needs_extension(head.get("retain_until"), now):
            continue
        mode = "compliance" if head.get("lock_mode") == "compliance" else lock.mode
        try:
            objects.set_retention(name, head["version"], mode, lock.until(now))
        except (FileNotFoundError, PermissionError):
            continue
        extended += 1
    return extended

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

import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from ..endpoints.s3 import SCHEME, ObjectStore
from ..errors import UnsupportedFile

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
        return {"mode": self.mode, "seconds": self.seconds}

    @classmethod
    def from_policy(cls, policy: Any) -> Optional["LockTerms"]:
        """The terms of a pydr.dr.policy.Policy, None when it sets no lock."""
        lock = policy.lock()
        return None if lock is None else cls(*lock)


def check_lockable_specs(replicas: Iterable[str], item: Optional[str] = None) -> None:
    """Refuse a lock (UnsupportedFile, exit 10) unless every one of
    `replicas` is in an object store whose bucket has an Object Lock
    configuration (asked of the server: its errors are raised as they are,
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
            raise UnsupportedFile(f"bucket {store.bucket!r} has no Object Lock configuration: "
                                  f"its objects cannot be locked", path=f"{SCHEME}{store.bucket}",
                                  item=item, hint="use a bucket made with Object Lock enabled "
                                  "('aws s3api create-bucket --object-lock-enabled-for-bucket')")


def check_lockable(store: Any, name: str) -> None:
    """Refuse a lock for item `name` (see :func:`check_lockable_specs`);
    `store` is the open vault's Store."""
    check_lockable_specs([d["replica"] for d in store.disks(name)], item=name)

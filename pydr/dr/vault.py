"""The vault as a caller sees it: the store (pydr.dr.store) with the DR
workflow as methods, so that a higher-level tool needs only ``pydr.Vault``.

    with pydr.Vault("/srv/vault", writer=True) as v:
        v.protect("web", [("/img/web.img", "/dr/web.img")])
        v.replicate("web")
        v.test_failover("web", "/tmp/drill", point="latest-processed")

The store itself knows no workflow (an import-linter contract keeps it so);
this class only forwards to the workflow modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence, Tuple, Union

from . import drills as D
from . import failover as F
from . import plans as plans_
from . import pointstores
from . import points as points_
from . import protection
from . import cycle as R
from . import report
from .store import Store
from .schema import init_vault as init_vault  # noqa: F401  (pydr.dr.vault.init_vault)

if TYPE_CHECKING:
    import os

    _Path = Union[str, "os.PathLike[str]"]


class Vault(Store):
    """An open vault with the DR workflow as methods.

    Args:
        directory: The vault's directory (made by :func:`pydr.init_vault`).
        writer: Take the vault's lock: one process changes a vault at a time
            (readers never wait). A writer also sets right what a killed
            command left.

    Raises:
        VaultError: `directory` is not a vault, a vault of another schema
            version, or another process holds the lock (``writer=True``).

    Use it as a context manager, from the thread that opened it::

        with pydr.Vault("/srv/vault", writer=True) as v:
            v.replicate("web")
    """

    def protect(self, name: str, disks: Iterable[Tuple[str, str]], **kwargs: Any) -> Any:
        """Register item `name` with its disks [(source, replica)]; see
        pydr.dr.protection.protect (what may be protected, and the options)."""
        return protection.protect(self, name, disks, **kwargs)

    def status(self, name: str) -> Any:
        """Item `name`'s state, health, disks, points and the operation
        running on it, as a dict (pydr.dr.report.item_status)."""
        return report.item_status(self, name)

    def replicate(self, names: str | Sequence[str], *, retry: bool = False,
                  executor: Any = None, **kwargs: Any) -> Any:
        """One replication cycle for the items `names` (a group's members
        together, every other item on its own; one point id shared by those
        that succeed); see pydr.dr.cycle.replicate. ``executor``: where the
        work runs (default: this process; a pydr.dr.fleet.FleetExecutor:
        the items' hosts). ``retry``: retry the items whose errors are
        recoverable, on the schedule of pydr.dr.retry."""
        kwargs["executor"] = executor
        names = [names] if isinstance(names, str) else list(names)
        if retry:
            return R.replicate_with_retry(self, names, **kwargs)
        return R.replicate(self, names, **kwargs)

    def materialize(self, name: str, point_id: int, directory: _Path, **kwargs: Any) -> Any:
        """Write the item's disks as they were at a point into `directory`."""
        return points_.materialize(self, name, point_id, directory, **kwargs)

    def apply_retention(self, name: str, now: float | None = None) -> Any:
        """Drop the item's points that its retention no longer keeps (as at
        `now`, epoch seconds; default: now)."""
        return points_.apply_retention(self, name, now)

    def test_failover(self, name: str, directory: _Path, point: Any = None,
                      **kwargs: Any) -> Any:
        """Bring a point of the item up as copies in `directory` (a drill),
        leaving replication running; see pydr.dr.drills.test_failover."""
        return D.test_failover(self, name, directory, point, **kwargs)

    def cleanup_test_failover(self, name, **kwargs):
        return D.cleanup_test_failover(self, name, **kwargs)

    def failover(self, name: str, point: Any = "latest", **kwargs: Any) -> Any:
        """Fail the item over to a point: its replicas become the disks to
        run; see pydr.dr.failover.failover."""
        return F.failover(self, name, point, **kwargs)

    def change_point(self, name: str, point: Any, **kwargs: Any) -> Any:
        """Move a failed-over item to another point before it is committed."""
        return F.change_point(self, name, point, **kwargs)

    def commit(self, name, **kwargs):
        return F.commit(self, name, **kwargs)

    def reprotect(self, name: str, **kwargs: Any) -> Any:
        """Replicate a committed item back, from the replicas to the sources."""
        return F.reprotect(self, name, **kwargs)

    def failback(self, name: str, **kwargs: Any) -> Any:
        """Return a reprotected item to its original direction."""
        return F.failback(self, name, **kwargs)

    def verify(self, name, point=None, sample=100.0, *, events=None, cancel=None):
        """Check an item's points where they are (the "verify" capability of
        its point store: the undo steps, signature caches and replicas of a
        step chain; the indexes and chunks of a chunk index). ``events``: an
        EventSink given "started", each replica's "progress" in phase
        "verify" and "finished"/"failed"/"cancelled"; ``cancel``: a
        threading.Event asked between steps, windows and chunks."""
        from .events import Emitter

        em = Emitter(events, "verify", name)
        verify = pointstores.point_store(self, name).require("verify")
        return em.run(lambda: verify(point, sample, events=em, cancel=cancel),
                      done=lambda r: f"{len(r['problems'])} problems")

    def collect_garbage(self, target: str, **kwargs: Any) -> Any:
        """Mark and sweep what no point names: in the point store of item
        `target`, or in the store a spec names (s3://BUCKET/PREFIX); see
        pydr.dr.pointstores.collect_garbage."""
        return pointstores.collect_garbage(self, target, **kwargs)

    def create_plan(self, name: str, groups: Sequence[Sequence[str]]) -> Any:
        """Record a recovery plan: groups of items, run one group after another."""
        return plans_.create_plan(self, name, groups)

    def run_plan(self, name: str, operation: str, **options: Any) -> Any:
        """Run an operation ("test-failover", "failover", ...) over a plan's
        groups in order; see pydr.dr.plans.run_plan."""
        return plans_.run_plan(self, name, operation, **options)

"""The vault as a caller sees it: the store (pydr.dr.store) with the DR
workflow as methods, so that a higher-level tool needs only ``pydr.Vault``.

    with pydr.Vault("/srv/vault", writer=True) as v:
        v.protect("web", [("/img/web.img", "/dr/web.img")])
        v.replicate("web")
        v.test_failover("web", "/tmp/drill", point="latest-processed")

The store itself knows no workflow (an import-linter contract keeps it so);
this class only forwards to the workflow modules.
"""

from . import drills as D
from . import failover as F
from . import plans as plans_
from . import pointstores
from . import points as points_
from . import protection
from . import replication as R
from . import report
from .store import Store, init_vault  # noqa: F401  (pydr.dr.vault.init_vault)


class Vault(Store):
    """An open vault with the DR workflow; see pydr.dr.store.Store."""

    def protect(self, name, disks, **kwargs):
        """Register item `name` with its disks [(source, replica)]; see
        pydr.dr.protection.protect (what may be protected, and the options)."""
        return protection.protect(self, name, disks, **kwargs)

    def status(self, name):
        """Item `name`'s state, health, disks, points and the operation
        running on it, as a dict (pydr.dr.report.item_status)."""
        return report.item_status(self, name)

    def replicate(self, names, *, retry=False, executor=None, **kwargs):
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

    def materialize(self, name, point_id, directory, **kwargs):
        """Write the item's disks as they were at a point into `directory`."""
        return points_.materialize(self, name, point_id, directory, **kwargs)

    def apply_retention(self, name, now=None):
        return points_.apply_retention(self, name, now)

    def test_failover(self, name, directory, point=None, **kwargs):
        return D.test_failover(self, name, directory, point, **kwargs)

    def cleanup_test_failover(self, name, **kwargs):
        return D.cleanup_test_failover(self, name, **kwargs)

    def failover(self, name, point="latest", **kwargs):
        return F.failover(self, name, point, **kwargs)

    def change_point(self, name, point, **kwargs):
        return F.change_point(self, name, point, **kwargs)

    def commit(self, name, **kwargs):
        return F.commit(self, name, **kwargs)

    def reprotect(self, name, **kwargs):
        return F.reprotect(self, name, **kwargs)

    def failback(self, name, **kwargs):
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

    def collect_garbage(self, target, **kwargs):
        """Mark and sweep what no point names: in the point store of item
        `target`, or in the store a spec names (s3://BUCKET/PREFIX); see
        pydr.dr.pointstores.collect_garbage."""
        return pointstores.collect_garbage(self, target, **kwargs)

    def create_plan(self, name, groups):
        return plans_.create_plan(self, name, groups)

    def run_plan(self, name, operation, **options):
        return plans_.run_plan(self, name, operation, **options)

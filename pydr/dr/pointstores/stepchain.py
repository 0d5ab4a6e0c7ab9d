"""The step chain: a replica plus its undo steps (pydr.dr.pointstores.base
describes the interface).

The replica holds the latest replicated state; each cycle keeps the undo
journal of what it wrote as a step (in the vault, or beside a replica on
another host). A point is the latest state with the newer steps rolled
back onto a copy, a reflink clone or a qcow2 overlay, made where the
replica is: its endpoint does the work (a file here, ``host:PATH`` over
ssh, a QEMU image, an NBD export). A failover moves the replica aside to
its baseline (".NAME.pydr-base", an atomic rename) and makes the point
from that untouched baseline, so change-point is exact after the
failed-over machine wrote to its disks."""

import os

from ...endpoints import remove_all
from ...endpoints.base import StepChainPlace
from ...engine import crashpoints, names
from ...errors import CorruptDelta
from .. import ownership
from ..replica_check import check_replicas
from .. import stepcapture, stepmerge
from .base import PointStore, files_at
from .steps import check_step, mark_step_damaged, step_named, steps_of
from .stepverify import verify_steps


def _backing(endpoint):
    """The backing file of a qcow2 overlay, else None (also for an endpoint
    with no files beside it)."""
    return endpoint.backing() if isinstance(endpoint, StepChainPlace) else None


class StepChain(PointStore):
    capture = stepcapture
    kind = "step chain"

    @classmethod
    def holds(cls, vault, name):
        return True  # the default: every item no other kind holds

    def _replica(self, disk):
        return self.vault.endpoint(self.name, disk["replica"])

    # -- a point's disks ----------------------------------------------------------
    def check_point(self, point_id):
        """Every step the point needs is there and sound (steps here read
        through, those at a remote place by size), and the replica (or its
        baseline) is the file the steps were made on (pydr.dr.replica_check)."""
        for d in self.vault.disks(self.name):
            for s in steps_of(self.vault, self.name, point_id, d["idx"]):
                check_step(self.vault, self.name, d["idx"], s)
        check_replicas(self.vault, self.name)  # the file the steps are rolled back onto

    def materialize_disk(self, point_id, disk, dest, *, threads=None, drill=False,
                         method="auto", progress=None, cancel=None):
        """At the replica's place (StepChainPlace.materialize): the steps' sizes are
        checked here, their records where they are read."""
        steps = steps_of(self.vault, self.name, point_id, disk["idx"])
        for s in steps:  # cheap: sizes; the records are checked where they are read
            check_step(self.vault, self.name, disk["idx"], s, whole=False)
        replica = files_at(self._replica(disk))
        try:
            used = replica.materialize([self.vault.endpoint(self.name, s["path"]) for s in steps],
                                       dest, drill=drill, threads=threads, method=method,
                                       progress=progress, cancel=cancel)
        except CorruptDelta as exc:
            damaged = step_named(steps, exc.path)
            if damaged is not None:
                mark_step_damaged(self.vault, self.name, disk["idx"], damaged["step"], exc)
            raise
        self.vault.note_method(used)
        return used

    def drill_on_replicas(self, directory):
        """A drill made with --as qcow2: overlays backed by the replicas."""
        for d in self.vault.disks(self.name):
            replica = self._replica(d)
            disk = directory.child(os.path.basename(replica.path))
            if disk.exists() and _backing(disk) == replica.path:
                return disk
        return None

    # -- failover -----------------------------------------------------------------------
    def bring_up_disk(self, point_id, disk, *, method="auto", progress=None, cancel=None):
        """The replica moves aside to its baseline (unless it did already),
        then the point is made from the baseline at the replica's path."""
        replica = self._replica(disk)
        base = replica.sidecar(names.BASE)
        if not base.exists():
            replica.rename(base)  # atomic; the baseline of every step
            # the rename changed its ctime: recorded (durably) before any point is
            # made from it, so that a resumed failover and change-point check it
            me = ownership.Owner(self.vault.vault_id(), self.vault.dir, self.name, disk["idx"],
                                 disk["replica"])
            ownership.record_state(me, base, writing=False, which=ownership.BASELINE)
            crashpoints.reached("failover.baseline")
        return self.materialize_disk(point_id, disk, replica, method=method, progress=progress,
                                     cancel=cancel)

    def current_method(self):
        """"qcow2" where the first failed-over disk is an overlay on its baseline."""
        for d in self.vault.disks(self.name):
            replica = self._replica(d)
            if replica.exists() and _backing(replica) == replica.sidecar(names.BASE).path:
                return "qcow2"
        return "auto"

    # -- letting points go ------------------------------------------------------------
    def release(self):
        """The undo steps no kept point needs (the oldest kept point needs
        none of its own): the files first, then their records; a host that
        cannot be reached keeps its steps, with a warning on the item."""
        vault, name = self.vault, self.name
        doomed = []
        for d in vault.disks(name):
            oldest = vault.oldest_point_step(name, d.idx)
            if oldest is None:
                oldest = vault.current_step(name, d.idx)
            doomed += [(d.idx, s.step, s.path) for s in vault.steps(name, d.idx, upto=oldest)]
        failed = set()

        def unreachable(ep, exc):  # that host keeps its steps until a later retention
            failed.add(ep.place)
            vault.set_item(name, health="warning",
                           last_error=f"could not drop old steps on {ep.place}: {exc}")

        steps = [(idx, step, vault.endpoint(name, path)) for idx, step, path in doomed]
        remove_all([ep for _, _, ep in steps], on_error=unreachable)
        with vault.transaction():
            for idx, step, ep in steps:
                if ep.place not in failed:
                    vault.drop_step(name, idx, step)

    thin_waits = True  # a merged step would be merged again each cycle

    def thin(self, point_ids):
        """The points' records go, and on each disk every run of undo steps
        between two states that remaining points are at becomes one merged
        step (pydr.dr.stepmerge, crash-safe: merged files, one transaction,
        then the old files); then :meth:`release`. Steps on another host, or
        that cannot be merged exactly, stay as they are, with a note."""
        notes = stepmerge.thin(self.vault, self.name, point_ids, check_step=check_step).notes
        self.release()
        return notes

    def discard(self):
        """Every step and baseline goes; a qcow2 overlay on its baseline is
        first flattened into it (one raw disk)."""
        notes = []
        steps = [s.path for s in self.vault.steps(self.name)]
        replicas = [self._replica(d) for d in self.vault.disks(self.name)]
        for replica in replicas:  # an overlay on its baseline becomes one raw disk
            base = replica.sidecar(names.BASE)
            if replica.exists() and base.exists() and _backing(replica) == base.path:
                replica.flatten(base)
                notes.append(f"flattened the qcow2 overlay {replica} into its baseline "
                             "(qemu-img commit): one raw disk")
        remove_all([self.vault.endpoint(self.name, p) for p in steps]
                   + [r.sidecar(names.BASE) for r in replicas])
        return notes

    # -- capabilities ------------------------------------------------------------------
    def verify(self, point_id=None, sample=100.0, *, events=None, cancel=None):
        """Every step read through, the signature caches and the replicas
        read back (pydr.dr.pointstores.stepverify)."""
        return verify_steps(self.vault, self.name, point_id, sample, events=events,
                            cancel=cancel)

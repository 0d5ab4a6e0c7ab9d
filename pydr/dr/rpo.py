"""The recovery point objective (RPO) of an item, and what a point's cut
makes it (its consistency label).

The RPO is the age of the newest data that can be restored: ``now`` minus
the time the newest undamaged point's data was taken -- its cut
(``points.cut_at``, stamped by pydr.dr.agent.cut when the disks were cut),
not when the cycle recorded it (``points.created``, later by the cycle's
length). A point made before schema 9 has no cut time; its ``created``
stands in: later than its data by its cycle's length, by which its RPO
reads too small.

Across failover, commit and reprotect the RPO keeps that one meaning, in
whichever direction the item replicates:

* protected (forward, or reverse after a reprotect): the newest point's age;
* a drill, a failover, failed over: the points stay, nothing new is
  replicated, so the RPO grows -- what the running disks write is in no
  point, and a change-point can still bring back only the points;
* committed (``failover-committed``, and ``protecting`` until the first
  cycle of the reprotect records a point): the points are gone, nothing can
  be restored: ``rpo_seconds`` is None, which a caller must read as
  "unprotected", never as 0;
* after the reprotect's first cycle: the points of the new direction (the
  old site's copy of the disks that now run at the other site).

``last_success_at`` is when the item's last cycle that made a point ended
(``items.last_success_at``), whichever direction it ran; a commit keeps it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable, NamedTuple, Optional

if TYPE_CHECKING:
    from .store import Store

#: the consistency labels of points, weakest first
CONSISTENCIES = ("inconsistent", "disk-consistent", "crash-consistent", "app-consistent")

#: the cuts that take a disk at one instant: a reflink clone ("reflink"), a
#: QMP transaction of a live disk's bitmap and fleecing export ("fleece"), a
#: qcow2 image's new dirty bitmap while no QEMU can write it ("bitmap"). Each
#: takes ONE disk: several disks (an item's, a group's members') are cut one
#: after the other (pydr.dr.agent.cut; a fleet's or an object store's group:
#: each member on its own), so they are at different instants
INSTANT_CUTS = ("reflink", "fleece", "bitmap")
#: the cuts of a libvirt domain: ONE backup job takes all its disks at one
#: instant (libvirt starts them in one QMP transaction), "checkpoint-frozen"
#: with the guest's file systems frozen by its agent around it
#: (pydr.dr.checkpoints); :func:`disks_cut_together` counts such a domain once
CHECKPOINT_CUTS = ("checkpoint", "checkpoint-frozen")


class RpoFacts(NamedTuple):
    """An item's recovery point facts, as :func:`rpo_facts` finds them.

    latest_point: the id of its newest undamaged point, or None.
    latest_point_at: when that point's data was taken (epoch seconds), or None.
    rpo_seconds: the age of that data at ``now`` (0 or more), or None when
        no point can be restored (the item is unprotected).
    last_success_at: when its last cycle that made a point ended (epoch
        seconds), or None.
    """

    latest_point: Optional[int]
    latest_point_at: Optional[float]
    rpo_seconds: Optional[float]
    last_success_at: Optional[float]


def rpo_facts(store: Store, name: str, *, now: Optional[float] = None) -> RpoFacts:
    """The RPO facts of item `name` (see the module's docstring for what
    they mean across failover, commit and reprotect).

    store: an open vault (pydr.dr.store.Store, or a Vault).
    name: the item.
    now: the time to measure the RPO at (epoch seconds; default: the
        clock). A `now` before the point's data gives an RPO of 0.

    Returns an :class:`RpoFacts`. The newest point is the newest one not
    known to be damaged: the one failover's "latest" brings up.

    Raises pydr.errors.UnknownName if `name` is not protected, VaultError
    if the vault cannot be read.
    """
    store = getattr(store, "store", store)  # a Vault: its points are PointInfo, read the records
    row = store.item(name)
    sound = [p for p in store.points(name) if not p.damaged]
    if not sound:
        return RpoFacts(None, None, None, row.last_success_at)
    latest = sound[-1]
    at = latest.data_time
    now = time.time() if now is None else now
    return RpoFacts(latest.id, at, max(0.0, now - at), row.last_success_at)


def consistency_of(cut: str, *, hooks_ran: bool, disks: int = 1) -> str:
    """The consistency label of a point whose disks were cut by `cut` (the
    points.cut column), `hooks_ran` telling whether the items' quiesce
    hooks ran before it, `disks` how many disks were cut with it (every
    disk of the items recorded together: an item's, or its group's members'
    in the call; :func:`disks_cut_together`):

    * "app-consistent": the quiesce hooks ran, then either each disk was
      cut at one instant while the writers were paused (the thaw comes after
      the last disk's cut) or (cut "quiesce") the writers stayed paused for
      the whole read;
    * "app-consistent" also: a libvirt domain cut "checkpoint-frozen" (its
      guest agent froze its file systems around the backup job's start),
      alone in the unit;
    * "crash-consistent": one disk, cut at one instant
      (:data:`INSTANT_CUTS`), or one libvirt domain's disks, all at the
      backup job's one instant (:data:`CHECKPOINT_CUTS`): what a power cut
      would leave;
    * "disk-consistent": several disks, each cut at one instant but one
      after the other (no cut of pydr takes several disks in one atomic
      step): each disk is what a power cut would leave on it, but not at
      the same instant as the others -- an application whose data spans
      disks (a database and its log, a volume group, a RAID set) may not
      recover from it; give the items hooks for app-consistent points;
    * "inconsistent": cut "none": the disks were read while they may have
      changed, so blocks of different moments may be mixed (exact only if
      nothing wrote during the cycle).
    """
    if cut == "checkpoint-frozen" and disks <= 1:
        return "app-consistent"  # frozen by the guest's agent at the job's one instant
    if cut == "quiesce" or (hooks_ran and cut in INSTANT_CUTS + CHECKPOINT_CUTS):
        return "app-consistent"
    if cut in INSTANT_CUTS + CHECKPOINT_CUTS:
        return "crash-consistent" if disks <= 1 else "disk-consistent"
    return "inconsistent"


def disks_cut_together(store: Store, names: Iterable[str]) -> int:
    """How many disks the items `names` have: the disks a cycle cut and
    recorded together when `names` are the items of one unit (an item, or
    its group's members in the call), to give :func:`consistency_of`. A
    libvirt domain counts once: its disks are cut at one instant."""
    machine = getattr(store, "machine", None)

    def instants(name):
        row = machine(name) if machine is not None else None
        return 1 if row is not None and row.kind == "libvirt" else len(store.disks(name))

    return sum(instants(name) for name in names)


def weakest(labels: Iterable[Optional[str]]) -> Optional[str]:
    """The weakest of consistency `labels` (None ones ignored), or None
    when there is none: what a call that made several points can promise of
    all of them."""
    known = [label for label in labels if label is not None]
    if not known:
        return None
    return min(known, key=lambda label: CONSISTENCIES.index(label)
               if label in CONSISTENCIES else -1)

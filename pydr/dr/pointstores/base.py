"""The point store interface: where one item's disks and their recovery
points live, and what the workflow (points, drills, failover, the vault)
may ask of it. These docstrings are the reference.

A point store is opened for one item of an open vault
(``pydr.dr.pointstores.point_store(vault, name)``); the workflow records
the item's state and jobs around the calls and never asks which kind of
store it has. Two kinds exist:

- the step chain (pydr.dr.pointstores.stepchain): a replica plus its undo
  steps, on this machine, an ssh host, a QEMU image or an NBD export;
- the chunk index (pydr.dr.pointstores.chunkindex): 4 MiB chunks and one
  point index a point, in an object store.

Every method can be run again after a kill: it finishes the work or finds
it done. A point's disk appears whole, by a rename, or not at all.

Optional capabilities (:data:`PointStore.CAPABILITIES`) are methods that a
kind may leave as None; a caller asks ``store.can("verify")`` or takes the
method with ``store.require("collect_garbage")``, which raises
UnsupportedFile naming the item when the kind lacks it.
"""

import os

from ...endpoints.base import StepChainPlace
from ...errors import InvalidArgument, InvalidState, UnsupportedFile


def files_at(endpoint):
    """`endpoint` where pydr keeps and makes files itself (a StepChainPlace:
    a file here, host:PATH, a QEMU image), or UnsupportedFile naming it (an
    NBD export, a live disk: no files beside it)."""
    if not isinstance(endpoint, StepChainPlace):
        raise UnsupportedFile(f"{endpoint} has no files beside it (an NBD export or a live "
                              f"disk): points are not made or kept there", path=endpoint.spec)
    return endpoint


def protected_disks(vault):
    """{identity: what it is} of every source and replica of the vault: a
    point is never materialised or brought up over one of them."""
    out = {}
    for item in vault.items():
        for d in vault.disks(item):
            for role in ("source", "replica"):  # files here by their real path, others as given
                spec = d[role]
                key = os.path.realpath(spec) if spec.startswith("/") else spec
                out.setdefault(key, f"{role} of item {item!r}, disk {d['idx']}")
    return out


class PointStore:
    """The points of item `name` of `vault` (a pydr.dr.vault.Vault, open)."""

    #: How the kind is named in messages ("step chain", "chunk index").
    kind = None

    #: The module that captures a cycle into this kind (pydr.dr.cycle
    #: documents what it offers: check, capture, task, adopt); a kind
    #: without one is refused by the driver (exit 10, naming the item).
    capture = None

    #: Optional methods, by name: None where the kind cannot do it.
    CAPABILITIES = {
        "capture": "capture a replication cycle",
        "verify": "check the item's points where they are",
        "collect_garbage": "collect garbage (unreferenced chunks)",
    }

    def __init__(self, vault, name):
        self.vault, self.name = vault, name

    def __repr__(self):
        return f"<{type(self).__name__} of {self.name!r}>"

    # -- which items ---------------------------------------------------------------
    @classmethod
    def holds(cls, vault, name):
        """Whether this kind holds the points of item `name` (asked in the
        order of pydr.dr.pointstores.KINDS; the last kind holds the rest)."""
        raise NotImplementedError

    @classmethod
    def check_records(cls, vault, name):
        """VaultDamaged (exit 14, naming the item) unless what the vault
        records of item `name` (its replicas' specs, its points) is all of
        this kind, which holds it: a spec edited to another kind must not
        send a cycle or a restore elsewhere. Nothing to check by default."""

    @classmethod
    def collector_at(cls, vault, spec):
        """collect_garbage for the whole store that `spec` names (such as
        s3://BUCKET/PREFIX, shared by items), or None: not a spec of this
        kind's stores (the default)."""
        return None

    # -- capabilities ----------------------------------------------------------------
    def can(self, capability):
        """Whether the optional method `capability` (a key of CAPABILITIES) is
        there."""
        if capability not in self.CAPABILITIES:
            raise ValueError(f"no point store capability named {capability!r}")
        return getattr(self, capability) is not None

    def require(self, capability):
        """The bound method `capability`, or UnsupportedFile (exit 10) naming
        the item and its kind."""
        if not self.can(capability):
            raise UnsupportedFile(f"item {self.name!r} keeps its points in a {self.kind}, "
                                  f"which cannot {self.CAPABILITIES[capability]}",
                                  path=self.vault.dir)
        return getattr(self, capability)

    verify = None
    """verify(point_id=None, sample=100.0, *, events=None, cancel=None) ->
    report dict with "problems" (``events``: an Emitter of pydr.dr.events;
    ``cancel``: a threading.Event, Cancelled once set):
    read back the item's points (all, or `point_id`'s; a random `sample`
    percent) and check them against what the vault recorded. Damage found
    marks the points that need it; a report never says "sound" for bytes
    it did not read (it counts what it checked)."""

    collect_garbage = None
    """collect_garbage(*, grace, dry_run=False, now=None) -> report dict:
    remove what no recorded point names and that is older than `grace`
    seconds (a running cycle's may be younger)."""

    def refuse_writes_under_drill(self, what):
        """Refuse `what` (a cycle, a failover) while a drill's qcow2 overlays
        read the replicas as their backing files: it would change the
        drill's disks under it."""
        row = self.vault.item(self.name)
        disk = None
        if row["test_dir"]:
            disk = self.drill_on_replicas(self.vault.endpoint(self.name, row["test_dir"]))
        if disk is not None:
            raise InvalidState(f"the test failover of {self.name!r} is a qcow2 overlay on the "
                               f"replica ({disk}): {what} would change the drill's disks under "
                               f"it", path=self.vault.dir, item=self.name,
                               hint=f"run 'pydr cleanup-test-failover {self.name}' first")

    # -- a point's disks ----------------------------------------------------------
    def check_point(self, point_id):
        """Refuse point `point_id` (DamagedJournal / DamagedPoint, exit 7,
        naming the file and the offset) unless what it is made from is there
        and as recorded, before anything is written or renamed. The point's
        own damage mark is the caller's check (pydr.dr.points.check_point)."""
        raise NotImplementedError

    def materialize_disk(self, point_id, disk, dest, *, threads=None, drill=False,
                         method="auto", progress=None, cancel=None):
        """Write disk `disk` (a row of the vault's disks) as it was at
        `point_id` to the endpoint `dest`, whole (replaced by a rename), by
        `method`: "auto", "copy", "reflink", "qcow2" (an overlay on the
        latest state) where the kind can, else UnsupportedFile. ``drill``: a
        test failover's disk, never written over a file. Returns the method
        used (also noted on the job with vault.note_method). Damage found on
        the way marks the points that need it. ``cancel`` (a threading.Event)
        stops the work (Cancelled), `dest` left as it was."""
        raise NotImplementedError

    def drill_on_replicas(self, directory):
        """The first disk the item's drill in `directory` (an endpoint) made
        that reads a replica as its backing file (a qcow2 overlay), or None:
        while there is one, the replicas must not be written or moved."""
        return None

    def remove_drill(self, directory, disks):
        """Remove the drill disks `disks` (endpoints in `directory`, also
        half-made ones), then `directory` if that empties it."""
        files_at(directory).remove_drill(disks)

    # -- failover -----------------------------------------------------------------------
    def failover_dir(self, to):
        """The directory a failover brings the disks up in, from its --to
        option (`to`, or None): None where they come up at the replicas'
        paths. ValueError when `to` is wrong for this kind."""
        if to is not None:
            raise InvalidArgument("a failover directory is for items replicated to an object "
                                  "store: the others fail over at their replicas' paths",
                                  item=self.name, hint="leave out --to")
        return None

    def bring_up_disk(self, point_id, disk, *, method="auto", progress=None, cancel=None):
        """Failover and change-point, one disk: make the place the item's
        machine uses for disk `disk` hold point `point_id`, by `method`
        (made again each time: exact even after the failed-over machine
        wrote to it). Returns the method used."""
        raise NotImplementedError

    def current_method(self):
        """How the failed-over disks were made, as far as making them again
        matters (change-point keeps it): "qcow2" or "auto"."""
        return "auto"

    # -- letting points go ------------------------------------------------------------
    #: Whether thinning a point rewrites what thinning the next one would
    #: rewrite again (merged undo steps): then retention lets a point go
    #: only once its newer kept neighbour is kept for good
    #: (pydr.dr.points.apply_retention).
    thin_waits = False

    def thin(self, point_ids):
        """Retention tiers let the points `point_ids` go from the middle of
        the item's points (older ones stay): their records go, and what
        only they needed. By default: the records in one transaction, then
        :meth:`release` (a chunk index: their point indexes). A step chain
        merges each one's undo step into its newer neighbour instead
        (pydr.dr.stepmerge). Returns notes for a person (what was kept
        unmerged, and why); ids the item no longer has are skipped."""
        point_ids = list(point_ids)
        if point_ids:
            with self.vault.transaction():
                self.vault.drop_points(self.name, point_ids)
        self.release()
        return []

    def release(self):
        """Retention, after the vault dropped the records of points no longer
        kept: remove what only they needed (the records last, so that a kill
        leaves records a later retention finds again). What cannot be
        reached now stays for a later retention, with a warning on the item."""
        raise NotImplementedError

    def discard(self):
        """Commit of a failover: every point goes, and what they were made
        from (steps, baselines, indexes); the failed-over disks become the
        item's plain disks. Returns notes (text) for the person."""
        raise NotImplementedError

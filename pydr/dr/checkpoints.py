"""Changed-block tracking of a libvirt domain: libvirt's checkpoints, cut
by one pull-mode backup job for all the domain's disks (docs/MACHINES.md,
"Checkpoints and backup jobs").

Each disk of a libvirt item has a tracker (:class:`LibvirtTracker`, kind
"libvirt") with the shape of pydr.dr.tracking's, so that the cut
(pydr.dr.agent.cut) and the captures stay per disk; the trackers of one
domain share one :class:`DomainSession`, which does the domain's work once:

* before the cut: a backup job a killed pydr left is aborted (another
  tool's is refused, MachineError); the recorded checkpoint (pydr-V-N, V the
  vault's id: another vault's are never touched; the
  disks' ``bitmap``) must exist and record every qcow2 disk, else
  TrackingLost (the item becomes resync-required: ``replicate --resync``
  starts a fresh chain); pydr's other checkpoints, left by a kill, are
  deleted (libvirt's checkpoint bitmaps are all active: each records every
  write since it was made, so deleting one loses nothing the others need);
* the cut: the guest's file systems frozen through its agent (bounded: a
  watchdog thaws), one ``backupBegin`` making checkpoint pydr-(N+1) and
  exporting every disk as of that instant (the qcow2 disks with their
  changes since pydr-N as ``qemu:dirty-bitmap:backup-TARGET``; a raw disk,
  which cannot hold a bitmap, whole every cycle), then the thaw;
* the job ends (abortJob) when the last disk's read ends, on every path;
* record: pydr-(N+1) is each disk's checkpoint; commit: pydr-N is deleted;
  abort (the cycle failed): pydr-(N+1) is deleted, pydr-N still records
  everything since it was made: nothing lost.

A shut-off domain is read from its disk files (nothing writes them): a full
compare, its checkpoint kept as it is; a domain found running after the
read fails the cycle (MachineError, nothing recorded: a raw file has no
lock that keeps QEMU from starting on it). A domain never seen running has
no checkpoint: its first cycle while it runs is a full one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from typing import Dict, Optional

from ..errors import MachineError, TrackingLost
from .tracking import Cut, Tracker, register

_log = logging.getLogger(__name__)

#: how long a guest's file systems may stay frozen at a cut (seconds)
FREEZE_BOUND = 10.0
#: the disk formats in which libvirt keeps a checkpoint's bitmap
BITMAP_FORMATS = ("qcow2",)

# the sessions being built: (id of the vault, item) -> DomainSession; a
# tracker joins the newest session of its item unless it has its disk already
_SESSIONS: Dict[tuple, "DomainSession"] = {}


def _generation_of(name: str, prefix: str) -> Optional[int]:
    """N of checkpoint `name` when it is PREFIX-N of this vault's (`prefix`), else None."""
    number = name[len(prefix):] if name.startswith(prefix) else ""
    return int(number) if number.isdigit() else None


class DomainSession:
    """The work on one domain that its disks' trackers share in a cycle."""

    def __init__(self, vault, item, domain):
        self.vault, self.item, self.domain = vault, item, domain
        self.trackers: Dict[int, "LibvirtTracker"] = {}
        self.validated = False
        self.began = False
        self.running = None
        self.job = None
        self.stack = None
        self.open_cuts = 0
        self.checkpoint = None  # the one this cycle made
        self.generation = None
        self.xml = None  # the domain's inactive XML at the cut
        self.nonce = secrets.token_hex(8)  # the description of the checkpoint it makes
        self.vouch = None  # JSON: the checkpoint, its creation time, its disks' files and sizes
        self.frozen = False
        self.committed = self.aborted = False

    @property
    def where(self):
        return self.domain.where

    @property
    def vault_id(self):
        """The vault's id, in its checkpoints' and backup jobs' names."""
        return str(self.vault.vault_id())

    @property
    def prefix(self):
        """How this vault's checkpoints of the domain are named (then N)."""
        from ..endpoints.libvirt import checkpoint_prefix

        return checkpoint_prefix(self.vault_id)

    def recorded(self):
        """The checkpoint the vault records for the domain's disks (one for
        all; disks that disagree mean lost tracking)."""
        names = {t.current for t in self.trackers.values()}
        if len(names) != 1:
            raise TrackingLost(f"the disks of domain {self.domain.name!r} record different "
                               f"checkpoints ({sorted(map(str, names))})", path=self.where)
        return names.pop()

    def bitmapped(self):
        """The targets of the disks whose changes a checkpoint records, and
        of those read whole every cycle (not qcow2: raw)."""
        from ..endpoints.libvirt import xml_disks

        formats = {d["target"]: d["format"] for d in xml_disks(self.domain.live_xml())}
        targets = [t.target for _, t in sorted(self.trackers.items())]
        tracked = [t for t in targets if formats.get(t) in BITMAP_FORMATS]
        return tracked, [t for t in targets if t not in tracked]

    def vault_targets(self):
        """The targets of the disks the vault protects of the domain."""
        from ..endpoints.libvirt import is_libvirt_spec, parse_spec

        disks = self.vault.disks(self.item) if self.vault is not None else []
        targets = {parse_spec(d["source"])[1] for d in disks if is_libvirt_spec(d["source"])}
        return targets or {t.target for t in self.trackers.values()}

    def check_disks(self):
        """TrackingLost unless the domain's disks, as it runs and as it is
        configured, are the disks the vault protects (a disk plugged in,
        taken out or renamed: a point would name a disk it has no copy of)."""
        from ..endpoints.libvirt import xml_disks

        protected = self.vault_targets()
        configured = {d["target"] for d in xml_disks(self.domain.inactive_xml())
                      if d["device"] == "disk"}
        live = configured if not self.domain.running() else {
            d["target"] for d in xml_disks(self.domain.live_xml()) if d["device"] == "disk"}
        if live != protected or configured != protected:
            raise TrackingLost(
                f"the disks of domain {self.domain.name!r} changed: the vault protects "
                f"{sorted(protected)}, the domain runs {sorted(live)} and is configured with "
                f"{sorted(configured)}", path=self.where,
                hint="a disk plugged in or renamed is not protected: the item must be "
                     "protected again with the domain's disks as they are (pydr has no "
                     "command yet to add a disk to an item); a disk taken out: put it back")

    def vouched(self):
        """What the vault's newest point of the item records of its
        checkpoint: {"name", "created", "disks": {target: {"source",
        "capacity"}}}, or None (no point, or one of a shut-off domain that
        never had a checkpoint)."""

        store = getattr(self.vault, "store", self.vault)  # a Vault, or its Store
        points = store.points(self.item) if store is not None else []
        row = store.point_machine(self.item, points[-1].id) if points else None
        if row is None or not row.checkpoint:
            return None
        try:
            found = json.loads(row.checkpoint)
        except ValueError:
            found = None
        if not isinstance(found, dict) or not isinstance(found.get("disks"), dict):
            raise TrackingLost(f"point {points[-1].id} of {self.item!r} does not record what "
                               f"checkpoint {row.checkpoint!r} vouches for", path=self.where)
        return found

    def check_vouched(self, current):
        """TrackingLost unless checkpoint `current` is the one the vault
        recorded (same creation time: not deleted and made again) and each
        disk is still the file, of the size, it was at that cut (targets
        swapped, a source re-pointed, a disk resized: its bitmap says
        nothing about the disk as it is)."""
        record = self.vouched()
        if record is None or record.get("name") != current:
            raise TrackingLost(f"the vault records no cut of domain {self.domain.name!r} at "
                               f"checkpoint {current}", path=self.where)
        created = self.domain.checkpoint_identity(current)
        if created != record.get("created"):
            raise TrackingLost(f"checkpoint {current} of domain {self.domain.name!r} was made "
                               f"again (it is {created!r}, the vault's was "
                               f"{record.get('created')!r}: creation time/pydr's nonce): it "
                               f"misses what changed before", path=self.where)
        now = self.domain.disk_facts()
        for target, was in sorted(record["disks"].items()):
            is_ = now.get(target)
            if is_ is None:
                raise TrackingLost(f"domain {self.domain.name!r} has no disk {target} any "
                                   f"more", path=self.where)
            if is_["source"] != was.get("source"):
                raise TrackingLost(f"disk {target} of domain {self.domain.name!r} is now "
                                   f"{is_['source']} (it was {was.get('source')} at checkpoint "
                                   f"{current})", path=self.where)
            if is_["capacity"] != was.get("capacity"):
                raise TrackingLost(f"disk {target} of domain {self.domain.name!r} was resized "
                                   f"({was.get('capacity')} -> {is_['capacity']} bytes) since "
                                   f"checkpoint {current}: its bitmap cannot be trusted",
                                   path=self.where)

    def validate(self):
        """TrackingLost unless the recorded checkpoint exists, records
        every disk that can be tracked, and vouches for the disks as they
        are (:meth:`check_vouched`), and the domain's disks are the vault's
        (once a session). No checkpoint recorded (the domain was shut off at
        every cycle): nothing to validate, the cycle is full."""
        if self.validated:
            return
        self.check_disks()
        current = self.recorded()
        if current is None:
            self.validated = True
            return
        self.domain.clear_stale_job(self.vault_id)  # a killed cycle's job holds the bitmaps
        found = self.domain.checkpoints()
        if current not in found:
            raise TrackingLost(f"checkpoint {current} of domain {self.domain.name!r} is missing "
                               f"(deleted, or the domain was redefined)", path=self.where)
        tracked, _ = self.bitmapped()
        for target in tracked:
            if found[current].get(target, "no") != "bitmap":
                raise TrackingLost(f"checkpoint {current} of domain {self.domain.name!r} does "
                                   f"not record disk {target}", path=self.where)
        if self.domain.running():
            self.check_vouched(current)
        self.validated = True

    def begin(self, full):
        """The cut of every disk of the domain (once a session)."""
        if self.began:
            return
        self.began = True
        self.check_disks()
        current = self.recorded() if not full else next(
            iter({t.current for t in self.trackers.values()}))
        self.running = self.domain.running()
        if not self.running:  # nothing writes its disks: read the files, keep the checkpoint
            self.checkpoint, self.generation = current, max(
                t.generation for t in self.trackers.values())
            self.xml = self.domain.inactive_xml()
            if current is not None:  # what it vouches for is unchanged: carried on
                record = self.vouched()
                self.vouch = None if record is None else json.dumps(record, sort_keys=True)
            return
        self.domain.clear_stale_job(self.vault_id)
        if not full:
            self.validate()
        found = self.domain.checkpoints()
        for name in found:  # left by a killed cycle or a failed commit: nothing is lost
            if _generation_of(name, self.prefix) is not None and name != current:
                self.domain.delete_checkpoint(name)
        known = [t.generation for t in self.trackers.values()]
        known += [_generation_of(n, self.prefix) for n in found
                  if _generation_of(n, self.prefix) is not None]
        self.generation = max(known) + 1
        self.checkpoint = f"{self.prefix}{self.generation}"
        tracked, whole = self.bitmapped()
        machine = self.vault.machine(self.item) if self.vault is not None else None
        freeze = bool(machine is not None and machine.agent)
        if freeze:
            self.domain.thaw_left()  # a kill while frozen (its watchdog thaws it too)
        self.stack = contextlib.ExitStack()
        try:
            self.job = self.stack.enter_context(self._backup(current if not full else None,
                                                             tracked, whole, freeze))
        except MachineError as exc:
            self.stack.close()
            if not full and "bitmap" in str(exc):
                raise TrackingLost(f"libvirt cannot use checkpoint {current} of domain "
                                   f"{self.domain.name!r}: {exc}", path=self.where) from None
            raise
        self.frozen = self.job.frozen
        try:
            self.xml = self.domain.inactive_xml()
            self.vouch = json.dumps({"name": self.checkpoint,
                                     "created": self.domain.checkpoint_identity(self.checkpoint),
                                     "disks": self.domain.disk_facts()}, sort_keys=True)
        except BaseException:
            self.end()
            raise

    @contextlib.contextmanager
    def _backup(self, incremental, tracked, whole, freeze):
        """The backup job; a guest whose agent does not answer the freeze is
        cut unfrozen (the point then says so: crash-consistent)."""
        try:
            with self.domain.backup(self.checkpoint, incremental=incremental, tracked=tracked,
                                    full_only=whole, freeze=freeze,
                                    freeze_bound=FREEZE_BOUND, vault_id=self.vault_id, nonce=self.nonce) as job:
                yield job
                return
        except MachineError as exc:
            if not freeze or "freez" not in str(exc) or self.job is not None:
                raise
            _log.warning("%s: cut without freezing", exc)
        with self.domain.backup(self.checkpoint, incremental=incremental, tracked=tracked,
                                full_only=whole, freeze=False, freeze_bound=FREEZE_BOUND,
                                vault_id=self.vault_id, nonce=self.nonce) as job:
            yield job

    def end(self):
        """End the backup job (abortJob); nothing when none runs."""
        stack, self.stack = self.stack, None
        if stack is not None:
            stack.close()

    def commit(self, old):
        """The point is recorded: the checkpoint it replaced goes (once),
        and the session's connection."""
        if self.committed:
            return
        self.committed = True
        if self.running and old is not None and old != self.checkpoint:
            try:
                self.domain.delete_checkpoint(old)
            except Exception as exc:  # the next cycle deletes it
                _log.warning("checkpoint %s of domain %r not deleted: %s", old,
                             self.domain.name, exc)
        self.domain.close()

    def abort(self):
        """The cycle failed: its checkpoint goes, the recorded one records on (once)."""
        if self.aborted or self.committed or not self.running or self.checkpoint is None:
            return
        self.aborted = True
        self.end()
        with contextlib.suppress(Exception):  # else the next cycle deletes it
            self.domain.delete_checkpoint(self.checkpoint)
        self.domain.close()

    def point_machine(self, store, point_id):
        """In the point's transaction: its machine row (XML at the cut,
        frozen, checkpoint)."""
        store.add_point_machine(self.item, point_id, self.xml, frozen=self.frozen,
                                checkpoint=self.vouch)


def session_for(vault, item, idx, domain):
    """The session the tracker of disk `idx` of `item` joins."""
    key = (id(vault), item)
    session = _SESSIONS.get(key)
    if session is None or idx in session.trackers:
        session = _SESSIONS[key] = DomainSession(vault, item, domain)
    return session


class LibvirtTracker(Tracker):
    """A disk of a libvirt domain, tracked by the domain's checkpoints
    (its session does the domain's work; see the module's docstring)."""

    kind = "libvirt"
    #: a lost chain fails the cycle with TrackingLost (exit 19), after the
    #: item is marked resync-required
    raise_when_lost = True

    def __init__(self, vault, item, disk, source):
        super().__init__(vault, item, disk, source)
        self.target = source.target
        self.session = session_for(vault, item, disk["idx"], source.domain)
        self.session.trackers[disk["idx"]] = self

    @property
    def cut_kind(self):
        """How this disk was cut: "checkpoint-frozen" when the guest's file
        systems were frozen at it, else "checkpoint" (the session's disks
        at one instant)."""
        return "checkpoint-frozen" if self.session.frozen else "checkpoint"

    def validate(self):
        self.session.validate()

    def normalize(self, found=None):
        return {}  # the session deletes a killed cycle's checkpoints

    @contextlib.contextmanager
    def cut(self, full):
        from ..endpoints.base import DeviceEndpoint
        from ..endpoints.qemu import NbdEndpoint

        s = self.session
        self.full = full or self.current is None
        s.open_cuts += 1
        try:
            s.begin(self.full)
            self.new, self.generation = s.checkpoint, s.generation
            self.frozen = None if self.full else self.current
            if not s.running:
                with self.source.file_endpoint().engine_disk() as dev:
                    yield Cut(DeviceEndpoint(dev, self.where), None)
                if s.domain.running():  # started under the read (a raw file has no lock)
                    raise MachineError(
                        f"domain {s.domain.name!r} was started while pydr read disk "
                        f"{self.target} from its file: the copy is not of one instant, no "
                        f"point is recorded", path=self.where,
                        hint="run the same command again (the running domain is cut by a "
                             "backup job)")
                return
            bitmap = s.job.bitmap(self.target) if not self.full else None
            tracked, _ = s.bitmapped() if bitmap else ([], [])
            if self.target not in tracked:
                bitmap = None  # a raw disk: read whole
            with NbdEndpoint(s.job.uri(self.target)).engine_disk(bitmap=bitmap) as dev:
                yield Cut(DeviceEndpoint(dev, self.where),
                          self.dirty_extents(dev) if bitmap else None)
        finally:
            s.open_cuts -= 1
            if s.open_cuts == 0:
                s.end()

    def record(self, _db=None):
        if self.vault is not None and self.new is not None:
            self.vault.set_bitmap(self.item, self.disk["idx"], self.new, self.generation)

    def commit(self):
        old, self.current = self.current, self.new
        self.session.commit(old)

    def abort(self):
        # also when the cut itself was interrupted (SIGTERM inside the job's
        # start): the session knows whether it made a checkpoint to drop
        self.session.abort()
        self.new = self.frozen = None

    def point_extra(self):
        """What the cycle records with the point: the domain's machine row."""
        return self.session.point_machine


register("libvirt", LibvirtTracker)

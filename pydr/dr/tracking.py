"""Changed-block tracking: QEMU dirty bitmaps, so that a replication cycle
reads what changed since the last one, not the whole disk.

A tracked disk has one bitmap recording its writes ("current", named
pydr-GENERATION, recorded in the vault). At a cut a new bitmap starts
recording and the current one is frozen, at one instant; the cycle compares
only the frozen bitmap's extents; once the point is recorded the frozen
bitmap is dropped. If the cycle fails, the frozen bitmap is merged into the
new one, so no change is ever lost; a kill leaves bitmaps that the next cut
merges back the same way. A bitmap that is missing, in use or inconsistent
(QEMU killed, the image moved or restarted) is lost tracking: the item
becomes resync-required, and a checksum resync starts a fresh bitmap.

Three kinds (docs/QEMU.md; the third docs/MACHINES.md):
  * qcow2: a qcow2 image's persistent bitmaps, with qemu-img bitmap; the
    image must not be open read-write elsewhere during a cycle;
  * qmp: a live disk, qmp:SOCKET:NODE: non-persistent bitmaps by QMP, the
    cut one QMP transaction with the fleecing export it is read through.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from ..engine.bindings import NBD_DIRTY
from ..errors import InvalidArgument, TrackingLost, VaultError

PREFIX = "pydr-"
DEFAULT_GRANULARITY = 4096  # the block a cycle compares: a bitmap's bit is one block
MIN_GRANULARITY = 512  # QEMU's smallest
MAX_GRANULARITY = 64 << 20  # 1 TiB at 64 MiB: 2 KiB a bitmap; larger reads far more than changed


def check_granularity(value: object) -> int:
    """The granularity of a disk's dirty bitmaps, checked.

    Args:
        value: bytes per bit of a bitmap: a power of two from
            MIN_GRANULARITY (512) to MAX_GRANULARITY (64 MiB).

    Returns:
        `value`, as an int.

    Raises:
        InvalidArgument: `value` is not such a number (the message says
            what is accepted).
    """
    if isinstance(value, bool) or not isinstance(value, int) \
            or not MIN_GRANULARITY <= value <= MAX_GRANULARITY or value & (value - 1):
        raise InvalidArgument(f"a dirty bitmap's granularity is a power of two from 512 bytes "
                              f"to 64 MiB (e.g. 4K, 64K), not {value!r}")
    return value


def granularity_of(disk, item: Optional[str] = None, where: Optional[str] = None) -> int:
    """The granularity new bitmaps of a tracked disk get.

    Args:
        disk: a DiskRecord or a fleet task's dict; its "granularity" is
            None (or missing) for the default.
        item: the item's name, named by the error.
        where: the vault's directory (or the disk), named by the error.

    Returns:
        The recorded granularity, or DEFAULT_GRANULARITY.

    Raises:
        VaultError: the recorded value is not a valid granularity (a
            damaged or hand-edited vault): refused before QEMU is asked.
    """
    value = disk.get("granularity")
    if value is None:
        return DEFAULT_GRANULARITY
    try:
        return check_granularity(value)
    except InvalidArgument:
        raise VaultError(f"disk {disk.get('idx')} of item {item!r} records the dirty bitmap "
                         f"granularity {value!r}, not a power of two from 512 bytes to 64 MiB",
                         path=where, item=item) from None


def tracker(vault, item, disk, warm=None):
    """The tracker of a disk (its DiskRecord), or None when it is not tracked.
    ``warm``: a service's pydr.dr.warm.WarmState, whose entry for the disk
    its source endpoint uses (one QMP connection a cycle, qemu-img info
    read once)."""
    if not disk.tracking:
        return None
    source = warm_endpoint(vault, item, disk, disk.source, warm)
    return tracker_class(disk.tracking)(vault, item, disk, source)


def tracker_class(kind):
    """The Tracker class of tracking `kind`: "qcow2", "qmp", or one a
    module registered (:func:`register`: "libvirt", pydr.dr.checkpoints)."""
    try:
        return KINDS[kind]
    except KeyError:
        raise VaultError(f"unknown kind of changed-block tracking {kind!r}") from None


def register(kind, cls):
    """Make `cls` the Tracker of tracking `kind` (a module above this one
    registers its own: this module imports none of them)."""
    KINDS[kind] = cls


def warm_endpoint(vault, item, disk, spec, warm=None):
    """The endpoint `spec` of disk `disk` of `item` (vault.endpoint), given
    the disk's entry of the WarmState `warm` when it has one to use (the
    QEMU endpoints: ``endpoint.warm``); as vault.endpoint when `warm` is
    None."""
    endpoint = vault.endpoint(item, spec)
    if warm is not None and hasattr(endpoint, "warm"):
        endpoint.warm = warm.disk(vault.dir, item, disk["idx"])
    return endpoint


class Cut:
    """What a cycle reads: `view` (an endpoint holding the disk as it was at
    the cut) and `changed` ([(offset, length)] written since the last cut,
    or None: compare everything)."""

    def __init__(self, view, changed):
        self.view, self.changed = view, changed


class Tracker:
    kind = None

    def __init__(self, vault, item, disk, source):
        self.vault, self.item, self.disk, self.source = vault, item, disk, source
        # a DiskRecord in the vault, or a fleet task's plain dict on a host
        self.current = disk.get("bitmap")
        self.generation = disk.get("generation") or 0
        # of the bitmaps this tracker adds
        self.granularity = granularity_of(disk, item, getattr(vault, "dir", None))
        self.new = self.frozen = None
        self.full = False

    @property
    def where(self):
        return str(self.source)

    def validate(self):
        """TrackingLost when the current bitmap cannot be trusted."""
        if self.current is None:
            raise TrackingLost(f"{self.where} has no dirty bitmap yet", path=self.where)
        found = self.bitmaps()
        if self.current not in found:
            raise TrackingLost(f"the dirty bitmap {self.current} of {self.where} is missing "
                               "(QEMU restarted, or the image was replaced)", path=self.where)
        problem = self.problem(found[self.current])
        if problem:
            raise TrackingLost(f"the dirty bitmap {self.current} of {self.where} {problem}",
                               path=self.where)

    def normalize(self, found=None):
        """After a kill: merge any other pydr bitmap of this disk into the
        current one (a superset: nothing lost) and make it record again.
        ``found``: the bitmaps as just listed (bitmaps()), to list them
        once per cut (each listing of a qcow2 image is a qemu-img process);
        None lists them here. Returns the bitmaps as they are after it."""
        found = dict(self.bitmaps() if found is None else found)
        # recording again before the others are merged and removed: a write
        # in between is in both, never in neither
        if self.current in found and not self.recording(found[self.current]):
            self.enable(self.current)  # disabled by a cut that was killed after it
        for name in [n for n in found if n.startswith(PREFIX) and n != self.current]:
            if self.current in found:
                self.merge(name, self.current)
            self.remove(name)
            del found[name]
        return found

    @contextlib.contextmanager
    def cut(self, full):
        """Start a new bitmap at this instant and yield the Cut to read."""
        self.full = full or self.current is None
        found = self.bitmaps()  # listed once: what normalize leaves is known without another
        if not self.full:
            found = self.normalize(found)
        self.generation += 1
        self.new = f"{PREFIX}{self.generation}"
        if self.new in found:  # left by a killed cut that got this far
            self.remove(self.new)
        self.frozen = None if self.full else self.current
        with self.view() as cut:
            yield cut

    def record(self, _db=None):
        """In the point's transaction: the new bitmap is the current one.
        (A caller that still passes the vault's connection: it is the one
        of self.vault, which the store writes through.) On a fleet's host
        there is no vault: the coordinator records what the task returns."""
        if self.vault is not None:
            self.vault.set_bitmap(self.item, self.disk["idx"], self.new, self.generation)

    def commit(self):
        """After the point is recorded: the frozen (or the replaced) bitmap goes."""
        old = self.current
        self.current = self.new
        if old is not None and old != self.new:
            with contextlib.suppress(Exception):  # a stray one is merged by the next cut
                self.remove(old)

    def abort(self):
        """The cycle failed: nothing it tracked may be lost."""
        if self.new is None:
            return
        if self.frozen is not None:  # the frozen changes go back into the recording bitmap
            self.merge(self.frozen, self.new)
            self.record()  # one statement: committed by itself
            self.remove(self.frozen)
            self.current = self.new
        else:  # a full cycle: the old current bitmap (if any) still records
            with contextlib.suppress(Exception):
                self.remove(self.new)
        self.new = self.frozen = None

    @staticmethod
    def dirty_extents(dev):
        return [(off, n) for off, n, flags in dev.extents(0, dev.size, dirty=True)
                if flags & NBD_DIRTY]


class Qcow2Tracker(Tracker):
    """Persistent bitmaps of a qcow2 image (the endpoint runs qemu-img)."""

    kind = "qcow2"

    def _bitmap(self, *operations, name):
        self.source.bitmap(*operations, name=name)

    def bitmaps(self):
        return self.source.bitmaps()

    @staticmethod
    def recording(flags):
        return "auto" in flags  # qemu-img's name for an enabled bitmap

    @staticmethod
    def problem(flags):
        if "in-use" in flags:
            return "is in use: QEMU did not close the image cleanly"
        if "inconsistent" in flags:
            return "is inconsistent"
        return None

    def merge(self, source, target):
        self._bitmap("--merge", source, name=target)

    def remove(self, name):
        self._bitmap("--remove", name=name)

    def enable(self, name):
        self._bitmap("--enable", name=name)

    @contextlib.contextmanager
    def view(self):
        from ..endpoints.base import DeviceEndpoint

        # from here on, writes land in it too
        self._bitmap("--add", "-g", str(self.granularity), "--enable", name=self.new)
        if self.frozen is not None:
            self._bitmap("--disable", name=self.frozen)  # the cut: frozen from here on
        with self.source.engine_disk(bitmap=self.frozen) as dev:
            changed = None if self.frozen is None else self.dirty_extents(dev)
            yield Cut(DeviceEndpoint(dev, self.where), changed)


class QmpTracker(Tracker):
    """Non-persistent bitmaps of a block node of a running QEMU, by QMP."""

    kind = "qmp"

    def _qmp(self, command, **args):
        return self.source.bitmap_command(command, **args)

    def bitmaps(self):
        # a killed cycle's fleece holds its bitmaps busy: gone first (validate, cut)
        clear = getattr(self.source, "clear_left_fleeces", None)
        if clear is not None:
            clear()
        return self.source.bitmaps()

    @staticmethod
    def recording(info):
        return bool(info.get("recording"))

    @staticmethod
    def problem(info):
        if info.get("inconsistent"):
            return "is inconsistent"
        if info.get("busy"):
            return "is in use by another job"
        return None

    def merge(self, source, target):
        self._qmp("block-dirty-bitmap-merge", target=target, bitmaps=[source])

    def remove(self, name):
        self._qmp("block-dirty-bitmap-remove", name=name)

    def enable(self, name):
        self._qmp("block-dirty-bitmap-enable", name=name)

    @contextlib.contextmanager
    def view(self):
        from ..endpoints.base import DeviceEndpoint

        node = self.source.node
        actions = [("block-dirty-bitmap-add", {"node": node, "name": self.new,
                                               "persistent": False,
                                               "granularity": self.granularity})]
        if self.frozen is not None:
            actions.append(("block-dirty-bitmap-disable", {"node": node, "name": self.frozen}))
        # one QMP transaction: the new bitmap, the frozen one and the export's cut
        with self.source.engine_disk(actions=actions, bitmap=self.frozen) as dev:
            changed = None if self.frozen is None else self.dirty_extents(dev)
            yield Cut(DeviceEndpoint(dev, self.where), changed)


#: the Tracker class of each kind of tracking (:func:`register` adds more)
KINDS = {"qcow2": Qcow2Tracker, "qmp": QmpTracker}

"""The undo steps of a step chain as the vault records them: which steps a
point needs, and checking one before it is rolled back onto a disk.

A damaged step marks every point that needs it (they are never restored);
a missing one is refused without a mark (storage not mounted yet may come
back whole)."""

import os

from ...engine import journal as J
from ...engine.oserrors import naming
from ...errors import CorruptDelta, DamagedJournal, VaultDamaged
from .. import stepdigest
from ..stepmerge import first_step


def steps_of(vault, name, point_id, idx):
    """The undo steps (StepRecords) that take disk `idx` from its latest
    state back to point `point_id`, newest first. UnknownName (exit 3)
    naming the point when the vault no longer has it (retention dropped
    it), VaultDamaged (exit 14) when it has the point but not disk `idx`'s
    record of it: never "no steps", which would be the latest state passed
    off as the point."""
    step = vault.point_step(name, point_id, idx)
    if step is None:
        vault.point(name, point_id)  # UnknownName: the point is gone
        raise VaultDamaged(f"recovery point {point_id} of {name!r} has no record of disk {idx}",
                           path=vault.dir)
    rows = vault.steps(name, idx, after=step, newest_first=True)
    gaps = _gaps(rows, step, vault.current_step(name, idx))
    if gaps:
        raise VaultDamaged(f"recovery point {point_id} of {name!r}, disk {idx}: undo steps "
                           f"{gaps} it is rolled back through are not recorded (the vault is "
                           "damaged; never the latest state passed off as the point)",
                           path=vault.dir)
    return rows


def _gaps(rows, step, current):
    """The step numbers in (`step`, `current`] that no row covers, as text
    ('3-5, 9'), or ''. A merged row (``<path>.m<j>``) covers j up to its
    own number (pydr.dr.stepmerge.first_step)."""
    missing, expected = [], step + 1
    for r in sorted(rows, key=lambda r: r["step"]):
        first = first_step(r["path"], r["step"])
        if first > expected:
            missing.append((expected, first - 1))
        expected = max(expected, r["step"] + 1)
    if expected <= current:
        missing.append((expected, current))
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in missing)


def all_steps(vault, name, idx):
    """Every recorded undo step of disk `idx` (rows as steps_of), oldest first."""
    return vault.steps(name, idx)


def check_step(vault, name, idx, step, *, whole=True):
    """Check one step (a row of `steps`): DamagedJournal (exit 7, naming the
    step and the offset) when it is damaged, which marks the points that
    need it. Steps on this machine are read through and every record
    checked (journal.check_step) when `whole`; those at a remote place by
    their size against the vault's record (the place that materialises
    checks their records before it writes). A missing step is refused
    without a mark."""
    ep = vault.endpoint(name, step["path"])
    which = f"undo step {step['step']} of disk {idx}"
    try:
        if ep.local_path is not None and os.path.islink(ep.local_path):
            raise DamagedJournal(f"{which} is damaged: it is a symlink, not a step file",
                                 path=str(ep), offset=0)
        size = ep.size()
        if not _size_as_recorded(size, step["bytes"]):
            raise DamagedJournal(f"{which} is damaged: {size} bytes, the vault recorded "
                                 f"{step['bytes']} (and a COMMIT record)", path=str(ep),
                                 offset=min(size, step["bytes"]))
        if ep.local_path is not None and whole:
            with naming(ep.local_path):  # an EIO reading it names the step
                J.check_step(ep.local_path)
                stepdigest.check(ep.local_path, _digest_of(step))
    except FileNotFoundError:  # refused, but not marked: storage not mounted yet comes back
        raise DamagedJournal(f"{which} is missing", path=str(ep)) from None
    except CorruptDelta as found:
        exc = found if found.message.startswith(which) else DamagedJournal(
            f"{which}: {found.message}", path=found.path or str(ep), offset=found.offset)
    else:
        return
    mark_step_damaged(vault, name, idx, step["step"], exc)
    raise exc


def _digest_of(step):
    """The digest recorded with a step row (None: not recorded, or not read)."""
    return step["digest"] if "digest" in step.keys() else None


def _size_as_recorded(size, recorded):
    """A cycle records a step's journal before its COMMIT record (0 when a
    killed cycle's step is recorded by the next one: unknown); the vault's
    recovery records the whole file."""
    return recorded == 0 or size in (recorded, recorded + J.COMMIT_SIZE)


def mark_step_damaged(vault, name, idx, step, exc):
    """Every point of `name` that needs step `step` of disk `idx` is damaged."""
    vault.mark_damaged(name, vault.points_needing(name, idx, step), str(exc))


def step_named(steps, path):
    """The step row whose file an error names (as here, or as host:PATH when
    a remote place raised it), or None."""
    def local(p):
        return p.split(":", 1)[1] if ":" in p and not p.startswith("/") else p

    for s in steps:
        if path is not None and local(path) == local(s["path"]):
            return s
    return None

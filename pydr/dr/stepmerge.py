"""Thinning a step chain: the points retention tiers let go (pydr.dr.tiers)
lose their records, and each one's undo step is merged into the next newer
step (pydr.engine.journalmerge), so that the points kept stay exact and the
space of the ones let go is freed, in proportion to the steps, never the disk.

A point at step j of a disk is the state cycle j made. Undo step j takes
the disk from that state back to the one before; step k, the next newer
step that exists, takes the disk back to state j. Once no point is at
state j, the two become one step, numbered k, that takes the disk from
state k straight back to the one before j.

Crash safety (docs/FORMAT.md, "Merged steps"): for each dropped point,

1. each disk's merged journal is written beside step k as ``<k's path>.m<j>``
   and made durable with its directory (crash point ``retention.merged``:
   no row names it yet; the next retention removes it, or the same merge
   writes it again);
2. one vault transaction: step k's row names the merged file (its bytes
   and digest), step j's row goes, the point's rows go, and both old files
   are noted in ``doomed_files`` (crash point ``retention.swapped``);
3. the doomed files are removed, then forgotten.

Every retention first removes what ``doomed_files`` names and merged files
that no row names (:func:`remove_leftovers`). Steps on another host
(host:PATH) and steps that cannot be merged exactly (different block sizes,
sizes that do not follow, damage) are not merged: the point's record goes,
both steps stay (correct, just not smaller), and a note says so.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from ..engine import crashpoints
from ..engine import journal as J
from ..engine.atomic import fsync_dir
from ..engine.journalmerge import NotMergeable, merge_steps
from ..errors import CorruptDelta
from . import stepdigest

#: the suffix a merged step's file has: ``.m<the step merged into it>``
_MERGED = re.compile(r"\.m(\d+)$")


@dataclass
class ThinResult:
    """What :func:`thin` did.

    dropped: the ids of the points whose records went.
    merged: (point id, disk idx, step merged away, step it was merged into).
    notes: for a person: the steps kept unmerged, and why.
    """

    dropped: List[int] = field(default_factory=list)
    merged: List[Tuple[int, int, int, int]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def unmerged_path(path: str) -> str:
    """A step file's path without the ``.m<j>`` suffixes merges gave it."""
    while True:
        match = _MERGED.search(path)
        if match is None:
            return path
        path = path[:match.start()]


def merged_path(newer_path: str, first: int) -> str:
    """Where a merge into the step at `newer_path` is written: beside it, as
    ``<its path without merge suffixes>.m<first>``, `first` the first step
    the merged one stands for (see :func:`first_step`)."""
    return f"{unmerged_path(newer_path)}.m{first}"


def first_step(path: str, step: int) -> int:
    """The first of the steps the step row (`path`, `step`) stands for: the
    row itself for a cycle's own step; ``j`` for a merged one, named
    ``<path>.m<j>``: steps j to `step` (the states between are gone).
    ``pydr vault check`` reads the gaps in a disk's step numbers this way."""
    match = _MERGED.search(path)
    return step if match is None else int(match.group(1))


def _local(vault: Any, name: str, spec: str) -> Optional[str]:
    """The path of step file `spec` on this machine, or None (another host)."""
    return vault.endpoint(name, spec).local_path


def remove_doomed(vault: Any, name: str) -> int:
    """Remove the files of item `name` that ``doomed_files`` names (their
    rows are gone; a missing file is fine), then forget them. A file on
    another host is only forgotten (merges never doom one). Returns how
    many were named."""
    doomed = vault.doomed(name)
    named = {r.path for r in vault.steps(name)}
    for path in doomed:
        local = _local(vault, name, path)
        if local is not None and path not in named:  # never a file a row names again
            with contextlib.suppress(FileNotFoundError):
                os.unlink(local)
                fsync_dir(local)
        with vault.transaction():
            vault.drop_doomed(name, path)
    return len(doomed)


def remove_leftovers(vault: Any, name: str) -> List[str]:
    """Remove the merged step files (``<a step's path>.m<j>``) beside item
    `name`'s steps on this machine that no steps row names: what a kill
    after ``retention.merged`` left. Only names of that form, in the
    directories of the item's own steps, are ever touched. Returns the
    paths removed."""
    named: Set[str] = set()  # the rows' files, by real directory and own name
    bases: Dict[str, Set[str]] = {}  # real directory -> the step file names merges start from
    for r in vault.steps(name):
        local = _local(vault, name, r.path)
        if local is not None:
            directory = os.path.realpath(os.path.dirname(local))
            named.add(os.path.join(directory, os.path.basename(local)))
            bases.setdefault(directory, set()).add(os.path.basename(unmerged_path(local)))
    removed = []
    for directory, names in bases.items():
        try:
            entries = os.listdir(directory)
        except FileNotFoundError:
            continue
        for entry in entries:
            path = os.path.join(directory, entry)
            if path in named or unmerged_path(entry) == entry \
                    or unmerged_path(entry) not in names:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            removed.append(path)
    if removed:
        fsync_dir(removed[0])
    return removed


def _row(rows: List[Any], step: int) -> Optional[Any]:
    for r in rows:
        if r.step == step:
            return r
    return None


def _plan_disk(vault: Any, name: str, point_id: int, idx: int,
               others: Dict[int, int], rows: List[Any]) -> Tuple[Optional[Tuple], Optional[str]]:
    """(older row, newer row) to merge for disk `idx` of the dropped point,
    or None with a note (None: nothing to say). `others`: the step disk
    `idx` is at in every other point still recorded."""
    step = vault.point_step(name, point_id, idx)
    older = None if step is None else _row(rows, step)
    newer = next((r for r in rows if step is not None and r.step > step), None)
    if older is None or newer is None:
        return None, None  # no step of its own, or the newest state: nothing to merge
    if any(step <= s < newer.step for s in others.values()):
        return None, None  # another point is at this state: it needs the step as it is
    if not any(s < step for s in others.values()):
        return None, None  # no older point needs it: release drops it
    if _local(vault, name, older.path) is None or _local(vault, name, newer.path) is None:
        return None, (f"point {point_id}, disk {idx}: undo steps {older.step} and "
                      f"{newer.step} are on another host and are not merged (they stay)")
    return (older, newer), None


class _Retry(Exception):
    """A merge failed for a reason that may pass (OSError): the point stays."""


def _check_local(vault: Any, name: str, idx: int, row: Any) -> None:
    """A step on this machine read through (journal.check_step) and its
    digest as recorded: DamagedJournal naming it otherwise."""
    path = _local(vault, name, row.path)
    J.check_step(path)
    stepdigest.check(path, row.digest)


def _merge_disk(vault: Any, name: str, idx: int, older: Any, newer: Any,
                check_step: Callable[..., None]) -> Tuple[Optional[Dict], Optional[str]]:
    """Write the merge of `older` into `newer` (step rows of disk `idx`)
    beside `newer`, durably, once `check_step` passed both. Returns (what
    its row becomes, None) or (None, a note why they stay unmerged)."""
    spec = merged_path(newer.path, first_step(older.path, older.step))
    dest = _local(vault, name, spec)
    if dest is None or spec in {r.path for r in vault.steps(name)}:
        return None, f"disk {idx}: {spec} is a step's file already; steps not merged"
    try:
        for row in (older, newer):  # read through, digest too; damage marks the points
            check_step(vault, name, idx, row)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest)  # a kill's half-made merge of this pair
        merged = merge_steps(_local(vault, name, older.path), _local(vault, name, newer.path),
                             dest)
        digest = stepdigest.digest(dest)
    except (NotMergeable, CorruptDelta) as exc:
        return None, f"disk {idx}: undo steps {older.step} and {newer.step} not merged: {exc}"
    except OSError as exc:  # no space, an I/O error: tried again by the next retention
        raise _Retry(f"disk {idx}: undo steps {older.step} and {newer.step} could not be "
                     f"merged now ({exc}); the point stays for the next retention") from exc
    return {"idx": idx, "older": older, "newer": newer, "path": spec, "bytes": merged.bytes,
            "digest": digest}, None


def thin(vault: Any, name: str, drop_ids: Iterable[int], *,
         check_step: Optional[Callable[..., None]] = None) -> ThinResult:
    """Let the points `drop_ids` of item `name` go, merging each one's undo
    step into the next newer step where another point still needs the
    state before it (see the module's docstring). Points are taken oldest
    first, one transaction each; ids the item no longer has are skipped
    (a run after a kill finds them gone). The steps no point needs any more
    are left for PointStore.release.

    vault: the open vault (a pydr.dr.store.Store), as a writer.
    name: the item (a step chain's).
    drop_ids: the ids of the points to let go (never the newest point, nor
        a drill's or failover's: the caller chooses).
    check_step: check_step(vault, name, idx, row) checks a step before it
        is merged, raising CorruptDelta for damage (the step chain passes
        pydr.dr.pointstores.steps.check_step, which also marks the points
        that need a damaged step); default: read through, digest checked.

    Returns a ThinResult. A merged step that cannot be written now
    (OSError: no space, an I/O error) leaves its point as it was, with a
    note: the next retention tries again. Raises UnknownName for an
    unknown item; OSError (naming the file) where a doomed file cannot be
    removed (its name stays in ``doomed_files`` for the next retention).
    """
    result = ThinResult()
    remove_doomed(vault, name)
    remove_leftovers(vault, name)
    wanted = set(drop_ids)
    disks = [d.idx for d in vault.disks(name)]
    for point in [p for p in vault.points(name) if p.id in wanted]:
        others = {idx: {p.id: s for p in vault.points(name) if p.id != point.id
                        for s in [vault.point_step(name, p.id, idx)] if s is not None}
                  for idx in disks}
        merges = []
        try:
            for idx in disks:
                rows = vault.steps(name, idx)
                pair, note = _plan_disk(vault, name, point.id, idx, others[idx], rows)
                if note:
                    result.notes.append(note)
                if pair is not None:
                    done, note = _merge_disk(vault, name, idx, *pair,
                                             check_step or _check_local)
                    if note:
                        result.notes.append(f"point {point.id}, {note}")
                    if done is not None:
                        merges.append(done)
        except _Retry as exc:
            result.notes.append(f"point {point.id}, {exc}")
            for m in merges:  # written for nothing: no row names them
                with contextlib.suppress(OSError):
                    os.unlink(_local(vault, name, m["path"]))
            continue
        if merges:
            crashpoints.reached("retention.merged")
        with vault.transaction():
            for m in merges:
                older, newer = m["older"], m["newer"]
                vault.drop_step(name, m["idx"], newer.step)
                vault.add_step(name, m["idx"], newer.step, m["path"], m["bytes"], m["digest"])
                vault.drop_step(name, m["idx"], older.step)
                vault.add_doomed(name, older.path)
                vault.add_doomed(name, newer.path)
            vault.drop_points(name, [point.id])
        if merges:
            crashpoints.reached("retention.swapped")
        remove_doomed(vault, name)
        result.dropped.append(point.id)
        result.merged += [(point.id, m["idx"], m["older"].step, m["newer"].step) for m in merges]
    return result

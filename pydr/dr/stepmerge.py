"""Thinning a step chain: the points retention tiers let go (pydr.dr.tiers)
lose their records, and each one's undo step is merged into the next newer
step (pydr.engine.journalmerge), so that the points kept stay exact and the
space of the ones let go is freed, in proportion to the steps, never the disk.

A point at step j of a disk is the state cycle j made. Undo step j takes
the disk from that state back to the one before; step k, the next newer
step that exists, takes the disk back to state j. Once no point is at
state j, the two become one step, numbered k, that takes the disk from
state k straight back to the one before j. A run of such steps (every
state between two remaining points) becomes one step in one pass
(journalmerge.merge_chain), so that thinning many points costs the steps'
size once, not once per point.

Crash safety (docs/FORMAT.md, "Merged steps"), for all the points at once:

1. each run's merged journal is written beside its newest step k as
   ``<k's path>.m<f>`` (f: the first step it stands for) and made durable
   with its directory (crash point ``retention.merged``: no row names it
   yet; the next retention removes it, or the same merge writes it again);
2. one vault transaction: step k's row names the merged file (its bytes
   and digest), the run's other rows go, the points' rows go, and every
   old file is noted in ``doomed_files`` (crash point ``retention.swapped``);
3. the doomed files are removed, then forgotten.

Every retention first removes what ``doomed_files`` names and merged files
that no row names (:func:`remove_leftovers`). Steps on another host
(host:PATH) and steps that cannot be merged exactly (different block sizes,
sizes that do not follow, damage) are not merged: the points' records go,
the steps stay (correct, just not smaller), and a note says so.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from ..endpoints import parse_remote
from ..engine import crashpoints
from ..engine import journal as J
from ..engine.atomic import fsync_dir
from ..engine.journalmerge import NotMergeable, merge_chain
from ..errors import CorruptDelta
from . import stepdigest

#: the suffix a merged step's file has: ``.m<the step merged into it>``
_MERGED = re.compile(r"\.m(\d+)$")


@dataclass
class ThinResult:
    """What :func:`thin` did.

    dropped: the ids of the points whose records went.
    merged: (disk idx, first step, last step) of each run of steps merged
        into one (numbered as the last).
    notes: for a person: the steps kept unmerged, and why.
    """

    dropped: List[int] = field(default_factory=list)
    merged: List[Tuple[int, int, int]] = field(default_factory=list)
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


#: the names a step file of the vault has: ``<idx>-<step>.undo``, merged ``.m<j>`` after it
STEP_NAME = re.compile(r"\d+-\d+\.undo(?:\.m\d+)*")


def step_directory(vault_dir: str, name: str) -> str:
    """The real path of item `name`'s step directory in the vault (undo/ITEM)."""
    return os.path.realpath(os.path.join(vault_dir, "undo", name))


def not_doomable(vault_dir: str, name: str, path: str) -> Optional[str]:
    """Why a doomed_files row of item `name` naming `path` must not be
    unlinked (a damaged or hostile row), or None: only a step file's name
    (:data:`STEP_NAME`) whose real parent directory is the item's own step
    directory is ever removed. ``pydr vault check`` reports the others."""
    base = os.path.basename(path)
    if not os.path.isabs(path) or not STEP_NAME.fullmatch(base):
        return f"the doomed file {path!r} of {name!r} is not named like a step file"
    if os.path.realpath(os.path.dirname(path)) != step_directory(vault_dir, name):
        return (f"the doomed file {path!r} of {name!r} is not in its step directory "
                f"{step_directory(vault_dir, name)}")
    return None


def _unlink_step(directory: str, base: str) -> None:
    """Unlink `base` (a name, never a path) in the real directory
    `directory`, opened without following a symlink: a symlink in the
    file's place goes itself, never what it points to."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(base, dir_fd=fd)
            os.fsync(fd)
    finally:
        os.close(fd)


def remove_doomed(vault: Any, name: str) -> int:
    """Remove the files of item `name` that ``doomed_files`` names (their
    rows are gone; a missing file is fine), then forget them. A file on
    another host is only forgotten (merges never doom one). A row naming
    anything but a step file in the item's own step directory
    (:func:`not_doomable`: a damaged or hostile row) is forgotten with a
    warning on the item, and nothing is unlinked. Returns how many were
    named."""
    doomed = vault.doomed(name)
    named = {r.path for r in vault.steps(name)}
    refused = []
    for path in doomed:
        remote = parse_remote(path) is not None
        local = None if remote else _local_or_none(vault, name, path)
        why = None if remote else not_doomable(vault.dir, name, local or path)
        if why is not None:
            refused.append(why)
        elif local is not None and path not in named:  # never a file a row names again
            _unlink_step(os.path.realpath(os.path.dirname(local)), os.path.basename(local))
        with vault.transaction():
            vault.drop_doomed(name, path)
    if refused:
        with vault.transaction():
            vault.set_item(name, health="warning",
                           last_error="; ".join(refused) + " (the row was dropped; nothing "
                           "was removed)")
    return len(doomed)


def _local_or_none(vault: Any, name: str, spec: str) -> Optional[str]:
    """:func:`_local`, or None for a spec no endpoint takes (a damaged row)."""
    try:
        return _local(vault, name, spec)
    except ValueError:
        return None


def remove_leftovers(vault: Any, name: str,
                     notes: Optional[List[str]] = None) -> List[str]:
    """Remove the merged step files (``<a step's path>.m<j>``) beside item
    `name`'s steps on this machine that no steps row names: what a kill
    after ``retention.merged`` left. Only names of that form, in the
    directories of the item's own steps, are ever touched, and only a
    regular file or a symlink (the link itself); anything else there (a
    directory, a FIFO: not pydr's) is left, with a note appended to
    `notes`. Returns the paths removed."""
    named: Set[str] = set()  # the rows' files, by real directory and own name
    bases: Dict[str, Set[str]] = {}  # real directory -> the step file names merges start from
    for r in vault.steps(name):
        local = _local_or_none(vault, name, r.path)
        # a row naming a file outside the item's step directory (damaged or hostile)
        # points to no directory this cleans: the same confinement as a doomed row's
        if local is not None and not_doomable(vault.dir, name, local) is None:
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
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                if notes is not None:
                    notes.append(f"{path} is named like a merged step but is not a file; "
                                 "left alone")
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            removed.append(path)
    if removed:
        fsync_dir(removed[0])
    return removed


def _groups(rows: List[Any], states: Set[int]) -> List[List[Any]]:
    """The runs of step rows (of one disk, oldest first) that become one
    step each: a run ends at a row whose state a remaining point is at
    (`states`); the rows up to the oldest of them are no point's to merge
    (release drops them). Runs of one row stay as they are."""
    if not states:
        return []
    lowest = min(states)
    groups: List[List[Any]] = []
    run: List[Any] = []
    for r in rows:
        if r.step <= lowest:
            continue
        run.append(r)
        if r.step in states:
            groups.append(run)
            run = []
    if run:
        groups.append(run)
    return [g for g in groups if len(g) > 1]


class _Retry(Exception):
    """A merge failed for a reason that may pass (OSError): the points stay."""


def _check_local(vault: Any, name: str, idx: int, row: Any) -> None:
    """A step on this machine read through (journal.check_step) and its
    digest as recorded: DamagedJournal naming it otherwise."""
    path = _local(vault, name, row.path)
    J.check_step(path)
    stepdigest.check(path, row.digest)


def _merge_group(vault: Any, name: str, idx: int, group: List[Any],
                 check_step: Callable[..., None]) -> Tuple[Optional[Dict], Optional[str]]:
    """Write the merge of the step rows `group` (of disk `idx`, oldest
    first) beside the newest of them, durably, once `check_step` passed
    each. Returns (what the newest row becomes, None) or (None, a note why
    they stay unmerged); raises _Retry for an OSError (the file removed)."""
    which = f"disk {idx}: undo steps {group[0].step}-{group[-1].step}"
    if any(_local(vault, name, r.path) is None for r in group):
        return None, f"{which} are on another host and are not merged (they stay)"
    spec = merged_path(group[-1].path, first_step(group[0].path, group[0].step))
    dest = _local(vault, name, spec)
    if dest is None or spec in {r.path for r in vault.steps(name)}:
        return None, f"{which}: {spec} is a step's file already; not merged"
    try:
        for row in group:  # read through, digest too; damage marks the points
            check_step(vault, name, idx, row)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest)  # a kill's half-made merge of this run
        merged = merge_chain([_local(vault, name, r.path) for r in group], dest)
        digest = stepdigest.digest(dest)
    except (NotMergeable, CorruptDelta) as exc:
        return None, f"{which} not merged: {exc}"
    except OSError as exc:  # no space, an I/O error: tried again by the next retention
        with contextlib.suppress(OSError):
            os.unlink(dest)
        raise _Retry(f"{which} could not be merged now ({exc}); the points stay for the next "
                     "retention") from exc
    return {"idx": idx, "rows": group, "path": spec, "bytes": merged.bytes,
            "digest": digest}, None


def thin(vault: Any, name: str, drop_ids: Iterable[int], *,
         check_step: Optional[Callable[..., None]] = None) -> ThinResult:
    """Let the points `drop_ids` of item `name` go, merging on each disk
    every run of undo steps between two states a remaining point is at
    into one step (see the module's docstring), in one pass
    (journalmerge.merge_chain) and one transaction for them all; ids the
    item no longer has are skipped (a run after a kill finds them gone).
    The steps no point needs any more are left for PointStore.release.

    vault: the open vault (a pydr.dr.store.Store), as a writer.
    name: the item (a step chain's).
    drop_ids: the ids of the points to let go (never the newest point, nor
        a drill's or failover's: the caller chooses).
    check_step: check_step(vault, name, idx, row) checks a step before it
        is merged, raising CorruptDelta for damage (the step chain passes
        pydr.dr.pointstores.steps.check_step, which also marks the points
        that need a damaged step); default: read through, digest checked.

    Returns a ThinResult. Steps that cannot be merged (on another host,
    damaged, not following each other) stay, with a note; the points go
    all the same. A merged step that cannot be written now (OSError: no
    space, an I/O error) leaves every point as it was, with a note: the
    next retention tries again. Raises UnknownName for an unknown item;
    OSError (naming the file) where a doomed file cannot be removed (its
    name stays in ``doomed_files`` for the next retention).
    """
    result = ThinResult()
    remove_doomed(vault, name)
    remove_leftovers(vault, name, result.notes)
    wanted = set(drop_ids)
    points = vault.points(name)
    dropped = [p.id for p in points if p.id in wanted]
    if not dropped:
        return result
    remaining = [p.id for p in points if p.id not in wanted]
    merges: List[Dict] = []
    try:
        for d in vault.disks(name):
            states = {vault.point_step(name, pid, d.idx) for pid in remaining} - {None}
            for group in _groups(vault.steps(name, d.idx), states):
                done, note = _merge_group(vault, name, d.idx, group, check_step or _check_local)
                if note:
                    result.notes.append(note)
                if done is not None:
                    merges.append(done)
    except _Retry as exc:
        result.notes.append(str(exc))
        for m in merges:  # written for nothing: no row names them
            with contextlib.suppress(OSError):
                os.unlink(_local(vault, name, m["path"]))
        return result
    if merges:
        crashpoints.reached("retention.merged")
    with vault.transaction():
        for m in merges:
            newest = m["rows"][-1]
            for r in m["rows"]:
                vault.drop_step(name, m["idx"], r.step)
                vault.add_doomed(name, r.path)
            vault.add_step(name, m["idx"], newest.step, m["path"], m["bytes"], m["digest"])
        vault.drop_points(name, dropped)
    if merges:
        crashpoints.reached("retention.swapped")
    remove_doomed(vault, name)
    result.dropped = dropped
    result.merged = [(m["idx"], m["rows"][0].step, m["rows"][-1].step) for m in merges]
    return result

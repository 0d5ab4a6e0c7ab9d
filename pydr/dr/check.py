"""``pydr vault check``: is the vault what it says it is? SQLite's own
``PRAGMA integrity_check``, then pydr's cross-checks of its rows against
each other and against the files they name:

* every steps row has its file (a regular file, not a symlink), of the
  recorded size, whose records read back valid up to its COMMIT, with the
  recorded digest (steps kept beside a replica on another host are
  counted, not read: that needs the host);
* a disk's point steps rise with point id; the newest point holds its
  newest step;
* every point has a point_disks row for each disk of its item, and every
  step after the one it names up to the disk's latest is recorded (a point
  is materialised by rolling those back);
* no step file in the vault that no row names;
* items' disks rows numbered 0..n-1, and no row of a disk, step or point
  for an item or disk that is not there;
* every protection policy is of an item or a group that is there, and its
  values read back valid; every alert and doomed file is of an item that is
  there, and each item's recorded RPO health is one pydr knows (schema 11).
  A doomed file (to remove once its rows are gone) is not an unknown file.

Nothing is changed. Each problem names the path (or the rows) it is about.
"""

import os
import re
from dataclasses import asdict, dataclass, field

from ..errors import DamagedJournal, VaultDamaged
from . import stepdigest
from ..endpoints import parse_remote
from .stepmerge import first_step, not_doomable, unmerged_path
from .store import Store

_STEP_FILE = re.compile(r"(\d+)-(\d+)\.undo")


@dataclass(frozen=True)
class Problem:
    kind: str      # database, missing-step, step-size, step-file, unknown-file, point-chain, rows
    where: str     # a path, or the rows (item, disk, point) it is about
    message: str

    def to_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class CheckReport:
    vault: str
    problems: list = field(default_factory=list)
    steps_checked: int = 0
    remote_steps: int = 0     # on other hosts: counted, not checked here
    files_skipped: bool = False  # another pydr was changing the vault

    @property
    def ok(self):
        return not self.problems

    def to_dict(self):
        return {"vault": self.vault, "ok": self.ok,
                "problems": [p.to_dict() for p in self.problems],
                "steps_checked": self.steps_checked, "remote_steps": self.remote_steps,
                "unknown_files_checked": not self.files_skipped}


def check_vault(directory):
    """Check the vault in `directory`; a CheckReport (never raises for
    damage: a database that cannot even be opened is its one problem)."""
    directory = os.fspath(directory)
    try:
        store = Store(directory)
    except VaultDamaged as exc:
        return CheckReport(directory, [Problem("database", exc.path or directory, exc.message)])
    with store:
        problems = []
        try:
            problems += _integrity(store)
            if problems:  # the rows cannot be trusted: cross-checks would guess
                return CheckReport(directory, problems)
            problems += _rows(store)
            found, checked, remote = _step_files(store)
            problems += found
            skipped = store.locked_by_another()
            if not skipped:  # a running command makes files it has not recorded yet
                problems += _unknown_files(store)
        except VaultDamaged as exc:  # a page integrity_check passed, a query did not
            problems.append(Problem("database", exc.path or directory, exc.message))
            return CheckReport(directory, problems)
    return CheckReport(directory, problems, checked, remote, skipped)


def _integrity(store):
    return [Problem("database", store.db.path, f"integrity_check: {r}")
            for r in store.integrity_check()]


def _rows(store):
    problems = []
    records = store.item_records()
    items = {r.name for r in records}
    disks = {}
    for d in store.all_disks():
        disks.setdefault(d.item, []).append(d.idx)
    for item in sorted(items):
        idxs = disks.get(item, [])
        if idxs != list(range(len(idxs))) or not idxs:
            problems.append(Problem("rows", f"item {item}",
                                    f"its disks are numbered {idxs}, not 0..n-1"))
    for item in sorted(set(disks) - items):
        problems.append(Problem("rows", f"item {item}", "disks rows of an item that is not there"))
    all_steps = store.all_steps()
    for item, idx in sorted({(s.item, s.idx) for s in all_steps}):
        if idx not in disks.get(item, []):
            problems.append(Problem("rows", f"item {item} disk {idx}",
                                    "steps of a disk that is not there"))
    points = {(p.item, p.id) for p in store.all_points()}
    for item in sorted({item for item, _ in points} - items):
        problems.append(Problem("rows", f"item {item}", "points of an item that is not there"))
    rows = {}
    for r in store.all_point_disks():
        rows[(r.item, r.id, r.idx)] = r.step
        if (r.item, r.id) not in points:
            problems.append(Problem("rows", f"item {r.item} point {r.id}",
                                    "point_disks rows of a point that is not there"))
    steps, merged_steps = {}, {}
    highest = {}  # (item, disk) -> the highest step a point names: step numbers never go down
    for (item, _, idx), step in rows.items():
        highest[(item, idx)] = max(step, highest.get((item, idx), 0))
    for s in all_steps:
        steps.setdefault((s.item, s.idx), set()).add(s.step)
        if first_step(s.path, s.step) < s.step:  # a merged step (pydr.dr.stepmerge)
            merged_steps.setdefault((s.item, s.idx), {})[s.step] = first_step(s.path, s.step)
    busy = {r.name for r in records if r.operation is not None}
    problems += _point_order(points, disks, rows, steps, busy, highest)
    problems += _policy_rows(store, records)
    for item, point in sorted(points):
        for idx in disks.get(item, []):
            where = f"item {item} point {point} disk {idx}"
            if (item, point, idx) not in rows:
                problems.append(Problem("point-chain", where, "the point records no step for it"))
                continue
            have = steps.get((item, idx), set())
            latest = max(max(have, default=0), highest.get((item, idx), 0))
            at = rows[(item, point, idx)]
            merged = merged_steps.get((item, idx), {})  # step -> first step it stands for
            missing = [s for s in range(at + 1, latest + 1) if s not in have
                       and not any(first <= s < k for k, first in merged.items())]
            inside = [k for k, first in merged.items() if first <= at < k]
            if inside:
                problems.append(Problem("point-chain", where,
                                        f"it names step {at}, merged into step {inside[0]}"))
            elif at > latest:
                problems.append(Problem("point-chain", where,
                                        f"it names step {at}, past the latest recorded ({latest})"))
            elif missing:
                problems.append(Problem("point-chain", where,
                                        f"steps {_ranges(missing)} it is rolled back through are "
                                        f"not recorded"))
    return problems


def _policy_rows(store, records):
    """The schema-11 tables: policies, alerts, doomed_files, items.rpo_health."""
    from ..errors import VaultError
    from .health import HEALTHS
    from .policy import check_stored

    items = {r.name for r in records}
    groups = {r.grp for r in records if r.grp}
    problems = []
    for row in store.policy_rows():
        where = f"{row.scope} policy {row.name}"
        if row.name not in (items if row.scope == "item" else groups):
            problems.append(Problem("rows", where, f"a policy of a {row.scope} that is not there"))
        try:
            check_stored(store, row)
        except VaultError as exc:
            problems.append(Problem("policy", where, exc.message))
    for item in sorted({a.item for a in store.alerts()} - items):
        problems.append(Problem("rows", f"item {item}", "alerts of an item that is not there"))
    for r in records:
        if r.rpo_health is not None and r.rpo_health not in HEALTHS:
            problems.append(Problem("rows", f"item {r.name}",
                                    f"its recorded RPO health {r.rpo_health!r} is not one of "
                                    f"{', '.join(HEALTHS)}"))
    for item in sorted({i for i, _ in store.all_doomed()} - items):
        problems.append(Problem("rows", f"item {item}",
                                "doomed files of an item that is not there"))
    for item, path in store.all_doomed():  # never removed: the next retention drops the row
        if item not in items or parse_remote(path) is not None:
            continue  # an item that is not there: said above
        why = not_doomable(store.dir, item, path)
        if why is not None:
            problems.append(Problem("rows", f"item {item}", why))
    return problems


def _point_order(points, disks, rows, steps, busy, highest):
    """Each cycle keeps one step per disk and records a point at the disk's
    newest step: a disk's steps rise strictly with point id, and the newest
    point holds the newest step (a point row naming another step restores
    another state). An item whose operation was interrupted may hold a step
    its point was not recorded for yet: the next cycle records it."""
    problems = []
    by_item = {}
    for item, point in points:
        by_item.setdefault(item, []).append(point)
    for item, ids in sorted(by_item.items()):
        ids.sort()
        for idx in disks.get(item, []):
            named = [(p, rows[(item, p, idx)]) for p in ids if (item, p, idx) in rows]
            for (before, low), (after, high) in zip(named, named[1:]):
                if high <= low:
                    problems.append(Problem(
                        "point-chain", f"item {item} points {before} and {after} disk {idx}",
                        f"the newer point names step {high}, not past the older one's {low}"))
            newest = max(max(steps.get((item, idx), set()), default=0),
                         highest.get((item, idx), 0))
            if named and item not in busy and named[-1][1] != newest:
                problems.append(Problem(
                    "point-chain", f"item {item} point {named[-1][0]} disk {idx}",
                    f"the newest point names step {named[-1][1]}, not the disk's newest "
                    f"recorded step {newest}"))
    return problems


def _step_files(store):
    """Problems of the recorded steps' files; (problems, checked, remote)."""
    from ..engine import bindings as B
    from ..engine import journal as J

    problems, checked, remote, headers = [], 0, 0, {}
    for r in store.all_steps():
        path = r.path
        if parse_remote(path) is not None:
            remote += 1
            continue
        checked += 1
        try:
            if os.path.islink(path):
                problems.append(Problem("step-file", path, f"step {r.step} of {r.item} disk "
                                        f"{r.idx} is a symlink, not a step file"))
                continue
            size = os.stat(path).st_size
        except FileNotFoundError:
            problems.append(Problem("missing-step", path,
                                    f"step {r.step} of {r.item} disk {r.idx} is missing"))
            continue
        except OSError as exc:
            problems.append(Problem("missing-step", path, f"cannot be read: {exc.strerror}"))
            continue
        # recorded: the journal without its COMMIT record (a cycle), its whole
        # size (registered by recovery), or 0 (kept by a killed run: unknown)
        if r.bytes and size not in (r.bytes, r.bytes + B.RECORD_HEADER):
            problems.append(Problem("step-size", path,
                                    f"step {r.step} of {r.item} disk {r.idx} holds "
                                    f"{size} bytes, not the {r.bytes} recorded"))
            continue
        try:
            header, committed = J.read_journal(path)
        except OSError as exc:
            problems.append(Problem("missing-step", path, f"cannot be read: {exc.strerror}"))
            continue
        if header is None or not committed:
            problems.append(Problem("step-size", path,
                                    f"step {r.step} of {r.item} disk {r.idx} is "
                                    f"{'not an undo journal' if header is None else 'cut short'}"
                                    f" (no valid {'header' if header is None else 'COMMIT'})"))
            continue
        headers[(r.item, r.idx, r.step)] = (path, header)
        try:
            stepdigest.check(path, r.digest)
        except DamagedJournal as exc:
            problems.append(Problem("step-file", path, f"step {r.step} of {r.item} disk "
                                    f"{r.idx}: {exc.message}"))
        except OSError as exc:
            problems.append(Problem("missing-step", path, f"cannot be read: {exc.strerror}"))
    return problems + _chain_of_headers(headers), checked, remote


def _chain_of_headers(headers):
    """Cycle n+1 starts where cycle n left the replica: a step's header
    must begin at the size the step before it ends at, in the same block
    size (a step from another disk or place does not fit its neighbours)."""
    problems = []
    for (item, idx, step), (path, header) in sorted(headers.items()):
        before = headers.get((item, idx, first_step(path, step) - 1))  # merged: its first
        if before is None:
            continue
        if (header["old_size"], header["block_size"]) != \
                (before[1]["new_size"], before[1]["block_size"]):
            problems.append(Problem(
                "step-file", path,
                f"step {step} of {item} disk {idx} starts at {header['old_size']} bytes in "
                f"{header['block_size']}-byte blocks; step {first_step(path, step) - 1} ends at "
                f"{before[1]['new_size']} bytes in {before[1]['block_size']}-byte blocks"))
    return problems


def _unknown_files(store):
    """Files in the vault's undo/ that no steps row names."""
    # rows hold absolute paths; the vault may have been named relative to here
    known = {_real(r.path) for r in store.all_steps()}
    # a doomed file (its rows are gone: the next retention removes it) is known too
    known |= {_real(path) for _, path in store.all_doomed()}
    # a merge a kill cut short after its file was written (retention.merged) leaves
    # <step>.m<j> beside a step the rows name: the next retention removes it
    bases = {unmerged_path(p) for p in known}
    root = os.path.join(os.path.abspath(store.dir), "undo")
    problems = []
    for item in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        folder = os.path.join(root, item)
        if not os.path.isdir(folder):
            problems.append(Problem("unknown-file", folder, "not a step directory"))
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if _real(path) in known or (
                    unmerged_path(_real(path)) != _real(path) and os.path.isfile(path)
                    and unmerged_path(_real(path)) in bases):
                continue
            what = "a step file" if _STEP_FILE.fullmatch(name) else "a file"
            problems.append(Problem("unknown-file", path, f"{what} that no step of the vault names"))
    return problems


def _real(path):
    """`path` with its directory resolved, its own name kept (a symlink in
    place of a step is not the step it points to)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _ranges(numbers):
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f"{start}-{n}" if n != start else f"{n}")
            start = None
    return ", ".join(out)

"""Disaster recovery on top of the vault: failover, change-point, commit,
reprotect and failback (drills are pydr.dr.drills).

States of an item: protected -> failing-over -> failed-over (-> change-point
...) -> committing -> failover-committed (direction flipped) -> protecting
(reprotect) -> protected. Each disk is brought up by the item's point
store (pydr.dr.pointstores): a step chain moves each replica (the latest
replicated state, the baseline of every undo step) aside to
".NAME.pydr-base" beside it -- an atomic rename -- and materialises the
chosen point at the replica's path (whole, by a rename); a chunk index
downloads it into --to DIR. change-point makes the disks again from the
untouched baselines (or the store), so it is exact even after the
failed-over machine wrote to its disks. commit discards the points and
what they were made from (PointStore.discard).

Every operation is recorded on the item while it runs (Store.begin/end,
with the command that finishes it), and each of its steps can be done
again: running the same command after a kill finishes it, and running it
after it finished says so and changes nothing.
"""

import contextlib
import os
import time

from ..engine import crashpoints
from ..errors import DamagedJournal, DamagedPoint, HookFailed, InvalidState, PydrError, UnknownName
from . import arguments, bringup, ownership
from .events import Emitter, check_cancel, interrupted
from .drills import check_no_overlay_drill, method_flags
from .hooks import run_hook
from .pointstores import point_store
from .points import SELECTORS, check_point, materialize_disk, operating, select_point
from .replication import owner_of, replicate

__all__ = ["failover", "change_point", "commit", "reprotect", "failback", "select_point",
           "SELECTORS"]


def _already(vault, name, kinds):
    """Whether the item's latest workflow job is one of `kinds` and ended
    well (or was killed after its last state change): it is done."""
    job = vault.last_job(name, excluding=("replicate", "materialize", "protect"))
    return job is not None and job.kind in kinds


_EVENTS_DOC = """
    ``events``: an EventSink (pydr.dr.events) given "started" once the
    item's job begins, per disk "progress" in phase "bring-up" (named by the
    disk the item's machine uses, never a temporary file), then "finished",
    "failed" or "cancelled" (a replication cycle it runs first reports as
    operation "replicate"). ``cancel``: a threading.Event; once set, the
    work stops at the next check (between disks, and in the copy: within
    about 16 MiB or a second) with Cancelled (exit 130), the item left as a
    kill leaves it: running the same call again finishes it."""


def failover(vault, name, point="latest", *, planned=False, shutdown_hook=None, method="auto",
             progress=None, to=None, executor=None, events=None, cancel=None, machine=None):
    """Fail `name` over to a recovery point; afterwards its replica paths
    hold that point, made by `method` (see materialize_disk; "qcow2": an
    overlay on the baseline, which a VM then writes into). An item
    replicated to an object store is brought up in the local directory `to`
    (its points downloaded there; the disks there are its replicas from then
    on). Returns {"item", "point", "method", "notes"} (and "machine",
    "verification" for a machine).

    An item that is a machine (pydr.dr.bringup) is then brought up on its
    disks (defined and started at the recovery connection, or its bring-up
    hook run), also when the failover was done before (a kill after the
    disks were made is finished so); `machine`: the options of
    bringup.check_options (``connect``, ``network_map``, ``name``,
    ``verify``).
    """
    started = time.time()
    if to is not None:
        to = arguments.directory(to, "failover's directory (to)")  # InvalidArgument
    machine = bringup.check_options(vault, name, machine, role="failover")
    em = Emitter(events, "failover", name)
    with operating(vault, name, "failover"):
        return em.run(lambda: _machine_up(vault, name, _failover(
            vault, name, point, planned, shutdown_hook, method, progress, to, executor, em,
            cancel), "failover", machine, started), started=False, done=_done)


def _machine_up(vault, name, result, role, options, started):
    """The machine of a failed-over (or failed-back) item brought up on its disks."""
    if vault.item(name)["state"] != "failed-over":
        return result
    disks = [{"idx": d["idx"], "path": vault.endpoint(name, d["replica"]).path}
             for d in vault.disks(name)]
    return bringup.machine_up(vault, name, result, disks, role=role, options=options,
                              started=started)


failover.__doc__ += _EVENTS_DOC


def _done(result):
    """The message of a "finished" event: the point the item is at."""
    return f"point {result['point']}" if result.get("point") is not None else None


def _failover(vault, name, point, planned, shutdown_hook, method, progress, to, executor, em,
              cancel):
    row = vault.item(name)
    store = point_store(vault, name)
    if row["state"] == "protected":  # where the disks come up: --to, or the replicas' paths
        to = store.failover_dir(to)
    if row["state"] == "failing-over":
        try:  # a step lost meanwhile: this point cannot come up, another one can
            check_point(vault, name, row["failover_point"])
        except (DamagedJournal, DamagedPoint) as exc:
            if all(p["damaged"] for p in vault.points(name)):
                raise  # no other point can come up either
            raise type(exc)(exc.message, path=exc.path, offset=exc.offset, item=name,
                            hint=f"bring another point up with 'pydr change-point {name} "
                                 f"--point N'") from None
        return _bring_up(vault, name, row["failover_point"], "failover", ["resumed"], method,
                         progress, checked=True, em=em, cancel=cancel)
    if row["state"] == "failed-over":
        at = row["failover_point"]
        wanted = at if point in (None, "latest", "latest-processed") else select_point(
            vault, name, point)
        if wanted == at:
            return {"item": name, "point": at,
                    "notes": [f"already failed over to point {at}: nothing to do"]}
        raise InvalidState(f"item {name!r} is failed over to point {at}", path=vault.dir,
                           item=name, hint=f"run 'pydr change-point {name} --point {wanted}'")
    if row["state"] != "protected":
        raise InvalidState(f"item {name!r} cannot fail over in state {row['state']} "
                           f"(direction {row['direction']})", path=vault.dir, item=name)
    check_no_overlay_drill(vault, name, "a failover")
    check_cancel(cancel, "the failover")
    chosen = not planned and point not in (None, "latest")
    if chosen:  # known now: checked before anything is recorded, moved or run
        check_point(vault, name, select_point(vault, name, point))
    command = f"pydr failover {name}" + (" --planned" if planned else "") + (
        f" --point {point}" if point not in (None, "latest") else "") + method_flags(method) + (
        f" --to {to}" if to else "")
    vault.begin(name, "failover", command)
    notes = []
    try:
        if shutdown_hook:
            try:
                run_hook(shutdown_hook, "shutdown hook")
            except HookFailed as exc:  # not a bad PYDR_HOOK_TIMEOUT: that stops it (exit 2)
                if planned:
                    raise
                notes.append(f"shutdown hook failed, going on (unplanned): {exc}")
        if planned or point in (None, "latest"):
            try:
                # the last changes first: lowest RPO
                replicate(vault, [name], executor=executor, events=em.sink, cancel=cancel)
                notes.append("replicated the latest changes first")
            except (OSError, PydrError) as exc:
                if planned or interrupted(exc):
                    raise
                notes.append(f"could not replicate the latest changes ({exc}); "
                             "using the newest point")
        pid = select_point(vault, name, "latest" if planned else point)
        if not chosen:
            check_point(vault, name, pid)  # before any replica moves
    except BaseException:
        vault.end(name, "failover")  # nothing changed yet: not an interrupted failover
        raise
    vault.set_item(name, state="failing-over", failover_point=pid, failover_dir=to)
    crashpoints.reached("failover.marked")
    return _bring_up(vault, name, pid, "failover", notes, method, progress, checked=True, em=em,
                     cancel=cancel)


def _bring_up(vault, name, pid, operation, notes, method="auto", progress=None, checked=False,
              *, em=None, cancel=None):
    """Make every disk of the item hold point `pid`, by its point store
    (PointStore.bring_up_disk: a step chain moves each replica aside to its
    baseline and makes the point from it at the replica's path; a chunk
    index downloads it into the failover directory). Ends in failed-over."""
    store = point_store(vault, name)
    methods = []
    em = em or Emitter(None, operation, name)

    def run():
        em.job = getattr(vault, "current_job", None)
        em.emit("started")
        if not checked:  # before any replica is moved aside
            check_point(vault, name, pid)
        for d in vault.disks(name):
            check_cancel(cancel, f"the {operation}")
            shown = em.progress(disk=d["idx"], phase="bring-up", path=d["replica"],
                                also=progress)
            methods.append(store.bring_up_disk(pid, d, method=method, progress=shown,
                                               cancel=cancel))
            if em:  # where the disk is now (a chunk index's came up in the failover directory)
                now = {x["idx"]: x["replica"] for x in vault.disks(name)}[d["idx"]]
                em.disk_done(disk=d["idx"], phase="bring-up", endpoint=vault.endpoint(name, now),
                             message=f"made ({methods[-1]})")
            crashpoints.reached("failover.disk")  # whole, by a rename
        vault.end(name, (operation, "failover", "change-point"), state="failed-over",
                  failover_point=pid)
        return {"item": name, "point": pid, "method": "+".join(sorted(set(methods))),
                "notes": notes}

    return vault.run_job(operation, name, run)


def current_method(vault, name):
    """How the failed-over disks were made, as far as it matters for making
    them again (PointStore.current_method): "qcow2" or "auto"."""
    return point_store(vault, name).current_method()


def change_point(vault, name, point, *, method=None, progress=None, events=None, cancel=None):
    """After a failover and before commit: the replica paths hold another
    point, made again from the untouched baselines by `method` (by default
    the way the failover made them). Returns {"item", "point", "method",
    "notes"}.

    A machine's failover domain (the one pydr defined) is stopped before
    its disks are replaced and started again on them afterwards (it never
    runs on a disk being rebuilt); the result's "machine" says so.
    """
    started = time.time()
    em = Emitter(events, "change-point", name)
    with operating(vault, name, "change-point"):
        return em.run(lambda: _machine_up(vault, name, _change_point(
            vault, name, point, method, progress, em, cancel), "failover", {}, started),
            started=False, done=_done)


change_point.__doc__ += _EVENTS_DOC


def _change_point(vault, name, point, method, progress, em, cancel):
    row = vault.item(name)
    if row["state"] not in ("failed-over", "failing-over"):
        raise InvalidState(f"change-point needs a failed-over item; {name!r} is {row['state']}",
                           path=vault.dir, item=name)
    pid = select_point(vault, name, point)
    if row["state"] == "failed-over" and row["failover_point"] == pid:
        return {"item": name, "point": pid,
                "notes": [f"already at point {pid}: nothing to do"]}
    method = method or current_method(vault, name)
    check_point(vault, name, pid)  # before the failed-over disks are replaced
    check_cancel(cancel, "change-point")
    bringup.stop_domain(vault, name, "failover")  # never running on disks being rebuilt
    vault.begin(name, "change-point", f"pydr change-point {name} --point {pid}"
                f"{method_flags(method)}", state="failing-over", failover_point=pid)
    crashpoints.reached("failover.marked")
    return _bring_up(vault, name, pid, "change-point", [], method, progress, checked=True,
                     em=em, cancel=cancel)


def commit(vault, name, *, events=None, cancel=None):
    """Make the failover final: site B is active (the direction flips); the
    recovery points, their steps and the old baselines are discarded.
    Returns {"item", "direction", "notes"}.

    In two transactions around the removal of the files: "committing"
    first (no point may be used from then on), the records last, so that a
    kill in between is finished by committing again, and no file is left
    that nothing names. ``events``: an EventSink given "started" and
    "finished" (or "failed"); ``cancel``: a threading.Event asked before the
    commit begins (Cancelled: nothing changed); once begun it finishes."""
    em = Emitter(events, "commit", name)
    with operating(vault, name, "commit"):
        return em.run(lambda: _commit(vault, name, em, cancel), started=False,
                      done=lambda r: f"direction {r['direction']}")


def _commit(vault, name, em, cancel):
    row = vault.item(name)
    if row["state"] == "failover-committed":
        return {"item": name, "direction": row["direction"],
                "notes": ["already committed: nothing to do"]}
    if row["state"] not in ("failed-over", "committing"):
        raise InvalidState(f"commit needs a failed-over item; {name!r} is {row['state']}",
                           path=vault.dir, item=name)
    if row["state"] == "failed-over":
        check_cancel(cancel, "the commit")
        vault.begin(name, "commit", f"pydr commit {name}", state="committing")
        crashpoints.reached("commit.marked")

    def run():
        em.job = getattr(vault, "current_job", None)
        em.emit("started")
        notes = point_store(vault, name).discard()  # steps, baselines, indexes
        for d in vault.disks(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(vault.cache_path(name, d["idx"]))
            ownership.forget_state(vault.dir, name, d["idx"], ownership.BASELINE)
        crashpoints.reached("commit.removed")
        flipped = "reverse" if row["direction"] == "forward" else "forward"
        with vault.transaction():
            vault.drop_all_points(name)
            vault.set_item(name, state="failover-committed", direction=flipped,
                           failover_point=None, operation=None, operation_command=None,
                           operation_args=None)
        return {"item": name, "direction": flipped, "notes": notes}

    return vault.run_job("commit", name, run)


def reprotect(vault, name, *, progress=None, events=None, cancel=None):
    """After commit: replicate in the other direction. Each disk's replica
    (now active) becomes the source and its old source the replica, reused:
    the first cycle is a checksum resync that moves only differing blocks.

    ``events``: an EventSink given "started" (the reprotect job), the
    cycle's events (operation "replicate"), then "finished", "failed" or
    "cancelled". ``cancel``: a threading.Event; once set, the cycle stops as
    replicate's does (Cancelled), the reprotect left pending: running it
    again finishes it."""
    em = Emitter(events, "reprotect", name)
    with operating(vault, name, "reprotect"):
        return em.run(lambda: _reprotect(vault, name, progress, em, cancel), started=False,
                      done=_done)


def _reprotect(vault, name, progress, em, cancel):
    row = vault.item(name)
    if vault.pending(name, "reprotect") is None:
        if row["state"] == "protected" and _already(vault, name, ("reprotect",)):
            return {"item": name, "direction": row["direction"], "point": None,
                    "bytes_written": 0, "bytes_read": 0,
                    "notes": ["already reprotected: nothing to do"]}
        if row["state"] != "failover-committed":
            raise InvalidState(f"reprotect needs a committed failover; {name!r} is "
                               f"{row['state']}", path=vault.dir, item=name)
        check_cancel(cancel, "the reprotect")
        # changed-block tracking belongs to a source: the new one (the old replica) keeps it
        # only if it can hold dirty bitmaps itself (a qcow2 image, a live disk), from a new
        # bitmap; a raw replica cannot, and its cycles compare as untracked ones do
        tracking = {d.idx: vault.endpoint(name, d.replica).tracking if d.tracking else None
                    for d in vault.disks(name)}
        dropped = [d.idx for d in vault.disks(name) if d.tracking and not tracking[d.idx]]
        with vault.transaction():
            for d in vault.disks(name):
                vault.set_disk(name, d.idx, source=d.replica, replica=d.source,
                               tracking=tracking[d.idx], bitmap=None)
            vault.set_item(name, state="protecting", operation="reprotect",
                           operation_command=f"pydr reprotect {name}", operation_args="{}")
        crashpoints.reached("reprotect.swapped")
        notes = [f"changed-block tracking is off for disk {i} in the new direction: its new "
                 f"source cannot hold dirty bitmaps (cycles compare it whole)" for i in dropped]
    else:
        notes = ["resumed"]
    em.job = vault.start_job("reprotect", name, state="running")
    em.emit("started")
    try:
        result = replicate(vault, [name], resync_all=True, progress=progress, events=em.sink,
                           cancel=cancel)
    except BaseException as exc:  # the reprotect stays pending: running it again finishes it
        vault.end_job(em.job, "cancelled" if interrupted(exc) else "failed", error=str(exc))
        raise
    vault.end(name, "reprotect")
    _end_latest_job(vault, name, "reprotect")
    return {"item": name, "direction": vault.item(name)["direction"], "point": result.point_id,
            "bytes_written": result.bytes_written, "bytes_read": result.bytes_read,
            "cycle": result, "notes": notes}


def _end_latest_job(vault, name, kind):
    vault.end_job(vault.last_job(name, kind).id, "succeeded")


def failback(vault, name, *, alternates=None, shutdown_hook=None, events=None, cancel=None):
    """A planned failover in the reverse direction: a final cycle, nothing
    lost. With alternates {replica path: new path}, those disks are brought
    up at the new paths instead (the old ones are left as they are).

    A ``cancel`` set before the shutdown hook runs stops it with nothing
    run or recorded. Once the hook has run (the machine is down), a cancel
    or an error leaves the failback recorded as interrupted: running the
    same call again (the hook need not run again) finishes it.

    The failover domain pydr defined for a libvirt machine is shut down
    (pydr.dr.bringup.shut_down: asked, then destroyed after a bound) before
    the final cycle, with or without a shutdown hook: the cycle reads
    quiescent disks. A libvirt machine is then started again at site A (its protected
    domain, found by its recorded UUID), and the failover domain pydr
    defined is destroyed and undefined if the recovery site answers
    (pydr.dr.bringup.start_protected); the result's "machine" says so.
    """
    em = Emitter(events, "failback", name)
    with operating(vault, name, "failback"):
        return em.run(lambda: _start_protected(vault, name, _failback(
            vault, name, alternates, shutdown_hook, em, cancel)), started=False, done=_done)


failback.__doc__ += _EVENTS_DOC


def _failback(vault, name, alternates, shutdown_hook, em, cancel):
    row = vault.item(name)
    pending = vault.pending(name, "failback")
    if row["state"] == "failing-over" and pending is not None:
        return _bring_up(vault, name, row["failover_point"], "failback", ["resumed"], em=em,
                         cancel=cancel)
    if pending is None and row["state"] == "failed-over" and row["direction"] == "reverse" \
            and _already(vault, name, ("failback",)):
        return {"item": name, "point": row["failover_point"],
                "notes": ["already failed back: nothing to do"]}
    alternates = {vault.endpoint(name, k).spec: vault.endpoint(name, v).spec
                  for k, v in (alternates or {}).items()}
    if pending is None:
        if row["direction"] != "reverse" or row["state"] != "protected":
            raise InvalidState(f"failback needs a reprotected item (direction reverse, "
                               f"protected); {name!r} is {row['state']}, direction "
                               f"{row['direction']}", path=vault.dir, item=name)
        replicas = {d["replica"] for d in vault.disks(name)}
        unknown = [k for k in alternates if k not in replicas]
        if unknown:
            raise UnknownName(f"not a replica of {name!r}: {', '.join(unknown)}", path=vault.dir,
                              item=name)
        for new in alternates.values():
            if vault.endpoint(name, new).exists():
                raise InvalidState("the alternate location exists already", path=new, item=name)
        command = f"pydr failback {name}" + "".join(
            f" --alternate {k}={v}" for k, v in alternates.items())
        check_cancel(cancel, "the failback")  # before the hook: nothing ran, nothing recorded
        vault.begin(name, "failback", command, {"alternates": alternates})
    elif alternates and alternates != pending["alternates"]:
        raise InvalidState(f"an interrupted failback of {name!r} is pending, with other "
                           f"alternates", path=vault.dir, item=name,
                           hint=f"run '{row['operation_command']}'")
    alternates = (pending or {}).get("alternates", alternates)
    stopped_machine = False
    try:
        check_cancel(cancel, "the failback")  # a resumed one too: before its hook runs again
        if shutdown_hook:
            run_hook(shutdown_hook, "shutdown hook")  # planned: it must succeed
            stopped_machine = True
        # the failover domain pydr defined stops writing before the final cycle reads its disks
        if bringup.shut_down(vault, name, "failover"):
            stopped_machine = True
        check_cancel(cancel, "the failback")
        # the final cycle: nothing is lost
        pid = replicate(vault, [name], events=em.sink, cancel=cancel).point_id
    except BaseException:
        # nothing changed yet, unless the machine was shut down: then the failback stays
        # recorded (interrupted), and running it again finishes it
        if pending is None and not stopped_machine:
            vault.end(name, "failback")
        raise
    crashpoints.reached("failback.cycle")
    for d in vault.disks(name):
        new = alternates.get(d["replica"])
        if new is None:
            continue
        # the disk comes up at the new path; the old replica is left alone
        vault.run_job("materialize", name,
                      lambda d=d, new=new: materialize_disk(vault, name, pid, d, new,
                                                            cancel=cancel))
        # the point's steps are rolled back onto it from now on: its identity is recorded
        ownership.record_state(owner_of(vault, name, dict(d, replica=new)),
                               vault.endpoint(name, new), writing=False)
        vault.set_disk(name, d["idx"], replica=new)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(vault.cache_path(name, d["idx"]))  # described the old path
        crashpoints.reached("failback.alternate")
    vault.set_item(name, state="failing-over", failover_point=pid)
    crashpoints.reached("failover.marked")
    return _bring_up(vault, name, pid, "failback", [], em=em, cancel=cancel)


def _start_protected(vault, name, result):
    """A failed-back machine: its protected domain at site A started again."""
    if vault.item(name)["state"] == "failed-over":
        up = bringup.start_protected(vault, name)
        if up is not None:
            result = dict(result, machine=up,
                          notes=list(result.get("notes") or []) + list(up.pop("notes")))
    return result

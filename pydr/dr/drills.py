"""Test failovers (DR drills): a recovery point's disks materialised into a
directory while the replicas and replication go on untouched, and their
clean-up. Both are recorded on the item while they run, so that running the
same command again after a kill finishes them."""

import os
import time

from ..engine import crashpoints, names
from ..errors import InvalidArgument, InvalidState, UnknownName
from . import arguments, bringup
from .events import Emitter, check_cancel
from .pointstores import point_store
from .points import check_point, destinations, materialize_into, operating, select_point

SELECTORS = (None, "latest", "latest-processed", "latest-app-consistent")


_METHOD_FLAGS = {"auto": "", "qcow2": " --as qcow2", "copy": " --copy", "reflink": " --reflink"}


def method_flags(method):
    """The command-line options that ask for `method`; InvalidArgument
    naming the methods for any other."""
    try:
        return _METHOD_FLAGS[method]
    except (KeyError, TypeError):
        raise InvalidArgument(f"method must be one of {', '.join(map(repr, _METHOD_FLAGS))}, "
                              f"not {method!r}") from None


def check_no_overlay_drill(vault, name, what):
    """Refuse to write to (or move) the replicas while a drill's qcow2
    overlays read them (PointStore.refuse_writes_under_drill)."""
    point_store(vault, name).refuse_writes_under_drill(what)


def test_failover(vault, name, directory, point=None, *, method="auto", progress=None,
                  events=None, cancel=None, machine=None):
    """Drill: materialise a point into `directory` (a spec) by `method`
    ("auto": reflink where the file system can clone, else a copy; "qcow2":
    overlays backed by the replicas, which then are not replicated to until
    the drill is cleaned up; "copy"). Returns {"item", "point", "paths",
    "method", "notes"}. A drill that was interrupted is finished by the same
    call; one that is complete is left as it is.

    ``events``: an EventSink (pydr.dr.events) given "started" (with the
    job), per disk "progress" in phase "materialize" (named by the drill's
    disk), then "finished", "failed" or "cancelled". ``cancel``: a
    threading.Event; once set, the drill stops between disks and in the
    copy (Cancelled, exit 130) and is left as a kill leaves it: interrupted,
    finished by running the same call again (or cleaned up).

    An item that is a machine (pydr.dr.bringup) is then brought up on the
    drill's disks as ``pydr-drill-ITEM`` (a fresh UUID and MACs, no network
    or only the drill network), also when the drill was done before;
    `machine`: the options of bringup.check_options (``connect``,
    ``drill_network``, ``network_map``, ``verify``). A failed verification
    (VerificationFailed) leaves the drill machine up for inspection until
    the clean-up."""
    started = time.time()
    directory = arguments.directory(directory, "test_failover's directory")  # InvalidArgument
    machine = bringup.check_options(vault, name, machine, role="drill")
    em = Emitter(events, "test-failover", name)
    with operating(vault, name, "test-failover"):
        return em.run(lambda: _drill_machine(vault, name, _test_failover(
            vault, name, directory, point, method, progress, em, cancel), machine, started),
            started=False, done=lambda r: f"point {r['point']} in {directory}")


def _drill_machine(vault, name, result, options, started):
    """The drill's machine brought up on the drill's disks."""
    row = vault.item(name)
    directory = vault.endpoint(name, row["test_dir"])
    disks = [{"idx": d["idx"], "path": directory.child(
        os.path.basename(vault.endpoint(name, d["replica"]).path)).path}
        for d in vault.disks(name)]
    return bringup.machine_up(vault, name, result, disks, role="drill", options=options,
                              started=started)


def _test_failover(vault, name, directory, point, method, progress, em, cancel):
    row = vault.item(name)
    where = vault.endpoint(name, directory).spec
    notes = []
    if row["test_dir"]:
        if row["test_dir"] != where:
            raise InvalidState(f"a test failover of {name!r} is already in {row['test_dir']}",
                               path=vault.dir, item=name,
                               hint=f"run 'pydr cleanup-test-failover {name}' first")
        pid = row["test_point"]
        if point not in SELECTORS and select_point(vault, name, point) != pid:
            raise InvalidState(f"the test failover of {name!r} in {where} shows point {pid}",
                               path=vault.dir, item=name,
                               hint=f"run 'pydr cleanup-test-failover {name}' first")
        interrupted = vault.pending(name, "test-failover") is not None
        if interrupted:
            _check_still_kept(vault, name, pid, where)
        notes.append("resumed" if interrupted else
                     f"already done: {where} holds point {pid}")
    else:
        if row["state"] != "protected":
            raise InvalidState(f"item {name!r} cannot be test-failed-over in state {row['state']}",
                               path=vault.dir, item=name)
        pid = select_point(vault, name, point)
        check_point(vault, name, pid)  # a damaged point: refused before anything is recorded
        destinations(vault, name, where)  # so are disks that cannot be made there
        check_cancel(cancel, "the test failover")
        # first: a killed drill is finished, or cleaned up, from this record
        vault.begin(name, "test-failover", f"pydr test-failover {name} --to {where} --point "
                    f"{pid}{method_flags(method)}", test_dir=where, test_point=pid)
        crashpoints.reached("drill.recorded")
    methods = []

    def run():
        em.job = getattr(vault, "current_job", None)
        em.emit("started")
        paths = materialize_into(vault, name, pid, where, drill=True, method=method,
                                 progress=progress, methods=methods, events=em, cancel=cancel)
        # a resumed drill: also how the disks made before the kill were made
        for m in filter(None, (vault.item(name)["test_method"] or "").split("+")):
            vault.note_method(m)
        vault.end(name, "test-failover")
        return paths

    paths = vault.run_job("test-failover", name, run)
    return {"item": name, "point": pid, "paths": paths,
            "method": vault.item(name)["test_method"], "notes": notes}


def _check_still_kept(vault, name, pid, where):
    """Refuse to finish a drill whose point is gone (retention of a vault
    from before drills kept their point): its last disks would show
    another point than its first."""
    try:
        vault.point(name, pid)
    except UnknownName:
        raise InvalidState(f"the interrupted test failover of {name!r} in {where} shows point "
                           f"{pid}, which the vault no longer keeps: its other disks cannot be "
                           f"made", path=vault.dir, item=name,
                           hint=f"run 'pydr cleanup-test-failover {name}' first") from None


def cleanup_test_failover(vault, name, *, events=None, cancel=None):
    """Remove what test_failover wrote (its directory too, if that empties
    it). Returns {"item", "removed", "notes"}. ``events``: an EventSink given
    "started" and "finished" (or "failed"); ``cancel``: a threading.Event
    asked before anything is removed (Cancelled: nothing was)."""
    em = Emitter(events, "cleanup-test-failover", name)
    with operating(vault, name, "cleanup-test-failover"):
        return em.run(lambda: _cleanup(vault, name, em, cancel), started=False,
                      done=lambda r: f"{len(r['removed'])} files removed")


def _cleanup(vault, name, em, cancel):
    row = vault.item(name)
    check_cancel(cancel, "the clean-up of the test failover")
    # the drill machine first: it runs on the drill's disks (pydr's own domain only, by UUID)
    gone = bringup.tear_down(vault, name, "drill")
    if not row["test_dir"]:
        return {"item": name, "removed": [], "notes": [
            f"drill domain {gone['domain']!r} removed" if gone else
            "no test failover to clean up: nothing to do"]}

    def run():
        em.job = getattr(vault, "current_job", None)
        em.emit("started")
        vault.end(name, "test-failover")  # an interrupted drill is abandoned
        vault.begin(name, "cleanup-test-failover", f"pydr cleanup-test-failover {name}")
        directory = vault.endpoint(name, row["test_dir"])
        disks = [directory.child(os.path.basename(vault.endpoint(name, d["replica"]).path))
                 for d in vault.disks(name)]
        removed = [str(d) for d in disks if d.exists()]
        # the disks, and what a killed drill left half-made beside them
        point_store(vault, name).remove_drill(directory,
                                              disks + [d.sidecar(names.NEW) for d in disks])
        crashpoints.reached("drill.cleaned")
        vault.end(name, "cleanup-test-failover", test_dir=None, test_point=None, test_method=None)
        return removed

    notes = [f"drill domain {gone['domain']!r} destroyed and undefined"] if gone else []
    return {"item": name, "removed": vault.run_job("cleanup-test-failover", name, run),
            "notes": notes}

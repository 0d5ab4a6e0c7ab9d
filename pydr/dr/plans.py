"""Recovery plans: ordered groups of items failed over (or drilled, committed,
reprotected, failed back) together.

A plan's groups run in order; the items of a group run in parallel, each on
its own thread with its own connection to the vault (the calling process
holds the vault's lock). A group's pre hook runs before it and its post hook
after it; the first failure -- a hook or an item -- stops the plan, and the
report says what ran, what failed and what did not run.

With a fleet (``fleet=``, pydr.dr.fleet), an item's replication cycles (a
planned failover's last one) run on its host's Dask workers; everything at
site B (bringing disks up, drills, commit) runs here. ``events``: an
EventSink (pydr.dr.events) given the plan's own Events ("plan-step" as a
group starts and as each item of it ends, "hook" for each pre/post hook,
"finished" or "failed" for the plan) and each item's operation's Events.
"""

import os
import subprocess
import threading

from ..engine import crashpoints
from ..errors import Cancelled, PlanFailed
from .events import Emitter
from . import drills as D
from . import failover as F
from .store import Store

OPERATIONS = ("failover", "test-failover", "cleanup-test-failover", "commit", "reprotect",
              "failback")


def create_plan(vault, name, groups):
    """groups: [{"items": [...], "pre": CMD or None, "post": CMD or None}]."""
    if not name or "/" in name:
        raise ValueError(f"invalid plan name {name!r}")
    if not groups or any(not g.get("items") for g in groups):
        raise ValueError("a plan needs at least one --group with at least one item")
    seen = set()
    for g in groups:
        for item in g["items"]:
            vault.item(item)  # UnknownName if it is not protected
            if item in seen:
                raise ValueError(f"item {item!r} is in two groups of the plan")
            seen.add(item)
    definition = [{"items": list(g["items"]), "pre": g.get("pre"), "post": g.get("post")}
                  for g in groups]
    vault.add_plan(name, definition)  # InvalidState if one of that name exists
    return definition


def get_plan(vault, name):
    return vault.plan(name).definition


def _operation(op, options, executor=None, events=None, cancel=None):
    """fn(vault, item) -> result dict, for one item (a failover's last cycle
    through `executor`: a fleet's, or this process), given `events` and
    `cancel`."""
    watch = {"events": events, "cancel": cancel}
    if op == "failover":
        return lambda v, n: F.failover(v, n, options.get("point") or "latest",
                                       planned=options.get("planned", False),
                                       shutdown_hook=options.get("shutdown_hook"),
                                       executor=executor, **watch)
    if op == "test-failover":
        to = options["to"]
        return lambda v, n: D.test_failover(v, n, os.path.join(to, n), options.get("point"),
                                            **watch)
    if op == "cleanup-test-failover":
        return lambda v, n: D.cleanup_test_failover(v, n, **watch)
    if op == "commit":
        return lambda v, n: F.commit(v, n, **watch)
    if op == "reprotect":
        return lambda v, n: F.reprotect(v, n, **watch)
    if op == "failback":
        return lambda v, n: F.failback(v, n, shutdown_hook=options.get("shutdown_hook"),
                                       **watch)
    raise ValueError(f"unknown plan operation {op!r}: one of {', '.join(OPERATIONS)}")


def run_plan(vault, name, op, *, events=None, cancel=None, **options):
    """Run `op` over the plan; returns the report (a list of per-item and
    per-hook entries). Raises PlanFailed, carrying the report, on a failure.

    ``events``: an EventSink (pydr.dr.events; default: the fleet's, if
    ``fleet=`` is given) given "plan-step" Events (a group started, an item
    of it ended), "hook" Events, each item's own Events (from its threads),
    and "finished" or "failed" for the plan (``item`` None). ``cancel``: a
    threading.Event passed to each item's operation; once set, the running
    items stop as a kill stops them, no later group starts, and Cancelled
    (exit 130) is raised with the report as its ``.report``."""
    fleet = options.pop("fleet", None)
    if events is None and fleet is not None:
        events = fleet.events
    groups = get_plan(vault, name)
    fn = _operation(op, options, fleet.executor() if fleet is not None else None, events, cancel)
    report = []
    em = Emitter(events, op)

    def stop(message, error=PlanFailed):
        for later in groups[len({e["group"] for e in report}):]:
            for item in later["items"]:
                report.append({"group": groups.index(later) + 1, "item": item, "status": "not run"})
        em.emit("cancelled" if error is Cancelled else "failed", message=message)
        if error is Cancelled:
            exc = Cancelled(message, path=name)
            exc.report = report
            raise exc
        raise PlanFailed(message, report, path=name)

    def hook(number, which, command):
        r = subprocess.run(command, shell=True, capture_output=True, text=True)
        report.append({"group": number, "hook": which,
                       "status": "ok" if r.returncode == 0 else "failed", "exit": r.returncode})
        em.emit("hook", message=f"plan {name}: {which} hook of group {number}: exit "
                f"{r.returncode}")
        return r

    for number, group in enumerate(groups, 1):
        if cancel is not None and cancel.is_set():
            stop(f"plan {name!r} cancelled before group {number}", Cancelled)
        if group["pre"]:
            r = hook(number, "pre", group["pre"])
            if r.returncode:
                for item in group["items"]:
                    report.append({"group": number, "item": item, "status": "not run"})
                stop(f"plan {name!r} stopped: the pre hook of group {number} failed "
                     f"(exit {r.returncode})")
        results = {}
        em.emit("plan-step", message=f"plan {name}: group {number} of {len(groups)} started ("
                f"{', '.join(group['items'])})")

        def work(item):
            try:
                with Store(vault.dir) as v:  # a connection of its own
                    results[item] = ("succeeded", fn(v, item))
            except Exception as exc:  # reported per item below
                results[item] = ("failed", str(exc))
            em.for_item(item).emit("plan-step", message=f"plan {name}: group {number}: "
                                   f"{results[item][0]}" + (f": {results[item][1]}"
                                                             if results[item][0] == "failed"
                                                             else ""))

        threads = [threading.Thread(target=work, args=(i,), name=f"pydr-plan-{i}")
                   for i in group["items"]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = []
        for item in group["items"]:
            status, detail = results[item]
            entry = {"group": number, "item": item, "status": status}
            entry["result" if status == "succeeded" else "error"] = detail
            report.append(entry)
            if status == "failed":
                failed.append(item)
        if failed and cancel is not None and cancel.is_set():
            stop(f"plan {name!r} cancelled in group {number}: {', '.join(failed)} stopped",
                 Cancelled)
        if failed:
            stop(f"plan {name!r} stopped in group {number}: {', '.join(failed)} failed")
        if group["post"]:
            r = hook(number, "post", group["post"])
            if r.returncode:
                stop(f"plan {name!r} stopped: the post hook of group {number} failed "
                     f"(exit {r.returncode})")
        crashpoints.reached("plan.group")
    em.emit("finished", message=f"plan {name}: {op} done")
    return report

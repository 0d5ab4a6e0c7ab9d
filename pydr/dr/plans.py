"""Recovery plans: ordered groups of items failed over (or drilled, committed,
reprotected, failed back) together.

A plan's groups run in order; the items of a group run in parallel, each on
its own thread with its own connection to the vault (the calling process
holds the vault's lock). A group's pre hook runs before it and its post hook
after it; the first failure -- a hook or an item -- stops the plan, and the
report says what ran, what failed and what did not run.

With a fleet (``fleet=``, pydr.dr.fleet), an item's replication cycles (a
planned failover's last one) run on its host's Dask workers; everything at
site B (bringing disks up, drills, commit) runs here. ``events``: fn(dict)
called as groups start and items end.
"""

import os
import subprocess
import threading

from ..engine import crashpoints
from ..errors import PlanFailed
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


def _operation(op, options, executor=None):
    """fn(vault, item) -> result dict, for one item (a failover's last cycle
    through `executor`: a fleet's, or this process)."""
    if op == "failover":
        return lambda v, n: F.failover(v, n, options.get("point") or "latest",
                                       planned=options.get("planned", False),
                                       shutdown_hook=options.get("shutdown_hook"),
                                       executor=executor)
    if op == "test-failover":
        to = options["to"]
        return lambda v, n: D.test_failover(v, n, os.path.join(to, n), options.get("point"))
    if op == "cleanup-test-failover":
        return D.cleanup_test_failover
    if op == "commit":
        return F.commit
    if op == "reprotect":
        return lambda v, n: F.reprotect(v, n)
    if op == "failback":
        return lambda v, n: F.failback(v, n, shutdown_hook=options.get("shutdown_hook"))
    raise ValueError(f"unknown plan operation {op!r}: one of {', '.join(OPERATIONS)}")


def run_plan(vault, name, op, **options):
    """Run `op` over the plan; returns the report (a list of per-item and
    per-hook entries). Raises PlanFailed, carrying the report, on a failure."""
    fleet = options.pop("fleet", None)
    events = options.pop("events", None) or (fleet.events if fleet is not None else None)
    groups = get_plan(vault, name)
    fn = _operation(op, options, fleet.executor() if fleet is not None else None)
    report = []

    def emit(**event):
        if events is not None:
            events({"event": "plan", "plan": name, "operation": op, **event})

    def stop(message):
        for later in groups[len({e["group"] for e in report}):]:
            for item in later["items"]:
                report.append({"group": groups.index(later) + 1, "item": item, "status": "not run"})
        raise PlanFailed(message, report, path=name)

    for number, group in enumerate(groups, 1):
        if group["pre"]:
            r = subprocess.run(group["pre"], shell=True, capture_output=True, text=True)
            report.append({"group": number, "hook": "pre",
                           "status": "ok" if r.returncode == 0 else "failed", "exit": r.returncode})
            if r.returncode:
                for item in group["items"]:
                    report.append({"group": number, "item": item, "status": "not run"})
                stop(f"plan {name!r} stopped: the pre hook of group {number} failed "
                     f"(exit {r.returncode})")
        results = {}
        emit(group=number, groups=len(groups), status="started", items=list(group["items"]))

        def work(item):
            try:
                with Store(vault.dir) as v:  # a connection of its own
                    results[item] = ("succeeded", fn(v, item))
            except Exception as exc:  # reported per item below
                results[item] = ("failed", exc)
            emit(group=number, item=item, status=results[item][0])

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
            if status == "succeeded":
                entry["result"] = detail
            else:  # the exception too: a caller reports its exit code and hint
                entry.update(error=str(detail), exception=detail)
            report.append(entry)
            if status == "failed":
                failed.append(item)
        if failed:
            stop(f"plan {name!r} stopped in group {number}: {', '.join(failed)} failed")
        if group["post"]:
            r = subprocess.run(group["post"], shell=True, capture_output=True, text=True)
            report.append({"group": number, "hook": "post",
                           "status": "ok" if r.returncode == 0 else "failed", "exit": r.returncode})
            if r.returncode:
                stop(f"plan {name!r} stopped: the post hook of group {number} failed "
                     f"(exit {r.returncode})")
        crashpoints.reached("plan.group")
    return report

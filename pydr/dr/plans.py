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
import threading

from ..engine import crashpoints
from ..errors import Cancelled, InvalidArgument, PlanFailed, UnknownName
from . import arguments
from .events import Emitter
from .hooks import HookTimedOut, hook_timeout, run_command
from . import drills as D
from . import failover as F
from .points import check_selector
from .protection import check_name
from .store import Store

OPERATIONS = ("failover", "test-failover", "cleanup-test-failover", "commit", "reprotect",
              "failback")


def create_plan(vault, name, groups):
    """Define recovery plan `name`: its groups, run in order.

    Args:
        vault: the open vault (a writer).
        name: the plan's name: 1 to 128 of A-Z a-z 0-9 '.' '_' '-', not
            starting with '-', not '.' or '..' (pydr.dr.protection.NAME_RULE).
        groups: the groups in order, each either a list of item names, or a
            dict ``{"items": [names], "pre": CMD or None, "post": CMD or
            None}`` with the shell commands run before and after the group.

    Returns the definition stored: ``[{"items", "pre", "post"}]``.

    Raises:
        InvalidArgument: a bad name, no groups, a group of another shape or
            with no items, an item in two groups (the message names the
            group: "group N (groups[N-1])").
        UnknownName: items that are not protected (all of them named).
        InvalidState: a plan of that name exists.
    """
    check_name(name, "a plan's name")
    definition = _groups(groups)
    unknown = [i for g in definition for i in g["items"] if not vault.has_item(i)]
    if unknown:
        raise UnknownName(f"plan {name!r} names items that are not protected: "
                          f"{', '.join(map(repr, unknown))}", path=vault.dir, item=unknown[0])
    vault.add_plan(name, definition)  # InvalidState if one of that name exists
    return definition


def _groups(groups):
    """A plan's groups as stored, [{"items", "pre", "post"}], from a list of
    dicts or of lists of item names; InvalidArgument naming the group that
    is neither. A refusal names types, never values: a hook's command line
    may hold a password."""
    expected = ('a list of item names, or a dict {"items": [names], "pre": CMD or None, '
                '"post": CMD or None}')
    if isinstance(groups, (str, bytes, dict)) or not isinstance(groups, (list, tuple)):
        raise InvalidArgument(f"a plan's groups must be a list of groups, each {expected}; "
                              f"not one of type {type(groups).__name__}")
    if not groups:
        raise InvalidArgument("a plan needs at least one group with at least one item",
                              hint="give --group ITEM[,ITEM...]")
    out, seen = [], {}
    for index, group in enumerate(groups):
        where = f"group {index + 1} (groups[{index}])"
        if isinstance(group, dict):
            extra = set(group) - {"items", "pre", "post"}
            if extra:
                keys = ", ".join(sorted(map(repr, extra)))
                raise InvalidArgument(f"{where} has keys {keys}: expected {expected}")
            items, hooks = group.get("items"), {k: group.get(k) for k in ("pre", "post")}
            for key, hook in hooks.items():
                if hook is not None and not (isinstance(hook, str) and hook.strip()):
                    raise InvalidArgument(f"{where}: its {key!r} hook must be a shell command "
                                          f"(a non-empty str) or None, not "
                                          + ("a blank str" if isinstance(hook, str) else
                                             f"one of type {type(hook).__name__}"))
        elif isinstance(group, (list, tuple)):
            items, hooks = group, {"pre": None, "post": None}
        else:
            raise InvalidArgument(f"{where} is of type {type(group).__name__}: "
                                  f"expected {expected}")
        if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)) or not items \
                or not all(isinstance(i, str) and i for i in items):
            raise InvalidArgument(f"{where} has items {items!r}: expected a non-empty list of "
                                  f"item names (str)", hint="give --group ITEM[,ITEM...]")
        for item in items:
            if item in seen:
                raise InvalidArgument(f"item {item!r} is in two groups of the plan: group "
                                      f"{seen[item] + 1} and {where}", item=item)
            seen[item] = index
        out.append({"items": list(items), **hooks})
    return out


def get_plan(vault, name):
    return vault.plan(name).definition


# the options each operation takes (besides fleet=, events=, cancel=); an
# option given as None is not given
_OPTIONS = {
    "failover": ("point", "planned", "shutdown_hook"),
    "test-failover": ("directory", "to", "point", "verify", "verify_console", "verify_tcp",
                      "verify_script", "verify_timeout", "drill_network"),
    "cleanup-test-failover": (),
    "commit": (),
    "reprotect": (),
    "failback": ("shutdown_hook",),
}
_COMMON = ("fleet", "events", "cancel")


def check_operation(op, options):
    """The options of plan operation `op` as _operation reads them (a
    test-failover's ``directory``, also accepted as ``to``); InvalidArgument
    for an unknown operation, an option it does not take, a missing
    directory or a bad point selector."""
    if op not in OPERATIONS:
        near = op.replace("_", "-") if isinstance(op, str) else None
        raise InvalidArgument(f"unknown plan operation {op!r}: expected one of "
                              f"{', '.join(map(repr, OPERATIONS))}",
                              hint=f"did you mean {near!r}?" if near in OPERATIONS else None)
    known = _OPTIONS[op] + _COMMON
    given = {k: v for k, v in options.items() if v is not None}
    for key, value in given.items():
        if key in known:
            continue
        if any(key in o for o in _OPTIONS.values()):
            if value is False:  # a flag of another operation, not set
                continue
            raise InvalidArgument(f"plan operation {op!r} takes no option {key!r} (it takes "
                                  f"{', '.join(map(repr, _OPTIONS[op])) or 'none'})")
        raise InvalidArgument(f"unknown option {key!r} for plan operation {op!r}: expected "
                              f"{', '.join(map(repr, _OPTIONS[op] + _COMMON))}")
    checked = dict(given)
    if op == "test-failover":
        dirs = {k: arguments.directory(checked.pop(k), f"test-failover's option {k!r}")
                for k in ("directory", "to") if k in checked}
        if len(set(dirs.values())) > 1:
            raise InvalidArgument(f"test-failover was given both directory={dirs['directory']!r} "
                                  f"and to={dirs['to']!r}: expected one (directory)")
        if not dirs:
            raise InvalidArgument("plan operation 'test-failover' needs the option 'directory' "
                                  "(each item's disks go to DIRECTORY/ITEM)",
                                  hint="give --to DIR")
        checked["directory"] = next(iter(dirs.values()))
    if "point" in checked:
        checked["point"] = check_selector(checked["point"])
    probe_options = {k: checked.pop(k) for k in ("verify_console", "verify_tcp",
                                                  "verify_script", "verify_timeout")
                     if k in checked}
    if checked.pop("verify", False) or probe_options:
        from .probes import Probes

        # each item's machine is verified inside its group: the next group waits for it
        checked["verify"] = Probes.make(**{k[len("verify_"):]: v
                                           for k, v in probe_options.items()})
    return checked


def _operation(op, options, executor=None, events=None, cancel=None):
    """fn(vault, item) -> result dict, for one item (a failover's last cycle
    through `executor`: a fleet's, or this process), given `events` and
    `cancel`. `options`: as check_operation returns them."""
    watch = {"events": events, "cancel": cancel}
    if op == "failover":
        return lambda v, n: F.failover(v, n, options.get("point") or "latest",
                                       planned=options.get("planned", False),
                                       shutdown_hook=options.get("shutdown_hook"),
                                       executor=executor, **watch)
    if op == "test-failover":
        to = options["directory"]
        machine = {"verify": options.get("verify"),
                   "drill_network": options.get("drill_network")}
        # items that are only disks are drilled as before; machines are brought up (verified)
        return lambda v, n: D.test_failover(v, n, os.path.join(to, n), options.get("point"),
                                            machine=machine if v.machine(n) else None, **watch)
    if op == "cleanup-test-failover":
        return lambda v, n: D.cleanup_test_failover(v, n, **watch)
    if op == "commit":
        return lambda v, n: F.commit(v, n, **watch)
    if op == "reprotect":
        return lambda v, n: F.reprotect(v, n, **watch)
    if op == "failback":
        return lambda v, n: F.failback(v, n, shutdown_hook=options.get("shutdown_hook"),
                                       **watch)
    raise InvalidArgument(f"unknown plan operation {op!r}")  # check_operation refused it first


def run_plan(vault, name, op, *, events=None, cancel=None, **options):
    """Run `op` over the plan; returns the report (a list of per-item and
    per-hook entries). Raises PlanFailed, carrying the report, on a failure.

    ``events``: an EventSink (pydr.dr.events; default: the fleet's, if
    ``fleet=`` is given) given "plan-step" Events (a group started, an item
    of it ended), "hook" Events, each item's own Events (from its threads),
    and "finished" or "failed" for the plan (``item`` None). ``cancel``: a
    threading.Event passed to each item's operation; once set, the running
    items stop as a kill stops them, no later group starts, and Cancelled
    (exit 130) is raised with the report as its ``.report``.

    `op` is one of OPERATIONS; ``options``: a failover's ``point``,
    ``planned``, ``shutdown_hook``; a test-failover's ``directory`` (each
    item's disks go to DIRECTORY/ITEM; ``to`` is the same option),
    ``point``, ``drill_network`` and ``verify`` (True, or any of
    ``verify_console``, ``verify_tcp``, ``verify_script``, ``verify_timeout``:
    each machine of a group is brought up and verified as part of its item,
    so a failed verification fails the item, and the plan stops there with
    PlanFailed before the next group); a failback's ``shutdown_hook``; ``fleet`` for any.
    InvalidArgument, before anything runs, for an unknown operation or option, a missing directory or a bad point selector;
    UnknownName for an unknown plan."""
    options = check_operation(op, options)
    fleet = options.pop("fleet", None)
    if events is None and fleet is not None:
        events = fleet.events
    groups = get_plan(vault, name)
    hook_timeout()  # a bad PYDR_HOOK_TIMEOUT stops it before anything ran
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
        """Run a group's hook; None, or why it failed (PYDR_HOOK_TIMEOUT: pydr.dr.hooks)."""
        what = f"the {which} hook of group {number}"
        try:
            status, _ = run_command(command, what)
            problem = f"{what} failed (exit {status})" if status else None
        except HookTimedOut as exc:  # killed: its exit status is SIGKILL's, as subprocess says
            status, problem = -9, str(exc)
        report.append({"group": number, "hook": which,
                       "status": "failed" if problem else "ok", "exit": status})
        em.emit("hook", message=f"plan {name}: {which} hook of group {number}: "
                + (f"exit {status}" if status != -9 else "timed out, killed (exit -9)"))
        return problem

    for number, group in enumerate(groups, 1):
        if cancel is not None and cancel.is_set():
            stop(f"plan {name!r} cancelled before group {number}", Cancelled)
        if group["pre"]:
            problem = hook(number, "pre", group["pre"])
            if problem:
                for item in group["items"]:
                    report.append({"group": number, "item": item, "status": "not run"})
                stop(f"plan {name!r} stopped: {problem}")
        results = {}
        em.emit("plan-step", message=f"plan {name}: group {number} of {len(groups)} started ("
                f"{', '.join(group['items'])})")

        def work(item):
            try:
                with Store(vault.dir) as v:  # a connection of its own
                    results[item] = ("succeeded", fn(v, item))
            except Exception as exc:  # reported per item below
                results[item] = ("failed", exc)
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
            if status == "succeeded":
                entry["result"] = detail
            else:  # the exception too: a caller reports its exit code and hint
                entry.update(error=str(detail), exception=detail)
            report.append(entry)
            if status == "failed":
                failed.append(item)
        if failed and cancel is not None and cancel.is_set():
            stop(f"plan {name!r} cancelled in group {number}: {', '.join(failed)} stopped",
                 Cancelled)
        if failed:
            stop(f"plan {name!r} stopped in group {number}: {', '.join(failed)} failed")
        if group["post"]:
            problem = hook(number, "post", group["post"])
            if problem:
                stop(f"plan {name!r} stopped: {problem}")
        crashpoints.reached("plan.group")
    em.emit("finished", message=f"plan {name}: {op} done")
    return report

"""Disaster-recovery commands: test-failover, cleanup-test-failover,
failover, change-point, commit, reprotect and failback, and recovery plans
over them. Each runs one workflow call on the vault (a job) and presents
its result."""

import argparse

from .common import (POINT_HELP, EventOutput, add_events, add_item, add_method,
                     add_vault_options, command, human_bytes, method_of, print_json)
from ..errors import InvalidArgument, PlanFailed, VerificationFailed
from .fleet import add_fleet_options, open_fleet
from .vault import open_vault, parse_disk


def _probes(args):
    """The Probes of --verify (and its options), or None without --verify."""
    from ..dr.probes import Probes

    given = {k: getattr(args, f"verify_{k}", None) for k in ("console", "tcp", "script")}
    if not args.verify:
        named = [f"--verify-{k}" for k, v in given.items() if v is not None]
        if named or args.verify_timeout is not None:
            raise InvalidArgument(f"{', '.join(named or ['--verify-timeout'])} needs --verify")
        return None
    return Probes.make(timeout=args.verify_timeout, **given)


def _machine(args, *, drill):
    """The machine options of failover / test-failover (bringup.check_options)."""
    from ..dr.domainxml import parse_network_map

    options = {"connect": args.connect, "verify": _probes(args)}
    if drill:
        options["drill_network"] = args.drill_network
    else:
        options["network_map"] = parse_network_map(args.network_map) or None
        options["name"] = args.domain_name
    return options


def _show_machine(r):
    """The machine and verification lines of a failover or drill result."""
    m = r.machine
    if m:
        if m.get("kind") == "hook":
            print("  machine: bring-up hook ran")
        else:
            print(f"  machine: domain {m['domain']} ({m['uuid']}) "
                  f"{'started' if m['started'] else 'running'} at {m['uri'] or 'libvirt default'}"
                  + (f"; console log {m['console']}" if m.get("console") else ""))
    v = r.verification
    if v:
        parts = ", ".join(f"{k} {s:.1f} s" for k, s in v["parts"].items())
        print(f"  verified: {' '.join(p['probe'] for p in v['probes'])} passed; RTO "
              f"{v['rto']:.1f} s ({parts})")


def _run(args, fn):
    """fn(vault) with the vault's lock held; its result (an OperationResult)
    printed with --json as its to_dict()."""
    with open_vault(args, writer=True) as v:
        try:
            result = fn(v)
        except VerificationFailed as exc:  # the result, with the failed verification
            if args.json and getattr(exc, "result", None) is not None:
                print_json(exc.result.to_dict())
            raise
    if args.json:
        print_json(result.to_dict())
    return result


def _notes(result):
    """Its notes ("already done: ...", "resumed") after the caller's line."""
    for n in result.notes:
        print(f"  note: {n}")


def _made(r):
    return f" ({r.method})" if r.method else ""


def cmd_test_failover(args):
    with EventOutput("test-failover", args) as shown:
        machine = _machine(args, drill=True)
        r = _run(args, lambda v: v.test_failover(args.item, args.to, args.point,
                                                 method=method_of(args), events=shown,
                                                 machine=machine))
    if not args.json:
        print(f"{args.item}: point {r.point} materialised for the drill{_made(r)}:")
        for p in r.paths:
            print(f"  {p}")
        _show_machine(r)
        _notes(r)
    return 0


def cmd_cleanup_test_failover(args):
    with EventOutput("cleanup-test-failover", args) as shown:
        r = _run(args, lambda v: v.cleanup_test_failover(args.item, events=shown))
    if not args.json:
        if r.already_done:
            print(f"{args.item}: {'; '.join(r.notes)}")
        else:
            print(f"{args.item}: test failover cleaned up ({len(r.removed)} files removed)")
            _notes(r)
    return 0


def cmd_failover(args):
    with EventOutput("failover", args) as shown:
        machine = _machine(args, drill=False)
        r = _run(args, lambda v: v.failover(args.item, args.point, planned=args.planned,
                                            shutdown_hook=args.shutdown_hook,
                                            method=method_of(args), events=shown,
                                            directory=args.to, machine=machine))
    if not args.json:
        print(f"{args.item}: failed over to point {r.point}{_made(r)}; its replicas now hold "
              f"that point (run 'pydr commit {args.item}' to make it final)")
        _show_machine(r)
        _notes(r)
    return 0


def cmd_change_point(args):
    with EventOutput("change-point", args) as shown:
        r = _run(args, lambda v: v.change_point(args.item, args.point,
                                                method=method_of(args, None), events=shown))
    if not args.json:
        print(f"{args.item}: replicas now hold point {r.point}{_made(r)}")
        _notes(r)
    return 0


def cmd_commit(args):
    with EventOutput("commit", args) as shown:
        r = _run(args, lambda v: v.commit(args.item, events=shown))
    if not args.json:
        print(f"{args.item}: failover committed; the replica site is active (direction "
              f"{r.direction})")
        _notes(r)
    return 0


def cmd_reprotect(args):
    with EventOutput("reprotect", args) as shown:
        r = _run(args, lambda v: v.reprotect(args.item, events=shown))
    if not args.json:
        cycle = r.cycle
        print(f"{args.item}: reprotected, direction {r.direction}; first point {r.point}: "
              f"{human_bytes(cycle.bytes_written if cycle else 0)} written (only the "
              f"differences), {human_bytes(cycle.bytes_read if cycle else 0)} compared")
        _notes(r)
    return 0


def cmd_failback(args):
    alternates = dict(parse_disk(a) for a in args.alternate or [])
    with EventOutput("failback", args) as shown:
        r = _run(args, lambda v: v.failback(args.item, alternates=alternates,
                                            shutdown_hook=args.shutdown_hook, events=shown))
    if not args.json:
        print(f"{args.item}: failed back to point {r.point} (nothing lost); run "
              f"'pydr commit {args.item}' then 'pydr reprotect {args.item}'")
        _show_machine(r)
        _notes(r)
    return 0


class _PlanGroupAction(argparse.Action):
    """--group ITEMS starts a group; --pre-hook/--post-hook attach to the last one."""

    def __call__(self, parser, namespace, values, option_string=None):
        groups = getattr(namespace, "groups", None) or []
        if option_string == "--group":
            groups.append({"items": [s for s in values.split(",") if s], "pre": None, "post": None})
        elif not groups:
            parser.error(f"{option_string} must follow a --group")
        else:
            groups[-1]["pre" if option_string == "--pre-hook" else "post"] = values
        namespace.groups = groups


def cmd_plan_create(args):
    from ..dr.store_lock import HIDDEN

    # a hook's command line may hold a password: --json says that it is set, not what it is
    with open_vault(args, writer=True) as v:
        definition = {"plan": args.plan, "groups": [
            {**g, "pre": g["pre"] and HIDDEN, "post": g["post"] and HIDDEN}
            for g in v.create_plan(args.plan, args.groups or [])]}
    if args.json:
        print_json(definition)
    else:
        print(f"plan {args.plan}: " + " -> ".join(",".join(g["items"]) for g in definition["groups"]))
    return 0


def _print_plan_report(report):
    """A line per hook that ran and per item of each group of a PlanReport."""
    from ..dr.results import ItemError

    for step in report.steps:
        lines = [(f"{h.hook} hook", "ok" if h.ok else "failed", "") for h in step.hooks
                 if h.hook == "pre"]
        for item in step.items:
            outcome = step.outcomes.get(item)
            if outcome is None:
                lines.append((item, "not run", ""))
            elif isinstance(outcome, ItemError):
                lines.append((item, "failed", outcome.error))
            else:
                lines.append((item, "succeeded", ""))
        lines += [(f"{h.hook} hook", "ok" if h.ok else "failed", "") for h in step.hooks
                  if h.hook == "post"]
        for what, status, detail in lines:
            print(f"  group {step.group}: {what:<20} {status}" + (f"  {detail}" if detail else ""))


def cmd_plan_run(args):
    with open_vault(args, writer=True) as v, open_fleet(args) as fleet, \
            EventOutput(f"plan {args.operation}", args, also=[fleet and fleet.events],
                        bar=False) as shown:
        try:
            verify = None
            if getattr(args, "verify", False):
                probes = _probes(args)
                verify = {"console": probes.console, "tcp": probes.tcp,
                          "script": probes.script, "timeout": probes.timeout}
            report = v.run_plan(args.plan, args.operation, point=getattr(args, "point", None),
                                directory=getattr(args, "to", None), verify=verify,
                                planned=bool(getattr(args, "planned", False)),
                                shutdown_hook=getattr(args, "shutdown_hook", None), fleet=fleet,
                                events=shown)
        except PlanFailed as exc:
            if getattr(exc, "result", None) is not None:
                if args.json:
                    print_json(exc.result.to_dict())
                else:
                    _print_plan_report(exc.result)
            raise
    if args.json:
        print_json(report.to_dict())
    else:
        print(f"plan {args.plan}: {args.operation} done")
        _print_plan_report(report)
    return 0


def _add_plan(p):
    p.add_argument("plan", metavar="PLAN", help="the recovery plan")


def _add_planned(p):
    p.add_argument("--planned", action="store_true",
                   help="shut the source down and replicate it once more: nothing is lost")


def _add_shutdown_hook(p):
    p.add_argument("--shutdown-hook", metavar="CMD",
                   help="run first to stop the machine (must succeed when planned)")


VERIFY_TEXT = (
    "\n\nA machine (an item protected with --libvirt, or given a --bring-up-hook) is\n"
    "then brought up on the recovered disks: its domain defined from the point's XML\n"
    "(disks pointing at the recovered disks, site A's console log and agent socket\n"
    "replaced) and started at the recovery connection (--connect; default the\n"
    "machine's recovery URI, else its URI), or its bring-up hook run with JSON on\n"
    "stdin. Running the command again after a kill finishes the bring-up (the\n"
    "domain is recorded by UUID before it is defined).\n"
    "--verify then probes it within --verify-timeout (default 10m): 'userspace'\n"
    "(--verify-console TEXT seen on its serial console, else a guest-agent ping),\n"
    "'tcp' (--verify-tcp HOST:PORT accepts a connection), 'script' (--verify-script\n"
    "CMD run in the guest by its agent exits 0). The result and the RTO (seconds\n"
    "from the command's start to the last probe passing, with its parts) are\n"
    "recorded on the point ('pydr points ITEM', 'pydr status'); a failed probe\n"
    "exits 23 naming it.")


def _add_verify(p):
    p.add_argument("--verify", action="store_true",
                   help="probe the machine after it is brought up (exit 23 if a probe fails)")
    p.add_argument("--verify-console", metavar="TEXT",
                   help="userspace probe: TEXT appears on the serial console")
    p.add_argument("--verify-tcp", metavar="HOST:PORT", help="probe: a TCP port accepts")
    p.add_argument("--verify-script", metavar="CMD",
                   help="probe: the guest agent runs /bin/sh -c CMD in the guest; exit 0 passes")
    p.add_argument("--verify-timeout", metavar="DUR",
                   help="deadline of all probes (90s, 10m; default 10m)")


def _add_connect(p):
    p.add_argument("--connect", metavar="URI",
                   help="libvirt connection of the recovery site (default: the machine's "
                        "recovery URI, else its URI)")


def _item_command(sub, name, func, *, help, description, examples):
    p = command(sub, name, help=help, description=description, examples=examples, func=func)
    add_item(p)
    add_events(p)
    return p


def register(sub):
    p = _item_command(
        sub, "test-failover", cmd_test_failover,
        help="DR drill: materialise a point into a directory",
        description=("Write ITEM's disks as they were at a recovery point into DIR (named like the\n"
                     "replicas), without touching the replicas or stopping replication. Remove it\n"
                     "with 'pydr cleanup-test-failover ITEM'. A drill never overwrites a file.\n"
                     "Where DIR is on the replicas' file system and it clones files (XFS with\n"
                     "reflink=1, btrfs), each disk is a reflink clone and costs what changed since\n"
                     "the point; elsewhere a copy, with progress. --as qcow2 makes overlays backed\n"
                     "by the replicas instead (any file system; replication of ITEM waits until\n"
                     "the drill is cleaned up). The method used is printed and in --json.")
        + VERIFY_TEXT + (
            "\nA drill machine is the domain pydr-drill-ITEM with a fresh UUID and fresh\n"
            "MACs, on no network (or only --drill-network NET); 'pydr cleanup-test-failover'\n"
            "destroys and undefines it."),
        examples=["pydr test-failover web --to /srv/drill/web",
                  "pydr test-failover web --to /srv/drill/web --point 12 --json",
                  "pydr test-failover vm --to /srv/drill/vm --as qcow2   (then qemu -drive "
                  "file=...,format=qcow2)",
                  "pydr test-failover db --to dr:/srv/drill/db     (replicas on host dr)",
                  "pydr test-failover vm --to /srv/drill/vm --verify --verify-console "
                  "'login:' --verify-timeout 5m",
                  "pydr test-failover vm --to /srv/drill/vm --verify --verify-script "
                  "'systemctl is-active postgresql' --drill-network isolated --json"])
    p.add_argument("--to", required=True, metavar="DIR",
                   help="the directory the drill's disks are written to")
    _add_verify(p)
    _add_connect(p)
    p.add_argument("--drill-network", metavar="NET",
                   help="a machine's drill joins only libvirt network NET (default: none)")
    p.add_argument("--point", default="latest-processed", metavar="P", help=POINT_HELP)
    add_method(p)
    add_vault_options(p)

    p = _item_command(
        sub, "cleanup-test-failover", cmd_cleanup_test_failover,
        help="remove what test-failover wrote",
        description=("Remove the disks a test failover of ITEM wrote, and its directory if that\n"
                     "leaves it empty. Files the drill did not write are left alone. A machine's\n"
                     "drill domain is destroyed and undefined first (pydr's own, by its UUID)."),
        examples=["pydr cleanup-test-failover web"])
    add_vault_options(p)

    p = _item_command(
        sub, "failover", cmd_failover, help="fail over to a recovery point",
        description=("Make ITEM's replica paths hold a recovery point. 'latest' (default) replicates\n"
                     "whatever the source still has first (lowest RPO; if that fails, the newest\n"
                     "point is used); 'latest-processed' takes the newest existing point. --planned\n"
                     "runs --shutdown-hook (which must succeed) and a final cycle: nothing is lost.\n"
                     "Until 'pydr commit', 'pydr change-point' can switch to another point. An\n"
                     "interrupted failover is finished by running it again.\n"
                     "Each replica moves aside as the baseline (.NAME.pydr-base) and the point is\n"
                     "made from it: a reflink clone where the file system can (seconds, whatever\n"
                     "the disk's size), a qcow2 overlay on the baseline with --as qcow2, else a\n"
                     "copy. The method used is printed and in --json.\n\n"
                     "An item replicated to an object store (s3://...) is brought up in --to DIR:\n"
                     "its point is downloaded there (chunks verified, zeros as holes), and those\n"
                     "disks are its replicas from then on (commit, reprotect and failback as\n"
                     "for any item).")
        + VERIFY_TEXT + (
            "\nThe failover domain keeps the protected name and UUID when neither is taken\n"
            "at the recovery connection; else it is ITEM-dr (or --name NAME) with a UUID of\n"
            "its own. --network-map SRC=DST moves its network and bridge interfaces."),
        examples=["pydr failover web --planned --shutdown-hook 'ssh web poweroff'",
                  "pydr failover cloudvm --to /srv/site-b/cloudvm   (points in S3)",
                  "pydr failover web --point latest-processed      (site A is gone)",
                  "pydr failover vm --point 12 --as qcow2 --json",
                  "pydr failover web --copy        (an independent copy even on XFS)",
                  "pydr failover vm --connect qemu+ssh://site-b/system --network-map "
                  "prod=dr-prod --verify --json"])
    p.add_argument("--point", default="latest", metavar="P", help=POINT_HELP)
    _add_verify(p)
    _add_connect(p)
    p.add_argument("--network-map", action="append", metavar="SRC=DST",
                   help="a network or bridge of site A and the one to use here (repeatable)")
    p.add_argument("--name", dest="domain_name", metavar="NAME",
                   help="the failover domain's name when the protected one is taken")
    p.add_argument("--to", metavar="DIR", help="for an item replicated to an object store: "
                   "the local directory where its disks are made")
    _add_planned(p)
    _add_shutdown_hook(p)
    add_method(p)
    add_vault_options(p)

    p = _item_command(
        sub, "change-point", cmd_change_point,
        help="after failover, switch the replicas to another point",
        description=("After a failover and before 'pydr commit': make the replica paths hold\n"
                     "another recovery point. Exact even after the failed-over machine wrote\n"
                     "to its disks (the point is rebuilt from the untouched baseline), by the\n"
                     "method the failover used unless one is given."),
        examples=["pydr change-point web --point 11",
                  "pydr change-point vm --point 9 --as qcow2 --json"])
    p.add_argument("--point", required=True, metavar="P", help=POINT_HELP)
    add_method(p, change_point=True)
    add_vault_options(p)

    p = _item_command(
        sub, "commit", cmd_commit, help="make a failover final (discards the recovery points)",
        description=("Make ITEM's failover final: the replica site is active (direction reverse);\n"
                     "the recovery points, their undo steps and the baselines are removed. Then\n"
                     "'pydr reprotect ITEM' replicates the other way. A disk that is a qcow2\n"
                     "overlay (failover --as qcow2) is flattened: its blocks are written into the\n"
                     "baseline (qemu-img commit), which becomes the raw disk at the replica path;\n"
                     "stop a VM that runs on it first."),
        examples=["pydr commit web && pydr reprotect web"])
    add_vault_options(p)

    p = _item_command(
        sub, "reprotect", cmd_reprotect, help="after commit, replicate in the other direction",
        description=("Swap each disk's source and replica and replicate the other way. The old\n"
                     "source disks are reused as replicas: the first cycle compares both sides and\n"
                     "moves only the blocks that differ, never a full copy."),
        examples=["pydr reprotect web", "pydr reprotect web --json"])
    add_vault_options(p)

    p = _item_command(
        sub, "failback", cmd_failback, help="planned failover back to the original site",
        description=("A planned failover in the reverse direction: --shutdown-hook (must succeed),\n"
                     "a final cycle, nothing lost. --alternate OLD=NEW brings a disk up at NEW\n"
                     "instead of its replica path OLD (left as it is). Then 'pydr commit' and\n"
                     "'pydr reprotect' give back the original direction."),
        examples=["pydr failback web --shutdown-hook 'ssh web-b poweroff'",
                  "pydr failback web --alternate /img/web-os.img=/img2/web-os.img"])
    p.add_argument("--alternate", action="append", metavar="OLD=NEW")
    _add_shutdown_hook(p)
    add_vault_options(p)

    p = command(
        sub, "plan", help="recovery plans: ordered groups of items",
        description=("Create a recovery plan, then run failover, test-failover, cleanup-test-failover,\n"
                     "commit, reprotect or failback over it: groups in order, the items of a group\n"
                     "in parallel, each group's --pre-hook before it and --post-hook after it. The\n"
                     "first failure stops the plan with a report of what ran and what did not."),
        examples=["pydr plan create shop --group db --post-hook ./wait-db.sh --group web1,web2",
                  "pydr plan test-failover shop --to /srv/drill",
                  "pydr plan failover shop --planned"],
        func=None)
    psub = p.add_subparsers(dest="plan_command", metavar="ACTION")
    psub.required = True
    q = command(psub, "create", help="define a plan",
                description="Define PLAN: --group ITEM[,ITEM...] in order, each with its hooks.",
                examples=["pydr plan create shop --group db --post-hook ./wait-db.sh "
                          "--group web1,web2"],
                func=cmd_plan_create)
    _add_plan(q)
    for flag, text in (("--group", "ITEM[,ITEM...]: the next group, in order"),
                       ("--pre-hook", "CMD run before the last --group"),
                       ("--post-hook", "CMD run after the last --group")):
        q.add_argument(flag, action=_PlanGroupAction, metavar="X", help=text)
    add_vault_options(q)
    for op in ("failover", "test-failover", "cleanup-test-failover", "commit", "reprotect",
               "failback"):
        q = command(psub, op, help=f"run {op} over a plan",
                    description=(f"Run '{op}' for every item of PLAN, group by group: groups in\n"
                                 "order, the items of a group in parallel, each group's pre and\n"
                                 "post hooks around it; the first failure stops the plan, and the\n"
                                 "report says what ran. With --scheduler, an item's replication\n"
                                 "(a planned failover's last cycle) runs on a Dask worker of its\n"
                                 "host; site B's work runs here."),
                    examples=[f"pydr plan {op} shop" + (" --to /srv/drill" if op == "test-failover"
                                                        else ""),
                              f"pydr plan {op} shop --scheduler tcp://dr-manager:8786 --events"
                              + (" --planned" if op == "failover" else "")
                              + (" --to /srv/drill" if op == "test-failover" else "")],
                    func=cmd_plan_run)
        q.set_defaults(operation=op)
        _add_plan(q)
        if op in ("failover", "test-failover"):
            q.add_argument("--point", default=None, metavar="P", help=POINT_HELP)
        if op == "failover":
            _add_planned(q)
        if op in ("failover", "failback"):
            _add_shutdown_hook(q)
        if op == "test-failover":
            q.add_argument("--to", required=True, metavar="DIR",
                           help="each item's disks go to DIR/ITEM/")
            _add_verify(q)  # each group's machines verified before the next group
        add_fleet_options(q)
        add_vault_options(q)
        add_events(q)

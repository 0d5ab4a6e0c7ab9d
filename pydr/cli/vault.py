"""The vault's commands: vault init and check, protect, replicate, points, status, jobs
and materialize. Each opens the vault (pydr.dr.vault.Vault), makes one API
call and presents the result."""

import contextlib
import os
import sys

from .common import (EventOutput, add_events, add_item, add_json, add_method, add_progress,
                     add_remote_options, add_vault_options, command, given_passphrase, human_bytes,
                     lock_wait_seconds, method_of, parse_duration, parse_size, positive_int,
                     print_json, timestamp, vault_dir)
from ..errors import EXIT_VAULT, FleetError
from .fleet import add_fleet_options, open_fleet
from .policy_options import add_policy_options


#: seconds a writer waits for the lock by default when pydr run holds it (one cycle)
SERVICE_LOCK_WAIT = 600.0


def open_vault(args, writer=False):
    """The vault of --vault/$PYDR_VAULT. A writer waits for the lock up to
    --lock-wait (or $PYDR_LOCK_WAIT) seconds; by default not at all, unless
    a pydr run serves the vault: then up to SERVICE_LOCK_WAIT, going before
    the service's next round (pydr.dr.store_lock). The passphrase of its
    encrypted stores: --passphrase-file, the environment, else typed at the
    terminal when one is needed."""
    from ..dr import store_lock
    from ..dr.vault import Vault

    from ..dr.passphrases import ask_passphrase

    directory = vault_dir(args)
    passphrase = given_passphrase(args)
    if not writer:
        vault = Vault(directory, passphrase=passphrase)
    else:
        wait = getattr(args, "lock_wait", None)
        if wait is None and os.environ.get("PYDR_LOCK_WAIT"):
            wait = lock_wait_seconds(os.environ["PYDR_LOCK_WAIT"], "PYDR_LOCK_WAIT")
        if wait is None and store_lock.service_running(directory):
            wait = SERVICE_LOCK_WAIT
        vault = Vault(directory, writer=True, lock_timeout=wait or None, passphrase=passphrase)
    # an encrypted store and no passphrase given: asked at the terminal, if there is one
    vault.store.ask_passphrase = ask_passphrase
    return vault


def parse_disk(text):
    """SOURCE=REPLICA, where either may be a URI with a query of its own
    (qmp:SOCKET:NODE?nbd=PATH, nbd+unix:///EXPORT?socket=PATH): the '=' that
    separates them is the first one that does not follow a query key."""
    import re

    at = next((m.start() for m in re.finditer("=", text)
               if not re.search(r"[?&][A-Za-z_-]+$", text[:m.start()])), None)
    if at is None:
        raise ValueError(f"--disk wants SOURCE=REPLICA, not {text!r}")
    source, replica = text[:at], text[at + 1:]
    if not source or not replica:
        raise ValueError(f"--disk wants SOURCE=REPLICA, not {text!r}")
    return source, replica


def cmd_vault_init(args):
    from ..dr.store import init_vault

    init_vault(args.dir)
    if args.json:
        print_json({"vault": args.dir})
    else:
        print(f"vault created in {args.dir}")
    return 0


def cmd_vault_check(args):
    from ..dr.check import check_vault

    directory = args.dir or vault_dir(args)
    report = check_vault(directory)
    if args.json:
        print_json(report.to_dict())
    else:
        for p in report.problems:
            print(f"{p.where}: {p.message}")
        remote = (f", {report.remote_steps} kept on other hosts not checked here"
                  if report.remote_steps else "")
        skipped = ("; another pydr is changing the vault: files not yet recorded were not "
                   "looked for" if report.files_skipped else "")
        n = len(report.problems)
        verdict = "ok" if report.ok else f"{n} problem{'s' if n > 1 else ''}"
        print(f"vault {directory}: {verdict} ({report.steps_checked} steps checked{remote})"
              f"{skipped}", file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else EXIT_VAULT


def cmd_protect(args):
    from .policy_options import policy_fields

    policy = policy_fields(args)  # checked by protect before the item is recorded
    if args.libvirt is not None:
        return _protect_machine(args, policy)
    if not args.disk:
        raise ValueError("give each disk as --disk SOURCE=REPLICA, or a libvirt domain with "
                         "--libvirt DOMAIN --to DIR")
    if args.connect or args.to:
        raise ValueError("--connect and --to go with --libvirt DOMAIN")
    disks = [parse_disk(d) for d in args.disk]
    with open_vault(args, writer=True) as v:
        status = v.protect(args.item, disks, group=args.group, retention=args.retention,
                           retention_age=args.retention_age, quiesce_hook=args.quiesce_hook,
                           thaw_hook=args.thaw_hook, rsh=args.rsh, remote_pydr=args.remote_pydr,
                           cbt=args.cbt, host=args.host, cbt_granularity=args.cbt_granularity,
                           policy=policy or None, encrypt=args.encrypt)
        if args.bring_up_hook:
            v.attach_machine(args.item, bring_up_hook=args.bring_up_hook)
    if args.json:
        print_json(status.to_dict())
    else:
        print(f"{args.item}: protected ({len(disks)} disks), state {status.state}; "
              f"run 'pydr replicate {args.item}' for the initial replication")
    return 0


def _protect_machine(args, policy):
    """pydr protect ITEM --libvirt DOMAIN [--connect URI] --to DIR."""
    if args.disk or args.cbt or args.cbt_granularity is not None or args.host:
        raise ValueError("--libvirt protects every disk of the domain, always tracked by its "
                         "checkpoints: leave out --disk, --cbt, --cbt-granularity and --host")
    if not args.to:
        raise ValueError("--libvirt needs --to DIR (or host:DIR): where the disks' replicas go")
    with open_vault(args, writer=True) as v:
        done = v.protect_machine(args.item, args.libvirt, args.to, uri=args.connect,
                                 group=args.group, retention=args.retention,
                                 retention_age=args.retention_age,
                                 quiesce_hook=args.quiesce_hook, thaw_hook=args.thaw_hook,
                                 rsh=args.rsh, remote_pydr=args.remote_pydr,
                                 policy=policy or None, encrypt=args.encrypt)
    if args.json:
        print_json(done.to_dict())
    else:
        print(f"{args.item}: domain {done.domain} ({done.uuid}) protected, "
              f"{len(done.disks)} disks ({', '.join(t for t, _, _ in done.disks)}), tracked by "
              f"libvirt checkpoints{'; guest agent: frozen points' if done.agent else ''}")
        for note in done.notes:
            print(f"  note: {note}")
        print(f"run 'pydr replicate {args.item}' for the initial replication")
    return 0


def _batches(v, args):
    """The items to replicate, in one call: the driver runs each group's
    members together and every other item on its own."""
    if args.all:
        names = v.items()
        if not names:
            raise ValueError("the vault protects no items")
        return names
    if args.group:
        return v.items(group=args.group)
    if args.item:
        if args.item not in v.items() and v.items(group=args.item):
            return v.items(group=args.item)  # a group's name (never also an item's)
        row = v.item(args.item)
        return v.items(group=row.grp) if row.grp else [args.item]
    raise ValueError("give ITEM, --group G or --all")


def _interrupt_on_sigterm():
    """SIGTERM raises KeyboardInterrupt, as ^C does: the cycle's finally
    blocks run (a libvirt backup job is ended, its checkpoint dropped) rather
    than the process vanishing with them undone (`pydr run` has its own)."""
    import signal

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    with contextlib.suppress(ValueError):  # not the main thread: left alone
        signal.signal(signal.SIGTERM, on_term)


def cmd_replicate(args):
    from ..errors import CycleFailed, exit_code_for
    from .fleet import open_fleet

    _interrupt_on_sigterm()
    with open_vault(args, writer=True) as v, open_fleet(args) as fleet:
        names = _batches(v, args)
        try:
            with EventOutput("replicate", args, also=[fleet and fleet.events],
                             bar=fleet is None) as shown:
                result = v.replicate(names, app_consistent=args.app_consistent,
                                     resync=args.resync, retry=args.retry,
                                     max_attempts=args.max_attempts,
                                     executor=fleet.executor() if fleet is not None else None,
                                     bwlimit=args.bwlimit or None, events=shown)
        except CycleFailed as exc:  # the items that made it are recorded: each outcome said
            _print_cycles(args, exc.result)
            if exc.__cause__ is not None and exit_code_for(exc.__cause__) == 1:
                raise exc.__cause__  # an item hit a bug: reported as one (exit 1), not hidden
            raise
        except Exception as exc:  # one unit (an item, a group): its own error, and --json
            if args.json and getattr(exc, "cycle_result", None) is not None:
                _print_cycles(args, exc.cycle_result)
            raise
    _print_cycles(args, result)
    return 0


def _print_cycles(args, result):
    """--json: the CycleResult, with every item's outcome; else a line for
    the point and one for each item that failed, naming its error."""
    if args.json:
        print_json(result.to_dict())
        return
    if result.items:
        # retried items may have points of their own: each point names its items
        by_point = {}
        for o in result.outcomes:
            if o.status == "succeeded":
                by_point.setdefault(o.point_id, []).append(o.item)
        if len(by_point) > 1:
            points = "points " + "; ".join(f"{p} for {', '.join(items)}"
                                           for p, items in by_point.items())
            print(f"{points} ({result.consistency}): "
                  f"{human_bytes(result.bytes_written)} written, "
                  f"{human_bytes(result.bytes_read)} read in {result.seconds:.3f} s")
        else:
            print(f"point {result.point_id} ({result.consistency}) for "
                  f"{', '.join(result.items)}: {human_bytes(result.bytes_written)} written, "
                  f"{human_bytes(result.bytes_read)} read in {result.seconds:.3f} s")
    for o in result.failed:
        print(f"{o.item}: failed: {o.error}")


def _verified_text(v):
    """A point's (or an item's) last verification, as points and status show it."""
    if not v:
        return ""
    if v["passed"]:
        return f"  verified ({v['kind']}): RTO {v['rto']:.1f} s"
    return f"  verification FAILED ({v['kind']}): probe {v['failed_probe'] or '?'}"


def cmd_points(args):
    with open_vault(args) as v:
        points = v.points(args.item)
    if args.json:
        print_json([p.to_dict() for p in points])
    else:  # the time of each point's data: its cut (a point made before schema 9: its record)
        for p in points:
            print(f"{p.id:>6}  {timestamp((p.cut_at or p.created_at).timestamp())}  "
                  f"{p.consistency:<16}  cut: {p.cut or 'none':<8} {human_bytes(p.bytes or 0)}"
                  + ("  frozen" if p.frozen else "")
                  + _verified_text(p.verification)
                  + (f"  DAMAGED: {p.damaged}" if p.damaged else ""))
    return 0


def cmd_status(args):
    """Every item's status; an item that cannot be shown (its stored policy
    damaged) is named on its line, and the command fails with its error
    after showing all the others."""
    from ..errors import VaultError

    problems = {}
    with open_vault(args) as v:
        names = [args.item] if args.item else v.items()
        statuses = []
        for n in names:
            try:
                statuses.append(v.status(n))
            except VaultError as exc:
                if args.item:
                    raise
                problems[n] = exc
    if args.json:
        print_json(statuses[0].to_dict() if args.item else [s.to_dict() for s in statuses])
    else:
        shown = iter(statuses)
        for n in names:  # in the items' order, a problem on its item's line
            if n in problems:
                print(f"{n}: cannot be shown: {problems[n].message}")
                continue
            st = next(shown)
            op = st.operation
            doing = ""
            if op and op.interrupted:
                doing = f"; interrupted {op.name}: run '{op.command}' to finish it"
            elif op:
                doing = f"; {op.name} running now"
            host = f" on {st.host}" if st.host else ""
            rpo = st.rpo_seconds
            print(f"{st.item}{host}: {st.state}, {st.direction}, health {st.health}, "
                  f"{st.point_count} points"
                  + (f" ({len(st.damaged_points)} damaged: "
                     f"{', '.join(map(str, st.damaged_points))})" if st.damaged_points else "")
                  + _rpo_text(st)
                  + (f",{_verified_text(st.verification)[1:]} of point "
                     f"{st.verification['point']}" if st.verification else "")
                  + (f", last error: {st.last_error}" if st.last_error else "")
                  + _retry_text(st) + doing)
    if problems:
        raise next(iter(problems.values()))
    return 0


def _retry_text(st):
    """", retry at 06:02:00 (attempt 3)" while a failed item waits for its next
    try (pydr run, --retry: the attempt is the one that retry makes)."""
    if st.next_retry is None:
        return ""
    return (f", retry at {st.next_retry.astimezone().strftime('%H:%M:%S')} "
            f"(attempt {st.failed_attempts + 1})")


def _rpo_text(st):
    """", RPO 3 s (target 10 s, ok)" with a target RPO; else the newest data's age."""
    rpo = st.rpo_seconds
    if st.target_rpo is None:
        return f", newest data {_age(rpo)} old" if rpo is not None else ""
    achieved = "no point yet" if rpo is None else f"RPO {_age(rpo)}"
    return f", {achieved} (target {_age(st.target_rpo)}, {st.rpo_health})"


def _age(seconds):
    """A duration as a person reads an RPO: 42 s, 5 min 3 s, 2 h 10 min, 3 d 4 h."""
    seconds = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60),
                                      ("min", 60, "s", 1)):
        if seconds >= size:
            return f"{seconds // size} {unit} {seconds % size // sub_size} {sub}"
    return f"{seconds} s"


def cmd_jobs(args):
    with open_vault(args) as v:
        jobs = v.jobs(item=args.item, state=args.state, limit=args.limit)
    if args.json:
        print_json([j.to_dict() for j in jobs])
    else:
        for j in reversed(jobs):  # oldest first, the newest last, above the prompt
            print(f"{j.id:>5}  {j.kind:<10} {j.item or '':<16} {j.state:<10} "
                  f"{(j.progress or 0) * 100:5.1f}%  {human_bytes(j.bytes_transferred or 0)}"
                  + (f"  on {j.host}" if j.host else "")
                  + (f"  {j.error}" if j.error else ""))
    return 0


def cmd_materialize(args):
    with open_vault(args, writer=True) as v, EventOutput("materialize", args) as shown:
        r = v.materialize(args.item, args.point, args.to, method=method_of(args), events=shown)
    if args.json:
        print_json(r.to_dict())
    else:
        for p in r.paths:
            print(p)
        print(f"  ({r.method})", file=sys.stderr)
    return 0


def register(sub):
    p = command(sub, "vault", help="create a vault",
                description=("Create a vault: the directory that holds pydr's replication state\n"
                             "(SQLite, WAL), undo steps and signature caches (docs/VAULT.md)."),
                examples=["pydr vault init /srv/pydr-vault", "export PYDR_VAULT=/srv/pydr-vault"],
                func=None)
    vsub = p.add_subparsers(dest="vault_command", metavar="init|check")
    vsub.required = True
    q = command(vsub, "init", help="create an empty vault in DIR",
                description="Create an empty vault in DIR (created if missing).",
                examples=["pydr vault init /srv/pydr-vault"], func=cmd_vault_init)
    q.add_argument("dir", metavar="DIR")
    add_json(q)
    q = command(vsub, "check", help="check the vault's database and files (changes nothing)",
                description=("Check the vault in DIR (default: --vault, $PYDR_VAULT): SQLite's\n"
                             "integrity_check, then pydr's cross-checks: every step has its file\n"
                             "with the recorded size, every point's steps are recorded, no step\n"
                             "file is unknown to the vault, the items' disks are consistent.\n"
                             "Each problem is printed with its path; exit 0 when there is none,\n"
                             "14 when there is. Steps kept beside replicas on other hosts are\n"
                             "counted, not read."),
                examples=["pydr vault check /srv/pydr-vault", "pydr vault check --json"],
                func=cmd_vault_check)
    q.add_argument("dir", metavar="DIR", nargs="?")
    add_vault_options(q)

    p = command(
        sub, "protect", help="protect a machine's disks (a protected item)",
        description=("Register ITEM: each --disk SOURCE=REPLICA is replicated from SOURCE (an image\n"
                     "or block device) to REPLICA. Items sharing --group are replicated together\n"
                     "and get recovery points with the same id. The first 'pydr replicate' is the\n"
                     "initial replication (a sparse-aware full copy); later ones move only changes.\n\n"
                     "A REPLICA may be [user@]host:/PATH on another machine, reached with --rsh\n"
                     "(kept with the item): its recovery-point steps are kept beside it there, its\n"
                     "points are materialised there ('--to host:DIR'), and failover brings the\n"
                     "machine up there.\n\n"
                     "A SOURCE may be a QEMU image (qcow2, vmdk, vhdx, vpc, vdi), read through a\n"
                     "qemu-nbd pydr starts, an NBD export (nbd://HOST/EXPORT,\n"
                     "nbd+unix:///EXPORT?socket=PATH) or a live disk, qmp:SOCKET:NODE (a block\n"
                     "node of a running QEMU, read through a point-in-time export). With --cbt\n"
                     "each cycle reads only what a QEMU dirty bitmap says changed (qcow2 images\n"
                     "and live disks): docs/QEMU.md.\n\n"
                     "--libvirt DOMAIN protects a libvirt domain instead of --disk: every disk\n"
                     "of it, replicated to --to DIR as ITEM-TARGET.img, each cycle one pull-mode\n"
                     "backup job and a checkpoint (the guest frozen by its agent when it has\n"
                     "one), the domain's XML kept with every point: docs/MACHINES.md.\n\n"
                     "A REPLICA s3://BUCKET/PREFIX is a store of chunks and point indexes. An\n"
                     "empty prefix becomes a new store, encrypted unless --no-encrypt: every chunk\n"
                     "and index sealed with AES-256-GCM, chunks named by a keyed MAC, the store's\n"
                     "key kept in the bucket sealed under the passphrase (--passphrase-file,\n"
                     "PYDR_PASSPHRASE_FILE or PYDR_PASSPHRASE; never on the command line, never in\n"
                     "the vault; 'pydr key' manages the keys). A store already there is opened as it\n"
                     "is: a wrong passphrase is refused (exit 4) before anything is recorded.\n\n"
                     "--rpo, --rpo-critical, --priority and --keep-* set the item's protection\n"
                     "policy ('pydr policy' shows and changes it; 'pydr run' keeps it), checked\n"
                     "before the item is recorded."),
        examples=["pydr protect web --disk /img/web-os.img=/dr/web-os.img "
                  "--disk /img/web-data.img=/dr/web-data.img --retention 48",
                  "pydr protect db --disk /dev/vg0/db=backup@dr:/srv/replicas/db.img "
                  "--rsh 'ssh -p 2222'",
                  "pydr protect app --disk app.img=/dr/app.img --group shop "
                  "--quiesce-hook 'fsfreeze -f /mnt' --thaw-hook 'fsfreeze -u /mnt'",
                  "pydr protect vm --disk /vm/os.qcow2=/dr/os.img --cbt",
                  "pydr protect web --disk /img/web.img=s3://dr-locked/site-b --lock 30",
                  "pydr protect vm --disk qmp:/run/vm.qmp:drive0=/dr/drive0.img --cbt",
                  "pydr protect big --disk /vm/big.qcow2=/dr/big.img --cbt --cbt-granularity 64K",
                  "PYDR_PASSPHRASE_FILE=/root/dr.pass pydr protect web --disk "
                  "/dev/vg0/web=s3://dr-bucket/site-a",
                  "pydr protect web01 --host hv01 --disk /vm/web01.img=dr:/srv/dr/web01.img",
                  "pydr protect web --libvirt web --connect qemu:///system --to /dr/web",
                  "pydr protect vm --disk /vm/os.qcow2=/dr/os.img --cbt --rpo 30s "
                  "--keep-within 1h --keep-hourly 24 --keep-daily 30"],
        func=cmd_protect)
    add_item(p, "a name for the machine")
    p.add_argument("--disk", action="append", default=[], metavar="SOURCE=REPLICA")
    p.add_argument("--libvirt", metavar="DOMAIN",
                   help="protect libvirt domain DOMAIN: every disk of it (replicas "
                        "DIR/ITEM-TARGET.img under --to), tracked by libvirt's checkpoints, its "
                        "XML kept with every point (docs/MACHINES.md)")
    p.add_argument("--connect", metavar="URI",
                   help="with --libvirt: the libvirt connection (default: libvirt's own)")
    p.add_argument("--to", metavar="DIR",
                   help="with --libvirt: where the disks' replicas go (DIR or host:DIR)")
    p.add_argument("--group", metavar="G", help="replicate with the other items of group G")
    p.add_argument("--retention", type=positive_int, default=24, metavar="N",
                   help="recovery points kept (default: 24)")
    p.add_argument("--retention-age", type=parse_duration, default=None, metavar="AGE",
                   help="also drop points older than AGE (e.g. 72h, 7d; the newest is always kept)")
    p.add_argument("--quiesce-hook", metavar="CMD", help="run before the cut (app-consistent points)")
    p.add_argument("--thaw-hook", metavar="CMD", help="run after the cut")
    p.add_argument("--bring-up-hook", metavar="CMD",
                   help="a machine that is not a libvirt domain: run after a failover or drill "
                        "made its disks, with JSON on stdin ({item, point, role, disks: [{idx, "
                        "path, format}]}); exit 0 = up, else exit 22")
    p.add_argument("--host", metavar="NAME",
                   help="the sources are paths on host NAME, read there by its Dask workers "
                        "('pydr worker --host NAME'; replicate with --scheduler): docs/SCALE.md")
    p.add_argument("--cbt", action="store_true",
                   help="changed-block tracking: each cycle compares only what a QEMU dirty "
                        "bitmap says changed (qcow2 images, qmp:SOCKET:NODE live disks)")
    p.add_argument("--cbt-granularity", type=parse_size, default=None, metavar="SIZE",
                   help="with --cbt: bytes per bit of the dirty bitmaps, a power of two from "
                        "512 to 64M (default: 4K, the block a cycle compares). Each bitmap "
                        "costs one bit per granule in QEMU's memory and in a qcow2 image "
                        "(1 TiB at 4K: 32 MiB; at 64K: 2 MiB). A larger granule makes a cycle "
                        "read more than was written: reads are rounded up to whole granules, "
                        "and once the dirty granules cover over half the disk the cycle "
                        "compares all of it. Not larger than the disk (docs/QEMU.md)")
    p.add_argument("--no-encrypt", dest="encrypt", action="store_false",
                   help="an s3:// replica in an empty prefix becomes an unencrypted store "
                        "(plain chunks named by their XXH3; anyone who reads the bucket reads "
                        "the disks). Default: encrypted")
    add_policy_options(p, protect=True)  # the item's policy ('pydr policy' sets the rest)
    add_remote_options(p)
    add_vault_options(p)

    p = command(
        sub, "replicate", help="run a replication cycle: ends in a recovery point",
        description=("Replicate ITEM (with the rest of its group), a --group, or --all items, and\n"
                     "record a recovery point. Each disk moves only the blocks that changed since the\n"
                     "last cycle (compared with the replica's signature cache), through the crash-safe\n"
                     "undo journal of 'pydr apply'; that journal is kept as the point's reverse delta.\n"
                     "A killed cycle is finished by running it again.\n\n"
                     "A group is replicated all-or-nothing; every other item on its own: one that\n"
                     "fails (a lost disk, a dead site) does not stop the others, which get their\n"
                     "points. The command then exits 21 and names each failed item and its error;\n"
                     "--json gives every item's outcome (status, point, error, exit code, bytes).\n\n"
                     "With --scheduler ADDR, each item's cycle runs on a Dask worker of its --host\n"
                     "('pydr worker'), all hosts at once, and this process records the results;\n"
                     "an item whose host has no worker fails after --host-timeout, the others go\n"
                     "on (docs/SCALE.md)."),
        examples=["pydr replicate web", "pydr replicate --group shop --app-consistent",
                  "pydr replicate --all --retry --max-attempts 6 --json",
                  "pydr replicate --all --scheduler tcp://dr-manager:8786 --events"],
        func=cmd_replicate)
    add_item(p, "the item to replicate, with the rest of its group", optional=True)
    p.add_argument("--group", metavar="G")
    p.add_argument("--all", action="store_true")
    p.add_argument("--app-consistent", action="store_true",
                   help="run the items' quiesce hooks before and thaw hooks after reading")
    p.add_argument("--resync", action="store_true",
                   help="compare both sides by checksum (re-read the replicas); needed for items "
                        "in state resync-required")
    p.add_argument("--retry", action="store_true",
                   help="retry the items whose errors are recoverable (I/O, space, connection, "
                        "timeout) at 1, 2, 4, 8 and 10 minutes after the first attempt, then "
                        "every 30 minutes")
    p.add_argument("--max-attempts", type=positive_int, default=None, metavar="N",
                   help="with --retry, give up after N attempts")
    p.add_argument("--bwlimit", type=parse_size, default=None, metavar="RATE",
                   help="bytes a second for uploads to an object store (e.g. 50M)")
    add_fleet_options(p)
    add_vault_options(p)
    add_progress(p)
    add_events(p)

    p = command(sub, "points", help="list an item's recovery points",
                description=("List ITEM's recovery points, oldest first. A damaged point (a step\n"
                             "it needs failed its checks) is flagged DAMAGED: never restored."),
                examples=["pydr points web", "pydr points web --json | jq '.[-1].id'"],
                func=cmd_points)
    add_item(p)
    add_vault_options(p)

    p = command(sub, "status", help="state, direction and health of items",
                description=("Show ITEM's (or every item's) state, direction and health (its\n"
                             "last cycle's), and its RPO: the age of its newest point's data;\n"
                             "with a target RPO ('pydr policy') the RPO health too: ok, warning\n"
                             "(over the target), critical (over the critical RPO), unknown (no\n"
                             "point yet within one target of protecting it) or paused (failed\n"
                             "over, committing or in a drill)."),
                examples=["pydr status", "pydr status web --json"], func=cmd_status)
    add_item(p, "one item (default: all)", optional=True)
    add_vault_options(p)

    p = command(sub, "jobs", help="list jobs (also while they run)",
                description=("List the jobs: kind, item, state, progress and bytes moved (the\n"
                             "newest last; --json: the newest first)."),
                examples=["pydr jobs", "pydr jobs --item web --state failed --json",
                          "pydr jobs --limit 10"], func=cmd_jobs)
    p.add_argument("--item", metavar="ITEM", help="only this item's jobs")
    p.add_argument("--state", metavar="STATE",
                   choices=("queued", "running", "succeeded", "failed", "cancelled"),
                   help="only jobs in this state")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="only the newest N jobs")
    add_vault_options(p)

    p = command(
        sub, "materialize", help="write a recovery point's disks into a directory",
        description=("Write each disk of ITEM as it was at recovery point P into DIR, named like\n"
                     "its replica. The replicas are not touched. A reflink clone of the replica\n"
                     "where DIR's file system can clone it, a qcow2 overlay on the replica with\n"
                     "--as qcow2 (the replica must then stay as it is while the overlay is used),\n"
                     "else a copy; the method is printed (on stderr) and in --json."),
        examples=["pydr materialize web --point 7 --to /tmp/web-at-7",
                  "pydr materialize web --point 7 --to /tmp/web-at-7 --copy --json",
                  "pydr materialize db --point 3 --to dr:/srv/restore"],
        func=cmd_materialize)
    add_item(p)
    p.add_argument("--point", type=int, required=True, metavar="P")
    p.add_argument("--to", required=True, metavar="DIR",
                   help="a directory; host:DIR on the host that holds the item's replicas")
    add_method(p)
    add_vault_options(p)
    add_events(p)

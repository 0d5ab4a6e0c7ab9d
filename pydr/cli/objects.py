"""verify (an item's undo steps, or the indexes and chunks of its points in
an object store) and gc (mark and sweep of unreferenced chunks). docs/FORMAT.md describes
the layout, and its garbage collection."""

from .common import (add_item, add_vault_options, command, human_bytes,
                     parse_duration, print_json)
from ..errors import FormatError
from .vault import open_vault


def _percent(text):
    value = float(text)
    if not 0 < value <= 100:
        raise ValueError(f"--sample wants a percentage in (0, 100], not {text}")
    return value


def _grace(text):
    """A duration, or 0: sweep every unreferenced chunk (only when no cycle runs)."""
    return 0.0 if text.strip() in ("0", "0s") else parse_duration(text)


def cmd_verify(args):
    with open_vault(args) as v:
        report = v.verify(args.item, int(args.point) if args.point else None, args.sample)
    steps = "steps" in report  # a step chain, else an object store
    if args.json:
        print_json(report)
    elif steps:
        remote = f", {report['size_only']} of them at a remote place by size" \
            if report["size_only"] else ""
        print(f"{args.item}: {report['points']} points, {report['steps']} steps, "
              f"{report['checked']} checked ({human_bytes(report['bytes'])}{remote}), "
              f"{report['caches']} signature caches")
    else:
        awaiting = report.get("locked_indexes")
        print(f"{args.item}: {report['points']} points, {report['chunks']} chunks, "
              f"{report['checked']} checked" + (f" ({awaiting} indexes of released points "
              f"under Object Lock, awaiting deletion)" if awaiting else ""))
    if not args.json:
        for p in report.get("scrub_skipped", ()):
            print(f"  {p}")
        for p in report["problems"]:
            print(f"  problem: {p}")
        for t in report.get("tampered", ()):
            points = ", ".join(str(p) for p in t["points"])
            print(f"  tampered: {t['kind']} {t['object']} (points {points}): {t['text']}")
    if report.get("tampered") and not report["problems"]:
        t = report["tampered"][0]
        raise FormatError(f"{len(report['tampered'])} objects of the points of {args.item!r} "
                          f"were tampered with (their recorded versions are what a restore "
                          f"reads): {t['kind']} {t['object']}: {t['text']}")
    if report["problems"]:
        where = "the steps" if steps else "the object store"
        raise FormatError(f"{len(report['problems'])} problems in {where} of "
                          f"{args.item!r}: {report['problems'][0]}")
    return 0


def cmd_gc(args):
    with open_vault(args) as v:
        report = v.collect_garbage(args.item, grace=args.grace, dry_run=args.dry_run)
    if args.json:
        print_json(report)
    else:
        verb = "would sweep" if args.dry_run else "swept"
        print(f"{report['store']}: {report['indexes']} indexes name {report['referenced']} of "
              f"{report['chunks']} chunks; {verb} {report['swept']} "
              f"({human_bytes(report['bytes'])}), kept {report['young']} younger than the "
              f"grace period" + (f" and {report['locked']} under Object Lock"
                                 if report.get("locked") else ""))
        if report.get("foreign"):
            print(f"  skipped {report['foreign']} index versions that are not pydr indexes")
    return 0


def register(sub):
    p = command(
        sub, "verify", help="check an item's recovery points: steps, or indexes and chunks",
        description=("An item whose points are undo steps: read every step of every disk (or\n"
                     "those --point P needs, or a random --sample percent of them) and check\n"
                     "its header, each record's checksum and payload hash, its COMMIT and its\n"
                     "size against the vault's record (steps at a remote place: the size), and\n"
                     "each signature cache's checksum. A damaged step marks the points that\n"
                     "need it as damaged: they are never restored ('pydr points' shows them).\n"
                     "An item in an object store: download its point indexes (all, or --point\n"
                     "P's) and check their checksums, then download every chunk they name (or\n"
                     "a random --sample percent of them) and check that it hashes to its id.\n"
                     "In a bucket with versions, the versions the points recorded are read,\n"
                     "and a key whose current version is another (overwritten) or a delete\n"
                     "marker (deleted) is reported as tampered, by point and object.\n"
                     "Problems name the file or chunk and the offset; the exit status is then 7\n"
                     "(also for tampering alone: the points stay restorable)."),
        examples=["pydr verify web", "pydr verify web --point 12",
                  "pydr verify web --sample 5 --json"],
        func=cmd_verify)
    add_item(p)
    p.add_argument("--point", metavar="P", help="one point (default: all)")
    p.add_argument("--sample", type=_percent, default=100.0, metavar="PCT",
                   help="check PCT percent of the steps or chunks, chosen at random "
                        "(default: 100)")
    add_vault_options(p)

    p = command(
        sub, "gc", help="sweep the chunks no point index names",
        description=("Garbage collection of the object store that holds ITEM's replicas: mark\n"
                     "every chunk named by any point index under its prefix (any item's), then\n"
                     "delete the others -- but never one younger than --grace (default 24h),\n"
                     "which a cycle running meanwhile may have uploaded and not yet indexed.\n"
                     "Safe while cycles run, if a cycle takes less than the grace period.\n"
                     "In a bucket with versions: chunk versions no index version names are\n"
                     "swept; versions under Object Lock are skipped and counted ('locked').\n"
                     "Retention removes the indexes of dropped points; gc their chunks."),
        examples=["pydr gc web --dry-run", "pydr gc web --grace 48h --json",
                  "pydr gc s3://dr-bucket/site-b"],
        func=cmd_gc)
    add_item(p, "an item replicated to the object store to collect, or s3://BUCKET/PREFIX")
    p.add_argument("--grace", type=_grace, default=24 * 3600.0, metavar="AGE",
                   help="keep unreferenced chunks younger than AGE (default: 24h; 0 sweeps "
                        "them all: only when no cycle of this store runs)")
    p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    add_vault_options(p)

"""The engine's commands: signature, info, diff, delta, apply, rollback and
resync. Every disk or file argument is an endpoint (a local path or
[user@]host:PATH), so no command here asks where a disk is."""

import contextlib
import sys
import threading

from .. import errors as E
from ..engine.signatures import Signature
from .common import (add_block_size, add_format, add_json, add_output_options,
                     add_remote_options, add_threads, command, human_bytes, parse_size,
                     print_fields, print_json, progress_bar, reach)

ANYWHERE = ("a local path (a raw file, a block device or a QEMU image), nbd://HOST/EXPORT, "
            "nbd+unix:///EXPORT?socket=PATH, or [user@]host:PATH on a host with pydr (--rsh)")


def _endpoint(spec, args, format=None):
    from ..endpoints import open_endpoint

    return open_endpoint(spec, **reach(args), format=format)


def _refuse_binary_to_terminal(output, what):
    if output == "-" and sys.stdout.isatty():
        raise E.UnsupportedFile(f"refusing to write a binary {what} to a terminal; "
                                "redirect standard output or use -o FILE", path="-")


def _output(spec, args):
    """A binary file for an output argument: '-' (stdout), or an endpoint's
    atomic writer (the old file stays unless the command succeeds)."""
    if spec == "-":
        return contextlib.nullcontext(sys.stdout.buffer)
    return _endpoint(spec, args).open_write()


def cmd_signature(args):
    _refuse_binary_to_terminal(args.output, "signature")
    image = _endpoint(args.image, args, args.format)
    out = sys.stdout.buffer if args.output == "-" else _endpoint(args.output, args)
    with progress_bar(f"signing {args.image}", args) as bar:
        res = image.write_signature(out, block_size=args.block_size, algorithm=args.algorithm,
                                    threads=args.threads, progress=bar, cancel=threading.Event(),
                                    use_mmap=not args.no_mmap)
    result = {**res._asdict(), "image": args.image, "output": args.output,
              "seconds": round(res.seconds, 6)}
    if args.json:
        print_json(result)
    elif not args.quiet:
        rate = res.size / res.seconds if res.seconds > 0 else 0
        received = f"; {human_bytes(res.bytes_received)} received" if res.bytes_received else ""
        threads = f", {res.threads} threads" if res.threads else ""
        print(f"{args.image}: {human_bytes(res.size)} in {res.blocks} blocks of "
              f"{human_bytes(res.block_size)} ({res.algorithm}), {res.zero_blocks} zero; "
              f"read {human_bytes(res.bytes_read)}, skipped {human_bytes(res.bytes_skipped)} "
              f"of holes{received}; {res.seconds:.3f} s ({human_bytes(rate)}/s{threads})",
              file=sys.stderr if args.output == "-" else sys.stdout)
    return 0


def cmd_info(args):
    from ..engine.inspect import describe_file

    info = describe_file(args.file)
    if args.json:
        print_json(info)
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key in ("block_size", "image_size", "file_size", "base_size", "result_size",
                   "data_bytes", "zero_bytes"):
            value = f"{value} ({human_bytes(value)})"
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


def _signature_of(path):
    """A signature file, or a signature cache (v2) in state clean, as a
    Signature (every byte checked)."""
    from ..engine.sigcache_any import CLEAN, MAGIC, cached_signature, load_any

    with open(path, "rb") as f:
        if f.read(8) != MAGIC:
            return Signature.load(path)
    with load_any(path, verify=True) as cache:
        if cache.state != CLEAN:
            raise E.UnsupportedFile("a signature cache left by an interrupted cycle does not "
                                    "describe its disk (pydr info shows its state)", path=path)
    return cached_signature(path)


def cmd_diff(args):
    old = _signature_of(args.old)
    new = _signature_of(args.new)
    ranges = old.diff(new)
    changed = int(ranges[:, 1].sum()) if len(ranges) else 0
    if args.json:
        print_json({
            "old": args.old, "new": args.new, "block_size": old.block_size,
            "old_size": old.size, "new_size": new.size, "changed_bytes": changed,
            "ranges": [[int(o), int(n)] for o, n in ranges],
        })
        return 0
    for offset, length in ranges:
        print(f"{int(offset)}\t{int(length)}")
    print(f"{len(ranges)} changed ranges, {human_bytes(changed)} of "
          f"{human_bytes(max(old.size, new.size))}", file=sys.stderr)
    return 0


def _base_signature(args, source):
    """The base of `pydr delta`: its signature file (--against) or the image
    itself (--target), as a Signature, wherever either is."""
    if args.against:
        base = _endpoint(args.against, args)
        with base.open_read() as f:
            return Signature._read(f, str(base) if base.place else args.against)
    target = _endpoint(args.target, args)
    if target.identity == source.identity:
        raise E.SameFile("source and target are the same file", path=args.target)
    return target.signature(block_size=args.block_size, threads=args.threads)


def cmd_delta(args):
    _refuse_binary_to_terminal(args.output, "delta")
    source = _endpoint(args.source, args, args.format)
    if args.output != "-":
        out = _endpoint(args.output, args)
        for p in (args.source, args.target):
            if p and out.identity == _endpoint(p, args).identity:
                raise E.UnsupportedFile("refusing to write the delta over an image",
                                        path=args.output)
    with progress_bar(f"delta {args.source}", args) as bar:
        base = _base_signature(args, source)
        with _output(args.output, args) as f:
            st = source.make_delta(f, base=base, threads=args.threads, progress=bar,
                                   cancel=threading.Event())
    result = {"source": args.source, "output": args.output, **st._asdict()}
    if args.json and args.output != "-":
        print_json(result)
    elif not args.quiet:
        print(f"{args.output}: {st.records} records, {human_bytes(st.data_bytes)} of data, "
              f"{human_bytes(st.zero_bytes)} zeroed; delta {human_bytes(st.delta_bytes)} "
              f"in {st.seconds:.3f} s", file=sys.stderr if args.output == "-" else sys.stdout)
    return 0


def cmd_apply(args):
    target = _endpoint(args.target, args, args.format)
    if args.delta == "-":
        source, name = contextlib.nullcontext(sys.stdin.buffer), "<stdin>"
    else:
        source, name = _endpoint(args.delta, args).open_read(), args.delta
    with source as delta, progress_bar(f"apply to {args.target}", args) as bar:
        st = target.apply_delta(delta, name=name, verify=args.verify, progress=bar,
                                cancel=threading.Event())
    if args.json:
        print_json({"delta": args.delta, "target": args.target, **st._asdict()})
    elif st.already_applied and not args.quiet:
        print(f"{args.target}: already holds the delta's result (checked whole): nothing to do")
    elif not args.quiet:
        again = " (an interrupted apply was rolled back first)" if st.rolled_back_first else ""
        print(f"{args.target}: {st.records} records applied, {human_bytes(st.bytes_written)} "
              f"written, {human_bytes(st.bytes_zeroed)} zeroed in {st.seconds:.3f} s{again}")
    return 0


def cmd_rollback(args):
    from ..engine.apply import rollback

    restored = rollback(args.target)
    if args.json:
        print_json({"target": args.target, "bytes_restored": restored})
    else:
        print(f"{args.target}: rolled back, {human_bytes(restored)} of old contents restored")
    return 0


def cmd_resync(args):
    from ..endpoints.transfer import transfer

    with progress_bar(f"resync {args.source} -> {args.target}", args) as bar:
        st, _ = transfer(_endpoint(args.source, args, args.format),
                         _endpoint(args.target, args, args.target_format),
                         block_size=args.block_size, signature_cache=args.signature_cache,
                         verify=args.verify, threads=args.threads, progress=bar,
                         cancel=threading.Event(), bwlimit=args.bwlimit, compress=args.compress,
                         streams=args.streams)
    result = {"source": args.source, "target": args.target, **st._asdict()}
    if args.json:
        print_json(result)
    elif args.stats:
        print_fields(result)
    elif not args.quiet:
        wire = ""
        if getattr(st, "direction", "local") != "local":
            wire = (f"; {human_bytes(st.bytes_sent)} sent, {human_bytes(st.bytes_received)} "
                    f"received")
        # what was read (holes and a cached target cost nothing), not what was covered
        read = (f"{human_bytes(st.bytes_read)} read here ({human_bytes(st.source_bytes_read)} "
                f"of the source, {human_bytes(st.target_bytes_read)} of the target)")
        print(f"{args.target}: {st.blocks_changed} blocks changed, "
              f"{human_bytes(st.bytes_written)} written, {human_bytes(st.bytes_zeroed)} zeroed, "
              f"{read}{wire} in {st.seconds:.3f} s")
    return 0


def register(sub):
    p = command(
        sub, "signature", help="compute the block signature of an image or block device",
        description=(
            "Hash IMAGE (a regular file or a block device) in fixed blocks with XXH3\n"
            "and write the signature file FILE (format: docs/FORMAT.md).\n\n"
            "Holes of sparse files are found with SEEK_DATA/SEEK_HOLE and never read;\n"
            "all-zero blocks are marked in the signature's zero mask. The last block is\n"
            "hashed over its real length, so every hash equals xxhsum's of that block.\n"
            "The file is written atomically: FILE is either the old one or the new one.\n"
            "IMAGE and FILE may be on another host (host:PATH): the host signs its disk."),
        examples=["pydr signature disk.img -o disk.sig",
                  "pydr signature /dev/vdb -o vdb.sig --block-size 4K --threads 2",
                  "pydr signature disk.img -o - | ssh backup 'cat > disk.sig'",
                  "pydr signature dr:/srv/replica.img -o replica.sig --block-size 4K"],
        func=cmd_signature)
    p.add_argument("image", metavar="IMAGE", help="image file or block device to sign: " + ANYWHERE)
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="signature file to write ('-' for standard output)")
    add_block_size(p, 64 * 1024, "block size, a power of two from 512 to 64M (default: 64K)")
    p.add_argument("--algorithm", choices=("xxh3-64", "xxh3-128"), default="xxh3-128",
                   help="hash per block (default: xxh3-128)")
    add_threads(p)
    add_json(p)
    add_output_options(p)
    add_remote_options(p)
    add_format(p)
    p.add_argument("--no-mmap", action="store_true",
                   help="read with pread() instead of hashing from mmap windows (slower; "
                        "for file systems that refuse mmap)")

    p = command(
        sub, "delta", help="write a delta that turns a base image into SOURCE",
        description=(
            "Compare SOURCE with a base image, given by its signature (--against) or as the\n"
            "image itself (--target), and write the blocks that differ as a delta (format:\n"
            "docs/FORMAT.md). The delta can be streamed: '-o -' writes it to standard output.\n"
            "Each record carries the hash of the base blocks it replaces, so 'pydr apply'\n"
            "refuses to write it onto anything but that base."),
        examples=["pydr signature replica.img -o replica.sig --block-size 4K",
                  "pydr delta disk.img --against replica.sig -o disk.delta",
                  "pydr delta disk.img --target replica.img -o - | ssh dr 'pydr apply - replica.img'",
                  "pydr delta disk.img --target dr:/srv/replica.img -o dr:/srv/disk.delta"],
        func=cmd_delta)
    p.add_argument("source", metavar="SRC", help="image whose content the delta produces")
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--against", metavar="SIGFILE", help="signature file of the base (xxh3-128)")
    base.add_argument("--target", metavar="DST", help="the base image itself")
    p.add_argument("-o", "--output", metavar="DELTA", required=True,
                   help="delta file to write ('-' for standard output)")
    add_block_size(p, 4096, "block size with --target (default: 4K); --against uses the "
                            "signature's")
    add_format(p, what="SRC")
    add_threads(p)
    add_json(p, "print one JSON object with the stats")
    add_output_options(p)
    add_remote_options(p)

    p = command(
        sub, "apply", help="apply a delta to a target image, crash-safely",
        description=(
            "Apply DELTA ('-' for standard input) to TARGET. Before any block is\n"
            "overwritten, its old contents go to an undo journal beside the target\n"
            "(.NAME.pydr-undo; for block devices in $PYDR_JOURNAL_DIR, default\n"
            "/var/lib/pydr/journal), which is fsynced first. Every record is checked\n"
            "(checksums, order, and the hash of the target blocks it replaces) before\n"
            "it is written. On any error the target is restored and the journal removed.\n\n"
            "If an apply was interrupted (killed, power loss), running the same command\n"
            "again finishes it, and 'pydr rollback TARGET' instead restores the old\n"
            "contents exactly. Other pydr commands refuse such a target until then."),
        examples=["pydr apply disk.delta replica.img --verify",
                  "pydr apply disk.delta dr:/srv/replica.img     (applied by pydr on dr)",
                  "pydr apply dr:/srv/disk.delta replica.img"],
        func=cmd_apply)
    p.add_argument("delta", metavar="DELTA", help="delta file, or '-' for standard input")
    p.add_argument("target", metavar="TARGET", help="image file or block device to update")
    p.add_argument("--verify", action="store_true",
                   help="afterwards, read the whole target and check it equals the delta's result")
    add_format(p, what="TARGET")
    add_json(p, "print one JSON object with the stats")
    add_output_options(p)
    add_remote_options(p)

    p = command(
        sub, "rollback", help="undo an interrupted apply or resync",
        description=("Restore TARGET's contents from before an interrupted apply or resync,\n"
                     "using its undo journal, then remove the journal."),
        examples=["pydr rollback replica.img", "pydr rollback /dev/vg0/replica --json"],
        func=cmd_rollback)
    p.add_argument("target", metavar="TARGET")
    add_json(p)

    p = command(
        sub, "resync", help="make TARGET equal to SOURCE, writing only the blocks that differ",
        description=(
            "Compare SOURCE and TARGET block by block (4 KiB by default, both hashed in\n"
            "parallel, window by window, so memory stays bounded) and write only the\n"
            "blocks that differ, through the same crash-safe undo journal as 'pydr apply'.\n"
            "TARGET grows or shrinks to SOURCE's size (block devices cannot be resized).\n"
            "With --signature-cache, a signature cache of TARGET (docs/FORMAT.md) kept up\n"
            "to date in place by every resync that uses it, TARGET is not read at all.\n\n"
            "Either side may be [user@]host:PATH: the sides compare digests per 128 KiB,\n"
            "then 4 KiB hashes only where those differ (docs/PROTOCOL.md). An interrupted\n"
            "resync is resumed by running it again."),
        examples=["pydr resync disk.img /srv/replica/disk.img --stats",
                  "pydr resync /dev/vg/disk /dev/vg/replica --signature-cache replica.sig",
                  "pydr resync disk.img backup@dr:/srv/disk.img --compress --streams 4",
                  "pydr resync dr:/srv/disk.img restored.img --bwlimit 20M",
                  "pydr resync vm.qcow2 /dr/vm.img                 (through pydr's own qemu-nbd)",
                  "pydr resync nbd+unix:///drive0?socket=/run/vm.nbd /dr/drive0.img"],
        func=cmd_resync)
    p.add_argument("source", metavar="SRC", help=ANYWHERE)
    p.add_argument("target", metavar="DST", help=ANYWHERE)
    p.add_argument("--signature-cache", metavar="FILE", default=None,
                   help="signature cache of DST: used when valid, newer than DST and bound "
                        "to DST as the last resync left it (device, inode, size, mtime), then "
                        "updated where DST changed. pydr must be DST's only writer: a write "
                        "to DST in the timestamp tick of a resync's end goes unseen")
    add_remote_options(p)
    p.add_argument("--compress", action="store_true",
                   help="with a remote side, compress the changed blocks on the wire (zstd; both "
                        "sides need the zstandard package)")
    p.add_argument("--streams", metavar="N", type=int, default=0,
                   help="with a remote target, send the changed blocks over N more ssh "
                        "connections at once (up to 16; default 0: one connection). One ssh "
                        "channel moves at most ~2 MiB per round trip; use this on long links, "
                        "best with a reused ssh connection (ControlMaster/ControlPersist)")
    p.add_argument("--bwlimit", metavar="RATE", type=parse_size, default=None,
                   help="with a remote side, the side holding SRC sends at most RATE bytes per "
                        "second (e.g. 10M): this one for a push, the server for a pull")
    p.add_argument("--verify", action="store_true",
                   help="read back every written range and compare hashes before committing "
                        "(both disks on this machine)")
    add_block_size(p, 4096, "comparison block size (default: 4K)")
    add_format(p, what="SRC")
    add_format(p, "--target-format", what="DST")
    add_threads(p)
    p.add_argument("--stats", action="store_true", help="print the statistics, one per line")
    add_json(p, "print one JSON object with the stats")
    add_output_options(p)

    p = command(
        sub, "info", help="describe and verify a pydr file",
        description=("Read FILE, verify its checksums from end to end and describe it.\n"
                     "A corrupt, truncated or foreign file is reported with the offset of\n"
                     "the first problem and exit status 7."),
        examples=["pydr info disk.sig", "pydr info changes.delta --json"], func=cmd_info)
    p.add_argument("file", metavar="FILE", help="a pydr signature, signature cache or delta file")
    add_json(p, "print one JSON object")

    p = command(
        sub, "diff", help="list the byte ranges where two signatures differ",
        description=("Compare two signatures of the same block size and algorithm and print\n"
                     "the changed byte ranges, coalesced, one 'OFFSET<TAB>LENGTH' per line\n"
                     "(a summary goes to standard error). Blocks beyond the shorter image\n"
                     "count as changed."),
        examples=["pydr diff monday.sig tuesday.sig", "pydr diff old.sig new.sig --json | jq .changed_bytes"],
        func=cmd_diff)
    p.add_argument("old", metavar="OLD", help="signature file (or signature cache)")
    p.add_argument("new", metavar="NEW", help="signature file (or signature cache)")
    add_json(p, "print one JSON object")

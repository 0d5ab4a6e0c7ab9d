"""The ``pydr`` command: a thin shell over the Python API.

Every command turns its arguments into one API call and presents the result;
errors become one line on stderr and a stable exit code (see ``EXIT STATUS``
in ``pydr --help``), never a traceback (set PYDR_DEBUG=1 to see one).
"""

import argparse
import json
import os
import sys
import threading
import time

from . import __version__
from . import errors as E

EXIT_STATUS = """\
exit status:
  0    success
  1    internal error (a bug: please report it; PYDR_DEBUG=1 shows a traceback)
  2    usage error: bad option or argument
  3    file or directory not found
  4    permission denied or read-only file system
  5    I/O error
  6    no space left on device
  7    corrupt, truncated or foreign pydr file
  8    incompatible inputs (e.g. signatures of different block sizes)
  9    a file changed while it was being read
  10   not a regular file or block device (a directory, a FIFO, ...)
  11   an interrupted apply is pending on the target (pydr apply again, or pydr rollback)
  12   the target already holds the delta's result
  13   source and target are the same file
  14   not a vault, or the vault is locked by another pydr
  15   the operation is not valid in the item's current state
  16   a quiesce, thaw or shutdown hook failed
  17   a recovery plan stopped (its report says where)
  18   the remote side broke pydr's protocol
  130  interrupted or cancelled
"""


# -- presentation helpers ----------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text):
    """'65536', '64K', '64KiB', '1M' -> bytes (binary units)."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b") if text else ""
    num, unit = t, ""
    if t and t[-1] in _UNITS:
        num, unit = t[:-1], t[-1]
    try:
        value = int(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r} (examples: 4096, 64K, 1M)"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, not {text!r}")
    return value


def parse_duration(text):
    """'90', '90s', '15m', '72h', '7d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (examples: 90s, 15m, 72h, 7d)")
    return value


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # unreachable


class ProgressBar:
    """One self-rewriting line on stderr, only when stderr is a terminal."""

    def __init__(self, label, enabled):
        self.label = label
        self.enabled = enabled
        self.shown = False

    def __call__(self, rec):
        if not self.enabled:
            return
        rate = rec.bytes_per_second
        eta = (rec.total_bytes - rec.done_bytes) / rate if rate > 0 else 0
        line = (
            f"\r{self.label} {rec.fraction * 100:5.1f}%  "
            f"{human_bytes(rec.done_bytes)} / {human_bytes(rec.total_bytes)}  "
            f"{human_bytes(rate)}/s  eta {int(eta) // 60}:{int(eta) % 60:02d} "
        )
        sys.stderr.write(line)
        sys.stderr.flush()
        self.shown = True

    def close(self):
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _print_json(obj):
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


# -- commands ----------------------------------------------------------------


def _remote_options(p):
    p.add_argument("--rsh", metavar="CMD", default="ssh",
                   help="how to reach the [user@]host:PATH arguments: runs "
                        "'CMD host REMOTE_PYDR serve --stdio' (default: ssh)")
    p.add_argument("--remote-pydr", metavar="PATH", default="pydr",
                   help="pydr on the remote side (default: pydr)")


def _remote(args):
    return {"rsh": args.rsh, "remote_pydr": args.remote_pydr}


def _output(path, args):
    """A binary file for an output argument: local (atomic), '-', or remote."""
    import contextlib

    from ._atomic import atomic_write
    from .remote import RemoteWriter, parse_remote

    if parse_remote(path):
        return RemoteWriter(path, **_remote(args))
    if path == "-":
        return contextlib.nullcontext(sys.stdout.buffer)
    return atomic_write(path)


def _base_signature(args, block_size):
    """The base of `pydr delta` as a Signature when it is remote (or the
    source is), else None: make_delta reads local files itself."""
    from .remote import RemoteReader, parse_remote, remote_signature
    from .signatures import Signature, signature

    if args.against:
        if parse_remote(args.against):
            with RemoteReader(args.against, **_remote(args)) as f:
                return Signature._read(f, args.against)
        return Signature.load(args.against) if parse_remote(args.source) else None
    if parse_remote(args.target):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="pydr-") as d:
            remote_signature(args.target, os.path.join(d, "base.sig"), block_size=block_size,
                             **_remote(args))
            return Signature.load(os.path.join(d, "base.sig"))
    if parse_remote(args.source):
        return signature(args.target, block_size=block_size, threads=args.threads)
    return None


def cmd_signature(args):
    from .remote import parse_remote

    if parse_remote(args.image):
        if args.algorithm != "xxh3-128":
            raise ValueError("a remote signature is always xxh3-128")
        from .remote import remote_signature

        if parse_remote(args.output):  # both remote: fetch, then upload
            import shutil
            import tempfile

            with tempfile.TemporaryDirectory(prefix="pydr-") as d:
                res = remote_signature(args.image, os.path.join(d, "s"), block_size=args.block_size,
                                       **_remote(args))
                with open(os.path.join(d, "s"), "rb") as f, _output(args.output, args) as out:
                    shutil.copyfileobj(f, out, 4 << 20)
            res["output"] = args.output
        else:
            res = remote_signature(args.image, args.output, block_size=args.block_size,
                                   **_remote(args))
        if args.json:
            _print_json(res)
        elif not args.quiet:
            print(f"{args.image}: {res['blocks']} blocks of {human_bytes(res['block_size'])}, "
                  f"{human_bytes(res['bytes_received'])} received in {res['seconds']:.3f} s")
        return 0
    from .signatures import signature

    if args.output == "-" and sys.stdout.isatty():
        raise E.UnsupportedFile("refusing to write a binary signature to a terminal; "
                                "redirect standard output or use -o FILE", path="-")
    if args.output != "-" and os.path.exists(args.output) and os.path.exists(args.image):
        if os.path.samefile(args.output, args.image):
            raise E.UnsupportedFile(
                "refusing to write the signature over the image itself", path=args.output
            )
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = ProgressBar(f"signing {args.image}", show and not args.quiet)
    cancel = threading.Event()
    try:
        sig = signature(
            args.image,
            block_size=args.block_size,
            algorithm=args.algorithm,
            threads=args.threads,
            progress=bar,
            cancel=cancel,
            use_mmap=not args.no_mmap,
        )
    finally:
        bar.close()
    if parse_remote(args.output):
        with _output(args.output, args) as out:
            sig._write(out)
    else:
        sig.save(args.output)
    st = sig.stats
    result = {
        "image": args.image,
        "output": args.output,
        "size": sig.size,
        "block_size": sig.block_size,
        "algorithm": sig.algorithm,
        "blocks": sig.block_count,
        "zero_blocks": sig.zero_blocks,
        "bytes_read": st.bytes_read,
        "bytes_skipped": st.bytes_skipped,
        "seconds": round(st.seconds, 6),
        "threads": st.threads,
        "kernel": st.kernel,
    }
    out = sys.stderr if args.output == "-" else sys.stdout
    if args.json:
        if args.output == "-":
            raise AssertionError("unreachable: --json with -o - is refused by the parser")
        _print_json(result)
    elif not args.quiet:
        rate = sig.size / st.seconds if st.seconds > 0 else 0
        print(
            f"{args.image}: {human_bytes(sig.size)} in {sig.block_count} blocks of "
            f"{human_bytes(sig.block_size)} ({sig.algorithm}), {sig.zero_blocks} zero; "
            f"read {human_bytes(st.bytes_read)}, skipped {human_bytes(st.bytes_skipped)} "
            f"of holes; {st.seconds:.3f} s ({human_bytes(rate)}/s, {st.threads} threads)",
            file=out,
        )
    return 0


def _describe_delta(path):
    """Read a whole delta, checking every record and the END checksum."""
    from . import _bindings as B
    from .delta import HEADER_SIZE, DeltaHeader
    import struct

    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
        header = DeltaHeader.parse(raw, path)
        digest = B.Digest().update(raw)
        position, buf = HEADER_SIZE, bytearray()
        records = data = zeros = 0
        while True:
            chunk = f.read(32 << 20)
            buf += chunk
            try:
                complete, count, _, end = B.records_scan(buf)
            except E.CorruptDelta as exc:
                raise E.CorruptDelta("corrupt record header", path=path, offset=position + exc.offset) from None
            body = complete - (B.RECORD_HEADER if end else 0)
            pos = 0
            while pos < body:
                info = B.record_parse(buf[pos:pos + B.RECORD_HEADER])
                size = B.RECORD_HEADER + (info["length"] if info["type"] == B.DATA else 0)
                if info["type"] == B.DATA:
                    payload = bytes(buf[pos + B.RECORD_HEADER:pos + size])
                    if B.hash_bytes(B.ALGORITHMS["xxh3-64"], payload)[0] != info["payload_hash"]:
                        raise E.CorruptDelta("record payload checksum mismatch", path=path,
                                             offset=position + pos)
                    data += info["length"]
                else:
                    zeros += info["length"]
                records += 1
                pos += size
            digest.update(memoryview(buf)[:body])
            if end:
                info = B.record_parse(buf[body:complete])
                if (info["type"] != B.END or info["base_hash"] != struct.unpack("<QQ", digest.digest())
                        or (info["seq"], info["length"], info["offset"]) != (records, data, zeros)):
                    raise E.CorruptDelta("delta checksum or counts do not match its END record",
                                         path=path, offset=position + body)
                if f.read(1) or complete != len(buf):
                    raise E.CorruptDelta("data after the end of the delta", path=path,
                                         offset=position + complete)
                break
            if not chunk:
                raise E.CorruptDelta("delta truncated: no END record", path=path,
                                     offset=position + len(buf))
            del buf[:complete]
            position += complete
    return {
        "path": path, "kind": "delta", "format_version": 1, "block_size": header.block_size,
        "base_size": header.base_size, "result_size": header.result_size,
        "base_identity": header.base_id.hex(), "result_identity": header.result_id.hex(),
        "records": records, "data_bytes": data, "zero_bytes": zeros,
        "file_size": os.path.getsize(path), "checksum": "ok",
    }


def _describe_file(path):
    """Kind and details of a pydr file, verified in full."""
    from .delta import MAGIC as DELTA_MAGIC
    from .signatures import Signature

    with open(path, "rb") as f:
        magic = f.read(8)
    if magic == DELTA_MAGIC:
        return _describe_delta(path)
    # load() names the problem (empty file, bad magic, truncation, checksum)
    sig = Signature.load(path)
    return {
        "path": path,
        "kind": "signature",
        "format_version": 1,
        "algorithm": sig.algorithm,
        "block_size": sig.block_size,
        "image_size": sig.size,
        "blocks": sig.block_count,
        "zero_blocks": sig.zero_blocks,
        "file_size": os.path.getsize(path),
        "checksum": "ok",
    }


def cmd_info(args):
    info = _describe_file(args.file)
    if args.json:
        _print_json(info)
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key in ("block_size", "image_size", "file_size", "base_size", "result_size",
                   "data_bytes", "zero_bytes"):
            value = f"{value} ({human_bytes(value)})"
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


def cmd_diff(args):
    from .signatures import Signature

    old = Signature.load(args.old)
    new = Signature.load(args.new)
    ranges = old.diff(new)
    changed = int(ranges[:, 1].sum()) if len(ranges) else 0
    if args.json:
        _print_json({
            "old": args.old, "new": args.new, "block_size": old.block_size,
            "old_size": old.size, "new_size": new.size, "changed_bytes": changed,
            "ranges": [[int(o), int(n)] for o, n in ranges],
        })
        return 0
    for offset, length in ranges:
        print(f"{int(offset)}\t{int(length)}")
    print(
        f"{len(ranges)} changed ranges, {human_bytes(changed)} of "
        f"{human_bytes(max(old.size, new.size))}",
        file=sys.stderr,
    )
    return 0


def _bar(label, args):
    show = args.progress if getattr(args, "progress", None) is not None else sys.stderr.isatty()
    return ProgressBar(label, show and not getattr(args, "quiet", False))


def cmd_delta(args):
    from .delta import make_delta

    if args.output == "-" and sys.stdout.isatty():
        raise E.UnsupportedFile("refusing to write a binary delta to a terminal; "
                                "redirect standard output or use -o FILE", path="-")
    for p in (args.source, args.target):
        if p and args.output != "-" and os.path.exists(args.output) and os.path.exists(p) \
                and os.path.samefile(args.output, p):
            raise E.UnsupportedFile("refusing to write the delta over an image", path=args.output)
    from .remote import parse_remote, remote_delta

    if any(parse_remote(p) for p in (args.source, args.against, args.target, args.output)):
        base = _base_signature(args, args.block_size)
        with _output(args.output, args) as out:
            if parse_remote(args.source):
                st = remote_delta(args.source, out, base=base, **_remote(args))
            else:
                if base is None:  # only the output is remote
                    base = args.against or None
                st = make_delta(args.source, out, against=base,
                                target=None if base is not None else args.target,
                                block_size=args.block_size, threads=args.threads,
                                cancel=threading.Event())
    else:
        bar = _bar(f"delta {args.source}", args)
        try:
            st = make_delta(args.source, args.output, against=args.against, target=args.target,
                            block_size=args.block_size, threads=args.threads, progress=bar,
                            cancel=threading.Event())
        finally:
            bar.close()
    result = {"source": args.source, "output": args.output, **st._asdict()}
    out = sys.stderr if args.output == "-" else sys.stdout
    if args.json and args.output != "-":
        _print_json(result)
    elif not args.quiet:
        print(f"{args.output}: {st.records} records, {human_bytes(st.data_bytes)} of data, "
              f"{human_bytes(st.zero_bytes)} zeroed; delta {human_bytes(st.delta_bytes)} "
              f"in {st.seconds:.3f} s", file=out)
    return 0


def cmd_apply(args):
    from .apply import apply_delta

    import contextlib

    from .remote import RemoteReader, parse_remote, remote_apply

    source = (RemoteReader(args.delta, **_remote(args)) if parse_remote(args.delta)
              else contextlib.nullcontext(args.delta))
    with source as delta:
        if parse_remote(args.target):
            st = remote_apply(delta, args.target, verify=args.verify, **_remote(args))
        else:
            bar = _bar(f"apply to {args.target}", args)
            try:
                st = apply_delta(delta, args.target, progress=bar, verify=args.verify,
                                 cancel=threading.Event())
            finally:
                bar.close()
    if args.json:
        _print_json({"delta": args.delta, "target": args.target, **st._asdict()})
    elif not args.quiet:
        again = " (an interrupted apply was rolled back first)" if st.rolled_back_first else ""
        print(f"{args.target}: {st.records} records applied, {human_bytes(st.bytes_written)} "
              f"written, {human_bytes(st.bytes_zeroed)} zeroed in {st.seconds:.3f} s{again}")
    return 0


def cmd_rollback(args):
    from .apply import rollback

    restored = rollback(args.target)
    if args.json:
        _print_json({"target": args.target, "bytes_restored": restored})
    else:
        print(f"{args.target}: rolled back, {human_bytes(restored)} of old contents restored")
    return 0


def _cmd_remote_resync(args):
    from .remote import remote_resync

    bar = _bar(f"resync {args.source} -> {args.target}", args)
    try:
        st = remote_resync(args.source, args.target, rsh=args.rsh, remote_pydr=args.remote_pydr,
                           block_size=args.block_size, threads=args.threads, progress=bar,
                           bwlimit=args.bwlimit, compress=args.compress, streams=args.streams)
    finally:
        bar.close()
    result = {"source": args.source, "target": args.target, **st._asdict()}
    if args.json:
        _print_json(result)
    elif args.stats:
        for k, v in result.items():
            print(f"{k.replace('_', ' '):<16} {v}")
    elif not args.quiet:
        print(f"{args.target}: {st.blocks_changed} blocks changed, {human_bytes(st.bytes_written)} "
              f"written; {human_bytes(st.bytes_sent)} sent, {human_bytes(st.bytes_received)} "
              f"received in {st.seconds:.3f} s")
    return 0


def cmd_resync(args):
    from .remote import parse_remote

    if parse_remote(args.source) or parse_remote(args.target):
        return _cmd_remote_resync(args)
    from .sync import resync

    bar = _bar(f"resync {args.source} -> {args.target}", args)
    try:
        st = resync(args.source, args.target, block_size=args.block_size,
                    signature_cache=args.signature_cache, verify=args.verify,
                    threads=args.threads, progress=bar, cancel=threading.Event())
    finally:
        bar.close()
    result = {"source": args.source, "target": args.target, **st._asdict()}
    if args.json:
        _print_json(result)
    elif args.stats:
        for k, v in result.items():
            print(f"{k.replace('_', ' '):<16} {v}")
    elif not args.quiet:
        print(f"{args.target}: {st.blocks_changed} blocks changed, "
              f"{human_bytes(st.bytes_written)} written, {human_bytes(st.bytes_zeroed)} zeroed, "
              f"{human_bytes(st.bytes_read)} read in {st.seconds:.3f} s")
    return 0


def _vault_dir(args):
    directory = args.vault or os.environ.get("PYDR_VAULT")
    if not directory:
        raise ValueError("no vault: give --vault DIR or set PYDR_VAULT")
    return directory


def _ts(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) if t else None


def cmd_vault_init(args):
    from .vault import init_vault

    init_vault(args.dir)
    if args.json:
        _print_json({"vault": args.dir})
    else:
        print(f"vault created in {args.dir}")
    return 0


def _parse_disk(text):
    if "=" not in text:
        raise ValueError(f"--disk wants SOURCE=REPLICA, not {text!r}")
    source, replica = text.split("=", 1)
    if not source or not replica:
        raise ValueError(f"--disk wants SOURCE=REPLICA, not {text!r}")
    return source, replica


def cmd_protect(args):
    from .vault import Vault

    disks = [_parse_disk(d) for d in args.disk]
    with Vault(_vault_dir(args), writer=True) as v:
        v.protect(args.item, disks, group=args.group, retention=args.retention,
                  retention_age=args.retention_age, quiesce_hook=args.quiesce_hook,
                  thaw_hook=args.thaw_hook, rsh=args.rsh, remote_pydr=args.remote_pydr)
        status = v.status(args.item)
    if args.json:
        _print_json(status)
    else:
        print(f"{args.item}: protected ({len(disks)} disks), state {status['state']}; "
              f"run 'pydr replicate {args.item}' for the initial replication")
    return 0


def cmd_replicate(args):
    from .replication import replicate
    from .vault import Vault

    with Vault(_vault_dir(args), writer=True) as v:
        if args.all:
            names = v.items()
            if not names:
                raise ValueError("the vault protects no items")
            groups = {}
            for n in names:
                groups.setdefault(v.item(n)["grp"] or f"item:{n}", []).append(n)
            batches = list(groups.values())
        elif args.group:
            batches = [v.items(group=args.group)]
        elif args.item:
            row = v.item(args.item)
            batches = [v.items(group=row["grp"]) if row["grp"] else [args.item]]
        else:
            raise ValueError("give ITEM, --group G or --all")
        bar = _bar("replicate", args)
        results = []
        try:
            for names in batches:
                kwargs = {"app_consistent": args.app_consistent, "progress": bar,
                          "resync_all": args.resync}
                if args.retry:
                    from .replication import replicate_with_retry
                    from .retry import RetryPolicy

                    policy = RetryPolicy(max_attempts=args.max_attempts)
                    results.append(replicate_with_retry(v, names, policy=policy, **kwargs))
                else:
                    results.append(replicate(v, names, **kwargs))
        finally:
            bar.close()
    if args.json:
        _print_json([r._asdict() for r in results])
    else:
        for r in results:
            print(f"point {r.point_id} ({r.consistency}) for {', '.join(r.items)}: "
                  f"{human_bytes(r.bytes_written)} written, {human_bytes(r.bytes_read)} read "
                  f"in {r.seconds:.3f} s")
    return 0


def cmd_points(args):
    from .vault import Vault

    with Vault(_vault_dir(args)) as v:
        points = v.points(args.item)
    out = [{"id": p["id"], "created": _ts(p["created"]), "consistency": p["consistency"],
            "cut": p["cut"], "bytes": p["bytes"]} for p in points]
    if args.json:
        _print_json(out)
    else:
        for p in out:
            print(f"{p['id']:>6}  {p['created']}  {p['consistency']:<16}  cut: {p['cut']:<8} "
                  f"{human_bytes(p['bytes'])}")
    return 0


def cmd_status(args):
    from .vault import Vault

    with Vault(_vault_dir(args)) as v:
        names = [args.item] if args.item else v.items()
        statuses = [v.status(n) for n in names]
    if args.json:
        _print_json(statuses[0] if args.item else statuses)
    else:
        for st in statuses:
            print(f"{st['item']}: {st['state']}, {st['direction']}, health {st['health']}, "
                  f"{st['points']} points" + (f", last error: {st['last_error']}" if st["last_error"] else ""))
    return 0


def cmd_jobs(args):
    from .vault import Vault

    with Vault(_vault_dir(args)) as v:
        jobs = v.jobs()
    out = [{**j, "started": _ts(j["started"]), "ended": _ts(j["ended"])} for j in jobs]
    if args.json:
        _print_json(out)
    else:
        for j in out:
            print(f"{j['id']:>5}  {j['kind']:<10} {j['item'] or '':<16} {j['state']:<10} "
                  f"{j['progress'] * 100:5.1f}%  {human_bytes(j['bytes_transferred'])}"
                  + (f"  {j['error']}" if j["error"] else ""))
    return 0


def cmd_materialize(args):
    from .replication import materialize
    from .vault import Vault

    with Vault(_vault_dir(args), writer=True) as v:
        paths = materialize(v, args.item, args.point, args.to)
    if args.json:
        _print_json({"item": args.item, "point": args.point, "paths": paths})
    else:
        for p in paths:
            print(p)
    return 0


def _dr(args, fn):
    from .vault import Vault

    with Vault(_vault_dir(args), writer=True) as v:
        result = fn(v)
    if args.json:
        _print_json(result)
    return result


def cmd_test_failover(args):
    from .failover import test_failover

    def run(v):
        pid, paths = test_failover(v, args.item, args.to, args.point)
        return {"item": args.item, "point": pid, "paths": paths}

    r = _dr(args, run)
    if not args.json:
        print(f"{args.item}: point {r['point']} materialised for the drill:")
        for p in r["paths"]:
            print(f"  {p}")
    return 0


def cmd_cleanup_test_failover(args):
    from .failover import cleanup_test_failover

    r = _dr(args, lambda v: {"item": args.item, "removed": cleanup_test_failover(v, args.item)})
    if not args.json:
        print(f"{args.item}: test failover cleaned up ({len(r['removed'])} files removed)")
    return 0


def cmd_failover(args):
    from .failover import failover

    r = _dr(args, lambda v: failover(v, args.item, args.point, planned=args.planned,
                                     shutdown_hook=args.shutdown_hook))
    if not args.json:
        print(f"{args.item}: failed over to point {r['point']}; its replicas now hold that point "
              f"(run 'pydr commit {args.item}' to make it final)")
        for n in r["notes"]:
            print(f"  note: {n}")
    return 0


def cmd_change_point(args):
    from .failover import change_point

    r = _dr(args, lambda v: change_point(v, args.item, args.point))
    if not args.json:
        print(f"{args.item}: replicas now hold point {r['point']}")
    return 0


def cmd_commit(args):
    from .failover import commit

    _dr(args, lambda v: commit(v, args.item))
    if not args.json:
        print(f"{args.item}: failover committed; the replica site is active (direction reverse)")
    return 0


def cmd_reprotect(args):
    from .failover import reprotect

    r = _dr(args, lambda v: reprotect(v, args.item))
    if not args.json:
        print(f"{args.item}: reprotected, direction {r['direction']}; first point {r['point']}: "
              f"{human_bytes(r['bytes_written'])} written (only the differences), "
              f"{human_bytes(r['bytes_read'])} compared")
    return 0


def cmd_failback(args):
    from .failover import failback

    alternates = dict(_parse_disk(a) for a in args.alternate or [])
    r = _dr(args, lambda v: failback(v, args.item, alternates=alternates,
                                     shutdown_hook=args.shutdown_hook))
    if not args.json:
        print(f"{args.item}: failed back to point {r['point']} (nothing lost); run "
              f"'pydr commit {args.item}' then 'pydr reprotect {args.item}'")
    return 0


def _vault_options(parser):
    """--vault and --json, which every vault command takes."""
    parser.add_argument("--vault", metavar="DIR",
                        help="vault directory (default: $PYDR_VAULT)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


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
    from .plans import create_plan

    definition = _dr(args, lambda v: {"plan": args.plan,
                                      "groups": create_plan(v, args.plan, args.groups or [])})
    if not args.json:
        print(f"plan {args.plan}: " + " -> ".join(",".join(g["items"]) for g in definition["groups"]))
    return 0


def _print_plan_report(report):
    for e in report:
        what = f"{e['hook']} hook" if "hook" in e else e["item"]
        detail = e.get("error") or ""
        print(f"  group {e['group']}: {what:<20} {e['status']}" + (f"  {detail}" if detail else ""))


def cmd_plan_run(args):
    from .plans import PlanFailed, run_plan
    from .vault import Vault

    options = {k: getattr(args, k, None) for k in ("point", "planned", "shutdown_hook", "to")}
    with Vault(_vault_dir(args), writer=True) as v:
        try:
            report = run_plan(v, args.plan, args.operation, **options)
        except PlanFailed as exc:
            if args.json:
                _print_json({"plan": args.plan, "operation": args.operation, "ok": False,
                             "report": exc.report})
            else:
                _print_plan_report(exc.report)
            raise
    if args.json:
        _print_json({"plan": args.plan, "operation": args.operation, "ok": True, "report": report})
    else:
        print(f"plan {args.plan}: {args.operation} done")
        _print_plan_report(report)
    return 0


def cmd_serve(args):
    from .server import main_stdio

    if args.root and not os.path.isdir(args.root):
        raise FileNotFoundError(2, "root directory not found", args.root)
    return main_stdio(args.root)


def cmd_demo(args):
    from .demo import run_demo

    return run_demo(args.dir, args.size, keep=args.keep, as_json=args.json, threads=args.threads)


# -- parser ------------------------------------------------------------------


def build_parser():
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="pydr",
        formatter_class=fmt,
        description=(
            "pydr keeps a copy of raw disk images and block devices at a second site by\n"
            "moving only the blocks that differ, and lets an operator fail over to it and\n"
            "back: block signatures (XXH3, hole- and zero-aware), deltas applied crash-safely\n"
            "under an undo journal, resync, replication with recovery points kept as reverse\n"
            "deltas, test failover, failover, commit, reprotect, failback and recovery plans.\n"
            "Replication state lives in a vault (--vault DIR or $PYDR_VAULT)."
        ),
        epilog=(
            "examples:\n"
            "  pydr demo                            disaster recovery of a two-disk ext4 machine\n"
            "  pydr signature disk.img -o disk.sig  hash disk.img in 64 KiB blocks\n"
            "  pydr info disk.sig --json            describe and verify a pydr file\n"
            "  pydr diff old.sig new.sig            list the byte ranges that differ\n"
            "  pydr resync disk.img replica.img     copy only the blocks that differ\n"
            "  pydr delta disk.img --against replica.sig -o d.delta; pydr apply d.delta replica.img\n"
            "  pydr protect vm --disk a.img=/dr/a.img && pydr replicate vm && pydr points vm\n"
            "  pydr failover vm --planned; pydr commit vm; pydr reprotect vm; pydr failback vm\n\n"
            "Run 'pydr COMMAND --help' for the options of a command.\n\n" + EXIT_STATUS
        ),
    )
    parser.add_argument("--version", action="version", version=f"pydr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "signature",
        formatter_class=fmt,
        help="compute the block signature of an image or block device",
        description=(
            "Hash IMAGE (a regular file or a block device) in fixed blocks with XXH3\n"
            "and write the signature file FILE (format: docs/FORMAT.md).\n\n"
            "Holes of sparse files are found with SEEK_DATA/SEEK_HOLE and never read;\n"
            "all-zero blocks are marked in the signature's zero mask. The last block is\n"
            "hashed over its real length, so every hash equals xxhsum's of that block.\n"
            "The file is written atomically: FILE is either the old one or the new one."
        ),
        epilog=(
            "examples:\n"
            "  pydr signature disk.img -o disk.sig\n"
            "  pydr signature /dev/vdb -o vdb.sig --block-size 4K --threads 2\n"
            "  pydr signature disk.img -o - | ssh backup 'cat > disk.sig'\n\n" + EXIT_STATUS
        ),
    )
    p.add_argument("image", metavar="IMAGE", help="image file or block device to sign")
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="signature file to write ('-' for standard output)")
    p.add_argument("--block-size", metavar="N", type=parse_size, default=64 * 1024,
                   help="block size, a power of two from 512 to 64M (default: 64K)")
    p.add_argument("--algorithm", choices=("xxh3-64", "xxh3-128"), default="xxh3-128",
                   help="hash per block (default: xxh3-128)")
    p.add_argument("--threads", metavar="N", type=positive_int, default=None,
                   help="threads hashing in parallel (default: CPUs available, at most 8)")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object on standard output")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing but errors (no progress bar, no summary)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="draw a progress bar on stderr (default: when stderr is a terminal)")
    _remote_options(p)
    p.add_argument("--no-mmap", action="store_true",
                   help="read with pread() instead of hashing from mmap windows (slower; "
                        "for file systems that refuse mmap)")
    p.set_defaults(func=cmd_signature)

    p = sub.add_parser(
        "delta",
        formatter_class=fmt,
        help="write a delta that turns a base image into SOURCE",
        description=(
            "Compare SOURCE with a base image, given by its signature (--against) or as the\n"
            "image itself (--target), and write the blocks that differ as a delta (format:\n"
            "docs/FORMAT.md). The delta can be streamed: '-o -' writes it to standard output.\n"
            "Each record carries the hash of the base blocks it replaces, so 'pydr apply'\n"
            "refuses to write it onto anything but that base."
        ),
        epilog=(
            "examples:\n"
            "  pydr signature replica.img -o replica.sig --block-size 4K\n"
            "  pydr delta disk.img --against replica.sig -o disk.delta\n"
            "  pydr delta disk.img --target replica.img -o - | ssh dr 'pydr apply - replica.img'\n"
            "  pydr delta disk.img --target dr:/srv/replica.img -o dr:/srv/disk.delta\n\n"
            + EXIT_STATUS
        ),
    )
    p.add_argument("source", metavar="SRC", help="image whose content the delta produces")
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--against", metavar="SIGFILE", help="signature file of the base (xxh3-128)")
    base.add_argument("--target", metavar="DST", help="the base image itself")
    p.add_argument("-o", "--output", metavar="DELTA", required=True,
                   help="delta file to write ('-' for standard output)")
    p.add_argument("--block-size", metavar="N", type=parse_size, default=4096,
                   help="block size with --target (default: 4K); --against uses the signature's")
    p.add_argument("--threads", metavar="N", type=positive_int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object with the stats")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    _remote_options(p)
    p.set_defaults(func=cmd_delta)

    p = sub.add_parser(
        "apply",
        formatter_class=fmt,
        help="apply a delta to a target image, crash-safely",
        description=(
            "Apply DELTA ('-' for standard input) to TARGET. Before any block is\n"
            "overwritten, its old contents go to an undo journal beside the target\n"
            "(.NAME.pydr-undo; for block devices in $PYDR_JOURNAL_DIR, default\n"
            "/var/lib/pydr/journal), which is fsynced first. Every record is checked\n"
            "(checksums, order, and the hash of the target blocks it replaces) before\n"
            "it is written. On any error the target is restored and the journal removed.\n\n"
            "If an apply was interrupted (killed, power loss), running the same command\n"
            "again finishes it, and 'pydr rollback TARGET' instead restores the old\n"
            "contents exactly. Other pydr commands refuse such a target until then."
        ),
        epilog=("examples:\n"
                "  pydr apply disk.delta replica.img --verify\n"
                "  pydr apply disk.delta dr:/srv/replica.img     (applied by pydr on dr)\n"
                "  pydr apply dr:/srv/disk.delta replica.img\n\n" + EXIT_STATUS),
    )
    p.add_argument("delta", metavar="DELTA", help="delta file, or '-' for standard input")
    p.add_argument("target", metavar="TARGET", help="image file or block device to update")
    p.add_argument("--verify", action="store_true",
                   help="afterwards, read the whole target and check it equals the delta's result")
    p.add_argument("--json", action="store_true", help="print one JSON object with the stats")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    _remote_options(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser(
        "rollback",
        formatter_class=fmt,
        help="undo an interrupted apply or resync",
        description=("Restore TARGET's contents from before an interrupted apply or resync,\n"
                     "using its undo journal, then remove the journal."),
        epilog=EXIT_STATUS,
    )
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser(
        "resync",
        formatter_class=fmt,
        help="make TARGET equal to SOURCE, writing only the blocks that differ",
        description=(
            "Compare SOURCE and TARGET block by block (4 KiB by default, both hashed in\n"
            "parallel, window by window, so memory stays bounded) and write only the\n"
            "blocks that differ, through the same crash-safe undo journal as 'pydr apply'.\n"
            "TARGET grows or shrinks to SOURCE's size (block devices cannot be resized).\n"
            "With --signature-cache, a signature file of TARGET kept up to date by every\n"
            "resync that uses it, TARGET is not read at all."
        ),
        epilog=(
            "examples:\n"
            "  pydr resync disk.img /srv/replica/disk.img --stats\n"
            "  pydr resync /dev/vg/disk /dev/vg/replica --signature-cache replica.sig\n\n"
            + EXIT_STATUS
        ),
    )
    p.add_argument("source", metavar="SRC")
    p.add_argument("target", metavar="DST")
    p.add_argument("--signature-cache", metavar="FILE", default=None,
                   help="signature of DST: used when valid and newer than DST, then rewritten")
    _remote_options(p)
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
                   help="read back every written range and compare hashes before committing")
    p.add_argument("--block-size", metavar="N", type=parse_size, default=4096,
                   help="comparison block size (default: 4K)")
    p.add_argument("--threads", metavar="N", type=positive_int, default=None)
    p.add_argument("--stats", action="store_true", help="print the statistics, one per line")
    p.add_argument("--json", action="store_true", help="print one JSON object with the stats")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=cmd_resync)

    p = sub.add_parser(
        "info",
        formatter_class=fmt,
        help="describe and verify a pydr file",
        description=(
            "Read FILE, verify its checksums from end to end and describe it.\n"
            "A corrupt, truncated or foreign file is reported with the offset of\n"
            "the first problem and exit status 7."
        ),
        epilog=EXIT_STATUS,
    )
    p.add_argument("file", metavar="FILE", help="a pydr signature or delta file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "diff",
        formatter_class=fmt,
        help="list the byte ranges where two signatures differ",
        description=(
            "Compare two signatures of the same block size and algorithm and print\n"
            "the changed byte ranges, coalesced, one 'OFFSET<TAB>LENGTH' per line\n"
            "(a summary goes to standard error). Blocks beyond the shorter image\n"
            "count as changed."
        ),
        epilog=EXIT_STATUS,
    )
    p.add_argument("old", metavar="OLD", help="signature file")
    p.add_argument("new", metavar="NEW", help="signature file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("vault", formatter_class=fmt, help="create a vault",
                       description="Create a vault: the directory that holds pydr's replication "
                                   "state (SQLite, WAL),\nundo steps and signature caches.",
                       epilog=EXIT_STATUS)
    vsub = p.add_subparsers(dest="vault_command", metavar="init")
    vsub.required = True
    q = vsub.add_parser("init", help="create an empty vault in DIR")
    q.add_argument("dir", metavar="DIR")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_vault_init)

    p = sub.add_parser(
        "protect", formatter_class=fmt, help="protect a machine's disks (a protected item)",
        description=("Register ITEM: each --disk SOURCE=REPLICA is replicated from SOURCE (an image\n"
                     "or block device) to REPLICA. Items sharing --group are replicated together\n"
                     "and get recovery points with the same id. The first 'pydr replicate' is the\n"
                     "initial replication (a sparse-aware full copy); later ones move only changes.\n\n"
                     "A REPLICA may be [user@]host:/PATH on another machine, reached with --rsh\n"
                     "(kept with the item): its recovery-point steps are kept beside it there, its\n"
                     "points are materialised there ('--to host:DIR'), and failover brings the\n"
                     "machine up there."),
        epilog="examples:\n  pydr protect web --disk /img/web-os.img=/dr/web-os.img "
               "--disk /img/web-data.img=/dr/web-data.img --retention 48\n"
               "  pydr protect db --disk /dev/vg0/db=backup@dr:/srv/replicas/db.img "
               "--rsh 'ssh -p 2222'\n\n" + EXIT_STATUS)
    p.add_argument("item", metavar="ITEM")
    p.add_argument("--disk", action="append", required=True, metavar="SOURCE=REPLICA")
    p.add_argument("--group", metavar="G")
    p.add_argument("--retention", type=positive_int, default=24, metavar="N",
                   help="recovery points kept (default: 24)")
    p.add_argument("--retention-age", type=parse_duration, default=None, metavar="AGE",
                   help="also drop points older than AGE (e.g. 72h, 7d; the newest is always kept)")
    p.add_argument("--quiesce-hook", metavar="CMD", help="run before the cut (app-consistent points)")
    p.add_argument("--thaw-hook", metavar="CMD", help="run after the cut")
    _remote_options(p)
    _vault_options(p)
    p.set_defaults(func=cmd_protect)

    p = sub.add_parser(
        "replicate", formatter_class=fmt, help="run a replication cycle: ends in a recovery point",
        description=("Replicate ITEM (with the rest of its group), a --group, or --all items, and\n"
                     "record a recovery point. Each disk moves only the blocks that changed since the\n"
                     "last cycle (compared with the replica's signature cache), through the crash-safe\n"
                     "undo journal of 'pydr apply'; that journal is kept as the point's reverse delta."),
        epilog=EXIT_STATUS)
    p.add_argument("item", metavar="ITEM", nargs="?")
    p.add_argument("--group", metavar="G")
    p.add_argument("--all", action="store_true")
    p.add_argument("--app-consistent", action="store_true",
                   help="run the items' quiesce hooks before and thaw hooks after reading")
    p.add_argument("--resync", action="store_true",
                   help="compare both sides by checksum (re-read the replicas); needed for items "
                        "in state resync-required")
    p.add_argument("--retry", action="store_true",
                   help="retry recoverable errors (I/O, space, connection, timeout) at 1, 2, 4, 8 "
                        "and 10 minutes after the first attempt, then every 30 minutes")
    p.add_argument("--max-attempts", type=positive_int, default=None, metavar="N",
                   help="with --retry, give up after N attempts")
    _vault_options(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=cmd_replicate)

    p = sub.add_parser("points", formatter_class=fmt, help="list an item's recovery points",
                       description="List ITEM's recovery points, oldest first.", epilog=EXIT_STATUS)
    p.add_argument("item", metavar="ITEM")
    _vault_options(p)
    p.set_defaults(func=cmd_points)

    p = sub.add_parser("status", formatter_class=fmt, help="state, direction and health of items",
                       description="Show ITEM's (or every item's) state, direction and health.",
                       epilog=EXIT_STATUS)
    p.add_argument("item", metavar="ITEM", nargs="?")
    _vault_options(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("jobs", formatter_class=fmt, help="list jobs (also while they run)",
                       description="List every job: kind, item, state, progress and bytes moved.",
                       epilog=EXIT_STATUS)
    _vault_options(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser(
        "materialize", formatter_class=fmt, help="write a recovery point's disks into a directory",
        description=("Write each disk of ITEM as it was at recovery point P into DIR, named like\n"
                     "its replica. The replicas are not touched."), epilog=EXIT_STATUS)
    p.add_argument("item", metavar="ITEM")
    p.add_argument("--point", type=int, required=True, metavar="P")
    p.add_argument("--to", required=True, metavar="DIR",
                   help="a directory; host:DIR on the host that holds the item's replicas")
    _vault_options(p)
    p.set_defaults(func=cmd_materialize)

    point_help = "a point id, or latest, latest-processed, latest-app-consistent"
    p = sub.add_parser(
        "test-failover", formatter_class=fmt, help="DR drill: materialise a point into a directory",
        description=("Write ITEM's disks as they were at a recovery point into DIR (named like the\n"
                     "replicas), without touching the replicas or stopping replication. Remove it\n"
                     "with 'pydr cleanup-test-failover ITEM'."), epilog=EXIT_STATUS)
    p.add_argument("item", metavar="ITEM")
    p.add_argument("--to", required=True, metavar="DIR")
    p.add_argument("--point", default="latest-processed", metavar="P", help=point_help)
    _vault_options(p)
    p.set_defaults(func=cmd_test_failover)

    p = sub.add_parser("cleanup-test-failover", formatter_class=fmt,
                       help="remove what test-failover wrote", epilog=EXIT_STATUS)
    p.add_argument("item", metavar="ITEM")
    _vault_options(p)
    p.set_defaults(func=cmd_cleanup_test_failover)

    p = sub.add_parser(
        "failover", formatter_class=fmt, help="fail over to a recovery point",
        description=("Make ITEM's replica paths hold a recovery point. 'latest' (default) replicates\n"
                     "whatever the source still has first (lowest RPO; if that fails, the newest\n"
                     "point is used); 'latest-processed' takes the newest existing point. --planned\n"
                     "runs --shutdown-hook (which must succeed) and a final cycle: nothing is lost.\n"
                     "Until 'pydr commit', 'pydr change-point' can switch to another point."),
        epilog=EXIT_STATUS)
    p.add_argument("item", metavar="ITEM")
    p.add_argument("--point", default="latest", metavar="P", help=point_help)
    p.add_argument("--planned", action="store_true")
    p.add_argument("--shutdown-hook", metavar="CMD")
    _vault_options(p)
    p.set_defaults(func=cmd_failover)

    p = sub.add_parser("change-point", formatter_class=fmt,
                       help="after failover, switch the replicas to another point", epilog=EXIT_STATUS)
    p.add_argument("item", metavar="ITEM")
    p.add_argument("--point", required=True, metavar="P", help=point_help)
    _vault_options(p)
    p.set_defaults(func=cmd_change_point)

    p = sub.add_parser("commit", formatter_class=fmt,
                       help="make a failover final (discards the recovery points)", epilog=EXIT_STATUS)
    p.add_argument("item", metavar="ITEM")
    _vault_options(p)
    p.set_defaults(func=cmd_commit)

    p = sub.add_parser(
        "reprotect", formatter_class=fmt, help="after commit, replicate in the other direction",
        description=("Swap each disk's source and replica and replicate the other way. The old\n"
                     "source disks are reused as replicas: the first cycle compares both sides and\n"
                     "moves only the blocks that differ, never a full copy."), epilog=EXIT_STATUS)
    p.add_argument("item", metavar="ITEM")
    _vault_options(p)
    p.set_defaults(func=cmd_reprotect)

    p = sub.add_parser(
        "failback", formatter_class=fmt, help="planned failover back to the original site",
        description=("A planned failover in the reverse direction: --shutdown-hook (must succeed),\n"
                     "a final cycle, nothing lost. --alternate OLD=NEW brings a disk up at NEW\n"
                     "instead of its replica path OLD (left as it is). Then 'pydr commit' and\n"
                     "'pydr reprotect' give back the original direction."), epilog=EXIT_STATUS)
    p.add_argument("item", metavar="ITEM")
    p.add_argument("--alternate", action="append", metavar="OLD=NEW")
    p.add_argument("--shutdown-hook", metavar="CMD")
    _vault_options(p)
    p.set_defaults(func=cmd_failback)

    p = sub.add_parser(
        "plan", formatter_class=fmt, help="recovery plans: ordered groups of items",
        description=("Create a recovery plan, then run failover, test-failover, cleanup-test-failover,\n"
                     "commit, reprotect or failback over it: groups in order, the items of a group\n"
                     "in parallel, each group's --pre-hook before it and --post-hook after it. The\n"
                     "first failure stops the plan with a report of what ran and what did not."),
        epilog=("example:\n  pydr plan create shop --group db --post-hook ./wait-db.sh --group web1,web2\n"
                "  pydr plan failover shop --planned\n\n" + EXIT_STATUS))
    psub = p.add_subparsers(dest="plan_command", metavar="ACTION")
    psub.required = True
    q = psub.add_parser("create", help="define a plan")
    q.add_argument("plan", metavar="PLAN")
    for flag, text in (("--group", "ITEM[,ITEM...]: the next group, in order"),
                       ("--pre-hook", "CMD run before the last --group"),
                       ("--post-hook", "CMD run after the last --group")):
        q.add_argument(flag, action=_PlanGroupAction, metavar="X", help=text)
    _vault_options(q)
    q.set_defaults(func=cmd_plan_create)
    for op in ("failover", "test-failover", "cleanup-test-failover", "commit", "reprotect",
               "failback"):
        q = psub.add_parser(op, help=f"run {op} over a plan")
        q.add_argument("plan", metavar="PLAN")
        if op in ("failover", "test-failover"):
            q.add_argument("--point", default=None, metavar="P", help=point_help)
        if op == "failover":
            q.add_argument("--planned", action="store_true")
        if op in ("failover", "failback"):
            q.add_argument("--shutdown-hook", metavar="CMD")
        if op == "test-failover":
            q.add_argument("--to", required=True, metavar="DIR",
                           help="each item's disks go to DIR/ITEM/")
        _vault_options(q)
        q.set_defaults(func=cmd_plan_run, operation=op)

    p = sub.add_parser(
        "serve", formatter_class=fmt, help="the remote end of pydr's protocol (for ssh)",
        description=("Speak pydr's protocol (docs/PROTOCOL.md) on standard input and output, and\n"
                     "nothing else; run no other commands. With --root DIR, every path is resolved\n"
                     "inside DIR and anything outside it (.., absolute paths elsewhere, symlinks that\n"
                     "escape) is refused. Meant for a forced command in authorized_keys:\n"
                     "  command=\"pydr serve --stdio --root /srv/replicas\",restrict ssh-ed25519 ..."),
        epilog=EXIT_STATUS)
    p.add_argument("--stdio", action="store_true", required=True,
                   help="talk on standard input/output (the only transport)")
    p.add_argument("--root", metavar="DIR", help="confine every path to DIR")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "demo",
        formatter_class=fmt,
        help="run pydr's main job on a generated sample image",
        description=(
            "Disaster recovery of a machine with two real ext4 disks (mkfs.ext4 -d): protect\n"
            "them, change files (debugfs), replicate, drill a test failover, fail over\n"
            "(planned), commit, work at site B, reprotect (only differences move back) and\n"
            "fail back; each step with what moved and how long it took, checked with hashes\n"
            "and e2fsck -fn. Without e2fsprogs: the engine (sign, diff, resync, delta) on a\n"
            "generated image. Runs in a temporary directory that is removed afterwards unless\n"
            "--keep or --dir is given."
        ),
        epilog=EXIT_STATUS,
    )
    p.add_argument("--dir", metavar="DIR", default=None,
                   help="work in DIR (created if missing) and keep the files")
    p.add_argument("--size", metavar="SIZE", type=parse_size, default=256 << 20,
                   help="size of the sample image of the engine demo (without e2fsprogs; "
                        "default: 256M)")
    p.add_argument("--threads", metavar="N", type=positive_int, default=None,
                   help="threads hashing in parallel")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "json", False) and getattr(args, "output", None) == "-":
        parser.error("--json cannot be combined with -o - (both use standard output)")
    try:
        return args.func(args)
    except BaseException as exc:  # the one place errors meet the user
        if os.environ.get("PYDR_DEBUG"):
            raise
        return report_error(exc)


def report_error(exc):
    if isinstance(exc, SystemExit):
        raise exc
    if isinstance(exc, BrokenPipeError):
        # e.g. `pydr diff ... | head`: not an error worth a message
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    if isinstance(exc, E.PydrError):
        message = str(exc)
    elif isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else ""
        if exc.filename2 is not None:
            where = f"{where} -> {exc.filename2}"
        message = f"{where}: {exc.strerror}" if where else (exc.strerror or str(exc))
    elif isinstance(exc, KeyboardInterrupt):
        message = "interrupted"
    elif isinstance(exc, ValueError):
        print(f"pydr: {exc}", file=sys.stderr)
        return E.EXIT_USAGE
    else:
        message = (
            f"internal error: {type(exc).__name__}: {exc} "
            "(please report it; PYDR_DEBUG=1 shows a traceback)"
        )
    print(f"pydr: {message}", file=sys.stderr)
    return E.exit_code_for(exc)


if __name__ == "__main__":
    sys.exit(main())

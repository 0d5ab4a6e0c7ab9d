"""What every command family of the CLI shares: the exit statuses, sizes and
durations, the progress bar, JSON output, the option blocks (each declared
once here), and the one function that turns an exception into a line on
stderr and an exit status."""

import argparse
import contextlib
import os
import sys
import time

from .. import errors as E

EXIT_STATUS = """\
exit status:
  0    success
  1    internal error (a bug: please report it; PYDR_DEBUG=1 shows a traceback)
  2    usage error: bad option or argument
  3    file or directory not found
  4    permission denied, read-only file system, or a wrong or missing passphrase
  5    I/O error
  6    no space left on device
  7    corrupt, truncated or foreign pydr file
  8    incompatible inputs (e.g. signatures of different block sizes)
  9    a file changed while it was being read
  10   not a regular file or block device (a directory, a FIFO, ...)
  11   an interrupted apply is pending on the target (pydr apply again, or pydr rollback)
  12   the target holds the delta's result where it writes, but differs elsewhere
       (a target holding all of the result is left alone: exit 0, "already holds")
  13   source and target are the same file
  14   not a vault, the vault is locked by another pydr, or its database is
       damaged ('pydr vault check' says where)
  15   the operation is not valid in the item's current state
  16   a quiesce, thaw or shutdown hook failed
  17   a recovery plan stopped (its report says where)
  18   the remote side broke pydr's protocol, or died, refused the connection or
       never started (the message carries ssh's own words)
  19   changed-block tracking was lost (a dirty bitmap is missing or in use): the
       item needs 'pydr replicate ITEM --resync'
  20   a fleet could not reach its Dask scheduler, or an item's work on it failed
       (no worker for its host, ...): 'pydr status' says why
  21   a cycle over several items (or groups) finished with some failed: the others
       got their points; each failed item is named, and --json gives every
       item's outcome with the exit code of its own error
  22   libvirt could not do what the machine needs (unreachable, domain gone or
       replaced, checkpoint or backup refused, define or start failed), or a
       bring-up hook failed
  23   the recovered machine failed its verification (the failed probe is named;
       the result is recorded on the point)
  130  interrupted or cancelled
"""

POINT_HELP = "a point id, or latest, latest-processed, latest-app-consistent"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's layout, sized to the terminal without importing shutil (and
    with it zlib, bz2 and lzma): argparse makes a formatter for every option
    it adds, so that import would cost every command ~2 ms."""

    def __init__(self, prog, **kwargs):
        kwargs.setdefault("width", _columns() - 2)
        super().__init__(prog, **kwargs)


def _columns():
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 80


def command(sub, name, *, help, description, examples, func, **kwargs):
    """A subcommand whose --help reads like a man page: what it does, its
    options, examples, and the exit statuses."""
    text = "examples:\n" + "".join(f"  {e}\n" for e in examples) + "\n" + EXIT_STATUS
    p = sub.add_parser(name, help=help, description=description, epilog=text,
                       formatter_class=HelpFormatter, **kwargs)
    p.set_defaults(func=func)
    return p


# -- option blocks ----------------------------------------------------------------


def add_json(p, what="print the result as JSON on standard output (its shapes: docs/JSON.md)"):
    p.add_argument("--json", action="store_true", help=what)


def add_progress(p):
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="draw a progress bar on stderr (default: when stderr is a terminal)")


def add_events(p):
    """--events: every Event of the operation as a JSON line on stderr."""
    p.add_argument("--events", action="store_true",
                   help="write each event of the operation (item, disk, job, phase, bytes "
                        "done and total; docs/JSON.md) as one JSON object a line on standard "
                        "error, instead of the progress bar")


def add_method(p, *, change_point=False):
    """How a point's disks are made: --as qcow2, --copy or --reflink."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--as", dest="as_format", choices=("raw", "qcow2"), default=None,
                   help="qcow2: each disk is a qcow2 overlay backed by the replica "
                        "(its baseline after a failover) that holds only the blocks that "
                        "differ, on any file system; for VMs QEMU runs. raw (default): a "
                        "raw disk, cloned (reflink) where the file system can, else copied"
                        + ("; by default as the failover made them" if change_point else ""))
    g.add_argument("--copy", action="store_true",
                   help="copy the disks even where the file system could clone them")
    g.add_argument("--reflink", action="store_true",
                   help="clone the disks (XFS with reflink=1, btrfs), or fail")
    add_progress(p)


def method_of(args, default="auto"):
    if getattr(args, "as_format", None) == "qcow2":
        return "qcow2"
    if getattr(args, "copy", False):
        return "copy"
    if getattr(args, "reflink", False):
        return "reflink"
    return "auto" if getattr(args, "as_format", None) == "raw" else default


def add_output_options(p):
    """-q and --progress: what a long command shows while it works."""
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing but errors (no progress bar, no summary)")
    add_progress(p)


def add_threads(p):
    p.add_argument("--threads", metavar="N", type=positive_int, default=None,
                   help="threads hashing in parallel (default: CPUs available, at most 8)")


def add_block_size(p, default, what):
    p.add_argument("--block-size", metavar="N", type=parse_size, default=default, help=what)


def add_remote_options(p):
    p.add_argument("--rsh", metavar="CMD", default=None,
                   help="how to reach the [user@]host:PATH arguments: runs "
                        "'CMD host REMOTE_PYDR serve --stdio' (default: ssh)")
    p.add_argument("--remote-pydr", metavar="PATH", default=None,
                   help="pydr on the remote side (default: pydr)")


FORMATS = ("raw", "qcow2", "vmdk", "vhdx", "vpc", "vdi")


def add_format(p, flag="--format", what="IMAGE"):
    p.add_argument(flag, metavar="FMT", choices=FORMATS, default=None,
                   help=f"the disk format of {what} (default: detected from its first bytes; "
                        f"QEMU formats are read through a qemu-nbd pydr starts): "
                        f"{', '.join(FORMATS)}")


def add_vault_dir(p):
    """--vault DIR."""
    p.add_argument("--vault", metavar="DIR", help="vault directory (default: $PYDR_VAULT)")


def add_passphrase_file(p):
    """--passphrase-file FILE: the passphrase of the encrypted object stores
    a vault command opens (:func:`given_passphrase`)."""
    p.add_argument("--passphrase-file", metavar="FILE", default=None,
                   help="the passphrase of the item's encrypted object store: the file's "
                        "contents, one trailing newline stripped (default: "
                        "$PYDR_PASSPHRASE_FILE, else $PYDR_PASSPHRASE). Never on the command "
                        "line; never kept in the vault")


def given_passphrase(args):
    """The passphrase of --passphrase-file (read now: a missing file is said
    before the vault is opened), or None: the environment's, read when an
    encrypted store is opened (pydr.dr.objectstore.chunk_store_at)."""
    path = getattr(args, "passphrase_file", None)
    if path is None:
        return None
    from ..dr.storekeys import passphrase_from

    return passphrase_from(path)


def add_vault_options(p, writer=True):
    """--vault and --json, which every vault command takes, and --lock-wait
    for one that may change the vault (`writer`): a reader never waits; and
    --passphrase-file, for the encrypted object stores it opens."""
    add_vault_dir(p)
    add_passphrase_file(p)
    if writer:
        p.add_argument("--lock-wait", type=_seconds, metavar="SECONDS", default=None,
                       help="a command that changes the vault waits this long for another's "
                            "lock (default $PYDR_LOCK_WAIT, else 0; 600 while pydr run serves "
                            "the vault)")
    add_json(p, "print one JSON object")


def add_item(p, what="the protected item", optional=False):
    p.add_argument("item", metavar="ITEM", help=what, nargs="?" if optional else None)


def reach(args):
    """How to reach the [user@]host:PATH arguments of a command."""
    return {"rsh": getattr(args, "rsh", None), "remote_pydr": getattr(args, "remote_pydr", None)}


def vault_dir(args):
    directory = args.vault or os.environ.get("PYDR_VAULT")
    if not directory:
        raise ValueError("no vault: give --vault DIR or set PYDR_VAULT")
    return directory


# -- values -----------------------------------------------------------------------

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


def _seconds(text):
    """'0', '30', '5m' -> seconds >= 0 (--lock-wait)."""
    return 0.0 if text.strip() in ("0", "0s") else parse_duration(text)


def lock_wait_seconds(text, where):
    """$PYDR_LOCK_WAIT's seconds; ValueError (exit 2) naming `where` otherwise."""
    try:
        return _seconds(text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{where}: {exc}") from None


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


def timestamp(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) if t else None


# -- output -----------------------------------------------------------------------


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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_bar(label, args):
    """The bar for a command: shown on a terminal unless -q or --no-progress."""
    show = args.progress if getattr(args, "progress", None) is not None else sys.stderr.isatty()
    return ProgressBar(label, show and not getattr(args, "quiet", False))


class EventOutput:
    """The ``events=`` sink of a vault command: with --events each Event's
    to_dict() as one JSON line on stderr; else the progress bar, drawn from
    the "progress" Events that count bytes. Called from the threads of a
    plan's items too: one line at a time. ``also``: more sinks (a fleet's
    line) given every Event."""

    def __init__(self, label, args, *, also=(), bar=True):
        import threading

        self.json = bool(getattr(args, "events", False))
        self.bar = progress_bar(label, args)
        self.bar.enabled = self.bar.enabled and bar and not self.json
        self.label = label
        self.also = [s for s in also if s is not None]
        self.lock = threading.Lock()
        self.started = {}  # (item, disk, phase) -> monotonic time of its first event

    def __call__(self, event):
        with self.lock:
            if self.json:
                import json

                sys.stderr.write(json.dumps(event.to_dict()) + "\n")  # type and version first
                sys.stderr.flush()
            elif self.bar.enabled and event.kind == "progress" and event.bytes_total:
                self._draw(event)
        for sink in self.also:
            sink(event)

    def _draw(self, event):
        from ..engine.progress import ProgressRecord

        key = (event.item, event.disk, event.phase)
        first = self.started.setdefault(key, time.monotonic())
        where = " ".join(str(x) for x in (event.item, f"disk {event.disk}"
                                          if event.disk is not None else None, event.phase) if x)
        self.bar.label = f"{self.label} {where}" if where else self.label
        self.bar(ProgressRecord(event.operation, event.path, event.bytes_done or 0,
                                event.bytes_total, None, time.monotonic() - first))

    def close(self):
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def print_json(obj):
    import json  # lazily: a millisecond of start-up for every command otherwise

    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def print_fields(result):
    """--stats: one 'name value' line per field."""
    for k, v in result.items():
        print(f"{k.replace('_', ' '):<16} {v}")


# -- errors -----------------------------------------------------------------------


class _GuardedOutput:
    """Our standard output (text, or its binary buffer) whose broken pipe
    says it is ours: StdoutClosed, the one quiet error of report_error. A
    broken pipe anywhere else (a peer, a helper process) stays an error."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        try:
            return self._f.write(data)
        except BrokenPipeError as exc:
            raise E.StdoutClosed(exc.errno, exc.strerror, "<stdout>") from None

    def flush(self):
        try:
            self._f.flush()
        except BrokenPipeError as exc:
            raise E.StdoutClosed(exc.errno, exc.strerror, "<stdout>") from None

    @property
    def buffer(self):
        return _GuardedOutput(self._f.buffer)

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def guarded_stdout():
    """While a command runs, a broken pipe on sys.stdout is StdoutClosed."""
    real = sys.stdout
    sys.stdout = _GuardedOutput(real) if real is not None else real
    try:
        yield
    finally:
        if isinstance(sys.stdout, _GuardedOutput):
            sys.stdout = real


def report_error(exc):
    """The one place errors meet the user: one line on stderr, then the
    error's hint (advice: the command that gets further), if it has one, on
    a line of its own ("hint: ..."), and the exit status of the
    exception's class (EXIT_STATUS)."""
    if isinstance(exc, SystemExit):
        raise exc
    if isinstance(exc, E.StdoutClosed):
        # e.g. `pydr diff ... | head`: not an error worth a message
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    hint = None
    if isinstance(exc, E.PydrError):
        message, hint = str(exc), exc.hint
        if isinstance(exc, E.VaultDamaged) and exc.path and hint is None:
            vault = os.path.dirname(exc.path) or "."
            hint = f"run 'pydr vault check {vault}' to see what is damaged"
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
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return E.exit_code_for(exc)


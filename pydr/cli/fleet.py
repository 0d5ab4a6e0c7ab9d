"""Fleets on Dask distributed: ``pydr worker``, and the --scheduler options
that replicate and plan commands share (docs/SCALE.md)."""

import argparse
import contextlib
import os
import sys
import time

from ..errors import FleetError
from .common import command, human_bytes, positive_int, progress_bar


def add_fleet_options(p):
    g = p.add_argument_group("fleet (Dask distributed; docs/SCALE.md)")
    g.add_argument("--scheduler", metavar="ADDR",
                   help="run each item's work on its host's Dask workers (tcp://HOST:8786); "
                        "this process stays the vault's one writer")
    g.add_argument("--host-timeout", type=float, default=300.0, metavar="S",
                   help="with --scheduler: items of a host that has had no worker for S seconds "
                        "fail with 'no worker for host NAME' (default: 300); the scheduler "
                        "must answer within min(S, 30) s")



class FleetProgress:
    """A fleet's Events (pydr.dr.events) shown as one self-rewriting line on
    a terminal: items back of items submitted, disks, bytes and rate. With
    --events the command prints every Event as JSON instead (EventOutput),
    and this line stays quiet."""

    def __init__(self, args):
        import threading

        self.line = progress_bar("fleet", args).enabled and not getattr(args, "events", False)
        self.drawn = False
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self.counts = {"items": 0, "done": 0, "disks": 0, "bytes": 0}

    def __call__(self, event):
        c = self.counts
        with self.lock:
            if event.phase == "submitted":
                c["items"] += 1
            elif event.kind == "progress" and event.phase == "transfer":
                if event.disk is not None:
                    c["disks"] += 1
                elif event.bytes_done is not None:  # an item's task is back
                    c["done"] += 1
                    c["bytes"] += event.bytes_done
            else:
                return
            if not self.line:
                return
            rate = c["bytes"] / max(time.monotonic() - self.start, 1e-9)
            sys.stderr.write(f"\rfleet {c['done']}/{c['items']} items, {c['disks']} disks, "
                             f"{human_bytes(c['bytes'])}, {human_bytes(rate)}/s ")
            sys.stderr.flush()
            self.drawn = True

    def close(self):
        if self.drawn:
            sys.stderr.write("\n")


@contextlib.contextmanager
def open_fleet(args):
    """The Fleet that --scheduler names (None without it), closed after."""
    if not getattr(args, "scheduler", None):
        yield None
        return
    from ..dr.fleet import Fleet

    shown = FleetProgress(args)
    try:
        with Fleet(args.scheduler, host_timeout=args.host_timeout, events=shown) as fleet:
            yield fleet
    finally:
        shown.close()


def cmd_worker(args):
    try:
        import distributed  # noqa: F401  (only to say what is missing)
    except ImportError:
        raise FleetError("pydr worker needs Dask distributed: pip install 'pydr[fleet]'") from None
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", args.host):
        raise ValueError(f"invalid host name {args.host!r}: letters, digits, '.', '_' and '-'")
    extra = list(args.dask_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    # -P: a worker started in a source checkout imports the installed pydr, not the checkout
    safe = ["-P"] if sys.version_info >= (3, 11) else []
    argv = [sys.executable, *safe, "-m", "distributed.cli.dask_worker", args.scheduler,
            "--resources", f"pydr-host-{args.host}={args.slots}", "--nthreads", str(args.slots),
            *extra]
    if args.dry_run:
        print(" ".join(argv))
        return 0
    sys.stdout.flush()
    os.execv(sys.executable, argv)


def register(sub):
    p = command(
        sub, "worker", help="run a Dask worker that replicates the items of one host",
        description=(
            "Start a Dask worker (Dask's own 'dask worker') for host NAME: it carries the\n"
            "resource pydr-host-NAME=N, so it runs the cycles of the items protected with\n"
            "--host NAME, N at a time. Run one (or more) on every host that holds protected\n"
            "disks; the coordinator ('pydr replicate --scheduler ADDR', 'pydr plan ...\n"
            "--scheduler ADDR') holds the vault and records what the workers return.\n\n"
            "It is the same as: dask worker ADDR --resources pydr-host-NAME=N --nthreads N\n"
            "Arguments after -- go to dask worker as they are (--nanny/--no-nanny,\n"
            "--local-directory, --name, ...). A worker needs pydr and distributed, the\n"
            "item's source paths, and the item's replicas (on a shared path, or\n"
            "host:PATH over ssh): docs/SCALE.md."),
        examples=["dask scheduler --port 8786                       (once, on the coordinator)",
                  "pydr worker --scheduler tcp://dr-manager:8786 --host hv01",
                  "pydr worker --scheduler tcp://dr-manager:8786 --host hv02 --slots 4",
                  "pydr worker --scheduler tcp://10.0.0.5:8786 --host hv03 -- --no-nanny "
                  "--local-directory /var/tmp",
                  "pydr replicate --all --scheduler tcp://dr-manager:8786"],
        func=cmd_worker)
    p.add_argument("--scheduler", required=True, metavar="ADDR", help="the Dask scheduler")
    p.add_argument("--host", required=True, metavar="NAME",
                   help="the host this worker serves (as given to 'pydr protect --host')")
    p.add_argument("--slots", type=positive_int, default=1, metavar="N",
                   help="cycles run at once on this host (default: 1)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the dask worker command instead of running it")
    p.add_argument("dask_args", nargs=argparse.REMAINDER, metavar="-- DASK-WORKER-ARGS",
                   help="passed to dask worker")

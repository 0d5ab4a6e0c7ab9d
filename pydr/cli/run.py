"""pydr run: the service that keeps every item inside its target RPO
(pydr.dr.service). Signals: SIGTERM or SIGINT ends it after the running
cycles (a second one cancels them), SIGHUP re-reads the policies."""

import dataclasses
import json
import signal
import sys
import threading

from .common import (add_json, add_passphrase_file, add_vault_dir, command, given_passphrase,
                     positive_int, print_json, vault_dir)

DESCRIPTION = """\
Keep every protected item inside its target RPO: a service over the vault
(docs/SERVICE.md). Each round opens the vault, replicates the items that are
due -- an item is due when its newest point's data age plus its last cycle's
duration reaches half its target ('pydr policy ITEM --rpo 5m'), or when it has
no point yet -- at most --jobs at once, records failures with their retry
time (1, 2, 4, 8, 10 minutes, then every 30, but at most half the target,
at least 5 s), schedules the resync of an item
in state resync-required, checks each item's RPO health (alert commands run on
a change), and closes the vault so that operator commands get in between.
Items without a target are not scheduled; items failed over, committed or
under a test failover are paused until reprotect or cleanup.

It runs in the foreground. One service per vault (run.lock in the vault).
An operator command (failover, test-failover, commit, ...) that finds the
vault busy waits for the running cycle (--lock-wait, default 600 s when the
holder is pydr run) and goes before the service's next round.

Signals: SIGTERM or SIGINT: the running cycles finish, then exit 0; a second
one cancels them (they end as a kill leaves them; the next run finishes them).
SIGHUP: re-read the policies now.

The passphrase of encrypted object stores: --passphrase-file FILE, else
PYDR_PASSPHRASE_FILE, else PYDR_PASSPHRASE. A file is read again at each round:
after 'pydr key passwd', update the file (no restart). A cycle whose store does
not open fails saying how to give it, and the item's RPO health turns critical
at once (an alert). Under systemd (Type=notify) it sends
READY=1 after its first round, STATUS, WATCHDOG=1 and STOPPING=1.

--once runs one round and exits: 0 when every due cycle succeeded (or none was
due), the failed item's exit status for one, 21 for several, 130 when a
signal stopped it before every due cycle began (for cron).
--events prints every event (each cycle's, a "started" and "finished" per
round, a "health" per RPO health change) as a JSON line on standard output,
flushed per line."""

EXAMPLES = [
    "pydr policy web --rpo 5m && pydr run --vault /srv/pydr-vault",
    "pydr run --jobs 4 --metrics 127.0.0.1:9477",
    "pydr run --once --json                 one round, for cron",
    "*/5 * * * * pydr run --once --vault /srv/pydr-vault   (a crontab line)",
    "ExecStart=/usr/bin/pydr run --vault /srv/pydr-vault   (a systemd unit, Type=notify;"
    " examples/pydr-run.service)",
    "pydr run --events | jq -c 'select(.kind==\"health\")'",
]


class _LineEvents:
    """--events: each Event as one JSON line on standard output, flushed
    (from the cycles' threads too: one line at a time)."""

    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, event):
        self.write_line(event.to_dict())

    def write_line(self, obj):
        line = json.dumps(obj) + "\n"
        with self.lock:
            sys.stdout.write(line)
            sys.stdout.flush()


class _SaysMetrics:
    """--metrics: at the first round's "started" event (the port is bound by
    then: Service.metrics_port), one line on standard error naming the
    metrics' URL, which that event's message names too; every event then
    goes on to `sink` (None: none)."""

    def __init__(self, sink):
        self.sink, self.service, self.said = sink, None, False

    def __call__(self, event):
        if not self.said and event.operation == "run" and event.kind == "started" \
                and self.service is not None and self.service.metrics_port is not None:
            self.said = True
            host = self.service.metrics_address[0]
            host = f"[{host}]" if ":" in host else host
            url = f"http://{host}:{self.service.metrics_port}/metrics"
            print(f"pydr run: metrics at {url}", file=sys.stderr, flush=True)
            event = dataclasses.replace(event, message=f"{event.message}; metrics at {url}")
        if self.sink is not None:
            self.sink(event)


def _install_signals(service):
    """SIGTERM/SIGINT: stop (finish), a second: cancel; SIGHUP: reload.
    The previous handlers, to restore."""
    count = {"stops": 0}

    def on_stop(signum, frame):
        count["stops"] += 1
        service.stop(finish=count["stops"] == 1)

    def on_hup(signum, frame):
        service.reload()

    old = {}
    for sig, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop),
                         (signal.SIGHUP, on_hup)):
        old[sig] = signal.signal(sig, handler)
    return old


def _passphrase_file(args):
    """--passphrase-file, checked now (a missing file is said at once) and
    given to the service as a path: it reads the file again each round, so
    a `pydr key passwd` and an update of the file need no restart."""
    given_passphrase(args)
    return getattr(args, "passphrase_file", None)


def cmd_run(args):
    from ..dr.service import Service

    if args.json and not args.once:
        raise ValueError("--json goes with --once (the service's events: --events)")
    sink = _LineEvents() if args.events else None
    says = _SaysMetrics(sink) if args.metrics is not None else None
    service = Service(vault_dir(args), jobs=args.jobs, scheduler=args.scheduler,
                      metrics=args.metrics, events=says or sink, warm=args.warm,
                      passphrase_file=_passphrase_file(args))
    if says is not None:
        says.service = service
    old = _install_signals(service)
    try:
        if args.once:
            result = service.run_once()
            if args.json and args.events:  # standard output stays one JSON object a line
                sink.write_line(result.to_dict())
            elif args.json:
                print_json(result.to_dict())
            elif not args.events:
                _print_round(result)
            return result.exit_code()
        service.run()
        return 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _print_round(result):
    for name in result.succeeded:
        print(f"{name}: replicated")
    for name, error in result.failed.items():
        print(f"{name}: failed: {error}", file=sys.stderr)
    for name, why in result.skipped.items():
        print(f"{name}: {why}")
    if not (result.succeeded or result.failed or result.skipped):
        print("no protected items")


def register(sub):
    p = command(sub, "run", help="the service that keeps every item inside its target RPO",
                description=DESCRIPTION, examples=EXAMPLES, func=cmd_run)
    add_vault_dir(p)
    add_passphrase_file(p)
    p.add_argument("--jobs", type=positive_int, default=2, metavar="N",
                   help="items (or groups) replicated at once (default 2)")
    p.add_argument("--scheduler", metavar="ADDR",
                   help="a Dask scheduler: run the cycles on the items' hosts (docs/SCALE.md)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics there (port 0: any free port)")
    p.add_argument("--once", action="store_true",
                   help="run one round of what is due now, then exit with its outcome")
    p.add_argument("--events", action="store_true",
                   help="print every event as one JSON object a line on standard output "
                        "(docs/JSON.md), flushed per line")
    p.add_argument("--no-warm", dest="warm", action="store_false",
                   help="start every cycle cold (no state kept between cycles)")
    add_json(p, "with --once: print the round's result as one JSON object (with --events: as "
                "the last line)")

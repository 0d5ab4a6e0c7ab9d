"""The fixed cost of a one-shot tracked cycle, part by part.

    python benchmarks/cycle_cost.py [--dir DIR] [--size 16G] [--allocated 2G]
                                    [--changed 16] [--repeat 5] [--full]

A qcow2 image of --size with --allocated bytes of random data (4 MiB runs
spread over the disk) is protected with --cbt and copied once. Each round
then writes --changed scattered 4 KiB blocks into the image (one qemu-io
process: its persistent dirty bitmap records them, as a guest's writes
would) and runs `pydr replicate vm` as a whole process twice, interleaved:

  * plain, timed from outside: the figure a user sees;
  * instrumented (this script re-run as a child with --child): every part
    of the cycle timed by wrapping the functions that do it, each part's
    own time only (a part that calls another does not count the callee's):
    interpreter start and exit (the process's wall time minus the time
    from the first line of this script to the end of the command),
    imports (every module executed, at start and lazily), vault open,
    tracker validate / normalize / commit, each qemu-img call by its
    operation, qemu-nbd start / connect / stop, the signature cache (open
    and verify, read, write and commit), the resync's own work, the point's
    vault transaction, and what is left ("other Python").

The plain run's CPU time (user + system, with its children: qemu-img,
qemu-nbd) is printed too: on a shared machine it moves less than wall time.

--full also protects the same image without --cbt in a second vault and
times its cycles (comparing the whole disk) for the speed-up. Medians of
--repeat rounds; the replica is compared with the image (qemu-img compare)
at the end. Prints Markdown. The machine's load average is printed with it:
timings of a shared machine are noisy.
"""

import time

_STARTED = time.perf_counter()  # the child's clock starts before this script's own imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

MiB = 1 << 20

#: (module, attribute path, part) wrapped in the instrumented child; a name
#: that does not exist (another version of pydr) is skipped
PARTS = [
    ("pydr.dr.vault", "Vault.__init__", "vault open"),
    ("pydr.dr.tracking", "Tracker.validate", "tracker validate"),
    ("pydr.dr.tracking", "Tracker.normalize", "tracker normalize"),
    ("pydr.dr.tracking", "Tracker.commit", "tracker commit (drop the frozen bitmap)"),
    ("pydr.dr.tracking", "Tracker.dirty_extents", "dirty extents (NBD block status)"),
    ("pydr.transport.qemu", "qemu_img", None),  # labelled by its operation
    ("pydr.transport.qemu", "QemuNbd.__init__", "qemu-nbd start"),
    ("pydr.transport.qemu", "QemuNbd.connect", "qemu-nbd connect"),
    ("pydr.transport.qemu", "QemuNbd.close", "qemu-nbd stop"),
    ("pydr.engine.resync", "resync", "resync (sign, compare, write)"),
    ("pydr.engine.resync", "_open_cache", "signature cache: open + verify"),
    ("pydr.engine.resync", "check_no_lost_records", "signature cache: open + verify"),
    ("pydr.engine.sigstream", "SignatureReader.read", "signature cache: read"),
    ("pydr.engine.sigstream", "SignatureWriter.__init__", "signature cache: write"),
    ("pydr.engine.sigstream", "SignatureWriter.write", "signature cache: write"),
    ("pydr.engine.sigstream", "SignatureWriter.commit", "signature cache: write"),
    ("pydr.engine.sigcache", "SignatureCache.open", "signature cache: open + verify"),
    ("pydr.engine.sigcache", "SignatureCache.create", "signature cache: write"),
    ("pydr.engine.sigcache", "SignatureCache.read", "signature cache: read"),
    ("pydr.engine.sigcache", "SignatureCache.all_zero", "signature cache: read"),
    ("pydr.engine.sigcache", "SignatureCache.update", "signature cache: write"),
    ("pydr.engine.sigcache", "SignatureCache.commit", "signature cache: write"),
    ("pydr.dr.cyclerecord", "record_point", "vault commit (the point)"),
]


# -- the instrumented child ---------------------------------------------------------

class _Clock:
    """Own time by part: a stack of running parts; a part's elapsed time is
    taken out of its caller's."""

    def __init__(self):
        self.stack, self.own, self.calls = [], {}, {}

    def timed(self, label, fn, *args, **kwargs):
        frame = [label, time.perf_counter(), 0.0]
        self.stack.append(frame)
        try:
            return fn(*args, **kwargs)
        finally:
            self.stack.pop()
            spent = time.perf_counter() - frame[1]
            self.own[label] = self.own.get(label, 0.0) + spent - frame[2]
            self.calls[label] = self.calls.get(label, 0) + 1
            if self.stack:
                self.stack[-1][2] += spent


def _qemu_img_label(args):
    op = str(args[0]) if args else "?"
    if op == "bitmap":
        ops = [a for a in map(str, args[1:]) if a.startswith("--") and a != "--image-opts"]
        op += " " + " ".join(ops)
    return f"qemu-img {op}"


def _wrap(clock, module, attr, label):
    owner = module
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p, None)
        if owner is None:
            return
    fn = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if fn is None:
        return
    kind = type(fn) if isinstance(fn, (classmethod, staticmethod)) else None
    inner = fn.__func__ if kind else fn

    def wrapper(*args, **kwargs):
        if label is None:  # qemu_img(*args)
            return clock.timed(_qemu_img_label(args), inner, *args, **kwargs)
        return clock.timed(label, inner, *args, **kwargs)

    wrapper.__wrapped__ = inner
    setattr(owner, name, kind(wrapper) if kind else wrapper)


def child(argv):
    """Run `pydr ARGV` in this process with every part timed; write the
    parts as JSON to the file named by $CYCLE_COST_OUT."""
    import importlib.abc
    import importlib.machinery

    begin = _STARTED
    clock = _Clock()
    wanted = {}
    for module, attr, label in PARTS:
        wanted.setdefault(module, []).append((attr, label))

    class TimedLoader(importlib.abc.Loader):
        def __init__(self, loader):
            self.loader = loader

        def create_module(self, spec):
            return self.loader.create_module(spec)

        def exec_module(self, module):
            clock.timed("imports", self.loader.exec_module, module)
            for attr, label in wanted.get(module.__name__, ()):
                _wrap(clock, module, attr, label)

        def __getattr__(self, name):
            return getattr(self.loader, name)

    class TimedFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = TimedLoader(spec.loader)
                    return spec
            return None

    sys.meta_path.insert(0, TimedFinder())
    code = 0
    try:
        from pydr.cli import main

        code = clock.timed("cli", main, argv)
    except SystemExit as exc:
        code = exc.code
    inside = time.perf_counter() - begin
    parts = dict(clock.own)
    # "other Python": the CLI's own work, and this script's imports and set-up
    parts["other Python"] = parts.pop("cli", 0.0) + (inside - sum(clock.own.values()))
    with open(os.environ["CYCLE_COST_OUT"], "w") as f:
        json.dump({"inside": inside, "parts": parts, "calls": clock.calls, "code": code}, f)
    return code


# -- the benchmark ------------------------------------------------------------------

def parse_size(text):
    return int(float(text[:-1]) * (1 << {"K": 10, "M": 20, "G": 30, "T": 40}[text[-1].upper()]))


def make_qcow2(path, size, allocated, seed=1):
    """A qcow2 of `size` with `allocated` bytes of random data in 4 MiB runs
    spread evenly over the disk."""
    import numpy as np

    raw = path + ".raw"
    rng = np.random.default_rng(seed)
    runs = max(1, allocated // (4 * MiB))
    stride = size // runs // MiB * MiB
    with open(raw, "wb") as f:
        f.truncate(size)
        for i in range(runs):
            f.seek(i * stride)
            f.write(rng.bytes(4 * MiB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    os.unlink(raw)


def scribble(image, size, blocks, seed):
    """`blocks` scattered 4 KiB writes into the image, by one qemu-io (its
    persistent dirty bitmaps record them)."""
    if not blocks:
        return 0
    rng = random.Random(seed)
    offsets = rng.sample(range(size // 4096), blocks)
    cmds = []
    for off in offsets:
        cmds += ["-c", f"write -P {rng.randrange(1, 256)} {off * 4096} 4k"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, image], check=True,
                   stdout=subprocess.DEVNULL)
    return blocks * 4096


#: CPU seconds (user + system) of the last timed_run, its children included
#: (qemu-img, qemu-nbd): less moved by the machine's load than the wall time
LAST_CPU = [0.0]


def timed_run(cmd, env=None):
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    LAST_CPU[0] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall


def instrumented(pydr_python, argv, workdir):
    out = os.path.join(workdir, "parts.json")
    env = dict(os.environ, CYCLE_COST_OUT=out)
    wall = timed_run([pydr_python, os.path.abspath(__file__), "--child", "--", *argv], env=env)
    with open(out) as f:
        got = json.load(f)
    if got["code"] not in (0, None):
        raise SystemExit(f"pydr {' '.join(argv)} exited {got['code']}")
    got["parts"]["interpreter start + exit"] = wall - got["inside"]
    got["wall"] = wall
    return got


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/pydr-cycle-cost")
    ap.add_argument("--size", default="16G")
    ap.add_argument("--allocated", default="2G")
    ap.add_argument("--changed", type=int, default=16, help="4 KiB blocks written per round")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--full", action="store_true",
                    help="also time cycles comparing the whole disk (a vault without --cbt)")
    ap.add_argument("--keep", action="store_true", help="keep the image between runs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.argv)

    pydr = shutil.which("pydr") or os.path.join(os.path.dirname(sys.executable), "pydr")
    python = sys.executable
    size, allocated = parse_size(args.size), parse_size(args.allocated)
    d = args.dir
    image = os.path.join(d, "vm.qcow2")
    if not args.keep or not os.path.exists(image):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        print(f"making a {args.size} qcow2, {args.allocated} allocated ...", file=sys.stderr)
        make_qcow2(image, size, allocated)
    else:  # the image again: the rest (vaults, replicas, their owner files, bitmaps) anew
        for name in os.listdir(d):
            if name != os.path.basename(image):
                path = os.path.join(d, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", image],
                                         check=True, capture_output=True).stdout)
        for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", []):
            subprocess.run(["qemu-img", "bitmap", "--remove", image, b["name"]], check=True)
    modes = ("cbt", "full") if args.full else ("cbt",)
    vaults = {}
    for mode in modes:
        v = os.path.join(d, f"vault-{mode}")
        replica = os.path.join(d, f"replica-{mode}.img")
        subprocess.run([pydr, "vault", "init", v], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([pydr, "protect", "vm", "--disk", f"{image}={replica}", "--vault", v]
                       + (["--cbt"] if mode == "cbt" else []), check=True,
                       stdout=subprocess.DEVNULL)
        print(f"initial copy ({mode}) ...", file=sys.stderr)
        subprocess.run([pydr, "replicate", "vm", "--vault", v], check=True,
                       stdout=subprocess.DEVNULL)
        vaults[mode] = (v, replica)
    walls, cpus, inst, fulls, parts, calls = [], [], [], [], {}, {}
    for rnd in range(args.repeat):
        for kind in (("plain", "parts") if rnd % 2 == 0 else ("parts", "plain")):
            scribble(image, size, args.changed, seed=2 * rnd + (kind == "parts"))
            argv = ["replicate", "vm", "--vault", vaults["cbt"][0]]
            if kind == "plain":
                walls.append(timed_run([pydr, *argv]))
                cpus.append(LAST_CPU[0])
            else:
                got = instrumented(python, argv, d)
                inst.append(got["wall"])
                for k, v in got["parts"].items():
                    parts.setdefault(k, []).append(v)
                for k, v in got["calls"].items():
                    calls.setdefault(k, []).append(v)
        if args.full:
            scribble(image, size, args.changed, seed=1000 + rnd)
            fulls.append(timed_run([pydr, "replicate", "vm", "--vault", vaults["full"][0]]))
    for mode in modes:  # the replicas are exact (after one more cycle: the image moved on)
        subprocess.run([pydr, "replicate", "vm", "--vault", vaults[mode][0]], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", image,
                        vaults[mode][1]], check=True)
    load = os.getloadavg()
    med = statistics.median
    print(f"\n### A one-shot tracked cycle (`pydr replicate` of a --cbt qcow2): {args.size} "
          f"disk, {args.allocated} allocated, {args.changed} x 4 KiB changed per cycle; "
          f"medians of {args.repeat}, load average {load[0]:.1f} on {os.cpu_count()} cores\n")
    print(f"Whole process: {med(walls):.3f} s, {med(cpus):.3f} s of CPU with its children "
          f"(instrumented run: {med(inst):.3f} s).")
    if fulls:
        print(f"A cycle comparing the whole disk (no --cbt): {med(fulls):.3f} s: "
              f"{med(fulls) / med(walls):.1f}x the tracked cycle.")
    print("\n| part | own time (s) | calls |\n|---|---:|---:|")
    rows = sorted(((med(v), k) for k, v in parts.items()), reverse=True)
    for t, k in rows:
        n = calls.get(k)
        print(f"| {k} | {t:.3f} | {med(n):g} |" if n else f"| {k} | {t:.3f} | |")
    print(f"| **sum** | {sum(t for t, _ in rows):.3f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

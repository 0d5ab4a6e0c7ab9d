"""The cost of a tracked cycle inside a long-running service (pydr run),
cold (every cycle rebuilds what it needs) and warm (pydr.dr.warm.WarmState).

    python benchmarks/service_cycle.py [--dir DIR] [--size 4G] [--cycles 9]
                                       [--only live|file]

Two items, each in a vault of its own, replicated in this one process by
pydr.dr.cycle.replicate (as the service calls it):

  * live: a qcow2 image of --size held by qemu-storage-daemon (an NBD
    export for the writer, QMP for pydr: ``qmp:SOCKET:NODE?nbd=PATH``);
  * file: a qcow2 image of --size with persistent dirty bitmaps (no QEMU
    runs it; qemu-img and qemu-nbd do the work).

Each kind is made twice (twin disks, the same writes), each in a vault of
its own: one replicated cold (warm=None), the other warm, their cycles
interleaved (the order alternating), so that both see the same load of a
shared machine. --cycles cycles with nothing changed, then --cycles cycles
with 1 MiB changed (256 scattered 4 KiB blocks written by one qemu-io
between cycles, not timed). Each cycle is timed whole
and by its parts (wrapped functions, inclusive time). Medians; the replica
is compared with the disk at the end. Prints Markdown with the load average.
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20

#: (module, attribute, part): inclusive time of each call
PARTS = [
    ("pydr.dr.tracking", "Tracker.validate", "tracker validate"),
    ("pydr.dr.tracking", "Tracker.commit", "tracker commit"),
    ("pydr.dr.tracking", "Tracker.dirty_extents", "dirty extents"),
    ("pydr.transport.qemu", "qemu_img", "qemu-img"),
    ("pydr.transport.qemu", "QemuNbd.__init__", "qemu-nbd start"),
    ("pydr.transport.qemu", "QemuNbd.close", "qemu-nbd stop"),
    ("pydr.transport.qemu", "Qmp.__init__", "QMP connect"),
    ("pydr.transport.qemu", "Qmp.execute", "QMP commands"),
    ("pydr.transport.qemu", "Fleece.__init__", "fleece set-up"),
    ("pydr.transport.qemu", "Fleece.close", "fleece tear-down"),
    ("pydr.engine.resync", "resync", "resync (sign, compare, write)"),
    ("pydr.engine.devices", "NbdDevice.sign", "  resync: source read + hashed (NBD)"),
    ("pydr.engine.sigcache", "SignatureCache.open", "  resync: signature cache open"),
    ("pydr.engine.sigcache", "SignatureCache.read", "  resync: signature cache read"),
    ("pydr.engine.sigcache", "SignatureCache.commit", "  resync: signature cache commit"),
    ("pydr.engine.sigcache", "SignatureCache._replay", "    cache commit: replay side file"),
    ("pydr.engine.sigcache", "SignatureCache._load", "    cache: segment loads"),
    ("pydr.engine.sigcache", "SignatureCache._flush", "    cache: segment writes"),
    ("pydr.engine.sigcache", "SignatureCache._write_header", "    cache: header writes"),
    ("pydr.engine.resync", "compare_window", "  resync: compare windows"),
    ("pydr.engine.tracked", "TrackedPass._batch", "  resync: tracked batches (all of it)"),
    ("pydr.engine.tracked", "TrackedPass._target_hashes", "  resync: target hashes"),
    ("pydr.engine.tracked", "TrackedPass._update_cache", "  resync: signature cache update"),
    ("pydr.engine.tracked", "extents_between", "  resync: compare (extents)"),
    ("pydr.engine.delta", "write_records", "  resync: encode records"),
    ("pydr.engine.apply", "Applier.__enter__", "  resync: target open, journal made"),
    ("pydr.engine.apply", "Applier.drain", "  resync: writer drain"),
    ("pydr.engine.apply", "Applier.finish", "  resync: journal commit (finish)"),
    ("pydr.dr.cyclerecord", "record_point", "record the point"),
    ("pydr.dr.points", "apply_retention", "retention"),
    ("pydr.dr.stepcapture", "check", "checks (stepcapture.check)"),
]


class Clock:
    def __init__(self):
        self.parts = {}

    def wrap(self):
        import importlib

        for module, attr, label in PARTS:
            owner = importlib.import_module(module)
            *path, name = attr.split(".")
            for p in path:
                owner = getattr(owner, p, None)
            fn = getattr(owner, name, None) if owner is not None else None
            if fn is None:
                continue
            timed = self._timed(fn, label)
            import inspect
            if isinstance(inspect.getattr_static(owner, name), staticmethod):
                timed = staticmethod(timed)
            setattr(owner, name, timed)
            if not path:  # rebind names imported elsewhere
                for m in list(sys.modules.values()):
                    if getattr(m, "__name__", "").startswith("pydr") and \
                            getattr(m, name, None) is fn:
                        setattr(m, name, getattr(owner, name))

    def _timed(self, fn, label):
        clock = self

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                s = clock.parts.setdefault(label, [0.0, 0])
                s[0] += time.perf_counter() - t
                s[1] += 1
        return timed

    def take(self):
        parts, self.parts = self.parts, {}
        return parts


def qemu_io(target, commands, fmt):
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    subprocess.run(args + [target], check=True, capture_output=True)


def scattered_writes(size, rng, n=256):
    blocks = rng.sample(range(size // 4096), n)
    return [f"write -P 0x{rng.randrange(1, 255):02x} {b * 4096} 4096" for b in blocks]


class Live:
    """A qcow2 image behind qemu-storage-daemon."""

    def __init__(self, d, size):
        self.img = os.path.join(d, "live.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.img, str(size)],
                       check=True)
        qemu_io(self.img, ["write -P 0x11 0 32M"], "qcow2")
        self.qmp, self.nbd = os.path.join(d, "qmp.sock"), os.path.join(d, "nbd.sock")
        pid = os.path.join(d, "qsd.pid")
        subprocess.run(["qemu-storage-daemon", "--daemonize", "--pidfile", pid,
                        "--blockdev", f"driver=file,node-name=file0,filename={self.img}",
                        "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
                        "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
                        "--export", "type=nbd,id=w,node-name=disk0,name=disk0,writable=on",
                        "--chardev", f"socket,path={self.qmp},server=on,wait=off,id=qmp0",
                        "--monitor", "chardev=qmp0"], check=True)
        with open(pid) as f:
            self.pid = int(f.read())
        self.spec = f"qmp:{self.qmp}:disk0?nbd={self.nbd}"

    def write(self, commands):
        qemu_io(f"nbd+unix:///disk0?socket={self.nbd}", commands, "raw")

    def content(self, out):
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw",
                        f"nbd+unix:///disk0?socket={self.nbd}", out], check=True)

    def stop(self):
        import signal
        os.kill(self.pid, signal.SIGTERM)


class File:
    """A qcow2 image file with persistent dirty bitmaps."""

    def __init__(self, d, size):
        self.img = os.path.join(d, "file.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.img, str(size)],
                       check=True)
        qemu_io(self.img, ["write -P 0x11 0 32M"], "qcow2")
        self.spec = self.img

    def write(self, commands):
        qemu_io(self.img, commands, "qcow2")

    def content(self, out):
        subprocess.run(["qemu-img", "convert", "-O", "raw", self.img, out], check=True)

    def stop(self):
        pass


def same_file(a, b):
    r = subprocess.run(["cmp", "-s", a, b])
    return r.returncode == 0


def bench(kind, d, size, cycles, clock):
    """Twin disks (same content, same writes), one vault each: one
    replicated cold, the other warm, their cycles interleaved (the order
    alternating) so that both see the same machine load."""
    from pydr.dr.cycle import replicate
    from pydr.dr.vault import Vault, init_vault
    from pydr.dr.warm import WarmState

    twins = {}
    for mode in ("cold", "warm"):
        md = os.path.join(d, mode)
        os.makedirs(md)
        disk = (Live if kind == "live" else File)(md, size)
        vault_dir, replica = os.path.join(md, "vault"), os.path.join(md, "replica.img")
        init_vault(vault_dir)
        twins[mode] = (disk, vault_dir, replica)
    rows = {}
    exact = True
    warm = WarmState()
    try:
        with Vault(twins["cold"][1], writer=True) as cv, Vault(twins["warm"][1], writer=True) as wv:
            vaults = {"cold": cv, "warm": wv}
            for mode, (disk, _, replica) in twins.items():
                vaults[mode].protect("vm", disks=[(disk.spec, replica)], cbt=True)
                replicate(vaults[mode].store, "vm")  # the initial copy
                replicate(vaults[mode].store, "vm", warm=warm if mode == "warm" else None)
            rng = random.Random(5)
            for change in ("nothing changed", "1 MiB changed"):
                for mode in twins:
                    rows[(mode, change)] = ([], [])
                for i in range(cycles):
                    if change != "nothing changed":
                        writes = scattered_writes(size, rng)
                        for disk, _, _ in twins.values():
                            disk.write(writes)
                    for mode in (("cold", "warm") if i % 2 == 0 else ("warm", "cold")):
                        clock.take()
                        t = time.perf_counter()
                        replicate(vaults[mode].store, "vm",
                                  warm=warm if mode == "warm" else None)
                        rows[(mode, change)][0].append(time.perf_counter() - t)
                        rows[(mode, change)][1].append(clock.take())
        for mode, (disk, _, replica) in twins.items():
            out = os.path.join(d, f"content-{mode}.raw")
            disk.content(out)
            exact = exact and same_file(out, replica)
            os.unlink(out)
    finally:
        warm.close()
        for disk, _, _ in twins.values():
            disk.stop()
    return dict(sorted(rows.items(), key=lambda kv: (kv[0][1] != "nothing changed", kv[0][0]))), \
        exact


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir")
    ap.add_argument("--size", default="4G")
    ap.add_argument("--cycles", type=int, default=9)
    ap.add_argument("--only", choices=("live", "file"))
    ap.add_argument("--engine", choices=("batched", "windows"), default="batched",
                    help="windows: a tracked resync walks 64 MiB windows of address space "
                         "(the engine before pydr.engine.tracked), for comparison")
    args = ap.parse_args()
    if args.engine == "windows":
        import pydr.engine.resync as resync_module

        resync_module.use_tracked_pass = lambda *a: False
    from pydr.cli.common import parse_size

    size = parse_size(args.size)
    clock = Clock()
    clock.wrap()
    base = tempfile.mkdtemp(prefix="pydr-svc-", dir=args.dir)
    try:
        for kind in [args.only] if args.only else ["live", "file"]:
            d = os.path.join(base, kind)
            os.makedirs(d)
            rows, exact = bench(kind, d, size, args.cycles, clock)
            print(f"\n### {kind}: {args.size} qcow2, {args.cycles} cycles each, "
                  f"both replicas {'equal' if exact else 'DO NOT ALL EQUAL'} their disks; "
                  f"load average {os.getloadavg()[0]:.2f}\n")
            print("| mode | change | median (ms) | min | max |")
            print("|---|---|---:|---:|---:|")
            for (mode, change), (times, _) in rows.items():
                print(f"| {mode} | {change} | {1e3 * statistics.median(times):.1f} | "
                      f"{1e3 * min(times):.1f} | {1e3 * max(times):.1f} |")
            labels = sorted({lbl for _, parts in rows.values() for p in parts for lbl in p})
            print("\nParts, median per cycle in ms (calls), inclusive:\n")
            keys = list(rows)
            print("| part | " + " | ".join(f"{m}, {c}" for m, c in keys) + " |")
            print("|---|" + "---:|" * len(keys))
            for lbl in labels:
                cells = []
                for k in keys:
                    parts = rows[k][1]
                    ms = statistics.median(p.get(lbl, [0, 0])[0] for p in parts) * 1e3
                    calls = statistics.median(p.get(lbl, [0, 0])[1] for p in parts)
                    cells.append(f"{ms:.1f} ({calls:g})")
                print(f"| {lbl} | " + " | ".join(cells) + " |")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Side by side: QEMU disks through NBD, and cycles with changed-block tracking.

    python benchmarks/compare_qemu.py [--dir DIR] [--size 32G] [--allocated 16G]
                                      [--sign-size 4G] [--repeat 3] [--only cbt|live|sign]

Part 1 -- changed-block tracking. A qcow2 image of --size with --allocated of
it allocated (random data) is protected twice, in two vaults: once with --cbt
(cycles read the extents of a QEMU dirty bitmap) and once without (cycles
read the whole source and compare it with the replica's signature cache).
Each round writes 0.1% or 1% of the disk in 64 KiB pieces through a writable
qemu-nbd (so the persistent bitmap records them), then runs one cycle of each
vault as a whole `pydr replicate` process. Also a tracked cycle with nothing
changed: the constant cost of a cycle. Goal: a tracked cycle >= 20x faster
than the full compare at 0.1%.

Part 2 -- reads where the data lives. The same image served by a
qemu-storage-daemon (its file node aio=threads, a QMP socket, a writable NBD
export for the "guest"), protected as a live disk (qmp:SOCKET:NODE) twice:
tracked (--cbt, QMP dirty bitmaps) and not. The same rounds, written through
the daemon's export; what the daemon read for each cycle is its
/proc/PID/io rchar before and after (QMP's query-blockstats does not count
NBD exports). Goal: a tracked cycle reads at most 1.5x what changed.

Part 3 -- reading through NBD. `pydr signature` of a raw image of
--sign-size, directly and through a read-only qemu-nbd on a unix socket, and
`nbdcopy EXPORT null:` on the same export. Whole processes, interleaved,
warm page cache, medians. Prints Markdown for README.md.
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

MiB = 1 << 20


def run(cmd, **kw):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t


def parse_size(text):
    return int(text[:-1]) << {"M": 20, "G": 30}[text[-1].upper()]


def make_qcow2(path, size, allocated, seed=1):
    """`size` bytes, `allocated` of them random data in 4 MiB runs spread
    evenly."""
    import numpy as np

    raw = path + ".raw"
    rng = np.random.default_rng(seed)
    stride = max(4 * MiB, size // max(1, allocated // (4 * MiB)) // (4 * MiB) * (4 * MiB))
    with open(raw, "wb") as f:
        f.truncate(size)
        for off in range(0, size, stride):
            f.seek(off)
            f.write(rng.integers(0, 256, 4 * MiB, dtype=np.uint8).tobytes())
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    os.unlink(raw)


def scribble(h, size, fraction, seed):
    """Write `fraction` of `size` in 64 KiB pieces at random places through
    the NBD handle `h` (as a guest would); returns the bytes written."""
    rng = random.Random(seed)
    n = max(1, int(size * fraction) // (64 << 10))
    payload = os.urandom(64 << 10)
    for _ in range(n):
        off = rng.randrange(size // (64 << 10)) * (64 << 10)
        h.pwrite(payload, off)
    h.flush()
    return n * (64 << 10)


class WritableExport:
    """A writable qemu-nbd of the image, to write to it as a guest would."""

    def __init__(self, image, workdir):
        self.sock = os.path.join(workdir, "writer.sock")
        self.proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", self.sock, "-t", image])
        while not os.path.exists(self.sock):
            time.sleep(0.01)
        from pydr.engine.bindings import Device

        self.h = Device.open_nbd(f"nbd+unix:///?socket={self.sock}", write=True)

    def scribble(self, size, fraction, seed):
        return scribble(self.h, size, fraction, seed)

    def close(self):
        self.h.close()
        self.proc.terminate()  # a clean exit stores the persistent bitmap
        self.proc.wait()
        os.unlink(self.sock) if os.path.exists(self.sock) else None


def new_image(args, part):
    """A fresh directory args.dir/PART holding the part's qcow2 image;
    returns (directory, size, image)."""
    d = os.path.join(args.dir, part)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    size = parse_size(args.size)
    image = os.path.join(d, "vm.qcow2")
    print(f"making a {args.size} qcow2 image, {args.allocated} allocated ...", file=sys.stderr)
    make_qcow2(image, size, parse_size(args.allocated))
    return d, size, image


def protect_twice(pydr, d, disk, label=""):
    """Item 'vm' (the disk `disk`) protected in two vaults under `d`, "cbt"
    (--cbt) and "full" (without), each with its initial copy done; returns
    {mode: vault}."""
    vaults = {}
    for mode in ("cbt", "full"):
        v = os.path.join(d, f"vault-{mode}")
        subprocess.run([pydr, "vault", "init", v], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([pydr, "protect", "vm", "--disk", f"{disk}={d}/replica-{mode}.img",
                        "--vault", v] + (["--cbt"] if mode == "cbt" else []), check=True,
                       stdout=subprocess.DEVNULL)
        print(f"initial copy ({mode}{label}) ...", file=sys.stderr)
        subprocess.run([pydr, "replicate", "vm", "--vault", v], check=True,
                       stdout=subprocess.DEVNULL)
        vaults[mode] = v
    return vaults


def cbt_part(args, pydr):
    d, size, image = new_image(args, "cbt")
    vaults = protect_twice(pydr, d, image)
    times = {}
    for frac in (0.0, 0.001, 0.01):
        for rnd in range(args.repeat):
            changed = 0
            if frac:
                w = WritableExport(image, d)
                changed = w.scribble(size, frac, seed=int(frac * 1e6) + rnd)
                w.close()
            order = ("cbt", "full") if rnd % 2 == 0 else ("full", "cbt")
            for mode in order:
                if mode == "full" and not frac:
                    continue
                t = run([pydr, "replicate", "vm", "--vault", vaults[mode]])
                times.setdefault((mode, frac), []).append(t)
            times.setdefault(("changed", frac), []).append(changed)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n### Changed-block tracking: a {args.size} qcow2 disk, "
          f"{args.allocated} allocated, medians of {args.repeat}, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| changed | cycle with --cbt (s) | cycle comparing the whole disk (s) | speed-up |")
    print("|---|---:|---:|---:|")
    const = med[("cbt", 0.0)]
    print(f"| nothing | {const:.3f} | | |")
    for frac in (0.001, 0.01):
        c, f = med[("cbt", frac)], med[("full", frac)]
        print(f"| {frac * 100:g}% ({med[('changed', frac)] / MiB:.0f} MiB) | {c:.3f} | {f:.3f} | "
              f"{f / c:.1f}x |")
    small, big = (med[("cbt", f)] - const for f in (0.001, 0.01))
    per = [(med[("cbt", f)] - const) / med[("changed", f)] for f in (0.001, 0.01)]
    print(f"\nConstant (a tracked cycle with nothing changed): {const:.3f} s. "
          f"Time above it: {small:.3f} s at 0.1%, {big:.3f} s at 1% "
          f"({big / small if small > 0 else float('inf'):.1f}x for 10x the change; per MiB "
          f"{per[0] * MiB * 1e3:.1f} and {per[1] * MiB * 1e3:.1f} ms: ratio "
          f"{max(per) / min(per) if min(per) > 0 else float('inf'):.2f}).")
    up = med[("full", 0.001)] / med[("cbt", 0.001)]
    print(f"\nGoal: a tracked cycle >= 20x faster than the full compare at 0.1%: {up:.1f}x, "
          f"{'met' if up >= 20 else 'not met'}.")


class LiveDisk:
    """A qcow2 image served by qemu-storage-daemon: file node aio=threads,
    a writable NBD export (the guest) and a QMP socket (pydr)."""

    def __init__(self, image, workdir):
        self.qmp = os.path.join(workdir, "qmp.sock")
        self.nbd = os.path.join(workdir, "nbd.sock")
        pid_file = os.path.join(workdir, "qsd.pid")
        for p in (self.qmp, self.nbd):
            if os.path.exists(p):
                os.unlink(p)
        # --daemonize: returns once both sockets listen
        subprocess.run(
            ["qemu-storage-daemon", "--daemonize", "--pidfile", pid_file,
             "--blockdev", f"driver=file,node-name=file0,filename={image},aio=threads",
             "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
             "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
             "--export", "type=nbd,id=guest,node-name=disk0,name=disk0,writable=on",
             "--chardev", f"socket,path={self.qmp},server=on,wait=off,id=qmp0",
             "--monitor", "chardev=qmp0"], check=True)
        with open(pid_file) as f:
            self.pid = int(f.read())
        from pydr.engine.bindings import Device

        self.guest = Device.open_nbd(f"nbd+unix:///disk0?socket={self.nbd}", write=True)

    @property
    def spec(self):
        return f"qmp:{self.qmp}:disk0?nbd={self.nbd}"

    def rchar(self):
        """Bytes the daemon has read through syscalls so far."""
        with open(f"/proc/{self.pid}/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar"))

    def close(self):
        self.guest.close()
        os.kill(self.pid, 15)
        while os.path.exists(f"/proc/{self.pid}"):  # not our child: wait until it is gone
            time.sleep(0.05)


def live_part(args, pydr):
    d, size, image = new_image(args, "live")
    disk = LiveDisk(image, d)
    try:
        vaults = protect_twice(pydr, d, disk.spec, ", live")
        samples = {}
        for frac in (0.001, 0.01):
            for rnd in range(args.repeat):
                changed = scribble(disk.guest, size, frac, seed=int(frac * 1e6) + rnd + 7)
                order = ("cbt", "full") if rnd % 2 == 0 else ("full", "cbt")
                for mode in order:
                    before = disk.rchar()
                    t = run([pydr, "replicate", "vm", "--vault", vaults[mode]])
                    samples.setdefault((mode, frac), []).append((t, disk.rchar() - before))
                # both vaults' cycles see this round's writes (each ran once per round)
                samples.setdefault(("changed", frac), []).append((0, changed))
    finally:
        disk.close()
    for mode in ("cbt", "full"):
        replica = os.path.join(d, f"replica-{mode}.img")
        if subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", image,
                           replica]).returncode != 0:
            sys.exit(f"the replica {replica} is not the disk")
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
           for k, v in samples.items()}
    print(f"\n### Reads at the source: a {args.size} qcow2 disk ({args.allocated} allocated) "
          f"served by qemu-storage-daemon, tracked (--cbt, QMP) and not, medians of "
          f"{args.repeat}, load average {os.getloadavg()[0]:.1f}\n")
    print("| changed | tracked cycle (s) | its reads at the source | / changed | "
          "full compare (s) | its reads at the source | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for frac in (0.001, 0.01):
        (tc, rc), (tf, rf) = med[("cbt", frac)], med[("full", frac)]
        changed = med[("changed", frac)][1]
        print(f"| {frac * 100:g}% ({changed / MiB:.0f} MiB) | {tc:.3f} | {rc / MiB:.1f} MiB | "
              f"{rc / changed:.2f} | {tf:.3f} | {rf / MiB:.1f} MiB | {tf / tc:.1f}x |")
    ratio = med[("cbt", 0.001)][1] / med[("changed", 0.001)][1]
    print(f"\nGoal: a tracked cycle reads at most 1.5x what changed (at 0.1%): {ratio:.2f}x, "
          f"{'met' if ratio <= 1.5 else 'not met'}.")


def sign_part(args, pydr):
    d = os.path.join(args.dir, "sign")
    os.makedirs(d, exist_ok=True)
    size = parse_size(args.sign_size)
    image = os.path.join(d, f"dense-{size >> 20}M.img")
    if not os.path.exists(image) or os.path.getsize(image) != size:
        from pydr.engine.sample import make_image

        print(f"making a {args.sign_size} raw image ...", file=sys.stderr)
        make_image(image, size, seed=1, allocated=1.0)
    with open(image, "rb") as f:
        while f.readinto(bytearray(16 << 20)):
            pass
    sock = os.path.join(d, "export.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    server = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-k", sock, "-t", "-e", "8",
                               "--cache", "writeback", image])
    while not os.path.exists(sock):
        time.sleep(0.01)
    uri = f"nbd+unix:///?socket={sock}"
    out = os.path.join(d, "out.sig")
    cases = [("`pydr signature FILE`", [pydr, "signature", image, "-o", out, "-q"]),
             ("`pydr signature nbd+unix://...`", [pydr, "signature", uri, "-o", out, "-q"]),
             ("`nbdcopy nbd+unix://... null:`", ["nbdcopy", uri, "null:"])]
    samples = {name: [] for name, _ in cases}
    try:
        for _ in range(args.repeat + 2):
            for name, cmd in cases:
                samples[name].append(run(cmd))
    finally:
        server.terminate()
        server.wait()
    med = {k: statistics.median(v) for k, v in samples.items()}
    gib = size / (1 << 30)
    print(f"\n### Signing a {args.sign_size} raw image, directly and through qemu-nbd on a unix "
          f"socket, medians of {args.repeat + 2}\n")
    print("| command | median s | GiB/s |")
    print("|---|---:|---:|")
    for name, t in med.items():
        print(f"| {name} | {t:.3f} | {gib / t:.2f} |")
    direct, nbd = med["`pydr signature FILE`"], med["`pydr signature nbd+unix://...`"]
    print(f"\nThrough NBD / direct: {direct / nbd:.2f}x the speed (target: at least 0.5x); "
          f"nbdcopy to null: {med['`nbdcopy nbd+unix://... null:`']:.3f} s.")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.environ.get("PYDR_BENCH_DIR", "/tmp/pydr-bench"))
    ap.add_argument("--size", default="32G")
    ap.add_argument("--allocated", default="16G")
    ap.add_argument("--sign-size", default="4G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=("cbt", "live", "sign"))
    args = ap.parse_args()
    pydr = shutil.which("pydr") or sys.exit("pydr is not on PATH")
    os.makedirs(args.dir, exist_ok=True)
    if args.only in (None, "sign"):
        sign_part(args, pydr)
    if args.only in (None, "cbt"):
        cbt_part(args, pydr)
    if args.only in (None, "live"):
        live_part(args, pydr)


if __name__ == "__main__":
    main()

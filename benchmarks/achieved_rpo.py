"""The RPO `pydr run` achieves on a live disk being written.

    python benchmarks/achieved_rpo.py [--dir DIR] [--size 4G] [--rate 8] [--minutes 10]
                                      [--target 10] [--search]

A qcow2 image of --size held by qemu-storage-daemon (an NBD export for the
writer, QMP for pydr), protected with --cbt into a vault with a target RPO
of --target seconds. After a first full cycle (not measured), the writer of
tests/service/writer.py writes random 64 KiB records through NBD at --rate
MiB/s (each flushed) while `pydr run` keeps the item inside its target.
Every second the newest point's data age (now - its cut_at, read from the
vault as a reader) is sampled; prints p50, p99 and max of those ages, the
points made, the rate the writer achieved and the load average.

--search probes rates (each for --minutes): doubling from --rate while
p99 <= target, then halving the gap twice, and prints the highest rate at
which p99 stayed within the target.
"""

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WRITER = os.path.join(os.path.dirname(HERE), "tests", "service", "writer.py")
MiB = 1 << 20


def pydr(*args):
    exe = os.path.join(os.path.dirname(sys.executable), "pydr")
    return [exe if os.access(exe, os.X_OK) else "pydr", *map(str, args)]


def run(*args):
    r = subprocess.run(pydr(*args), capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"pydr {' '.join(map(str, args))}: exit {r.returncode}: {r.stderr}")
    return r.stdout


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units \
        else int(text)


def percentile(values, p):
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class Setup:
    """The disk under QSD and its vault, in `directory`."""

    def __init__(self, directory, size, target):
        self.dir = directory
        self.image = os.path.join(directory, "disk.qcow2")
        self.qmp = os.path.join(directory, "qmp.sock")
        self.nbd = os.path.join(directory, "nbd.sock")
        self.vault = os.path.join(directory, "vault")
        self.size = size
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.image, str(size)],
                       check=True)
        pidfile = os.path.join(directory, "qsd.pid")
        subprocess.run(["qemu-storage-daemon", "--daemonize", "--pidfile", pidfile,
                        "--blockdev", f"driver=file,node-name=file0,filename={self.image}",
                        "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
                        "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
                        "--export", "type=nbd,id=w,node-name=disk0,name=disk0,writable=on",
                        "--chardev", f"socket,path={self.qmp},server=on,wait=off,id=qmp0",
                        "--monitor", "chardev=qmp0"], check=True)
        with open(pidfile) as f:
            self.qsd = int(f.read())
        run("vault", "init", self.vault)
        replica = os.path.join(directory, "replica.img")
        run("protect", "vm", "--vault", self.vault, "--cbt",
            "--disk", f"qmp:{self.qmp}:disk0?nbd={self.nbd}={replica}")
        run("policy", "vm", "--vault", self.vault, "--rpo", f"{target}s")
        run("replicate", "vm", "--vault", self.vault)  # the first full cycle: not measured

    def close(self):
        os.kill(self.qsd, signal.SIGTERM)


def newest_cut(vault_dir, since=0.0):
    """(the newest point's cut time or None, how many points were recorded
    after `since`: counted by time, as retention drops the old ones)."""
    from pydr.dr.vault import Vault

    with Vault(vault_dir) as v:
        points = v.points("vm")
    made = sum(1 for p in points if p.created_at.timestamp() > since)
    return (max(p.cut_at.timestamp() for p in points), made) if points else (None, 0)


def probe(setup, rate, seconds, seed):
    """One run at `rate` MiB/s for `seconds`: the sampled ages and facts."""
    cmd, ack = (os.path.join(setup.dir, f"w{seed}.{x}") for x in ("cmd", "ack"))
    for fifo in (cmd, ack):
        os.mkfifo(fifo)
    cmd_fd, ack_fd = os.open(cmd, os.O_RDWR), os.open(ack, os.O_RDWR)
    log = os.path.join(setup.dir, f"w{seed}.log")
    writer = subprocess.Popen([sys.executable, WRITER, "--uri",
                               f"nbd+unix:///disk0?socket={setup.nbd}", "--seed", str(seed),
                               "--size", str(setup.size), "--log", log, "--commands", cmd,
                               "--acks", ack, "--rate", str(rate)], cwd=tempfile.gettempdir())
    service = subprocess.Popen(pydr("run", "--vault", setup.vault), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    ages, loads, started = [], [], time.time()
    try:
        next_at = started + 1
        while time.time() < started + seconds:
            time.sleep(max(0.0, next_at - time.time()))
            next_at += 1
            cut, _ = newest_cut(setup.vault)
            if cut is not None:
                ages.append(time.time() - cut)
            loads.append(os.getloadavg()[0])
    finally:
        os.write(cmd_fd, b"quit\n")
        writer.wait()
        service.send_signal(signal.SIGTERM)
        _, err = service.communicate()
        os.close(cmd_fd)
        os.close(ack_fd)
    if service.returncode != 0:
        print(f"pydr run exited {service.returncode}: {err.decode()[-2000:]}", file=sys.stderr)
    with open(log) as f:
        records = sum(1 for _ in f)
    _, made = newest_cut(setup.vault, since=started)
    return {"rate": rate, "p50": percentile(ages, 50), "p99": percentile(ages, 99),
            "max": max(ages), "samples": len(ages), "points": made,
            "written_mib_s": records * 64 / 1024 / (time.time() - started),
            "load": sum(loads) / len(loads)}


def show(r, target):
    print(f"| {r['rate']:g} | {r['written_mib_s']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | "
          f"{r['max']:.1f} | {r['points']} | {r['samples']} | {r['load']:.2f} | "
          f"{'yes' if r['p99'] <= target else 'no'} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    p.add_argument("--size", default="4G")
    p.add_argument("--rate", type=float, default=8.0, help="MiB/s the writer writes")
    p.add_argument("--minutes", type=float, default=10.0, help="per rate")
    p.add_argument("--target", type=float, default=10.0, help="target RPO, seconds")
    p.add_argument("--search", action="store_true",
                   help="find the highest rate that keeps p99 within the target")
    a = p.parse_args()
    work = a.dir or tempfile.mkdtemp(prefix="pydr-rpo-")
    os.makedirs(work, exist_ok=True)
    setup = Setup(work, parse_size(a.size), a.target)
    print(f"{a.size} qcow2 behind qemu-storage-daemon, --cbt, target {a.target:g} s, "
          f"{a.minutes:g} min per rate, {os.cpu_count()} CPUs\n")
    print("| rate MiB/s | written MiB/s | p50 age s | p99 age s | max age s | points | "
          "samples | load avg | p99 <= target |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        seconds, seed = a.minutes * 60, 1
        result = probe(setup, a.rate, seconds, seed)
        show(result, a.target)
        if a.search:
            good = bad = None
            rate = a.rate
            for _ in range(7):
                if seed > 1:
                    result = probe(setup, rate, seconds, seed)
                    show(result, a.target)
                seed += 1
                if result["written_mib_s"] < 0.9 * rate:
                    print(f"\nthe writer reached {result['written_mib_s']:.1f} MiB/s, not "
                          f"{rate:g}: its own ceiling on this machine (one NBD connection, a "
                          "flush per record); faster rates say nothing of pydr run")
                    if result["p99"] <= a.target:
                        good = max(good or 0, result["written_mib_s"])
                    break
                if result["p99"] <= a.target:
                    good = max(good or 0, rate)
                else:
                    bad = min(bad or rate, rate)
                if bad is None:
                    rate *= 2
                elif good is None:
                    rate /= 2
                elif bad - good > bad / 8:
                    rate = (good + bad) / 2
                else:
                    break
            print(f"\nhighest rate written with p99 <= {a.target:g} s: "
                  f"{'none found' if good is None else f'{good:g} MiB/s'}")
    finally:
        setup.close()
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

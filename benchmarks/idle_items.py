"""What `pydr run` costs when nothing happens: many idle untracked items.

    python benchmarks/idle_items.py [--dir DIR] [--items 200] [--item-size 1M]
                                    [--target 5m] [--minutes 5] [--scrapes 50]

--items file disks of --item-size random bytes, each its own untracked item
with a target RPO of --target, in one vault. `pydr run --events --metrics
127.0.0.1:PORT` starts; its first round (every item's first, full cycle)
is not measured. Then, over --minutes, the service's own CPU time (utime +
stime of its process, /proc/PID/stat: the cycles run in it) is read at the
start and the end; the cycles it ran meanwhile each hash their item's
source (an untracked cycle reads the whole disk and compares it with the
cached signature), so the hashing's CPU -- the bytes those cycles read times
the CPU seconds per byte of pydr.signature on the same files, measured here
in this process -- is subtracted. Prints the service's CPU as a percentage
of one core (with and without the hashing), the cycles run, and the median
and p99 time of --scrapes metrics scrapes (HTTP GET of /metrics), with the
load average.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

TICK = os.sysconf("SC_CLK_TCK")


def pydr(*args):
    exe = os.path.join(os.path.dirname(sys.executable), "pydr")
    return [exe if os.access(exe, os.X_OK) else "pydr", *map(str, args)]


def cpu_seconds(pid):
    """utime + stime of process `pid` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    u = text[-1].upper()
    return int(float(text[:-1]) * units[u]) if u in units else int(text)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hash_cpu_per_byte(paths):
    """CPU seconds per byte pydr.signature takes on `paths` (in page cache)."""
    from pydr.engine.signatures import signature

    for p in paths:  # warm the page cache
        signature(p)
    before = resource.getrusage(resource.RUSAGE_SELF)
    total = 0
    for _ in range(3):
        for p in paths:
            signature(p)
            total += os.path.getsize(p)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / total


def setup(work, items, size, target):
    from pydr.dr.vault import Vault, init_vault

    vault = os.path.join(work, "vault")
    init_vault(vault)
    paths = []
    with Vault(vault, writer=True) as v:
        for i in range(items):
            src = os.path.join(work, f"d{i}.img")
            with open(src, "wb") as f:
                f.write(os.urandom(size))
            paths.append(src)
            v.protect(f"i{i}", [(src, os.path.join(work, f"r{i}.img"))])
            v.set_policy(f"i{i}", target_rpo=target)
    return vault, paths


class Events:
    """pydr run's event lines, read on a thread: cycles and round ends counted."""

    def __init__(self, proc):
        self.proc = proc
        self.rounds = threading.Semaphore(0)
        self.cycles = 0
        self.failed = 0
        self.bytes = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            e = json.loads(line)
            if e["operation"] == "run" and e["kind"] == "finished":
                self.rounds.release()
            elif e["operation"] == "replicate" and e["kind"] == "finished":
                self.cycles += 1
            elif e["operation"] == "replicate" and e["kind"] == "failed":
                self.failed += 1


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--item-size", default="1M")
    p.add_argument("--target", default="5m", help="target RPO (as pydr policy --rpo)")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--scrapes", type=int, default=50)
    a = p.parse_args()
    from pydr.dr.policy import parse_duration

    target = parse_duration(a.target)
    size = parse_size(a.item_size)
    work = a.dir or tempfile.mkdtemp(prefix="pydr-idle-")
    os.makedirs(work, exist_ok=True)
    try:
        t0 = time.time()
        vault, paths = setup(work, a.items, size, target)
        print(f"{a.items} items of {a.item_size}, target {a.target}: set up in "
              f"{time.time() - t0:.1f} s", flush=True)
        per_byte = hash_cpu_per_byte(paths[:20])
        port = free_port()
        proc = subprocess.Popen(pydr("run", "--vault", vault, "--events", "--metrics",
                                     f"127.0.0.1:{port}"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
        events = Events(proc)
        t0 = time.time()
        events.rounds.acquire()  # the first round: every item's first cycle
        first = events.cycles
        print(f"first round: {first} cycles in {time.time() - t0:.1f} s, service CPU "
              f"{cpu_seconds(proc.pid):.1f} s", flush=True)
        url = f"http://127.0.0.1:{port}/metrics"
        scrape_times = []
        for _ in range(a.scrapes):
            s0 = time.perf_counter()
            with urllib.request.urlopen(url, timeout=30) as r:
                body = r.read()
            scrape_times.append(time.perf_counter() - s0)
        cpu0, wall0, cycles0, load0 = (cpu_seconds(proc.pid), time.time(), events.cycles,
                                       os.getloadavg()[0])
        time.sleep(a.minutes * 60)
        cpu1, wall1, cycles1, load1 = (cpu_seconds(proc.pid), time.time(), events.cycles,
                                       os.getloadavg()[0])
        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read()  # until it ends
        proc.wait()
        cycles = cycles1 - cycles0
        used = cpu1 - cpu0
        hashing = cycles * size * per_byte
        wall = wall1 - wall0
        print(f"\nmeasured over {wall:.0f} s (load average {load0:.2f} -> {load1:.2f}, "
              f"{os.cpu_count()} CPUs)\n")
        print("| what | value |")
        print("|---|---|")
        print(f"| cycles run (each hashes its {a.item_size} source) | {cycles} |")
        print(f"| service CPU | {used:.2f} s = {100 * used / wall:.2f}% of a core |")
        print(f"| hashing (estimated: {per_byte * 2**30:.2f} CPU s/GiB) | {hashing:.2f} s |")
        print(f"| service CPU without the hashing | {max(0.0, used - hashing):.2f} s = "
              f"{100 * max(0.0, used - hashing) / wall:.2f}% of a core |")
        print(f"| metrics scrape ({a.scrapes}, {len(body)} bytes) median | "
              f"{1000 * statistics.median(scrape_times):.1f} ms |")
        print(f"| metrics scrape max | {1000 * max(scrape_times):.1f} ms |")
        print(f"| failed cycles | {events.failed} |")
        if proc.returncode != 0:
            print(f"pydr run exited {proc.returncode}: {err[-2000:]}", file=sys.stderr)
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

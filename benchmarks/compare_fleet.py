"""Side by side: a fleet's cycles and a plan failover through Dask, against
the same on one machine without Dask; and the vault's commit rate.

    python benchmarks/compare_fleet.py [--dir DIR] [--items 200] [--size 64M]
                                       [--workers 4] [--change 1M] [--repeat 3]

--items machines with one disk of --size each (pydr.engine.sample, a quarter
of it allocated), spread over --workers emulated hosts. A real `dask
scheduler` and one `pydr worker --host hN` per host run here, as processes.
Two vaults protect the same sources to two replica directories: one
replicates with `pydr replicate --all` (one cycle per item, in this
process), the other with `pydr replicate --all --scheduler ADDR`. Timed:
the initial cycle, then --repeat delta cycles with --change written into
every source before each (random 64 KiB runs), then one `pydr plan failover
--planned` of 4 groups. The coordinator's overhead per item is the time
the fleet's coordinator did not spend waiting for workers (its "finished"
event), divided by the items. Then the vault's commit rate: one
transaction per recovery point (points, point_disks, items), as a cycle
records it. Prints Markdown for README.md and docs/SCALE.md.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from _images import parse_size, scribble

MiB = 1 << 20




def run(cmd, **kwargs):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if r.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed: {r.stderr.strip()[-2000:]}")
    return time.perf_counter() - t, r




def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def coordinator_times(stderr):
    """The coordinator's seconds of each fleet call: the message of its
    "finished" Event about no item ("N items: ... (coordinator S s)")."""
    import re

    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            found = re.search(r"\(coordinator ([0-9.]+) s\)", event.get("message") or "")
            if event.get("kind") == "finished" and event.get("item") is None and found:
                out.append(float(found.group(1)))
    return out


def coordinator_seconds(stderr):
    times = coordinator_times(stderr)
    return times[0] if times else None


def commit_rate(directory, n=500):
    """Recovery points recorded per second, one transaction each."""
    from pydr.dr.store import init_vault
    from pydr.dr.vault import Vault

    vdir = os.path.join(directory, "rate-vault")
    init_vault(vdir)
    with Vault(vdir, writer=True) as v:
        v.db.execute("INSERT INTO items(name, state, direction, health, retention, created) "
                     "VALUES ('x', 'protected', 'forward', 'ok', 24, 0)")
        v.db.execute("INSERT INTO disks(item, idx, source, replica) VALUES ('x', 0, 'a', 'b')")
        t = time.perf_counter()
        for i in range(1, n + 1):
            with v.db:
                v.db.execute("BEGIN IMMEDIATE")
                v.db.execute("INSERT INTO steps VALUES ('x', 0, ?, 'p', 0)", (i,))
                v.db.execute("INSERT INTO points VALUES (?, 'x', 0, 'crash-consistent', 0, 'none')",
                             (i,))
                v.db.execute("INSERT INTO point_disks VALUES (?, 'x', 0, ?)", (i, i))
                v.db.execute("UPDATE items SET state='protected' WHERE name='x'")
        return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.environ.get("PYDR_BENCH_DIR", "/tmp/pydr-bench"))
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--size", default="64M")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--change", default="1M")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    pydr = shutil.which("pydr")
    dask = shutil.which("dask")
    if pydr is None or dask is None:
        sys.exit("pydr and dask (pip install 'pydr[fleet]') must be on PATH")
    from pydr.engine.sample import make_image

    root = os.path.join(args.dir, "fleet")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    size, change = parse_size(args.size), parse_size(args.change)
    hosts = [f"h{i}" for i in range(args.workers)]
    print(f"making {args.items} disks of {args.size} ...", file=sys.stderr)
    items = []
    for n in range(args.items):
        host = hosts[n % len(hosts)]
        os.makedirs(os.path.join(root, host), exist_ok=True)
        src = os.path.join(root, host, f"vm{n:03d}.img")
        make_image(src, size, seed=n, allocated=0.25)
        items.append((f"vm{n:03d}", host, src))
    vaults = {}
    for mode in ("local", "fleet"):
        vault, replicas = os.path.join(root, f"vault-{mode}"), os.path.join(root, f"site-b-{mode}")
        os.makedirs(replicas)
        run([pydr, "vault", "init", vault])
        for name, host, src in items:
            run([pydr, "protect", name, "--host", host, "--disk",
                 f"{src}={os.path.join(replicas, name)}.img", "--vault", vault])
        groups = []
        for g in range(4):
            members = [name for i, (name, _, _) in enumerate(items) if i % 4 == g]
            groups += ["--group", ",".join(members)]
        run([pydr, "plan", "create", "all", *groups, "--vault", vault])
        vaults[mode] = vault
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    work = tempfile.mkdtemp(prefix="pydr-fleet-bench-")
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0", "--no-show"], cwd=work,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]

    procs += [subprocess.Popen([pydr, "worker", "--scheduler", address, "--host", h, "--",
                                "--local-directory", work], cwd=work,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for h in hosts]
    try:
        from distributed import Client

        with Client(address, timeout=60) as c:
            c.wait_for_workers(len(hosts), timeout=120)
        fleet = ["--scheduler", address, "--events"]
        rows = {}

        def cycle(label):
            t_local, _ = run([pydr, "replicate", "--all", "--vault", vaults["local"]])
            t_fleet, r = run([pydr, "replicate", "--all", *fleet, "--vault", vaults["fleet"]])
            rows.setdefault(label, []).append((t_local, t_fleet, coordinator_seconds(r.stderr)))

        print("initial cycle ...", file=sys.stderr)
        cycle("initial cycle (full copies)")
        for i in range(args.repeat):
            print(f"delta cycle {i + 1} ...", file=sys.stderr)
            for n, (_, _, src) in enumerate(items):
                scribble(src, change, 1000 * i + n)
            cycle(f"delta cycle ({args.change} changed per disk)")
        for n, (_, _, src) in enumerate(items):
            scribble(src, change, 99999 + n)
        print("plan failover ...", file=sys.stderr)
        t_local, _ = run([pydr, "plan", "failover", "all", "--planned", "--vault", vaults["local"]])
        t_fleet, r = run([pydr, "plan", "failover", "all", "--planned", *fleet,
                          "--vault", vaults["fleet"]])
        coord = coordinator_times(r.stderr)
        rows["plan failover --planned (4 groups)"] = [(t_local, t_fleet, sum(coord))]
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    rate = commit_rate(root)
    print(f"\n### A fleet on Dask: {args.items} machines ({args.size} disks, a quarter "
          f"allocated) on {len(hosts)} emulated hosts, one `pydr worker` each; "
          f"{os.cpu_count()} cores\n")
    print("| step | one machine (s) | through Dask (s) | ratio | coordinator per item (ms) |")
    print("|---|---:|---:|---:|---:|")
    for label, runs in rows.items():
        t_local = statistics.median(r[0] for r in runs)
        t_fleet = statistics.median(r[1] for r in runs)
        coord = statistics.median(r[2] for r in runs if r[2] is not None)
        print(f"| {label} | {t_local:.2f} | {t_fleet:.2f} | {t_fleet / t_local:.2f} | "
              f"{1000 * coord / args.items:.1f} |")
    print(f"\nVault commit rate (one transaction per recovery point, WAL, synchronous=FULL): "
          f"{rate:.0f} points/s")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

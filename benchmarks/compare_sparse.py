"""A nearly empty large disk: does a cycle cost its data or its size?

    python benchmarks/compare_sparse.py [--dir DIR] [--size 1T] [--data 1G]
                                        [--change 1M] [--repeat 3]

A disk of --size holding --data of random data (64 runs spread evenly over
it, the rest holes), as a sparse raw file and as a qcow2 protected with
--cbt, against the same data on a disk of --data (the runs side by side).
For each, whole `pydr` processes:

* the initial cycle (`pydr replicate` onto a new replica), its time and the
  process's peak memory (max RSS);
* then, --repeat times, --change written as scattered 4 KiB blocks inside
  the data (raw: pwrite + fsync; qcow2: one qemu-io process, which records
  them in the persistent dirty bitmap) and one cycle: for raw, a cycle that
  compares the disk (its holes should cost nothing), for qcow2 a tracked
  cycle (goal: <= 0.5 s as a one-shot process); medians;
* the signature cache the vault keeps for it (every file under
  VAULT/cache/ITEM), apparent and allocated size, against the goal: at most
  2 x (allocated 4 KiB blocks x 16 bytes) + one bit per block.

Every replica is compared with its source at the end (`qemu-img compare`).
Prints Markdown for README.md. Needs qemu-img and qemu-io for the qcow2 rows
(--no-qcow2 leaves them out).
"""

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time

MiB = 1 << 20
BLOCK = 4096
RUNS = 64


def parse_size(text):
    """"1T", "64M", "4K" -> bytes."""
    return int(text[:-1]) << {"K": 10, "M": 20, "G": 30, "T": 40}[text[-1].upper()]


def human(n):
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{n} B"


def run_timed(cmd):
    """(seconds, peak RSS in bytes) of a whole process; exits on failure."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - t
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {err.strip()}")
    return elapsed, usage.ru_maxrss * 1024


def data_runs(size, data):
    """[(offset, length)]: RUNS runs of the data, spread evenly over `size`
    (4 MiB aligned)."""
    run = data // RUNS
    stride = size // RUNS // (4 * MiB) * (4 * MiB)
    if stride < run:  # a small disk: side by side
        stride = size // RUNS // BLOCK * BLOCK
    return [(i * stride, run) for i in range(RUNS)]


def make_raw(path, size, data, seed):
    """A sparse raw file of `size` with the same `data` bytes whatever the
    size (same seed): RUNS runs spread evenly over it."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in data_runs(size, data):
            f.seek(off)
            for done in range(0, length, 16 * MiB):
                f.write(rng.randbytes(min(16 * MiB, length - done)))
    return data_runs(size, data)


def change_offsets(runs, nbytes, seed):
    """Scattered 4 KiB blocks inside the data runs, `nbytes` in all."""
    rng = random.Random(seed)
    blocks = [off + rng.randrange(length // BLOCK) * BLOCK
              for off, length in (rng.choice(runs) for _ in range(nbytes // BLOCK))]
    return sorted(set(blocks))


def change_raw(path, offsets, seed):
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in offsets:
            os.pwrite(fd, rng.randbytes(BLOCK), off)
        os.fsync(fd)
    finally:
        os.close(fd)


def change_qcow2(path, offsets, seed):
    """One qemu-io process: its writes go to the persistent dirty bitmap."""
    rng = random.Random(seed)
    cmd = ["qemu-io", "-f", "qcow2"]
    for off in offsets:
        cmd += ["-c", f"write -P {rng.randrange(1, 256)} {off} {BLOCK}"]
    subprocess.run(cmd + [path], check=True, stdout=subprocess.DEVNULL)


def cache_bytes(vault, item):
    """(apparent, allocated) bytes of the files under VAULT/cache/ITEM."""
    apparent = allocated = 0
    for d, _, files in os.walk(os.path.join(vault, "cache", item)):
        for name in files:
            st = os.stat(os.path.join(d, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def allocated_blocks(path, size):
    """4 KiB blocks of `path` that hold data (SEEK_DATA / SEEK_HOLE)."""
    n, off = 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            n += (end - start + BLOCK - 1) // BLOCK
            off = end
    finally:
        os.close(fd)
    return n


def same(kind, source, replica):
    """Whether the replica holds the source's bytes: `qemu-img compare`
    (it skips what both say are holes; cmp would read a 1 TiB disk)."""
    if kind == "raw" and not shutil.which("qemu-img"):
        return subprocess.run(["cmp", "-s", source, replica]).returncode == 0
    fmt = "qcow2" if kind == "qcow2" else "raw"
    return subprocess.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", "raw", source,
                           replica]).returncode == 0


def one_disk(pydr, root, kind, size, data, change, repeat):
    """Protect and replicate one disk, then `repeat` changed cycles."""
    where = os.path.join(root, f"{kind}-{size}")
    shutil.rmtree(where, ignore_errors=True)
    os.makedirs(where)
    raw = os.path.join(where, "vm.img")
    runs = make_raw(raw, size, data, seed=7)
    nonzero = allocated_blocks(raw, size)
    source = raw
    if kind == "qcow2":
        source = os.path.join(where, "vm.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, source],
                       check=True)
        os.unlink(raw)
    vault, replica = os.path.join(where, "vault"), os.path.join(where, "replica.img")
    v = ["--vault", vault]
    subprocess.run([pydr, "vault", "init", vault], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([pydr, "protect", "vm", "--disk", f"{source}={replica}", *v]
                   + (["--cbt"] if kind == "qcow2" else []), check=True,
                   stdout=subprocess.DEVNULL)
    initial, initial_rss = run_timed([pydr, "replicate", "vm", *v])
    cycles, rss = [], []
    for rnd in range(repeat):
        offsets = change_offsets(runs, change, seed=100 + rnd)
        (change_qcow2 if kind == "qcow2" else change_raw)(source, offsets, seed=200 + rnd)
        t, m = run_timed([pydr, "replicate", "vm", *v])
        cycles.append(t)
        rss.append(m)
    if not same(kind, source, replica):
        sys.exit(f"the replica {replica} is not its source {source}")
    apparent, allocated = cache_bytes(vault, "vm")
    result = {"initial": initial, "initial_rss": initial_rss,
              "cycle": statistics.median(cycles), "cycle_rss": max(rss),
              "cache": apparent, "cache_allocated": allocated,
              "cache_bound": 2 * nonzero * 16 + size // BLOCK // 8}
    shutil.rmtree(where, ignore_errors=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.environ.get("PYDR_BENCH_DIR", "/tmp/pydr-bench"))
    ap.add_argument("--size", default="1T")
    ap.add_argument("--data", default="1G")
    ap.add_argument("--change", default="1M")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-qcow2", action="store_true", help="leave out the qcow2 --cbt rows")
    args = ap.parse_args()
    pydr = shutil.which("pydr") or sys.exit("pydr is not on PATH")
    kinds = ["raw"] + ([] if args.no_qcow2 else ["qcow2"])
    if "qcow2" in kinds and not (shutil.which("qemu-img") and shutil.which("qemu-io")):
        sys.exit("qemu-img and qemu-io are needed for the qcow2 rows (or give --no-qcow2)")
    size, data, change = (parse_size(x) for x in (args.size, args.data, args.change))
    if data % (RUNS * BLOCK) or data > size:
        sys.exit(f"--data must be a multiple of {RUNS * BLOCK} bytes and at most --size")
    root = os.path.join(args.dir, "sparse")
    os.makedirs(root, exist_ok=True)
    rows = {}
    for kind in kinds:
        for disk in (size, data):
            print(f"{kind}: a {human(disk)} disk holding {human(data)} ...", file=sys.stderr)
            rows[(kind, disk)] = one_disk(pydr, root, kind, disk, data, change, args.repeat)
    print(f"\n### A {args.size} disk holding {args.data}, against the same data on a "
          f"{args.data} disk: whole processes, {args.change} changed in 4 KiB blocks between "
          f"cycles, medians of {args.repeat}, load average {os.getloadavg()[0]:.1f}\n")
    print("| disk | initial cycle (s) | its peak memory | cycle after the change (s) | "
          "its peak memory | signature cache (allocated) | goal for the cache |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (kind, disk), r in rows.items():
        what = "raw" if kind == "raw" else "qcow2, --cbt (tracked cycle)"
        print(f"| {human(disk)} {what} | {r['initial']:.3f} | {human(r['initial_rss'])} | "
              f"{r['cycle']:.3f} | {human(r['cycle_rss'])} | {human(r['cache'])} "
              f"({human(r['cache_allocated'])}) | <= {human(r['cache_bound'])} |")
    print("\n| goal | measured | met |")
    print("|---|---:|:-:|")
    for kind in kinds:
        big, small = rows[(kind, size)], rows[(kind, data)]
        ratio = big["initial"] / small["initial"]
        print(f"| {kind}: initial cycle of {args.size} within 1.5x of {args.data} | "
              f"{ratio:.2f}x | {'yes' if ratio <= 1.5 else 'no'} |")
        print(f"| {kind}: signature cache of {args.size} within its goal | "
              f"{human(big['cache_allocated'])} | "
              f"{'yes' if big['cache_allocated'] <= big['cache_bound'] else 'no'} |")
    if "qcow2" in kinds:
        t = rows[("qcow2", size)]["cycle"]
        print(f"| qcow2 --cbt: tracked cycle of {args.size} with {args.change} changed <= 0.5 s "
              f"| {t:.3f} s | {'yes' if t <= 0.5 else 'no'} |")


if __name__ == "__main__":
    main()

"""Side-by-side benchmark of `pydr signature` against cat and xxhsum.

    python benchmarks/compare.py [--dir DIR] [--size 4G] [--repeat 7]

Generates (or reuses) a dense image and a 10%-allocated sparse one of the same
size (pydr.sample: random data, text and zero runs), warms the page cache, then
runs every command `--repeat` times, interleaved, as whole processes, and
reports median wall time, peak RSS and the ratios the targets are stated in.
Also measures in-process times (interpreter start-up excluded), the block-size
choice, and peak memory at two image sizes. Prints a Markdown table for
README.md and exits 0 whatever the outcome (a benchmark reports; it does not
gate).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time


WORKDIR = None  # set in main(): never run from the source tree


GNU_TIME = "/usr/bin/time"  # Debian package `time`


def run_timed(cmd, stdout=subprocess.DEVNULL):
    """Wall seconds and peak RSS (KiB) of one whole process.

    Wall time is taken here around the process; peak RSS comes from GNU time,
    because the ru_maxrss that wait4() reports for a child forked from this
    (large) Python process includes the pages it shared before exec.
    """
    rss_file = os.path.join(WORKDIR, ".rss")
    full = [GNU_TIME, "-f", "%M", "-o", rss_file] + cmd if os.path.exists(GNU_TIME) else cmd
    start = time.perf_counter()
    proc = subprocess.run(full, stdout=stdout, stderr=subprocess.PIPE, cwd=WORKDIR)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}: {proc.stderr.decode()}")
    try:
        with open(rss_file) as f:
            rss = int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        rss = 0
    return elapsed, rss


def make_images(directory, size):
    from pydr.engine.sample import make_image

    dense = os.path.join(directory, f"dense-{size >> 20}M.img")
    sparse = os.path.join(directory, f"sparse-{size >> 20}M.img")
    for path, allocated, seed in ((dense, 1.0, 1), (sparse, 0.10, 2)):
        if not os.path.exists(path) or os.path.getsize(path) != size:
            print(f"generating {path} ...", file=sys.stderr)
            make_image(path, size, seed=seed, allocated=allocated)
    return dense, sparse


def warm(path):
    with open(path, "rb") as f:
        while f.readinto(bytearray(1 << 24)):
            pass


def median_of(cmd, repeat):
    times, rss = [], []
    for _ in range(repeat):
        t, m = run_timed(cmd)
        times.append(t)
        rss.append(m)
    return statistics.median(times), max(rss)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.environ.get("PYDR_BENCH_DIR", "/tmp/pydr-bench"))
    ap.add_argument("--size", default="4G")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1].upper()]
    os.makedirs(args.dir, exist_ok=True)
    global WORKDIR
    WORKDIR = args.dir
    dense, sparse = make_images(args.dir, size)
    for p in (dense, sparse):
        warm(p)
    pydr = shutil.which("pydr") or sys.exit("pydr is not on PATH")
    xxhsum = shutil.which("xxhsum")
    out = os.path.join(args.dir, "out.sig")

    cases = [
        ("cat", ["cat", dense], None),
        ("xxhsum -H3", [xxhsum, "-H3", dense] if xxhsum else None, None),
        ("pydr signature, 1 thread", [pydr, "signature", dense, "-o", out, "-q", "--threads", "1"], None),
        ("pydr signature, 2 threads", [pydr, "signature", dense, "-o", out, "-q", "--threads", "2"], None),
        ("pydr signature, 1 thread, pread", [pydr, "signature", dense, "-o", out, "-q", "--threads", "1", "--no-mmap"], None),
        ("pydr signature 10% allocated, 1 thread", [pydr, "signature", sparse, "-o", out, "-q", "--threads", "1"], None),
        ("pydr signature 10% allocated, 2 threads", [pydr, "signature", sparse, "-o", out, "-q", "--threads", "2"], None),
        ("python3 -c 'import pydr' (start-up)", [sys.executable, "-c", "import pydr"], None),
    ]
    # Interleave the repeats so that machine noise hits every case alike.
    samples = {name: [] for name, cmd, _ in cases if cmd}
    rss = {name: 0 for name in samples}
    for _ in range(args.repeat):
        for name, cmd, _ in cases:
            if cmd:
                t, m = run_timed(cmd)
                samples[name].append(t)
                rss[name] = max(rss[name], m)
    med = {name: statistics.median(v) for name, v in samples.items()}

    # In-process: the same work without interpreter start-up.
    import pydr as api

    inproc = {}
    for label, path, threads, kw in (
        ("dense, 1 thread", dense, 1, {}), ("dense, 2 threads", dense, 2, {}),
        ("sparse, 1 thread", sparse, 1, {}), ("sparse, 2 threads", sparse, 2, {}),
        ("dense, 1 thread, pread", dense, 1, {"use_mmap": False}),
    ):
        ts = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            api.signature(path, threads=threads, **kw)
            ts.append(time.perf_counter() - t)
        inproc[label] = statistics.median(ts)
    blocks = {}
    for bs in (4096, 16384, 65536, 1 << 20):
        ts = []
        for _ in range(max(3, args.repeat // 2)):
            t = time.perf_counter()
            api.signature(dense, threads=1, block_size=bs)
            ts.append(time.perf_counter() - t)
        blocks[bs] = statistics.median(ts)

    # Peak memory at two image sizes: the difference should be the hash array.
    small = os.path.join(args.dir, "small.img")
    if not os.path.exists(small) or os.path.getsize(small) != size // 4:
        from pydr.engine.sample import make_image
        make_image(small, size // 4, seed=3)
    warm(small)
    mem = {}
    for label, path in (("1/4 size", small), ("full size", dense)):
        _, m = median_of([pydr, "signature", path, "-o", out, "-q", "--block-size", "4K", "--threads", "2"], 3)
        mem[label] = m

    gib = size / (1 << 30)
    print(f"\n### `pydr signature` on a {gib:g} GiB image, warm page cache, "
          f"median of {args.repeat} whole-process runs\n")
    print("| command | median s | GiB/s | peak RSS MiB |")
    print("|---|---:|---:|---:|")
    for name in samples:
        print(f"| {name} | {med[name]:.3f} | {gib / med[name]:.1f} | {rss[name] / 1024:.0f} |")
    cat, xx = med["cat"], med.get("xxhsum -H3")
    t1, t2 = med["pydr signature, 1 thread"], med["pydr signature, 2 threads"]
    s1, s2 = med["pydr signature 10% allocated, 1 thread"], med["pydr signature 10% allocated, 2 threads"]
    start = med["python3 -c 'import pydr' (start-up)"]
    print("\n| target | measured (whole process) | in-process | met |")
    print("|---|---:|---:|:-:|")
    if xx:
        r = xx / t2
        ri = xx / inproc["dense, 2 threads"]
        print(f"| 2 threads ≥ 1.6× faster than `xxhsum -H3` | {r:.2f}× | {ri:.2f}× | {'yes' if r >= 1.6 else 'no'} |")
    r, ri = t1 / cat, inproc["dense, 1 thread"] / cat
    print(f"| 1 thread ≤ 1.1× `cat` | {r:.2f}× | {ri:.2f}× | {'yes' if r <= 1.1 else 'no'} |")
    for label, s, d, ik in (("1 thread", s1, t1, "1 thread"), ("2 threads", s2, t2, "2 threads")):
        r = s / d
        ri = inproc[f"sparse, {ik}"] / inproc[f"dense, {ik}"]
        print(f"| 10% allocated ≤ 0.25× dense ({label}) | {r:.2f}× | {ri:.2f}× | {'yes' if r <= 0.25 else 'no'} |")
    print(f"\nInterpreter + `import pydr` start-up alone: {start:.3f} s (median).")
    print("\nIn-process medians (s): " + ", ".join(f"{k} {v:.3f}" for k, v in inproc.items()))
    print("\nBlock size, 1 thread, in-process (s): " +
          ", ".join(f"{bs >> 10} KiB {t:.3f}" for bs, t in blocks.items()))
    print("\nPeak RSS, 4 KiB blocks, 2 threads: " +
          ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in mem.items()) +
          f" (hash array at full size: {(size // 4096) * 17 / (1 << 20):.0f} MiB)")


if __name__ == "__main__":
    main()

"""Side-by-side benchmark of `pydr resync` against rsync and cp.

    python benchmarks/compare_resync.py [--dir DIR] [--size 4G] [--repeat 5]

A target image and a source that differs from it in 1% of its 4 KiB blocks
(rewritten at random) plus one 64 MiB run. Before every run the target is
restored from a pristine copy, flushed to disk (so that no command pays for
the previous one's write-back) and both images are read into the page cache.
Each command runs as a whole process; medians are reported, with the bytes
pydr read and wrote, and the result is checked with cmp.

cp and rsync leave their writes in the page cache; pydr makes its writes
durable (undo journal fsynced before each batch, target fdatasynced at the
end), so the table also shows both followed by `sync`.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from _images import change_blocks, parse_size


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def make_pair(d, size):
    from pydr.engine.sample import make_image

    base = os.path.join(d, "base.img")
    src = os.path.join(d, "src.img")
    if not (os.path.exists(base) and os.path.getsize(base) == size
            and os.path.exists(src) and os.path.getsize(src) == size):
        print("generating images ...", file=sys.stderr)
        make_image(base, size, seed=1)
        sh(["cp", "--sparse=always", base, src])
        change_blocks(src, size, seed=5, run=64 << 20)
    return base, src


def warm(*paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.environ.get("PYDR_BENCH_DIR", "/tmp/pydr-bench-resync"))
    ap.add_argument("--size", default="4G")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rsync-repeat", type=int, default=1)
    args = ap.parse_args()
    size = parse_size(args.size)
    os.makedirs(args.dir, exist_ok=True)
    base, src = make_pair(args.dir, size)
    dst = os.path.join(args.dir, "dst.img")
    cache = os.path.join(args.dir, "dst.sig")
    pydr = shutil.which("pydr") or sys.exit("pydr is not on PATH")

    def reset():
        sh(["cp", "--sparse=always", base, dst])
        sh(["sync"])
        warm(src, dst)

    def timed(cmd, sync_after=False):
        reset()
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, cwd=args.dir)
        if sync_after:
            sh(["sync"])
        elapsed = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(f"failed: {cmd}: {r.stderr.decode()}")
        if subprocess.run(["cmp", "-s", src, dst]).returncode != 0:
            sys.exit(f"{cmd} did not make the images equal")
        return elapsed, r.stdout

    def prepare_cache():
        # a valid cache of the (reset) target, as a previous resync leaves it
        reset()
        sh([pydr, "resync", base, dst, "-q", "--signature-cache", cache])

    cases = {
        # -I: rsync must compare even when size and mtime match (small images
        # are generated within one second, and rsync would skip them)
        "rsync --inplace --no-whole-file": (["rsync", "-I", "--inplace", "--no-whole-file", src, dst], False, args.rsync_repeat),
        "rsync --inplace --no-whole-file; sync": (["rsync", "-I", "--inplace", "--no-whole-file", src, dst], True, args.rsync_repeat),
        "cp --sparse=always": (["cp", "--sparse=always", src, dst], False, args.repeat),
        "cp --sparse=always; sync": (["cp", "--sparse=always", src, dst], True, args.repeat),
        "pydr resync": ([pydr, "resync", src, dst, "--json"], False, args.repeat),
    }
    results, stats = {}, {}
    for name, (cmd, sync_after, reps) in cases.items():
        times = []
        for _ in range(reps):
            t, out = timed(cmd, sync_after)
            times.append(t)
            if name == "pydr resync":
                stats[name] = json.loads(out)
        results[name] = statistics.median(times)
    # with a valid signature cache: the target is not read
    times = []
    for _ in range(args.repeat):
        prepare_cache()
        sh(["sync"])
        warm(src)
        t = time.perf_counter()
        r = subprocess.run([pydr, "resync", src, dst, "--json", "--signature-cache", cache],
                           capture_output=True, cwd=args.dir)
        times.append(time.perf_counter() - t)
        if r.returncode:
            sys.exit(r.stderr.decode())
        stats["pydr resync --signature-cache"] = json.loads(r.stdout)
        if subprocess.run(["cmp", "-s", src, dst]).returncode != 0:
            sys.exit("resync with cache did not make the images equal")
    results["pydr resync --signature-cache"] = statistics.median(times)

    gib = size / (1 << 30)
    changed = size // 4096 // 100 * 4096 + (64 << 20)
    print(f"\n### `pydr resync`, {gib:g} GiB image, 1% of 4 KiB blocks + a 64 MiB run changed "
          f"(~{changed / (1 << 20):.0f} MiB), warm cache, medians\n")
    print("| command | median s | bytes read | bytes written |")
    print("|---|---:|---:|---:|")
    for name, t in results.items():
        s = stats.get(name)
        rd = f"{s['bytes_read'] / (1 << 30):.2f} GiB" if s else ""
        wr = f"{(s['bytes_written'] + s['bytes_zeroed']) / (1 << 20):.0f} MiB" if s else ""
        print(f"| {name} | {t:.3f} | {rd} | {wr} |")
    pr, pc = results["pydr resync"], results["pydr resync --signature-cache"]
    rs, cp = results["rsync --inplace --no-whole-file"], results["cp --sparse=always"]
    rss, cps = results["rsync --inplace --no-whole-file; sync"], results["cp --sparse=always; sync"]
    print("\n| target | measured | met |")
    print("|---|---:|:-:|")
    print(f"| ≥ 30× faster than rsync --inplace --no-whole-file | {rs / pr:.1f}× | {'yes' if rs / pr >= 30 else 'no'} |")
    print(f"| ≥ 6× faster than cp --sparse=always | {cp / pr:.2f}× | {'yes' if cp / pr >= 6 else 'no'} |")
    print(f"| with a valid --signature-cache ≥ 1.5× faster than without | {pr / pc:.2f}× | {'yes' if pr / pc >= 1.5 else 'no'} |")
    print(f"| (durable: vs rsync; sync) | {rss / pr:.1f}× | |")
    print(f"| (durable: vs cp; sync) | {cps / pr:.2f}× | |")
    print(f"\nResync journal written: {stats['pydr resync']['journal_bytes'] / (1 << 20):.0f} MiB "
          "(old contents of the changed blocks, fsynced before they are overwritten).")


if __name__ == "__main__":
    main()

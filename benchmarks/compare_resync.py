"""Side-by-side benchmark of `pydr resync` against durable peers and the limit.

    python benchmarks/compare_resync.py [--dir DIR] [--size 4G] [--repeat 5]
                                        [--blocksync-src PATH] [--tools-dir DIR]

A target image and a source that differs from it in 1% of its 4 KiB blocks
(rewritten at random) plus one 64 MiB run. Before every run the target is
restored from a pristine copy, flushed to disk (so that no command pays for
the previous one's write-back) and both images are read into the page cache.
Each command runs as a whole process; medians are reported, with the bytes
pydr read and wrote, and the result is checked with cmp.

pydr makes its writes durable (undo journal fsynced before each batch,
target fdatasynced at the end); the peers are therefore also timed followed
by `sync`: blocksync-fast, `cp --sparse=always` and `rsync --inplace
--no-whole-file`. The limit is what any tool has to do: read both images
(two threads, one per image, 4 MiB reads), compare 4 KiB blocks, pwrite the
changed ones (one pwrite per run of side-by-side blocks) and fdatasync the
target: limit_resync.c beside this script, built with gcc into --tools-dir.
Each row's ratio is its median over the limit's; the goal is pydr within
1.3x of the limit and faster than every durable peer. The rounds are
interleaved (every command once, then again), so that the machine's load
falls on all alike.

blocksync-fast (https://github.com/nethappen/blocksync-fast) is not
vendored: it is used from PATH or from --tools-dir, else built there from
--blocksync-src (a source tree or a git repository) or from a `git clone` of
its repository (./configure && make; it needs libgcrypt's headers). When it
cannot be had, its rows say "not available" and why.
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

BLOCKSYNC_URL = "https://github.com/nethappen/blocksync-fast"


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


def build_limit(tools_dir):
    """The limit's helper (limit_resync.c beside this script), built into
    `tools_dir` when absent or older than its source."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "limit_resync.c")
    binary = os.path.join(tools_dir, "limit_resync")
    if not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(source):
        os.makedirs(tools_dir, exist_ok=True)
        sh(["gcc", "-O2", "-pthread", "-Wall", "-o", binary, source])
    return binary


def find_blocksync(tools_dir, source):
    """(path of blocksync-fast, None) or (None, why it is not available):
    from PATH, from `tools_dir`, or built into `tools_dir` from `source` (a
    source tree or a git repository; None: cloned from BLOCKSYNC_URL)."""
    found = shutil.which("blocksync-fast")
    if found:
        return found, None
    binary = os.path.join(tools_dir, "blocksync-fast", "src", "blocksync-fast")
    if os.access(binary, os.X_OK):
        return binary, None
    tree = os.path.join(tools_dir, "blocksync-fast")
    shutil.rmtree(tree, ignore_errors=True)
    os.makedirs(tree)
    try:
        if source is None:
            print(f"cloning {BLOCKSYNC_URL} ...", file=sys.stderr)
            sh(["git", "clone", "-q", "--depth", "1", BLOCKSYNC_URL, tree], capture_output=True)
        elif os.path.isfile(os.path.join(source, "configure")):
            shutil.rmtree(tree)
            shutil.copytree(source, tree)
        else:  # a git repository (bare or not): its HEAD
            git_dir = source if os.path.isfile(os.path.join(source, "HEAD")) else \
                os.path.join(source, ".git")
            archive = subprocess.run(["git", "--git-dir", git_dir, "archive", "HEAD"],
                                     check=True, capture_output=True).stdout
            sh(["tar", "-x", "-C", tree], input=archive)
        print("building blocksync-fast ...", file=sys.stderr)
        sh(["./configure", "-q"], cwd=tree, capture_output=True)
        sh(["make", "-s", "-j2"], cwd=tree, capture_output=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = getattr(exc, "stderr", None)
        detail = (detail.decode(errors="replace").strip().splitlines()[-1:] if detail
                  else [str(exc)])
        shutil.rmtree(tree, ignore_errors=True)
        return None, f"not available: could not get or build it ({' '.join(detail)})"
    if not os.access(binary, os.X_OK):
        return None, "not available: its build made no binary"
    return binary, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.environ.get("PYDR_BENCH_DIR", "/tmp/pydr-bench-resync"))
    ap.add_argument("--size", default="4G")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rsync-repeat", type=int, default=1)
    ap.add_argument("--tools-dir", default=os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pydr-bench"),
        help="where blocksync-fast is built (default: ~/.cache/pydr-bench)")
    ap.add_argument("--blocksync-src", help="a blocksync-fast source tree or git repository "
                    "(default: git clone " + BLOCKSYNC_URL + ")")
    args = ap.parse_args()
    size = parse_size(args.size)
    os.makedirs(args.dir, exist_ok=True)
    base, src = make_pair(args.dir, size)
    dst = os.path.join(args.dir, "dst.img")
    cache = os.path.join(args.dir, "dst.sig")
    pydr = shutil.which("pydr") or sys.exit("pydr is not on PATH")
    blocksync, missing = find_blocksync(args.tools_dir, args.blocksync_src)
    limit = build_limit(args.tools_dir)

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

    rsync = ["rsync", "-I", "--inplace", "--no-whole-file", src, dst]
    # -I: rsync must compare even when size and mtime match (small images are
    # generated within one second, and rsync would skip them)
    cases = {
        "the limit (read both, pwrite, fdatasync)": (
            [limit, src, dst], False, args.repeat),
        "pydr resync": ([pydr, "resync", src, dst, "--json"], False, args.repeat),
        "blocksync-fast": ([blocksync, "-s", src, "-d", dst, "--silent"], False, args.repeat),
        "blocksync-fast; sync": ([blocksync, "-s", src, "-d", dst, "--silent"], True, args.repeat),
        "cp --sparse=always": (["cp", "--sparse=always", src, dst], False, args.repeat),
        "cp --sparse=always; sync": (["cp", "--sparse=always", src, dst], True, args.repeat),
        "rsync --inplace --no-whole-file": (rsync, False, args.rsync_repeat),
        "rsync --inplace --no-whole-file; sync": (rsync, True, args.rsync_repeat),
    }
    durable = ("blocksync-fast; sync", "cp --sparse=always; sync",
               "rsync --inplace --no-whole-file; sync")
    results, stats = {}, {}
    for rnd in range(max(args.repeat, args.rsync_repeat)):  # interleaved: load hits all alike
        for name, (cmd, sync_after, reps) in cases.items():
            if rnd >= reps or (name.startswith("blocksync") and blocksync is None):
                continue
            t, out = timed(cmd, sync_after)
            results.setdefault(name, []).append(t)
            if name == "pydr resync":
                stats[name] = json.loads(out)
    # with a valid signature cache: the target is not read
    for _ in range(args.repeat):
        prepare_cache()
        sh(["sync"])
        warm(src)
        t = time.perf_counter()
        r = subprocess.run([pydr, "resync", src, dst, "--json", "--signature-cache", cache],
                           capture_output=True, cwd=args.dir)
        results.setdefault("pydr resync --signature-cache", []).append(time.perf_counter() - t)
        if r.returncode:
            sys.exit(r.stderr.decode())
        stats["pydr resync --signature-cache"] = json.loads(r.stdout)
        if subprocess.run(["cmp", "-s", src, dst]).returncode != 0:
            sys.exit("resync with cache did not make the images equal")
    med = {name: statistics.median(v) for name, v in results.items()}

    gib = size / (1 << 30)
    changed = size // 4096 // 100 * 4096 + (64 << 20)
    lim = med["the limit (read both, pwrite, fdatasync)"]
    print(f"\n### `pydr resync`, {gib:g} GiB image, 1% of 4 KiB blocks + a 64 MiB run changed "
          f"(~{changed / (1 << 20):.0f} MiB), warm cache, medians of {args.repeat} "
          f"(rsync: {args.rsync_repeat}), load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| command | durable | median s | / limit | bytes read | bytes written |")
    print("|---|:-:|---:|---:|---:|---:|")
    order = ["the limit (read both, pwrite, fdatasync)", "pydr resync",
             "pydr resync --signature-cache", "blocksync-fast", "blocksync-fast; sync",
             "cp --sparse=always", "cp --sparse=always; sync", "rsync --inplace --no-whole-file",
             "rsync --inplace --no-whole-file; sync"]
    for name in order:
        is_durable = "yes" if name.startswith(("the limit", "pydr")) or name in durable else "no"
        if name not in med:
            print(f"| {name} | {is_durable} | {missing} | | | |")
            continue
        s = stats.get(name)
        rd = f"{s['bytes_read'] / (1 << 30):.2f} GiB" if s else ""
        wr = f"{(s['bytes_written'] + s['bytes_zeroed']) / (1 << 20):.0f} MiB" if s else ""
        print(f"| {name} | {is_durable} | {med[name]:.3f} | {med[name] / lim:.2f} | {rd} | {wr} |")
    pr = med["pydr resync"]
    peers = {n: med[n] for n in durable if n in med}
    fastest = min(peers, key=peers.get)
    print("\n| target | measured | met |")
    print("|---|---:|:-:|")
    print(f"| pydr resync within 1.3x of the limit | {pr / lim:.2f}x | "
          f"{'yes' if pr / lim <= 1.3 else 'no'} |")
    print(f"| faster than every durable peer (fastest: {fastest}) | {peers[fastest] / pr:.2f}x | "
          f"{'yes' if pr < peers[fastest] else 'no'} |")
    print(f"| with a valid --signature-cache faster than without | "
          f"{pr / med['pydr resync --signature-cache']:.2f}x | "
          f"{'yes' if med['pydr resync --signature-cache'] < pr else 'no'} |")
    if blocksync is None:
        print(f"\nblocksync-fast: {missing}.")
    print(f"\nResync journal written: {stats['pydr resync']['journal_bytes'] / (1 << 20):.0f} MiB "
          "(old contents of the changed blocks, fsynced before they are overwritten).")


if __name__ == "__main__":
    main()

"""Side by side: drills, failover and change-point by copy-on-write and by copy.

    python benchmarks/compare_failover.py [--dir DIR] [--size 8G] [--small 2G]
                                          [--change 18M] [--repeat 3]

A disk of --size with 76% of it allocated (pydr.engine.sample: random, text
and zero segments, the rest holes) is protected and replicated, then changed
by --change (random 64 KiB runs) three times, a cycle after each: points 1
to 4. Then, for each way of making a point's disks, on the same disk in the
same run, whole `pydr` processes:

* drill: `pydr test-failover vm --point 3` (--repeat times, cleaned up in
  between), and the same of the latest point (4), interleaved: a drill of a
  previous point should cost only its steps (goal: within 0.2 s of the
  latest's);
* failover: `pydr failover vm --point 3` (once: it changes the item), and
  site B's space after it, against the replica plus twice the change since
  point 3;
* change-point: `pydr change-point` to point 2, then 3, ... (--repeat times).

The ways: reflink (the replica on XFS with reflink=1, on a loop device made
here; needs root) against --copy on the same XFS, and --as qcow2 (the replica
on the directory's own file system, ext4 here) against --copy there. The
copy-on-write ways run again at --small: their time should follow the change,
not the disk. Prints Markdown for README.md.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from _images import parse_size, scribble

MiB = 1 << 20




def timed(cmd):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed: {r.stderr.strip()}")
    return time.perf_counter() - t




def used(path):
    """Bytes in use on the file system holding `path` (shared extents once)."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def allocated(path):
    return os.stat(path).st_blocks * 512


class Xfs:
    def __init__(self, where, size):
        self.img, self.mnt = os.path.join(where, "xfs.img"), os.path.join(where, "xfs")
        with open(self.img, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", self.img], check=True)
        os.makedirs(self.mnt, exist_ok=True)
        # discard: files deleted on the mount give their space back to /tmp
        subprocess.run(["mount", "-o", "loop,discard", self.img, self.mnt], check=True)

    def close(self):
        subprocess.run(["umount", self.mnt], check=False)
        os.unlink(self.img)


def site_bytes(site_b, shared_aware):
    """What site B holds: on XFS the file system's own count (clones share
    extents), elsewhere the files' allocated blocks."""
    if shared_aware:
        return used(site_b)
    return sum(allocated(os.path.join(d, f)) for d, _, fs in os.walk(site_b) for f in fs)


def lifecycle(pydr, source, site_b, vault, method_flags, change, repeat, history_seed):
    """Protect, replicate 4 points, then time drills, one failover and
    change-points with `method_flags`. Returns {step: [seconds]} and facts."""
    shutil.rmtree(vault, ignore_errors=True)
    shutil.rmtree(site_b, ignore_errors=True)
    os.makedirs(site_b)
    v = ["--vault", vault]
    subprocess.run([pydr, "vault", "init", vault], check=True, stdout=subprocess.DEVNULL)
    replica = os.path.join(site_b, "vm.img")
    subprocess.run([pydr, "protect", "vm", "--disk", f"{source}={replica}", *v], check=True,
                   stdout=subprocess.DEVNULL)
    for cycle in range(4):
        if cycle:
            scribble(source, change, history_seed + cycle)
        subprocess.run([pydr, "replicate", "vm", *v], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["sync"], check=True)
    times = {"drill": [], "drill latest": [], "failover": [], "change-point": []}
    drill = os.path.join(site_b, "drill")
    for i in range(2 * repeat):
        which, point = ("drill", "3") if i % 2 == 0 else ("drill latest", "4")
        times[which].append(timed([pydr, "test-failover", "vm", "--to", drill, "--point", point,
                                   *method_flags, *v]))
        subprocess.run([pydr, "cleanup-test-failover", "vm", *v], check=True,
                       stdout=subprocess.DEVNULL)
    replica_bytes = allocated(replica)
    xfs = "/xfs/" in site_b
    before = site_bytes(site_b, xfs)
    times["failover"].append(timed([pydr, "failover", "vm", "--point", "3", *method_flags, *v]))
    subprocess.run(["sync"], check=True)
    grown = site_bytes(site_b, xfs) - before  # what the failover added to site B
    for i in range(repeat):
        times["change-point"].append(timed([pydr, "change-point", "vm", "--point",
                                            "2" if i % 2 == 0 else "3", *method_flags, *v]))
    return times, {"replica": replica_bytes, "grown": grown}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.environ.get("PYDR_BENCH_DIR", "/tmp/pydr-bench"))
    ap.add_argument("--size", default="8G")
    ap.add_argument("--small", default="2G")
    ap.add_argument("--change", default="18M")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", metavar="TEXT", help="run only the ways whose name contains TEXT")
    args = ap.parse_args()
    pydr = shutil.which("pydr")
    if pydr is None:
        sys.exit("pydr is not on PATH")
    from pydr.engine.sample import make_image

    root = os.path.join(args.dir, "failover")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    change = parse_size(args.change)
    rows, facts = {}, {}
    for label in ("size", "small"):
        size = parse_size(getattr(args, label))
        source = os.path.join(root, "vm.img")
        print(f"making a {getattr(args, label)} disk ...", file=sys.stderr)
        make_image(source, size, seed=3, allocated=0.76)
        xfs = Xfs(root, 4 * size + (4 << 30))  # --copy holds 3 disks, +1 in flight
        try:
            ways = [("reflink (XFS)", os.path.join(xfs.mnt, "site-b"), []),
                    ("--as qcow2 (ext4)", os.path.join(root, "site-b"), ["--as", "qcow2"])]
            if label == "size":
                ways += [("--copy (XFS)", os.path.join(xfs.mnt, "site-b"), ["--copy"]),
                         ("--copy (ext4)", os.path.join(root, "site-b"), ["--copy"])]
            ways = [w for w in ways if args.only is None or args.only in w[0]]
            for name, site_b, flags in ways:
                print(f"{getattr(args, label)}: {name} ...", file=sys.stderr)
                t, f = lifecycle(pydr, source, site_b, os.path.join(root, "vault"), flags,
                                 change, args.repeat, 10)
                rows[(label, name)] = {k: statistics.median(v) for k, v in t.items()}
                facts[(label, name)] = f
                shutil.rmtree(site_b, ignore_errors=True)
        finally:
            xfs.close()
        alloc = allocated(source)
        facts[label] = alloc
        os.unlink(source)
    big, small = args.size, args.small
    print(f"\n### Failover by copy-on-write: a {big} disk ({facts['size'] / (1 << 30):.1f} GiB "
          f"allocated), {args.change} changed between points, medians of {args.repeat} "
          "(failover: one run)\n")
    print("| method | drill (s) | drill of the latest (s) | failover (s) | change-point (s) | "
          "site B after failover |")
    print("|---|---:|---:|---:|---:|---:|")
    for (label, name), r in rows.items():
        if label != "size":
            continue
        f = facts[(label, name)]
        print(f"| {name} | {r['drill']:.3f} | {r['drill latest']:.3f} | {r['failover']:.3f} | "
              f"{r['change-point']:.3f} | replica + {f['grown'] / MiB:.1f} MiB |")
    for (label, name), r in rows.items():
        if label == "size" and name in ("reflink (XFS)", "--as qcow2 (ext4)"):
            extra = r["drill"] - r["drill latest"]
            print(f"\n{name}: a drill of point 3 costs {extra:+.3f} s over one of the latest "
                  f"(goal: within 0.2 s): {'met' if extra <= 0.2 else 'not met'}.")
    print(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}.")
    for cow, copy in (("reflink (XFS)", "--copy (XFS)"), ("--as qcow2 (ext4)", "--copy (ext4)")):
        if ("size", cow) not in rows or ("size", copy) not in rows:
            continue
        a, b = rows[("size", cow)], rows[("size", copy)]
        print(f"\n{cow} against {copy}: " + ", ".join(
            f"{k} {b[k] / a[k]:.0f}x faster" for k in ("drill", "failover", "change-point")))
    print(f"\nThe same at {small} ({facts['small'] / (1 << 30):.1f} GiB allocated):\n")
    print(f"| method | step | {small} (s) | {big} (s) | ratio |")
    print("|---|---|---:|---:|---:|")
    for name in ("reflink (XFS)", "--as qcow2 (ext4)"):
        if ("small", name) not in rows:
            continue
        for k in ("drill", "failover", "change-point"):
            s, b = rows[("small", name)][k], rows[("size", name)][k]
            print(f"| {name} | {k} | {s:.3f} | {b:.3f} | {b / s:.2f} |")
    print(f"\nSpace target: site B after failover <= replica + 2 x {args.change} "
          f"(= + {2 * change / MiB:.0f} MiB).")


if __name__ == "__main__":
    main()

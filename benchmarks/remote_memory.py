"""Peak memory of both sides of a remote resync, at two image sizes.

    python benchmarks/remote_memory.py [--sizes 256M,1G] [--streams 4]

Needs root (it starts its own sshd, see compare_remote.py) and GNU time.
The client is measured with `/usr/bin/time -f %M`; the server through a
wrapper given as --remote-pydr that runs pydr serve under the same. For a
push with --streams the server figure is the largest of its processes (the
main one; the JOINed relays are smaller). 1% of the 4 KiB blocks and a
16 MiB run changed. Bounded memory means the figures do not follow the size.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

from _images import change_blocks, parse_size, random_image
from compare_remote import start_sshd


def make_images(d, size):
    base, src = os.path.join(d, f"base-{size}"), os.path.join(d, f"src-{size}")
    if not os.path.exists(src):
        random_image(base, size)
        shutil.copyfile(base, src)
        change_blocks(src, size, seed=1, run=16 << 20)
    return base, src


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256M,1G")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/time"):
        sys.exit("run as root, with GNU time installed")
    pydr = shutil.which("pydr") or sys.exit("pydr is not on PATH")
    d = args.dir or tempfile.mkdtemp(prefix="pydr-bench-mem-")
    os.makedirs(d, exist_ok=True)
    wrapper = os.path.join(d, "pydr-measured")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec /usr/bin/time -f %M -o "{d}/server.$$.rss" {pydr} "$@"\n')
    os.chmod(wrapper, 0o755)
    sshd, port = start_sshd(d, pydr)
    rsh = (f"ssh -p {port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
           f"-o BatchMode=yes -o LogLevel=ERROR -i {d}/client_key")
    rows = []
    try:
        for spec in args.sizes.split(","):
            size = parse_size(spec)
            base, src = make_images(d, size)
            dst = os.path.join(d, "dst")
            cases = [("push", [src, f"127.0.0.1:{dst}"]), ("pull", [f"127.0.0.1:{src}", dst])]
            if args.streams:
                cases.append((f"push --streams {args.streams}",
                              [src, f"127.0.0.1:{dst}", "--streams", str(args.streams)]))
            for label, pair in cases:
                shutil.copyfile(base, dst)
                for old in glob.glob(f"{d}/server.*.rss"):
                    os.unlink(old)
                r = subprocess.run(["/usr/bin/time", "-f", "%M", pydr, "resync", *pair, "-q",
                                    "--rsh", rsh, "--remote-pydr", wrapper],
                                   capture_output=True, text=True)
                if r.returncode:
                    sys.exit(r.stderr)
                if subprocess.run(["cmp", "-s", src, dst]).returncode:
                    sys.exit(f"{label}: target differs")
                client = int(r.stderr.strip().splitlines()[-1])
                server = max(int(open(p).read().strip().splitlines()[-1])
                             for p in glob.glob(f"{d}/server.*.rss"))
                rows.append((spec, label, client, server))
    finally:
        sshd.terminate()
    print("\n| image | resync | client peak RSS | server peak RSS |")
    print("|---|---|---:|---:|")
    for spec, label, client, server in rows:
        print(f"| {spec} | {label} | {client / 1024:.0f} MB | {server / 1024:.0f} MB |")


if __name__ == "__main__":
    main()

"""Remote resync over a real sshd on 127.0.0.1, with and without latency.

    python benchmarks/compare_remote.py [--size 1G] [--rtt-ms 100] [--repeat 3]

Needs root (it starts its own sshd with throwaway keys on a free port).
A 1 GiB image with 1% of its 4 KiB blocks rewritten plus a 16 MiB run is
pushed to (and pulled into) a target holding the old image, directly and
through a relay that delays every chunk by half the round trip in each
direction (no tc/netem here); each with a fresh ssh connection per command
and with a reused one (an OpenSSH ControlMaster started first, as
ControlPersist in ~/.ssh/config gives). Reports medians of wall time, what
`ssh host true` alone costs on the same link, and the bytes on the wire
against the issue's budget (1.1x the changed data + 1% of the image).
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from relay import relay  # noqa: E402  (the delaying TCP relay the tests use too)
from _images import change_blocks, parse_size, random_image  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sshd(d, pydr):
    for key in ("host_key", "client_key"):
        for old in (key, key + ".pub"):  # a reused directory: make new keys
            if os.path.exists(os.path.join(d, old)):
                os.unlink(os.path.join(d, old))
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, key)],
                       check=True)
    with open(os.path.join(d, "authorized_keys"), "w") as f:
        f.write(open(os.path.join(d, "client_key.pub")).read())
    port = free_port()
    cfg = os.path.join(d, "sshd_config")
    with open(cfg, "w") as f:
        f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
                f"AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n"
                f"PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
                f"PidFile {d}/sshd.pid\n")
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen([shutil.which("sshd"), "-D", "-e", "-f", cfg], stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    sys.exit("sshd did not start")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rtt-ms", type=float, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--streams", type=int, default=4,
                    help="also push with --streams N (0: do not)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (it starts its own sshd)")
    size = parse_size(args.size)
    pydr = shutil.which("pydr") or sys.exit("pydr is not on PATH")
    d = args.dir or tempfile.mkdtemp(prefix="pydr-bench-remote-")
    os.makedirs(d, exist_ok=True)
    base, src, dst = (os.path.join(d, n) for n in ("base.img", "src.img", "dst.img"))
    random_image(base, size)
    shutil.copyfile(base, src)
    changed = change_blocks(src, size, seed=1, run=16 << 20)
    sshd, port = start_sshd(d, pydr)
    relay_port = free_port()
    server = relay(relay_port, port, args.rtt_ms / 2000)
    opts = (f"-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes "
            f"-o LogLevel=ERROR -i {d}/client_key")
    results = {}
    masters = []
    try:
        for link, p in (("direct", port), (f"+{args.rtt_ms:g} ms RTT", relay_port)):
            for conn in ("fresh", "reused"):
                rsh = f"ssh -p {p} {opts}"
                if conn == "reused":  # a persistent connection, as ControlMaster/ControlPersist give
                    sock = os.path.join(d, f"cm-{p}")
                    masters.append(subprocess.Popen(
                        rsh.split() + ["-o", "ControlMaster=yes", "-o", f"ControlPath={sock}", "-N",
                                       "127.0.0.1"]))
                    for _ in range(100):
                        if os.path.exists(sock):
                            break
                        time.sleep(0.05)
                    rsh += f" -o ControlPath={sock}"
                ssh_alone = statistics.median(_timed(rsh.split() + ["127.0.0.1", "true"])
                                              for _ in range(args.repeat))
                directions = ["push", "pull"] + ([f"push --streams {args.streams}"]
                                                 if args.streams else [])
                for direction in directions:
                    times, stats = [], None
                    for _ in range(args.repeat):
                        shutil.copyfile(base, dst)
                        subprocess.run(["sync"])
                        pair = ([f"127.0.0.1:{src}", dst] if direction == "pull"
                                else [src, f"127.0.0.1:{dst}"] + direction.split()[1:])
                        t = time.perf_counter()
                        r = subprocess.run([pydr, "resync", *pair, "--json", "--rsh", rsh,
                                            "--remote-pydr", pydr], capture_output=True)
                        times.append(time.perf_counter() - t)
                        if r.returncode:
                            sys.exit(r.stderr.decode())
                        stats = json.loads(r.stdout)
                        if subprocess.run(["cmp", "-s", src, dst]).returncode:
                            sys.exit(f"target differs from source after the {direction}")
                    results[link, conn, direction] = (statistics.median(times), stats, ssh_alone)
    finally:
        for m in masters:
            m.terminate()
        server.close()
        sshd.terminate()
    print(f"\n### Resync over ssh on 127.0.0.1, {size / (1 << 30):g} GiB image, ~{changed >> 20} MiB "
          f"changed, medians of {args.repeat}\n")
    print("| link | ssh connection | `ssh host true` s | direction | median s | sent | received "
          "| wire / budget | time / direct |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for (link, conn, direction), (t, st, alone) in results.items():
        wire = st["bytes_sent"] + st["bytes_received"]
        budget = 1.1 * st["bytes_written"] + 0.01 * size
        t0 = results["direct", conn, direction][0]
        print(f"| {link} | {conn} | {alone:.3f} | {direction} | {t:.3f} | "
              f"{st['bytes_sent'] / (1 << 20):.1f} MiB | {st['bytes_received'] / (1 << 20):.1f} MiB | "
              f"{wire / budget:.2f} | {t / t0:.2f}x |")
    print(f"\nTarget: with {args.rtt_ms:g} ms of round trip, at most 1.5x the time without.")


def _timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()

"""Side by side: a libvirt machine's recovery time, and a tracked cycle of it.

    .venv/bin/python benchmarks/compare_machines.py [--dir DIR] [--size 256M]
                              [--fill 50] [--repeat 3] [--only rto|cycle]

Everything runs against real parts, started here: a private libvirtd (the
tests' tests/libvirtd.py: its own mount and PID namespace) and the tests'
guest (tests/guestkit.py: the Debian kernel under TCG with a busybox
initramfs and qemu-guest-agent, appending checksummed records to its ext4
disk). The guest's disk is made holding a file of random data over --fill
percent of it (so a full compare has data to read: a fresh ext4 is mostly
holes, which every read skips). Each step is a whole `pydr` process.

Part 1 -- RTO to a verified machine. The guest is protected with
`pydr protect --libvirt` and replicated twice while it writes. Then, each
repeat:
  * drill: `pydr test-failover --verify --verify-script
    '/bin/pydr-verify-records /data/records'` (the drill machine boots from
    the point, its guest agent answers, and every record on its disk
    verifies), then cleanup-test-failover;
  * failover: site A's domain is destroyed (the disaster), `pydr failover
    --point latest-processed` (site A is gone) with the same probes brings
    the machine up from the newest point and verifies it;
    the recovered domain is then removed and site A set up again for the
    next repeat (a fresh vault).
The RTO is the command's wall time to its exit with the probe passed; pydr's
own --json gives the parts (materialise, define and start, boot, probes).

Part 2 -- a tracked cycle with 1% of the disk changed, against a full compare
of the same disk (`pydr replicate --resync`: the same backup job, reading
everything). The guest writes 1% of its disk in a new file (dd through its
agent, synced) before each cycle. What QEMU read for the cycle is its
/proc/PID/io rchar before and after (the NBD export is served by QEMU).
Prints Markdown for README.md.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from _images import parse_size  # noqa: E402

MiB = 1 << 20
# the pydr beside this Python (run this with the venv's Python: .venv/bin/python)
PYDR = [os.path.join(os.path.dirname(sys.executable), "pydr")]
# userspace (the guest agent answers), then every record on the disk verified in the guest
VERIFY = ["--verify", "--verify-script", "/bin/pydr-verify-records /data/records"]
PARTS = ("materialise", "define+start", "boot", "probes")  # verification.parts (docs/JSON.md)


def run(*args, env=None, check=True):
    """Run pydr with `args`; returns (seconds, parsed --json or stdout)."""
    t = time.perf_counter()
    p = subprocess.run([*PYDR, *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if check and p.returncode != 0:
        raise SystemExit(f"pydr {' '.join(args)} exited {p.returncode}:\n{p.stderr}{p.stdout}")
    out = p.stdout
    if "--json" in args:
        out = json.loads(out)
    return seconds, out


def verification(out):
    """The passed verification of a `failover`/`test-failover --verify --json`
    operation-result (docs/JSON.md): {"rto", "parts": {...}, ...}."""
    v = out.get("verification")
    if not v or not v.get("passed"):
        raise SystemExit(f"the machine was not verified: {json.dumps(out, indent=1)}")
    return v


class Site:
    """Site A: the private libvirtd, the kit and one guest domain."""

    def __init__(self, directory, size, fill):
        from guestkit import GuestKit, wait_for_console
        from libvirtd import Libvirtd

        self.dir = directory
        self.daemon = Libvirtd(os.path.join(directory, "libvirtd")).start()
        self.kit = GuestKit(os.path.join(directory, "kit"))
        self.size = size
        self.fill = fill
        self.wait_for_console = wait_for_console
        self.name = "bench-vm"

    def start_guest(self):
        """A fresh guest disk and domain, running and writing."""
        disk = os.path.join(self.dir, "vm.qcow2")
        if os.path.exists(disk):
            os.unlink(disk)
        self.make_disk(disk)
        self.console = os.path.join(self.dir, "vm.console")
        xml = self.kit.domain_xml(self.name, disk, console_log=self.console)
        conn = self.daemon.conn()
        dom = conn.defineXML(xml)
        dom.create()
        self.wait_for_console(self.console, r"^PYDR-READY", timeout=300, domain=dom)
        return dom

    def make_disk(self, path):
        """The kit's disk (ext4, an empty /records) with /filler: random
        bytes over `fill` percent of it."""
        with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
            root = os.path.join(tmp, "root")
            os.mkdir(root)
            open(os.path.join(root, "records"), "wb").close()
            with open(os.path.join(root, "filler"), "wb") as f:
                left = self.size * self.fill // 100
                while left > 0:
                    left -= f.write(os.urandom(min(left, 4 * MiB)))
            raw = os.path.join(tmp, "disk.raw")
            subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "pydr-guest", "-d", root, raw,
                            f"{self.size // MiB}M"], check=True, capture_output=True)
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path],
                           check=True, capture_output=True)

    def remove_guest(self):
        """Site A's domain destroyed and undefined (its checkpoints with it)."""
        self.daemon.destroy_undefine(self.name)

    def write_percent(self, percent, n):
        """The guest writes `percent` of its disk into /data/bench-N, synced."""
        count = max(1, int(self.size * percent / 100) // (64 << 10))
        code, out, err = self.daemon.agent_exec(
            self.name, "/bin/sh", "-c",
            f"dd if=/dev/urandom of=/data/bench-{n} bs=64k count={count} conv=fsync 2>&1",
            timeout=600)
        if code != 0:
            raise SystemExit(f"the guest could not write: {out}{err}")
        return count * (64 << 10)

    def qemu_read(self):
        with open(f"/proc/{self.daemon.qemu_pid(self.name)}/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def protect(site, vault, replicas, env):
    """A fresh vault protecting the running guest, replicated twice while it writes."""
    run("vault", "init", vault, env=env)
    run("protect", "bench", "--libvirt", site.name, "--connect", site.daemon.uri,
        "--to", replicas, "--vault", vault, "--json", env=env)
    for _ in range(2):
        run("replicate", "bench", "--vault", vault, "--json", env=env)


def rto_rounds(site, repeat, env):
    rows = {"drill": [], "failover": []}
    for r in range(repeat):
        work = tempfile.mkdtemp(prefix=f"rto{r}-", dir=site.dir)
        vault, replicas, drill = (os.path.join(work, n) for n in ("vault", "replicas", "drill"))
        site.start_guest()
        protect(site, vault, replicas, env)
        seconds, out = run("test-failover", "bench", "--to", drill, *VERIFY, "--connect",
                           site.daemon.uri, "--vault", vault, "--json", env=env)
        rows["drill"].append((seconds, verification(out)))
        run("cleanup-test-failover", "bench", "--vault", vault, "--json", env=env)
        site.daemon.virsh("destroy", site.name)  # the disaster
        # site A is gone: the newest point comes up (the default, --point latest, would
        # first copy the last changes from site A's disk, which survived here)
        seconds, out = run("failover", "bench", "--point", "latest-processed", *VERIFY,
                           "--connect", site.daemon.uri, "--vault", vault, "--json", env=env)
        rows["failover"].append((seconds, verification(out)))
        site.daemon.destroy_undefine(out["machine"]["domain"])  # the recovered machine
        site.remove_guest()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def cycle_rounds(site, repeat, env):
    work = tempfile.mkdtemp(prefix="cycle-", dir=site.dir)
    vault, replicas = os.path.join(work, "vault"), os.path.join(work, "replicas")
    site.start_guest()
    protect(site, vault, replicas, env)
    rows = {"tracked": [], "full": []}
    for r in range(repeat):
        for kind in ("tracked", "full"):
            wrote = site.write_percent(1, f"{kind}{r}")
            before = site.qemu_read()
            args = ["replicate", "bench", "--vault", vault, "--json"]
            if kind == "full":
                args.insert(2, "--resync")
            seconds, out = run(*args, env=env)
            rows[kind].append((seconds, site.qemu_read() - before, wrote, out["bytes_read"]))
    site.remove_guest()
    shutil.rmtree(work, ignore_errors=True)
    return rows


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, unit="s"):
    return "-" if v is None else f"{v:.2f} {unit}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="scratch directory (default: a new one in /tmp)")
    ap.add_argument("--size", default="256M", help="the guest's disk (default 256M)")
    ap.add_argument("--fill", type=int, default=50,
                    help="percent of the disk holding data before protection (default 50)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=("rto", "cycle"))
    args = ap.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="pydr-machines-", dir=args.dir)
    env = dict(os.environ)
    site = Site(directory, parse_size(args.size), args.fill)
    load = os.getloadavg()[0]
    try:
        if args.only in (None, "rto"):
            rows = rto_rounds(site, args.repeat, env)
            print(f"\nRTO to a verified machine ({args.size} guest disk, TCG, median of "
                  f"{args.repeat}; load {load:.1f} -> {os.getloadavg()[0]:.1f})\n")
            print("| command | wall time | pydr's RTO | " + " | ".join(PARTS) + " |")
            print("|---|---:|---:|" + "---:|" * len(PARTS))
            for kind, results in rows.items():
                wall = median(s for s, _ in results)
                rto = median(v["rto"] for _, v in results)
                cells = [fmt(median(v["parts"].get(part) for _, v in results)) for part in PARTS]
                print(f"| {kind} --verify | {fmt(wall)} | {fmt(rto)} | " + " | ".join(cells) + " |")
        if args.only in (None, "cycle"):
            load = os.getloadavg()[0]
            rows = cycle_rounds(site, args.repeat, env)
            print(f"\nA cycle of the libvirt domain with 1% of its {args.size} disk changed "
                  f"({args.fill}% of it data; median of {args.repeat}; load "
                  f"{load:.1f} -> {os.getloadavg()[0]:.1f})\n")
            print("| cycle | time | QEMU read (rchar) | pydr's bytes_read | written by the guest |")
            print("|---|---:|---:|---:|---:|")
            for kind, results in rows.items():
                label = "tracked (checkpoint, dirty extents)" if kind == "tracked" else \
                    "full compare (--resync, same backup job)"
                print(f"| {label} | {fmt(median(r[0] for r in results))} | "
                      f"{median(r[1] for r in results) / MiB:.1f} MiB | "
                      f"{median(r[3] for r in results) / MiB:.1f} MiB | "
                      f"{median(r[2] for r in results) / MiB:.1f} MiB |")
            t = median(r[0] for r in rows["tracked"])
            f = median(r[0] for r in rows["full"])
            print(f"\nfull / tracked: {f / t:.2f}x")
    finally:
        site.daemon.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

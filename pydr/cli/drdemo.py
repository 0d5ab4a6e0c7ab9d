"""``pydr demo``: the disaster-recovery cycle on two real ext4 disk images.

Site A runs a machine with two disks (ext4 images made with mkfs.ext4 -d);
pydr protects them to site B, replicates, drills a test failover, fails over
(planned: nothing lost), commits, lets the machine work at site B, reprotects
(only the differences move back) and fails back; then a VM with a qcow2 disk
is replicated with changed-block tracking (QEMU dirty bitmaps: a cycle reads
what changed), and a VM with a target RPO is replicated by one round of the
service (pydr run --once); finally it pushes the disks to a third site over pydr's
remote protocol, and one disk to a local S3 bucket, encrypted and locked
(pydr.cli.demo_offsite; left out, saying why, without SeaweedFS's weed).
Every step prints what moved
and how long it took; the demo checks itself with hashes and e2fsck -fn.
"""

import hashlib
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from ..dr.check import check_vault
from ..dr.vault import Vault, init_vault
from ..endpoints.transfer import resync
from .common import human_bytes as _human


def _sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _mkfs(work, name, size_mb, seed):
    rng = random.Random(seed)
    tree = os.path.join(work, f"tree-{name}")
    for sub in ("etc", "var/log", "home/demo"):
        os.makedirs(os.path.join(tree, sub))
    for i in range(30):
        with open(os.path.join(tree, "etc", f"app{i}.conf"), "w") as f:
            f.write(f"setting_{i} = {rng.random()}\n" * rng.randrange(5, 200))
    with open(os.path.join(tree, "var/log", "boot.log"), "wb") as f:
        f.write(rng.randbytes(3 << 20))
    img = os.path.join(work, "site-a", f"{name}.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", tree, img, f"{size_mb}M"],
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    return img


def _change(work, img, tag):
    payload = os.path.join(work, "payload.bin")
    with open(payload, "wb") as f:
        f.write(os.urandom(2 << 20))
    script = os.path.join(work, "debugfs.cmds")
    with open(script, "w") as f:
        f.write(f"write {payload} /home/demo/report{tag}.bin\nrm /etc/app{tag}.conf\n"
                f"mkdir /home/demo/d{tag}\n")
    subprocess.run(["debugfs", "-w", "-f", script, img], check=True, capture_output=True)


def _fsck(img):
    return subprocess.run(["e2fsck", "-fn", img], capture_output=True).returncode == 0


def _offsite(work, disks, step, check, say):
    """Site A's disks pushed to a third site with `pydr resync LOCAL host:PATH`,
    pydr's remote protocol end to end: the "remote" `pydr serve --stdio
    --root site-c` runs here through a shell in place of ssh."""
    pydr = os.path.join(os.path.dirname(sys.executable), "pydr")
    if not os.access(pydr, os.X_OK):
        say("  (no pydr script beside this Python: the off-site step is left out)")
        return
    site_c = os.path.join(work, "site-c")
    os.makedirs(site_c, exist_ok=True)
    # what a forced command in authorized_keys would run: confined to site-c
    rsh = shlex.join(["sh", "-c", 'eval "exec $2 --root \\"\\$0\\""', site_c])
    t = time.monotonic()
    sent = 0
    for d in disks:
        sent += resync(d, f"site-c:{os.path.basename(d)}", rsh=rsh, remote_pydr=pydr).bytes_sent
    step("off-site: push both disks to site C", t, sent=_human(sent))
    _change(work, disks[1], 6)
    t = time.monotonic()
    st = resync(disks[1], f"site-c:{os.path.basename(disks[1])}", rsh=rsh, remote_pydr=pydr)
    step("off-site: push the changes again", t, sent=_human(st.bytes_sent),
         received=_human(st.bytes_received))
    copies = [os.path.join(site_c, os.path.basename(d)) for d in disks]
    check("site C equals site A", [_sha(d) for d in disks] == [_sha(c) for c in copies])
    check("the second push sent far less than the disk",
          st.bytes_sent < os.path.getsize(disks[1]) // 4)


def _cbt(work, vault, disk, step, check, say):
    """A VM whose disk is a qcow2 image, replicated with --cbt: the first
    cycle copies it and starts a dirty bitmap; after the VM writes 3 MiB
    (qemu-io), the next cycle reads those blocks, not the disk."""
    if not all(shutil.which(t) for t in ("qemu-img", "qemu-nbd", "qemu-io")):
        say("  (qemu-img, qemu-nbd or qemu-io missing: the changed-block tracking step is "
            "left out; scripts/bootstrap installs them)")
        return
    image = os.path.join(work, "site-a", "vm2.qcow2")
    replica = os.path.join(work, "site-b", "vm2.img")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", disk, image], check=True,
                   capture_output=True)
    t = time.monotonic()
    vault.protect("vm2", [(image, replica)], cbt=True)
    r = vault.replicate("vm2")
    first_point = r.point_id
    step("qcow2 VM: protect --cbt + first copy", t, written=_human(r.bytes_written))
    first = _raw_sha(work, image)
    # the VM writes 3 MiB near the end of its disk (free space of its ext4)
    size = os.path.getsize(disk)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {size - (4 << 20)} 3M",
                    image], check=True, capture_output=True)
    t = time.monotonic()
    r = vault.replicate("vm2")
    step("qcow2 VM: tracked cycle (dirty bitmap)", t, written=_human(r.bytes_written),
         read=_human(r.bytes_read))
    check("the replica equals qemu-img convert -O raw", _raw_sha(work, image) == _sha(replica))
    # 4 KiB dirty bitmaps, and each byte read once: what the VM wrote, no more
    check("the tracked cycle read the 3 MiB written once, not the disk",
          r.bytes_read <= (3 << 20) + (64 << 10))
    check("the replica passes e2fsck -fn", _fsck(replica))
    tracking = vault.status("vm2").disks[0].tracking
    say(f"  tracking: {tracking.mode}, bitmap {tracking.bitmap}, "
        f"{_human(tracking.granularity)} granules")
    # a drill of the first point as a qcow2 overlay on the replica: it holds
    # only the blocks that differ, and QEMU could boot it as it is
    t = time.monotonic()
    res = vault.test_failover("vm2", os.path.join(work, "drill-vm2"), point=first_point,
                              method="qcow2")
    overlay, = res.paths
    step("qcow2 VM: drill --as qcow2 (an overlay)", t, method=res.method,
         size=_human(os.stat(overlay).st_blocks * 512))
    check("the overlay shows the first point", _raw_sha(work, overlay) == first)
    vault.cleanup_test_failover("vm2")


def _service_round(work, vault_dir, step, check, say):
    """A second VM is protected (--cbt) with a target RPO of 10 s; one round
    of the service (``pydr run --once``) replicates it -- and only it: it has
    no point yet, the other items have no target -- and a second round finds
    nothing due."""
    from ..dr.service import Service

    first = os.path.join(work, "site-a", "vm2.qcow2")
    if not os.path.exists(first):  # no QEMU tools: the VM step was left out
        return
    image = os.path.join(work, "site-a", "vm3.qcow2")
    shutil.copyfile(first, image)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x6b 1M 1M", image], check=True,
                   capture_output=True)
    with Vault(vault_dir, writer=True) as v:
        v.protect("vm3", [(image, os.path.join(work, "site-b", "vm3.img"))], cbt=True,
                  policy={"target_rpo": 10})
    t = time.monotonic()
    result = Service(vault_dir, warm=False).run_once()
    step("pydr run --once (a VM with target 10 s)", t, replicated=",".join(result.succeeded),
         not_scheduled=len(result.skipped))
    check("the round replicated that VM, and only it",
          result.succeeded == ["vm3"] and not result.failed and result.exit_code() == 0)
    with Vault(vault_dir) as v:
        st = v.status("vm3")
    check("its point holds the VM's disk",
          st.latest_point is not None and _raw_sha(work, image) == _sha(st.disks[0].replica))
    check("the VM is within its target RPO", st.rpo_health == "ok")
    again = Service(vault_dir, warm=False).run_once()
    check("a second round finds nothing due", not again.due and "vm3" in again.skipped)


def _raw_sha(work, image):
    raw = os.path.join(work, "converted.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", image, raw], check=True,
                   capture_output=True)
    try:
        return _sha(raw)
    finally:
        os.unlink(raw)


def run_dr_demo(directory, *, keep=False, as_json=False):
    temporary = directory is None
    work = tempfile.mkdtemp(prefix="pydr-demo-") if temporary else os.path.abspath(directory)
    os.makedirs(work, exist_ok=True)
    steps, checks = [], []
    say = (lambda *a: None) if as_json else (lambda *a: print(*a, flush=True))

    def step(name, started, **facts):
        seconds = time.monotonic() - started
        steps.append({"step": name, "seconds": round(seconds, 4), **facts})
        detail = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in facts.items())
        say(f"  {name:<40} {seconds:7.3f} s   {detail}")

    def check(what, ok):
        checks.append({"check": what, "ok": bool(ok)})
        say(f"  check: {what}: {'yes' if ok else 'NO'}")

    try:
        say(f"pydr demo: disaster recovery of a two-disk machine, in {work}")
        for site in ("site-a", "site-b"):
            os.makedirs(os.path.join(work, site), exist_ok=True)
        t = time.monotonic()
        disks = [_mkfs(work, "os", 48, 1), _mkfs(work, "data", 32, 2)]
        replicas = [os.path.join(work, "site-b", os.path.basename(d)) for d in disks]
        step("site A: two ext4 disks (mkfs.ext4 -d)", t,
             size=_human(sum(os.path.getsize(d) for d in disks)))
        vault_dir = os.path.join(work, "vault")
        init_vault(vault_dir)
        with Vault(vault_dir, writer=True) as v:
            t = time.monotonic()
            v.protect("vm", list(zip(disks, replicas)), retention=10)
            r = v.replicate("vm")
            step("protect + initial replication", t, written=_human(r.bytes_written),
                 point=r.point_id)

            t = time.monotonic()
            _change(work, disks[0], 1)
            _change(work, disks[1], 2)
            step("site A: files written and removed", t)
            t = time.monotonic()
            r = v.replicate("vm")
            step("delta replication", t, written=_human(r.bytes_written), point=r.point_id)
            check("the replicas equal the disks", [_sha(d) for d in disks] == [_sha(x) for x in replicas])

            t = time.monotonic()
            scrub = v.verify("vm")  # every step read back and checked, as a restore reads it
            step("verify the recovery points", t, steps=scrub["checked"],
                 read=_human(scrub["bytes"]))
            check("every step and signature cache is sound", not scrub["problems"])
            check("pydr vault check finds nothing wrong", check_vault(vault_dir).ok)

            t = time.monotonic()
            drill = os.path.join(work, "drill")
            paths = v.test_failover("vm", drill, point=1).paths
            step("test failover (drill) to point 1", t, disks=len(paths))
            check("the drill's disks pass e2fsck -fn", all(_fsck(p) for p in paths))
            t = time.monotonic()
            v.cleanup_test_failover("vm")
            step("cleanup test failover", t)

            t = time.monotonic()
            _change(work, disks[0], 3)  # written just before the failover
            before = [_sha(d) for d in disks]
            res = v.failover("vm", planned=True, shutdown_hook="true")
            step("planned failover to site B", t, point=res.point)
            check("nothing lost: site B holds site A's last state",
                  [_sha(x) for x in replicas] == before)
            t = time.monotonic()
            v.commit("vm")
            step("commit (site B active, direction reverse)", t)

            t = time.monotonic()
            _change(work, replicas[1], 4)
            step("site B: the machine works there", t)
            t = time.monotonic()
            res = v.reprotect("vm")
            step("reprotect B -> A (differences only)", t,
                 written=_human(res.cycle.bytes_written), compared=_human(res.cycle.bytes_read))
            check("reprotect moved far less than the disks",
                  res.cycle.bytes_written < sum(os.path.getsize(d) for d in disks) // 4)

            t = time.monotonic()
            _change(work, replicas[0], 5)
            site_b = [_sha(x) for x in replicas]
            res = v.failback("vm", shutdown_hook="true")
            step("planned failback to site A", t, point=res.point)
            check("nothing lost: site A holds site B's last state", [_sha(d) for d in disks] == site_b)
            check("site A's disks pass e2fsck -fn", all(_fsck(d) for d in disks))
            t = time.monotonic()
            v.commit("vm")
            res = v.reprotect("vm")
            step("commit + reprotect A -> B", t, written=_human(res.cycle.bytes_written))
            st = v.status("vm")
            check("back to the start: protected, direction forward",
                  (st.state, st.direction) == ("protected", "forward"))
            check("status gives the RPO of the new point",
                  st.latest_point == res.point and st.rpo_seconds is not None
                  and st.rpo_seconds >= 0)
            _cbt(work, v, disks[1], step, check, say)
            from .fleetdemo import fleet_step

            fleet_step(work, v, disks[1], step, check, say, _sha)
        _service_round(work, vault_dir, step, check, say)
        with Vault(vault_dir) as v:
            jobs = len(v.jobs())
        _offsite(work, disks, step, check, say)
        from .demo_offsite import object_store_step

        object_store_step(work, disks[1], step, check, say, _sha)
        ok = all(c["ok"] for c in checks)
        say(f"  {jobs} jobs recorded in the vault ('pydr jobs --vault {vault_dir}')")
        if as_json:
            json.dump({"directory": work, "steps": steps, "checks": checks, "check_passed": ok},
                      sys.stdout, indent=2)
            sys.stdout.write("\n")
        if not ok:
            print("pydr: demo check failed: " + ", ".join(c["check"] for c in checks if not c["ok"]),
                  file=sys.stderr)
            return 1
        return 0
    finally:
        if temporary and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not as_json:
            print(f"  files kept in {work}")

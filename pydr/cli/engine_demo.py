"""``pydr demo`` without e2fsprogs: the engine end to end on a generated
sample image (the disaster-recovery walk-through is pydr.cli.drdemo).

Each step prints what it did, what it moved and how long it took; the demo
checks its own result (every block it modified must show up in the diff) and
fails loudly if it does not.
"""

import json
import os
import random
import shutil
import sys
import tempfile
import time

from ..engine.apply import apply_delta
from ..engine.delta import make_delta
from ..engine.resync import resync
from ..engine.signatures import Signature, signature
from .common import human_bytes as _human


def run_demo(directory, size, *, keep=False, as_json=False, threads=None):
    """The disaster-recovery walk-through on real ext4 images when e2fsprogs
    is installed; otherwise the engine walk-through on a sample image."""
    if all(shutil.which(t) for t in ("mkfs.ext4", "debugfs", "e2fsck")):
        from .drdemo import run_dr_demo

        return run_dr_demo(directory, keep=keep, as_json=as_json)
    if not as_json:
        print("(mkfs.ext4/debugfs not found: showing the engine on a sample image instead; "
              "install e2fsprogs for the disaster-recovery walk-through)")
    return run_engine_demo(directory, size, keep=keep, as_json=as_json, threads=threads)


def run_engine_demo(directory, size, *, keep=False, as_json=False, threads=None):
    from ..engine.sample import make_image

    temporary = directory is None
    work = tempfile.mkdtemp(prefix="pydr-demo-") if temporary else directory
    os.makedirs(work, exist_ok=True)
    steps = []
    say = (lambda *a: None) if as_json else (lambda *a: print(*a, flush=True))

    def step(name, seconds, **facts):
        steps.append({"step": name, "seconds": round(seconds, 4), **facts})
        detail = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in facts.items())
        say(f"  {name:<28} {seconds:7.3f} s   {detail}")

    try:
        image = os.path.join(work, "disk.img")
        replica = os.path.join(work, "replica.img")
        replica2 = os.path.join(work, "replica2.img")
        say(f"pydr demo in {work}")
        t = time.monotonic()
        make_image(image, size, seed=7, allocated=0.6)
        used = os.stat(image).st_blocks * 512
        step("generate sample image", time.monotonic() - t,
             size=_human(size), allocated=_human(used))

        st = resync(image, replica, threads=threads)
        step("initial resync to replica", st.seconds, written=_human(st.bytes_written),
             holes=_human(st.bytes_zeroed))
        shutil.copyfile(replica, replica2)

        sig1 = signature(image, threads=threads)
        sig1.save(os.path.join(work, "disk.sig"))
        st = sig1.stats
        step("sign (64 KiB blocks)", st.seconds, read=_human(st.bytes_read),
             holes_skipped=_human(st.bytes_skipped), zero_blocks=sig1.zero_blocks,
             threads=st.threads)

        rng = random.Random(11)
        modified = sorted(rng.randrange(size // 4096) * 4096 for _ in range(48))
        t = time.monotonic()
        with open(image, "r+b") as f:
            for off in modified:
                f.seek(off)
                f.write(rng.randbytes(4096))
            run = (size // 3) // 4096 * 4096
            f.seek(run)
            f.write(rng.randbytes(1 << 20))
            modified.append(run)
        step("modify image", time.monotonic() - t,
             writes=f"{len(modified) - 1} x 4 KiB + 1 MiB run")

        sig2 = signature(image, threads=threads)
        step("sign again", sig2.stats.seconds, read=_human(sig2.stats.bytes_read))

        t = time.monotonic()
        ranges = Signature.load(os.path.join(work, "disk.sig")).diff(sig2)
        changed = int(ranges[:, 1].sum()) if len(ranges) else 0
        step("diff signatures", time.monotonic() - t, ranges=len(ranges),
             changed=_human(changed), of_image=f"{100 * changed / size:.2f}%")

        rs = resync(image, replica, threads=threads, signature_cache=os.path.join(work, "replica.sig"))
        step("resync changes to replica", rs.seconds, read=_human(rs.bytes_read),
             written=_human(rs.bytes_written), blocks=rs.blocks_changed)

        t = time.monotonic()
        ds = make_delta(image, os.path.join(work, "changes.delta"), target=replica2,
                        threads=threads)
        step("make delta for replica2", time.monotonic() - t, records=ds.records,
             delta=_human(ds.delta_bytes))
        ap = apply_delta(os.path.join(work, "changes.delta"), replica2)
        step("apply delta (journaled)", ap.seconds, written=_human(ap.bytes_written),
             journal=_human(ap.journal_bytes))

        def covered(off):
            return any(int(o) <= off < int(o) + int(n) for o, n in ranges)

        def same(a, b):
            with open(a, "rb") as fa, open(b, "rb") as fb:
                while True:
                    x, y = fa.read(1 << 20), fb.read(1 << 20)
                    if x != y:
                        return False
                    if not x:
                        return True

        missing = [off for off in modified if not covered(off)]
        equal = same(image, replica) and same(image, replica2)
        ok = not missing and equal and rs.bytes_written <= 2 * 4096 * len(modified) + (1 << 20)
        say(f"  check: every modified block is in the diff: {'yes' if not missing else 'NO'}")
        say(f"  check: both replicas equal the image, resync wrote only the changed blocks: "
            f"{'yes' if ok else 'NO'}")
        if as_json:
            json.dump({"directory": work, "steps": steps, "changed_bytes": changed,
                       "check_passed": ok}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        if not ok:
            print(f"pydr: demo check failed (missing in diff: {missing[:5]}, replicas equal: "
                  f"{equal})", file=sys.stderr)
            return 1
        return 0
    finally:
        if temporary and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not as_json:
            print(f"  files kept in {work}")


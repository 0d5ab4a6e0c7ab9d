"""``pydr demo``: the main job end to end on a generated sample image.

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

from .signatures import Signature, signature


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def run_demo(directory, size, *, keep=False, as_json=False, threads=None):
    from .sample import make_image

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
        say(f"pydr demo in {work}")
        t = time.monotonic()
        make_image(image, size, seed=7, allocated=0.6)
        used = os.stat(image).st_blocks * 512
        step("generate sample image", time.monotonic() - t,
             size=_human(size), allocated=_human(used))

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

        def covered(off):
            return any(int(o) <= off < int(o) + int(n) for o, n in ranges)

        missing = [off for off in modified if not covered(off)]
        ok = not missing
        say(f"  check: every modified block is in the diff: {'yes' if ok else 'NO'}")
        if as_json:
            json.dump({"directory": work, "steps": steps, "changed_bytes": changed,
                       "check_passed": ok}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        if not ok:
            print(f"pydr: demo check failed: offsets {missing[:5]} not found", file=sys.stderr)
            return 1
        return 0
    finally:
        if temporary and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not as_json:
            print(f"  files kept in {work}")

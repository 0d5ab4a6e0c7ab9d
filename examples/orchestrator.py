"""A small DR orchestrator for two machines, written against ``import pydr``
alone: what a higher-level DR tool does with pydr's Python API.

    python examples/orchestrator.py [WORKDIR]

Site A runs two machines, "db" and "web", one disk each. The orchestrator
protects both to site B in one recovery plan, replicates them (printing
each item's outcome and the RPO it achieves), cancels a long cycle and runs
it again, drills the plan, fails "db" over, commits, reprotects and fails
back. It checks its own results (every disk byte-exact where it must be) and
exits non-zero if one fails.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading

import pydr


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def scribble(path: str, seed: int, size: int) -> None:
    """Machine work: 64 KiB written at a few places of the disk."""
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        f.truncate(size)
        for i in range(8):
            f.seek((seed * 7919 + i * 1048573) % (size - 65536))
            f.write(os.urandom(65536))


def main(work: str) -> int:
    failures: list[str] = []

    def check(what: str, ok: bool) -> None:
        print(f"check: {what}: {'yes' if ok else 'NO'}")
        if not ok:
            failures.append(what)

    a, b = os.path.join(work, "site-a"), os.path.join(work, "site-b")
    for site in (a, b):
        os.makedirs(site)
    disks = {m: (os.path.join(a, f"{m}.img"), os.path.join(b, f"{m}.img")) for m in ("db", "web")}
    sizes = {"db": 8 << 20, "web": 64 << 20}  # web's is the big disk
    for n, (machine, (src, _)) in enumerate(disks.items()):
        scribble(src, n, sizes[machine])
    pydr.init_vault(os.path.join(work, "vault"))
    with pydr.Vault(os.path.join(work, "vault"), writer=True, lock_timeout=5) as v:
        for machine, pair in disks.items():
            v.protect(machine, [pair], retention=5)
        v.create_plan("shop", [["db"], ["web"]])  # db comes up first

        # a cycle: one outcome per item, progress as typed events
        seen: list[pydr.Event] = []
        cycle = v.replicate(["db", "web"], events=seen.append)
        for item, outcome in cycle.by_item.items():
            print(f"{item}: {outcome.status}, point {outcome.point_id}")
        check("both machines have a point", not cycle.failed)
        check("events name each item", {e.item for e in seen} >= {"db", "web"})
        status = v.status("db")
        print(f"db: RPO {status.rpo_seconds:.1f} s, data of {status.latest_point_at:%H:%M:%S} UTC")
        check("RPO is measured from the cut", status.rpo_seconds is not None
              and status.rpo_seconds >= 0 and status.latest_point == cycle.point_id)

        # cancel a long cycle once its data moves (an operator's "stop"); the rerun finishes it
        scribble(disks["web"][0], 5, sizes["web"])
        stop = threading.Event()
        try:
            v.replicate("web", cancel=stop, events=lambda e: stop.set()
                        if e.kind == "progress" and e.phase == "transfer" else None)
            check("the cycle was cancelled", False)
        except pydr.Cancelled:
            check("the cycle was cancelled", True)
        check("it left no point, its job cancelled", v.status("web").point_count == 1
              and v.jobs(item="web", limit=1)[0].state == "cancelled")
        v.replicate("web")
        check("the rerun finished web exactly", sha(disks["web"][0]) == sha(disks["web"][1]))

        # a drill of the whole plan, checked, then cleaned up
        drill = os.path.join(work, "drill")  # each item's disks in drill/ITEM/
        report = v.run_plan("shop", "test-failover", directory=drill)
        check("the drill ran every item", report.ok and set(report.outcomes) == set(disks))
        check("the drill's disks are the replicas' data", all(
            sha(os.path.join(drill, m, f"{m}.img")) == sha(rep) for m, (_, rep) in disks.items()))
        v.run_plan("shop", "cleanup-test-failover")

        # db's site A is lost: fail over to the latest point, commit, work at B
        before = sha(disks["db"][1])
        result = v.failover("db")
        check("db failed over to its latest point", result.point == v.status("db").latest_point)
        check("site B holds db's replicated data", sha(disks["db"][1]) == before)
        v.commit("db")
        scribble(disks["db"][1], 9, sizes["db"])  # db works at site B
        v.reprotect("db")  # site A is back: B -> A, differences only
        v.failback("db", shutdown_hook="true")
        check("site A holds what db wrote at B", sha(disks["db"][0]) == sha(disks["db"][1]))
        v.commit("db")
        v.reprotect("db")
        check("db is protected A -> B again", v.status("db").direction == "forward")
        jobs = v.jobs(item="db", limit=3)
        print("db's last jobs:", ", ".join(f"{j.kind} {j.state}" for j in jobs))
    print("all checks passed" if not failures else f"FAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(sys.argv[1]))
    with tempfile.TemporaryDirectory(prefix="pydr-orchestrator-") as tmp:
        sys.exit(main(tmp))

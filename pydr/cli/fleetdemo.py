"""The fleet step of `pydr demo`: four machines on two emulated hosts,
replicated through a Dask cluster (a scheduler and one worker per host, in
this process), each cycle run by its host's worker."""

import logging
import os
import shutil
import time


def fleet_step(work, vault, disk, step, check, say, sha):
    try:
        from distributed import Scheduler, SpecCluster, Worker
    except ImportError:
        say("  (Dask distributed missing: the fleet step is left out; "
            "pip install 'pydr[fleet]')")
        return
    from ..dr.fleet import Fleet

    hosts = ("hv01", "hv02")
    items = []
    for n in range(4):
        host = hosts[n % 2]
        os.makedirs(os.path.join(work, host), exist_ok=True)
        source = os.path.join(work, host, f"web{n}.img")
        shutil.copyfile(disk, source)
        with open(source, "r+b") as f:  # each machine a little different
            f.seek((n + 1) << 20)
            f.write(os.urandom(64 << 10))
        replica = os.path.join(work, "site-b", f"web{n}.img")
        vault.protect(f"web{n}", [(source, replica)], host=host)
        items.append((f"web{n}", host, source, replica))
    workers = {f"worker-{h}": {"cls": Worker, "options": {
        "nthreads": 1, "resources": {f"pydr-host-{h}": 1}}} for h in hosts}
    t = time.monotonic()
    with SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {
            "host": "127.0.0.1", "dashboard_address": None}},
            silence_logs=logging.CRITICAL) as c:  # a failed task is the demo's own check
        with Fleet(c.scheduler_address, host_timeout=60) as fleet:
            r = vault.replicate([i[0] for i in items], executor=fleet.executor())
            step("fleet: 4 machines on 2 hosts via Dask", t, point=r.point_id,
                 written=f"{r.bytes_written / (1 << 20):.2f} MiB")
            check("each replica equals its machine's disk",
                  all(sha(s) == sha(d) for _, _, s, d in items))
            ran = {j.item: j.host for j in vault.jobs() if j.kind == "replicate"
                   and j.id in r.jobs}
            check("each cycle ran on its own host's worker",
                  all(ran[n] == h for n, h, _, _ in items))
            _one_machine_lost(vault, fleet, items, step, check)


def _one_machine_lost(vault, fleet, items, step, check):
    """One machine's disk disappears: the other three still get their
    points; the lost one carries its own error, and once its disk is back
    the same call finishes it."""
    from ..errors import CycleFailed

    lost, _, source, _ = items[-1]
    os.rename(source, source + ".gone")
    names = [i[0] for i in items]
    before = {n: len(vault.points(n)) for n in names}
    t = time.monotonic()
    try:
        vault.replicate(names, executor=fleet.executor())
        outcomes = {}
    except CycleFailed as exc:
        outcomes = exc.result.by_item
    failed = sorted(n for n, o in outcomes.items() if o.status == "failed")
    step("fleet: one machine's disk lost", t, failed=", ".join(failed) or "none")
    check("the other machines got their points and stay healthy",
          all(len(vault.points(n)) == before[n] + 1 and vault.item(n).health == "ok"
              for n in names if n != lost))
    check(f"{lost} failed alone, with its own error", failed == [lost] and
          os.path.basename(source) in (vault.item(lost).last_error or ""))
    os.rename(source + ".gone", source)
    t = time.monotonic()
    r = vault.replicate(names, executor=fleet.executor())
    step("fleet: the disk is back, same call again", t, point=r.point_id)
    check(f"{lost} is protected again", vault.item(lost).health == "ok" and
          len(vault.points(lost)) == before[lost] + 1)

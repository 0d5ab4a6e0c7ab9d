"""Every operation, killed at every crash point it passes (tests/crashmatrix.py
says what is checked after each kill): apply, resync, rollback, a push and a
pull over the protocol (killing the server), a replication cycle of an item
and of a group (with retention), test failover and its clean-up, planned and
unplanned failover, change-point, commit, reprotect, failback (also with an
alternate path) and a recovery plan. The last test checks that the matrix
reaches every point of the registry."""

import os
import random
import subprocess

import pytest

import pydr
from pydr.dr.vault import Vault, init_vault
from pydr.engine import crashpoints

from conftest import LOCAL_RSH, PYDR, sha
from disks import scribble
from crashmatrix import Scenario, run, run_matrix

REACHED = {}  # scenario name -> points it passed (the registry test reads it)
SIZES = (1 << 20, 768 << 10)  # two small disks: the matrix is about steps, not bytes


def machine(work, items=(("vm", None),), cycles=3, retention=3):
    """Items with two disks each at site A, replicated `cycles` times to site
    B with changes in between; ctx with the history of every point."""
    for site in ("site-a", "site-b"):
        (work / site).mkdir(exist_ok=True)
    vault = work / "vault"
    init_vault(vault)
    ctx = {"vault": str(vault), "items": [n for n, _ in items], "history": {}, "work": work}
    with Vault(vault, writer=True) as v:
        for name, group in items:
            disks = []
            for i, size in enumerate(SIZES):
                src = work / "site-a" / f"{name}-{i}.img"
                src.write_bytes(random.Random(f"{name}{i}").randbytes(size))
                disks.append((str(src), str(work / "site-b" / src.name)))
            v.protect(name, disks, group=group, retention=retention)
            ctx["history"][name] = {}
        groups = {}
        for name, group in items:
            groups.setdefault(group or name, []).append(name)
        for cycle in range(cycles):
            for k, name in enumerate(ctx["items"]):
                for d in v.disks(name) if cycle else ():
                    scribble(d["source"], 100 * cycle + k, blocks=12)
            for batch in groups.values():
                res = v.replicate(batch)
                for n in batch:
                    ctx["history"][n][res.point_id] = [sha(d["source"]) for d in v.disks(n)]
    return ctx


def sources(ctx, item="vm"):
    with Vault(ctx["vault"]) as v:
        return [d["source"] for d in v.disks(item)], [d["replica"] for d in v.disks(item)]


def hashes(paths):
    return [sha(p) for p in paths]


def vault_args(ctx):
    return ["--vault", ctx["vault"]]


def state(ctx, item="vm"):
    with Vault(ctx["vault"]) as v:
        return v.item(item)["state"], v.item(item)["direction"]


# -- the scenarios ------------------------------------------------------------------


def prepare_changed(work):
    ctx = machine(work)
    for s in sources(ctx)[0]:
        scribble(s, 7, blocks=12)
    return ctx


def check_replicated(ctx):
    src, rep = sources(ctx)
    assert hashes(src) == hashes(rep)
    assert state(ctx)[0] == "protected"


def prepare_group(work):
    ctx = machine(work, items=(("vm", "shop"), ("db", "shop")))
    for item in ctx["items"]:
        for s in sources(ctx, item)[0]:
            scribble(s, 8, blocks=12)
    return ctx


def check_group(ctx):
    for item in ctx["items"]:
        src, rep = sources(ctx, item)
        assert hashes(src) == hashes(rep), item


def prepare_drilled(work):
    ctx = machine(work)
    with Vault(ctx["vault"], writer=True) as v:
        v.test_failover("vm", str(work / "drill"), point=2)
    return ctx


def check_drill(ctx):
    drill = ctx["work"] / "drill"
    src, rep = sources(ctx)
    assert hashes([drill / os.path.basename(r) for r in rep]) == ctx["history"]["vm"][1]
    assert hashes(rep) == ctx["history"]["vm"][3]  # the replicas stay as they were


def check_cleaned(ctx):
    assert not (ctx["work"] / "drill").exists()
    with Vault(ctx["vault"]) as v:
        assert v.item("vm")["test_dir"] is None


def check_planned(ctx):
    src, rep = sources(ctx)
    assert hashes(rep) == hashes(src)  # nothing lost
    assert state(ctx) == ("failed-over", "forward")


def check_at_point(pid):
    def check(ctx):
        assert hashes(sources(ctx)[1]) == ctx["history"]["vm"][pid]
        assert state(ctx)[0] == "failed-over"
    return check


def prepare_failed_over(work):
    ctx = machine(work)
    with Vault(ctx["vault"], writer=True) as v:
        v.failover("vm", "2")
    scribble(sources(ctx)[1][0], 9, blocks=12)  # the machine works at site B
    return ctx


def check_committed(ctx):
    src, rep = sources(ctx)
    assert state(ctx) == ("failover-committed", "reverse")
    assert not any(n.endswith(".pydr-base") for n in os.listdir(ctx["work"] / "site-b"))
    with Vault(ctx["vault"]) as v:
        assert not v.db.execute("SELECT 1 FROM steps WHERE item='vm'").fetchone()
    assert not os.listdir(os.path.join(ctx["vault"], "undo", "vm"))


def prepare_committed(work):
    ctx = prepare_failed_over(work)
    with Vault(ctx["vault"], writer=True) as v:
        v.commit("vm")
    return ctx


def check_reprotected(ctx):
    src, rep = sources(ctx)  # swapped: site B is the source now
    assert "site-b" in src[0] and hashes(src) == hashes(rep)
    assert state(ctx) == ("protected", "reverse")


def prepare_reprotected(work):
    ctx = prepare_committed(work)
    with Vault(ctx["vault"], writer=True) as v:
        pid = v.reprotect("vm").point
    ctx["history"]["vm"][pid] = hashes(sources(ctx)[0])
    for s in sources(ctx)[0]:
        scribble(s, 11, blocks=12)  # site B goes on working
    return ctx


def check_failed_back(ctx):
    src, rep = sources(ctx)
    assert hashes(rep) == hashes(src)  # site A holds site B's last state: nothing lost
    assert state(ctx) == ("failed-over", "reverse")


def check_failed_back_to_alternate(ctx):
    check_failed_back(ctx)
    assert sources(ctx)[1][0] == str(ctx["work"] / "site-a2" / "vm-0.img")


def prepare_plan(work):
    ctx = machine(work, items=(("vm", None), ("db", None)))
    with Vault(ctx["vault"], writer=True) as v:
        v.create_plan("shop", [{"items": ["db"]}, {"items": ["vm"]}])
    return ctx


def check_plan(ctx):
    for item in ctx["items"]:
        src, rep = sources(ctx, item)
        assert hashes(rep) == hashes(src), item
        assert state(ctx, item)[0] == "failed-over"


def prepare_images(work):
    rng = random.Random(5)
    old = rng.randbytes(3 << 20)
    new = bytearray(old)
    for off in range(0, len(new), 256 << 10):
        new[off:off + 40_000] = rng.randbytes(40_000)
    new += rng.randbytes(100_000)  # and it grows
    (work / "old.img").write_bytes(old)
    (work / "new.img").write_bytes(bytes(new))
    (work / "target.img").write_bytes(old)
    pydr.make_delta(work / "new.img", work / "d.delta", target=work / "old.img")
    return {"work": work}


def check_target_is_new(ctx):
    assert sha(ctx["work"] / "target.img") == sha(ctx["work"] / "new.img")


def prepare_interrupted_apply(work):
    ctx = prepare_images(work)
    r = run(["apply", work / "d.delta", work / "target.img"], work,
            {"PYDR_CRASH_AT": "apply.written"})
    assert r.returncode == -9
    return ctx


def check_rolled_back(ctx):
    assert sha(ctx["work"] / "target.img") == sha(ctx["work"] / "old.img")


# -- copy-on-write methods: qcow2 overlays (any file system), reflink (XFS) ---------


def raw_hashes(paths, ctx):
    """sha of each disk as QEMU reads it (an overlay through its backing)."""
    out = []
    for p in paths:
        raw = ctx["work"] / "converted.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(p), str(raw)], check=True)
        out.append(sha(raw))
        raw.unlink()
    return out


def last_method(ctx, kind):
    with Vault(ctx["vault"]) as v:
        return [j for j in v.store.jobs() if j["kind"] == kind and j["state"] == "succeeded"][-1][
            "method"]


def check_overlays_at(pid, kind="failover"):
    def check(ctx):
        rep = sources(ctx)[1]
        assert all(open(r, "rb").read(4) == b"QFI\xfb" for r in rep)
        assert raw_hashes(rep, ctx) == ctx["history"]["vm"][pid]
        assert state(ctx)[0] == "failed-over" and last_method(ctx, kind) == "qcow2"
    return check


def prepare_overlay_failed_over(work):
    ctx = machine(work)
    with Vault(ctx["vault"], writer=True) as v:
        v.failover("vm", "2", method="qcow2")
    # the VM writes into its overlay at site B
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 64k 128k",
                    sources(ctx)[1][0]], check=True, capture_output=True)
    ctx["expected"] = raw_hashes(sources(ctx)[1], ctx)
    return ctx


def check_flattened(ctx):
    check_committed(ctx)
    rep = sources(ctx)[1]
    assert all(open(r, "rb").read(4) != b"QFI\xfb" for r in rep)  # raw again
    assert hashes(rep) == ctx["expected"]  # with what the VM wrote into the overlay


def check_overlay_drill(ctx):
    drill = ctx["work"] / "drill"
    rep = sources(ctx)[1]
    assert raw_hashes([drill / os.path.basename(r) for r in rep], ctx) == ctx["history"]["vm"][1]
    assert hashes(rep) == ctx["history"]["vm"][3]
    assert last_method(ctx, "test-failover") == "qcow2"


def reflinked(check, kind):
    def both(ctx):
        check(ctx)
        assert last_method(ctx, kind) == "reflink"
    return both


def prepare_failed_over_reflink(work):
    ctx = prepare_failed_over(work)
    assert last_method(ctx, "failover") == "reflink"
    return ctx


REMOTE = ["--rsh", LOCAL_RSH, "--remote-pydr", PYDR]

SCENARIOS = [
    Scenario("replicate", prepare_changed, lambda c: ["replicate", "vm", *vault_args(c)],
             check_replicated),
    Scenario("replicate --group", prepare_group,
             lambda c: ["replicate", "--group", "shop", *vault_args(c)], check_group),
    Scenario("test-failover", lambda w: machine(w),
             lambda c: ["test-failover", "vm", "--to", c["work"] / "drill", "--point", "1",
                        *vault_args(c)], check_drill),
    Scenario("cleanup-test-failover", prepare_drilled,
             lambda c: ["cleanup-test-failover", "vm", *vault_args(c)], check_cleaned),
    Scenario("failover --planned", prepare_changed,
             lambda c: ["failover", "vm", "--planned", "--shutdown-hook", "true", *vault_args(c)],
             check_planned),
    Scenario("failover --point 2", lambda w: machine(w),
             lambda c: ["failover", "vm", "--point", "2", *vault_args(c)], check_at_point(2)),
    Scenario("change-point", prepare_failed_over,
             lambda c: ["change-point", "vm", "--point", "1", *vault_args(c)], check_at_point(1)),
    Scenario("commit", prepare_failed_over, lambda c: ["commit", "vm", *vault_args(c)],
             check_committed),
    Scenario("reprotect", prepare_committed, lambda c: ["reprotect", "vm", *vault_args(c)],
             check_reprotected),
    Scenario("failback", prepare_reprotected,
             lambda c: ["failback", "vm", "--shutdown-hook", "true", *vault_args(c)],
             check_failed_back),
    Scenario("failback --alternate", prepare_reprotected,
             lambda c: ["failback", "vm", "--alternate",
                        f"{c['work'] / 'site-a' / 'vm-0.img'}={c['work'] / 'site-a2' / 'vm-0.img'}",
                        *vault_args(c)], check_failed_back_to_alternate),
    Scenario("plan failover", prepare_plan,
             lambda c: ["plan", "failover", "shop", "--planned", *vault_args(c)], check_plan),
    Scenario("failover --as qcow2", lambda w: machine(w),
             lambda c: ["failover", "vm", "--point", "2", "--as", "qcow2", *vault_args(c)],
             check_overlays_at(2)),
    Scenario("change-point (qcow2)", prepare_overlay_failed_over,
             lambda c: ["change-point", "vm", "--point", "1", *vault_args(c)],
             check_overlays_at(1, "change-point")),
    Scenario("commit (qcow2 overlay)", prepare_overlay_failed_over,
             lambda c: ["commit", "vm", *vault_args(c)], check_flattened),
    Scenario("test-failover --as qcow2", lambda w: machine(w),
             lambda c: ["test-failover", "vm", "--to", c["work"] / "drill", "--point", "1",
                        "--as", "qcow2", *vault_args(c)], check_overlay_drill),
    Scenario("failover (reflink, XFS)", lambda w: machine(w),
             lambda c: ["failover", "vm", "--point", "2", *vault_args(c)],
             reflinked(check_at_point(2), "failover"), fs="xfs"),
    Scenario("change-point (reflink, XFS)", prepare_failed_over_reflink,
             lambda c: ["change-point", "vm", "--point", "1", *vault_args(c)],
             reflinked(check_at_point(1), "change-point"), fs="xfs"),
    Scenario("test-failover (reflink, XFS)", lambda w: machine(w),
             lambda c: ["test-failover", "vm", "--to", c["work"] / "drill", "--point", "1",
                        *vault_args(c)], reflinked(check_drill, "test-failover"), fs="xfs"),
    Scenario("apply", prepare_images,
             lambda c: ["apply", c["work"] / "d.delta", c["work"] / "target.img"],
             check_target_is_new),
    Scenario("apply after a kill", prepare_interrupted_apply,
             lambda c: ["apply", c["work"] / "d.delta", c["work"] / "target.img"],
             check_target_is_new),
    Scenario("rollback", prepare_interrupted_apply,
             lambda c: ["rollback", c["work"] / "target.img"], check_rolled_back),
    Scenario("resync", prepare_images,
             lambda c: ["resync", c["work"] / "new.img", c["work"] / "target.img",
                        "--signature-cache", c["work"] / "target.sig"], check_target_is_new),
    Scenario("push", prepare_images,
             lambda c: ["resync", c["work"] / "new.img", f"dr:{c['work'] / 'target.img'}",
                        *REMOTE], check_target_is_new, remote=True),
    Scenario("pull", prepare_images,
             lambda c: ["resync", f"dr:{c['work'] / 'new.img'}", c["work"] / "target.img",
                        *REMOTE], check_target_is_new, remote=True),
]


#: Points whose kills need a server this matrix does not snapshot: killed by
#: the tests named, which assert that the kill landed and the rerun finished.
KILLED_ELSEWHERE = {
    "agent.disk",      # tests/dr/test_fleet.py: a worker, restarted by its Nanny
    "fleet.recorded",  # tests/dr/test_fleet.py: the coordinator
    "s3.chunk",        # tests/dr/test_s3.py: a cycle to an object store, at each step
    "s3.index",
    "keys.created",    # tests/dr/test_keys.py: store creation and passphrase rotation
    "keys.config",
    "keys.added",
    "keys.removed",
    "retention.merged",   # tests/dr/test_stepmerge.py: a retention thinning with tier policies
    "retention.swapped",
    "bringup.defined",    # tests/machines/test_bringup.py: a libvirt domain (a real libvirtd)
    "bringup.started",
    "libvirt.frozen",  # tests/machines/test_libvirt_capture*.py: a libvirt domain's cut
    "libvirt.backup-begun",
}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_killed_at_every_crash_point(scenario, tmp_path, request):
    work = None
    if scenario.fs == "xfs":  # a file system that clones: the reflink method
        work = request.getfixturevalue("xfs_dir") / "work"
    REACHED[scenario.name] = run_matrix(scenario, tmp_path, work=work)
    assert REACHED[scenario.name], "the operation passed no crash point"


def test_the_matrix_reaches_every_crash_point(tmp_path, request):
    """Every point in the registry is passed by some operation above (run
    here too when this test runs on its own)."""
    from crashmatrix import points_passed

    for scenario in SCENARIOS:
        if scenario.name not in REACHED:
            base = request.getfixturevalue("xfs_dir") if scenario.fs == "xfs" else tmp_path
            work = base / scenario.name.replace(" ", "_")
            work.mkdir()
            ctx = scenario.prepare(work)
            REACHED[scenario.name] = set(points_passed(scenario, work, ctx, work / "log"))
    reached = set().union(*REACHED.values(), KILLED_ELSEWHERE)
    assert reached <= set(crashpoints.POINTS), reached - set(crashpoints.POINTS)
    assert not set(crashpoints.POINTS) - reached, sorted(set(crashpoints.POINTS) - reached)

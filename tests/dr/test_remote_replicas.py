"""The vault with replicas on another host, over a real sshd on 127.0.0.1:
cycles push and keep their steps there, points materialise there, and the
whole DR cycle (drill, failover, commit, reprotect, failback) runs."""

import os
import random

from conftest import PYDR, run_cli, sha


def change(path, seed, blocks=25):
    """Rewrite some 4 KiB blocks of an 8 MiB disk image."""
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for _ in range(blocks):
            f.seek(rng.randrange(0, 8 << 20, 4096))
            f.write(rng.randbytes(4096))


def test_vault_with_remote_replicas(sshd, tmp_path):
    """protect --disk SRC=host:/PATH: cycles push to the remote replicas and
    keep their undo steps beside them there; any retained point is
    materialised there exactly; retention drops the remote steps; failover
    is refused for such an item (not available yet) and changes nothing."""
    import json

    import pydr
    from pydr.dr.vault import Vault
    from pydr.engine import names

    site_b = tmp_path / "site-b"
    site_b.mkdir()
    disks = [tmp_path / "os.img", tmp_path / "data.img"]
    for i, d in enumerate(disks):
        d.write_bytes(random.Random(i).randbytes(8 << 20))
    vault = tmp_path / "vault"
    assert run_cli("vault", "init", vault).returncode == 0
    h = "127.0.0.1:"
    r = run_cli("protect", "vm", "--vault", vault, "--retention", "3",
                *sum((["--disk", f"{d}={h}{site_b / d.name}"] for d in disks), []),
                "--rsh", sshd["rsh"], "--remote-pydr", PYDR)
    assert r.returncode == 0, r.stderr
    states = {}
    for cycle in range(1, 4):
        if cycle > 1:
            for i, d in enumerate(disks):
                change(d, 10 * cycle + i)
        r = run_cli("replicate", "vm", "--vault", vault, "--json")
        assert r.returncode == 0, r.stderr
        states[json.loads(r.stdout)["point_id"]] = [sha(d) for d in disks]
        assert [sha(site_b / d.name) for d in disks] == [sha(d) for d in disks]
    # a cycle killed after the server kept its step, before the vault knew:
    # the next cycle registers that step, so older points stay exact
    with Vault(vault, writer=True) as v:
        step = v.current_step("vm", 0) + 1
    from pydr.dr import ownership  # what the killed cycle recorded before it wrote the replica

    ownership.record_state(ownership.read_state(str(vault), "vm", 0), None, writing=True)
    change(disks[0], 99)
    pydr.resync(str(disks[0]), f"{h}{site_b / 'os.img'}", rsh=sshd["rsh"], remote_pydr=PYDR,
                keep_undo=h + names.step(str(site_b / "os.img"), "vm", 0, step))
    change(disks[0], 100)
    r = run_cli("replicate", "vm", "--vault", vault, "--json")
    assert r.returncode == 0, r.stderr
    states[json.loads(r.stdout)["point_id"]] = [sha(d) for d in disks]
    points = [p["id"] for p in json.loads(run_cli("points", "vm", "--vault", vault, "--json").stdout)]
    assert points == [2, 3, 4]  # retention 3
    for p in points:
        r = run_cli("materialize", "vm", "--point", str(p), "--to", f"{h}{tmp_path / f'p{p}'}",
                    "--vault", vault)
        assert r.returncode == 0, r.stderr
        assert [sha(tmp_path / f"p{p}" / d.name) for d in disks] == states[p], p
    # retention dropped the steps only point 1 needed (on the remote side)
    kept = sorted(os.listdir(site_b / ".os.img.pydr-steps"))
    assert kept == ["vm-0-2.undo", "vm-0-3.undo", "vm-0-4.undo"], kept
    # a local directory for a point of remote replicas: refused, nothing written
    r = run_cli("materialize", "vm", "--point", "2", "--to", tmp_path / "local", "--vault", vault)
    assert r.returncode == 15 and b"127.0.0.1:DIR" in r.stderr, r.stderr
    assert not (tmp_path / "local" / "os.img").exists()


def test_dr_cycle_with_remote_replicas(sshd, tmp_path):
    """The whole DR cycle with the replicas at a remote site: a drill there
    and its clean-up, a planned failover (nothing lost), commit, work at the
    remote site, reprotect (pulled back: only differences), a planned
    failback and reprotect again."""
    import json

    def cli(*args):
        r = run_cli(*args, "--vault", vault, "--json")
        assert r.returncode == 0, (args, r.stderr)
        return json.loads(r.stdout) if r.stdout.strip() else None

    site_b = tmp_path / "site-b"
    site_b.mkdir()
    disks = [tmp_path / "os.img", tmp_path / "data.img"]
    for i, d in enumerate(disks):
        d.write_bytes(random.Random(i).randbytes(8 << 20))
    replicas = [site_b / d.name for d in disks]
    vault = tmp_path / "vault"
    assert run_cli("vault", "init", vault).returncode == 0
    h = "127.0.0.1:"
    cli("protect", "vm", *sum((["--disk", f"{d}={h}{r}"] for d, r in zip(disks, replicas)), []),
        "--rsh", sshd["rsh"], "--remote-pydr", PYDR)
    cli("replicate", "vm")
    first = [sha(d) for d in disks]
    for i, d in enumerate(disks):
        change(d, i + 1)
    cli("replicate", "vm")
    # a drill of point 1 at the remote site, then its clean-up
    drill = tmp_path / "drill"
    cli("test-failover", "vm", "--point", "1", "--to", f"{h}{drill}")
    assert [sha(drill / d.name) for d in disks] == first
    cli("cleanup-test-failover", "vm")
    assert not drill.exists()
    # planned failover: a final cycle, then the remote disks hold the latest state
    change(disks[0], 7)
    latest = [sha(d) for d in disks]
    cli("failover", "vm", "--planned", "--shutdown-hook", "true")
    assert [sha(r) for r in replicas] == latest
    cli("commit", "vm")
    assert not any(n.endswith(".pydr-base") for n in os.listdir(site_b))
    # the machine works at the remote site; reprotect pulls only the differences
    change(replicas[1], 8)
    res = cli("reprotect", "vm")
    assert res["cycle"]["bytes_written"] < (16 << 20) // 8
    assert [sha(d) for d in disks] == [sha(r) for r in replicas]
    change(replicas[0], 9)
    there = [sha(r) for r in replicas]
    cli("failback", "vm", "--shutdown-hook", "true")
    assert [sha(d) for d in disks] == there  # nothing lost
    cli("commit", "vm")
    cli("reprotect", "vm")
    st = cli("status", "vm")
    assert (st["state"], st["direction"]) == ("protected", "forward")
    assert st["disks"][0]["replica"] == f"{h}{replicas[0]}"

"""Issue 25 end to end, all through the CLI with a real private libvirtd and
the test guest (tests/libvirtd.py, tests/guestkit.py): a running guest that
appends checksummed records is protected with `pydr protect --libvirt` and
replicated several times while it writes; site A's domain is lost (`virsh
destroy`, or its QEMU killed as a host crash); `pydr failover --verify`
boots the machine at site B from the replica under a name and UUID of its
own (one libvirtd plays both sites), and the guest finds every record it
had synced before the newest point's cut, with a clean journal: the newest
point was frozen through the guest agent (app-consistent). After a hard
crash whose disk survived, `failover` copies the last changes first: the
guest has every record it synced before the crash and replays its journal.
A drill with
--verify from the protected item passes, is recorded with its RTO and is
cleaned up; a frozen point's drill disk needs no journal replay."""

import json
import re
import subprocess

import pytest

from guestkit import guest_kit, last_synced, wait_for_console  # noqa: F401 (fixtures)
from libvirtd import libvirtd  # noqa: F401

from test_libvirt_capture import BOOT, cli, guest, protected, replicate, synced_after  # noqa: F401
from test_libvirt_capture_freeze import needs_recovery

CYCLES = 3  # the first copies the disk; the others are tracked, frozen cuts


def run(vault, *args, env=None):
    """`pydr ARGS --json` that must succeed; its parsed output."""
    r = cli(vault, *args, "--json", env=env)
    assert r.returncode == 0, f"pydr {' '.join(map(str, args))}: {r.returncode}\n{r.stderr}"
    return json.loads(r.stdout)


def replicated_while_writing(guest, tmp_path):
    """Protects the guest and replicates it CYCLES times while it writes;
    returns (vault, the last record synced before the newest point's
    replicate began, that point's id)."""
    vault, done = protected(guest, tmp_path)
    assert done["agent"] is True
    for _ in range(CYCLES):
        synced_after(guest, last_synced(guest.log))  # the guest writes between the cuts
        before = last_synced(guest.log)  # synced before the command: before its cut
        point = replicate(vault)
    return vault, before, point["point_id"]


def console_result(console, domain):
    """(last verified record, journal state) the recovered guest printed."""
    last = wait_for_console(console, r"PYDR-VERIFY OK last=(\d+)", timeout=BOOT, domain=domain)
    journal = wait_for_console(console, r"PYDR-JOURNAL (\S+)", timeout=BOOT, domain=domain)
    return int(last.group(1)), journal.group(1)


@pytest.fixture
def recovered(libvirtd):  # noqa: F811
    """Names of domains a test brought up; destroyed and undefined after it."""
    names = []
    yield names
    for name in names:
        libvirtd.destroy_undefine(name)


def failed_over(guest, vault, recovered, *args):
    """`pydr failover vm ARGS --json` after site A's domain is gone: checks
    the machine is up at site B under a name and UUID of its own, booted
    from the replica, and its verification recorded on the point and the
    item; returns (the output, the record the guest verified last, its
    journal state)."""
    out = run(vault, "failover", "vm", *args, "--verify-timeout", f"{BOOT}s")
    machine = out["machine"]
    recovered.append(machine["domain"])
    # one libvirtd plays both sites: site A's domain stays defined, the copy is ITEM-dr
    assert machine["domain"] == "vm-dr" and machine["uuid"] != guest.dom.UUIDString()
    assert machine["started"] is True
    dom = guest.libvirtd.conn().lookupByName(machine["domain"])
    assert dom.isActive() and not guest.dom.isActive()
    assert guest.disk not in dom.XMLDesc(0)  # it boots from the replica, never site A's disk
    assert machine["console"] != guest.log
    last, journal = console_result(machine["console"], dom)
    v = out["verification"]
    assert v["passed"] is True and v["failed_probe"] is None and v["rto"] > 0
    assert set(v["parts"]) == {"materialise", "define+start", "boot", "probes"}
    assert all(p["passed"] for p in v["probes"]) and v["probes"][0]["probe"] == "userspace"
    point = [p for p in run(vault, "points", "vm") if p["id"] == out["point"]][0]
    assert point["verification"]["kind"] == "failover"
    assert point["verification"]["passed"] is True
    assert point["verification"]["rto"] == v["rto"]
    status = run(vault, "status", "vm")
    assert status["verification"]["point"] == out["point"]
    assert status["verification"]["kind"] == "failover" and status["verification"]["passed"]
    return out, point, last, journal


def test_failover_after_site_a_is_destroyed_boots_every_synced_record(guest, tmp_path,
                                                                       recovered):
    vault, before, newest = replicated_while_writing(guest, tmp_path)
    guest.libvirtd.virsh("destroy", guest.name)  # the disaster
    # site A is gone (its disks cannot be read): the newest point comes up
    out, point, last, journal = failed_over(
        guest, vault, recovered, "--point", "latest-processed",
        "--verify", "--verify-console", "PYDR-READY")
    assert out["point"] == newest
    assert last >= before  # no record synced before the newest point's cut is missing
    # the newest point was frozen through the guest agent: app-consistent, nothing to replay
    assert point["consistency"] == "app-consistent" and point["frozen"] is True
    assert journal == "clean"


def test_failover_after_a_hard_crash_of_site_a(guest, tmp_path, recovered, libvirtd):  # noqa: F811
    vault, _, newest = replicated_while_writing(guest, tmp_path)
    libvirtd.crash(guest.name)  # QEMU killed: no flush, as a host that lost power
    crashed = last_synced(guest.log)  # every record the guest synced before the crash
    # site A's disk survived its host: `failover` (point "latest") copies its last
    # changes first, then brings that point up
    out, point, last, journal = failed_over(guest, vault, recovered, "--verify")
    assert "replicated the latest changes first" in out["notes"], out
    assert out["point"] > newest
    assert last >= crashed  # nothing the guest had synced is lost
    # a crashed disk, not frozen: its ext4 replays its journal, and says so
    assert point["frozen"] is False and point["consistency"] != "app-consistent"
    assert journal == "needs-recovery"
    # no console marker given: the guest agent's ping is the userspace probe
    assert [p["probe"] for p in out["verification"]["probes"]] == ["userspace"]


def drill_disk(libvirtd, name):  # noqa: F811
    """The file of domain `name`'s vda."""
    xml = libvirtd.conn().lookupByName(name).XMLDesc(0)
    disk = re.search(r"<disk type='file' device='disk'>.*?</disk>", xml, re.S).group(0)
    assert "<target dev='vda'" in disk, xml
    return re.search(r"<source file='([^']+)'", disk).group(1)


def raw_view(path, out):
    """`path` as a raw image (a drill's disk may be a qcow2 overlay)."""
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", path],
                                     check=True, capture_output=True, text=True).stdout)
    if info["format"] == "raw":
        return path
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, str(out)], check=True)
    return str(out)


def test_a_drill_of_a_protected_machine_verifies_it_and_cleanup_removes_it(guest, tmp_path,
                                                                           libvirtd):  # noqa: F811
    vault, before, newest = replicated_while_writing(guest, tmp_path)
    drill = "pydr-drill-vm"
    drills = tmp_path / "drill"
    try:
        # a frozen point drilled without --verify: stopped once its domain is defined,
        # before it starts, its disk is as the point left it: the ext4 needs no replay
        r = cli(vault, "test-failover", "vm", "--to", drills,
                env={"PYDR_CRASH_AT": "bringup.defined"})
        assert r.returncode == -9, r.stderr
        dom = libvirtd.conn().lookupByName(drill)
        assert not dom.isActive()
        disk = drill_disk(libvirtd, drill)
        assert str(drills) in disk
        assert not needs_recovery(raw_view(disk, tmp_path / "drill-vda.raw"))
        removed = run(vault, "cleanup-test-failover", "vm")
        assert removed["removed"]
        assert drill not in libvirtd.virsh("list", "--all", "--name").split()

        # a drill with --verify: the drill machine boots beside site A's, still running
        out = run(vault, "test-failover", "vm", "--to", drills, "--verify",
                  "--verify-timeout", f"{BOOT}s")
        assert out["point"] == newest
        machine = out["machine"]
        assert machine["domain"] == drill and machine["uuid"] != guest.dom.UUIDString()
        dom = libvirtd.conn().lookupByName(drill)
        assert dom.isActive() and guest.dom.isActive()
        last, journal = console_result(machine["console"], dom)
        assert last >= before and journal == "clean"
        v = out["verification"]
        assert v["passed"] is True and v["rto"] > 0
        point = [p for p in run(vault, "points", "vm") if p["id"] == newest][0]
        assert point["frozen"] is True and point["consistency"] == "app-consistent"
        assert point["verification"]["kind"] == "drill"
        assert point["verification"]["rto"] == v["rto"]
        assert run(vault, "status", "vm")["verification"]["passed"] is True
        assert "verified (drill)" in cli(vault, "status", "vm").stdout

        run(vault, "cleanup-test-failover", "vm")
        assert drill not in libvirtd.virsh("list", "--all", "--name").split()
        assert guest.dom.isActive()  # site A's machine: never touched
        replicate(vault)  # and protection goes on
    finally:
        if drill in libvirtd.virsh("list", "--all", "--name").split():
            libvirtd.destroy_undefine(drill)

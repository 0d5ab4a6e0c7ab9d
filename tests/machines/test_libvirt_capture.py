"""A libvirt domain as a protected item (pydr protect --libvirt), with a
real private libvirtd and a real guest writing checksummed records: the
first cycle copies every disk, later ones read only what libvirt's
checkpoint says changed, every point holds every record the guest synced
before its cut and keeps the domain's XML, a lost checkpoint chain makes
the item resync-required (exit 19) until `replicate --resync`, and a kill
of pydr after the backup job began leaves a job that the same command
ends."""

import json
import os
import re
import shutil
import subprocess

import pytest

from guestkit import guest_kit, last_synced, verify_records, wait_for_console  # noqa: F401
from libvirtd import libvirtd  # noqa: F401 (the fixture)

from pydr.dr.vault import Vault, init_vault

from conftest import run_cli

BOOT = 180  # seconds: a bound on a TCG boot on a loaded machine, not a measurement
BLOCK = 4096


class Guest:
    """A running test guest: `name`, `disk`, `log`, `dom`, `uri`."""


@pytest.fixture
def guest(libvirtd, guest_kit, tmp_path):
    g = Guest()
    g.disk = guest_kit.make_disk(tmp_path / "vda.qcow2")
    g.log = str(tmp_path / "console.log")
    g.name = "cap-" + re.sub(r"[^A-Za-z0-9_-]", "-", tmp_path.name)
    g.uri = libvirtd.uri
    g.libvirtd = libvirtd
    xml = guest_kit.domain_xml(g.name, g.disk, console_log=g.log)
    with libvirtd.domain(xml) as dom:
        g.dom = dom
        wait_for_console(g.log, r"PYDR-READY", timeout=BOOT, domain=dom)
        yield g


def cli(vault, *args, env=None):
    r = run_cli(*args, "--vault", str(vault), env=env)
    r.stdout, r.stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    return r


def protected(guest, tmp_path, item="vm"):
    vault = tmp_path / "vault"
    init_vault(vault)
    r = cli(vault, "protect", item, "--libvirt", guest.name, "--connect", guest.uri,
            "--to", str(tmp_path / "dr"), "--json")
    assert r.returncode == 0, r.stderr
    return vault, json.loads(r.stdout)


def replicate(vault, *extra, item="vm"):
    r = cli(vault, "replicate", item, "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def synced_after(guest, number):
    """Wait until the guest synced another record after the log's end now
    (`number`, the newest so far, is for the reader: after a restart the
    numbers go on from the disk's, not from the log's); returns the newest."""
    wait_for_console(guest.log, r"PYDR-SYNCED \d+", timeout=BOOT, domain=guest.dom,
                     after=os.path.getsize(guest.log))
    return last_synced(guest.log)


def changed_bytes(old, new):
    """Bytes of the 4 KiB blocks that differ between two raw images."""
    n = 0
    with open(old, "rb") as a, open(new, "rb") as b:
        while True:
            x, y = a.read(BLOCK << 8), b.read(BLOCK << 8)
            if not x and not y:
                return n
            for i in range(0, max(len(x), len(y)), BLOCK):
                if x[i:i + BLOCK] != y[i:i + BLOCK]:
                    n += BLOCK


def materialized(vault, point_id, out):
    with Vault(vault, writer=True) as v:
        (path,) = v.materialize("vm", point_id, out).paths
    return path


def test_tracked_cycles_read_what_changed_and_keep_every_synced_record(guest, tmp_path):
    vault, done = protected(guest, tmp_path)
    assert [d["target"] for d in done["disks"]] == ["vda"]
    replica = done["disks"][0]["replica"]
    assert replica == str(tmp_path / "dr" / "vm-vda.img")
    assert done["uuid"] == guest.dom.UUIDString() and done["agent"] is True
    size = guest.dom.blockInfo("vda")[0]

    synced = synced_after(guest, last_synced(guest.log))
    first = replicate(vault)
    assert first["bytes_read"] > 0  # the whole disk compared (its holes skipped)
    assert verify_records(replica) >= synced
    before = tmp_path / "before.img"
    shutil.copyfile(replica, before)

    synced = synced_after(guest, last_synced(guest.log))  # the guest wrote since the cut
    second = replicate(vault)
    changed = changed_bytes(before, replica)
    assert changed > 0
    assert changed <= second["bytes_read"] < size  # only the dirty extents were read
    point = materialized(vault, second["point_id"], tmp_path / "p2")
    assert verify_records(point) >= synced  # every record synced before the cut is in it
    assert subprocess.run(["cmp", point, replica]).returncode == 0
    with Vault(vault) as v:
        assert v.store.disks("vm")[0]["tracking"] == "libvirt"
        checkpoint = v.store.disks("vm")[0]["bitmap"]
        row = v.store.point_machine("vm", second["point_id"])
        machine = v.store.machine("vm")
    # the checkpoint of the newest point is the domain's only one of pydr's
    names = guest.libvirtd.virsh("checkpoint-list", guest.name, "--name").split()
    assert names == [checkpoint] and json.loads(row.checkpoint)["name"] == checkpoint
    assert machine.kind == "libvirt" and machine.uuid == guest.dom.UUIDString()
    assert machine.agent == 1
    # the point keeps the domain's XML at the cut (its inactive XML, unchanged since)
    import libvirt

    assert row.xml == guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    # no backup job is left on the domain
    assert "None" in guest.libvirtd.virsh("domjobinfo", guest.name).split("\n")[0]
    # the older checkpoint was deleted by the commit: the newer one still has every change
    synced = synced_after(guest, last_synced(guest.log))
    third = replicate(vault)
    assert third["bytes_read"] < size
    assert verify_records(materialized(vault, third["point_id"], tmp_path / "p3")) >= synced


def test_a_lost_checkpoint_chain_needs_a_resync(guest, tmp_path):
    vault, _ = protected(guest, tmp_path)
    replicate(vault)
    with Vault(vault) as v:
        checkpoint = v.store.disks("vm")[0]["bitmap"]
    guest.libvirtd.virsh("checkpoint-delete", guest.name, checkpoint, "--metadata")
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 19, r.stderr
    assert checkpoint in r.stderr
    with Vault(vault) as v:
        assert v.store.item("vm")["state"] == "resync-required"
    r = cli(vault, "replicate", "vm")  # never a cycle that sends less than what changed
    assert r.returncode != 0
    synced = last_synced(guest.log)
    third = replicate(vault, "--resync")
    with Vault(vault) as v:
        assert v.store.item("vm")["state"] == "protected"
        fresh = v.store.disks("vm")[0]["bitmap"]
    assert fresh != checkpoint
    assert guest.libvirtd.virsh("checkpoint-list", guest.name, "--name").split() == [fresh]
    assert verify_records(materialized(vault, third["point_id"], tmp_path / "p")) >= synced
    replicate(vault)  # tracked again


def test_a_crashed_qemu_breaks_the_chain_and_a_resync_mends_it(guest, tmp_path):
    """`virsh destroy` stops QEMU with SIGTERM (its bitmaps are written back);
    a SIGKILL, as a host crash, loses them: libvirt refuses the incremental
    job, and the cycle says so (exit 19), never a silent gap."""
    vault, _ = protected(guest, tmp_path)
    replicate(vault)
    guest.dom.destroy()  # a clean stop keeps the chain
    guest.dom.create()
    wait_for_console(guest.log, r"PYDR-READY", timeout=BOOT, domain=guest.dom)
    replicate(vault)
    with Vault(vault) as v:
        assert v.store.points("vm")[-1]["consistency"] in ("crash-consistent", "app-consistent")
    pids = [int(d) for d in os.listdir("/proc")
            if d.isdigit() and f"guest={guest.name},".encode() in _reads(f"/proc/{d}/cmdline")]
    assert len(pids) == 1, pids  # the guest's QEMU (this test's)
    os.kill(pids[0], 9)
    wait_for_state(guest.dom, active=False)
    guest.dom.create()
    wait_for_console(guest.log, r"PYDR-READY", timeout=BOOT, domain=guest.dom)
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 19, r.stderr
    with Vault(vault) as v:
        assert v.store.item("vm")["state"] == "resync-required"
    synced = last_synced(guest.log)
    point = replicate(vault, "--resync")
    assert verify_records(materialized(vault, point["point_id"], tmp_path / "p")) >= synced
    replicate(vault)  # tracked again


def _reads(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def wait_for_state(dom, *, active):
    """Wait (bounded) until libvirt has seen the domain's QEMU end."""
    import time

    deadline = time.monotonic() + BOOT
    while bool(dom.isActive()) != active:
        assert time.monotonic() < deadline, "libvirt did not see QEMU end"
        time.sleep(0.05)


def test_a_kill_after_the_job_began_is_ended_by_the_same_command(guest, tmp_path):
    vault, done = protected(guest, tmp_path)
    replicate(vault)
    env = dict(os.environ, PYDR_CRASH_AT="libvirt.backup-begun")
    r = cli(vault, "replicate", "vm", env=env)
    assert r.returncode == -9, r.stderr
    info = guest.libvirtd.virsh("domjobinfo", guest.name)
    assert "Backup" in info, info  # the job is still there
    synced = last_synced(guest.log)
    again = replicate(vault)  # the same command aborts it and succeeds
    assert "None" in guest.libvirtd.virsh("domjobinfo", guest.name).split("\n")[0]
    with Vault(vault) as v:
        checkpoint = v.store.disks("vm")[0]["bitmap"]
    # the killed cycle's checkpoint is gone; the new point's is the only one
    assert guest.libvirtd.virsh("checkpoint-list", guest.name, "--name").split() == [checkpoint]
    point = materialized(vault, again["point_id"], tmp_path / "p")
    assert verify_records(point) >= synced


def test_another_domain_under_the_name_is_refused_and_a_missing_one_not_found(guest, tmp_path):
    vault, _ = protected(guest, tmp_path)
    replicate(vault)
    r = cli(vault, "protect", "other", "--libvirt", "no-such-domain", "--connect", guest.uri,
            "--to", str(tmp_path / "dr2"))
    assert r.returncode == 3, r.stderr
    # the same name, another machine: refused, nothing read or recorded
    xml = guest.dom.XMLDesc(0)
    guest.dom.destroy()
    guest.libvirtd.destroy_undefine(guest.name)
    xml = re.sub(r"<uuid>[^<]*</uuid>", "", xml)
    guest.dom = guest.libvirtd.conn().defineXML(xml)
    guest.dom.create()
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 22, r.stderr
    assert "another machine" in r.stderr
    with Vault(vault) as v:
        assert len(v.store.points("vm")) == 1


def test_protect_refuses_disk_options(guest, tmp_path):
    vault = tmp_path / "vault"
    init_vault(vault)
    r = cli(vault, "protect", "vm", "--libvirt", guest.name, "--connect", guest.uri,
            "--to", str(tmp_path / "dr"), "--disk", "a=b")
    assert r.returncode == 2 and "leave out --disk" in r.stderr, r.stderr
    r = cli(vault, "protect", "vm", "--libvirt", guest.name, "--connect", guest.uri,
            "--to", str(tmp_path / "dr"), "--cbt")
    assert r.returncode == 2 and "leave out" in r.stderr, r.stderr
    with Vault(vault) as v:
        assert not v.store.has_item("vm")


@pytest.fixture
def guest_with_raw_disk(libvirtd, guest_kit, tmp_path):
    g = Guest()
    g.disk = guest_kit.make_disk(tmp_path / "vda.qcow2")
    g.raw = str(tmp_path / "vdb.raw")
    with open(g.raw, "wb") as f:
        f.truncate(8 << 20)
        f.write(b"first" * 1000)
    g.log = str(tmp_path / "console.log")
    g.name = "cap-" + re.sub(r"[^A-Za-z0-9_-]", "-", tmp_path.name)
    g.uri, g.libvirtd = libvirtd.uri, libvirtd
    xml = guest_kit.domain_xml(g.name, g.disk, console_log=g.log, extra_disks=[g.raw])
    with libvirtd.domain(xml) as dom:
        g.dom = dom
        wait_for_console(g.log, r"PYDR-READY", timeout=BOOT, domain=dom)
        yield g


def test_a_raw_disk_is_cut_with_the_others_and_compared_whole(guest_with_raw_disk, tmp_path):
    """A raw disk cannot hold a checkpoint's bitmap: it is exported by the
    same backup job (the same instant) and compared whole every cycle."""
    guest = guest_with_raw_disk
    vault, done = protected(guest, tmp_path)
    assert [d["target"] for d in done["disks"]] == ["vda", "vdb"]
    replicate(vault)
    raw_replica = done["disks"][1]["replica"]
    assert subprocess.run(["cmp", raw_replica, guest.raw]).returncode == 0
    with open(guest.raw, "r+b") as f:  # the host writes it (the guest leaves vdb alone)
        f.seek(6 << 20)
        f.write(b"second" * 1000)
        os.fsync(f.fileno())
    synced = last_synced(guest.log)
    second = replicate(vault)
    assert subprocess.run(["cmp", raw_replica, guest.raw]).returncode == 0
    with Vault(vault) as v:
        checkpoint = v.store.disks("vm")[0]["bitmap"]
        point = v.store.points("vm")[-1]
        assert [d["bitmap"] for d in v.store.disks("vm")] == [checkpoint, checkpoint]
    assert point["cut"].startswith("checkpoint")  # one instant for both disks
    assert second["consistency"] in ("crash-consistent", "app-consistent")
    xml = guest.libvirtd.virsh("checkpoint-dumpxml", guest.name, checkpoint)
    assert "<disk name='vda' checkpoint='bitmap'" in xml
    assert "<disk name='vdb' checkpoint='no'" in xml
    with Vault(vault, writer=True) as v:
        paths = v.materialize("vm", second["point_id"], tmp_path / "p").paths
    assert verify_records(paths[0]) >= synced


def test_a_domain_protected_twice_is_refused(guest, tmp_path):
    vault, _ = protected(guest, tmp_path)
    r = cli(vault, "protect", "again", "--libvirt", guest.name, "--connect", guest.uri,
            "--to", str(tmp_path / "dr2"))
    assert r.returncode == 15, r.stderr  # InvalidState: its disk is the other item's
    assert "already a disk of a protected item" in r.stderr


def test_a_shut_off_domain_is_read_from_its_files_and_keeps_its_chain(guest, tmp_path):
    vault, done = protected(guest, tmp_path)
    replicate(vault)
    with Vault(vault) as v:
        checkpoint = v.store.disks("vm")[0]["bitmap"]
    guest.dom.destroy()  # SIGTERM: QEMU writes the bitmaps back
    synced = last_synced(guest.log)
    off = replicate(vault)  # no job: the disk's file, compared whole
    point = materialized(vault, off["point_id"], tmp_path / "p")
    assert verify_records(point) >= synced
    with Vault(vault) as v:
        assert v.store.disks("vm")[0]["bitmap"] == checkpoint  # the chain goes on
        assert v.store.point_machine("vm", off["point_id"]).frozen == 0
    guest.dom.create()
    wait_for_console(guest.log, r"PYDR-READY", timeout=BOOT, domain=guest.dom)
    synced = synced_after(guest, last_synced(guest.log))
    on = replicate(vault)
    assert on["bytes_read"] < guest.dom.blockInfo("vda")[0]
    assert verify_records(materialized(vault, on["point_id"], tmp_path / "p2")) >= synced

"""The parts of a libvirt item's capture that need no libvirtd: disk specs,
the XML pydr gives libvirt, how pydr knows its own backup jobs, replica
names, and what a checkpoint cut makes a point."""

import os
import tempfile

import pytest

from pydr.dr.machines import machine_disks, replica_for
from pydr.dr.rpo import consistency_of
from pydr.endpoints.libvirt import disk_spec, parse_spec, xml_disks, xml_has_agent
from pydr.errors import InvalidArgument
from pydr.transport.libvirt_backup import BackupJob, _is_pydr_socket, backup_xml, checkpoint_xml

XML = """<domain type='qemu'><name>web</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='/vm/web.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='block' device='disk'><driver name='qemu' type='raw'/>
  <source dev='/dev/vg/web'/><target dev='vdb' bus='virtio'/></disk>
<disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>"""


def test_a_disk_spec_splits_at_the_last_colon():
    assert parse_spec("libvirt:a:b:vda") == ("a:b", "vda")
    assert parse_spec(disk_spec("web", "sdb")) == ("web", "sdb")
    for bad in ("libvirt:vda", "libvirt:web:", "libvirt:web:VDA", "libvirt:web:1a", "web:vda"):
        with pytest.raises(InvalidArgument):
            parse_spec(bad)


def test_the_disks_and_agent_of_a_domain_xml():
    assert [(d["target"], d["type"], d["source"], d["format"], d["device"])
            for d in xml_disks(XML)] == [
        ("vda", "file", "/vm/web.qcow2", "qcow2", "disk"),
        ("vdb", "block", "/dev/vg/web", "raw", "disk"),
        ("sda", "file", None, None, "cdrom")]
    assert xml_has_agent(XML) and not xml_has_agent(XML.replace("guest_agent", "other"))
    targets, notes = machine_disks(XML, "web", None)
    assert targets == ["vda", "vdb"] and len(notes) == 1 and "cdrom sda" in notes[0]


def test_network_disks_doctypes_and_diskless_domains_are_refused():
    network = XML.replace("<disk type='block'", "<disk type='network'")
    with pytest.raises(InvalidArgument, match="vdb.*network"):
        machine_disks(network, "web", None)
    with pytest.raises(InvalidArgument, match="no disk"):
        machine_disks("<domain><devices/></domain>", "web", None)
    with pytest.raises(InvalidArgument, match="DOCTYPE"):
        xml_disks("<!DOCTYPE d [<!ENTITY x 'y'>]><domain/>")


def test_replica_names_come_from_the_targets():
    assert replica_for("/dr", "web", "vda") == "/dr/web-vda.img"
    assert replica_for("backup@dr:/srv/", "web", "vdb") == "backup@dr:/srv/web-vdb.img"


def test_the_backup_and_checkpoint_xml():
    job = BackupJob(None, "/tmp/pydr-libvirt-x", "pydr-3", "pydr-2", None)
    xml = backup_xml(job, ["vda"], ["vdb"])
    assert "<domainbackup mode='pull'><incremental>pydr-2</incremental>" in xml
    assert "<server transport='unix' socket=\"/tmp/pydr-libvirt-x/nbd.sock\"/>" in xml
    assert "<disk name=\"vdb\" backup='yes' type='file' backupmode='full'>" in xml
    assert job.bitmap("vda") == "backup-vda"
    assert job.uri("vda") == "nbd+unix:///vda?socket=/tmp/pydr-libvirt-x/nbd.sock"
    full = BackupJob(None, "/tmp/d", "pydr-1", None, None)
    assert "<incremental>" not in backup_xml(full, ["vda"], []) and full.bitmap("vda") is None
    cp = checkpoint_xml("pydr-3", ["vda"], ["vdb"])
    assert "<name>pydr-3</name>" in cp and "checkpoint='no'" in cp


def test_pydr_knows_its_own_jobs_by_their_socket():
    tmp = tempfile.gettempdir()
    assert _is_pydr_socket(os.path.join(tmp, "pydr-libvirt-abc-x1", "nbd.sock"), "abc")
    # under any temporary directory (a rerun's TMPDIR may differ), only this vault's
    assert _is_pydr_socket("/var/tmp/other/pydr-libvirt-abc-x1/nbd.sock", "abc")
    assert not _is_pydr_socket(os.path.join(tmp, "pydr-libvirt-def-x1", "nbd.sock"), "abc")
    assert not _is_pydr_socket(os.path.join(tmp, "pydr-libvirt-abc-x1", "other"), "abc")
    assert not _is_pydr_socket(os.path.join(tmp, "virtnbdbackup.123", "sock"), "abc")
    assert not _is_pydr_socket(None, "abc")


def test_a_checkpoint_cut_is_one_instant_and_a_frozen_one_app_consistent():
    assert consistency_of("checkpoint", hooks_ran=False, disks=1) == "crash-consistent"
    assert consistency_of("checkpoint-frozen", hooks_ran=False, disks=1) == "app-consistent"
    assert consistency_of("checkpoint", hooks_ran=True, disks=1) == "app-consistent"
    # two domains of a group: each at its own instant
    assert consistency_of("checkpoint", hooks_ran=False, disks=2) == "disk-consistent"


def test_protect_without_a_libvirtd_or_with_host_is_refused(tmp_path):
    from pydr.dr.vault import init_vault

    from conftest import run_cli

    vault = tmp_path / "vault"
    init_vault(vault)
    uri = f"qemu:///system?socket={tmp_path}/no-such-socket"
    r = run_cli("protect", "vm", "--libvirt", "web", "--connect", uri, "--to",
                str(tmp_path / "dr"), "--vault", str(vault))
    assert r.returncode == 22, r.stderr  # MachineError: libvirt's words, the URI named
    assert b"cannot connect to libvirt" in r.stderr and b"no-such-socket" in r.stderr
    r = run_cli("protect", "vm", "--libvirt", "web", "--host", "hv1", "--to",
                str(tmp_path / "dr"), "--vault", str(vault))
    assert r.returncode == 2 and b"--host" in r.stderr, r.stderr
    r = run_cli("protect", "vm", "--libvirt", "web", "--vault", str(vault))
    assert r.returncode == 2 and b"--to" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "dr")

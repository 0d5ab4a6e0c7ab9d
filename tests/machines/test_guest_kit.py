"""The test infrastructure for libvirt machines works: a private libvirtd
(tests/libvirtd.py) and the small guest (tests/guestkit.py) that boots under
TCG, writes checksummed records, answers its guest agent, survives a kill
with every synced record, and is backed up by libvirt's pull-mode backup."""

import os
import re
import socket
import subprocess

import pytest

from guestkit import (damage_record, guest_kit, last_synced, make_records,  # noqa: F401
                      parse_records, verify_records, wait_for_console)
from libvirtd import libvirtd  # noqa: F401 (the fixture)

BOOT = 180  # seconds: a generous bound on a TCG boot on a loaded machine, not a measurement


def start_guest(libvirtd, guest_kit, tmp_path, records=b""):
    """Disk, console log and XML of a guest named after the test."""
    disk = guest_kit.make_disk(tmp_path / "vda.qcow2", records=records)
    log = str(tmp_path / "console.log")
    name = "pydr-" + re.sub(r"[^A-Za-z0-9_-]", "-", tmp_path.name)
    return name, disk, log, guest_kit.domain_xml(name, disk, console_log=log)


def test_libvirtd_is_private_and_answers(libvirtd, guest_kit, tmp_path):
    assert libvirtd.uri.startswith("qemu:///system?socket=" + libvirtd.dir)
    assert libvirtd.conn().getLibVersion() >= 9000000
    name, _, log, xml = start_guest(libvirtd, guest_kit, tmp_path)
    with libvirtd.domain(xml) as dom:
        assert name in libvirtd.virsh("list", "--name").split()
        # its state is in the private directory, none in the system's
        agent = re.search(r"<source mode='bind' path='/var/lib/libvirt/([^']+)'/>",
                          dom.XMLDesc()).group(1)
        assert os.path.exists(os.path.join(libvirtd.dir, "lib", agent))
        assert not os.path.exists(os.path.join("/var/lib/libvirt", agent))
    assert name not in libvirtd.virsh("list", "--all", "--name").split()


def test_guest_writes_records_and_answers_its_agent(libvirtd, guest_kit, tmp_path):
    name, _, log, xml = start_guest(libvirtd, guest_kit, tmp_path)
    with libvirtd.domain(xml) as dom:
        wait_for_console(log, r"^PYDR-JOURNAL clean$", timeout=BOOT, domain=dom)
        wait_for_console(log, r"^PYDR-VERIFY OK last=0$", timeout=BOOT, domain=dom)
        wait_for_console(log, r"^PYDR-READY$", timeout=BOOT, domain=dom)
        wait_for_console(log, r"^PYDR-SYNCED 3$", timeout=BOOT, domain=dom)
        assert libvirtd.agent(name, "guest-ping") == {}
        assert '"return":{}' in libvirtd.virsh("qemu-agent-command", name,
                                               '{"execute":"guest-ping"}')
        assert libvirtd.agent(name, "guest-fsfreeze-freeze") >= 1  # /data
        try:
            assert libvirtd.agent(name, "guest-fsfreeze-status") == "frozen"
        finally:
            thawed = libvirtd.agent(name, "guest-fsfreeze-thaw")
        assert thawed >= 1
        assert libvirtd.agent(name, "guest-fsfreeze-status") == "thawed"
        # the writer goes on after the thaw
        after = last_synced(log)
        wait_for_console(log, rf"^PYDR-SYNCED {after + 1}$", timeout=BOOT, domain=dom)
        code, out, _ = libvirtd.agent_exec(name, "/bin/pydr-verify-records")
        assert code == 0, out
        assert int(re.fullmatch(r"PYDR-VERIFY OK last=(\d+)\n", out).group(1)) >= after + 1


def test_killed_guest_boots_again_with_every_synced_record(libvirtd, guest_kit, tmp_path):
    name, disk, log, xml = start_guest(libvirtd, guest_kit, tmp_path)
    with libvirtd.domain(xml) as dom:
        wait_for_console(log, r"^PYDR-SYNCED 5$", timeout=BOOT, domain=dom)
        libvirtd.crash(name)  # SIGKILL to QEMU: no clean unmount, no flush
        synced = last_synced(log)
        assert synced >= 5
        # on the host: the journal replayed on a copy, e2fsck -fn is clean,
        # every record verifies and none synced is missing
        assert verify_records(disk) >= synced
        raw = str(tmp_path / "vda.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", disk, raw], check=True)
        # the image itself still needs its journal replayed
        header = subprocess.run(["dumpe2fs", "-h", raw], capture_output=True, text=True,
                                check=True).stdout
        assert re.search(r"^Filesystem features:.*\bneeds_recovery\b", header, re.M)
        dom.create()  # the console log starts again
        wait_for_console(log, r"^PYDR-JOURNAL needs-recovery$", timeout=BOOT, domain=dom)
        last = int(wait_for_console(log, r"^PYDR-VERIFY OK last=(\d+)$", timeout=BOOT,
                                    domain=dom).group(1))
        assert last >= synced
        wait_for_console(log, r"^PYDR-READY$", timeout=BOOT, domain=dom)
        wait_for_console(log, rf"^PYDR-SYNCED {last + 1}$", timeout=BOOT, domain=dom)
        libvirtd.virsh("destroy", name)  # SIGTERM first: QEMU closes the image cleanly
    assert verify_records(disk) >= last + 1


def test_torn_last_record_is_cut_and_numbering_goes_on(libvirtd, guest_kit, tmp_path):
    records = make_records(3) + b"4 0123"  # record 4 torn by a crash before its fsync
    assert parse_records(records) == 3
    name, disk, log, xml = start_guest(libvirtd, guest_kit, tmp_path, records)
    with libvirtd.domain(xml) as dom:
        wait_for_console(log, r"^PYDR-VERIFY OK last=3$", timeout=BOOT, domain=dom)
        wait_for_console(log, r"^PYDR-SYNCED 5$", timeout=BOOT, domain=dom)
    assert verify_records(disk) >= 5


def test_damaged_record_fails_verification_and_the_agent_still_answers(
        libvirtd, guest_kit, tmp_path):
    records = make_records(4)
    offset = len(b"".join(records.split(b"\n")[:2])) + 2  # record 3's
    qcow2 = guest_kit.make_disk(tmp_path / "vda.qcow2", records=records)
    disk = str(tmp_path / "vda.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", qcow2, disk], check=True)
    assert verify_records(disk) == 4
    assert damage_record(disk, 3) == 1
    with pytest.raises(AssertionError, match=f"record 3 at offset {offset}: checksum mismatch"):
        verify_records(disk)
    name = "pydr-damaged"
    log = str(tmp_path / "console.log")
    with libvirtd.domain(guest_kit.domain_xml(name, disk, console_log=log)) as dom:
        wait_for_console(log, r"^PYDR-VERIFY FAIL record 3: checksum mismatch$",
                         timeout=BOOT, domain=dom)
        wait_for_console(log, r"^PYDR-AGENT /dev/vport\d+p\d+$", timeout=BOOT, domain=dom)
        code, out, _ = libvirtd.agent_exec(name, "/bin/pydr-verify-records")
        assert (code, out) == (1, "PYDR-VERIFY FAIL record 3: checksum mismatch\n")
        # /init prints the agent's line after the verdict: no READY, no writer
        assert "PYDR-READY" not in open(log).read()
    with pytest.raises(AssertionError, match=f"record 3 at offset {offset}: checksum mismatch"):
        verify_records(disk)


def test_host_verifier_rules():
    records = make_records(3)
    assert parse_records(b"") == 0
    assert parse_records(records) == 3
    assert parse_records(records + b"4 ab") == 3  # a torn last line
    with pytest.raises(AssertionError, match="record 1 at offset 0"):
        parse_records(make_records(2, first=2))  # not from 1
    with pytest.raises(AssertionError, match="NUL byte"):
        parse_records(records[:10] + b"\0" + records[11:])
    with pytest.raises(AssertionError, match="record 4 .*out of order"):
        parse_records(records + make_records(1, first=5))


# The pull-mode backup that works with libvirt 9.0 here (QEMU 7.2):
#
#   virsh checkpoint-create-as DOM cp1 --diskspec vda,checkpoint=bitmap
#   virsh backup-begin DOM backup.xml checkpoint.xml
#
# backup.xml (<incremental> omitted for a full backup):
#   <domainbackup mode='pull'>
#     <incremental>cp1</incremental>
#     <server transport='unix' socket='/ABS/PATH/nbd.sock'/>
#     <disks>
#       <disk name='vda' backup='yes' type='file'>
#         <scratch file='/ABS/PATH/scratch-vda.qcow2'/>
#       </disk>
#     </disks>
#   </domainbackup>
# checkpoint.xml (the checkpoint made at the backup's cut):
#   <domaincheckpoint>
#     <name>cp2</name>
#     <disks><disk name='vda' checkpoint='bitmap'/></disks>
#   </domaincheckpoint>
#
# The export is named after the disk target (nbd+unix:///vda?socket=...), read
# only, with the meta contexts base:allocation and qemu:dirty-bitmap:backup-vda
# (`virsh backup-dumpxml DOM` shows exportname='vda' exportbitmap='backup-vda').
# The job (domjobinfo: "Backup", unbounded) lasts until `virsh domjobabort DOM`
# (or virDomainAbortJob); the checkpoints stay, cp2's parent is cp1, and every
# checkpoint's bitmap keeps recording (query-block: "recording":true for all).
# The bitmaps reach the qcow2 only when QEMU closes it: `virsh destroy`
# (SIGTERM first) keeps the chain, a killed QEMU loses it (see the test's end).
def backup_xml(tmp_path, socket, incremental=None):
    inc = f"\n  <incremental>{incremental}</incremental>" if incremental else ""
    path = tmp_path / f"backup-{incremental or 'full'}.xml"
    path.write_text(f"""<domainbackup mode='pull'>{inc}
  <server transport='unix' socket='{socket}'/>
  <disks>
    <disk name='vda' backup='yes' type='file'>
      <scratch file='{tmp_path}/scratch-{incremental or 'full'}.qcow2'/>
    </disk>
  </disks>
</domainbackup>
""")
    return str(path)


def checkpoint_xml(tmp_path, name):
    path = tmp_path / f"{name}.xml"
    path.write_text(f"""<domaincheckpoint>
  <name>{name}</name>
  <disks><disk name='vda' checkpoint='bitmap'/></disks>
</domaincheckpoint>
""")
    return str(path)


def nbd_map(uri, context):
    out = subprocess.run(["nbdinfo", f"--map={context}", uri], capture_output=True, text=True,
                         check=True).stdout
    return [line.split() for line in out.splitlines()]


def test_pull_mode_backup_with_checkpoints(libvirtd, guest_kit, tmp_path):
    name, disk, log, xml = start_guest(libvirtd, guest_kit, tmp_path)
    socket = str(tmp_path / "nbd.sock")
    uri = f"nbd+unix:///vda?socket={socket}"
    with libvirtd.domain(xml) as dom:
        wait_for_console(log, r"^PYDR-SYNCED 3$", timeout=BOOT, domain=dom)
        # a full backup whose cut is checkpoint cp1: every record synced before it is in it
        synced = last_synced(log)
        libvirtd.virsh("backup-begin", name, backup_xml(tmp_path, socket),
                       checkpoint_xml(tmp_path, "cp1"))
        try:
            assert "Backup" in libvirtd.virsh("domjobinfo", name)
            info = subprocess.run(["qemu-img", "info", "--output=json", uri],
                                  capture_output=True, text=True, check=True).stdout
            assert '"virtual-size": 67108864' in info
            copy = str(tmp_path / "full.raw")
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, copy],
                           check=True)
        finally:
            libvirtd.virsh("domjobabort", name)
        assert verify_records(copy) >= synced
        # an incremental one from cp1, making cp2: the records written since are dirty
        wait_for_console(log, rf"^PYDR-SYNCED {last_synced(log) + 2}$", timeout=BOOT,
                         domain=dom)
        libvirtd.virsh("backup-begin", name, backup_xml(tmp_path, socket, "cp1"),
                       checkpoint_xml(tmp_path, "cp2"))
        try:
            dumped = libvirtd.virsh("backup-dumpxml", name)
            assert "exportname='vda'" in dumped and "exportbitmap='backup-vda'" in dumped
            dirty = [e for e in nbd_map(uri, "qemu:dirty-bitmap:backup-vda") if e[-1] == "dirty"]
            assert dirty, "no dirty extent since cp1"
            assert sum(int(e[1]) for e in dirty) < 64 << 20
        finally:
            libvirtd.virsh("domjobabort", name)
        assert "Backup" not in libvirtd.virsh("domjobinfo", name)
        listed = libvirtd.virsh("checkpoint-list", name, "--parent")
        assert re.search(r"^\s*cp2\s.*\scp1\s*$", listed, re.M), listed
        # every checkpoint's bitmap records, not only the newest one's
        blocks = libvirtd.virsh("qemu-monitor-command", name, '{"execute":"query-block"}')
        for cp in ("cp1", "cp2"):
            assert re.search(rf'"name":"{cp}","recording":true,"persistent":true', blocks)

        # virsh destroy sends QEMU SIGTERM first: it closes the image cleanly and
        # stores the bitmaps, so the chain holds across a restart
        libvirtd.virsh("destroy", name)
        dom.create()
        wait_for_console(log, r"^PYDR-READY$", timeout=BOOT, domain=dom)
        libvirtd.virsh("backup-begin", name, backup_xml(tmp_path, socket, "cp2"))
        libvirtd.virsh("domjobabort", name)
        # a QEMU killed (SIGKILL: a host crash) stores no bitmap: the ones it
        # loaded stay marked in-use (inconsistent) in the image; libvirt still
        # lists the checkpoints, but an incremental backup from them is refused.
        # (Checkpoints made in a run that ended by SIGKILL have no bitmap in the
        # image at all: `checkpoint-delete` then fails with "bitmap 'cpN' not
        # found in backing chain of 'vda'" and only `--metadata` removes them.)
        libvirtd.crash(name)
        dom.create()
        wait_for_console(log, r"^PYDR-READY$", timeout=BOOT, domain=dom)
        assert "cp2" in libvirtd.virsh("checkpoint-list", name, "--name")
        r = subprocess.run(["virsh", "-c", libvirtd.uri, "backup-begin", name,
                            backup_xml(tmp_path, socket, "cp2")], capture_output=True, text=True)
        assert r.returncode != 0
        assert "missing or broken bitmap 'cp2' for disk 'vda'" in r.stderr, r.stderr
        libvirtd.virsh("checkpoint-delete", name, "cp2")  # its broken bitmap goes with it
        libvirtd.virsh("checkpoint-delete", name, "cp1")
        assert libvirtd.virsh("checkpoint-list", name, "--name").split() == []
        assert "bitmaps:" not in subprocess.run(["qemu-img", "info", "-U", disk],
                                                capture_output=True, text=True).stdout


def test_guest_answers_on_a_forwarded_tcp_port(libvirtd, guest_kit, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    disk = guest_kit.make_disk(tmp_path / "vda.qcow2")
    log = str(tmp_path / "console.log")
    xml = guest_kit.domain_xml("pydr-tcp", disk, console_log=log, tcp_forward=(port, 7070))
    with libvirtd.domain(xml) as dom:
        wait_for_console(log, r"^PYDR-LISTEN 7070$", timeout=BOOT, domain=dom)
        wait_for_console(log, r"^PYDR-READY$", timeout=BOOT, domain=dom)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
            c.settimeout(60)
            assert c.makefile("rb").readline() == b"PYDR-TCP-OK\n"

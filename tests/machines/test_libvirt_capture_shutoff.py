"""A shut-off libvirt domain with a raw disk (no lock keeps QEMU from
starting on it): a cycle while it is off copies its file and records no
checkpoint; a domain started while pydr reads its file fails the cycle
(exit 22, no point); the first cycle once it runs is a full one (no
checkpoint recorded is no lost chain), and the next is tracked."""

import os
import re
import signal
import subprocess

import pytest

from guestkit import guest_kit, last_synced, verify_records, wait_for_console  # noqa: F401
from libvirtd import libvirtd  # noqa: F401 (the fixture)

from pydr.dr.vault import Vault

from test_libvirt_capture import BOOT, Guest, materialized, protected, replicate
from test_libvirt_capture_signals import stopped_at


@pytest.fixture
def raw_guest(libvirtd, guest_kit, tmp_path):
    g = Guest()
    qcow2 = guest_kit.make_disk(tmp_path / "made.qcow2")
    g.disk = str(tmp_path / "vda.raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2, g.disk],
                   check=True)
    g.log = str(tmp_path / "console.log")
    g.name = "cap-" + re.sub(r"[^A-Za-z0-9_-]", "-", tmp_path.name)
    g.uri, g.libvirtd = libvirtd.uri, libvirtd
    xml = guest_kit.domain_xml(g.name, g.disk, console_log=g.log)
    with libvirtd.domain(xml) as dom:
        g.dom = dom
        wait_for_console(g.log, r"PYDR-READY", timeout=BOOT, domain=dom)
        yield g


def test_a_shut_off_raw_domain_started_under_the_read_fails_the_cycle(raw_guest, tmp_path):
    guest = raw_guest
    vault, _ = protected(guest, tmp_path)
    guest.dom.destroy()
    synced = last_synced(guest.log)
    off = replicate(vault)  # read from the file, no checkpoint made
    assert verify_records(materialized(vault, off["point_id"], tmp_path / "p")) >= synced
    with Vault(vault) as v:
        assert v.store.disks("vm")[0]["bitmap"] is None

    p = stopped_at(vault, "cycle.cut")  # the file is open, nothing read yet
    guest.dom.create()
    os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 22 and "was started while" in err, err
    with Vault(vault) as v:
        assert [pt["id"] for pt in v.store.points("vm")] == [off["point_id"]]

    wait_for_console(guest.log, r"PYDR-READY", timeout=BOOT, domain=guest.dom)
    on = replicate(vault)  # no checkpoint recorded: a full cycle, not a lost chain
    with Vault(vault) as v:
        checkpoint = v.store.disks("vm")[0]["bitmap"]
    assert checkpoint is not None
    assert guest.libvirtd.virsh("checkpoint-list", guest.name, "--name").split() == [checkpoint]
    assert on["point_id"] > off["point_id"]
    replicate(vault)  # and the next cycle goes on from it

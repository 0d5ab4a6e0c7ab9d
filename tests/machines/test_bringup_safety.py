"""What bring-up must never do, with a real libvirtd and guest (review
findings): bring a machine up anywhere but where its domain was defined,
act on a domain pydr did not define and mark, let a point's XML give the
recovered guest host files to write, pass a console probe on the kernel's
echo or on an earlier boot's log, lose the failover guest's writes at
failback, or give up a failed probe as a libvirt error."""

import json
import os
import re

import pytest

from guestkit import guest_kit, last_synced, verify_records, wait_for_console  # noqa: F401
from libvirtd import Libvirtd, libvirtd  # noqa: F401
from test_bringup import BOOT, VERIFY, Site, cli, golden  # noqa: F401

from pydr import Vault
from pydr.dr import bringup
from pydr.dr.probes import _console_seen
from pydr.endpoints import domains as lv

#: a guest that never reaches userspace: the kernel finds no init and panics (panic=-1:
#: the domain stops at once)
NO_USERSPACE = "rdinit=/nonexistent init=/nonexistent"


@pytest.fixture
def site(tmp_path, golden, guest_kit, libvirtd):  # noqa: F811
    s = Site(tmp_path, golden, guest_kit, libvirtd)
    yield s
    s.close()


# -- 1: the recorded connection --------------------------------------------------------------
def test_change_point_brings_the_machine_up_where_the_failover_defined_it(site, tmp_path):
    site_b = Libvirtd(tmp_path / "site-b").start()
    try:
        site.pydr("replicate", site.item, check=0)  # a second point
        out = json.loads(site.pydr("failover", site.item, "--point", "latest-processed",
                                   "--connect", site_b.uri, "--json", check=0).stdout)
        # a real second site: the protected name and UUID are free there and kept
        assert out["machine"]["uri"] == site_b.uri and out["machine"]["uuid"] == site.uuid
        site_a_xml = site.dom.XMLDesc(0)
        r = site.pydr("change-point", site.item, "--point", "1", "--json", check=0)
        assert json.loads(r.stdout)["machine"]["uri"] == site_b.uri
        assert site_b.conn().lookupByUUIDString(site.uuid).isActive()
        # site A's protected domain: not redefined, not started
        assert not site.dom.isActive() and site.dom.XMLDesc(0) == site_a_xml
    finally:
        site_b.stop()


# -- 3: pydr's mark ---------------------------------------------------------------------------
@pytest.mark.parametrize("edit", ["uuid", "name+uuid"])
def test_cleanup_never_acts_on_a_recorded_uuid_pydr_did_not_define(site, edit):
    site.pydr("test-failover", site.item, "--to", site.tmp / "drill", check=0)
    drill = f"pydr-drill-{site.item}"
    with Vault(str(site.vault), writer=True) as v:  # whoever can write the vault
        rec = v.machine_domain(site.item, "drill")
        v.put_machine_domain(site.item, "drill", uri=rec.uri,
                             domain=site.domain if edit == "name+uuid" else rec.name,
                             uuid=site.uuid, point=rec.point, console=rec.console)
    r = site.pydr("cleanup-test-failover", site.item)
    assert r.returncode == 22 and "not touched" in r.stderr, r.stdout + r.stderr
    assert site.domain in site.domains() and drill in site.domains()


def test_pydr_s_domains_carry_its_mark_and_cleanup_checks_it(site):
    site.pydr("test-failover", site.item, "--to", site.tmp / "drill", check=0)
    drill = f"pydr-drill-{site.item}"
    conn = site.libvirtd.conn()
    from pydr.dr.domainxml import domain_mark
    with Vault(str(site.vault)) as v:
        vault_id = v.vault_id()
    assert domain_mark(conn.lookupByName(drill).XMLDesc(0)) == {
        "item": site.item, "role": "drill", "vault": vault_id}
    # the mark removed (someone redefined the domain): pydr no longer owns it
    xml = conn.lookupByName(drill).XMLDesc(0)
    unmarked = re.sub(r"<metadata.*?</metadata>", "", xml, flags=re.S)
    assert unmarked != xml
    conn.defineXML(unmarked)
    r = site.pydr("cleanup-test-failover", site.item)
    assert r.returncode == 22 and "not touched" in r.stderr, r.stderr
    assert drill in site.domains()


# -- 2, 4, 5: host files the point's XML names ----------------------------------------------
def test_a_hostile_point_xml_gives_the_drill_no_host_file_and_cleanup_deletes_none(
        tmp_path, golden, guest_kit, libvirtd):  # noqa: F811
    victims = tmp_path / "victims"
    victims.mkdir()
    for f in ("seriallog", "floppy", "qdrive"):
        (victims / f).write_text("PRECIOUS " * 1000)

    def hostile(xml):
        return xml.replace("</devices>", f"""
    <disk type='file' device='floppy'><source file='{victims}/floppy'/><target dev='fda'
      bus='fdc'/></disk>
    <serial type='pty'><log file='{victims}/seriallog' append='off'/><target port='1'/>
    </serial>
    <filesystem type='mount' accessmode='passthrough'><source dir='/etc'/>
      <target dir='hostetc'/></filesystem>
  </devices>""").replace("</qemu:commandline>", "<qemu:arg value='-drive'/><qemu:arg "
                         f"value='file={victims}/qdrive,if=none,id=pydrx,format=raw'/>"
                         "</qemu:commandline>")

    s = Site(tmp_path / "s", golden, guest_kit, libvirtd, tcp_forward=(1, 7), edit=hostile)
    try:
        assert "qdrive" in s.dom.XMLDesc(0) and "floppy" in s.dom.XMLDesc(0)
        out = json.loads(s.pydr("test-failover", s.item, "--to", tmp_path / "drill", "--json",
                                "--verify", "--verify-console", "PYDR-READY",
                                "--verify-timeout", f"{BOOT}s", check=0).stdout)
        drill_xml = libvirtd.conn().lookupByName(f"pydr-drill-{s.item}").XMLDesc(0)
        assert str(victims) not in drill_xml and "hostetc" not in drill_xml
        assert "-netdev" not in drill_xml and "<interface" not in drill_xml  # no network
        assert any("qemu:commandline" in n for n in out["notes"])
        s.pydr("cleanup-test-failover", s.item, check=0)
        for f in ("seriallog", "floppy", "qdrive"):
            assert (victims / f).read_text() == "PRECIOUS " * 1000, f
    finally:
        s.close()


class _Dom:
    """Records the flags undefine gives libvirt."""

    def __init__(self):
        self.flags = None

    def name(self):
        return "d"

    def undefineFlags(self, flags):
        self.flags = flags


def test_undefine_deletes_the_nvram_only_when_asked():
    libvirt = pytest.importorskip("libvirt")
    dom = _Dom()
    lv.undefine(dom)
    assert dom.flags & libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
    assert not dom.flags & libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    lv.undefine(dom, nvram=True)
    assert dom.flags & libvirt.VIR_DOMAIN_UNDEFINE_NVRAM


# -- 6, 7: what the console probe proves ------------------------------------------------------
def test_the_console_probe_skips_kernel_lines(tmp_path):
    log = tmp_path / "c.log"
    log.write_bytes(b"[    0.000000] Command line: console=ttyS0 app=MARK\r\n"
                    b"Kernel command line: console=ttyS0 app=MARK\r\n"
                    b"[    1.234567] Kernel panic - not syncing: MARK\r\n")
    assert not _console_seen(str(log), "MARK")
    log.write_bytes(log.read_bytes() + b"init: MARK\r\n")
    assert _console_seen(str(log), "MARK")


def test_a_console_marker_on_the_kernel_command_line_is_refused(tmp_path, golden, guest_kit,
                                                                 libvirtd):  # noqa: F811
    s = Site(tmp_path, golden, guest_kit, libvirtd,
             cmdline_extra=f"{NO_USERSPACE} app=PYDR-READY")
    try:
        r = s.pydr("test-failover", s.item, "--to", tmp_path / "drill", "--verify",
                   "--verify-console", "PYDR-READY", "--verify-timeout", f"{BOOT}s")
        assert r.returncode == 2 and "kernel command line" in r.stderr, r.stdout + r.stderr
    finally:
        s.close()


def test_an_earlier_boot_s_console_log_never_passes_the_probe(tmp_path, golden, guest_kit,
                                                               libvirtd):  # noqa: F811
    def pty_serial(xml):  # no file for the serial: pydr must make one of its own
        return re.sub(r"<serial type='file'>.*?</serial>",
                      "<serial type='pty'><target port='0'/></serial>", xml, flags=re.S)

    s = Site(tmp_path, golden, guest_kit, libvirtd, cmdline_extra=NO_USERSPACE, edit=pty_serial)
    try:
        assert "<serial type='pty'>" in s.dom.XMLDesc(0)
        with Vault(str(s.vault)) as v:
            stale = bringup.console_path(v.store, s.item, "drill")
        with open(stale, "w") as f:
            f.write("PYDR-READY\n")  # an earlier drill's boot
        r = s.pydr("test-failover", s.item, "--to", tmp_path / "drill", "--verify",
                   "--verify-console", "PYDR-READY", "--verify-timeout", f"{BOOT}s")
        assert r.returncode == 23 and "userspace" in r.stderr, r.stdout + r.stderr
        assert os.path.isfile(stale) and not os.path.islink(stale)  # QEMU's log of this boot
    finally:
        s.close()


# -- 8: failback ------------------------------------------------------------------------------
def test_failback_without_a_shutdown_hook_keeps_every_write_of_the_failover_guest(site):
    out = json.loads(site.pydr("failover", site.item, "--point", "latest-processed", "--json",
                               check=0).stdout)
    console = out["machine"]["console"]
    wait_for_console(console, r"PYDR-SYNCED [1-9]", timeout=BOOT)
    site.pydr("commit", site.item, check=0)
    site.pydr("reprotect", site.item, check=0)
    site.pydr("failback", site.item, "--json", check=0,
              env={"PYDR_MACHINE_SHUTDOWN_TIMEOUT": "1"})
    synced = last_synced(console)  # the failover guest was stopped before the final cycle
    assert synced >= 1
    site.dom.destroy()  # site A's domain, started again by failback: its disk is read here
    assert verify_records(site.disk) >= synced


# -- 9, 11, 12: probe failures, reruns, --json ------------------------------------------------
def test_a_guest_that_dies_during_its_script_fails_the_probe_and_json_shows_it(site):
    r = site.pydr("test-failover", site.item, "--to", site.tmp / "drill", "--verify",
                  "--verify-script", "sleep 1; echo o > /proc/sysrq-trigger; sleep 60",
                  "--verify-timeout", f"{BOOT}s", "--json")
    assert r.returncode == 23, r.stdout + r.stderr
    assert "script" in r.stderr
    out = json.loads(r.stdout)  # the result, with the failed verification
    assert out["verification"]["passed"] is False
    assert out["verification"]["failed_probe"] == "script"
    points = json.loads(site.pydr("points", site.item, "--json", check=0).stdout)
    assert points[-1]["verification"]["failed_probe"] == "script"


def test_a_rerun_of_a_verified_failover_records_no_rto(site):
    args = ["failover", site.item, "--point", "latest-processed", *VERIFY, "--json"]
    first = json.loads(site.pydr(*args, check=0).stdout)
    assert first["verification"]["rto"] > 0
    again = json.loads(site.pydr(*args, check=0).stdout)
    assert not again["machine"]["started"]
    assert again["verification"]["passed"] and again["verification"]["rto"] is None


def test_test_failover_help_explains_to():
    r = cli("test-failover", "--help", check=0)
    assert "--to DIR" in r.stdout and "drill's disks" in r.stdout

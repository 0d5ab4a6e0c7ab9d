"""Bring-up of a recovered machine at site B with a real libvirtd and a real
guest (tests/libvirtd.py, tests/guestkit.py): failover and drills define
and start the domain from the point's XML on the recovered disks, a kill
after the domain is defined is finished by the same command, clean-up
removes only pydr's own domain; bring-up hooks get JSON.

The guest's disk is protected as a plain item (--disk IMAGE=REPLICA) while
its domain is shut off, and Vault.attach_machine records it as a machine
(what ``pydr protect --libvirt`` records itself)."""

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from guestkit import guest_kit, wait_for_console  # noqa: F401 (fixtures)
from libvirtd import libvirtd  # noqa: F401

from pydr import Vault

PYDR = os.path.join(os.path.dirname(sys.executable), "pydr")
BOOT = 300  # a bound on a TCG boot on a loaded machine, not a measurement


def cli(*args, env=None, check=None):
    """`pydr ARGS`; with check= the exit status it must have."""
    r = subprocess.run([PYDR, *map(str, args)], capture_output=True, text=True,
                       env=dict(os.environ, **(env or {})), timeout=900)
    if check is not None:
        assert r.returncode == check, f"pydr {' '.join(map(str, args))}: {r.returncode}\n" \
                                      f"{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def golden(tmp_path_factory, guest_kit, libvirtd):  # noqa: F811
    """A guest disk with records on it (booted once, then destroyed)."""
    d = tmp_path_factory.mktemp("golden")
    disk = guest_kit.make_disk(d / "vda.qcow2")
    log = d / "console.log"
    xml = guest_kit.domain_xml(f"pydr-golden-{uuid.uuid4().hex[:6]}", disk, console_log=log)
    with libvirtd.domain(xml) as dom:
        wait_for_console(log, r"PYDR-SYNCED [3-9]", timeout=BOOT, domain=dom)
    return disk


class Site:
    """One protected machine: its item, vault, the site-A domain (shut off)."""

    def __init__(self, tmp, golden, guest_kit, libvirtd, *, agent=True,  # noqa: F811
                 edit=None, **xml):
        self.tmp = tmp
        self.item = f"vm{uuid.uuid4().hex[:6]}"
        self.vault = tmp / "vault"
        os.makedirs(tmp / "a")
        os.makedirs(tmp / "b")
        self.disk = str(tmp / "a" / "vda.qcow2")
        shutil.copyfile(golden, self.disk)
        self.replica = str(tmp / "b" / "vda.img")
        self.console_a = tmp / "a" / "console.log"
        self.domain = f"pydr-t-{self.item}"
        xml = guest_kit.domain_xml(self.domain, self.disk, console_log=self.console_a,
                                   agent=agent, **xml)
        xml = edit(xml) if edit is not None else xml
        self.libvirtd = libvirtd
        self.dom = libvirtd.conn().defineXML(xml)  # never started: shut off
        self.uuid = self.dom.UUIDString()
        cli("vault", "init", self.vault, check=0)
        cli("protect", self.item, "--disk", f"{self.disk}={self.replica}", "--vault", self.vault,
            check=0)
        cli("replicate", self.item, "--vault", self.vault, check=0)
        with Vault(str(self.vault), writer=True) as v:
            v.attach_machine(self.item, self.dom.XMLDesc(0), uri=libvirtd.uri)

    def pydr(self, *args, **kw):
        return cli(*args, "--vault", self.vault, **kw)

    def domains(self):
        return self.libvirtd.virsh("list", "--all", "--name").split()

    def close(self):
        for name in self.domains():
            if self.item in name:
                self.libvirtd.destroy_undefine(name)


@pytest.fixture
def site(tmp_path, golden, guest_kit, libvirtd):  # noqa: F811
    s = Site(tmp_path, golden, guest_kit, libvirtd)
    yield s
    s.close()


VERIFY = ["--verify", "--verify-console", "PYDR-READY", "--verify-script",
          "/bin/pydr-verify-records /data/records", "--verify-timeout", f"{BOOT}s"]


def test_drill_with_verify_passes_and_cleanup_removes_the_drill_domain(site):
    r = site.pydr("test-failover", site.item, "--to", site.tmp / "drill", *VERIFY, "--json",
                  check=0)
    out = json.loads(r.stdout)
    drill = f"pydr-drill-{site.item}"
    assert out["machine"]["domain"] == drill
    assert out["machine"]["uuid"] != site.uuid
    v = out["verification"]
    assert v["passed"] and [p["probe"] for p in v["probes"]] == ["userspace", "script"]
    assert v["rto"] > 0 and set(v["parts"]) == {"materialise", "define+start", "boot", "probes"}
    assert drill in site.domains() and site.domain in site.domains()
    dom = site.libvirtd.conn().lookupByName(drill)
    assert dom.isActive()
    # the drill boots from the drill's disk, never site A's or the replica
    xml = dom.XMLDesc(0)
    assert str(site.tmp / "drill") in xml and site.disk not in xml
    assert site.replica not in xml
    assert "<interface" not in xml  # no network at all
    console = out["machine"]["console"]
    assert console != str(site.console_a)
    wait_for_console(console, r"PYDR-VERIFY OK", timeout=5)
    points = json.loads(site.pydr("points", site.item, "--json", check=0).stdout)
    assert points[-1]["verification"]["passed"] is True
    assert points[-1]["verification"]["rto"] == v["rto"]
    status = json.loads(site.pydr("status", site.item, "--json", check=0).stdout)
    assert status["verification"]["passed"] is True
    assert "verified (drill)" in site.pydr("points", site.item, check=0).stdout
    assert "verified (drill)" in site.pydr("status", site.item, check=0).stdout
    assert points[-1]["frozen"] is False  # attached to a shut-off domain: never frozen

    r = site.pydr("cleanup-test-failover", site.item, "--json", check=0)
    assert drill not in site.domains()
    assert site.domain in site.domains()  # site A's domain: never touched
    again = json.loads(site.pydr("cleanup-test-failover", site.item, "--json", check=0).stdout)
    assert again["already_done"], again


def test_a_damaged_point_fails_verification_naming_the_probe(site):
    # site A's disk loses its ext4 superblock (a bad write, ransomware) and a cycle
    # replicates it faithfully: the newest point's hashes are right, the machine is not
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0 1024 1024", site.disk],
                   check=True, capture_output=True)
    site.pydr("replicate", site.item, check=0)
    r = site.pydr("test-failover", site.item, "--to", site.tmp / "drill", "--verify",
                  "--verify-script", "/bin/pydr-verify-records /data/records",
                  "--verify-timeout", f"{BOOT}s", "--json")
    assert r.returncode == 23, r.stdout + r.stderr
    assert "script" in r.stderr
    points = json.loads(site.pydr("points", site.item, "--json", check=0).stdout)
    assert points[-1]["verification"] == {**points[-1]["verification"], "passed": False,
                                          "failed_probe": "script", "rto": None}
    drill = f"pydr-drill-{site.item}"
    assert drill in site.domains()  # left up for inspection
    site.pydr("cleanup-test-failover", site.item, check=0)
    assert drill not in site.domains()


def test_failover_boots_the_machine_at_site_b_with_a_name_and_uuid_of_its_own(site):
    r = site.pydr("failover", site.item, "--point", "latest-processed", *VERIFY, "--json",
                  check=0)
    out = json.loads(r.stdout)
    m = out["machine"]
    # one libvirtd plays both sites: the original stays defined, so the copy is ITEM-dr
    assert m["domain"] == f"{site.item}-dr" and m["uuid"] != site.uuid
    assert site.domain in site.domains() and m["domain"] in site.domains()
    dom = site.libvirtd.conn().lookupByName(m["domain"])
    assert dom.isActive() and site.replica in dom.XMLDesc(0)
    wait_for_console(m["console"], r"PYDR-VERIFY OK last=[1-9]", timeout=5)
    wait_for_console(m["console"], r"PYDR-READY", timeout=5)
    assert out["verification"]["passed"] and out["verification"]["rto"] > 0
    points = json.loads(site.pydr("points", site.item, "--json", check=0).stdout)
    assert points[-1]["verification"]["kind"] == "failover"
    assert points[-1]["verification"]["rto"] == out["verification"]["rto"]
    # running it again changes nothing: the same one domain, running
    again = json.loads(site.pydr("failover", site.item, "--json", check=0).stdout)
    assert again["machine"]["uuid"] == m["uuid"] and not again["machine"]["started"]
    assert [d for d in site.domains() if site.item in d] == sorted(
        [site.domain, m["domain"]], key=site.domains().index)


@pytest.mark.parametrize("point", ["bringup.defined", "bringup.started"])
def test_a_kill_during_bring_up_is_finished_by_the_same_command(site, point):
    args = ["test-failover", site.item, "--to", site.tmp / "drill"]
    r = site.pydr(*args, env={"PYDR_CRASH_AT": point})
    assert r.returncode == -9, r.stdout + r.stderr
    drill = f"pydr-drill-{site.item}"
    dom = site.libvirtd.conn().lookupByName(drill)
    assert dom.isActive() == (point == "bringup.started")  # defined; started or not
    out = json.loads(site.pydr(*args, "--json", check=0).stdout)
    assert out["machine"]["uuid"] == dom.UUIDString()
    assert out["machine"]["started"] == (point == "bringup.defined")
    assert [d for d in site.domains() if d.startswith("pydr-drill-")
            and site.item in d] == [drill]
    assert site.libvirtd.conn().lookupByName(drill).isActive()
    site.pydr("cleanup-test-failover", site.item, check=0)
    assert drill not in site.domains()


def test_cleanup_never_removes_a_domain_pydr_did_not_define(site, guest_kit):  # noqa: F811
    # someone else's domain took the drill's name: the drill refuses, and cleanup leaves it
    drill = f"pydr-drill-{site.item}"
    other = guest_kit.domain_xml(drill, site.disk, console_log=site.tmp / "other.log")
    site.libvirtd.conn().defineXML(other)
    r = site.pydr("test-failover", site.item, "--to", site.tmp / "drill")
    assert r.returncode == 22 and "pydr did not define it" in r.stderr, r.stderr
    site.pydr("cleanup-test-failover", site.item, check=0)
    assert drill in site.domains()


def test_verify_needs_a_console_marker_without_an_agent(tmp_path, golden, guest_kit,  # noqa: F811
                                                         libvirtd):  # noqa: F811
    s = Site(tmp_path, golden, guest_kit, libvirtd, agent=False)
    try:
        r = s.pydr("test-failover", s.item, "--to", tmp_path / "drill", "--verify")
        assert r.returncode == 2 and "--verify-console" in r.stderr, r.stderr
        assert not os.path.exists(tmp_path / "drill")  # nothing was done
        assert f"pydr-drill-{s.item}" not in s.domains()
    finally:
        s.close()


def test_failback_starts_the_protected_domain_again_and_removes_the_failover_one(site):
    out = json.loads(site.pydr("failover", site.item, "--point", "latest-processed", "--json",
                               check=0).stdout)
    dr = out["machine"]["domain"]
    assert site.libvirtd.conn().lookupByName(dr).isActive()
    site.pydr("commit", site.item, check=0)
    site.pydr("reprotect", site.item, check=0)
    r = site.pydr("failback", site.item, "--shutdown-hook",
                  f"virsh -c '{site.libvirtd.uri}' destroy {dr}", "--json", check=0)
    back = json.loads(r.stdout)
    assert back["machine"]["domain"] == site.domain and back["machine"]["uuid"] == site.uuid
    assert site.dom.isActive()  # site A's own domain, started again
    assert dr not in site.domains()
    wait_for_console(site.console_a, r"PYDR-VERIFY OK last=[1-9]", timeout=BOOT, domain=site.dom)


def test_change_point_stops_the_failover_domain_and_starts_it_on_the_new_disks(site):
    site.pydr("replicate", site.item, check=0)  # a second point
    out = json.loads(site.pydr("failover", site.item, "--point", "latest-processed", "--json",
                               check=0).stdout)
    dom = site.libvirtd.conn().lookupByName(out["machine"]["domain"])
    assert dom.isActive()
    first = out["point"]
    other = [p["id"] for p in json.loads(site.pydr("points", site.item, "--json",
                                                   check=0).stdout) if p["id"] != first][0]
    r = json.loads(site.pydr("change-point", site.item, "--point", other, "--json",
                             check=0).stdout)
    assert r["point"] == other
    assert r["machine"]["uuid"] == out["machine"]["uuid"] and r["machine"]["started"]
    assert dom.isActive()
    wait_for_console(r["machine"]["console"], r"PYDR-READY", timeout=BOOT, domain=dom)

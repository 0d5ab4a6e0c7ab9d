"""pydr.dr.domainxml: a point's domain XML rewritten for the recovery site
(pure functions: no libvirt)."""

import xml.etree.ElementTree as ET

import pytest

from pydr.dr import domainxml as dx
from pydr.errors import FormatError, InvalidArgument

SITE_A = """<domain type='kvm'>
  <name>web</name>
  <uuid>4d1c7b4e-8f0a-4c55-9d61-2f7d3a0e9b11</uuid>
  <memory unit='MiB'>256</memory>
  <seclabel type='dynamic' model='selinux'/>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/a/web.qcow2'/>
      <backingStore type='file'><format type='raw'/><source file='/srv/a/base.raw'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/web-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/srv/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='prod'/>
      <target dev='vnet7'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:cd'/>
      <source bridge='br-a'/>
    </interface>
    <serial type='file'>
      <source path='/var/log/a/web.log' append='on'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='/var/log/a/web.log'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web.agent'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>"""

DISKS = {"vda": ("/srv/b/web-vda.img", "raw"), "vdb": ("/dev/vg/dr-web-data", "raw")}


def _root(xml):
    return ET.fromstring(xml)


def test_machine_disks_lists_every_disk_with_its_source_and_format():
    assert dx.machine_disks(SITE_A) == [
        {"target": "vda", "type": "file", "source": "/srv/a/web.qcow2", "format": "qcow2",
         "device": "disk"},
        {"target": "vdb", "type": "block", "source": "/dev/vg/web-data", "format": "raw",
         "device": "disk"},
        {"target": "sda", "type": "file", "source": "/srv/iso/install.iso", "format": None,
         "device": "cdrom"}]


def test_has_agent():
    assert dx.has_agent(SITE_A)
    assert not dx.has_agent(SITE_A.replace("org.qemu.guest_agent.0", "com.example.other"))


def test_disks_point_at_the_recovered_disks_with_their_format_and_no_backing_chain():
    out = _root(dx.recovery_xml(SITE_A, disks=DISKS))
    vda, vdb, cdrom = out.find("devices").findall("disk")
    assert vda.get("type") == "file" and vda.find("source").get("file") == "/srv/b/web-vda.img"
    assert vda.find("driver").get("type") == "raw"
    assert vda.find("backingStore") is None
    assert vdb.get("type") == "block" and vdb.find("source").get("dev") == "/dev/vg/dr-web-data"
    assert cdrom.find("source").get("file") == "/srv/iso/install.iso"  # left alone
    assert "/srv/a/" not in dx.recovery_xml(SITE_A, disks=DISKS)


def test_a_disk_without_a_recovered_disk_is_refused():
    with pytest.raises(InvalidArgument, match="vdb"):
        dx.recovery_xml(SITE_A, disks={"vda": DISKS["vda"]})
    with pytest.raises(InvalidArgument, match="vdz"):
        dx.recovery_xml(SITE_A, disks=dict(DISKS, vdz=("/x", "raw")))


def test_name_and_uuid():
    kept = _root(dx.recovery_xml(SITE_A, disks=DISKS))
    assert kept.findtext("name") == "web"
    assert kept.findtext("uuid") == "4d1c7b4e-8f0a-4c55-9d61-2f7d3a0e9b11"
    renamed = _root(dx.recovery_xml(SITE_A, disks=DISKS, name="pydr-drill-web", new_uuid=True))
    assert renamed.findtext("name") == "pydr-drill-web"
    assert renamed.find("uuid") is None
    assert renamed.find("seclabel") is None


def test_network_map_rewrites_network_and_bridge_interfaces():
    out = _root(dx.recovery_xml(SITE_A, disks=DISKS,
                                network_map={"prod": "dr-prod", "br-a": "br-b"}))
    net, bridge = out.find("devices").findall("interface")
    assert net.find("source").get("network") == "dr-prod"
    assert bridge.find("source").get("bridge") == "br-b"
    assert net.find("mac").get("address") == "52:54:00:aa:bb:cc"  # a failover keeps its MACs
    assert net.find("target") is None  # site A's tap name


def test_unmapped_networks_stay():
    out = _root(dx.recovery_xml(SITE_A, disks=DISKS, network_map={"other": "x"}))
    net, bridge = out.find("devices").findall("interface")
    assert net.find("source").get("network") == "prod"
    assert bridge.find("source").get("bridge") == "br-a"


def test_a_drill_on_its_own_network_with_fresh_macs():
    out = _root(dx.recovery_xml(SITE_A, disks=DISKS, isolate="drillnet", fresh_macs=True))
    ifaces = out.find("devices").findall("interface")
    assert [i.get("type") for i in ifaces] == ["network", "network"]
    assert [i.find("source").get("network") for i in ifaces] == ["drillnet", "drillnet"]
    macs = [i.find("mac").get("address") for i in ifaces]
    assert not {"52:54:00:aa:bb:cc", "52:54:00:aa:bb:cd"} & set(macs)
    assert all(m.startswith("52:54:00:") for m in macs)


def test_a_drill_without_networks():
    out = _root(dx.recovery_xml(SITE_A, disks=DISKS, isolate="none"))
    assert out.find("devices").findall("interface") == []


def test_console_logs_go_to_the_pydr_console_never_site_a_s():
    out = dx.recovery_xml(SITE_A, disks=DISKS, console="/var/lib/pydr/c/web.log")
    root = _root(out)
    serial = root.find("devices/serial")
    console = root.find("devices/console")
    assert serial.find("source").get("path") == "/var/lib/pydr/c/web.log"
    assert serial.find("source").get("append") is None
    assert console.find("source").get("path") == "/var/lib/pydr/c/web.log"
    assert "/var/log/a/web.log" not in out
    nowhere = dx.recovery_xml(SITE_A, disks=DISKS)
    assert "/var/log/a/web.log" not in nowhere
    assert _root(nowhere).find("devices/serial").get("type") == "null"


def test_agent_channel_loses_its_socket_path():
    root = _root(dx.recovery_xml(SITE_A, disks=DISKS))
    channel = root.find("devices/channel")
    assert channel.find("source") is None
    assert channel.find("target").get("name") == "org.qemu.guest_agent.0"
    assert dx.has_agent(ET.tostring(root, encoding="unicode"))


@pytest.mark.parametrize("hostile", [
    '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
    '<domain><name>&b;</name></domain>',
    '<!doctype domain SYSTEM "file:///etc/passwd"><domain/>',
    '<domain><name>x</name>' + ' ' * (dx.MAX_XML + 1) + '</domain>',
    '<domain><name>x</name>',
    '<network><name>x</name></network>',
])
def test_hostile_or_malformed_xml_is_refused(hostile):
    with pytest.raises(FormatError):
        dx.recovery_xml(hostile, disks={})
    with pytest.raises(FormatError):
        dx.machine_disks(hostile)


def test_a_disk_without_a_target_is_refused():
    xml = "<domain><devices><disk type='file' device='disk'><source file='/x'/></disk>" \
          "</devices></domain>"
    with pytest.raises(FormatError, match="target"):
        dx.machine_disks(xml)


def test_parse_network_map():
    assert dx.parse_network_map(["prod=dr-prod", "br-a=br-b"]) == {"prod": "dr-prod",
                                                                   "br-a": "br-b"}
    for bad in (["prod"], ["=x"], ["x="], ["a=b", "a=c"]):
        with pytest.raises(InvalidArgument):
            dx.parse_network_map(bad)

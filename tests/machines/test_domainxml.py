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
    assert console is None  # it mirrored serial 0: libvirt makes it again from the serial
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


# -- what a point's XML may not carry into the recovered domain (review findings) --------
V = "/victims"
HOSTILE = SITE_A.replace("<memory unit='MiB'>256</memory>", """<memory unit='MiB'>256</memory>
  <os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
  <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/victims/nvram</nvram>
  <cmdline>console=ttyS0 app=MARK</cmdline></os>""").replace("</devices>", """
    <disk type='file' device='floppy'><source file='/victims/floppy'/><target dev='fda'/></disk>
    <disk type='block' device='lun'><source dev='/dev/sdz'/><target dev='sdz'/></disk>
    <disk type='file' device='cdrom'><source file='/srv/iso/x.iso'/><target dev='sdb'/></disk>
    <serial type='pty'><log file='/victims/seriallog' append='off'/><target port='1'/></serial>
    <serial type='dev'><source path='/dev/ttyS0'/><target port='2'/></serial>
    <parallel type='file'><source path='/victims/parallel'/><target port='0'/></parallel>
    <channel type='file'><source path='/victims/channel'/><target type='virtio' name='x'/></channel>
    <filesystem type='mount' accessmode='passthrough'><source dir='/etc'/><target dir='h'/>
    </filesystem>
    <hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source></hostdev>
    <memory model='nvdimm'><source><path>/victims/nvdimm</path></source>
      <target><size unit='KiB'>1024</size></target></memory>
    <input type='evdev'><source dev='/dev/input/event0'/></input>
    <audio id='1' type='file' path='/victims/audio.wav'/>
    <tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>
    <interface type='vhostuser'><source type='unix' path='/victims/vhost' mode='server'/>
      <model type='virtio'/></interface>
    <graphics type='vnc' socket='/victims/vnc'><listen type='socket' socket='/victims/vnc'/>
    </graphics>
  </devices>
  <qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
    <qemu:arg value='-drive'/><qemu:arg value='file=/victims/qdrive,if=none,id=x'/>
    <qemu:arg value='-netdev'/><qemu:arg value='user,id=n'/>
  </qemu:commandline>""")


def test_nothing_of_the_point_xml_gives_the_recovered_domain_a_host_file_to_write():
    notes = []
    out = dx.recovery_xml(HOSTILE, disks=DISKS, console="/vault/consoles/web-drill.log",
                          nvram="/vault/machines/web-drill.nvram", notes=notes)
    assert V not in out and "/dev/ttyS0" not in out and "/dev/sdz" not in out
    assert "/dev/input" not in out and "/dev/tpm0" not in out
    root = _root(out)
    devices = root.find("devices")
    for tag in ("filesystem", "hostdev", "memory", "log"):
        assert devices.findall(tag) == [] and devices.findall(f"*/{tag}") == []
    assert [d.get("device") for d in devices.findall("disk")] == ["disk", "disk", "cdrom",
                                                                    "cdrom"]
    assert all(d.find("readonly") is not None for d in devices.findall("disk")
               if d.get("device") == "cdrom")
    assert root.find(f"{{{dx.QEMU_NS}}}commandline") is None and "-netdev" not in out
    assert root.findtext("os/nvram") == "/vault/machines/web-drill.nvram"
    assert root.find("os/loader").text == "/usr/share/OVMF/OVMF_CODE.fd"  # read-only: kept
    serials = devices.findall("serial")
    assert serials[0].get("type") == "file"
    assert serials[0].find("source").get("path") == "/vault/consoles/web-drill.log"
    assert [s.get("type") for s in serials[1:]] == ["pty", "null"]
    assert devices.find("parallel").get("type") == "null"
    for what in ("floppy", "lun", "filesystem", "hostdev", "memory", "qemu:commandline", "log",
                 "nvram", "<input>", "<audio>", "<tpm>", "<interface>"):
        assert any(what in n for n in notes), (what, notes)
    dropped = dx.recovery_xml(HOSTILE, disks=DISKS)
    assert _root(dropped).find("os/nvram") is None and V not in dropped


def test_a_pty_serial_becomes_the_console_file_pydr_owns():
    xml = SITE_A.replace("<serial type='file'>\n      <source path='/var/log/a/web.log' "
                         "append='on'/>", "<serial type='pty'>")
    assert "<serial type='pty'>" in xml
    serial = _root(dx.recovery_xml(xml, disks=DISKS, console="/v/c.log")).find("devices/serial")
    assert serial.get("type") == "file" and serial.find("source").get("path") == "/v/c.log"


def test_name_and_uuid_are_set_as_elements_not_spliced_as_text():
    tricky = SITE_A.replace("<name>web</name>", "<!-- </name> --><name>web</name>").replace(
        "<memory", "<description>a &lt;/name&gt; and </description><memory")
    out = dx.recovery_xml(tricky, disks=DISKS, name="web-dr",
                          uuid="11111111-2222-3333-4444-555555555555")
    root = _root(out)
    assert root.findall("name")[0].text == "web-dr" and len(root.findall("name")) == 1
    assert [u.text for u in root.findall("uuid")] == ["11111111-2222-3333-4444-555555555555"]
    assert dx.domain_uuid(out) == "11111111-2222-3333-4444-555555555555"


def test_pydr_marks_the_domains_it_defines():
    mark = {"item": "web", "role": "drill", "vault": "v-123"}
    out = dx.recovery_xml(SITE_A, disks=DISKS, mark=mark)
    assert dx.domain_mark(out) == mark
    assert dx.domain_mark(SITE_A) is None
    again = dx.recovery_xml(out, disks=DISKS, mark=dict(mark, role="failover"))
    assert dx.domain_mark(again)["role"] == "failover"
    assert dx.kernel_cmdline(HOSTILE) == "console=ttyS0 app=MARK"
    assert dx.has_serial(SITE_A)
    assert not dx.has_serial(SITE_A.replace("<serial", "<parallel").replace("</serial>",
                                                                           "</parallel>"))

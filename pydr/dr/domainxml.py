"""A domain's XML rewritten for the recovery site: pure functions over
libvirt domain XML text (no libvirt needed).

The XML comes from a point in the vault, and so from site A: it is read as
data that may be hostile. A document with a DOCTYPE (and so entities) is
refused, as is one larger than :data:`MAX_XML` bytes; both are FormatError
(exit 7) naming what was refused.

:func:`recovery_xml` makes the domain that comes up at the recovery site:
its disks point at the recovered disks (with their own driver format; a
``<backingStore>`` chain of site A is dropped: qemu reads a qcow2 overlay's
backing file from the image itself), its name and UUID are its own when
asked, its networks are remapped (or cut off, for a drill), a drill's MACs
are fresh, a serial or console that logs to a file logs to the pydr-owned
console log instead (never over site A's log), and the guest agent's
channel loses its socket path so that libvirt picks one of its own.

What the point's XML may NOT carry into the recovered domain (it would
give the recovered guest, or QEMU, host files to write; see
docs/MACHINES.md "What the recovered domain may touch"): every such thing
is dropped, each with a note in the result:

- a disk that is not a recovered disk and not a cdrom (a floppy, a lun);
  cdroms stay but read-only;
- ``<filesystem>`` (host directory passthrough), ``<hostdev>``,
  ``<shmem>``, ``<redirdev>``, ``<smartcard>``, ``<memory>`` devices with
  a ``<source>`` (an nvdimm backed by a host file), an ``<input>`` with a
  host ``<source>`` (evdev), an ``<audio>`` writing a file, a passthrough
  ``<tpm>``, a vhost-user ``<interface>`` (a host socket); a
  ``<graphics>`` loses its unix socket path (libvirt picks its own);
- ``<qemu:commandline>`` (raw QEMU arguments: drives, netdevs, anything);
- every chardev ``<log>`` (a host file QEMU truncates or appends to);
  chardevs that write to a host file, device, pipe or socket become null;
- ``<os><nvram>`` points at a copy pydr owns (`nvram`), or is dropped.

Kernel, initrd and loader stay (QEMU opens them read-only). Each domain
pydr defines carries pydr's mark in ``<metadata>`` (:data:`MARK_NS`:
item, role, vault id): pydr destroys, undefines or redefines a domain
only when the mark says it is this vault's domain for that item and role.
"""

from __future__ import annotations

import os
import random
import re
import xml.etree.ElementTree as ET
from typing import Dict, List, Mapping, Optional, Tuple, Union

from ..endpoints.libvirt import MAX_XML, parse_xml  # noqa: F401 (MAX_XML: the docstring's)
from ..errors import FormatError, InvalidArgument

#: the guest agent's virtio-serial channel name
AGENT_CHANNEL = "org.qemu.guest_agent.0"

#: the XML namespace of pydr's mark in a domain's <metadata>
MARK_NS = "https://pydr.dev/xmlns/machine/1"
#: the namespace of libvirt's QEMU passthrough elements
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: device elements dropped from a recovered domain (host resources)
_DROPPED_DEVICES = ("filesystem", "hostdev", "shmem", "redirdev", "smartcard")
#: chardev elements (their <log>, and their host-side source)
_CHARDEVS = ("serial", "console", "parallel", "channel")
ET.register_namespace("pydr", MARK_NS)
_TARGET = re.compile(r"[a-z][a-z0-9]*\Z")
#: the source attribute of each disk type pydr can point at a recovered disk
_SOURCE_ATTR = {"file": "file", "block": "dev"}


def parse(xml: str, *, what: str = "domain XML") -> ET.Element:
    """The root ``<domain>`` element of `xml`.

    Args:
        xml: the XML text.
        what: how messages name it ("the XML of point 3 of 'web'").

    Returns:
        The root element.

    Raises:
        FormatError: the text is too large, has a DOCTYPE or an entity,
            is not well-formed, or is not a ``<domain>``.
    """
    if not isinstance(xml, str):
        raise InvalidArgument(f"{what}: expected XML text, not {type(xml).__name__}")
    root = parse_xml(xml, what, FormatError)
    if root.tag != "domain":
        raise FormatError(f"{what} is a <{root.tag}>, not a <domain>")
    return root


def _devices(root: ET.Element) -> ET.Element:
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    return devices


def machine_disks(xml: str) -> List[Dict[str, Optional[str]]]:
    """The disks of domain `xml`, in document order.

    Returns:
        [{"target", "type", "source", "format", "device"}]: the ``<target
        dev>``, the disk type ("file", "block", "network", ...), its
        source (a path, or None for a network or empty disk), the
        driver's format (None if not given) and the device ("disk",
        "cdrom", "floppy", "lun").

    Raises:
        FormatError: hostile or malformed XML, a disk without a valid
            target, two disks with the same target.
    """
    found = []
    seen = set()
    for disk in _devices(parse(xml)).findall("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if not dev or not _TARGET.match(dev):
            raise FormatError(f"domain XML: a disk has no valid <target dev> ({dev!r})")
        if dev in seen:
            raise FormatError(f"domain XML: two disks have target {dev!r}")
        seen.add(dev)
        kind = disk.get("type", "file")
        source = disk.find("source")
        path = None
        if source is not None and kind in _SOURCE_ATTR:
            path = source.get(_SOURCE_ATTR[kind])
        driver = disk.find("driver")
        found.append({"target": dev, "type": kind, "source": path,
                      "format": driver.get("type") if driver is not None else None,
                      "device": disk.get("device", "disk")})
    return found


def has_agent(xml: str) -> bool:
    """Whether domain `xml` has a guest-agent channel (a ``<channel>`` whose
    target is named org.qemu.guest_agent.0). FormatError for hostile XML."""
    for channel in _devices(parse(xml)).findall("channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            return True
    return False


def domain_name(xml: str) -> Optional[str]:
    """The ``<name>`` of domain `xml` (None without one)."""
    return parse(xml).findtext("name")


def domain_uuid(xml: str) -> Optional[str]:
    """The ``<uuid>`` of domain `xml` (None without one)."""
    return parse(xml).findtext("uuid")


def parse_network_map(pairs) -> Dict[str, str]:
    """{SRC: DST} from "SRC=DST" strings (``--network-map``).

    Raises:
        InvalidArgument: a pair without '=' or with an empty side, or a
            SRC given twice.
    """
    mapping: Dict[str, str] = {}
    for pair in pairs or ():
        src, sep, dst = str(pair).partition("=")
        if not sep or not src or not dst:
            raise InvalidArgument(f"--network-map {pair!r}: expected SRC=DST (a libvirt network "
                                  f"or bridge name on each side)")
        if src in mapping:
            raise InvalidArgument(f"--network-map: network {src!r} is mapped twice")
        mapping[src] = dst
    return mapping


def fresh_mac(rng: Optional[random.Random] = None) -> str:
    """A random MAC in QEMU's locally administered range 52:54:00:xx:xx:xx."""
    rng = rng or random.SystemRandom()
    return "52:54:00:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(3))


def _set_text(root: ET.Element, tag: str, value: Optional[str]) -> None:
    elem = root.find(tag)
    if value is None:
        if elem is not None:
            root.remove(elem)
        return
    if elem is None:
        elem = ET.Element(tag)
        root.insert(1 if tag == "uuid" else 0, elem)
    elem.text = value


def _rewrite_disks(devices: ET.Element, disks: Mapping[str, Tuple[str, str]],
                   notes: List[str]) -> None:
    wanted = dict(disks)
    for disk in devices.findall("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in wanted:
            device = disk.get("device", "disk")
            if device == "disk":
                raise InvalidArgument(f"domain XML: disk {dev!r} has no recovered disk")
            if device == "cdrom":  # read-only by nature: kept, and said so to libvirt
                if disk.find("readonly") is None:
                    ET.SubElement(disk, "readonly")
                continue
            devices.remove(disk)  # a floppy or lun: a writable host file or device
            notes.append(f"the {device} {dev!r} of the point's XML was dropped (not a "
                         f"recovered disk: the recovered machine must not write host files)")
            continue
        path, fmt = wanted.pop(dev)
        path = os.fspath(path)
        block = path.startswith("/dev/")
        disk.set("type", "block" if block else "file")
        for old in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(old)
        source = ET.Element("source", {"dev" if block else "file": path})
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver", {"name": "qemu"})
            disk.insert(0, driver)
        driver.set("type", fmt)
        disk.insert(list(disk).index(driver) + 1, source)
    if wanted:
        raise InvalidArgument(f"domain XML has no disk {', '.join(sorted(wanted))}")


def _rewrite_interfaces(devices: ET.Element, network_map: Mapping[str, str],
                        isolate: Union[bool, str, None], fresh_macs: bool) -> None:
    for iface in devices.findall("interface"):
        if isolate == "none" or isolate is True:
            devices.remove(iface)
            continue
        kind = iface.get("type")
        source = iface.find("source")
        if isolate:  # a drill's own network: every interface joins it
            iface.set("type", "network")
            if source is not None:
                iface.remove(source)
            source = ET.SubElement(iface, "source", {"network": str(isolate)})
        elif kind in ("network", "bridge") and source is not None:
            attr = "network" if kind == "network" else "bridge"
            old = source.get(attr)
            if old in network_map:
                source.set(attr, network_map[old])
        if fresh_macs:
            mac = iface.find("mac")
            if mac is None:
                mac = ET.SubElement(iface, "mac")
            mac.set("address", fresh_mac())
        target = iface.find("target")  # site A's tap device name: libvirt picks one here
        if target is not None:
            iface.remove(target)


def _null(dev: ET.Element) -> None:
    dev.set("type", "null")
    for source in dev.findall("source"):
        dev.remove(source)


def _rewrite_consoles(devices: ET.Element, console: Optional[str], notes: List[str]) -> None:
    """The first serial port logs to `console` (a file pydr owns: a pty,
    null or file serial alike), every other host-side chardev is null; a
    ``<console>`` that mirrors a serial port goes (libvirt makes it again
    from the first serial); no chardev keeps a ``<log>``."""
    for tag in _CHARDEVS:
        for dev in devices.findall(tag):
            for log in dev.findall("log"):
                dev.remove(log)
                notes.append(f"the {tag}'s log file {log.get('file')!r} of the point's XML was "
                             f"dropped")
    for number, dev in enumerate(devices.findall("serial")):
        if number == 0 and console is not None:
            _null(dev)
            dev.set("type", "file")
            dev.insert(0, ET.Element("source", {"path": os.fspath(console)}))
        elif dev.get("type") not in ("null", "pty"):
            _null(dev)  # never a host file, device, pipe or socket
    for dev in devices.findall("console"):
        target = dev.find("target")
        if target is None or target.get("type", "serial") == "serial":
            devices.remove(dev)  # libvirt mirrors the first serial port again
        elif dev.get("type") not in ("null", "pty"):
            _null(dev)
    for dev in devices.findall("parallel"):
        if dev.get("type") not in ("null", "pty"):
            _null(dev)


def _rewrite_channels(devices: ET.Element) -> None:
    for channel in devices.findall("channel"):
        source = channel.find("source")
        if channel.get("type") == "unix" and source is not None:
            channel.remove(source)  # site A's socket path: libvirt picks its own
        elif channel.get("type") in ("file", "dev", "pipe"):
            _null(channel)


def _drop_host_resources(root: ET.Element, devices: ET.Element, notes: List[str]) -> None:
    for tag in _DROPPED_DEVICES:
        for dev in devices.findall(tag):
            devices.remove(dev)
            notes.append(f"the <{tag}> of the point's XML was dropped (a host resource)")
    for dev in devices.findall("memory"):
        if dev.find("source") is not None:
            devices.remove(dev)
            notes.append(f"the {dev.get('model', '')} <memory> device of the point's XML was "
                         f"dropped (backed by a host file)")
    for tag, why in (("input", "a host input device"), ("audio", "a host audio file"),
                     ("tpm", "a host TPM"), ("interface", "a host socket")):
        for dev in devices.findall(tag):
            backend = dev.find("backend")
            if (tag == "input" and dev.find("source") is not None) \
                    or (tag == "audio" and dev.get("path")) \
                    or (tag == "tpm" and backend is not None
                        and backend.get("type") == "passthrough") \
                    or (tag == "interface" and dev.get("type") == "vhostuser"):
                devices.remove(dev)
                notes.append(f"the <{tag}> of the point's XML was dropped ({why})")
    for graphics in devices.findall("graphics"):  # QEMU would unlink and bind such a path
        graphics.attrib.pop("socket", None)
        for listen in graphics.findall("listen"):
            if listen.get("type") == "socket" or listen.get("socket"):
                graphics.remove(listen)
    for elem in root.findall(f"{{{QEMU_NS}}}commandline"):
        root.remove(elem)
        notes.append("the <qemu:commandline> of the point's XML was dropped (raw QEMU "
                     "arguments may open host files or add network devices)")


def _rewrite_nvram(root: ET.Element, nvram: Optional[str], notes: List[str]) -> None:
    os_elem = root.find("os")
    if os_elem is None:
        return
    for elem in os_elem.findall("nvram"):
        if nvram is None:
            os_elem.remove(elem)
            notes.append("the <nvram> of the point's XML was dropped")
        else:  # a copy pydr owns: libvirt makes it from the firmware's template
            notes.append(f"the <nvram> {(elem.text or '').strip()!r} of the point's XML is "
                         f"{os.fspath(nvram)!r} here (a copy pydr owns)")
            for child in list(elem):
                elem.remove(child)
            elem.attrib.pop("type", None)
            elem.text = os.fspath(nvram)


def _set_mark(root: ET.Element, mark: Mapping[str, str]) -> None:
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.Element("metadata")
        root.insert(2, metadata)
    for old in metadata.findall(f"{{{MARK_NS}}}domain"):
        metadata.remove(old)
    ET.SubElement(metadata, f"{{{MARK_NS}}}domain", {k: str(v) for k, v in mark.items()})


def domain_mark(xml: str) -> Optional[Dict[str, str]]:
    """pydr's mark in domain `xml`'s ``<metadata>`` ({"item", "role",
    "vault"}), or None when it has none. FormatError for hostile XML."""
    root = parse(xml)
    metadata = root.find("metadata")
    elem = metadata.find(f"{{{MARK_NS}}}domain") if metadata is not None else None
    return dict(elem.attrib) if elem is not None else None


def domain_nvram(xml: str) -> Optional[str]:
    """The ``<os><nvram>`` path of domain `xml` (None without one)."""
    text = parse(xml).findtext("os/nvram")
    return text.strip() if text else None


def has_serial(xml: str) -> bool:
    """Whether domain `xml` has a ``<serial>`` port (the console probe reads
    what the first one writes). FormatError for hostile XML."""
    return _devices(parse(xml)).find("serial") is not None


def kernel_cmdline(xml: str) -> str:
    """The ``<os><cmdline>`` of domain `xml` ("" without one)."""
    return parse(xml).findtext("os/cmdline") or ""


def recovery_xml(xml: str, *, disks: Mapping[str, Tuple[str, str]], name: Optional[str] = None,
                 new_uuid: bool = False, network_map: Optional[Mapping[str, str]] = None,
                 isolate: Union[bool, str, None] = False, console: Optional[str] = None,
                 fresh_macs: bool = False, uuid: Optional[str] = None,
                 mark: Optional[Mapping[str, str]] = None, nvram: Optional[str] = None,
                 notes: Optional[List[str]] = None) -> str:
    """Domain `xml` rewritten for the recovery site.

    Args:
        xml: the point's domain XML (libvirt's inactive XML at site A).
        disks: {target: (path, format)}: every ``<disk device='disk'>``
            must be in it (a path under /dev/ makes a block disk); cdroms
            and floppies not in it are left as they are.
        name: the new ``<name>`` (None: unchanged).
        new_uuid: drop the ``<uuid>`` (libvirt makes a fresh one).
        network_map: {network or bridge at site A: the one here} for
            ``type='network'`` and ``type='bridge'`` interfaces.
        isolate: False: interfaces stay (remapped); "none" or True: every
            interface is removed; a network name: every interface joins
            that network (a drill's isolated network).
        console: the file a serial/console of type 'file' logs to from
            now on (None: such a device logs nowhere).
        fresh_macs: give every interface a new random MAC (a drill, so
            that it never clashes with the running machine).
        uuid: the new ``<uuid>`` (None: as `new_uuid` says).
        mark: pydr's mark for ``<metadata>`` ({"item", "role", "vault"};
            None: none).
        nvram: the path of the NVRAM copy pydr owns (None: an ``<nvram>``
            is dropped).
        notes: a list that gets a line for each thing dropped.

    Returns:
        The new XML text.

    Raises:
        FormatError: hostile or malformed XML.
        InvalidArgument: a disk of the domain has no recovered disk, or
            `disks` names a target the domain does not have.
    """
    root = parse(xml)
    notes = notes if notes is not None else []
    if name is not None:
        _set_text(root, "name", name)
    if uuid is not None:
        _set_text(root, "uuid", uuid)
    elif new_uuid:
        _set_text(root, "uuid", None)
    if mark is not None:
        _set_mark(root, mark)
    devices = _devices(root)
    _rewrite_disks(devices, disks, notes)
    _drop_host_resources(root, devices, notes)
    _rewrite_interfaces(devices, dict(network_map or {}), isolate, fresh_macs)
    _rewrite_consoles(devices, console, notes)
    _rewrite_channels(devices)
    _rewrite_nvram(root, nvram, notes)
    for tag in ("seclabel",):  # site A's security labels mean nothing here
        for elem in root.findall(tag):
            root.remove(elem)
    return ET.tostring(root, encoding="unicode")

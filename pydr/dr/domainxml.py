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
"""

from __future__ import annotations

import os
import random
import re
import xml.etree.ElementTree as ET
from typing import Dict, List, Mapping, Optional, Tuple, Union

from ..errors import FormatError, InvalidArgument

#: the largest domain XML pydr reads (bytes of UTF-8): real ones are a few KiB
MAX_XML = 1 << 20

#: the guest agent's virtio-serial channel name
AGENT_CHANNEL = "org.qemu.guest_agent.0"

_DOCTYPE = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
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
    if len(xml.encode("utf-8", "surrogatepass")) > MAX_XML:
        raise FormatError(f"{what} is larger than {MAX_XML} bytes: refused")
    if _DOCTYPE.search(xml):
        raise FormatError(f"{what} has a DOCTYPE or ENTITY declaration: refused "
                          f"(libvirt never writes one)")
    try:  # without a DOCTYPE there are no entities to expand: only XML's own five
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise FormatError(f"{what} is not well-formed XML: {exc}") from None
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


def _rewrite_disks(devices: ET.Element, disks: Mapping[str, Tuple[str, str]]) -> None:
    wanted = dict(disks)
    for disk in devices.findall("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in wanted:
            if disk.get("device", "disk") == "disk":
                raise InvalidArgument(f"domain XML: disk {dev!r} has no recovered disk")
            continue  # a cdrom or floppy: left as it is (its media may be absent here)
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


def _rewrite_consoles(devices: ET.Element, console: Optional[str]) -> None:
    for tag in ("serial", "console"):
        for dev in devices.findall(tag):
            if dev.get("type") != "file":
                continue
            source = dev.find("source")
            if source is None:
                continue
            if console is None:  # never write over site A's log: no log at all
                dev.set("type", "null")
                dev.remove(source)
            else:
                source.set("path", os.fspath(console))
                source.attrib.pop("append", None)


def _rewrite_channels(devices: ET.Element) -> None:
    for channel in devices.findall("channel"):
        source = channel.find("source")
        if channel.get("type") == "unix" and source is not None:
            channel.remove(source)  # site A's socket path: libvirt picks its own


def recovery_xml(xml: str, *, disks: Mapping[str, Tuple[str, str]], name: Optional[str] = None,
                 new_uuid: bool = False, network_map: Optional[Mapping[str, str]] = None,
                 isolate: Union[bool, str, None] = False, console: Optional[str] = None,
                 fresh_macs: bool = False) -> str:
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

    Returns:
        The new XML text.

    Raises:
        FormatError: hostile or malformed XML.
        InvalidArgument: a disk of the domain has no recovered disk, or
            `disks` names a target the domain does not have.
    """
    root = parse(xml)
    if name is not None:
        _set_text(root, "name", name)
    if new_uuid:
        _set_text(root, "uuid", None)
    devices = _devices(root)
    _rewrite_disks(devices, disks)
    _rewrite_interfaces(devices, dict(network_map or {}), isolate, fresh_macs)
    _rewrite_consoles(devices, console)
    _rewrite_channels(devices)
    for tag in ("seclabel",):  # site A's security labels mean nothing here
        for elem in root.findall(tag):
            root.remove(elem)
    return ET.tostring(root, encoding="unicode")

"""A disk of a libvirt domain, ``libvirt:DOMAIN:TARGET`` (TARGET its
``<target dev>``, such as vda; DOMAIN may hold ':', the spec is split at
the last one), and the domain itself as pydr reaches it: its XML, its
disks, its checkpoints and pull-mode backup jobs
(pydr.transport.libvirt_backup), its guest agent.

While the domain runs, its disks are read only through a backup job's
export (pydr.dr.checkpoints cuts them): a direct read or write is refused.
While it is shut off, a disk is its file as the domain's XML names it (a
QEMU image through qemu-nbd, or a raw file or device).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Dict, Iterator, List, Optional
from xml.etree import ElementTree

from ..errors import InvalidArgument, UnknownName, UnsupportedFile
from ..transport.libvirt import MAX_XML, parse_xml as _parse_libvirt_xml  # noqa: F401 (MAX_XML: for dr)
from .base import Endpoint

SCHEME = "libvirt:"
#: a disk target as libvirt names them (vda, sdb, hdc, ...)
TARGET_RULE = re.compile(r"[a-z][a-z0-9]*")
#: the guest agent's channel in a domain's XML
AGENT_CHANNEL = "org.qemu.guest_agent.0"


def is_libvirt_spec(spec: object) -> bool:
    """Whether `spec` names a disk of a libvirt domain."""
    return isinstance(spec, str) and spec.startswith(SCHEME)


def parse_spec(spec: str):
    """(domain, target) of ``libvirt:DOMAIN:TARGET``, or InvalidArgument."""
    body = spec[len(SCHEME):] if is_libvirt_spec(spec) else ""
    domain, sep, target = body.rpartition(":")
    if not sep or not domain or not TARGET_RULE.fullmatch(target):
        raise InvalidArgument(f"a disk of a libvirt domain is libvirt:DOMAIN:TARGET (TARGET as "
                              f"vda), not {spec!r}")
    return domain, target


def disk_spec(domain: str, target: str) -> str:
    """The spec of disk `target` of `domain`."""
    return f"{SCHEME}{domain}:{target}"


def parse_xml(text: str, what: str = "the domain's XML",
              error: type = InvalidArgument) -> ElementTree.Element:
    """Domain XML parsed (pydr.transport.libvirt.parse_xml: size capped, a
    DOCTYPE or entity refused); a problem raises `error` naming `what`."""
    return _parse_libvirt_xml(text, what, error)


def xml_disks(text: str) -> List[Dict[str, Optional[str]]]:
    """The <disk> devices of domain XML `text`: [{"target", "device" (disk,
    cdrom, floppy, lun), "type" (file, block, network, volume), "source"
    (a path, or None), "format" (the driver's type: qcow2, raw, ...)}]."""
    disks = []
    for d in parse_xml(text).iter("disk"):
        target = d.find("target")
        source = d.find("source")
        driver = d.find("driver")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev")
        disks.append({"target": target.get("dev") if target is not None else None,
                      "device": d.get("device", "disk"), "type": d.get("type"),
                      "source": path, "format": driver.get("type") if driver is not None
                      else None})
    return disks


def xml_has_agent(text: str) -> bool:
    """Whether domain XML `text` has the guest agent's channel."""
    for channel in parse_xml(text).iter("channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            return True
    return False


def checkpoint_prefix(vault_id: str) -> str:
    """How vault `vault_id`'s checkpoints of a domain are named (then the
    generation): pydr.transport.libvirt_backup.checkpoint_prefix."""
    from ..transport.libvirt_backup import checkpoint_prefix as prefix

    return prefix(vault_id)


class LibvirtDomain:
    """A domain of a libvirt daemon, found by `name` and (when given)
    checked to be the machine of `uuid`; connected on first use."""

    def __init__(self, name: str, uri: Optional[str] = None, uuid: Optional[str] = None):
        self.name, self.uri, self.uuid = name, uri, uuid
        self._conn = self._dom = None

    @property
    def where(self) -> str:
        return self.uri or "libvirt"

    @property
    def dom(self):
        """The libvirt.virDomain (UnknownName: there is none; MachineError:
        another UUID has the name, or libvirt failed)."""
        if self._dom is None:
            from ..transport.libvirt import connect, find_domain

            if self._conn is None:
                self._conn = connect(self.uri)
            self._dom = find_domain(self._conn, self.name, self.uuid, uri=self.uri)
        return self._dom

    def close(self) -> None:
        """Drop the connection (a new one is made on next use)."""
        conn, self._conn, self._dom = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def uuid_string(self) -> str:
        """The domain's UUID."""
        return self.dom.UUIDString()

    def inactive_xml(self) -> str:
        """Its persistent configuration (kept with every point)."""
        from ..transport.libvirt import inactive_xml

        return inactive_xml(self.dom, uri=self.uri)

    def live_xml(self) -> str:
        """Its XML as it runs (or its configuration when shut off)."""
        from ..transport.libvirt import libvirt_errors

        with libvirt_errors(f"reading the XML of domain {self.name!r}", path=self.where):
            return self.dom.XMLDesc(0)

    def running(self) -> bool:
        """Whether the domain is active."""
        from ..transport.libvirt import is_running

        return is_running(self.dom)

    def disk(self, target: str) -> Dict[str, Optional[str]]:
        """Disk `target` as the domain's current XML has it (UnknownName: none)."""
        for d in xml_disks(self.live_xml()):
            if d["target"] == target and d["device"] == "disk":
                return d
        raise UnknownName(f"domain {self.name!r} has no disk {target!r}", path=self.where)

    def has_agent(self) -> bool:
        """Whether the domain's XML has a guest agent channel."""
        return xml_has_agent(self.live_xml())

    def agent(self, command: str, **arguments):
        """A guest-agent command's "return" value (MachineError when it fails)."""
        from ..transport.libvirt import agent_command

        return agent_command(self.dom, command, uri=self.uri, **arguments)

    # -- checkpoints and backup jobs (pydr.transport.libvirt_backup) -----------
    def checkpoints(self) -> Dict[str, Dict[str, str]]:
        """{checkpoint: {target: "bitmap" | "no"}} of the domain."""
        from ..transport.libvirt_backup import checkpoints

        return checkpoints(self.dom, where=self.where)

    def checkpoint_identity(self, name: str) -> Optional[str]:
        """Checkpoint `name`'s creation time and description (None: there
        is none; pydr.transport.libvirt_backup.checkpoint_identity)."""
        from ..transport.libvirt_backup import checkpoint_identity

        return checkpoint_identity(self.dom, name, where=self.where)

    def disk_facts(self, xml: Optional[str] = None) -> Dict[str, Dict[str, object]]:
        """{target: {"source": the file's real path, "capacity": bytes}} of
        every <disk device='disk'> of `xml` (default: the domain's XML as it
        runs); what a checkpoint vouches for (pydr.dr.checkpoints)."""
        from ..transport.libvirt import libvirt_errors

        facts: Dict[str, Dict[str, object]] = {}
        for d in xml_disks(xml if xml is not None else self.live_xml()):
            if d["device"] != "disk" or not d["target"]:
                continue
            with libvirt_errors(f"reading the size of disk {d['target']} of domain "
                                f"{self.name!r}", path=self.where):
                capacity = self.dom.blockInfo(d["target"], 0)[0]
            facts[d["target"]] = {"source": os.path.realpath(d["source"]) if d["source"]
                                  else None, "capacity": int(capacity)}
        return facts

    def delete_checkpoint(self, name: str) -> bool:
        """Delete checkpoint `name` (its changes merge into its parent's);
        False when there is none."""
        from ..transport.libvirt import libvirt_errors
        from ..transport.libvirt_backup import delete_checkpoint

        with libvirt_errors(f"deleting checkpoint {name!r} of domain {self.name!r}",
                            path=self.where):
            return delete_checkpoint(self.dom, name, where=self.where)

    def clear_stale_job(self, vault_id: str) -> Optional[str]:
        """End a backup job a killed cycle of vault `vault_id` left (its
        socket is returned); MachineError for any other job."""
        from ..transport.libvirt_backup import stale_job

        return stale_job(self.dom, vault_id, where=self.where)

    def thaw_left(self) -> bool:
        """Thaw the guest if a killed pydr left it frozen (True when it was)."""
        from ..transport.libvirt_backup import thaw_left

        return thaw_left(self.dom, where=self.where)

    @contextlib.contextmanager
    def backup(self, checkpoint: str, *, incremental: Optional[str], tracked: List[str],
               full_only: List[str], freeze: bool, freeze_bound: float,
               vault_id: str, nonce: str = "") -> Iterator:
        """A pull-mode backup job of the domain's disks making `checkpoint`
        (pydr.transport.libvirt_backup.begin, which documents the rest);
        yields its BackupJob (uri(target), bitmap(target), frozen)."""
        from ..transport.libvirt_backup import begin

        with begin(self.dom, checkpoint, incremental=incremental, tracked=tracked,
                   full_only=full_only, freeze=freeze, freeze_bound=freeze_bound,
                   vault_id=vault_id, nonce=nonce, where=self.where) as job:
            yield job


class LibvirtDiskEndpoint(Endpoint):
    """Disk `target` of a libvirt domain, ``libvirt:DOMAIN:TARGET``; `uri`
    is the daemon's connection, `uuid` the protected machine's (a domain of
    that name with another UUID is refused). Tracked by libvirt's
    checkpoints (pydr.dr.checkpoints)."""

    tracking = "libvirt"

    def __init__(self, spec: str, *, uri: Optional[str] = None, uuid: Optional[str] = None,
                 domain: Optional[LibvirtDomain] = None):
        super().__init__(spec)
        name, self.target = parse_spec(spec)
        self.domain = domain if domain is not None else LibvirtDomain(name, uri, uuid)
        self.warm = None  # no warm state: a cycle connects once through its session

    @property
    def path(self) -> str:
        return self.spec

    @property
    def identity(self) -> str:
        """The disk's file (its real path) where libvirt names one, so that
        the same file protected twice is found; else the spec."""
        with contextlib.suppress(Exception):
            source = self.domain.disk(self.target)["source"]
            if source:
                return os.path.realpath(source)
        return self.spec

    def exists(self) -> bool:
        try:
            self.domain.disk(self.target)
            return True
        except UnknownName:
            return False

    def size(self) -> int:
        """The disk's virtual size in bytes (libvirt's blockInfo capacity)."""
        from ..transport.libvirt import libvirt_errors

        self.domain.disk(self.target)
        with libvirt_errors(f"reading the size of disk {self.target!r} of domain "
                            f"{self.domain.name!r}", path=self.domain.where):
            return int(self.domain.dom.blockInfo(self.target, 0)[0])

    def file_endpoint(self) -> Endpoint:
        """The disk's file as an endpoint (only while the domain is shut
        off: UnsupportedFile otherwise)."""
        if self.domain.running():
            raise UnsupportedFile(f"disk {self.target} of domain {self.domain.name!r} is in use: "
                                  f"a running domain's disk is read through a backup job "
                                  f"(a replication cycle), never directly", path=self.spec)
        d = self.domain.disk(self.target)
        if d["type"] not in ("file", "block") or not d["source"]:
            raise UnsupportedFile(f"disk {self.target} of domain {self.domain.name!r} is a "
                                  f"{d['type']} disk: pydr reads file and block disks",
                                  path=self.spec)
        fmt = d["format"] or "raw"
        if fmt == "raw":
            from .local import LocalEndpoint

            return LocalEndpoint(d["source"])
        from .qemu import QemuImageEndpoint

        return QemuImageEndpoint(d["source"], fmt)

    @contextlib.contextmanager
    def engine_disk(self, *, write=False, size=None, bitmap=None):
        with self.file_endpoint().engine_disk(write=write, size=size, bitmap=bitmap) as dev:
            yield dev

    def open_source(self, **kwargs):
        return self.file_endpoint().open_source(**kwargs)

    def open_target(self, **kwargs):
        return self.file_endpoint().open_target(**kwargs)

    def snapshot(self):
        return None

    def _at(self, path):
        raise UnsupportedFile("a disk of a libvirt domain has no files beside it", path=self.spec)

    def rename(self, dest):
        raise UnsupportedFile("a disk of a libvirt domain cannot be renamed", path=self.spec)


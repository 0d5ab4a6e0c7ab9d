"""Protecting a libvirt domain as an item: its disks found in its XML, a
replica named after each disk's target, the machine recorded (docs/MACHINES.md,
"Protecting a libvirt domain"). Its cycles are tracked by libvirt's
checkpoints (pydr.dr.checkpoints), and every point keeps the domain's XML.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..endpoints.libvirt import TARGET_RULE, LibvirtDomain, disk_spec, xml_disks, xml_has_agent
from ..endpoints.specs import parse_remote
from ..errors import InvalidArgument, InvalidState
from . import protection
from .policy import check_new_item_policy

if TYPE_CHECKING:
    from .store import Store


@dataclass(frozen=True)
class ProtectedMachine:
    """What protect_machine recorded.

    item: the item's name.
    domain: the domain's name; uuid: its UUID (a domain of that name with
        another UUID is refused by every later cycle).
    uri: the libvirt connection (None: libvirt's default).
    agent: whether the domain has a guest-agent channel (its points are
        frozen, "app-consistent", when the agent answers).
    disks: ((target, source spec, replica spec), ...), in the XML's order.
    notes: what a person should know (devices skipped: cdroms, floppies).
    """

    item: str
    domain: str
    uuid: str
    uri: Optional[str]
    agent: bool
    disks: Tuple[Tuple[str, str, str], ...]
    notes: Tuple[str, ...] = field(default=())

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (what ``pydr protect --libvirt --json`` prints)."""
        return {"type": "protected-machine", "version": 1, "item": self.item, "domain": self.domain, "uuid": self.uuid, "uri": self.uri,
                "agent": self.agent,
                "disks": [{"target": t, "source": s, "replica": r} for t, s, r in self.disks],
                "notes": list(self.notes)}


def replica_for(to: str, item: str, target: str) -> str:
    """The replica of disk `target` of machine `item` under `to`: DIR or
    host:DIR -> .../ITEM-TARGET.img."""
    name = f"{item}-{target}.img"
    if to.startswith("s3://"):  # the store: protect names each disk in it (#ITEM/NAME)
        return to
    remote = parse_remote(to)
    if remote is not None:
        host, path = remote
        return f"{host}:{path.rstrip('/')}/{name}"
    return os.path.join(to, name)


def machine_disks(xml: str, domain: str, uri: Optional[str]):
    """[target] of the domain's disks to protect and the notes on the
    devices left out, from its XML; InvalidArgument for a disk pydr cannot
    read (a network or volume disk) and for a domain without disks."""
    targets, notes = [], []
    for d in xml_disks(xml):
        if d["device"] != "disk":
            notes.append(f"{d['device']} {d['target']} of domain {domain!r} is not protected")
            continue
        target = d["target"] or ""
        if not TARGET_RULE.fullmatch(target):
            raise InvalidArgument(f"disk {target!r} of domain {domain!r}: pydr names disks by "
                                  f"targets such as vda", path=uri or "libvirt")
        if d["type"] not in ("file", "block") or not d["source"]:
            raise InvalidArgument(f"disk {target} of domain {domain!r} is a {d['type']} disk: "
                                  f"pydr protects file and block disks", path=uri or "libvirt")
        targets.append(target)
    if not targets:
        raise InvalidArgument(f"domain {domain!r} has no disk to protect", path=uri or "libvirt")
    return targets, notes


def _other_vaults_checkpoints(store, found: LibvirtDomain) -> List[str]:
    """The names of the domain's checkpoints made by another pydr vault."""
    from ..endpoints.libvirt import checkpoint_prefix
    from .tracking import PREFIX

    ours = checkpoint_prefix(str(store.vault_id()))
    return sorted(n for n in found.checkpoints() if n.startswith(PREFIX)
                  and not n.startswith(ours))


def protect_machine(store, name: str, domain: str, to: str, *, uri: Optional[str] = None,
                    **options: Any) -> ProtectedMachine:
    """Register item `name`, the libvirt domain `domain` at `uri`, with a
    replica of each of its disks under `to`.

    Args:
        store: the open vault (pydr.dr.store.Store).
        name: the item's name.
        domain: the domain's name (it may be running or shut off).
        to: where the replicas go: a directory here, or [user@]host:DIR
            (each disk's replica is ITEM-TARGET.img in it), or an object
            store s3://BUCKET/PREFIX (a chunk index, each disk ITEM-TARGET.img).
        uri: the libvirt connection (None: libvirt's default).
        options: protect's other options (group, retention,
            retention_age, quiesce_hook, thaw_hook, rsh, remote_pydr,
            policy_columns); `host`, `cbt` and `disks` are not for a
            machine.

    Returns:
        A :class:`ProtectedMachine`.

    Raises:
        UnknownName: no such domain (exit 3).
        MachineError: libvirt cannot be reached or failed (exit 22).
        InvalidArgument: a network disk, no disk, a bad option, --host
            (not yet).
        InvalidState: the name or a replica is taken (protect's checks).
    """
    if not isinstance(domain, str) or not domain or "\0" in domain:
        raise InvalidArgument(f"a libvirt domain's name, not {domain!r}")
    for refused in ("cbt", "cbt_granularity", "disks"):
        if options.get(refused):
            raise InvalidArgument(f"{refused} is not an option of a libvirt item: its disks "
                                  f"come from the domain, always tracked by its checkpoints")
        options.pop(refused, None)
    if options.get("host"):
        raise InvalidArgument("--host with --libvirt is not supported yet: pydr reaches the "
                              "domain through --connect URI from here")
    to = os.fspath(to)
    protection.recordable_text(to, "--to")
    if parse_remote(to) is None and not to.startswith("s3://"):
        to = os.path.abspath(to)
    found = LibvirtDomain(domain, uri)
    xml = found.inactive_xml()
    uuid = found.uuid_string()
    targets, notes = machine_disks(xml, domain, uri)
    disks = [(t, disk_spec(domain, t), replica_for(to, name, t)) for t in targets]
    agent = xml_has_agent(xml)
    try:
        others = _other_vaults_checkpoints(store, found)
    finally:
        found.close()
    if others:
        raise InvalidState(f"domain {domain!r} holds checkpoints of another pydr vault "
                           f"({', '.join(others)}): two vaults' cycles would end each other's "
                           f"jobs and checkpoints", path=uri or "libvirt", item=name,
                           hint="protect it from one vault only; if the other vault no longer "
                                "protects it, delete its checkpoints (virsh checkpoint-delete "
                                "DOMAIN NAME)")
    if parse_remote(to) is None and not to.startswith("s3://"):
        os.makedirs(to, exist_ok=True)  # --to names a directory: made as cp -r would
    protection.protect(store, name, [(s, r) for _, s, r in disks], cbt=True,
                       machine={"kind": "libvirt", "uri": uri, "domain": domain, "uuid": uuid,
                                "agent": int(agent)}, **options)
    return ProtectedMachine(name, domain, uuid, uri, agent, tuple(disks), tuple(notes))


class MachineOperations:
    """Machines as items (see pydr.Vault)."""

    store: Store  # the open store (set by Vault.__init__)

    def protect_machine(self, name: str, domain: str, to: str, *, uri: Optional[str] = None,
                        group: Optional[str] = None, retention: int = 24,
                        retention_age: Optional[float] = None,
                        quiesce_hook: Optional[str] = None, thaw_hook: Optional[str] = None,
                        rsh: Optional[str] = None, remote_pydr: Optional[str] = None,
                        policy: Optional[Dict[str, Any]] = None,
                        encrypt: bool = True) -> ProtectedMachine:
        """Register item `name`, the libvirt domain `domain`: every disk of
        it (``<disk device='disk'>`` with a file or block source; cdroms
        and floppies are left out and named in the result's notes), its
        replica ``to/NAME-TARGET.img``. Its cycles are tracked by libvirt's
        checkpoints, one pull-mode backup job for all its disks; the
        guest's file systems are frozen around it when the domain has a
        guest agent; each point keeps the domain's XML (docs/MACHINES.md).

        Args:
            name: the item's name.
            domain: the domain's name at `uri` (running or shut off).
            to: a directory here, or [user@]host:DIR, for the replicas.
            uri: the libvirt connection (None: libvirt's default).
            group: as for protect().
            retention: as for protect().
            retention_age: as for protect().
            quiesce_hook: as for protect() (a machine with a guest agent is
                frozen by it; the hooks are for the rest).
            thaw_hook: as for protect().
            rsh: as for protect().
            remote_pydr: as for protect().
            policy: as for protect().
            encrypt: as for protect() (`to` s3://BUCKET/PREFIX: a chunk
                store; each cycle reads the backup job's export whole).

        Returns:
            A pydr.dr.machines.ProtectedMachine (domain, uuid, disks, notes).

        Raises:
            UnknownName: no such domain (exit 3).
            MachineError: libvirt cannot be reached or failed (exit 22).
            ValueError: a network disk, a domain without disks or a bad
                option (InvalidArgument).
            InvalidState: the name or a replica is taken.
        """
        columns = check_new_item_policy(self.store, group, policy or {},
                                        [to] if str(to).startswith("s3://") else [])
        return protect_machine(self.store, name, domain, to, uri=uri, group=group,
                               retention=retention, retention_age=retention_age,
                               quiesce_hook=quiesce_hook, thaw_hook=thaw_hook, rsh=rsh,
                               remote_pydr=remote_pydr, policy_columns=columns,
                               encrypt=bool(encrypt))

"""Bring-up: a recovered machine defined and started at the recovery site.

After a failover (or a drill) has made an item's disks, a *machine* item
(a row in the machines table) is brought up:

- kind "libvirt": the point's domain XML (point_machines; the newest one
  at or before the point) is rewritten (pydr.dr.domainxml) and defined at
  the recovery connection, then started. The recovery connection is
  ``--connect URI``, else the machine's ``recovery_uri``, else its ``uri``.
- kind "hook": the machine's ``bring_up_hook`` runs with JSON on stdin:
  {"item", "point", "role", "disks": [{"idx", "path", "format"}], "xml":
  null}. A failing hook is MachineError (exit 22); the disks stay as they are.

Names and UUIDs (role -> domain):

- "drill": ``pydr-drill-ITEM``, a fresh UUID, fresh MACs, and either no
  network at all or only the drill network (``--drill-network NET``).
- "failover": the protected name and UUID when neither is taken at the
  recovery connection (a real second site); else ``ITEM-dr`` (or ``--name``)
  with a fresh UUID (the original stays defined, e.g. one libvirtd for both
  sites). Networks are remapped by ``--network-map``.
- "failback": the protected domain at site A, started again.

Every domain pydr defines is recorded (machine_domains) with the UUID pydr
chose BEFORE libvirt defines it, so a kill anywhere is finished by running
the same command again: the domain is found by that UUID (defined again
if it is not there yet, started if it is not running). Clean-up acts on
the recorded UUID only: pydr never undefines a domain it did not define.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid as uuid_
from typing import Any, Dict, List, Mapping, Optional

from ..endpoints import domains as lv
from ..engine import crashpoints
from ..errors import InvalidArgument, MachineError, UnknownName, VerificationFailed
from . import domainxml
from .hooks import run_command

ROLES = ("failover", "failback", "drill")
#: the start of every file pydr's bring-up console logs live in
CONSOLE_DIR = "consoles"
_QCOW2_MAGIC = b"QFI\xfb"


def drill_name(name: str) -> str:
    """The domain name of item `name`'s drill machine."""
    return f"pydr-drill-{name}"


def disk_format(path: str) -> str:
    """ "qcow2" when the image at `path` starts with qcow2's magic, else "raw"."""
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == _QCOW2_MAGIC else "raw"
    except OSError:
        return "raw"  # a device, or not readable here (libvirt will say)


def attach_domain(vault, name: str, xml: str, *, uri: Optional[str] = None,
                  recovery_uri: Optional[str] = None, points=None) -> None:
    """Record that item `name` (already protected, its disks in the XML's
    disk order) is the libvirt domain of `xml`: a machines row of kind
    "libvirt" and, for each of `points` (None: every point it has), the
    point's domain XML. For items protected with --disk whose domain was
    shut off while they were (``pydr protect --libvirt`` records this itself).

    Raises:
        FormatError: hostile or malformed XML.
        InvalidArgument: the XML's disk count differs from the item's.
    """
    disks = [d for d in domainxml.machine_disks(xml) if d["device"] == "disk"]
    if len(disks) != len(vault.disks(name)):
        raise InvalidArgument(f"domain XML has {len(disks)} disks; item {name!r} has "
                              f"{len(vault.disks(name))}", item=name)
    with vault.transaction():
        vault.put_machine(name, kind="libvirt", uri=uri, domain=domainxml.domain_name(xml),
                          uuid=domainxml.domain_uuid(xml), agent=int(domainxml.has_agent(xml)),
                          recovery_uri=recovery_uri)
        for pid in points if points is not None else [p["id"] for p in vault.points(name)]:
            vault.add_point_machine(name, pid, xml)


def point_xml(vault, name: str, point_id: int) -> str:
    """The domain XML of point `point_id` of item `name`: the one kept with
    it, else the newest kept with an earlier point.

    Raises:
        UnknownName: no point at or before it has a domain XML.
    """
    rec = vault.point_machine(name, point_id)
    if rec is not None:
        return rec.xml
    for p in sorted((p["id"] for p in vault.points(name)), reverse=True):
        if p < point_id:
            rec = vault.point_machine(name, p)
            if rec is not None:
                return rec.xml
    raise UnknownName(f"no domain XML is kept with point {point_id} of {name!r} (or before it)",
                      path=vault.dir, item=name)


def recovery_uri(machine, connect: Optional[str] = None) -> Optional[str]:
    """Where bring-up defines the domain: `connect`, else the machine's
    recovery_uri, else its uri (None: libvirt's default)."""
    return connect or machine.recovery_uri or machine.uri


def console_path(vault, name: str, role: str) -> str:
    """The console log pydr owns for item `name`'s `role` domain (in the
    vault's directory, never site A's log)."""
    directory = os.path.join(vault.dir, CONSOLE_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return os.path.join(directory, f"{name}-{role}.log")


def _targets(vault, name: str, xml: str) -> List[str]:
    """The XML's target of each of the item's disks (by idx order): from a
    ``libvirt:DOMAIN:TARGET`` source, else the XML's disks in order."""
    in_xml = [d["target"] for d in domainxml.machine_disks(xml) if d["device"] == "disk"]
    rows = sorted(vault.disks(name), key=lambda d: d["idx"])
    out = []
    for pos, d in enumerate(rows):
        source = str(d["source"])
        if source.startswith("libvirt:"):
            out.append(source.rpartition(":")[2])
        elif pos < len(in_xml):
            out.append(in_xml[pos])
        else:
            raise InvalidArgument(f"disk {d['idx']} of {name!r} has no disk in the domain XML",
                                  item=name)
    return out


def _taken(conn, domain: str, uuid: Optional[str], uri) -> bool:
    """Whether name `domain` or `uuid` is taken on `conn`."""
    if uuid and lv.find_domain_by_uuid(conn, uuid, uri=uri) is not None:
        return True
    try:
        lv.find_domain(conn, domain, uri=uri)
        return True
    except UnknownName:
        return False


def _choose(conn, machine, xml: str, role: str, name: str, override: Optional[str], uri):
    """(domain name, uuid, keeps the protected identity) for a new domain."""
    protected = domainxml.domain_name(xml) or machine.domain or name
    old_uuid = domainxml.domain_uuid(xml) or machine.uuid
    if role == "drill":
        wanted, keep = override or drill_name(name), False
    elif override:
        wanted, keep = override, override == protected
    elif not _taken(conn, protected, old_uuid, uri):
        wanted, keep = protected, True
    else:
        wanted, keep = f"{name}-dr", False
    if keep and old_uuid and lv.find_domain_by_uuid(conn, old_uuid, uri=uri) is not None:
        keep = False
    try:
        other = lv.find_domain(conn, wanted, uri=uri)
    except UnknownName:
        other = None
    if other is not None:
        raise MachineError(f"a domain named {wanted!r} exists at the recovery site and pydr did "
                           f"not define it ({other.UUIDString()}): not touched", path=uri,
                           item=name, hint="remove it, or give another name with --name")
    return wanted, (old_uuid if keep and old_uuid else str(uuid_.uuid4())), keep


def bring_up(vault, name: str, point_id: int, disks: List[Mapping[str, Any]], *, role: str,
             uri: Optional[str] = None, network_map: Optional[Mapping[str, str]] = None,
             name_override: Optional[str] = None, isolate=None,
             console_dir: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Bring item `name`'s machine up from point `point_id` on `disks`
    ([{"idx", "path"}], the recovered disks). Idempotent: a domain recorded
    for the role is found by its UUID; unless it runs, it is defined again
    (same name and UUID: libvirt updates it, with this call's network
    options) and started.

    Args:
        vault: the store.
        name: the item.
        point_id: the point the disks hold.
        disks: the recovered disks, one per disk of the item.
        role: "failover", "drill" or "failback".
        uri: the recovery connection (None: the machine's recovery_uri,
            else its uri).
        network_map: {network here at site A: network at the recovery
            site} (None: the machine's recorded map).
        name_override: the domain's name (failover only).
        isolate: a drill's network ("none" or None: no network).
        console_dir: where the console log goes (None: the vault's
            "consoles" directory).

    Returns:
        None when the item is no machine; else {"kind", "domain", "uuid",
        "uri", "console", "agent", "started", "seconds", "notes"}
        ("seconds": define+start).

    Raises:
        MachineError: libvirt refused, or a hook failed (exit 22).
        UnknownName: no domain XML is kept for the point.
        InvalidArgument: a bad role.
    """
    if role not in ROLES:
        raise InvalidArgument(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    machine = vault.machine(name)
    if machine is None:
        return None
    began = time.monotonic()
    recovered = [{"idx": d["idx"], "path": os.fspath(d["path"]),
                  "format": d.get("format") or disk_format(os.fspath(d["path"]))}
                 for d in sorted(disks, key=lambda d: d["idx"])]
    if machine.kind == "hook":
        return _run_hook(machine, name, point_id, role, recovered, began)
    notes: List[str] = []
    rec = vault.machine_domain(name, role)
    if rec is not None:  # the recorded domain, where it was defined: never elsewhere
        if uri is not None and uri != rec.uri:
            notes.append(f"the {role} domain is at {rec.uri or 'the default connection'}, "
                         f"where it was defined: --connect {uri} is not used")
        uri = rec.uri
    else:
        uri = recovery_uri(machine, uri)
    mark = {"item": name, "role": role, "vault": vault.vault_id()}
    conn = lv.connect(uri, item=name)
    try:
        xml = point_xml(vault, name, point_id)
        if rec is None:
            domain, new_uuid, kept = _choose(conn, machine, xml, role, name, name_override, uri)
            console = console_path(vault, name, role) if console_dir is None else \
                os.path.join(console_dir, f"{name}-{role}.log")
            # recorded first: a kill from here on is finished by the same command (by UUID)
            vault.put_machine_domain(name, role, uri=uri, domain=domain, uuid=new_uuid,
                                     point=point_id, console=console)
            rec = vault.machine_domain(name, role)
            if not kept:
                notes.append(f"defined as {domain!r} with a UUID of its own ({new_uuid})")
        _refuse_protected(machine, rec, uri, name)
        if role != "drill" and network_map is not None:
            # the machine's map from now on: a rerun or change-point brings it up the same way
            vault.put_machine(name, network_map=json.dumps(dict(network_map)))
        dom = lv.find_domain_by_uuid(conn, rec.uuid, uri=uri, item=name)
        if dom is not None:
            check_owned(dom, rec, mark, uri=uri, item=name)
        if dom is not None and lv.is_running(dom):
            notes.append(f"domain {rec.name!r} was defined already")
        elif dom is None or network_map is not None or isolate is not None:
            # (re)defined with this run's options: same name and UUID, libvirt updates it
            targets = _targets(vault, name, xml)
            new_xml = domainxml.recovery_xml(
                xml, disks={t: (d["path"], d["format"]) for t, d in zip(targets, recovered)},
                name=rec.name, uuid=rec.uuid, isolate=(isolate or "none") if role == "drill"
                else False, network_map=network_map if network_map is not None
                else json.loads(machine.network_map or "{}"), console=rec.console,
                fresh_macs=role == "drill", mark=mark, nvram=nvram_path(vault, name, role),
                notes=notes)
            dom = lv.define(conn, new_xml, uri=uri, item=name)
        crashpoints.reached("bringup.defined")
        if not lv.is_running(dom) and rec.console and _owns_console(vault, name, role,
                                                                      rec.console, console_dir):
            # a log of an earlier boot would pass the console probe: this boot's only (unlinked,
            # never followed: QEMU makes it again)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rec.console)
        started = lv.start(dom, uri=uri, item=name)
        if not started:
            notes.append(f"domain {rec.name!r} runs already")
        crashpoints.reached("bringup.started")
        live = lv.inactive_xml(dom, uri=uri, item=name)
        return {"kind": "libvirt", "domain": rec.name, "uuid": rec.uuid, "uri": uri,
                "console": rec.console, "agent": domainxml.has_agent(live), "started": started,
                "seconds": time.monotonic() - began, "notes": notes,
                "cmdline": domainxml.kernel_cmdline(live)}
    finally:
        conn.close()


def nvram_path(vault, name: str, role: str) -> str:
    """The NVRAM file pydr owns for item `name`'s `role` domain (beside its
    console log): the only NVRAM pydr ever has libvirt delete."""
    return os.path.join(os.path.dirname(console_path(vault, name, role)), f"{name}-{role}.nvram")


def _owns_console(vault, name, role, path, console_dir) -> bool:
    own = console_path(vault, name, role) if console_dir is None else \
        os.path.join(console_dir, f"{name}-{role}.log")
    return os.path.abspath(path) == os.path.abspath(own)


def _refuse_protected(machine, rec, uri, name) -> None:
    """MachineError when the recorded domain is the protected machine
    itself (its UUID at its own connection): pydr never redefines,
    destroys or undefines that one."""
    if machine.uuid and rec.uuid == machine.uuid and (uri or None) == (machine.uri or None):
        raise MachineError(f"the recorded {rec.role} domain of {name!r} ({rec.uuid}) is the "
                           f"protected domain at its own site: not touched", path=uri, item=name,
                           hint="the vault's machine_domains row does not describe a domain "
                                "pydr defined")


def check_owned(dom, rec, mark: Mapping[str, str], *, uri=None, item=None) -> None:
    """MachineError unless `dom` is the domain pydr defined for `rec`: its
    name and UUID are the recorded ones and its ``<metadata>`` carries
    pydr's `mark` (item, role, this vault's id)."""
    found = domainxml.domain_mark(lv.inactive_xml(dom, uri=uri, item=item))
    if dom.name() != rec.name or dom.UUIDString() != rec.uuid or found != dict(mark):
        raise MachineError(f"domain {dom.name()!r} ({dom.UUIDString()}) is not the {rec.role} "
                           f"domain pydr defined for {item!r} (recorded: {rec.name!r}, "
                           f"{rec.uuid}; pydr's mark: {found}): not touched", path=uri,
                           item=item)


def _run_hook(machine, name, point_id, role, recovered, began):
    payload = {"item": name, "point": point_id, "role": role, "disks": recovered, "xml": None}
    status, detail = run_command(machine.bring_up_hook, f"bring-up hook of {name!r}",
                                 stdin=json.dumps(payload).encode())
    if status != 0:
        raise MachineError(f"the bring-up hook of {name!r} failed (exit {status})"
                           + (f": {detail}" if detail else ""), item=name,
                           hint="the recovered disks are left as they are")
    return {"kind": "hook", "domain": None, "uuid": None, "uri": None, "console": None,
            "agent": False, "started": True, "seconds": time.monotonic() - began, "notes": []}


def start_protected(vault, name: str) -> Optional[Dict[str, Any]]:
    """Failback of a libvirt machine: start the protected domain at site A
    again (found by its recorded UUID; the data is back on its disks), and
    tear down the failover domain pydr defined, if it can reach it.
    Returns None for an item that is no libvirt machine."""
    machine = vault.machine(name)
    if machine is None or machine.kind != "libvirt":
        return None
    notes = []
    try:
        gone = tear_down(vault, name, "failover")
        if gone and gone["removed"]:
            notes.append(f"the failover domain {gone['domain']!r} was removed")
    except MachineError as exc:  # the recovery site may be gone: site A comes up anyway
        notes.append(f"could not remove the failover domain ({exc}); remove it by hand")
    conn = lv.connect(machine.uri, item=name)
    try:
        dom = lv.find_domain(conn, machine.domain, machine.uuid, uri=machine.uri, item=name)
        started = lv.start(dom, uri=machine.uri, item=name)
        return {"kind": "libvirt", "domain": machine.domain, "uuid": machine.uuid,
                "uri": machine.uri, "console": None, "agent": bool(machine.agent),
                "started": started, "seconds": None, "notes": notes}
    finally:
        conn.close()


def stop_domain(vault, name: str, role: str) -> bool:
    """Stop (destroy, not undefine) the `role` domain pydr defined for item
    `name`, found by its recorded UUID; returns whether it ran. Nothing when
    none is recorded or it is gone.

    Raises:
        MachineError: libvirt could not be reached or refused.
    """
    rec = vault.machine_domain(name, role)
    if rec is None:
        return False
    dom, conn = _recorded_domain(vault, name, rec)
    try:
        return dom is not None and lv.destroy(dom, uri=rec.uri, item=name)
    finally:
        conn.close()


def _recorded_domain(vault, name, rec):
    """(the domain of record `rec` or None when it is gone, its open
    connection): MachineError when the domain with the recorded UUID is not
    the one pydr defined (check_owned) or is the protected domain."""
    _refuse_protected(vault.machine(name), rec, rec.uri, name)
    conn = lv.connect(rec.uri, item=name)
    try:
        dom = lv.find_domain_by_uuid(conn, rec.uuid, uri=rec.uri, item=name)
        if dom is not None:
            check_owned(dom, rec, {"item": name, "role": rec.role, "vault": vault.vault_id()},
                        uri=rec.uri, item=name)
    except BaseException:
        conn.close()
        raise
    return dom, conn


#: seconds a failback waits for the failover domain to shut down before it pulls
#: the plug (environment: PYDR_MACHINE_SHUTDOWN_TIMEOUT)
SHUTDOWN_TIMEOUT = 120.0


def shut_down(vault, name: str, role: str) -> bool:
    """Shut the `role` domain pydr defined for item `name` down (the guest
    is asked; after :data:`SHUTDOWN_TIMEOUT` seconds, destroyed), found by
    its recorded UUID and checked to be pydr's; returns whether it ran.

    Raises:
        MachineError: libvirt could not be reached or refused, or the
            domain is not the one pydr defined.
    """
    rec = vault.machine_domain(name, role)
    if rec is None:
        return False
    timeout = float(os.environ.get("PYDR_MACHINE_SHUTDOWN_TIMEOUT") or SHUTDOWN_TIMEOUT)
    dom, conn = _recorded_domain(vault, name, rec)
    try:
        return dom is not None and lv.shutdown(dom, timeout=timeout, uri=rec.uri, item=name)
    finally:
        conn.close()


def tear_down(vault, name: str, role: str) -> Optional[Dict[str, Any]]:
    """Destroy and undefine the `role` domain pydr defined for item `name`,
    by its recorded UUID only (a domain of that name with another UUID is
    not pydr's and is left alone), then forget it. Idempotent.

    Returns:
        None when nothing was recorded; else {"domain", "uuid", "removed"}
        ("removed": False when the domain was gone already).

    Raises:
        MachineError: libvirt could not be reached or refused.
    """
    rec = vault.machine_domain(name, role)
    if rec is None:
        return None
    dom, conn = _recorded_domain(vault, name, rec)
    try:
        if dom is not None:
            nvram = domainxml.domain_nvram(lv.inactive_xml(dom, uri=rec.uri, item=name))
            lv.destroy(dom, uri=rec.uri, item=name)
            # libvirt deletes the NVRAM file only when it is pydr's own copy
            lv.undefine(dom, uri=rec.uri, item=name, nvram=nvram is not None and os.path.abspath(
                nvram) == os.path.abspath(nvram_path(vault, name, role)))
    finally:
        conn.close()
    vault.drop_machine_domain(name, role)
    return {"domain": rec.name, "uuid": rec.uuid, "removed": dom is not None}


# -- what failover and drills call ---------------------------------------------------
_MACHINE_OPTIONS = ("connect", "network_map", "name", "drill_network", "verify")


def check_options(vault, name: str, options: Optional[Mapping[str, Any]], *,
                  role: str) -> Dict[str, Any]:
    """The machine options of a failover or drill (``connect``,
    ``network_map`` {SRC: DST}, ``name``, ``drill_network`` and ``verify``:
    a pydr.dr.probes.Probes or None), checked before anything is done.

    Raises:
        InvalidArgument: an unknown option; machine options for an item
            that is no machine; a verification this machine cannot run
            (no console marker and no guest agent; a hook machine).
        UnknownName: no such item.
    """
    from .probes import Probes, check_probes

    options = {k: v for k, v in (options or {}).items() if v not in (None, {}, False)}
    unknown = set(options) - set(_MACHINE_OPTIONS)
    if unknown:
        raise InvalidArgument(f"unknown machine option {', '.join(sorted(unknown))}")
    vault.item(name)  # UnknownName
    machine = vault.machine(name)
    if machine is None:
        if options:
            raise InvalidArgument(f"{', '.join('--' + k.replace('_', '-') for k in options)}: "
                                  f"item {name!r} is no machine (only disks)", item=name,
                                  hint="protect it with --libvirt, or give it a "
                                       "--bring-up-hook")
        return options
    probes = options.get("verify")
    if probes is not None:
        if not isinstance(probes, Probes):
            raise InvalidArgument(f"verify must be a pydr.dr.probes.Probes, not {probes!r}")
        if machine.kind != "libvirt":
            raise InvalidArgument(f"--verify needs a libvirt machine; {name!r} is brought up by "
                                  f"its hook", item=name)
        check_probes(probes, agent=bool(machine.agent), item=name)
    if role == "drill" and options.get("name"):
        raise InvalidArgument("a drill's domain is always named pydr-drill-ITEM: no --name",
                              item=name)
    return options


def machine_up(vault, name: str, result: Dict[str, Any], disks: List[Mapping[str, Any]], *,
               role: str, options: Mapping[str, Any], started: float) -> Dict[str, Any]:
    """After a failover or drill made item `name`'s `disks` hold
    result["point"]: bring its machine up (if it is one) and verify it when
    asked; `result` gains "machine" and "verification". Raises as
    bring_up and pydr.dr.probes.verify do."""
    if vault.machine(name) is None:
        return result
    from .probes import verify

    probes = options.get("verify")
    if probes is not None and probes.console is not None and vault.machine(name).kind == "libvirt":
        # the kernel echoes its command line on the console: a marker in it proves nothing
        xml = point_xml(vault, name, result["point"])
        if not domainxml.has_serial(xml):
            raise InvalidArgument(f"--verify-console: the domain of {name!r} has no <serial> "
                                  f"port in the point's XML: nothing would write the console "
                                  f"log", item=name, hint="verify with the guest agent instead")
        if probes.console in domainxml.kernel_cmdline(xml):
            raise InvalidArgument(f"--verify-console {probes.console!r} is on the guest's kernel "
                                  f"command line (<cmdline> of the point's XML): the kernel's "
                                  f"echo of it would pass the probe", item=name,
                                  hint="choose a marker that only the guest's userspace prints")
    materialise = round(time.time() - started, 3)
    up = bring_up(vault, name, result["point"], disks, role=role, uri=options.get("connect"),
                  network_map=options.get("network_map"), name_override=options.get("name"),
                  isolate=options.get("drill_network") or vault.machine(name).drill_network)
    up.pop("cmdline", None)
    result = dict(result, machine=up,
                  notes=list(result.get("notes") or []) + list(up.pop("notes")))
    if probes is not None:
        # an RTO only for a machine this command started: one found running was started
        # by an earlier run, and the time from this command to its probes is no recovery time
        try:
            result["verification"] = verify(
                vault, name, result["point"], kind="drill" if role == "drill" else "failover",
                started=started, machine=up, probes=probes, measured=bool(up["started"]),
                parts={"materialise": materialise, "define+start": round(up["seconds"], 3)})
        except VerificationFailed as exc:  # the command's result goes with it (--json prints it)
            exc.answer = dict(result, verification=getattr(exc, "verification", None))  # type: ignore[attr-defined]
            raise
    return result

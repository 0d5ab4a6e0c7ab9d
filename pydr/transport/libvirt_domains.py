"""Domains pydr brings up at the recovery site, as libvirt does it: define,
start, destroy and undefine (with their checkpoint and snapshot metadata,
NVRAM and managed save), the guest agent's guest-exec and
guest-exec-status, and a domain's addresses.

Every libvirt error becomes :class:`pydr.errors.MachineError` (exit 22)
naming what pydr was doing, with libvirt's words (pydr.transport.libvirt).
"""

from __future__ import annotations

import base64
from typing import Any, Dict, List, Optional

from ..errors import MachineError
from .libvirt import agent_command, libvirt_errors, libvirt_module

#: the most bytes of a command's output pydr keeps (per stream)
OUTPUT_LIMIT = 4096


def define(conn, xml: str, *, uri: Optional[str] = None, item: Optional[str] = None):
    """Define (persistently) the domain of `xml` on `conn`; returns it.

    Raises:
        MachineError: libvirt refused the XML (its words).
    """
    with libvirt_errors("defining the recovered domain", path=uri or "libvirt", item=item):
        return conn.defineXML(xml)


def start(dom, *, uri: Optional[str] = None, item: Optional[str] = None) -> bool:
    """Start `dom` unless it runs; returns whether it was started now.

    Raises:
        MachineError: libvirt could not start it (qemu's words).
    """
    if dom.isActive():
        return False
    with libvirt_errors(f"starting domain {dom.name()!r}", path=uri or "libvirt", item=item):
        dom.create()
    return True


def destroy(dom, *, uri: Optional[str] = None, item: Optional[str] = None) -> bool:
    """Stop `dom` at once (pull the plug) if it runs; returns whether it ran."""
    if not dom.isActive():
        return False
    libvirt = libvirt_module()
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if not dom.isActive():  # it stopped meanwhile
            return True
        raise MachineError(f"stopping domain {dom.name()!r}: {exc}", path=uri or "libvirt",
                           item=item) from None
    return True


def shutdown(dom, *, timeout: float, uri: Optional[str] = None,
             item: Optional[str] = None) -> bool:
    """Shut `dom` down: ask the guest (guest agent, else the ACPI power
    button), wait at most `timeout` seconds for it to stop, then pull the
    plug (destroy). Returns whether it ran.

    Raises:
        MachineError: libvirt could not stop it.
    """
    import time

    if not dom.isActive():
        return False
    libvirt = libvirt_module()
    try:
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
                          | libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    except libvirt.libvirtError:
        pass  # no agent and no ACPI: the bound below ends it
    deadline = time.monotonic() + timeout
    while dom.isActive() and time.monotonic() < deadline:
        time.sleep(0.5)  # a guest stops in wall-clock time
    destroy(dom, uri=uri, item=item)
    return True


def undefine(dom, *, uri: Optional[str] = None, item: Optional[str] = None,
             nvram: bool = False) -> None:
    """Undefine `dom` with its checkpoint and snapshot metadata and its
    managed save image (a stopped domain: destroy it first); its NVRAM file
    is deleted only with `nvram` (the caller owns that file), else kept."""
    libvirt = libvirt_module()
    flags = (libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
             | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
             | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
             | (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM if nvram
                else libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM))
    with libvirt_errors(f"undefining domain {dom.name()!r}", path=uri or "libvirt", item=item):
        dom.undefineFlags(flags)


def _decoded(text: Optional[str]) -> str:
    if not text:
        return ""
    try:
        data = base64.b64decode(text, validate=False)
    except ValueError:
        return ""
    return data[:OUTPUT_LIMIT].decode("utf-8", "replace")


def guest_exec(dom, command: str, *, timeout: float = 10, uri: Optional[str] = None,
               item: Optional[str] = None) -> int:
    """Have the guest agent run ``/bin/sh -c COMMAND`` with its output
    captured; returns the guest's process id.

    Raises:
        MachineError: no agent, or it refused.
    """
    answer = agent_command(dom, "guest-exec", timeout=timeout, uri=uri, item=item,
                           path="/bin/sh", arg=["-c", command], **{"capture-output": True})
    try:
        return int(answer["pid"])
    except (KeyError, TypeError, ValueError):
        raise MachineError(f"the guest agent of {dom.name()!r} answered guest-exec with "
                           f"{str(answer)[:200]!r}", path=uri or "libvirt", item=item) from None


def guest_exec_status(dom, pid: int, *, timeout: float = 10, uri: Optional[str] = None,
                      item: Optional[str] = None) -> Dict[str, Any]:
    """The state of guest process `pid`: {"exited": bool, "exitcode": int
    or None, "signal": int or None, "out": text, "err": text} (each output
    at most :data:`OUTPUT_LIMIT` bytes, decoded leniently)."""
    answer = agent_command(dom, "guest-exec-status", timeout=timeout, uri=uri, item=item,
                           pid=int(pid))
    if not isinstance(answer, dict):
        raise MachineError(f"the guest agent of {dom.name()!r} answered guest-exec-status with "
                           f"{str(answer)[:200]!r}", path=uri or "libvirt", item=item)
    return {"exited": bool(answer.get("exited")), "exitcode": answer.get("exitcode"),
            "signal": answer.get("signal"), "out": _decoded(answer.get("out-data")),
            "err": _decoded(answer.get("err-data"))}


def addresses(dom) -> List[str]:
    """The IP addresses libvirt knows for `dom` (from its DHCP leases, else
    its guest agent); [] when it knows none."""
    libvirt = libvirt_module()
    found: List[str] = []
    for source in (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
                   libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT):
        try:
            ifaces = dom.interfaceAddresses(source)
        except libvirt.libvirtError:
            continue
        for iface in (ifaces or {}).values():
            for addr in iface.get("addrs") or []:
                if addr.get("addr") and addr["addr"] not in found \
                        and not addr["addr"].startswith("127."):
                    found.append(addr["addr"])
        if found:
            break
    return found

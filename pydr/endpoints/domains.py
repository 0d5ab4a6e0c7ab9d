"""Recovered machines as the DR layer reaches them: the libvirt calls of
pydr.transport.libvirt and pydr.transport.libvirt_domains (the DR layer
imports no transport module directly; see docs/ARCHITECTURE.md)."""

from ..transport.libvirt import (agent_command, connect, find_domain, find_domain_by_uuid,
                                 inactive_xml, is_running)
from ..transport.libvirt_domains import (OUTPUT_LIMIT, addresses, define, destroy, guest_exec,
                                         guest_exec_status, shutdown, start, undefine)

__all__ = ["agent_command", "connect", "find_domain", "find_domain_by_uuid", "inactive_xml",
           "is_running", "OUTPUT_LIMIT", "addresses", "define", "destroy", "guest_exec",
           "guest_exec_status", "shutdown", "start", "undefine"]

"""libvirt, as pydr talks to it: a connection to a libvirt daemon, its
domains found by name and checked by UUID, their XML, and the guest
agent's commands. libvirt-python is imported here and in the other
pydr.transport.libvirt_* modules only (the ``machines`` extra); without
it, a command that needs libvirt says what to install.

Every libvirt error becomes a :class:`pydr.errors.MachineError` (exit 22)
that names what pydr was doing and carries libvirt's own words; a domain
that is not there is :class:`pydr.errors.UnknownName` (exit 3).
"""

from __future__ import annotations

import contextlib
import json
import re
from xml.etree import ElementTree

from ..errors import InvalidArgument, MachineError, UnknownName

#: what a missing libvirt-python costs a user, said once
INSTALL_HINT = ("install libvirt-python (pip install 'pydr[machines]'; it builds against "
                "libvirt's C library: Debian's libvirt-dev and pkg-config)")

#: how long a guest-agent command may take unless the caller says (seconds)
AGENT_TIMEOUT = 10

#: the largest libvirt XML pydr reads (a domain's is a few KiB)
MAX_XML = 1 << 20
_DECLARATION = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def parse_xml(text, what, error):
    """libvirt XML text (a domain's, a checkpoint's, a backup job's) parsed:
    the root element. Raises `error` (an exception class of pydr.errors)
    naming `what` when the text is larger than MAX_XML, holds a DOCTYPE or
    ENTITY declaration (libvirt never writes one; without one there are no
    entities to expand but XML's own five) or is not well-formed."""
    if not isinstance(text, str):
        raise error(f"{what}: expected XML text, not {type(text).__name__}")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_XML:
        raise error(f"{what} is larger than {MAX_XML} bytes: refused")
    if _DECLARATION.search(text):
        raise error(f"{what} has a DOCTYPE or ENTITY declaration: refused "
                    f"(libvirt never writes one)")
    try:
        return ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise error(f"{what} is not well-formed XML: {exc}") from None


def libvirt_module():
    """The libvirt module, or MachineError saying how to install it."""
    try:
        import libvirt
    except ImportError:
        raise MachineError("libvirt-python is not installed", hint=INSTALL_HINT) from None
    return libvirt


def _words(exc):
    """libvirt's own message of `exc`, on one line."""
    text = exc.get_error_message() if hasattr(exc, "get_error_message") else None
    return " ".join(str(text or exc).split())


def machine_error(exc, what, *, path=None, item=None, hint=None):
    """The MachineError for libvirt error `exc` raised while doing `what`
    ("starting domain 'web'"); a domain libvirt does not know is
    UnknownName."""
    libvirt = libvirt_module()
    code = exc.get_error_code() if hasattr(exc, "get_error_code") else None
    if code in (libvirt.VIR_ERR_NO_DOMAIN,):
        return UnknownName(f"{what}: {_words(exc)}", path=path, item=item, hint=hint)
    return MachineError(f"{what}: {_words(exc)}", path=path, item=item, hint=hint)


@contextlib.contextmanager
def libvirt_errors(what, *, path=None, item=None, hint=None):
    """Turn a libvirt error inside the block into pydr's (machine_error)."""
    libvirt = libvirt_module()
    try:
        yield
    except libvirt.libvirtError as exc:
        raise machine_error(exc, what, path=path, item=item, hint=hint) from None


def _quiet(ctx, err):
    """libvirt's default error handler prints every error on stderr: pydr
    reports them itself."""


def connect(uri=None, *, item=None):
    """A read-write connection to the libvirt daemon at `uri` (None:
    libvirt's default, as virsh picks it).

    Raises:
        MachineError: libvirt-python is missing or the daemon did not answer
            (libvirt's words; the URI is the error's path).
    """
    libvirt = libvirt_module()
    libvirt.registerErrorHandler(_quiet, None)
    where = uri or "libvirt's default connection"
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise MachineError(f"cannot connect to libvirt: {_words(exc)}", path=where, item=item,
                           hint="is libvirtd (or virtqemud) running, and is --connect right?") \
            from None


def check_uuid(value):
    """`value` as libvirt's UUID text (36 characters, lower case), or InvalidArgument."""
    import uuid as _uuid

    try:
        return str(_uuid.UUID(str(value)))
    except ValueError:
        raise InvalidArgument(f"not a UUID: {value!r}") from None


def find_domain(conn, name, uuid=None, *, uri=None, item=None):
    """The domain `name` on `conn`; when `uuid` is given it must be that
    domain (a domain of the same name with another UUID is another machine:
    refused, never used).

    Raises:
        UnknownName: no domain `name` (exit 3).
        MachineError: the domain has another UUID, or libvirt failed.
    """
    libvirt = libvirt_module()
    where = uri or "libvirt"
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        raise machine_error(exc, f"no domain {name!r}", path=where, item=item) from None
    if uuid is not None and dom.UUIDString() != check_uuid(uuid):
        raise MachineError(f"domain {name!r} is now {dom.UUIDString()}, not the protected "
                           f"{uuid}: another machine took its name", path=where, item=item)
    return dom


def find_domain_by_uuid(conn, uuid, *, uri=None, item=None):
    """The domain with `uuid` on `conn`, or None when there is none."""
    libvirt = libvirt_module()
    try:
        return conn.lookupByUUIDString(check_uuid(uuid))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise machine_error(exc, f"looking for domain {uuid}", path=uri or "libvirt",
                            item=item) from None


def inactive_xml(dom, *, uri=None, item=None):
    """The domain's persistent configuration (libvirt's inactive XML): what
    is kept with every point and redefined at the recovery site."""
    libvirt = libvirt_module()
    with libvirt_errors(f"reading the XML of domain {dom.name()!r}", path=uri or "libvirt",
                        item=item):
        return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


def is_running(dom):
    """Whether the domain is active (running or paused)."""
    return bool(dom.isActive())


def agent_command(dom, command, *, timeout=AGENT_TIMEOUT, uri=None, item=None, **arguments):
    """Run guest-agent command `command` ("guest-ping") with `arguments`
    and return its "return" value.

    Raises:
        MachineError: the domain has no agent, the agent did not answer
            within `timeout` seconds, or it answered with an error.
    """
    libvirt_module()
    import libvirt_qemu

    request = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    with libvirt_errors(f"guest agent of domain {dom.name()!r}: {command}",
                        path=uri or "libvirt", item=item):
        answer = libvirt_qemu.qemuAgentCommand(dom, json.dumps(request), int(timeout), 0)
    try:
        return json.loads(answer)["return"]
    except (ValueError, KeyError, TypeError):
        raise MachineError(f"the guest agent of domain {dom.name()!r} answered {command} with "
                           f"{answer[:200]!r}", path=uri or "libvirt", item=item) from None

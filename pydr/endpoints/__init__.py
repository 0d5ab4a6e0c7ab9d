"""Disks anywhere: one small interface, one implementation per place.

An endpoint (pydr.endpoints.base.Endpoint) is a disk or file somewhere: on
this machine (pydr.endpoints.local) or ``[user@]host:PATH`` over ssh
(pydr.endpoints.ssh). Resync, replication and failover ask an endpoint for
what they need -- its size, the two roles of a resync, a rename beside it,
a recovery point materialised there -- and never ask where it is.
:func:`open_endpoint` is the one place that looks at a spec and picks the
implementation; a new kind of place is a new module and a line here.

This module imports no implementation until a spec needs it: a local
command never loads the transport. The implementations do not import it
back (they ask pydr.endpoints.specs); pydr.endpoints.transfer, which does,
sits above it: a resync between two endpoints is pydr.resync (or
pydr.endpoints.transfer.resync).
"""

import os

from ..engine import names
from .specs import parse_remote


def open_endpoint(spec, *, rsh=None, remote_pydr=None, format=None, machine=None):
    """The endpoint a spec names:

    * ``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``: an NBD
      export (pydr.endpoints.qemu);
    * ``s3://BUCKET/PREFIX``: an object store holding recovery points
      (pydr.endpoints.s3);
    * ``qmp:SOCKET:NODE``: a block node of a running QEMU, read through a
      point-in-time export (pydr.endpoints.qemu);
    * ``libvirt:DOMAIN:TARGET``: a disk of a libvirt domain
      (pydr.endpoints.libvirt), reached at ``machine`` = (connection URI,
      the domain's UUID or None) (the item's machines row);
    * ``[user@]host:PATH``: a disk on another host, reached with `rsh`
      (default ssh) running `remote_pydr serve --stdio` there;
    * a local path: a raw file or block device, or an image in a QEMU format
      (qcow2, vmdk, vhdx, vpc, vdi: detected from its first bytes, or from
      its extension if it does not exist yet; `format` says it instead).

    An Endpoint is returned as it is."""
    from .base import Endpoint

    if isinstance(spec, Endpoint):
        return spec
    spec = os.fspath(spec) if spec is not None else spec
    if isinstance(spec, str) and spec.startswith(("nbd://", "nbd+", "nbds://", "nbds+")):
        from .qemu import NbdEndpoint

        return NbdEndpoint(spec)
    if isinstance(spec, str) and spec.startswith("s3://"):
        from .s3 import ObjectEndpoint

        return ObjectEndpoint(spec)
    if isinstance(spec, str) and spec.startswith("libvirt:"):
        from .libvirt import LibvirtDiskEndpoint

        uri, uuid = machine or (None, None)
        return LibvirtDiskEndpoint(spec, uri=uri, uuid=uuid)
    if isinstance(spec, str) and spec.startswith("qmp:"):
        from .qemu import QmpEndpoint

        return QmpEndpoint.parse(spec)
    remote = parse_remote(spec)
    if remote is not None:
        from .ssh import SshEndpoint

        return SshEndpoint(remote[0], remote[1], rsh=rsh, remote_pydr=remote_pydr)
    # the kind of a replica is that of its replicated state: after a failover
    # its path may hold a qcow2 overlay on a raw baseline (--as qcow2)
    fmt = format or _image_format(names.latest_state(spec) if isinstance(spec, str) else spec)
    if fmt != "raw":
        from .qemu import QemuImageEndpoint

        return QemuImageEndpoint(spec, fmt)
    from .local import LocalEndpoint

    return LocalEndpoint(spec)


def _image_format(path):
    """A local disk's QEMU format from its magic bytes (no import of the
    transport for a raw file: a few bytes read here)."""
    import stat

    head = b""
    try:  # O_NONBLOCK: a FIFO must not wait for a writer (the engine refuses it later)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        fd = None
    if fd is not None:
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
                head = os.pread(fd, 72, 0)
            else:
                return "raw"
        except OSError:
            pass
        finally:
            os.close(fd)
    ext = os.path.splitext(path)[1].lower() if isinstance(path, str) else ""
    if head[:4] in (b"QFI\xfb", b"KDMV") or head[:8] in (b"vhdxfile", b"conectix") \
            or head.startswith(b"# Disk DescriptorFile") or head[0x40:0x44] == b"\x7f\x10\xda\xbe" \
            or (not head and ext in (".qcow2", ".qcow", ".vmdk", ".vhdx", ".vhd", ".vpc", ".vdi")) \
            or ext == ".vhd":
        from ..transport.qemu import detect_format

        return detect_format(path)
    return "raw"


def remove_all(endpoints, on_error=None):
    """Remove the files `endpoints` (missing ones are no error), with one
    request per place. ``on_error(endpoint, exc)``: called for a place that
    fails with an OSError (its files stay); without it the error is raised."""
    groups = {}
    for ep in endpoints:
        groups.setdefault(ep.place, []).append(ep)
    for group in groups.values():
        try:
            group[0].remove_many(group)
        except OSError as exc:
            if on_error is None:
                raise
            on_error(group[0], exc)

"""Disks anywhere: one small interface, one implementation per place.

An endpoint (pydr.endpoints.base.Endpoint) is a disk or file somewhere: on
this machine (pydr.endpoints.local) or ``[user@]host:PATH`` over ssh
(pydr.endpoints.ssh). Resync, replication and failover ask an endpoint for
what they need -- its size, the two roles of a resync, a rename beside it,
a recovery point materialised there -- and never ask where it is.
:func:`open_endpoint` is the one place that looks at a spec and picks the
implementation; a new kind of place is a new module and a line here.

This module imports no implementation until a spec needs it: a local
command never loads the transport.
"""

import os


def parse_remote(spec):
    """(host, path) for "[user@]host:PATH", else None (a local path, or None).
    A path with a "/" before its first ":" is local ("./a:b", "dir/a:b")."""
    if spec is None or hasattr(spec, "read"):
        return None
    spec = os.fspath(spec)
    if spec.startswith(("/", "./", "../")) or ":" not in spec:
        return None
    host, path = spec.split(":", 1)
    if not host or "/" in host or not path:
        return None
    return host, path


def open_endpoint(spec, *, rsh=None, remote_pydr=None):
    """The endpoint a spec names: "[user@]host:PATH" (reached with `rsh`,
    default ssh, running `remote_pydr serve --stdio` there) or a local path.
    An Endpoint is returned as it is."""
    from .base import Endpoint

    if isinstance(spec, Endpoint):
        return spec
    remote = parse_remote(spec)
    if remote is not None:
        from .ssh import SshEndpoint

        return SshEndpoint(remote[0], remote[1], rsh=rsh, remote_pydr=remote_pydr)
    from .local import LocalEndpoint

    return LocalEndpoint(os.fspath(spec))


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


def resync(src, dst, **options):
    """Make the disk `dst` byte-identical to `src`, wherever each is; see
    pydr.endpoints.transfer.resync."""
    from .transfer import resync as _resync

    return _resync(src, dst, **options)

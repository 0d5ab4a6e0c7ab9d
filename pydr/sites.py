"""Where an item's disks live: on this machine, or on a host reached over
ssh (pydr.remote.RemoteSite). The DR workflow asks a site for the few file
operations it needs -- does a file exist, rename, remove, materialise a
point -- so that failover, commit and the rest run the same steps for local
and remote replicas."""

import contextlib
import os


def parse_remote(spec):
    """(host, path) for "[user@]host:PATH", else None (a local path, or None)."""
    if spec is None or hasattr(spec, "read"):
        return None
    spec = os.fspath(spec)
    if spec.startswith(("/", "./", "../")) or ":" not in spec:
        return None
    host, path = spec.split(":", 1)
    if not host or "/" in host or not path:
        return None
    return host, path


def is_remote(spec):
    return parse_remote(spec) is not None


def fsync_dir(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalSite:
    host = None

    @staticmethod
    def spec(path):
        return path

    @staticmethod
    def exists(path):
        return os.path.lexists(path)

    @staticmethod
    def size(path):
        return os.path.getsize(path)

    @staticmethod
    def rename(src, dst):
        os.replace(src, dst)  # atomic, in one directory
        fsync_dir(dst)

    @staticmethod
    def remove(paths):
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    @staticmethod
    def remove_drill(directory, paths):
        LocalSite.remove(paths)
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # only if the drill left it empty

    @staticmethod
    def materialize(replica, steps, dest, threads=None, drill=False):
        from .replication import latest_state, materialize_file

        return materialize_file(latest_state(replica), steps, dest, threads)


def site_of(vault, name, spec):
    """(site, path on it) for a path of item `name` (a local path or
    "[user@]host:PATH", reached as the item says)."""
    from .remote import RemoteSite

    remote = parse_remote(spec)
    if remote is None:
        return LocalSite, spec
    row = vault.item(name)
    return RemoteSite(remote[0], rsh=row["rsh"], remote_pydr=row["remote_pydr"]), remote[1]


def by_site(vault, name, specs):
    """[(site, [paths on it])] for the paths `specs` of item `name`, one entry
    per machine: what one request per host can remove."""
    groups = {}
    for spec in specs:
        site, path = site_of(vault, name, spec)
        groups.setdefault(site.host, (site, []))[1].append(path)
    return list(groups.values())

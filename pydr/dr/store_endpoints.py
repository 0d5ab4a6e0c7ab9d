"""Where the store's rows point to: an item's disks (and the directories of
its replicas) as endpoints, reached as the item says (its --rsh and
--remote-pydr), and the files the vault keeps for each disk. Part of
pydr.dr.store.Store."""

import os


class ItemEndpoints:
    """Opening what an item's rows name; needs ``self.dir`` and ``self.item``."""

    def endpoint(self, name, spec):
        """The endpoint of a disk (or a directory) of item `name`, reached as
        the item says (its --rsh and --remote-pydr)."""
        from ..endpoints import open_endpoint

        row = self.item(name)
        machine = self.machine(name) if str(spec).startswith("libvirt:") else None
        return open_endpoint(spec, rsh=row.rsh, remote_pydr=row.remote_pydr,
                             machine=None if machine is None else (machine.uri, machine.uuid))

    def cache_path(self, name, idx):
        """The signature cache of disk `idx` of item `name`, in the vault."""
        return os.path.join(self.dir, "cache", name, f"{idx}.sig")

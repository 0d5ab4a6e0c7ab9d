"""Point stores: where an item's disks and their recovery points live.

The workflow (points, drills, failover, the vault) asks
``point_store(vault, name)`` and calls the store's methods
(pydr.dr.pointstores.base documents them); it never asks which kind it
has. The kinds, in the order they are asked whether they hold an item:

- ChunkIndex (chunkindex.py): chunks and point indexes in an object store;
- StepChain (stepchain.py): a replica plus its undo steps; every other item.

Adding a kind: a module with a PointStore subclass (start from
stepchain.py or chunkindex.py), and one line in KINDS. Its protect rules,
if its replicas are named by a spec of their own, go to specs.py.
"""

from .base import PointStore
from .chunkindex import ChunkIndex
from .stepchain import StepChain

__all__ = ["KINDS", "PointStore", "point_store", "collect_garbage"]

KINDS = (
    ChunkIndex,
    StepChain,  # last: holds the rest
)


def point_store(vault, name):
    """The point store of item `name` of the open `vault` (UnknownName, exit
    3, if there is no such item; VaultDamaged, exit 14, if its records are
    of two kinds: PointStore.check_records)."""
    vault.item(name)
    for kind in KINDS:
        if kind.holds(vault, name):
            kind.check_records(vault, name)
            return kind(vault, name)
    raise AssertionError(f"no point store kind holds {name!r}")  # StepChain holds all


def collect_garbage(vault, target, **options):
    """Garbage collection of the point store of item `target`, or of the
    store a spec names (s3://BUCKET/PREFIX), whichever items use it: the
    report of the kind's collect_garbage. UnsupportedFile (exit 10) for an
    item whose kind keeps no garbage."""
    for kind in KINDS:
        collect = kind.collector_at(vault, target)
        if collect is not None:
            return collect(**options)
    return point_store(vault, target).require("collect_garbage")(**options)

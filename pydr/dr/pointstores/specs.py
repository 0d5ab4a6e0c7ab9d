"""The rules `protect` follows for each kind of point store, told from the
replica's spec: what a replica may be, and how the vault names it.

The vault store (pydr.dr.store) asks these when it records a new item, so
this module imports nothing of the workflow (only the endpoints' spec
syntax); the kinds themselves are in stepchain.py and chunkindex.py."""

import os

from ...endpoints.s3 import SCHEME as OBJECT_STORE
from ...errors import InvalidArgument


def _in_object_store(spec):
    return spec.startswith(OBJECT_STORE)


def protected_replica(item, source, replica, *, cbt):
    """The endpoint under which the vault records `replica` (an endpoint),
    the replica of the disk `source` (an endpoint) of the new item `item`;
    InvalidArgument (a ValueError) naming the replica and what its kind
    expects when it refuses it.

    A chunk index (s3://BUCKET/PREFIX) is named by item and file name
    (s3://BUCKET/PREFIX#ITEM/NAME) and needs a raw file or block device as
    its source (here, or on its --host), without --cbt. A step chain's
    replica at a remote place needs an absolute path."""
    if _in_object_store(replica.spec):
        if source.tracking == "libvirt":  # a disk of a libvirt domain: named by its target
            return replica.for_disk(item, f"{item}-{source.target}.img")
        if cbt or source.local_path is None:
            raise InvalidArgument(f"{replica}: an object-store replica needs a raw file or "
                                  f"block device as its source (here, or on its --host), "
                                  f"without --cbt", path=replica.spec)
        return replica.for_disk(item, os.path.basename(source.local_path))
    if replica.place is not None and not os.path.isabs(replica.path):
        raise InvalidArgument(f"remote replica {replica} needs an absolute path: expected "
                              f"[user@]host:/PATH, not a path relative to the remote login's "
                              f"directory", path=replica.spec)
    return replica


def check_one_kind(replicas):
    """InvalidArgument (a ValueError) unless the replica specs of one item
    (as recorded) are all in one object store, or none is."""
    stores = {r.partition("#")[0] for r in replicas if _in_object_store(r)}
    if stores and (len(stores) > 1 or any(not _in_object_store(r) for r in replicas)):
        raise InvalidArgument("the disks of an item are all in one object store, or none is")


def has_owner(replica):
    """Whether the replica (a spec as recorded) is a disk with an owner
    record beside it (pydr.dr.ownership): not a chunk index, whose points
    are objects that each cycle writes anew."""
    return not _in_object_store(replica)


def check_group_kind(replicas, grouped):
    """InvalidArgument (a ValueError) unless a new item's replicas (specs)
    and those of the items already in its group (`grouped`: {item:
    [replica spec]}) are all in an object store, or none is: a group's
    cycle is one point of one kind (it could never replicate)."""
    mine = any(_in_object_store(r) for r in replicas)
    for item, theirs in grouped.items():
        if any(_in_object_store(r) for r in theirs) != mine:
            raise InvalidArgument(f"the items of a group are all replicated to an object "
                                  f"store, or none is: item {item!r} of the group is"
                                  f"{' not' if mine else ''}, this one is{'' if mine else ' not'}")

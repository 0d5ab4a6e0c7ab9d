"""Items whose replicas are in an object store (s3://BUCKET/PREFIX;
pydr.endpoints.s3, layout in docs/FORMAT.md): which items, their store,
and the vault's local copies of their newest index.

A cycle signs each source at 4 KiB and compares it with the signature of
the last point, kept in the vault (vault/objects/ITEM/), so the store is
never read back. The 4 MiB chunks holding a changed block are read, named
by their XXH3-128, and uploaded unless the store has that id already (the
last point names it, or this cycle's interrupted predecessor uploaded it:
its ids are logged in vault/objects/ITEM/pending). All-zero chunks are not
stored. Then the point index is uploaded, and only then the vault records
the point with the index's key: no recorded point names a chunk that is
not stored. The capture is pydr.dr.chunkcapture; the points -- restore,
failover, retention, verify and garbage collection -- are the chunk
index's (pydr.dr.pointstores.chunkindex).

Garbage collection never sweeps a chunk younger than the grace period: a
cycle running meanwhile has uploaded its new chunks within it
(docs/FORMAT.md, "Garbage collection").
"""

import os

from ..errors import InvalidState

BLOCK = 4096  # the comparison's block: what changed, in 4 KiB blocks
UPLOADS = 8   # chunks in flight
DEFAULT_GRACE = 24 * 3600.0
PENDING_TRUST = 0.5  # a logged upload is trusted for this share of the grace period


def is_object_item(vault, name):
    """Whether the item replicates to an object store."""
    return any(d["replica"].startswith("s3://") for d in vault.disks(name))


def has_object_points(vault, name):
    """Whether the item's points are in an object store (also after its
    failover moved its replicas to local disks)."""
    return vault.has_indexes(name)


def store_of(vault, name):
    """The ObjectStore of the item's replicas, or of its points."""
    from ..endpoints.s3 import ObjectStore

    latest = vault.latest_index(name)
    if latest is not None:  # its points' store (also half-way through a failover of its disks)
        return ObjectStore(latest.store)
    for d in vault.disks(name):
        if d["replica"].startswith("s3://"):
            return vault.endpoint(name, d["replica"]).store
    raise InvalidState(f"item {name!r} has neither replicas nor points in an object store",
                       path=vault.dir)


def chunk_store(vault, name):
    """The ChunkStore (pydr.dr.chunkstore) of the item's replicas or points:
    every chunk and index is read and written through it."""
    return chunk_store_at(vault, store_of(vault, name).spec)


def chunk_store_at(vault, spec):
    """The ChunkStore of the store `spec` (s3://BUCKET/PREFIX), unlocked
    with the vault's passphrase when it is encrypted."""
    from ..endpoints.s3 import ObjectStore
    from .chunkstore import ChunkStore

    return ChunkStore(ObjectStore(spec))


def _dir(vault, name):
    path = os.path.join(vault.dir, "objects", name)
    os.makedirs(path, mode=0o700, exist_ok=True)  # in the vault: private
    return path


def latest_index(vault, name):
    """(point id, index key, local name, index version, retain-until) of the
    item's newest point, or None."""
    latest = vault.latest_index(name)
    if latest is None:
        return None
    return (latest.point, latest.key, os.path.basename(latest.key)[:-len(".pidx")],
            latest.version, latest.retain_until)

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
    return vault.db.execute("SELECT 1 FROM object_indexes WHERE item=? LIMIT 1",
                            (name,)).fetchone() is not None


def store_of(vault, name):
    """The ObjectStore of the item's replicas, or of its points."""
    from ..endpoints.s3 import ObjectStore

    row = vault.db.execute("SELECT store FROM object_indexes WHERE item=? ORDER BY point DESC "
                           "LIMIT 1", (name,)).fetchone()
    if row is not None and not is_object_item(vault, name):
        return ObjectStore(row["store"])
    # a failover moves the disks one by one: the first may be local already
    replica = next(d["replica"] for d in vault.disks(name) if d["replica"].startswith("s3://"))
    return vault.endpoint(name, replica).store


def _dir(vault, name):
    path = os.path.join(vault.dir, "objects", name)
    os.makedirs(path, mode=0o700, exist_ok=True)  # in the vault: private
    return path


def latest_index(vault, name):
    """(point id, index key, local name) of the item's newest point, or None."""
    row = vault.db.execute("SELECT point, key FROM object_indexes WHERE item=? ORDER BY point "
                           "DESC LIMIT 1", (name,)).fetchone()
    if row is None:
        return None
    return row["point"], row["key"], os.path.basename(row["key"])[:-len(".pidx")]

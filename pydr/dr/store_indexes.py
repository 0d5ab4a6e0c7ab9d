"""The store's object_indexes table: which point index in an object store
(pydr.dr.pointstores.chunkindex) belongs to which point of an item. Part
of pydr.dr.store.Store."""

import time

from .store_records import IndexRecord, ObjectStoreRecord


class IndexTables:
    """Point indexes in object stores; needs ``self.db`` and ``self.transaction``."""

    def add_index(self, name, point_id, store, key, size, version=None, retain_until=None,
                  digest=None):
        """Record the index of point `point_id` (in the caller's transaction:
        the point's): its key, S3 `version`, lock (`retain_until`) and
        `digest` (hex SHA-256 of the object as stored)."""
        self.db.execute("INSERT INTO object_indexes(item, point, store, key, bytes, version, "
                        "retain_until, digest) VALUES (?,?,?,?,?,?,?,?)",
                        (name, point_id, store, key, size, version, retain_until, digest))

    def object_store(self, spec):
        """The ObjectStoreRecord of the store `spec` (s3://BUCKET/PREFIX), or None."""
        row = self.db.execute(f"SELECT {ObjectStoreRecord.columns()} FROM object_stores "
                              "WHERE store=?", (spec,)).fetchone()
        return None if row is None else ObjectStoreRecord.from_row(row)

    def add_object_store(self, spec, store_id, encryption, key_check=None):
        """Record the store `spec` as first seen (kept when already recorded)."""
        self.db.execute("INSERT OR IGNORE INTO object_stores(store, id, encryption, created, "
                        "key_check) VALUES (?,?,?,?,?)",
                        (spec, store_id, encryption, time.time(), key_check))

    def set_key_check(self, spec, key_check):
        """Record the key check of the store `spec` where none is recorded yet."""
        self.db.execute("UPDATE object_stores SET key_check=? WHERE store=? AND key_check IS NULL",
                        (key_check, spec))

    def has_indexes(self, name):
        """Whether item `name` has points in an object store."""
        return self.db.execute("SELECT 1 FROM object_indexes WHERE item=? LIMIT 1",
                               (name,)).fetchone() is not None

    def latest_index(self, name):
        """The IndexRecord of the item's newest point, or None."""
        row = self.db.execute(f"SELECT {IndexRecord.columns()} FROM object_indexes WHERE item=? "
                              "ORDER BY point DESC LIMIT 1", (name,)).fetchone()
        return None if row is None else IndexRecord.from_row(row)

    def index_rows(self, name):
        """The IndexRecords of item `name`, by point."""
        return [IndexRecord.from_row(r) for r in self.db.execute(
            f"SELECT {IndexRecord.columns()} FROM object_indexes WHERE item=? ORDER BY point",
            (name,))]

    def index_of(self, name, point_id):
        """The IndexRecord of point `point_id` of `name`, or None."""
        row = self.db.execute(f"SELECT {IndexRecord.columns()} FROM object_indexes "
                              "WHERE item=? AND point=?", (name, point_id)).fetchone()
        return None if row is None else IndexRecord.from_row(row)

    def orphan_index_points(self, name):
        """The points of `name` whose index rows remain while the point does
        not (released by retention, the index not yet deleted)."""
        return {r[0] for r in self.db.execute(
            "SELECT point FROM object_indexes o WHERE item=? AND NOT EXISTS "
            "(SELECT 1 FROM points p WHERE p.item=o.item AND p.id=o.point)", (name,))}

    def drop_index_rows(self, name, point_ids):
        """Forget the index rows of points `point_ids` of `name` (their
        objects deleted first by the caller), in one transaction."""
        with self.transaction():
            for point_id in point_ids:
                self.db.execute("DELETE FROM object_indexes WHERE item=? AND point=?",
                                (name, point_id))

    def index_keys(self, name):
        """The keys of every index item `name`'s rows record."""
        return {r[0] for r in self.db.execute("SELECT key FROM object_indexes WHERE item=?",
                                              (name,))}

"""The store's object_indexes table: which point index in an object store
(pydr.dr.pointstores.chunkindex) belongs to which point of an item. Part
of pydr.dr.store.Store."""

from .store_records import IndexRecord


class IndexTables:
    """Point indexes in object stores; needs ``self.db``."""

    def add_index(self, name, point_id, store, key, size):
        """Record the index of point `point_id` (in the caller's transaction: the point's)."""
        self.db.execute("INSERT INTO object_indexes(item, point, store, key, bytes) "
                        "VALUES (?,?,?,?,?)", (name, point_id, store, key, size))

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

    def index_keys(self, name):
        """The keys of every index item `name`'s rows record."""
        return {r[0] for r in self.db.execute("SELECT key FROM object_indexes WHERE item=?",
                                              (name,))}

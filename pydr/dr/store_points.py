"""The store's steps, points and point_disks tables: the undo steps of each
disk, and the recovery points made of them (docs/VAULT.md, "Recovery
points are reverse deltas"). Part of pydr.dr.store.Store."""

from ..errors import UnknownName
from .store_records import PointDiskRecord, PointRecord, StepRecord


class PointTables:
    """Steps and points; needs ``self.db`` and ``self.dir`` (and ``self.item``)."""

    # -- steps -------------------------------------------------------------------
    def current_step(self, name, idx):
        """The latest step of a disk: the highest a steps row or a point
        names, or 0 (only the initial copy). It never goes down: once
        retention released every step, the kept point still names its own,
        and the next cycle's step is numbered past it (a number used again
        would be released with the old ones, its point silently the latest
        state)."""
        row = self.db.execute(
            "SELECT MAX(s) FROM (SELECT MAX(step) AS s FROM steps WHERE item=? AND idx=? "
            "UNION ALL SELECT MAX(step) FROM point_disks WHERE item=? AND idx=?)",
            (name, idx, name, idx)).fetchone()
        return row[0] or 0

    def has_step(self, name, idx, step):
        return self.db.execute("SELECT 1 FROM steps WHERE item=? AND idx=? AND step=?",
                               (name, idx, step)).fetchone() is not None

    def add_step(self, name, idx, step, path, size, digest):
        """Record undo step `step` of disk `idx` (in the caller's transaction, if any)."""
        self.db.execute("INSERT INTO steps(item, idx, step, path, bytes, digest) "
                        "VALUES (?,?,?,?,?,?)", (name, idx, step, path, size, digest))

    def steps(self, name, idx=None, *, after=None, upto=None, newest_first=False):
        """The StepRecords of item `name` (of disk `idx`; numbered above
        `after`, up to `upto`), by disk and step (newest first if asked)."""
        where, args = ["item=?"], [name]
        for clause, value in (("idx=?", idx), ("step>?", after), ("step<=?", upto)):
            if value is not None:
                where.append(clause)
                args.append(value)
        order = "idx, step DESC" if newest_first else "idx, step"
        return [StepRecord.from_row(r) for r in self.db.execute(
            f"SELECT {StepRecord.columns()} FROM steps WHERE {' AND '.join(where)} "
            f"ORDER BY {order}", args)]

    def drop_step(self, name, idx, step):
        """Forget undo step `step` of disk `idx` (in the caller's transaction, if any)."""
        self.db.execute("DELETE FROM steps WHERE item=? AND idx=? AND step=?", (name, idx, step))

    def all_steps(self):
        """Every steps row (also one of a disk that is not there), by item,
        disk and step."""
        return [StepRecord.from_row(r) for r in self.db.execute(
            f"SELECT {StepRecord.columns()} FROM steps ORDER BY item, idx, step")]

    # -- points ------------------------------------------------------------------
    def allocate_point_id(self):
        """A new point id (the counter moves on), in the caller's transaction:
        allocated with the points, so a failed cycle uses no id."""
        point_id = self.db.execute(
            "SELECT value FROM counters WHERE name='point'").fetchone()[0] + 1
        self.db.execute("UPDATE counters SET value=? WHERE name='point'", (point_id,))
        return point_id

    def add_point(self, point_id, name, *, created, consistency, size, cut, cut_at=None):
        """Record point `point_id` of item `name` at its disks' current steps
        (in the caller's transaction: the point's). `created`: when it is
        recorded; `cut_at`: when its cut was taken (None: not known)."""
        self.db.execute("INSERT INTO points(id, item, created, consistency, bytes, cut, cut_at) "
                        "VALUES (?,?,?,?,?,?,?)",
                        (point_id, name, created, consistency, size, cut, cut_at))
        for d in self.disks(name):
            self.db.execute("INSERT INTO point_disks(id, item, idx, step) VALUES (?,?,?,?)",
                            (point_id, name, d.idx, self.current_step(name, d.idx)))

    def points(self, name):
        """The PointRecords of item `name` (UnknownName if it is not protected), oldest first."""
        self.item(name)
        return [PointRecord.from_row(r) for r in self.db.execute(
            f"SELECT {PointRecord.columns()} FROM points WHERE item=? ORDER BY id", (name,))]

    def point(self, name, point_id):
        row = self.db.execute(f"SELECT {PointRecord.columns()} FROM points WHERE item=? AND id=?",
                              (name, point_id)).fetchone()
        if row is None:
            raise UnknownName(f"item {name!r} has no recovery point {point_id}", path=self.dir,
                              item=name)
        return PointRecord.from_row(row)

    def all_points(self):
        """Every points row (also one of an item that is not there), by item and id."""
        return [PointRecord.from_row(r) for r in self.db.execute(
            f"SELECT {PointRecord.columns()} FROM points ORDER BY item, id")]

    def all_point_disks(self):
        """Every point_disks row, by item, point and disk."""
        return [PointDiskRecord.from_row(r) for r in self.db.execute(
            f"SELECT {PointDiskRecord.columns()} FROM point_disks ORDER BY item, id, idx")]

    def point_step(self, name, point_id, idx):
        """The step disk `idx` was at in point `point_id`, or None (no such point)."""
        row = self.db.execute("SELECT step FROM point_disks WHERE item=? AND id=? AND idx=?",
                              (name, point_id, idx)).fetchone()
        return None if row is None else row[0]

    def oldest_point_step(self, name, idx):
        """The lowest step disk `idx` is at in a point of `name`, or None (no point)."""
        return self.db.execute("SELECT MIN(step) FROM point_disks WHERE item=? AND idx=?",
                               (name, idx)).fetchone()[0]

    def drop_points(self, name, point_ids):
        """Forget points of item `name` (in the caller's transaction, if any);
        their steps stay (the point store releases them)."""
        for point_id in point_ids:
            self.db.execute("DELETE FROM points WHERE item=? AND id=?", (name, point_id))
            self.db.execute("DELETE FROM point_disks WHERE item=? AND id=?", (name, point_id))
            self.db.execute("DELETE FROM point_machines WHERE item=? AND id=?", (name, point_id))

    def drop_all_points(self, name):
        """Forget every point and step of item `name` (in the caller's
        transaction, if any): a committed failover's."""
        self.db.execute("DELETE FROM point_disks WHERE item=?", (name,))
        self.db.execute("DELETE FROM point_machines WHERE item=?", (name,))
        self.db.execute("DELETE FROM points WHERE item=?", (name,))
        self.db.execute("DELETE FROM steps WHERE item=?", (name,))

    def mark_damaged(self, name, point_ids, reason):
        """Record that points of item `name` can no longer be restored, and
        why (a damaged step, a replica changed behind the vault's back).
        A point already marked keeps its first reason."""
        with self.db:
            self.db.executemany("UPDATE points SET damaged=? WHERE item=? AND id=? AND damaged IS NULL",
                                [(reason, name, p) for p in point_ids])

    def points_needing(self, name, idx, step):
        """The ids of the points of `name` whose disk `idx` is made with undo
        step `step` (the points before it)."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM point_disks WHERE item=? AND idx=? AND step<?", (name, idx, step))]

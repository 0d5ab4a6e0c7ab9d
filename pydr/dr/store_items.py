"""The store's items and disks tables, and the operation recorded on an
item while it runs (so that a killed one is finished by running its
command again: docs/RELIABILITY.md). Part of pydr.dr.store.Store."""

import contextlib
import json

from ..errors import UnknownName
from .store_records import DiskRecord, ItemRecord, assignments

# operations that change no state of an item: their record never replaces the
# record of one that does (a failover, a failback once its shutdown hook ran)
SIDE_OPERATIONS = ("replicate", "materialize", "test-failover", "cleanup-test-failover")


def takes_over(operation, recorded):
    """Whether `operation`, as it begins on an item, replaces the record
    of the operation `recorded` on it (None: nothing is). A cycle never
    does (it may be part of it: a failover's final cycle); an operation
    that changes the item's state always does (it takes over, or ends, an
    interrupted one: its record would outlive it); a drill or its clean-up
    only another side operation's."""
    if recorded is None or operation == recorded:
        return True
    if operation in ("replicate", "materialize"):
        return False
    return operation not in SIDE_OPERATIONS or recorded in SIDE_OPERATIONS


class ItemTables:
    """Items and their disks; needs ``self.db``, ``self.dir`` and ``self.transaction``."""

    # -- items -------------------------------------------------------------------
    def item(self, name):
        """The ItemRecord of `name`; UnknownName if it is not protected."""
        row = self.db.execute(f"SELECT {ItemRecord.columns()} FROM items WHERE name=?",
                              (name,)).fetchone()
        if row is None:
            raise UnknownName(f"no protected item named {name!r}", path=self.dir, item=name)
        return ItemRecord.from_row(row)

    def has_item(self, name):
        return self.db.execute("SELECT 1 FROM items WHERE name=?", (name,)).fetchone() is not None

    def items(self, group=None):
        """The names of the items (of `group`: UnknownName if it has none), sorted."""
        if group is None:
            return [r["name"] for r in self.db.execute("SELECT name FROM items ORDER BY name")]
        names = [r["name"] for r in self.db.execute(
            "SELECT name FROM items WHERE grp=? ORDER BY name", (group,))]
        if not names:
            raise UnknownName(f"no replication group named {group!r}", path=self.dir)
        return names

    def item_records(self):
        """Every item's ItemRecord, by name."""
        return [ItemRecord.from_row(r) for r in self.db.execute(
            f"SELECT {ItemRecord.columns()} FROM items ORDER BY name")]

    def add_item(self, name, disks, granularity=None, **fields):
        """Record a new item with its `disks` [(source, replica, tracking)]
        (numbered from 0) in one transaction; `granularity`: of the tracked
        disks' dirty bitmaps (None: the default). `fields`: its other columns."""
        row = {"name": name, **fields}
        assignments(ItemRecord, row, "items")
        # in the caller's transaction if there is one (protect: the item with its policy)
        with contextlib.nullcontext() if self.db.in_transaction else self.transaction():
            self.db.execute(f"INSERT INTO items({', '.join(row)}) "
                            f"VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
            for i, (source, replica, tracking) in enumerate(disks):
                self.db.execute("INSERT INTO disks(item, idx, source, replica, tracking, "
                                "granularity) VALUES (?,?,?,?,?,?)",
                                (name, i, source, replica, tracking,
                                 granularity if tracking else None))

    def set_item(self, name, **fields):
        """Change columns of an item (in the caller's transaction, if any)."""
        cols = assignments(ItemRecord, fields, "items")
        self.db.execute(f"UPDATE items SET {cols} WHERE name=?", (*fields.values(), name))

    # -- disks -------------------------------------------------------------------
    def disks(self, name):
        """The DiskRecords of an item, by index."""
        return [DiskRecord.from_row(r) for r in self.db.execute(
            f"SELECT {DiskRecord.columns()} FROM disks WHERE item=? ORDER BY idx", (name,))]

    def all_disks(self):
        """Every disks row (also one whose item is not there), by item and index."""
        return [DiskRecord.from_row(r) for r in self.db.execute(
            f"SELECT {DiskRecord.columns()} FROM disks ORDER BY item, idx")]

    def set_disk(self, name, idx, **fields):
        """Change columns of disk `idx` of an item (in the caller's transaction, if any)."""
        cols = assignments(DiskRecord, fields, "disks")
        self.db.execute(f"UPDATE disks SET {cols} WHERE item=? AND idx=?",
                        (*fields.values(), name, idx))

    def set_bitmap(self, name, idx, bitmap, generation):
        """The current dirty bitmap of a tracked disk (pydr.dr.tracking), in
        the caller's transaction (the point's), if any."""
        self.db.execute("UPDATE disks SET bitmap=?, generation=? WHERE item=? AND idx=?",
                        (bitmap, generation, name, idx))

    # -- the operation running on an item ------------------------------------------
    def begin(self, name, operation, command, args=None, **fields):
        """Record, with the state changes `fields` and in one transaction,
        that `operation` runs on item `name`, and the command that finishes
        it when it is interrupted. An operation recorded before stays
        unless this one takes it over (see :func:`takes_over`)."""
        with self.transaction():
            row = self.item(name)
            if takes_over(operation, row.operation):
                fields.update(operation=operation, operation_command=command,
                              operation_args=json.dumps(args or {}))
            if fields:
                self.set_item(name, **fields)

    def end(self, name, operation, **fields):
        """The state changes `fields` and, if `operation` (a name or a tuple
        of names) is the one recorded, its end, in one transaction."""
        ops = (operation,) if isinstance(operation, str) else operation
        with self.transaction():
            if self.item(name).operation in ops:
                fields.update(operation=None, operation_command=None, operation_args=None)
            if fields:
                self.set_item(name, **fields)

    def pending(self, name, operation):
        """The arguments (dict) of `operation` if it is recorded on `name`
        (an interrupted run of it), else None."""
        row = self.item(name)
        if row.operation != operation:
            return None
        return json.loads(row.operation_args or "{}")

    def operation(self, name):
        """The operation recorded on an item: {"name", "command",
        "interrupted"} (interrupted: no process is running it; for a
        writer, no call of its own runs it now: one that was cancelled or
        failed, or was there when it opened), or None."""
        row = self.item(name)
        if row.operation is None:
            return None
        if self.writer:
            interrupted = not self._runs_now(name, row.operation)
        else:
            interrupted = not self.locked_by_another()
        return {"name": row.operation, "command": row.operation_command,
                "interrupted": interrupted}

    @contextlib.contextmanager
    def running(self, name, operation):
        """While the block runs, this process runs `operation` on item
        `name` (a workflow call: pydr.dr.failover, drills, cycle), so
        operation() says the one recorded on it is not interrupted; once
        the block ends, by a return or an exception (a cancel), it is."""
        live = self.__dict__.setdefault("_live_operations", {})
        live.setdefault(name, []).append(operation)
        try:
            yield
        finally:
            live[name].remove(operation)
            if not live[name]:
                del live[name]

    def _runs_now(self, name, recorded):
        """Whether a call of this process runs the operation `recorded` on
        `name`: a call of it, or of one that takes it over (takes_over)."""
        live = self.__dict__.get("_live_operations", {}).get(name, ())
        return any(takes_over(op, recorded) for op in live)

    def clear_operation(self, name, operation):
        """End `operation` on item `name` if it is the one recorded, in the
        caller's transaction (end() is its own)."""
        self.db.execute("UPDATE items SET operation=NULL, operation_command=NULL, "
                        "operation_args=NULL WHERE name=? AND operation=?", (name, operation))

    def recorded_operations(self):
        """{item: operation} of the items with an operation recorded."""
        return {r["name"]: r["operation"] for r in self.db.execute(
            "SELECT name, operation FROM items WHERE operation IS NOT NULL")}

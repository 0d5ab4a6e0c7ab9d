"""The store's policies, alerts and doomed_files tables: what pydr run
keeps each item at (pydr.dr.policy reads them), the RPO health changes it
recorded, and the files to remove once the rows that named them are gone
(pydr.dr.stepmerge). Part of pydr.dr.store.Store."""

import contextlib

from .store_records import AlertRecord, PolicyRecord

SCOPES = ("item", "group")
POLICY_COLUMNS = PolicyRecord.__slots__[2:]


class PolicyTables:
    """Policies, alerts and doomed files; needs ``self.db`` and ``self.transaction``."""

    # -- policies ----------------------------------------------------------------
    def policy_row(self, scope, name):
        """The PolicyRecord of `scope` ("item" or "group") `name`, or None."""
        row = self.db.execute(f"SELECT {PolicyRecord.columns()} FROM policies "
                              "WHERE scope=? AND name=?", (scope, name)).fetchone()
        return None if row is None else PolicyRecord.from_row(row)

    def policy_rows(self):
        """Every PolicyRecord, by scope and name."""
        return [PolicyRecord.from_row(r) for r in self.db.execute(
            f"SELECT {PolicyRecord.columns()} FROM policies ORDER BY scope, name")]

    def put_policy(self, scope, name, **columns):
        """Set `columns` (names of the policies table; None clears one) of
        the policy of `scope` `name`, creating its row."""
        assert scope in SCOPES, scope
        unknown = set(columns) - set(POLICY_COLUMNS)
        if unknown:
            raise TypeError(f"no column {', '.join(sorted(unknown))} in table policies")
        # in the caller's transaction if there is one (pydr.dr.policy checks, then writes)
        with contextlib.nullcontext() if self.db.in_transaction else self.transaction():
            self.db.execute("INSERT OR IGNORE INTO policies(scope, name) VALUES (?, ?)",
                            (scope, name))
            for column, value in columns.items():  # names come from code (checked above)
                self.db.execute(f"UPDATE policies SET {column}=? WHERE scope=? AND name=?",
                                (value, scope, name))

    def drop_policy(self, scope, name):
        """Remove the policy of `scope` `name` (nothing when it has none)."""
        self.db.execute("DELETE FROM policies WHERE scope=? AND name=?", (scope, name))

    # -- RPO health and alerts ----------------------------------------------------
    def set_rpo_health(self, name, health):
        """Record item `name`'s RPO health (what the next change is measured from)."""
        self.db.execute("UPDATE items SET rpo_health=? WHERE name=?", (health, name))

    def add_alert(self, at, item, old, new, rpo_seconds, target_rpo, message):
        """Log a change of `item`'s RPO health; returns its id."""
        cur = self.db.execute(
            "INSERT INTO alerts(at, item, old, new, rpo_seconds, target_rpo, message) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (at, item, old, new, rpo_seconds, target_rpo, message))
        return cur.lastrowid

    def alerts(self, item=None, since=None, limit=None):
        """AlertRecords, oldest first: of `item` (None: every item), at or
        after `since` (epoch seconds), the newest `limit` of them."""
        where, args = [], []
        if item is not None:
            where.append("item=?")
            args.append(item)
        if since is not None:
            where.append("at>=?")
            args.append(since)
        sql = f"SELECT {AlertRecord.columns()} FROM alerts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [AlertRecord.from_row(r) for r in self.db.execute(sql, args)][::-1]

    # -- files to remove once their rows are gone -----------------------------------
    def add_doomed(self, item, path):
        """Note that `path` (a file of item `item`) must be removed: in the
        transaction that drops the rows naming it."""
        self.db.execute("INSERT OR IGNORE INTO doomed_files(item, path) VALUES (?, ?)",
                        (item, path))

    def doomed(self, item):
        """The paths of item `item` still to remove."""
        return [r[0] for r in self.db.execute(
            "SELECT path FROM doomed_files WHERE item=? ORDER BY path", (item,))]

    def all_doomed(self):
        """Every file still to remove, as (item, path), by item and path."""
        return [(r[0], r[1]) for r in self.db.execute(
            "SELECT item, path FROM doomed_files ORDER BY item, path")]

    def drop_doomed(self, item, path):
        """`path` is removed: forget it."""
        self.db.execute("DELETE FROM doomed_files WHERE item=? AND path=?", (item, path))

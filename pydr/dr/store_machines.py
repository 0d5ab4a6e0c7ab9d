"""The store's machine tables: which items are machines (a libvirt domain,
or disks a hook brings up), each point's domain XML, the domains pydr
defined at the recovery site and the verifications of recovered machines
(pydr.dr.machines, bringup and probes use them). Part of
pydr.dr.store.Store."""

import contextlib
import time

from .store_records import (MachineDomainRecord, MachineRecord, PointMachineRecord,
                            VerificationRecord)

MACHINE_COLUMNS = MachineRecord.__slots__[1:]


class MachineTables:
    """Machines, point machines, defined domains and verifications; needs
    ``self.db`` and ``self.transaction``."""

    # -- machines ------------------------------------------------------------------
    def machine(self, name):
        """The MachineRecord of item `name`, or None (its disks are not a machine)."""
        row = self.db.execute(f"SELECT {MachineRecord.columns()} FROM machines WHERE item=?",
                              (name,)).fetchone()
        return None if row is None else MachineRecord.from_row(row)

    def put_machine(self, name, **columns):
        """Set `columns` (of the machines table; None clears one) of item
        `name`'s machine, creating its row (``kind`` is then required), in
        the caller's transaction if there is one."""
        unknown = set(columns) - set(MACHINE_COLUMNS)
        if unknown:
            raise TypeError(f"no column {', '.join(sorted(unknown))} in table machines")
        with contextlib.nullcontext() if self.db.in_transaction else self.transaction():
            if self.db.execute("SELECT 1 FROM machines WHERE item=?", (name,)).fetchone() is None:
                self.db.execute("INSERT INTO machines(item, kind) VALUES (?, ?)",
                                (name, columns["kind"]))
            for column, value in columns.items():  # names come from code (checked above)
                self.db.execute(f"UPDATE machines SET {column}=? WHERE item=?", (value, name))

    # -- the machine of each point ---------------------------------------------------
    def add_point_machine(self, name, point_id, xml, *, frozen=False, checkpoint=None):
        """Record point `point_id`'s domain XML (in the caller's transaction: the point's)."""
        self.db.execute("INSERT OR REPLACE INTO point_machines(id, item, xml, frozen, checkpoint) "
                        "VALUES (?,?,?,?,?)", (point_id, name, xml, int(bool(frozen)), checkpoint))

    def point_machine(self, name, point_id):
        """The PointMachineRecord of point `point_id` of item `name`, or None."""
        row = self.db.execute(f"SELECT {PointMachineRecord.columns()} FROM point_machines "
                              "WHERE item=? AND id=?", (name, point_id)).fetchone()
        return None if row is None else PointMachineRecord.from_row(row)

    def drop_point_machines(self, name, point_ids=None):
        """Forget the machines of points `point_ids` of `name` (None: all of them)."""
        if point_ids is None:
            self.db.execute("DELETE FROM point_machines WHERE item=?", (name,))
        else:
            self.db.executemany("DELETE FROM point_machines WHERE item=? AND id=?",
                                [(name, p) for p in point_ids])

    # -- domains defined at the recovery site ----------------------------------------
    def machine_domain(self, name, role):
        """The MachineDomainRecord of item `name` in `role`, or None."""
        row = self.db.execute(f"SELECT {MachineDomainRecord.columns()} FROM machine_domains "
                              "WHERE item=? AND role=?", (name, role)).fetchone()
        return None if row is None else MachineDomainRecord.from_row(row)

    def put_machine_domain(self, name, role, *, uri, domain, uuid, point=None, console=None):
        """Record that pydr defined domain `domain` (`uuid`) on `uri` for
        item `name` in `role` (replacing the role's previous record)."""
        with contextlib.nullcontext() if self.db.in_transaction else self.transaction():
            self.db.execute("INSERT OR REPLACE INTO machine_domains(item, role, uri, name, uuid, "
                            "point, console, defined) VALUES (?,?,?,?,?,?,?,?)",
                            (name, role, uri, domain, uuid, point, console, time.time()))

    def drop_machine_domain(self, name, role):
        """Forget the domain of item `name` in `role` (it was undefined)."""
        with contextlib.nullcontext() if self.db.in_transaction else self.transaction():
            self.db.execute("DELETE FROM machine_domains WHERE item=? AND role=?", (name, role))

    # -- verifications ---------------------------------------------------------------
    def add_verification(self, name, point_id, kind, *, started, ended, passed, rto, probes,
                         error=None):
        """Record a verification of point `point_id` of `name`; returns its id.
        `probes` is JSON text."""
        with contextlib.nullcontext() if self.db.in_transaction else self.transaction():
            cur = self.db.execute(
                "INSERT INTO verifications(item, point, kind, started, ended, passed, rto, "
                "probes, error) VALUES (?,?,?,?,?,?,?,?,?)",
                (name, point_id, kind, started, ended, int(bool(passed)), rto, probes, error))
            return cur.lastrowid

    def verifications(self, name, point_id=None):
        """The VerificationRecords of item `name` (of point `point_id` only
        when given), oldest first."""
        sql = f"SELECT {VerificationRecord.columns()} FROM verifications WHERE item=?"
        args = (name,)
        if point_id is not None:
            sql += " AND point=?"
            args += (point_id,)
        return [VerificationRecord.from_row(r) for r in self.db.execute(sql + " ORDER BY id", args)]

    def last_verification(self, name):
        """Item `name`'s newest VerificationRecord, or None."""
        found = self.verifications(name)
        return found[-1] if found else None

"""The store's jobs table (what each command did to which item, also while
it runs: ``pydr jobs``) and plans table (recovery plans, pydr.dr.plans).
Part of pydr.dr.store.Store."""

import json
import os
import time

from ..errors import Cancelled, InvalidState, UnknownName, VaultDamaged
from .store_records import JobRecord, PlanRecord, assignments


class JobTables:
    """Jobs and plans; needs ``self.db``, ``self.dir`` and ``self.transaction``."""

    # -- jobs --------------------------------------------------------------------
    def start_job(self, kind, item, state="running"):
        """A new job of this process; its id."""
        cur = self.db.execute(
            "INSERT INTO jobs(kind, item, state, started, pid) VALUES (?,?,?,?,?)",
            (kind, item, state, time.time() if state == "running" else None, os.getpid()))
        return cur.lastrowid

    def run_job(self, kind, item, fn):
        """Run fn() as a job: running, then succeeded, failed or cancelled."""
        job = self.start_job(kind, item)
        outer, self.current_job = getattr(self, "current_job", None), job
        try:
            result = fn()
        except BaseException as exc:
            stopped = isinstance(exc, (KeyboardInterrupt, Cancelled))  # ended as a kill ends it
            self.end_job(job, "cancelled" if stopped else "failed", error=str(exc))
            raise
        finally:
            self.current_job = outer
        self.end_job(job, "succeeded")
        return result

    def note_method(self, method):
        """Record on the running job how it made a disk ("reflink", "qcow2",
        "copy"; several, joined by "+", for disks made differently)."""
        job = getattr(self, "current_job", None)
        if job is None:
            return
        row = self.db.execute("SELECT method FROM jobs WHERE id=?", (job,)).fetchone()
        seen = set(filter(None, (row["method"] or "").split("+"))) | {method}
        self.update_job(job, method="+".join(sorted(seen)))

    def update_job(self, job_id, **fields):
        cols = assignments(JobRecord, fields, "jobs")
        self.db.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*fields.values(), job_id))

    def end_job(self, job_id, state, error=None, bytes_transferred=None):
        fields = {"state": state, "ended": time.time(), "error": error}
        if state == "succeeded":
            fields["progress"] = 1.0
        if bytes_transferred is not None:
            fields["bytes_transferred"] = bytes_transferred
        self.update_job(job_id, **fields)

    def last_job(self, item, kind=None, excluding=()):
        """The newest JobRecord of `item` (of `kind`; not of the kinds
        `excluding`), or None."""
        where, args = ["item=?"], [item]
        if kind is not None:
            where.append("kind=?")
            args.append(kind)
        if excluding:
            where.append(f"kind NOT IN ({', '.join('?' * len(excluding))})")
            args += list(excluding)
        row = self.db.execute(f"SELECT {JobRecord.columns()} FROM jobs WHERE {' AND '.join(where)} "
                              "ORDER BY id DESC LIMIT 1", args).fetchone()
        return None if row is None else JobRecord.from_row(row)

    def jobs(self):
        """Every JobRecord, oldest first."""
        return [JobRecord.from_row(r) for r in self.db.execute(
            f"SELECT {JobRecord.columns()} FROM jobs ORDER BY id")]

    def find_jobs(self, *, item=None, state=None, since=None, limit=None):
        """The JobRecords of `item` (any when None), in `state` (a state or a
        collection of states; any when None), started at or after `since`
        (epoch seconds; a job not started yet counts as started now), newest
        first, at most `limit` of them (all when None)."""
        where, args = [], []
        if item is not None:
            where.append("item=?")
            args.append(item)
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += states
        if since is not None:
            where.append("COALESCE(started, ?) >= ?")
            args += [time.time(), float(since)]
        sql = f"SELECT {JobRecord.columns()} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [JobRecord.from_row(r) for r in self.db.execute(sql, args)]

    def job(self, job_id):
        """The JobRecord of job `job_id`; UnknownName if there is none."""
        row = self.db.execute(f"SELECT {JobRecord.columns()} FROM jobs WHERE id=?",
                              (job_id,)).fetchone()
        if row is None:
            raise UnknownName(f"no job {job_id}", path=self.dir)
        return JobRecord.from_row(row)

    def unfinished_jobs(self):
        """The JobRecords still queued or running (their process may be gone)."""
        return [JobRecord.from_row(r) for r in self.db.execute(
            f"SELECT {JobRecord.columns()} FROM jobs WHERE state IN ('queued', 'running') "
            "ORDER BY id")]

    # -- recovery plans ------------------------------------------------------------
    def add_plan(self, name, definition):
        """Record plan `name` ({"items", "pre", "post"} groups); InvalidState
        if a plan of that name exists."""
        with self.transaction():
            if self.db.execute("SELECT 1 FROM plans WHERE name=?", (name,)).fetchone():
                raise InvalidState(f"a recovery plan named {name!r} exists already", path=self.dir)
            self.db.execute("INSERT INTO plans(name, definition, created) VALUES (?,?,?)",
                            (name, json.dumps(definition), time.time()))

    def plan(self, name):
        """The PlanRecord of `name` (its definition decoded); UnknownName if there is none."""
        row = self.db.execute(f"SELECT {PlanRecord.columns()} FROM plans WHERE name=?",
                              (name,)).fetchone()
        if row is None:
            raise UnknownName(f"no recovery plan named {name!r}", path=self.dir)
        try:
            definition = json.loads(row["definition"])
        except ValueError as exc:
            raise VaultDamaged(f"the definition of recovery plan {name!r} is damaged: {exc}",
                               path=self.db.path) from None
        return PlanRecord(row["name"], definition, row["created"])

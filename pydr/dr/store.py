"""The vault's store: pydr's replication state, a directory holding a SQLite
database. It records items, disks, steps, points, jobs and plans, and knows
no workflow: replication, failover and plans (pydr.dr) change it through
this class, and pydr.dr.vault.Vault puts them together for callers.

Layout of a vault directory::

    vault.db        SQLite (WAL): items, disks, points, undo steps, jobs
    vault.lock      flock()ed by the command that changes the vault
    undo/ITEM/      committed undo journals: reverse deltas, one per disk and
                    delta cycle ("steps"); recovery points are built from them
    cache/ITEM/     signature caches of the replicas

Recovery points are not copies. Each delta cycle of a disk leaves its undo
journal (the old contents of every block it changed) as step k of that disk;
a point records, per disk, the step its replica was at. Materialising a point
copies the current replica and rolls the newer steps back onto the copy,
newest first -- cost proportional to what changed since.
"""

import contextlib
import errno
import fcntl
import os
import re
import sqlite3
import time

from ..engine.oserrors import naming
from ..errors import CorruptDelta, HookFailed, InvalidState, UnknownName, VaultError  # noqa: F401  (re-exported)
from . import ownership, stepdigest
from .schema import (DB_NAME, SCHEMA_VERSION, connect as _connect, init_vault,  # noqa: F401
                     migrate as _migrate, tighten_vault)

LOCK_NAME = "vault.lock"

_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
STATES = ("protecting", "protected", "resync-required")
HEALTH = ("ok", "warning", "critical")


class Store:
    """An open vault. Use as a context manager; ``writer=True`` takes the
    vault's lock (one changing command at a time; readers never wait)."""

    def __init__(self, directory, *, writer=False):
        self.dir = os.fspath(directory)
        path = os.path.join(self.dir, DB_NAME)
        if not os.path.isfile(path):
            raise VaultError("not a pydr vault (no vault.db): create one with 'pydr vault init DIR'",
                             path=self.dir)
        self.lock_fd = None
        self.writer = writer
        self.interrupted = {}
        if writer:
            self._lock()
            tighten_vault(self.dir)  # a vault made before vaults were private
        try:
            self.db = _connect(path)
            version = _migrate(self.db, self.db.execute("PRAGMA user_version").fetchone()[0])
            if version != SCHEMA_VERSION:
                raise VaultError(f"vault schema version {version} is not supported "
                                 f"(this pydr uses {SCHEMA_VERSION})", path=self.dir)
            self.db.execute("SELECT 1 FROM items LIMIT 1")
        except sqlite3.DatabaseError as exc:
            self.close()
            raise VaultError(f"not a pydr vault or damaged: {exc}", path=self.dir) from None
        except BaseException:
            self.close()
            raise
        if writer:
            self._recover()

    def _lock(self):
        """Take the vault's lock (non-blocking) and write who holds it into
        the lock file, so that a refused command can name the holder."""
        path = os.path.join(self.dir, LOCK_NAME)
        self.lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.lock_fd, 4096, 0).decode(errors="replace").strip()
            os.close(self.lock_fd)
            self.lock_fd = None
            raise VaultError("the vault is locked by another pydr process"
                             + (f" (pid {holder})" if holder else "")
                             + ": wait for it to end, then run the command again",
                             path=self.dir) from None
        with naming(path):  # a full disk names the vault
            os.ftruncate(self.lock_fd, 0)
            os.pwrite(self.lock_fd, f"{os.getpid()}: {_command_line()}\n".encode(), 0)

    def locked_by_another(self):
        """Whether another process holds the vault's lock now."""
        if self.lock_fd is not None:
            return False
        try:
            fd = os.open(os.path.join(self.dir, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def close(self):
        with contextlib.suppress(Exception):
            self.db.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- recovery after a killed command ----------------------------------------
    def _recover(self):
        """Bring the vault back to a consistent state after a killed command:
        jobs of dead processes fail; committed undo journals that were moved
        into the vault but not yet registered are registered (the replica
        already moved past them)."""
        from ..engine import journal as J

        # what was running when the last writer died: status calls it interrupted
        self.interrupted = {r["name"]: r["operation"] for r in self.db.execute(
            "SELECT name, operation FROM items WHERE operation IS NOT NULL")}
        for job in self.db.execute("SELECT id, pid FROM jobs WHERE state IN ('queued', 'running')"):
            if job["pid"] is None or not _alive(job["pid"]):
                self.db.execute("UPDATE jobs SET state='failed', ended=?, error=? WHERE id=?",
                                (time.time(), "interrupted: the process running it is gone", job["id"]))
        undo_root = os.path.join(self.dir, "undo")
        for item in os.listdir(undo_root) if os.path.isdir(undo_root) else ():
            for name in os.listdir(os.path.join(undo_root, item)):
                path = os.path.join(undo_root, item, name)
                if name.endswith(".pydr-new"):
                    os.unlink(path)  # a copy into the vault that a kill interrupted
                    continue
                if not name.endswith(".undo"):
                    continue
                idx, step = (int(x) for x in name[:-5].split("-"))
                known = self.db.execute("SELECT 1 FROM steps WHERE item=? AND idx=? AND step=?",
                                        (item, idx, step)).fetchone()
                if known:
                    continue
                if step <= self.current_step(item, idx):
                    os.unlink(path)  # one that retention dropped before a kill
                    continue
                # Only a committed journal is moved here (a copy from another file
                # system arrives as .pydr-new first): this one the replica moved past.
                # If it fails its checks, that is damage, not a kill: it is recorded
                # all the same (the chain stays whole) and its points are marked.
                found = None
                try:
                    J.check_step(path)
                    found = stepdigest.digest(path)  # the file as it is now: page cache
                except CorruptDelta as exc:
                    self.mark_damaged(item, self.points_needing(item, idx, step), str(exc))
                self.db.execute("INSERT INTO steps(item, idx, step, path, bytes, digest) "
                                "VALUES (?,?,?,?,?,?)",
                                (item, idx, step, path, os.lstat(path).st_size, found))

    # -- items -------------------------------------------------------------------
    def protect(self, name, disks, *, group=None, retention=24, retention_age=None,
                quiesce_hook=None, thaw_hook=None, rsh=None, remote_pydr=None, cbt=False,
                host=None):
        """Register an item: disks is a list of (source, replica) paths; a
        replica may be "[user@]host:PATH" (reached with `rsh`, default ssh,
        running `remote_pydr serve --stdio` there; its recovery-point steps
        are kept beside it).
        Points are kept while they are among the newest `retention` and (if
        `retention_age` seconds is given) younger than that; the newest point
        is always kept. `cbt`: each cycle takes its changed extents from a
        QEMU dirty bitmap (sources: qcow2 images or qmp:SOCKET:NODE; see
        pydr.dr.tracking). `host`: the sources are paths on that host, read
        there by a Dask worker of a fleet (pydr.dr.fleet); they are not
        looked for on this machine."""
        if not name or "/" in name or name.startswith("-"):
            raise ValueError(f"invalid item name {name!r}")
        if not disks:
            raise ValueError("an item needs at least one --disk SOURCE=REPLICA")
        if not isinstance(retention, int) or retention < 1:
            raise ValueError("retention must be a positive number of points")
        if retention_age is not None and retention_age <= 0:
            raise ValueError("retention age must be positive")
        if (quiesce_hook is None) != (thaw_hook is None):
            raise ValueError("give both --quiesce-hook and --thaw-hook, or neither")
        if host is not None and not _HOST_NAME.fullmatch(host):
            raise ValueError(f"invalid host name {host!r}: letters, digits, '.', '_' and '-'")
        if host is not None and cbt:
            raise ValueError("--cbt items cannot have a --host yet: changed-block tracking "
                             "runs on the vault's machine")
        if self.db.execute("SELECT 1 FROM items WHERE name=?", (name,)).fetchone():
            raise InvalidState(f"item {name!r} is already protected", path=self.dir)
        from ..endpoints import open_endpoint
        from .pointstores import specs  # each kind's rules; imports no workflow

        def disk(spec):
            return open_endpoint(spec, rsh=rsh, remote_pydr=remote_pydr)

        taken = {disk(r["source"]).identity for r in self.db.execute("SELECT source FROM disks")}
        taken |= {disk(r["replica"]).identity for r in self.db.execute("SELECT replica FROM disks")}
        seen = set()
        stored = []
        for source, replica in disks:
            src = disk(source)
            rep = specs.protected_replica(name, src, disk(replica), cbt=cbt, host=host)
            if src.place is not None:
                raise ValueError(f"source disk {source} must be on this machine "
                                 "(replicas may be on another)")
            if host is None and not src.exists():  # a host's disks are its worker's to find
                raise FileNotFoundError(errno.ENOENT, "source disk not found", source)
            if host is None and src.local_path is not None:
                from ..engine.devices import check_disk

                check_disk(src.local_path)  # a FIFO or socket: refused now, not at the first cycle
            if src.identity == rep.identity:
                raise ValueError(f"replica {replica} is the source disk itself")
            for p in (src.identity, rep.identity):
                if p in taken or p in seen:
                    raise InvalidState(f"{p} is already a disk of a protected item", path=p)
                seen.add(p)
            if cbt and not src.tracking:
                raise ValueError(f"changed-block tracking (--cbt) needs a qcow2 image or a live "
                                 f"disk (qmp:SOCKET:NODE) as the source, not {source}")
            stored.append((src.spec, rep.spec, src.tracking if cbt else None))
        specs.check_one_kind([r for _, r, _ in stored])
        owners = self._check_owners(name, stored, disk)
        job = self.start_job("protect", name)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO items(name, grp, state, direction, health, retention, quiesce_hook, "
                "thaw_hook, created, retention_age, rsh, remote_pydr, host) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (name, group, "protecting", "forward", "ok", retention, quiesce_hook, thaw_hook,
                 time.time(), retention_age, rsh, remote_pydr, host))
            for i, (source, replica, tracking) in enumerate(stored):
                self.db.execute("INSERT INTO disks(item, idx, source, replica, tracking) "
                                "VALUES (?,?,?,?,?)", (name, i, source, replica, tracking))
        for replica, me in owners:  # not reachable, no directory yet: its first cycle claims it
            with contextlib.suppress(OSError):
                ownership.claim(replica, me, exists_in_vault=self._has_item)
        self.end_job(job, "succeeded")

    def _has_item(self, name):
        return self.db.execute("SELECT 1 FROM items WHERE name=?", (name,)).fetchone() is not None

    def _check_owners(self, name, stored, endpoint):
        """[(replica endpoint, Owner)] of a new item's replicas (`endpoint`
        opens a spec as the item reaches it); InvalidState naming the owner
        if another vault or item owns one (a replica has one writer:
        pydr.dr.ownership)."""
        from .pointstores import specs

        owners = []
        for i, (_, replica, _) in enumerate(stored):
            if not specs.has_owner(replica):
                continue
            rep = endpoint(replica)
            me = ownership.Owner(self.vault_id(), self.dir, name, i, replica)
            try:
                ownership.check_claimable(rep, me, exists_in_vault=self._has_item)
            except (ConnectionError, TimeoutError):
                pass  # a host not reachable now: the item's first cycle checks and claims
            owners.append((rep, me))
        return owners

    def item(self, name):
        row = self.db.execute("SELECT * FROM items WHERE name=?", (name,)).fetchone()
        if row is None:
            raise UnknownName(f"no protected item named {name!r}", path=self.dir)
        return row

    def items(self, group=None):
        if group is None:
            return [r["name"] for r in self.db.execute("SELECT name FROM items ORDER BY name")]
        names = [r["name"] for r in self.db.execute(
            "SELECT name FROM items WHERE grp=? ORDER BY name", (group,))]
        if not names:
            raise UnknownName(f"no replication group named {group!r}", path=self.dir)
        return names

    def disks(self, name):
        return [dict(r) for r in self.db.execute(
            "SELECT idx, source, replica, tracking, bitmap, generation FROM disks WHERE item=? "
            "ORDER BY idx", (name,))]

    def set_item(self, name, **fields):
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE items SET {cols} WHERE name=?", (*fields.values(), name))

    def status(self, name):
        row = self.item(name)
        points = self.points(name)
        return {
            "item": name, "state": row["state"], "direction": row["direction"],
            "health": row["health"], "group": row["grp"], "host": row["host"],
            "retention": row["retention"],
            "retention_age": row["retention_age"],
            # whether hooks are set, never their command lines (they may hold a password)
            "hooks": {"quiesce": bool(row["quiesce_hook"]), "thaw": bool(row["thaw_hook"])},
            "disks": [{"source": d["source"], "replica": d["replica"],
                       "tracking": {"mode": d["tracking"], "bitmap": d["bitmap"]}
                       if d["tracking"] else None} for d in self.disks(name)],
            "points": len(points),
            "latest_point": points[-1]["id"] if points else None,
            "damaged_points": [p["id"] for p in points if p["damaged"]],
            "last_error": row["last_error"],
            "failed_attempts": row["attempts"],
            "next_retry": row["next_retry"],
            "test_failover": row["test_dir"],
            "test_point": row["test_point"],
            "test_method": row["test_method"],
            "failover_point": row["failover_point"],
            "operation": self.operation(name),
        }

    # -- the operation running on an item ------------------------------------------
    def begin(self, name, operation, command, args=None, **fields):
        """Record, with the state changes `fields` and in one transaction,
        that `operation` runs on item `name`, and the command that finishes
        it when it is interrupted. An operation already recorded (the one
        this is part of: a failover's final cycle) stays."""
        import json

        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.item(name)
            if row["operation"] is None:
                fields.update(operation=operation, operation_command=command,
                              operation_args=json.dumps(args or {}))
            if fields:
                self.set_item(name, **fields)

    def end(self, name, operation, **fields):
        """The state changes `fields` and, if `operation` (a name or a tuple
        of names) is the one recorded, its end, in one transaction."""
        ops = (operation,) if isinstance(operation, str) else operation
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if self.item(name)["operation"] in ops:
                fields.update(operation=None, operation_command=None, operation_args=None)
            if fields:
                self.set_item(name, **fields)

    def pending(self, name, operation):
        """The arguments (dict) of `operation` if it is recorded on `name`
        (an interrupted run of it), else None."""
        import json

        row = self.item(name)
        if row["operation"] != operation:
            return None
        return json.loads(row["operation_args"] or "{}")

    def operation(self, name):
        """The operation recorded on an item: {"name", "command",
        "interrupted"} (interrupted: no process is running it), or None."""
        row = self.item(name)
        if row["operation"] is None:
            return None
        if self.writer:  # this process runs it, unless it was there when we opened
            interrupted = self.interrupted.get(name) == row["operation"]
        else:
            interrupted = not self.locked_by_another()
        return {"name": row["operation"], "command": row["operation_command"],
                "interrupted": interrupted}

    # -- points and steps --------------------------------------------------------
    def points(self, name):
        self.item(name)
        return [dict(r) for r in self.db.execute(
            "SELECT id, created, consistency, bytes, cut, damaged FROM points WHERE item=? ORDER BY id",
            (name,))]

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

    def vault_id(self):
        """This vault's identity, which its replicas record as their owner."""
        return self.db.execute("SELECT value FROM meta WHERE key='vault_id'").fetchone()[0]

    def point(self, name, point_id):
        row = self.db.execute("SELECT * FROM points WHERE item=? AND id=?",
                              (name, point_id)).fetchone()
        if row is None:
            raise UnknownName(f"item {name!r} has no recovery point {point_id}", path=self.dir)
        return row

    def current_step(self, name, idx):
        """The latest undo step of a disk, or 0 (only the initial copy)."""
        row = self.db.execute("SELECT MAX(step) FROM steps WHERE item=? AND idx=?",
                              (name, idx)).fetchone()
        return row[0] or 0

    def endpoint(self, name, spec):
        """The endpoint of a disk (or a directory) of item `name`, reached as
        the item says (its --rsh and --remote-pydr)."""
        from ..endpoints import open_endpoint

        row = self.item(name)
        return open_endpoint(spec, rsh=row["rsh"], remote_pydr=row["remote_pydr"])

    def cache_path(self, name, idx):
        return os.path.join(self.dir, "cache", name, f"{idx}.sig")

    # -- jobs --------------------------------------------------------------------
    def start_job(self, kind, item, state="running"):
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
            self.end_job(job, "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed",
                         error=str(exc))
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
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*fields.values(), job_id))

    def end_job(self, job_id, state, error=None, bytes_transferred=None):
        fields = {"state": state, "ended": time.time(), "error": error}
        if state == "succeeded":
            fields["progress"] = 1.0
        if bytes_transferred is not None:
            fields["bytes_transferred"] = bytes_transferred
        self.update_job(job_id, **fields)

    def jobs(self):
        return [dict(r) for r in self.db.execute(
            "SELECT id, kind, item, state, progress, bytes_transferred, started, ended, error, "
            "method, host FROM jobs ORDER BY id")]


# the options whose value is a hook's command line (which may hold a password)
HOOK_OPTIONS = ("--quiesce-hook", "--thaw-hook", "--shutdown-hook", "--pre-hook", "--post-hook")
HIDDEN = "<hook set>"


def redact_argv(argv):
    """`argv` with the command line of every hook option replaced by
    HIDDEN ("--quiesce-hook CMD" and "--quiesce-hook=CMD")."""
    out, hide_next = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if len(name) > 3 and name.startswith("--"):  # an abbreviation names its option
            name = next((o for o in HOOK_OPTIONS if o.startswith(name)), name)
            arg = name if "=" not in arg else f"{name}={arg.split('=', 1)[1]}"
        if hide_next:
            out.append(HIDDEN)
            hide_next = False
        elif arg in HOOK_OPTIONS:
            out.append(arg)
            hide_next = True
        elif name in HOOK_OPTIONS:
            out.append(f"{name}={HIDDEN}")
        else:
            out.append(arg)
    return out


def _command_line():
    import sys

    argv = redact_argv(sys.argv)  # the lock file is shown to a refused command
    if argv and os.path.basename(argv[0]) == "pydr":
        argv[0] = "pydr"
    return " ".join(argv)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

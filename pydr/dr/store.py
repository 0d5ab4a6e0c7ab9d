"""The vault's store: pydr's replication state, a directory holding a SQLite
database. It records items, disks, steps, points, jobs and plans, answers
with typed records (pydr.dr.store_records) and knows no workflow:
replication, failover and plans (pydr.dr) change it through this class,
and pydr.dr.vault.Vault puts them together for callers. No SQL lives
outside the store's modules:

    store            Store: opening (schema check, migration), the lock, transactions
    store_lock       vault.lock: one changing command at a time, naming its holder
    store_recovery   what a killed command left, set right by the next writer
    store_items      the items and disks tables, the operation running on an item
    store_points     the steps, points and point_disks tables
    store_jobs       the jobs and plans tables
    store_indexes    the object_indexes table: point indexes in object stores
    store_machines   machines (libvirt domains), point XML, defined domains, verifications
    store_endpoints  an item's disks as endpoints, the vault's files of a disk
    store_records    the typed records the tables answer
    schema           the tables, their migrations, an empty vault

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

from __future__ import annotations

import contextlib
import os
import sqlite3
from typing import TypeVar

from ..errors import (CorruptDelta, HookFailed, InvalidArgument,  # noqa: F401  (re-exported)
                      InvalidState, UnknownName, VaultError)
from . import arguments, dberrors, store_lock
from .schema import (DB_NAME, SCHEMA_VERSION, connect as _connect, init_vault,  # noqa: F401
                     migrate as _migrate, tighten_vault)
from .store_endpoints import ItemEndpoints
from .store_indexes import IndexTables
from .store_items import ItemTables
from .store_jobs import JobTables
from .store_machines import MachineTables
from .store_lock import HIDDEN, HOOK_OPTIONS, LOCK_NAME, redact_argv  # noqa: F401  (re-exported)
from .store_points import PointTables
from .store_policies import PolicyTables
from .store_recovery import recover

_S = TypeVar("_S", bound="Store")
STATES = ("protecting", "protected", "resync-required")
HEALTH = ("ok", "warning", "critical")


class Store(ItemTables, PointTables, IndexTables, JobTables, ItemEndpoints, PolicyTables,
            MachineTables):
    """An open vault. Use as a context manager.

    Args:
        directory: the vault's directory (a str or os.PathLike), made by
            :func:`init_vault` (``pydr vault init DIR``).
        writer: take the vault's lock: one changing command at a time, in
            every process (a second writer, also another Store of this
            process, is refused); readers never take it and never wait.
            A writer first sets right what a killed command left
            (pydr.dr.store_recovery).
        lock_timeout: for a writer, None or 0 refuses at once when another
            holds the lock; a number of seconds waits up to that long. A
            reader takes no lock: giving it one is InvalidArgument.

    The thread rule: a Store (a pydr.Vault) is used only from the thread
    that opened it; open one Vault per thread (readers never wait, and
    opening is cheap). Another thread's use raises
    :class:`pydr.errors.WrongThread` naming the vault and both threads.

    Raises:
        InvalidArgument: `directory` is not a path, or `lock_timeout` is
            not None or a number of seconds >= 0, or is given to a reader.
        VaultError: not a vault (no vault.db), a vault of a schema version
            this pydr does not know, or (a writer) the lock is held by
            another process or another Store of this one, past
            `lock_timeout`: the message names the holder.
        VaultDamaged: the database is damaged.
    """

    def __init__(self, directory: str | os.PathLike[str], *, writer: bool = False,
                 lock_timeout: float | None = None) -> None:
        self.dir = arguments.directory(directory, "the vault's directory")
        store_lock.check_timeout(lock_timeout)
        if lock_timeout is not None and not writer:
            raise InvalidArgument(f"lock_timeout={lock_timeout!r} is for a writer: a reader "
                                  "takes no lock and never waits (give writer=True)")
        path = os.path.join(self.dir, DB_NAME)
        if not os.path.isfile(path):
            raise VaultError("not a pydr vault (no vault.db)", path=self.dir,
                             hint=f"create one with 'pydr vault init {self.dir}'")
        self.lock_fd = None
        self.writer = writer
        # encrypted object stores (pydr.dr.objectstore.chunk_store): the passphrase the
        # caller gave (None: from the environment, when a store needs one), and the data
        # keys of the stores unlocked so far; never written anywhere
        self.passphrase: bytes | None = None
        self.unlocked: dict[str, object] = {}
        # stores opened from their versions after their config or keys were tampered
        # with (pydr.dr.storeversions.Tampering, by spec): verify reports, a cycle repairs
        self.tampered_stores: dict[str, object] = {}
        self.interrupted = {}  # {item: operation} running when the last writer died
        if writer:
            self.lock_fd = store_lock.take(self.dir, lock_timeout)
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
            self.interrupted = recover(self)

    def locked_by_another(self):
        """Whether another process holds the vault's lock now."""
        if self.lock_fd is not None:
            return False
        return store_lock.held_by_another(self.dir)

    def close(self) -> None:
        """Close the database and let go of the lock (a writer's). Closing
        twice is no error.

        Raises:
            WrongThread: called from a thread other than the opener's; the
                vault stays open and its lock held (another thread's close
                must not let a second writer in while the owner writes).
        """
        db = getattr(self, "db", None)  # None when opening failed before the connection
        if db is not None:
            dberrors.check_thread_only(db)  # WrongThread, before anything is let go
            with contextlib.suppress(sqlite3.Error):
                db.close()
        if self.lock_fd is not None:
            store_lock.release(self.lock_fd)
            self.lock_fd = None

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self):
        """One write transaction (BEGIN IMMEDIATE): the store's changes made
        inside it are committed together, or none is (an exception rolls
        them back)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            yield self

    def integrity_check(self):
        """SQLite's integrity_check: [] when the database is sound, else its findings."""
        rows = [r[0] for r in self.db.execute("PRAGMA integrity_check")]
        return [] if rows == ["ok"] else rows

    def has_meta(self, key):
        """Whether the meta table has `key` (a mark a migration left)."""
        return self.db.execute("SELECT 1 FROM meta WHERE key=?", (key,)).fetchone() is not None

    def drop_meta(self, key):
        """Forget meta `key` (its own transaction)."""
        with self.transaction():
            self.db.execute("DELETE FROM meta WHERE key=?", (key,))

    def plan_names(self):
        """The names of the recovery plans, sorted."""
        return [r["name"] for r in self.db.execute("SELECT name FROM plans ORDER BY name")]

    def vault_id(self):
        """This vault's identity, which its replicas record as their owner."""
        return self.db.execute("SELECT value FROM meta WHERE key='vault_id'").fetchone()[0]

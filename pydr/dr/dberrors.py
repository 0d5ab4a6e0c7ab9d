"""The vault database's failures as pydr's errors, wherever a query meets
them: SQLite reports damage it finds in a page only when a query reads that
page, so every statement and every fetch is covered, not only the opening.

* damage (SQLITE_CORRUPT, SQLITE_NOTADB, a missing table, ...):
  :class:`pydr.errors.VaultDamaged` naming the database (exit 14);
* a full disk (SQLITE_FULL, or an I/O error on a file system with no room
  left): ``OSError(ENOSPC)`` naming it (exit 6), never "damaged": nothing
  is wrong with the vault, it needs room;
* an I/O error: ``OSError(EIO)``; a read-only database: ``OSError(EROFS)``;
  another process holding it too long: :class:`pydr.errors.VaultError`.

Misuse of the sqlite3 module by pydr (a ProgrammingError, an SQL syntax
error) is a bug, and stays one -- except the one misuse a caller makes: a
connection used from a thread other than the one that opened it, which is
:class:`pydr.errors.WrongThread` naming the vault and both threads (checked
here, before SQLite's own check, for every statement, fetch and commit).
"""

import contextlib
import errno
import os
import sqlite3
import threading

from ..errors import VaultDamaged, VaultError, WrongThread

# SQLite's primary result codes (the low byte of an extended code)
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 8, 10, 11, 13, 14, 26


def translate(exc, path):
    """The pydr error for sqlite3 error `exc` on the database `path`, or
    None when it is a bug in pydr rather than a fact about the database."""
    if isinstance(exc, (sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return None
    if not isinstance(exc, sqlite3.DatabaseError) or "syntax error" in str(exc):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == _FULL or (primary == _IOERR and _full(path)):
        # SQLite says "disk I/O error" where growing its -shm file failed
        return OSError(errno.ENOSPC, f"no space left for the vault's database ({exc})", path)
    if primary == _IOERR:
        return OSError(errno.EIO, f"I/O error on the vault's database ({exc})", path)
    if primary == _READONLY:
        return OSError(errno.EROFS, f"the vault's database cannot be written ({exc})", path)
    if primary in (_BUSY, _LOCKED):
        return VaultError(f"the vault's database is busy ({exc})", path=path,
                          hint="run the command again")
    if primary == _CANTOPEN:
        return VaultError(f"the vault's database cannot be opened ({exc})", path=path)
    return VaultDamaged(f"the vault's database is damaged: {exc}", path=path)


def _full(path):
    """Whether the file system holding `path` has no room left."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return st.f_bavail == 0 or (st.f_files and st.f_favail == 0)


def check_thread(db):
    """WrongThread unless the calling thread is the one that opened `db`
    (a VaultConnection): SQLite connections, and so vaults, belong to the
    thread that opened them. Then VaultError when `db` was closed: a
    Vault used after close() (SQLite's own answer is a ProgrammingError)."""
    if threading.get_ident() == db.opener_id:
        if db.is_closed:
            vault = os.path.dirname(db.path) if db.path else None
            raise VaultError("the vault is closed: it was used after close()", path=vault,
                             hint="open it again (pydr.Vault(...))")
        return
    here = threading.current_thread()
    vault = os.path.dirname(db.path) if db.path else None
    raise WrongThread(f"the vault was opened in thread {db.opener_name!r} (id {db.opener_id}) "
                      f"and used in thread {here.name!r} (id {here.ident})", path=vault,
                      hint="open a Vault of its own in each thread (readers never wait)")


def check_thread_only(db):
    """check_thread without the closed check (closing twice is no error)."""
    if threading.get_ident() != db.opener_id:
        check_thread(db)


@contextlib.contextmanager
def _translated(db):
    check_thread(db)
    try:
        yield
    except sqlite3.Error as exc:
        mine = translate(exc, db.path)
        if mine is None:
            raise
        raise mine from exc


class VaultCursor(sqlite3.Cursor):
    """A cursor whose statements and fetches raise pydr's errors."""

    def execute(self, *args):
        with _translated(self.connection):
            return super().execute(*args)

    def executemany(self, *args):
        with _translated(self.connection):
            return super().executemany(*args)

    def executescript(self, *args):
        with _translated(self.connection):
            return super().executescript(*args)

    def fetchone(self):
        with _translated(self.connection):
            return super().fetchone()

    def fetchmany(self, *args):
        with _translated(self.connection):
            return super().fetchmany(*args)

    def fetchall(self):
        with _translated(self.connection):
            return super().fetchall()

    def __next__(self):
        with _translated(self.connection):
            return super().__next__()


class VaultConnection(sqlite3.Connection):
    """The vault's database (sqlite3.connect(..., factory=VaultConnection)):
    its shortcuts use VaultCursor, a commit on a full disk says so, and a
    use from a thread other than its opener's is WrongThread."""

    path = None  # the database file, named by the errors (set by connect)
    is_closed = False  # set by close(): a later use is VaultError, not a ProgrammingError

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        opener = threading.current_thread()
        self.opener_id, self.opener_name = opener.ident, opener.name

    def close(self):
        """Close the database; only its opener's thread may (WrongThread).
        Closing twice is no error."""
        check_thread_only(self)
        super().close()
        self.is_closed = True

    def cursor(self, factory=VaultCursor):
        check_thread(self)
        return super().cursor(factory)

    def execute(self, *args):
        return self.cursor().execute(*args)

    def executemany(self, *args):
        return self.cursor().executemany(*args)

    def executescript(self, *args):
        return self.cursor().executescript(*args)

    def commit(self):
        with _translated(self):
            super().commit()

    def rollback(self):
        check_thread(self)
        super().rollback()

    def __enter__(self):
        check_thread(self)
        return super().__enter__()

    def __exit__(self, *exc):
        with _translated(self):
            return super().__exit__(*exc)

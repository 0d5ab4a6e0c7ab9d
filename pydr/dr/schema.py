"""The vault database's schema: its tables, the migrations from every older
version, and the creation of an empty vault (pydr.dr.store reads and writes
the tables; docs/VAULT.md describes them)."""

import contextlib
import os
import secrets
import sqlite3
import stat

from ..errors import VaultError
from . import arguments
from .dberrors import VaultConnection

SCHEMA_VERSION = 13  # 2: remote replicas; 3: operations; 4: changed-block tracking;
# 5: how a job made disks (reflink, qcow2, copy); 6: the host of an item and of a job (fleets);
# 7: the point indexes of replicas in object stores; 8: damaged points, the vault's identity,
# the digest of each step; 9: the time of each point's cut, an item's last successful cycle;
# 10: the granularity of a tracked disk's dirty bitmaps; 11: protection policies (pydr run),
# the RPO health last recorded, the alerts log, files to remove once their rows are gone;
# 12: object stores' identities and encryption, index versions and locks, lock policies;
# 13: machines (libvirt domains, bring-up hooks), each point's domain XML, verifications
DB_NAME = "vault.db"

_MACHINE_TABLES = """
CREATE TABLE machines(
    item TEXT PRIMARY KEY REFERENCES items(name) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    uri TEXT,
    domain TEXT,
    uuid TEXT,
    agent INTEGER NOT NULL DEFAULT 0,
    bring_up_hook TEXT,
    recovery_uri TEXT,
    network_map TEXT,
    drill_network TEXT,
    probes TEXT
);
CREATE TABLE point_machines(
    id INTEGER NOT NULL,
    item TEXT NOT NULL,
    xml TEXT NOT NULL,
    frozen INTEGER NOT NULL DEFAULT 0,
    checkpoint TEXT,
    PRIMARY KEY(id, item)
);
CREATE TABLE machine_domains(
    item TEXT NOT NULL,
    role TEXT NOT NULL,
    uri TEXT,
    name TEXT NOT NULL,
    uuid TEXT NOT NULL,
    point INTEGER,
    console TEXT,
    defined REAL NOT NULL,
    PRIMARY KEY(item, role)
);
CREATE TABLE verifications(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item TEXT NOT NULL,
    point INTEGER NOT NULL,
    kind TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL NOT NULL,
    passed INTEGER NOT NULL,
    rto REAL,
    probes TEXT NOT NULL,
    error TEXT
);
"""

_SCHEMA = """
CREATE TABLE items(
    name TEXT PRIMARY KEY,
    grp TEXT,
    state TEXT NOT NULL,
    direction TEXT NOT NULL,
    health TEXT NOT NULL,
    retention INTEGER NOT NULL,
    quiesce_hook TEXT,
    thaw_hook TEXT,
    created REAL NOT NULL,
    last_error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_retry REAL,
    retention_age REAL,
    test_dir TEXT,
    failover_point INTEGER,
    rsh TEXT,
    remote_pydr TEXT,
    operation TEXT,
    operation_command TEXT,
    operation_args TEXT,
    test_point INTEGER,
    test_method TEXT,
    host TEXT,
    failover_dir TEXT,
    last_success_at REAL,
    rpo_health TEXT
);
CREATE TABLE disks(
    item TEXT NOT NULL REFERENCES items(name) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    source TEXT NOT NULL,
    replica TEXT NOT NULL,
    tracking TEXT,
    bitmap TEXT,
    generation INTEGER NOT NULL DEFAULT 0,
    granularity INTEGER,
    PRIMARY KEY(item, idx)
);
CREATE TABLE steps(
    item TEXT NOT NULL,
    idx INTEGER NOT NULL,
    step INTEGER NOT NULL,
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    digest TEXT,
    PRIMARY KEY(item, idx, step)
);
CREATE TABLE points(
    id INTEGER NOT NULL,
    item TEXT NOT NULL REFERENCES items(name) ON DELETE CASCADE,
    created REAL NOT NULL,
    consistency TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    cut TEXT NOT NULL,
    damaged TEXT,
    cut_at REAL,
    PRIMARY KEY(id, item)
);
CREATE TABLE point_disks(
    id INTEGER NOT NULL,
    item TEXT NOT NULL,
    idx INTEGER NOT NULL,
    step INTEGER NOT NULL,
    PRIMARY KEY(id, item, idx)
);
CREATE TABLE jobs(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    item TEXT,
    state TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    bytes_transferred INTEGER NOT NULL DEFAULT 0,
    started REAL,
    ended REAL,
    error TEXT,
    pid INTEGER,
    method TEXT,
    host TEXT
);
CREATE TABLE plans(
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE object_indexes(
    item TEXT NOT NULL,
    point INTEGER NOT NULL,
    store TEXT NOT NULL,
    key TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    version TEXT,
    retain_until REAL,
    digest TEXT,
    PRIMARY KEY(item, point)
);
CREATE TABLE object_stores(
    store TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    encryption TEXT NOT NULL,
    key_check TEXT,
    created REAL
);
CREATE TABLE policies(
    scope TEXT NOT NULL,
    name TEXT NOT NULL,
    target_rpo REAL,
    rpo_critical REAL,
    app_consistent_every REAL,
    keep TEXT,
    bwlimit INTEGER,
    bwlimit_windows TEXT,
    priority INTEGER,
    alert_commands TEXT,
    lock_days REAL,
    lock_mode TEXT,
    PRIMARY KEY(scope, name)
);
CREATE TABLE alerts(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    item TEXT NOT NULL,
    old TEXT,
    new TEXT NOT NULL,
    rpo_seconds REAL,
    target_rpo REAL,
    message TEXT NOT NULL
);
CREATE TABLE doomed_files(
    item TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY(item, path)
);
""" + _MACHINE_TABLES + """CREATE TABLE counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters VALUES ('point', 0);
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def connect(path):
    """The vault's database, in WAL mode with full syncs. SQLite makes its
    -wal and -shm files with the database's mode: 0600."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None, factory=VaultConnection)
    db.path = path  # named by its errors (pydr.dr.dberrors)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def _new_vault_id(db):
    """A vault's identity: drawn for each vault as it is made or migrated."""
    db.execute("INSERT INTO meta VALUES ('vault_id', ?)", (secrets.token_hex(16),))


_MIGRATIONS = {
    # 2: how to reach an item's remote replicas
    1: ("ALTER TABLE items ADD COLUMN rsh TEXT", "ALTER TABLE items ADD COLUMN remote_pydr TEXT"),
    # 3: the operation running on an item (so that a killed one is finished by
    # running its command again), and the point of a test failover
    2: ("ALTER TABLE items ADD COLUMN operation TEXT",
        "ALTER TABLE items ADD COLUMN operation_command TEXT",
        "ALTER TABLE items ADD COLUMN operation_args TEXT",
        "ALTER TABLE items ADD COLUMN test_point INTEGER"),
    # 4: changed-block tracking of a disk (its kind, its current dirty bitmap)
    3: ("ALTER TABLE disks ADD COLUMN tracking TEXT",
        "ALTER TABLE disks ADD COLUMN bitmap TEXT",
        "ALTER TABLE disks ADD COLUMN generation INTEGER NOT NULL DEFAULT 0"),
    # 5: how a materialising job made its disks
    4: ("ALTER TABLE jobs ADD COLUMN method TEXT",
        "ALTER TABLE items ADD COLUMN test_method TEXT"),
    # 6: the host that holds an item's sources, and the host that ran a job
    5: ("ALTER TABLE items ADD COLUMN host TEXT",
        "ALTER TABLE jobs ADD COLUMN host TEXT"),
    # 7: which point index in an object store belongs to which point
    6: ("CREATE TABLE object_indexes(item TEXT NOT NULL, point INTEGER NOT NULL, "
        "store TEXT NOT NULL, key TEXT NOT NULL, bytes INTEGER NOT NULL, "
        "PRIMARY KEY(item, point))",
        "ALTER TABLE items ADD COLUMN failover_dir TEXT"),
    # 8: why a point can no longer be restored (NULL: it can), and the vault's
    # identity, which its replicas record as their owner, and the digest of each
    # step (pydr.dr.stepdigest; NULL for steps recorded before, or on other hosts)
    7: ("ALTER TABLE points ADD COLUMN damaged TEXT",
        "ALTER TABLE steps ADD COLUMN digest TEXT",
        "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        _new_vault_id,
        # its items have points and no identity records yet: trusted until recorded
        "INSERT INTO meta SELECT 'adopt-identity:' || name, 'schema 7' FROM items"),
    # 9: when each point's cut was taken (the time of its data, pydr.dr.rpo; NULL
    # for the points made before, which read as their `created`), and when an
    # item's last cycle that made a point ended (its newest point's, until the
    # next); a point whose disks were read as they changed is not crash-consistent,
    # nor is one of several disks, each cut on its own (pydr.dr.rpo.consistency_of):
    # its item's disks, or its group's members' (a group's items in one call share
    # the point id; an --all call's items do too, but those are not of one group)
    8: ("ALTER TABLE points ADD COLUMN cut_at REAL",
        "ALTER TABLE items ADD COLUMN last_success_at REAL",
        "UPDATE points SET consistency = 'inconsistent' "
        "WHERE cut = 'none' AND consistency = 'crash-consistent'",
        "UPDATE points SET consistency = 'disk-consistent' "
        "WHERE consistency = 'crash-consistent' AND ("
        " (SELECT COUNT(*) FROM disks WHERE disks.item = points.item) > 1"
        " OR EXISTS (SELECT 1 FROM points AS other"
        "  JOIN items AS mine ON mine.name = points.item"
        "  JOIN items AS theirs ON theirs.name = other.item"
        "  WHERE other.id = points.id AND other.item <> points.item"
        "  AND mine.grp IS NOT NULL AND theirs.grp = mine.grp))",
        "UPDATE items SET last_success_at = "
        "(SELECT MAX(created) FROM points WHERE points.item = items.name)"),
    # 10: the bytes per bit of a tracked disk's dirty bitmaps (pydr.dr.tracking); NULL,
    # as for the disks tracked before, is the default (4 KiB): their bitmaps, added at
    # QEMU's 64 KiB, keep working and are replaced at that granularity by the next cut
    9: ("ALTER TABLE disks ADD COLUMN granularity INTEGER",),
    # 11: protection policies of items and groups (pydr.dr.policy: what pydr run keeps them
    # at), the RPO health pydr run last recorded for an item (its transitions are alerts),
    # the alerts log, and files to remove once the rows naming them are gone (a merged
    # undo step's old files: pydr.dr.stepmerge)
    10: ("ALTER TABLE items ADD COLUMN rpo_health TEXT",
         "CREATE TABLE policies(scope TEXT NOT NULL, name TEXT NOT NULL, target_rpo REAL, "
         "rpo_critical REAL, app_consistent_every REAL, keep TEXT, bwlimit INTEGER, "
         "bwlimit_windows TEXT, priority INTEGER, alert_commands TEXT, "
         "PRIMARY KEY(scope, name))",
         "CREATE TABLE alerts(id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, "
         "item TEXT NOT NULL, old TEXT, new TEXT NOT NULL, rpo_seconds REAL, target_rpo REAL, "
         "message TEXT NOT NULL)",
         "CREATE TABLE doomed_files(item TEXT NOT NULL, path TEXT NOT NULL, "
         "PRIMARY KEY(item, path))"),
    # 12: each object store's identity and encryption as first seen (a config that later
    # disagrees is tampering), the S3 version and lock of each point index, and how long
    # an item's or group's points are locked (S3 Object Lock)
    11: ("CREATE TABLE IF NOT EXISTS object_stores(store TEXT PRIMARY KEY, id TEXT NOT NULL, "
         "encryption TEXT NOT NULL, created REAL)",
         lambda db: _add_columns(db, "object_stores", "key_check TEXT"),
         lambda db: _add_columns(db, "object_indexes", "version TEXT", "retain_until REAL",
                                 "digest TEXT"),
         lambda db: _add_columns(db, "policies", "lock_days REAL", "lock_mode TEXT")),
    # 13: machines: an item that is a libvirt domain (its connection, name, UUID, whether it
    # has a guest agent) or that a hook brings up; the domain XML and freeze of each point;
    # the domains pydr defined at the recovery site (failover, drill) and the verifications
    # of recovered machines (pydr.dr.machines, pydr.dr.bringup, pydr.dr.probes)
    12: tuple("CREATE TABLE IF NOT EXISTS " + t.split("CREATE TABLE ", 1)[1]
              for t in _MACHINE_TABLES.strip().split(";") if t.strip()),
}


def _add_columns(db, table, *columns):
    """ALTER TABLE ADD COLUMN each of `columns` ("NAME TYPE") the table lacks
    (a vault that an older step made with today's CREATE TABLE has them)."""
    have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
    for column in columns:
        if column.split()[0] not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")


def migrate(db, version):
    """Bring an older vault up to SCHEMA_VERSION, one transaction a step."""
    while version in _MIGRATIONS:
        with db:
            db.execute("BEGIN IMMEDIATE")
            if db.execute("PRAGMA user_version").fetchone()[0] == version:  # not done meanwhile
                for statement in _MIGRATIONS[version]:
                    statement(db) if callable(statement) else db.execute(statement)
                db.execute(f"PRAGMA user_version={version + 1}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
    return version


def tighten_vault(directory):
    """Make a vault made before vaults were private (or opened up since)
    private again: its directory, undo/, cache/, objects/ and their item
    directories 0700, vault.db, its WAL files and the lock 0600. Done by
    every command that changes the vault; the files in the item directories
    are not walked (0700 directories keep them from others, and pydr writes
    new ones 0600). A vault this user does not own is left as it is."""
    directory = os.fspath(directory)
    wanted = [(directory, 0o700)]
    for sub in ("undo", "cache", "objects"):  # and their per-item directories
        top = os.path.join(directory, sub)
        wanted.append((top, 0o700))
        with contextlib.suppress(OSError):
            wanted += [(e.path, 0o700) for e in os.scandir(top) if e.is_dir(follow_symlinks=False)]
    wanted += [(os.path.join(directory, name), 0o600)
               for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", "vault.lock")]
    for path, mode in wanted:
        try:
            st = os.stat(path, follow_symlinks=False)
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & ~mode \
                    and not stat.S_ISLNK(st.st_mode):
                os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
        except (FileNotFoundError, PermissionError):
            pass


def init_vault(directory):
    """Create an empty vault in `directory` (created if missing). The vault
    holds hook command lines and the history of private disks: its directory
    is 0700 and its files 0600, whatever the umask."""
    directory = arguments.directory(directory, "the vault's directory")  # InvalidArgument
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    path = os.path.join(directory, DB_NAME)
    if os.path.exists(path):
        raise VaultError("a vault already exists here", path=directory)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    db = connect(path)
    try:
        with db:
            db.execute("BEGIN")
            db.executescript(_SCHEMA)
            _new_vault_id(db)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    finally:
        db.close()
    for sub in ("undo", "cache"):
        os.makedirs(os.path.join(directory, sub), mode=0o700, exist_ok=True)
    return directory



"""The rows the vault's store answers, as small typed records: one class a
table, its attributes named like the table's columns (docs/VAULT.md), read
only. The store reads them by column name, so a vault whose columns were
added by migrations (in another order) gives the same records.

The bridge while callers move from sqlite3.Row and dicts to attributes:
a record is also a read-only dict of its columns (``r["name"]``,
``r.get("name")``, ``"name" in r``, ``r.items()``, ``json.dumps(r)``);
``to_dict()`` is a plain, writable copy.
"""


class Record(dict):
    """A read-only row; subclasses name their columns in ``__slots__``.

    It is also a read-only dict of those columns, as the dicts the store
    answered before (``json.dumps``, ``"id" in r``, ``r.items()``, ``dict(r)``
    and ``r == dict(r)`` keep working); any change raises."""

    __slots__ = ()

    def __init__(self, *values, **named):
        if len(values) > len(self.__slots__):
            raise TypeError(f"{type(self).__name__} has {len(self.__slots__)} columns, "
                            f"not {len(values)}")
        given = dict(zip(self.__slots__, values))
        twice = set(given) & set(named)
        unknown = set(named) - set(self.__slots__)
        if twice or unknown:
            raise TypeError(f"{type(self).__name__}: "
                            + (f"{sorted(twice)} given twice" if twice else
                               f"no column {sorted(unknown)}"))
        given.update(named)
        missing = [c for c in self.__slots__ if c not in given]
        if missing:
            raise TypeError(f"{type(self).__name__}: missing {missing}")
        super().__init__((c, given[c]) for c in self.__slots__)
        for column in self.__slots__:
            object.__setattr__(self, column, given[column])

    @classmethod
    def columns(cls):
        """The column list of a SELECT that reads this record."""
        return ", ".join(cls.__slots__)

    @classmethod
    def from_row(cls, row):
        """The record of a sqlite3.Row (read by column name)."""
        return cls(*(row[c] for c in cls.__slots__))

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only: the store changes rows")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is read-only: the store changes rows")

    def _read_only(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is read-only: the store changes rows")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _read_only
    __ior__ = _read_only

    def _values(self):
        return tuple(getattr(self, c) for c in self.__slots__)

    def __getitem__(self, column):
        if not isinstance(column, str) or column not in self.__slots__:
            raise KeyError(column)
        return getattr(self, column)

    def keys(self):
        return list(self.__slots__)

    def get(self, column, default=None):
        return getattr(self, column) if column in self.__slots__ else default

    def to_dict(self):
        return dict(zip(self.__slots__, self._values()))

    def __eq__(self, other):
        if isinstance(other, Record):
            return type(self) is type(other) and self._values() == other._values()
        return dict.__eq__(self, other)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((type(self), self._values()))

    def __reduce__(self):
        return type(self), self._values()

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        fields = ", ".join(f"{c}={v!r}" for c, v in zip(self.__slots__, self._values()))
        return f"{type(self).__name__}({fields})"


def assignments(record, fields, table):
    """The SET clause ("a=?, b=?") of an UPDATE of `fields` in `table`, each
    a column of `record` (names come from code, never from input: one that
    is not a column is a bug)."""
    unknown = set(fields) - set(record.__slots__)
    if unknown:
        raise TypeError(f"no column {', '.join(sorted(unknown))} in table {table}")
    return ", ".join(f"{k}=?" for k in fields)


class ItemRecord(Record):
    """A protected item (the items table). ``grp`` is its group;
    ``last_success_at`` when its last cycle that made a point ended (epoch
    seconds, None before its first; kept when a commit drops its points)."""

    __slots__ = ("name", "grp", "state", "direction", "health", "retention", "quiesce_hook",
                 "thaw_hook", "created", "last_error", "attempts", "next_retry",
                 "retention_age", "test_dir", "failover_point", "rsh", "remote_pydr",
                 "operation", "operation_command", "operation_args", "test_point",
                 "test_method", "host", "failover_dir", "last_success_at", "rpo_health")


class DiskRecord(Record):
    """Disk `idx` of an item: its source, replica and tracking (the disks
    table); ``granularity``: bytes per bit of its dirty bitmaps, None for the
    default (pydr.dr.tracking.DEFAULT_GRANULARITY)."""

    __slots__ = ("item", "idx", "source", "replica", "tracking", "bitmap", "generation",
                 "granularity")


class StepRecord(Record):
    """Undo step `step` of disk `idx` of an item: its file (a path, or
    host:path), its size and digest (the steps table)."""

    __slots__ = ("item", "idx", "step", "path", "bytes", "digest")


class PointRecord(Record):
    """A recovery point of an item (the points table); `damaged`: why it
    can no longer be restored, or None. ``created`` is when the point was
    recorded (the end of its cycle); ``cut_at`` when its cut was taken (the
    time of its data, epoch seconds), None for a point made before schema 9:
    ``data_time`` reads it as ``created`` then."""

    __slots__ = ("id", "item", "created", "consistency", "bytes", "cut", "damaged", "cut_at")

    @property
    def data_time(self):
        """The time of the point's data: its cut, or (a point made before
        the cut was recorded) when it was recorded, a later time."""
        return self.created if self.cut_at is None else self.cut_at


class PointDiskRecord(Record):
    """The step disk `idx` of an item was at in point `id` (the point_disks table)."""

    __slots__ = ("id", "item", "idx", "step")


class JobRecord(Record):
    """A job: a command's work on an item (the jobs table)."""

    __slots__ = ("id", "kind", "item", "state", "progress", "bytes_transferred", "started",
                 "ended", "error", "pid", "method", "host")


class PlanRecord(Record):
    """A recovery plan; `definition` is its list of groups ({"items", "pre", "post"})."""

    __slots__ = ("name", "definition", "created")


class IndexRecord(Record):
    """The point index in an object store of point `point` of an item: the
    store's spec, the index's key and the bytes the cycle sent (the
    object_indexes table); its S3 ``version`` (None in an unversioned
    bucket), ``retain_until`` (POSIX seconds; None when not locked) and
    ``digest`` (hex SHA-256 of the object as stored; None for an index
    recorded before digests: every read of the index is checked against it)."""

    __slots__ = ("item", "point", "store", "key", "bytes", "version", "retain_until", "digest")


class ObjectStoreRecord(Record):
    """An object store as the vault first saw it (the object_stores table):
    its spec (s3://BUCKET/PREFIX), the id in its config, and its encryption
    ("aes-256-gcm", or "none"), and ``key_check``: a value only its master
    key gives (pydr.dr.storekeys; None when unencrypted or not yet known)."""

    __slots__ = ("store", "id", "encryption", "created", "key_check")


class PolicyRecord(Record):
    """The protection policy of an item or a group as stored (the policies
    table): each field None where it is not set (pydr.dr.policy resolves
    item over group over default). ``keep``, ``bwlimit_windows`` and
    ``alert_commands`` are JSON text."""

    __slots__ = ("scope", "name", "target_rpo", "rpo_critical", "app_consistent_every", "keep",
                 "bwlimit", "bwlimit_windows", "priority", "alert_commands", "lock_days",
                 "lock_mode")


class AlertRecord(Record):
    """A change of an item's RPO health that pydr run recorded (the alerts table)."""

    __slots__ = ("id", "at", "item", "old", "new", "rpo_seconds", "target_rpo", "message")


class MachineRecord(Record):
    """What an item's disks belong to (the machines table): ``kind``
    "libvirt" (a libvirt domain: its connection ``uri``, None for libvirt's
    default, its ``domain`` name and ``uuid`` at the protected site, and
    ``agent``: whether it has a qemu-guest-agent channel) or "hook" (a
    ``bring_up_hook`` command brings it up). ``recovery_uri``: where bring-up
    defines the domain (None: ``uri``); ``network_map``: JSON {source network:
    recovery network}; ``drill_network``: the network drill machines join
    (None: none); ``probes``: JSON, the verification probes (pydr.dr.probes)."""

    __slots__ = ("item", "kind", "uri", "domain", "uuid", "agent", "bring_up_hook",
                 "recovery_uri", "network_map", "drill_network", "probes")


class PointMachineRecord(Record):
    """The machine of point `id` of an item (the point_machines table): its
    domain ``xml`` as it was at the cut (libvirt's inactive XML), whether the
    guest agent had its file systems ``frozen`` at the cut, and the libvirt
    ``checkpoint`` the cut created."""

    __slots__ = ("id", "item", "xml", "frozen", "checkpoint")


class MachineDomainRecord(Record):
    """A domain pydr defined at the recovery site (the machine_domains
    table): for item `item` in ``role`` "failover", "failback" or "drill",
    on connection ``uri``, its ``name`` and ``uuid`` (cleanup acts on that
    UUID only), the ``point`` it was made from, its serial ``console`` log
    file (the console probe reads it), when it was ``defined``."""

    __slots__ = ("item", "role", "uri", "name", "uuid", "point", "console", "defined")


class VerificationRecord(Record):
    """One verification of a recovered machine (the verifications table):
    item `item`'s point `point`, ``kind`` "drill" or "failover", ``started``
    (when the command began) and ``ended``, ``passed``, ``rto`` (seconds
    from the command's start to the last probe passing; None unless
    passed), ``probes`` (JSON list of {"probe", "passed", "seconds",
    "detail"}) and ``error`` (why it failed, None if it passed)."""

    __slots__ = ("id", "item", "point", "kind", "started", "ended", "passed", "rto", "probes",
                 "error")

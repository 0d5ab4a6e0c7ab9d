"""The vault as a caller sees it: the DR workflow as methods of one object,
each answering a result of pydr.dr.results, so that a higher-level tool
needs only ``pydr.Vault``.

    with pydr.Vault("/srv/vault", writer=True) as v:
        v.protect("web", [("/img/web.img", "/dr/web.img")])
        cycle = v.replicate("web")
        print(v.status("web").rpo_seconds)
        drill = v.test_failover("web", "/tmp/drill", point="latest-processed")

A Vault holds one open store (pydr.dr.store.Store: the SQLite database and
its lock); the workflow modules get that store, never the Vault, so the
results here are a presentation only. The store's own methods (items,
disks, the tables) are reachable on the Vault too, for tools that need the
raw records (at run time; a type checker knows the Vault's own methods
only: typed callers reach the store as ``v.store``).

Long operations take ``events`` (a callable given each pydr.dr.events.Event)
and ``cancel`` (a threading.Event: set, the operation stops as a kill
would; run it again to finish it). An exception from ``events`` is logged
(logger "pydr.events") and never fails the operation. Arguments are checked
before any work: a bad one is pydr.errors.InvalidArgument.
"""

from __future__ import annotations

import math
import os
import threading
from datetime import datetime
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union, cast

from ..errors import InvalidArgument
from . import arguments
from . import pointstores
from . import points as points_
from . import policy as policy_
from . import protection
from . import replication as R
from . import report
from .events import Emitter, EventSink
from .machines import MachineOperations
from .retry import RetryPolicy
from .results import (CycleResult, ItemStatus, JobInfo, OperationResult, PointInfo,
                      verification_summary)
from .schema import init_vault as init_vault  # pydr.dr.vault.init_vault, pydr.init_vault
from .store import Store
from .store_records import DiskRecord, ItemRecord
from .vault_policy import PolicyOperations
from .vault_recovery import (PointSelector, Progress, RecoveryOperations, checked_point,
                             forwarded)

def _passphrase_bytes(passphrase: Optional[Union[str, bytes]]) -> Optional[bytes]:
    """`passphrase` as bytes (a str UTF-8 encoded); InvalidArgument, never
    showing it, when it is empty or of another type."""
    if passphrase is None:
        return None
    if isinstance(passphrase, str):
        passphrase = passphrase.encode("utf-8")
    if not isinstance(passphrase, (bytes, bytearray)):
        raise InvalidArgument(f"passphrase must be a str or bytes, not a "
                              f"{type(passphrase).__name__}")
    if not passphrase:
        raise InvalidArgument("the passphrase is empty")
    return bytes(passphrase)


class Vault(RecoveryOperations, PolicyOperations, MachineOperations):
    """An open vault with the DR workflow.

    Open it as a context manager; ``writer=True`` takes the vault's lock
    (one changing process at a time; readers never wait) and finishes what
    a killed command left. Every method that changes the vault needs a
    writer. A Vault is used from the thread that opened it.

    Args:
        directory: the vault's directory (made by init_vault / ``pydr vault init``).
        writer: take the writer lock.
        lock_timeout: with ``writer``, seconds to wait for the lock when
            another process holds it (None or 0: fail at once). A reader
            takes no lock: giving it one is InvalidArgument.
        passphrase: the passphrase of the encrypted object stores this
            Vault opens (a str is UTF-8 encoded). None: the environment's
            (PYDR_PASSPHRASE_FILE, else PYDR_PASSPHRASE), read when an
            encrypted store is first opened. Kept in memory only: never
            written into the vault, never logged.

    Raises:
        InvalidArgument: `directory` is not a path; `lock_timeout` is not a
            number of seconds >= 0, or is given without ``writer``;
            `passphrase` is empty or neither str nor bytes.
        VaultError: not a vault, a vault of another schema, or (writer) the
            lock is held by another process.

    Every method raises VaultError once the Vault is closed, and WrongThread
    when called from a thread other than the one that opened it.
    """

    def __init__(self, directory: Union[str, os.PathLike[str]], *, writer: bool = False,
                 lock_timeout: Optional[float] = None,
                 passphrase: Optional[Union[str, bytes]] = None) -> None:
        options: Dict[str, Any] = {} if lock_timeout is None else {"lock_timeout": lock_timeout}
        secret = _passphrase_bytes(passphrase)
        self.store: Store = Store(directory, writer=writer, **options)
        self.store.passphrase = secret

    # -- the store -----------------------------------------------------------------
    @property
    def dir(self) -> str:
        """The vault's directory."""
        return self.store.dir

    @property
    def writer(self) -> bool:
        """Whether this Vault holds the writer lock."""
        return bool(self.store.writer)

    def close(self) -> None:
        """Close the database and release the lock (if held). Closing twice
        is no error; any other use after it is VaultError.

        Raises:
            WrongThread: called from a thread other than the one that opened
                the Vault: it stays open and keeps its lock.
        """
        self.store.close()

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    if not TYPE_CHECKING:
        # The store's other methods (the tables), for pydr's own tests and
        # tools that know the store. Hidden from type checkers: a typo
        # (v.replicat) is an error there, and the public surface is the
        # methods defined here.
        def __getattr__(self, name: str) -> Any:
            if name == "store" or name.startswith("__"):  # never during set-up or copy
                raise AttributeError(f"'Vault' object has no attribute {name!r}")
            try:
                return getattr(self.store, name)
            except AttributeError:
                raise AttributeError(f"'Vault' object has no attribute {name!r}") from None

    def disks(self, name: str) -> List[DiskRecord]:
        """The raw records of item `name`'s disks, by index: ``idx``,
        ``source``, ``replica`` (as protect() was given them), ``tracking``,
        ``bitmap``, ``generation``. For what a person reads, use status().

        Args:
            name: the item.

        Returns:
            A DiskRecord per disk (read-only).

        Raises:
            UnknownName: no item of that name is protected.
        """
        self.store.item(name)
        return list(self.store.disks(name))

    def plans(self) -> List[str]:
        """The names of the recovery plans, sorted (see plan(), run_plan()).

        Returns:
            The plan names; an empty list when there are none.
        """
        return [str(n) for n in self.store.plan_names()]

    def vault_id(self) -> str:
        """This vault's identity (a hex string), which its replicas record
        as their owner: another vault never writes over them."""
        return str(self.store.vault_id())

    def integrity_check(self) -> List[str]:
        """SQLite's check of the vault's database.

        Returns:
            [] when the database is sound, else SQLite's findings.
        """
        return list(self.store.integrity_check())

    def items(self, group: Optional[str] = None) -> List[str]:
        """The names of the protected items (of `group`, if given), sorted.

        Args:
            group: only the members of this group.

        Returns:
            The item names; an empty list when there are none.
        """
        return list(self.store.items(group=group))

    def item(self, name: str) -> ItemRecord:
        """The raw record of item `name` (its row of the items table: every
        column as an attribute, see docs/VAULT.md). For what a person or a
        tool reads, use status().

        Args:
            name: the item.

        Returns:
            Its ItemRecord (read-only).

        Raises:
            UnknownName: no item of that name is protected.
        """
        return cast(ItemRecord, self.store.item(name))

    # -- protection and status -------------------------------------------------------
    def protect(self, name: str, disks: Sequence[Tuple[str, str]], *,
                group: Optional[str] = None, retention: int = 24,
                retention_age: Optional[float] = None, quiesce_hook: Optional[str] = None,
                thaw_hook: Optional[str] = None, rsh: Optional[str] = None,
                remote_pydr: Optional[str] = None, cbt: bool = False,
                host: Optional[str] = None,
                cbt_granularity: Optional[int] = None,
                policy: Optional[Dict[str, Any]] = None, encrypt: bool = True) -> ItemStatus:
        """Register item `name`, a machine whose disks are replicated. Its
        first replicate() is the initial (full, sparse-aware) copy.

        Args:
            name: the item's name (letters, digits, ".", "_", "-").
            disks: [(source, replica)]: each source (an image, a block
                device, a qcow2/vmdk image, nbd://..., qmp:SOCKET:NODE) and
                its replica (a path, [user@]host:PATH, or s3://BUCKET/PREFIX).
            group: replicate with the other items of this group, one cut
                and one point id for all.
            retention: recovery points kept (the newest `retention`).
            retention_age: also drop points older than this many seconds
                (the newest is always kept).
            quiesce_hook: a shell command run before the cut (then points
                are app-consistent with replicate(app_consistent=True)).
            thaw_hook: a shell command run after the cut.
            rsh: the remote shell for host:PATH replicas (default ssh).
            remote_pydr: the pydr command on the replicas' host.
            cbt: read only what a QEMU dirty bitmap says changed (qcow2
                images, qmp: sources).
            host: the sources are paths on that host, read there by a
                Dask worker of a fleet (pydr.dr.fleet).
            cbt_granularity: bytes per bit of the dirty bitmaps (with
                `cbt`): a power of two from 512 to 64 MiB; None: 4 KiB,
                the block a cycle compares. Each bitmap costs one bit per
                granule, in QEMU's memory and in a qcow2 image (1 TiB at
                4 KiB: 32 MiB); a larger granule costs less and makes a
                cycle read more than was written: reads are rounded up to
                whole granules, and dirty granules over half the disk make
                the cycle compare all of it (docs/QEMU.md).
            policy: the item's protection policy, as set_policy's fields
                ({"target_rpo": "30s", "keep": {...}, ...}): checked (with
                its group's) before anything is recorded, recorded in the
                item's own transaction.
            encrypt: replicas s3://BUCKET/PREFIX in an empty prefix make a
                new store there, encrypted (AES-256-GCM, the Vault's
                passphrase; docs/FORMAT.md) unless False. A store already
                there is opened as it is.

        Returns:
            The new item's ItemStatus (state "protecting").

        Raises:
            InvalidState: the name is taken, a replica is another item's or
                the source itself, or another vault owns a replica.
            ValueError: a bad name or option (InvalidArgument), such as
                a granularity that is not a power of two from 512 to
                64 MiB, one larger than a source disk (where its size can
                be read here), or one given without `cbt`.
            PermissionError: the object store is encrypted and no
                passphrase was given (PassphraseRequired), or a wrong one
                (WrongPassphrase): nothing recorded; its credentials refused.
            OSError: a source cannot be read; the object store's bucket
                cannot be reached (FileNotFoundError: no such bucket).
        """
        # the replicas a lock must be able to hold; malformed disks are protect's to refuse
        replicas = [os.fspath(d[1]) for d in (disks if isinstance(disks, (list, tuple)) else ())
                    if isinstance(d, (list, tuple)) and len(d) == 2
                    and isinstance(d[1], (str, os.PathLike))]
        columns = policy_.check_new_item_policy(self.store, group, policy or {}, replicas)
        protection.protect(self.store, name, disks, group=group, retention=retention,
                           retention_age=retention_age, quiesce_hook=quiesce_hook,
                           thaw_hook=thaw_hook, rsh=rsh, remote_pydr=remote_pydr, cbt=cbt,
                           host=host, cbt_granularity=cbt_granularity,
                           policy_columns=columns, encrypt=bool(encrypt))
        return self.status(name)

    def status(self, name: str) -> ItemStatus:
        """What the vault knows of item `name`: state, direction, health,
        disks, points, RPO, errors, retries and the operation running on it.

        Args:
            name: the item.

        Returns:
            Its ItemStatus; ``rpo_seconds`` is measured now.

        Raises:
            UnknownName: no item of that name.
        """
        return report.item_status(self.store, name)

    def points(self, name: str) -> List[PointInfo]:
        """Item `name`'s recovery points, oldest first.

        Args:
            name: the item.

        Returns:
            A PointInfo for each point (damaged ones say why in ``damaged``).

        Raises:
            UnknownName: no item of that name.
        """
        self.store.item(name)
        last = {v.point: v for v in self.store.verifications(name)}  # oldest first: the last wins
        return [PointInfo.from_record(p, verification_summary(last.get(p.id)),
                                      self._frozen(name, p.id))
                for p in self.store.points(name)]

    def _frozen(self, name: str, point_id: int) -> Optional[bool]:
        """Whether a machine's point was frozen (None: it keeps no domain)."""
        rec = self.store.point_machine(name, point_id)
        return None if rec is None else bool(rec.frozen)

    def point(self, name: str, point_id: int) -> PointInfo:
        """Recovery point `point_id` of item `name`.

        Args:
            name: the item.
            point_id: the point's id.

        Returns:
            Its PointInfo.

        Raises:
            InvalidArgument: `point_id` is not an int >= 1.
            UnknownName: no such item, or the item has no such point.
        """
        wanted = arguments.count(point_id, "a point id", low=1)
        record = self.store.point(name, wanted)
        found = self.store.verifications(name, record.id)
        return PointInfo.from_record(record, verification_summary(found[-1] if found else None),
                                     self._frozen(name, record.id))

    def jobs(self, *, item: Optional[str] = None, state: Union[str, Iterable[str], None] = None,
             since: Union[datetime, float, None] = None,
             limit: Optional[int] = None) -> List[JobInfo]:
        """The jobs (what each command did to which item), newest first.

        Args:
            item: only this item's jobs.
            state: only jobs in this state ("queued", "running",
                "succeeded", "failed", "cancelled") or in one of these states.
            since: only jobs started at or after this time (a tz-aware
                datetime, or epoch seconds).
            limit: at most this many (the newest).

        Returns:
            A JobInfo per job.

        Raises:
            InvalidArgument: `item` is not a str, `state` names no job
                state, `since` is not a tz-aware datetime or epoch seconds,
                or `limit` is not an int >= 0.
        """
        if item is not None and not isinstance(item, str):
            raise InvalidArgument(f"item must be an item's name (a str), not {item!r}")
        states = arguments.job_states(state)
        since_epoch = arguments.epoch(since)
        limit = arguments.count(limit, "limit", low=0)
        return [JobInfo.from_record(j) for j in self.store.find_jobs(
            item=item, state=states, since=since_epoch, limit=limit)]

    def job(self, job_id: int) -> JobInfo:
        """Job `job_id`.

        Args:
            job_id: the job's id (JobInfo.id, CycleResult.jobs).

        Returns:
            Its JobInfo.

        Raises:
            InvalidArgument: `job_id` is not an int >= 1.
            UnknownName: there is no such job.
        """
        return JobInfo.from_record(self.store.job(arguments.count(job_id, "a job id", low=1)))

    # -- replication -----------------------------------------------------------------
    def replicate(self, names: Union[str, Iterable[str]], *, app_consistent: bool = False,
                  resync: bool = False, retry: bool = False, max_attempts: Optional[int] = None,
                  policy: Optional[RetryPolicy] = None, executor: Any = None,
                  threads: Optional[int] = None, bwlimit: Optional[int] = None, progress: Optional[Progress] = None,
                  events: Optional[EventSink] = None,
                  cancel: Optional[threading.Event] = None) -> CycleResult:
        """One replication cycle of the items `names`: a group's members
        together (all or nothing, one cut), every other item on its own;
        each item that succeeds gets a recovery point (one id shared by
        all of them).

        Args:
            names: an item name or several.
            app_consistent: run the items' quiesce hooks before the cut and
                their thaw hooks after it (app-consistent points).
            resync: compare both sides by checksum, re-reading the replicas
                (needed by items in state resync-required).
            retry: retry the items whose errors are recoverable, on the
                schedule of pydr.dr.retry (this call then sleeps).
            max_attempts: with `retry`, give up after this many attempts.
            policy: with `retry`, the schedule (a pydr.dr.retry.RetryPolicy;
                its clock and sleep can be replaced); overrides `max_attempts`.
            executor: where the captures run (default: this process; a
                pydr.dr.fleet.FleetExecutor: each item's host).
            threads: comparison threads per disk (default: the CPUs).
            bwlimit: bytes a second for uploads to an object store.
            progress: a callable given each engine ProgressRecord (a
                progress bar; tools use `events`).
            events: a callable given each Event of the cycle.
            cancel: set it to stop the cycle as a kill would.

        Returns:
            The CycleResult, with an ItemOutcome for every item.

        Raises:
            InvalidArgument: `names` is not a name or names (str), or is
                empty; `threads`, `bwlimit` or `max_attempts` is not a
                positive int; `events` is not callable; `cancel` has no
                is_set().
            CycleFailed: several units and some failed (``.result`` is the
                CycleResult; the others got their points).
            UnknownName: an item is not protected.
            InvalidState: an item cannot replicate now (its state, a drill,
                resync-required without `resync`).
            PydrError, OSError: the error of a call of one unit.
        """
        names = arguments.item_names(names)
        for what, count in (("threads", threads), ("bwlimit", bwlimit),
                            ("max_attempts", max_attempts)):
            arguments.count(count, what, low=1)
        kwargs: Dict[str, Any] = dict(executor=executor, app_consistent=app_consistent,
                                      resync_all=resync, **forwarded(events, cancel))
        for key, value in (("threads", threads), ("bwlimit", bwlimit), ("progress", progress)):
            if value is not None:
                kwargs[key] = value
        if retry:
            if policy is None and max_attempts is not None:
                policy = RetryPolicy(max_attempts=max_attempts)
            if policy is not None:
                kwargs["policy"] = policy
            return cast(CycleResult, R.replicate_with_retry(self.store, names, **kwargs))
        return cast(CycleResult, R.replicate(self.store, names, **kwargs))

    def apply_retention(self, name: str, now: Optional[float] = None) -> None:
        """Drop the points of item `name` beyond its retention (count and
        age) and what only they needed; a drill's or failover's point stays.
        With retention tiers in its policy (``keep``), the points the tiers
        let go are thinned instead: each one's undo step is merged into the
        next newer one (pydr.dr.stepmerge), so the points kept stay exact.
        Every cycle does this already.

        Args:
            name: the item.
            now: epoch seconds the ages are measured at (default: the clock).

        Raises:
            InvalidArgument: `now` is not a finite number of seconds.
            UnknownName: no item of that name.
        """
        if now is not None and (isinstance(now, bool) or not isinstance(now, (int, float))
                                or not math.isfinite(now)):
            raise InvalidArgument(f"now must be epoch seconds (a finite number), not {now!r}")
        points_.apply_retention(self.store, name, now)

    def materialize(self, name: str, point: PointSelector, directory: str, *,
                    method: str = "auto",
                    threads: Optional[int] = None, progress: Optional[Progress] = None,
                    events: Optional[EventSink] = None,
                    cancel: Optional[threading.Event] = None) -> OperationResult:
        """Write each disk of item `name` as it was at recovery point `point`
        into `directory`, named like its replica. The replicas are not
        touched.

        Args:
            name: the item.
            point: the point's id (its digits as a str: the same), or
                "latest-processed" (None: the same) or
                "latest-app-consistent" (the newest such sound point).
            directory: a directory (made if missing), or host:DIR on the
                host that holds the replicas.
            method: "auto" (a reflink clone where the file system can, else
                a copy), "reflink", "copy" or "qcow2" (an overlay on the
                replica, which must then stay as it is).
            threads: copy threads.
            progress: a callable given each engine ProgressRecord.
            events: a callable given each Event.
            cancel: set it to stop as a kill would.

        Returns:
            An OperationResult ("materialize": point, paths, method).

        Raises:
            InvalidArgument: a bad point, method, threads, events or cancel.
            UnknownName: no such item or point.
            DamagedPoint, DamagedJournal: the point cannot be restored.
            InvalidState: a destination is a replica or a protected disk.
        """
        arguments.method(method, "materialize")
        arguments.count(threads, "threads", low=1)
        extra = forwarded(events, cancel)
        wanted = checked_point(point)
        point_id: int = (wanted if isinstance(wanted, int)
                         else points_.select_point(self.store, name, wanted))
        methods: List[str] = []
        paths = points_.materialize(self.store, name, point_id, directory, threads=threads,
                                    method=method, progress=progress, methods=methods,
                                    **extra)
        return OperationResult(item=name, operation="materialize", point=point_id,
                               paths=tuple(str(p) for p in paths),
                               method="+".join(sorted(set(methods))) or None,
                               direction=self.store.item(name).direction)

    # -- checks and garbage ------------------------------------------------------------
    def verify(self, name: str, point: Optional[int] = None, sample: float = 100.0, *,
               events: Optional[EventSink] = None,
               cancel: Optional[threading.Event] = None) -> Any:
        """Check an item's points where they are (the "verify" capability of
        its point store: the undo steps, signature caches and replicas of a
        step chain; the indexes and chunks of a chunk index).

        Args:
            name: the item.
            point: only what this point needs (default: every point).
            sample: the percentage of steps or chunks read (above 0, at
                most 100).
            events: given "started", each replica's "progress" in phase
                "verify", then "finished", "failed" or "cancelled".
            cancel: asked between steps, windows and chunks (Cancelled).

        Returns:
            The point store's report (a dict; "problems" lists what was found).

        Raises:
            InvalidArgument: `point` is not a point id, `sample` is not a
                percentage above 0 and at most 100, a bad events or cancel.
            UnknownName: no such item or point.
            Cancelled: ``cancel`` was set.
        """
        forwarded(events, cancel)
        if point is not None:
            checked_point(point)
            point = arguments.count(points_.check_selector(point), "point", low=1)
        if (isinstance(sample, bool) or not isinstance(sample, (int, float))
                or not 0 < sample <= 100):
            raise InvalidArgument(f"sample must be a percentage above 0 and at most 100, "
                                  f"not {sample!r}")
        em = Emitter(events, "verify", name)
        check = pointstores.point_store(self.store, name).require("verify")
        report: Any = em.run(lambda: check(point, sample, events=em, cancel=cancel),
                             done=lambda r: f"{len(r['problems'])} problems" + (
                                 f", {len(r['tampered'])} objects tampered with"
                                 if r.get("tampered") else ""))
        return report

    def collect_garbage(self, target: str, *, grace: Optional[float] = None,
                        dry_run: bool = False, now: Optional[float] = None) -> Any:
        """Mark and sweep what no point names: in the point store of item
        `target`, or in the store a spec names (s3://BUCKET/PREFIX).

        Args:
            target: an item, or an object store's spec.
            grace: keep unnamed chunks younger than this many seconds
                (default: the kind's).
            dry_run: count, remove nothing.
            now: epoch seconds the ages are measured at (default: the clock).

        Returns:
            The kind's report (a dict).

        Raises:
            UnsupportedFile: the item's kind keeps no garbage.
        """
        options: Dict[str, Any] = {"dry_run": dry_run}
        if grace is not None:
            options["grace"] = grace
        if now is not None:
            options["now"] = now
        return pointstores.collect_garbage(self.store, target, **options)

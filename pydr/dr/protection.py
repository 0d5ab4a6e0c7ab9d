"""``pydr protect``'s policy: what may be protected. An item's name and
options, and each disk: its source on this machine (or on its --host), a
replica that is not the source, not a disk of another item, not owned by
another vault or item (pydr.dr.ownership), in one object store or none.
What passes is recorded through the store's table methods
(Store.add_item); nothing is recorded when anything fails."""

import contextlib
import errno
import os
import re
import time

from ..errors import InvalidArgument, InvalidState, PydrError
from . import ownership
from .pointstores import specs

_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

#: what a name the vault keys on may be (an item's, a group's, a plan's): it
#: names directories under the vault (undo/ITEM, cache/ITEM), files of points
#: and test failovers, command lines and CLI output
NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
NAME_RULE = ("1 to 128 of the characters A-Z a-z 0-9 '.' '_' '-', not starting with '-', "
             "not '.' or '..'")


def check_name(value, what):
    """InvalidArgument unless `value` is a name as :data:`NAME_RULE` says;
    `what` names it in the refusal ("an item's name")."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or value.startswith("-") \
            or value in (".", ".."):
        shown = repr(value) if not isinstance(value, str) or len(value) <= 40 else \
            f"{value[:40]!r}... ({len(value)} characters)"
        raise InvalidArgument(f"{what} must be {NAME_RULE}; {shown} is not")
    return value


def recordable_text(value, what, *, secret=False):
    """`value` (a str, or os.PathLike naming a str) as a str the vault can
    record: UTF-8 text without NUL. InvalidArgument naming it (its repr;
    only its type when `secret`: a hook's command line may hold one)
    otherwise: a path of bytes that are not UTF-8 (os.fsdecode's escapes)
    cannot be stored, nor named in a command line pydr prints."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    shown = f"(a {type(value).__name__})" if secret else repr(value)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty str, not {shown}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} {shown} is not UTF-8 text: the vault records paths "
                              f"and commands as UTF-8", path=None if secret else value,
                              hint=None if secret else "rename it, or reach it through a "
                                                       "symlink whose name is UTF-8") from None
    if "\0" in value:
        raise InvalidArgument(f"{what} {shown} holds a NUL character",
                              path=None if secret else value)
    return value


def disk_pairs(disks):
    """`disks` as [(source, replica)] of checked strs (:func:`recordable_text`):
    InvalidArgument naming what is expected unless it is a list or tuple of
    (source, replica) pairs, each a str or os.PathLike."""
    expected = "a list of (source, replica) pairs, each a str or os.PathLike path"
    if isinstance(disks, (str, bytes, dict)) or not isinstance(disks, (list, tuple)):
        raise InvalidArgument(f"disks must be {expected}, not a {type(disks).__name__}",
                              hint="e.g. [('/dev/vg/web', '/dr/web.img')]")
    if not disks:
        raise InvalidArgument("an item needs at least one disk (source, replica)",
                              hint="give --disk SOURCE=REPLICA")
    pairs = []
    for i, pair in enumerate(disks):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InvalidArgument(f"disk {i} is {pair!r}: expected a (source, replica) pair "
                                  f"({expected})")
        pairs.append((recordable_text(pair[0], f"the source of disk {i}"),
                      recordable_text(pair[1], f"the replica of disk {i}")))
    return pairs


def protect(store, name, disks, *, group=None, retention=24, retention_age=None,
            quiesce_hook=None, thaw_hook=None, rsh=None, remote_pydr=None, cbt=False,
            host=None, cbt_granularity=None, policy_columns=None, encrypt=True, machine=None):
    """Register an item: disks is a list of (source, replica) paths; a
    replica may be "[user@]host:PATH" (reached with `rsh`, default ssh,
    running `remote_pydr serve --stdio` there; its recovery-point steps
    are kept beside it).
    Points are kept while they are among the newest `retention` and (if
    `retention_age` seconds is given) younger than that; the newest point
    is always kept. `cbt`: each cycle takes its changed extents from a
    QEMU dirty bitmap (sources: qcow2 images or qmp:SOCKET:NODE; see
    pydr.dr.tracking). `cbt_granularity`: bytes per bit of those bitmaps
    (a power of two from 512 to 64 MiB, not larger than a source disk whose
    size can be read here; None: 4 KiB, the block a cycle compares; needs
    `cbt`). `host`: the sources are paths on that host, read
    there by a Dask worker of a fleet (pydr.dr.fleet); they are not
    looked for on this machine. `policy_columns`: the item's policy as
    columns of the policies table (pydr.dr.policy checked them), recorded in
    the item's own transaction. Replicas in an object store: the store is
    opened, or made when its prefix is empty -- encrypted unless `encrypt`
    is False (pydr.dr.objectstore.prepare_store) -- and recorded with the
    item (its id and encryption: a later config that disagrees is refused).
    `machine`: the item is a machine: its machines row's columns (kind,
    uri, domain, uuid, agent; pydr.dr.machines.protect_machine), recorded
    in the item's transaction; its libvirt disks are reached through it.

    The item's and the group's name follow :data:`NAME_RULE`; every path,
    hook and command is UTF-8 text without NUL (:func:`recordable_text`).

    Raises InvalidArgument (a ValueError) naming the argument and what is
    expected: a bad name, disks that are not a list of (source, replica)
    pairs, a path that is not UTF-8, a replica that is its source, a
    remote replica without an absolute path, a bad option; InvalidState: the
    name is taken, or a disk is another item's, or another vault owns a
    replica; FileNotFoundError: a source is missing; PassphraseRequired,
    WrongPassphrase: an encrypted object store and no passphrase, or a
    wrong one (exit 4); the S3 errors: its bucket cannot be reached.
    Nothing is recorded
    when it raises; the protect job, once started, ends with the call."""
    disks = _check_options(name, disks, group, retention, retention_age, quiesce_hook,
                           thaw_hook, rsh, remote_pydr, host)
    if cbt_granularity is not None:
        if not cbt:
            raise InvalidArgument("a dirty bitmap granularity is for changed-block tracking",
                                  hint="add --cbt, or leave out --cbt-granularity")
        from .tracking import check_granularity

        check_granularity(cbt_granularity)
    if store.has_item(name):
        raise InvalidState(f"item {name!r} is already protected", path=store.dir, item=name)
    # replicate(NAME) takes an item's or a group's name: one name is never both
    groups = {r.grp for r in store.item_records()} | {group}
    if name in groups:
        raise InvalidState(f"{name!r} is the name of a replication group: an item cannot have "
                           f"it too", path=store.dir, item=name)
    if group is not None and store.has_item(group):
        raise InvalidState(f"{group!r} is the name of a protected item: a group cannot have it "
                           f"too", path=store.dir, item=name)
    from ..endpoints import open_endpoint

    reach = None if machine is None else (machine.get("uri"), machine.get("uuid"))

    def disk(spec):
        return open_endpoint(spec, rsh=rsh, remote_pydr=remote_pydr, machine=reach)

    stored = _check_disks(store, name, disks, disk, cbt=cbt, host=host,
                          granularity=cbt_granularity)
    if group is not None:
        specs.check_group_kind([r for _, r, _ in stored], {
            r.name: [d.replica for d in store.disks(r.name)] for r in store.item_records()
            if r.grp == group})
    owners = _check_owners(store, name, stored, disk)
    # a wrong passphrase or an unreachable bucket: refused before anything is recorded
    object_store = _open_object_store(store, stored, encrypt)
    job = store.start_job("protect", name)
    try:
        with store.transaction():  # the item and its policy land together, or neither
            store.add_item(name, stored, grp=group, state="protecting", direction="forward",
                           health="ok", retention=retention, quiesce_hook=quiesce_hook,
                           thaw_hook=thaw_hook, created=time.time(),
                           retention_age=retention_age, rsh=rsh, remote_pydr=remote_pydr,
                           host=host, granularity=cbt_granularity)
            if policy_columns:
                store.put_policy("item", name, **policy_columns)
            if machine is not None:
                store.put_machine(name, **machine)
            if object_store is not None:
                store.add_object_store(*object_store)
        for replica, me in owners:  # not reachable, no directory yet: its first cycle claims it
            with contextlib.suppress(OSError):
                ownership.claim(replica, me, exists_in_vault=store.has_item)
    except BaseException as exc:  # the job ends with the call, whatever stopped it
        with contextlib.suppress(Exception):
            store.end_job(job, "failed", error=str(exc) or type(exc).__name__)
        raise
    store.end_job(job, "succeeded")


def _check_options(name, disks, group, retention, retention_age, quiesce_hook, thaw_hook, rsh,
                   remote_pydr, host):
    """InvalidArgument naming the first bad argument of protect; the disks
    as [(source, replica)] strs (:func:`disk_pairs`)."""
    check_name(name, "an item's name")
    if group is not None:
        check_name(group, "a group's name")
    disks = disk_pairs(disks)
    if isinstance(retention, bool) or not isinstance(retention, int) or retention < 1:
        raise InvalidArgument(f"retention must be a positive number of points, not {retention!r}")
    if retention_age is not None and retention_age <= 0:
        raise InvalidArgument("retention age must be positive")
    if (quiesce_hook is None) != (thaw_hook is None):
        raise InvalidArgument("a quiesce hook and a thaw hook go together: both, or neither",
                              hint="give both --quiesce-hook and --thaw-hook, or neither")
    if host is not None and not (isinstance(host, str) and _HOST_NAME.fullmatch(host)):
        raise InvalidArgument(f"invalid host name {host!r}: letters, digits, '.', '_' and '-'")
    for value, what in ((quiesce_hook, "the quiesce hook"), (thaw_hook, "the thaw hook"),
                        (rsh, "the remote shell (rsh)"), (remote_pydr, "the remote pydr command")):
        if value is not None:
            recordable_text(value, what, secret=True)
    return disks


def _check_disks(store, name, disks, disk, *, cbt, host, granularity=None):
    """[(source spec, replica spec, tracking kind or None)] of a new item's
    disks, each checked (`disk` opens a spec as the item reaches it); a
    dirty bitmap `granularity` larger than a source whose size is known
    here is refused."""
    taken = set()
    for row in store.all_disks():  # a disk of another item is neither source nor replica here
        source = disk(row.source)
        if source.tracking == "libvirt" and store.has_item(row.item):
            source = store.endpoint(row.item, row.source)  # reached as its own machine says
        taken |= {source.identity, disk(row.replica).identity}
    seen = set()
    named = {}  # a point's disks are made as DIR/<replica file name>: one name a disk
    stored = []
    for source, replica in disks:
        src = disk(source)
        rep = specs.protected_replica(name, src, disk(replica), cbt=cbt)  # the kind's rules
        file_name = os.path.basename(rep.path)
        if file_name in named:
            raise InvalidArgument(f"the replicas of disks {named[file_name]} and "
                                  f"{source}={replica} share the file name {file_name!r}: a "
                                  f"point's disks are made side by side, named like their "
                                  f"replicas", hint="give them distinct names")
        named[file_name] = f"{source}={replica}"
        if src.place is not None:
            raise InvalidArgument(f"source disk {source} must be on this machine, or on the "
                                  f"item's --host (replicas may be on another)", path=source)
        if host is None and not src.exists():  # a host's disks are its worker's to find
            raise FileNotFoundError(errno.ENOENT, "source disk not found", source)
        if host is None and src.local_path is not None:
            from ..engine.devices import check_disk

            check_disk(src.local_path)  # a FIFO or socket: refused now, not at the first cycle
        if src.identity == rep.identity:
            raise InvalidArgument(f"replica {replica} is the source disk itself: a replica is "
                                  f"another file or device, at the other site", path=replica)
        for p in (src.identity, rep.identity):
            if p in taken or p in seen:
                raise InvalidState(f"{p} is already a disk of a protected item", path=p)
            seen.add(p)
        if cbt and not src.tracking:
            raise InvalidArgument(f"changed-block tracking (cbt) needs a qcow2 image or a live "
                                  f"disk (qmp:SOCKET:NODE) as the source, not {source}")
        if cbt and granularity is not None and host is None:
            _check_granule_fits(src, source, granularity)
        stored.append((src.spec, rep.spec, src.tracking if cbt else None))
    specs.check_one_kind([r for _, r, _ in stored])
    return stored


def _check_granule_fits(src, source, granularity):
    """InvalidArgument when one granule of the dirty bitmaps would be larger
    than the source disk `src` (every write would mark all of it). A size
    that cannot be read now (a live disk's QEMU not running, an image
    qemu-img cannot describe) is left to the first cycle, which reports it."""
    try:
        size = src.size()
    except (OSError, PydrError):
        return
    if granularity > size:
        raise InvalidArgument(f"a dirty bitmap granularity of {granularity} bytes is larger than "
                              f"source disk {source} ({size} bytes): every write would mark the "
                              f"whole disk", path=source,
                              hint="give a smaller --cbt-granularity, or leave it out (4K)")


def _open_object_store(store, stored, encrypt):
    """(spec, store id, encryption) of the object store a new item's
    replicas are in, opened or made there (pydr.dr.objectstore.prepare_store),
    or None when they are not in one."""
    spec = next((r.partition("#")[0] for _, r, _ in stored if r.startswith("s3://")), None)
    if spec is None:
        return None
    from .objectstore import prepare_store

    return (spec, *prepare_store(store, spec, encrypt=encrypt))


def _check_owners(store, name, stored, endpoint):
    """[(replica endpoint, Owner)] of a new item's replicas (`endpoint`
    opens a spec as the item reaches it); InvalidState naming the owner
    if another vault or item owns one (a replica has one writer:
    pydr.dr.ownership)."""
    owners = []
    for i, (_, replica, _) in enumerate(stored):
        if not specs.has_owner(replica):
            continue
        rep = endpoint(replica)
        me = ownership.Owner(store.vault_id(), store.dir, name, i, replica)
        try:
            ownership.check_claimable(rep, me, exists_in_vault=store.has_item)
        except (ConnectionError, TimeoutError):
            pass  # a host not reachable now: the item's first cycle checks and claims
        owners.append((rep, me))
    return owners

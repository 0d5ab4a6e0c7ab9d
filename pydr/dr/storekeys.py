"""The keys of an object store (s3://BUCKET/PREFIX): its config, and its
random master key kept in the bucket only sealed -- under a key derived from
a passphrase (argon2id), or under a recovery public key (X25519) whose
private key restores access when every passphrase is lost. Formats:
pydr.dr.keyfiles and docs/FORMAT.md, "Store config and key files".

A new encrypted store is made in two steps, each a crash point: its first
key file (``keys.created``), then its config (``keys.config``). A store with
a key and no config is a creation cut short: :func:`create_store` finishes
it from the key's payload. A passphrase is changed by adding the new key
(``keys.added``) before removing the old (``keys.removed``). A kill at any
point leaves the store openable with the old or the new passphrase, and the
same call again finishes the job.

:func:`unlock` tries every current passphrase key, then, in a versioned
bucket, the older versions of the key files: whoever can delete or overwrite
objects cannot lock the owner out of a store whose keys' versions are kept.
Nothing here writes before a passphrase has opened a key. Recovery keys
are pydr.dr.keyrecovery's.
"""

from __future__ import annotations

import os
import socket
import time

from ..engine import crashpoints
from ..errors import (FormatError, InvalidArgument, InvalidState, PassphraseRequired,
                      UnknownName)
from . import keyfiles as kf
from .keyfiles import KeyInfo, StoreConfig
from .keysearch import (CONFIG, KEYS, READ, WRONG_HINT, Opened, find_keys, forget_versions,
                        key_names, key_versions, read_config, read_keys)
from .passphrases import passphrase_from
from .recoverykey import make_recovery_pair

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

    from ..endpoints.s3 import ObjectStore
    from ..engine.sealing import DataKeys

__all__ = ["StoreConfig", "KeyInfo", "read_config", "create_store", "unlock", "list_keys",
           "store_lock",
           "add_key", "remove_key", "change_passphrase", "make_recovery_pair",
           "passphrase_from"]

# -- reading ------------------------------------------------------------------------


def list_keys(objects: ObjectStore) -> List[KeyInfo]:
    """Every object under keys/, described by what it says about itself
    (nothing sealed is opened: no passphrase needed). A damaged or foreign
    one has ``problem`` set and kind None.

    Raises:
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    good, bad = read_keys(objects)
    return sorted([k.info for k in good] + bad, key=lambda i: (i.created or 0, i.id))


def _config_from(opened: Opened) -> StoreConfig:
    """The config a creation cut short after its first key would have
    written: the same a rerun writes."""
    return StoreConfig(opened.store_id.hex(), kf.ENCRYPTED, kf.CHUNK_IDS[kf.ENCRYPTED],
                       opened.key.info.created or 0,
                       key_check=_key_check(opened.master, opened.store_id))


def _key_check(master: bytes, store_id: bytes) -> str:
    from ..engine.sealing import key_check

    return key_check(master, store_id)


def _data_keys(master: bytes, store_id: bytes) -> DataKeys:
    from ..engine.sealing import DataKeys

    return DataKeys(master, store_id)


def _secret(keys: DataKeys) -> Tuple[bytes, bytes]:
    """(master, store id) of a store's DataKeys."""
    exported = keys.export()
    return bytes.fromhex(exported["master"]), bytes.fromhex(exported["store"])


def _unlock(objects: ObjectStore, passphrase: Optional[bytes],
            expect_id: Optional[str] = None, config: Any = READ,
            expect_check: Optional[str] = None) -> Tuple[StoreConfig, Optional[Opened]]:
    """(config, the key that opened; None for an unencrypted store)."""
    config, opened, keys, search = find_keys(objects, passphrase, expect_id=expect_id,
                                             config=config, expect_check=expect_check)
    if config is not None and not config.encrypted:
        return config, None
    if not opened and config is None and not keys and not search.damaged and not search.tried:
        if expect_id is not None:
            raise FormatError(f"no config and no key file: the store recorded as {expect_id} "
                              f"is gone", path=objects.spec)
        raise FileNotFoundError(2, "no pydr store config and no key file here (an "
                                   "unencrypted version-1 store, or nothing)", objects.spec)
    if not opened:
        raise search.failure()
    return config or _config_from(opened[0]), opened[0]


def unlock(objects: ObjectStore, passphrase: Optional[bytes], *,
           expect_id: Optional[str] = None, config: Any = READ,
           expect_check: Optional[str] = None
           ) -> Tuple[StoreConfig, Optional[DataKeys]]:
    """Open an object store: its config, and its data keys from the first
    passphrase key that `passphrase` opens. Reads the config and the key
    files only; writes nothing.

    Args:
        objects: the store.
        passphrase: its passphrase (bytes).
        expect_id: the store id the caller recorded (the vault's
            object_stores row): a config or key of another id is refused.
        config: the config to trust instead of the current object (an
            older version of it, after the current one was deleted or
            overwritten; None: none, the key files' payload must name
            `expect_id`). By default the current config object is read.
        expect_check: the key check the caller recorded (the vault's
            object_stores row, ``key_check``): a key whose master key does
            not give it is refused, as one failing the config's key check.

    Returns:
        (config, DataKeys); (config, None) for an unencrypted store (its
        config says "none"). A store whose creation was cut short after
        its key has no config object yet: the config returned is the one
        create_store will write. ``config.key_check`` is the store's key
        check (for the vault's record); None in a config made before
        configs had one.

    Raises:
        PassphraseRequired: the store is encrypted and `passphrase` is None.
        WrongPassphrase: no passphrase key opens with it (the error names
            the store and every key tried).
        FormatError: the config or every key file is damaged, of another
            store or of another version (naming the object); or the key
            the passphrase opens fails the config's or `expect_check`'s
            key check (tampering).
        FileNotFoundError: neither a config nor a key file is there.
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    config, opened = _unlock(objects, passphrase, expect_id, config, expect_check)
    return config, None if opened is None else _data_keys(opened.master, opened.store_id)


# -- writing ---------------------------------------------------------------------------


MAX_LABEL = 200  # characters: a key file stays far below keyfiles.MAX_FILE


def _new_key_fields(kind: str, label: Optional[str]) -> Dict[str, Any]:
    if label is not None and len(label) > MAX_LABEL:
        raise InvalidArgument(f"a key's label has at most {MAX_LABEL} characters, not "
                              f"{len(label)}")
    return {"version": kf.KEY_VERSION, "id": os.urandom(16).hex(), "kind": kind,
            "created": int(time.time()), "host": socket.gethostname(), "label": label}


def store_lock(objects: ObjectStore, now: Optional[float] = None
               ) -> Optional[Tuple[str, float]]:
    """The Object Lock a new key file of the store gets, (mode, until): the
    retention of the config's current version, which the cycles of locked
    items keep (pydr.dr.objectlock.lock_store_keys); None when it has none
    or it has ended. One HEAD. A key added to a store with locked points
    is locked too: an attacker cannot erase it and so lock its owner out
    of those points."""
    head = getattr(objects, "head", None)
    if head is None:  # a store without versions or locks (a test's)
        return None
    found = head(objects.key(CONFIG))
    now = time.time() if now is None else now
    if not found or not found.get("lock_mode") or (found.get("retain_until") or 0) <= now:
        return None
    return found["lock_mode"], float(found["retain_until"])


def _put_locked(objects: ObjectStore, name: str, data: bytes) -> None:
    """Put a key file, with the store's lock when it has one."""
    lock = store_lock(objects)
    if lock is not None:
        objects.put(name, data, lock=lock)  # type: ignore[call-arg]
    else:
        objects.put(name, data)


def _put_key(objects: ObjectStore, fields: Dict[str, Any]) -> KeyInfo:
    name = objects.key(KEYS, fields["id"])
    data = kf.key_file_bytes(fields)
    _put_locked(objects, name, data)
    return kf.parse_key_file(data, fields["id"], objects.url(name)).info


def _write_passphrase_key(objects: ObjectStore, store_id: bytes, master: bytes,
                          passphrase: bytes, label: Optional[str]) -> KeyInfo:
    fields = _new_key_fields(kf.PASSPHRASE, label)
    kdf = {**kf.KDF, "salt": os.urandom(kf.SALT_BYTES)}
    fields["kdf"] = kdf
    fields["nonce"], fields["sealed"] = kf.seal(kf.passphrase_kek(passphrase, kdf),
                                                fields["id"], store_id, master)
    return _put_key(objects, fields)


def _write_config(objects: ObjectStore, config: StoreConfig) -> None:
    objects.put(objects.key(CONFIG), config.to_bytes())
    crashpoints.reached("keys.config")


def _holds_objects(objects: ObjectStore) -> bool:
    return any(next(iter(objects.list(under)), None) is not None
               for under in ("chunks", "indexes"))


def create_store(objects: ObjectStore, passphrase: Optional[bytes], *, encrypt: bool = True,
                 label: Optional[str] = None) -> Tuple[StoreConfig, Optional[DataKeys]]:
    """Make a new store under an empty prefix, or open the one there.

    New and encrypted: a random store id and master key, the first key
    file sealing them under `passphrase` (crash point ``keys.created``),
    then the config (``keys.config``). A prefix with a key and no config
    (a creation cut short) is finished: the config is written from the key
    the passphrase opens; so is a store whose key files and config were
    deleted or overwritten, in a versioned bucket (the key is put back from
    its older version). A store already there is opened as it is, whatever
    `encrypt` says (:func:`unlock`).

    Args:
        objects: where: s3://BUCKET/PREFIX.
        passphrase: the passphrase of the first key (needed when the store
            is or becomes encrypted; None for an unencrypted one).
        encrypt: for a new store: sealed objects (True) or plain ones.
        label: the first key's label (e.g. who holds the passphrase; at most
            200 characters).

    Returns:
        (config, DataKeys), or (config, None) for an unencrypted store.

    Raises:
        PassphraseRequired: an encrypted store and no passphrase.
        WrongPassphrase: an existing store that the passphrase does not open
            (nothing written).
        InvalidState: the prefix holds a version-1 store (chunks or indexes
            and no config): it stays unencrypted.
        FormatError: a damaged config or key files (naming the object).
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    config, opened, keys, search = find_keys(objects, passphrase)
    if config is not None:
        if not config.encrypted:
            return config, None
        if not opened:
            raise search.failure()
        return config, _data_keys(opened[0].master, opened[0].store_id)
    if keys or search.damaged or opened or search.tried:  # a store's key, without config
        if not opened:
            raise search.failure()
        found = opened[0]
        if "?versionId=" in found.key.info.url:  # deleted or overwritten: put it back
            _put_locked(objects, objects.key(KEYS, found.key.info.id), found.key.data)
        config = _config_from(found)
        _write_config(objects, config)
        return config, _data_keys(found.master, found.store_id)
    if _holds_objects(objects):
        raise InvalidState("a version-1 store (chunks or indexes, no config) is here: it "
                           "stays unencrypted", path=objects.spec)
    store_id = os.urandom(kf.STORE_ID_BYTES)
    if not encrypt:
        config = StoreConfig(store_id.hex(), kf.PLAIN, kf.CHUNK_IDS[kf.PLAIN],
                             int(time.time()))
        _write_config(objects, config)
        return config, None
    if passphrase is None:
        raise PassphraseRequired("a new encrypted store needs a passphrase (none given)",
                                 path=objects.spec, hint=WRONG_HINT)
    master = os.urandom(kf.MASTER_BYTES)
    info = _write_passphrase_key(objects, store_id, master, passphrase, label)
    crashpoints.reached("keys.created")
    config = StoreConfig(store_id.hex(), kf.ENCRYPTED, kf.CHUNK_IDS[kf.ENCRYPTED],
                         info.created or 0, key_check=_key_check(master, store_id))
    _write_config(objects, config)
    return config, _data_keys(master, store_id)


def add_key(objects: ObjectStore, keys: DataKeys, new_passphrase: bytes,
            label: Optional[str] = None) -> KeyInfo:
    """Add a passphrase key sealing the store's master key under
    `new_passphrase` (crash point ``keys.added``). Idempotent: when a
    passphrase key of the store already opens with `new_passphrase` (a run
    killed after the write, or the same command twice), nothing is written.

    Args:
        objects: the store.
        keys: its data keys, from :func:`unlock` (proof of a passphrase).
        new_passphrase: the passphrase of the new key.
        label: the new key's label (at most 200 characters).

    Returns:
        The new key's KeyInfo; the existing key's when nothing was written.

    Raises:
        InvalidArgument: an empty passphrase, or a label too long.
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    if not new_passphrase:
        raise InvalidArgument("the new passphrase is empty", path=objects.spec)
    master, store_id = _secret(keys)
    there = _opening_key(objects, store_id, master, new_passphrase)
    if there is not None:
        return there
    info = _write_passphrase_key(objects, store_id, master, new_passphrase, label)
    crashpoints.reached("keys.added")
    return info


def _opening_key(objects: ObjectStore, store_id: bytes, master: bytes,
                 passphrase: bytes) -> Optional[KeyInfo]:
    """The current passphrase key of the store that `passphrase` opens to
    `master`, if any (tried in unlock's order and within its bound on
    costly KDFs)."""
    from .keysearch import Search

    keys, _ = read_keys(objects)
    search = Search(objects, None, store_id.hex())
    for key in search.ordered(keys):
        opened = search.opens(key, passphrase)
        if opened is not None and opened.master == master:
            return key.info
    return None


def _resolve(objects: ObjectStore, key_id: str) -> Optional[str]:
    """The key id a full id or a unique prefix of one names; None for a
    full id that is not there (removed already)."""
    names = [n.rpartition("/")[2] for n in key_names(objects)]
    if key_id in names:
        return key_id
    found = [n for n in names if n.startswith(key_id)] if len(key_id) >= 4 else []
    if len(found) == 1:
        return found[0]
    if found:
        raise InvalidArgument(f"key id {key_id!r} names {len(found)} keys: give more digits",
                              path=objects.spec)
    if kf.is_key_id(key_id):
        return None
    raise UnknownName(f"no key {key_id!r} (see 'pydr key list')", path=objects.spec)


def remove_key(objects: ObjectStore, keys: DataKeys, key_id: str) -> str:
    """Remove a key file (crash point ``keys.removed``). The last usable
    passphrase key is never removed: the data path opens the store with a
    passphrase, and a store with no key opens with nothing.

    Args:
        objects: the store.
        keys: its data keys, from :func:`unlock` (proof of a passphrase).
        key_id: the key's id, or a unique prefix of at least 4 digits. A
            full id that is not there is removed already: done (run again
            after a kill, the call succeeds). In a versioned bucket every
            version of the file is deleted too: an older one would open.

    Returns:
        The full id of the key removed.

    Raises:
        UnknownName: no key has that prefix. InvalidArgument: the prefix
            is ambiguous.
        InvalidState: it is the store's last passphrase key; or older
            versions of it are under Object Lock retention (the current
            one is removed; those still open the store until it ends).
        FormatError: `keys` are another store's than the config's.
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    config = read_config(objects)
    if config is not None and _secret(keys)[1] != config.store_id:
        raise FormatError(f"the keys given are of store {_secret(keys)[1].hex()}, the config "
                          f"names {config.id}", path=objects.url(objects.key(CONFIG)))
    found = _resolve(objects, key_id)
    if found is not None:
        key_id = found
        good, _ = read_keys(objects)
        others = [k for k in good if k.info.kind == kf.PASSPHRASE and k.info.id != key_id]
        if not others:
            raise InvalidState(f"key {key_id} is the store's last passphrase key: add another "
                               f"first ('pydr key add')", path=objects.spec)
    _remove(objects, [key_id])
    return key_id


def _remove(objects: ObjectStore, key_ids: List[str]) -> None:
    """Delete key files, and in a versioned bucket every version of them (an
    older version would still open); crash point ``keys.removed``."""
    names = [objects.key(KEYS, i) for i in key_ids]
    objects.delete(names)
    refused = forget_versions(objects, names)
    crashpoints.reached("keys.removed")
    if refused:
        until = _locked_until(objects, names)
        when = time.strftime(" until %Y-%m-%d %H:%M:%S UTC", time.gmtime(until)) \
            if until else ""
        raise InvalidState(f"key {', '.join(key_ids)} is removed (a delete marker hides it), "
                           f"but {refused} of its versions are under Object Lock retention"
                           f"{when}: until then they stay in the bucket and still open the "
                           f"store with the old passphrase. That is what the lock is for: "
                           f"nobody holding these credentials can erase the keys the locked "
                           f"points need", path=objects.spec)


def _locked_until(objects: ObjectStore, names: List[str]) -> Optional[float]:
    """When the last Object Lock retention of a version of the key files
    `names` ends (None: unknown, or none)."""
    head = getattr(objects, "head", None)
    if head is None:
        return None
    wanted, until = set(names), None
    for key, version, _, marker in key_versions(objects):
        if key in wanted and not marker:
            found = head(key, version)
            if found and found.get("retain_until"):
                until = max(until or 0.0, float(found["retain_until"]))
    return until


def change_passphrase(objects: ObjectStore, old: bytes, new: bytes) -> KeyInfo:
    """Replace the keys `old` opens by one `new` opens: the new key first
    (crash point ``keys.added``), then the old ones removed
    (``keys.removed``; in a versioned bucket with every version of them,
    as :func:`remove_key`). Run again after a kill it finishes: a key
    `new` already opens is not added twice, and when only `new` opens a
    key the change is done.

    Args:
        objects: the store.
        old: the current passphrase.
        new: the new passphrase (not the same).

    Returns:
        The KeyInfo of the key `new` opens (it keeps the old key's label).

    Raises:
        InvalidArgument: `new` is empty or equals `old`.
        WrongPassphrase: neither passphrase opens a key (nothing written).
        FormatError: damaged key files or config, and no key opens.
        InvalidState: older versions of the old keys are under Object Lock
            retention (the new key is added, the current old ones removed).
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    if not new or new == old:
        raise InvalidArgument("the new passphrase is empty or the same as the old one",
                              path=objects.spec)
    config, with_old, keys, search = find_keys(objects, old, want_all=True)
    opened_ids = {o.key.info.id for o in with_old}
    same_store = with_old[0].store_id if with_old else None
    with_new = [o for o in (search.opens(k, new) for k in keys if k.info.id not in opened_ids)
                if o is not None and same_store in (None, o.store_id)]
    if not with_old:
        if with_new:
            return with_new[0].key.info  # done already (the old keys are removed)
        raise search.failure()
    first = with_old[0]
    if with_new:
        info = with_new[0].key.info
    else:
        info = _write_passphrase_key(objects, first.store_id, first.master, new,
                                     first.key.info.label)
        crashpoints.reached("keys.added")
    _remove(objects, sorted(opened_ids - {info.id}))
    return info

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
Nothing here writes before a passphrase has opened a key.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

from ..engine import crashpoints
from ..errors import (FormatError, InvalidArgument, InvalidState, PassphraseRequired,
                      UnknownName, WrongPassphrase)
from . import keyfiles as kf, recoverykey
from .keyfiles import KeyFile, KeyInfo, StoreConfig
from .keysearch import (CONFIG, KEYS, WRONG_HINT, Opened, Search, find_keys, forget_versions,
                        key_names, older_key_versions, read_config, read_keys)
from .passphrases import passphrase_from
from .recoverykey import make_recovery_pair

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Iterator, List, Optional, Tuple

    from ..endpoints.s3 import ObjectStore
    from ..engine.sealing import DataKeys

__all__ = ["StoreConfig", "KeyInfo", "read_config", "create_store", "unlock", "list_keys",
           "add_key", "remove_key", "change_passphrase", "add_recovery", "recover",
           "make_recovery_pair", "passphrase_from"]

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
                       opened.key.info.created or 0)


def _data_keys(master: bytes, store_id: bytes) -> DataKeys:
    from ..engine.sealing import DataKeys

    return DataKeys(master, store_id)


def _secret(keys: DataKeys) -> Tuple[bytes, bytes]:
    """(master, store id) of a store's DataKeys."""
    exported = keys.export()
    return bytes.fromhex(exported["master"]), bytes.fromhex(exported["store"])


def _unlock(objects: ObjectStore, passphrase: Optional[bytes],
            expect_id: Optional[str] = None) -> Tuple[StoreConfig, Optional[Opened]]:
    """(config, the key that opened; None for an unencrypted store)."""
    config, opened, keys, search = find_keys(objects, passphrase, expect_id=expect_id)
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
           expect_id: Optional[str] = None) -> Tuple[StoreConfig, Optional[DataKeys]]:
    """Open an object store: its config, and its data keys from the first
    passphrase key that `passphrase` opens. Reads the config and the key
    files only; writes nothing.

    Args:
        objects: the store.
        passphrase: its passphrase (bytes).
        expect_id: the store id the caller recorded (the vault's
            object_stores row): a config or key of another id is refused.

    Returns:
        (config, DataKeys); (config, None) for an unencrypted store (its
        config says "none"). A store whose creation was cut short after
        its key has no config object yet: the config returned is the one
        create_store will write.

    Raises:
        PassphraseRequired: the store is encrypted and `passphrase` is None.
        WrongPassphrase: no passphrase key opens with it (the error names
            the store and every key tried).
        FormatError: the config or every key file is damaged, of another
            store or of another version (naming the object).
        FileNotFoundError: neither a config nor a key file is there.
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    config, opened = _unlock(objects, passphrase, expect_id)
    return config, None if opened is None else _data_keys(opened.master, opened.store_id)


# -- writing ---------------------------------------------------------------------------


MAX_LABEL = 200  # characters: a key file stays far below keyfiles.MAX_FILE


def _new_key_fields(kind: str, label: Optional[str]) -> Dict[str, Any]:
    if label is not None and len(label) > MAX_LABEL:
        raise InvalidArgument(f"a key's label has at most {MAX_LABEL} characters, not "
                              f"{len(label)}")
    return {"version": kf.KEY_VERSION, "id": os.urandom(16).hex(), "kind": kind,
            "created": int(time.time()), "host": socket.gethostname(), "label": label}


def _put_key(objects: ObjectStore, fields: Dict[str, Any]) -> KeyInfo:
    name = objects.key(KEYS, fields["id"])
    data = kf.key_file_bytes(fields)
    objects.put(name, data)
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
            objects.put(objects.key(KEYS, found.key.info.id), found.key.data)
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
                         info.created or 0)
    _write_config(objects, config)
    return config, _data_keys(master, store_id)


def add_key(objects: ObjectStore, keys: DataKeys, new_passphrase: bytes,
            label: Optional[str] = None) -> KeyInfo:
    """Add a passphrase key sealing the store's master key under
    `new_passphrase` (crash point ``keys.added``).

    Args:
        objects: the store.
        keys: its data keys, from :func:`unlock` (proof of a passphrase).
        new_passphrase: the passphrase of the new key.
        label: the new key's label (at most 200 characters).

    Returns:
        The new key's KeyInfo.

    Raises:
        InvalidArgument: an empty passphrase, or a label too long.
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    if not new_passphrase:
        raise InvalidArgument("the new passphrase is empty", path=objects.spec)
    master, store_id = _secret(keys)
    info = _write_passphrase_key(objects, store_id, master, new_passphrase, label)
    crashpoints.reached("keys.added")
    return info


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
        raise InvalidState(f"{refused} older versions of the removed key files are under "
                           f"Object Lock retention: until it ends they still open the store",
                           path=objects.spec)


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


# -- recovery keys ------------------------------------------------------------------


def add_recovery(objects: ObjectStore, keys: DataKeys, public_pem: bytes, *,
                 label: Optional[str] = None) -> KeyInfo:
    """Add a recovery key: the master key sealed to an X25519 public key
    (from :func:`make_recovery_pair`; crash point ``keys.added``). Whoever
    holds the private key can then :func:`recover` the store.

    Args:
        objects: the store.
        keys: its data keys, from :func:`unlock`.
        public_pem: the recovery public key, PEM (SubjectPublicKeyInfo).
        label: the key's label (at most 200 characters).

    Returns:
        The new key's KeyInfo (``recipient`` names the public key).

    Raises:
        FormatError: `public_pem` is not an X25519 public key.
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    public = recoverykey.load_public(public_pem, "the recovery public key")
    master, store_id = _secret(keys)
    fields = _new_key_fields(kf.RECOVERY, label)
    fields.update(recoverykey.seal_fields(public, fields["id"], store_id, master))
    info = _put_key(objects, fields)
    crashpoints.reached("keys.added")
    return info


def recover(objects: ObjectStore, private_pem: bytes, private_passphrase: Optional[bytes],
            new_passphrase: bytes, *, where: str = "the recovery private key",
            label: Optional[str] = "recovered") -> KeyInfo:
    """Open the store with its recovery private key and add a passphrase key
    for `new_passphrase` (crash point ``keys.added``): access again after
    every passphrase is lost. Run again after a kill, it adds no second key
    when `new_passphrase` opens one already.

    Args:
        objects: the store.
        private_pem: the recovery private key, PEM PKCS#8.
        private_passphrase: the private key's own passphrase.
        new_passphrase: the passphrase of the key added.
        where: how messages name the private key (its file).
        label: the new key's label (at most 200 characters).

    Returns:
        The KeyInfo of the passphrase key `new_passphrase` opens.

    Raises:
        WrongPassphrase: the private key does not decrypt with its
            passphrase, or no recovery key file of the store is sealed to it.
        FormatError: the private key is not one; damaged config.
        InvalidArgument: an empty new passphrase.
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    if not new_passphrase:
        raise InvalidArgument("the new passphrase is empty", path=objects.spec)
    private = recoverykey.load_private(private_pem, private_passphrase, where)
    config = read_config(objects)
    keys, _ = read_keys(objects)
    versions = ((url, data) for url, data in older_key_versions(objects))
    found = _recovered(objects, config, private, keys, versions)
    if found is None:
        raise WrongPassphrase(f"no recovery key of the store is sealed to this private key "
                              f"(recipient {recoverykey.recipient(private.public_key())})",
                              path=objects.spec)
    store_id, master = found
    search = Search(objects, config, None)
    for key in keys:
        done = search.opens(key, new_passphrase)
        if done is not None and done.master == master:
            return done.key.info  # a run cut short added it
    info = _write_passphrase_key(objects, store_id, master, new_passphrase, label)
    crashpoints.reached("keys.added")
    return info


def _recovered(objects: ObjectStore, config: Optional[StoreConfig], private: Any,
               keys: List[KeyFile], versions: Iterator[Tuple[str, bytes]]
               ) -> Optional[Tuple[bytes, bytes]]:
    """(store id, master) from the first recovery key file sealed to
    `private` that belongs to the store: the current files, then older
    versions. Anyone may seal a master key to a public key: where the store
    has a point index, the master must open it."""
    def candidates() -> Iterator[KeyFile]:
        yield from keys
        for url, data in versions:
            try:
                yield kf.parse_key_file(data, url.rpartition("/")[2].partition("?")[0], url)
            except FormatError:
                continue

    for key in candidates():
        try:
            found = recoverykey.unseal(private, key)
        except FormatError:
            continue
        if found is None or (config is not None and found[0] != config.store_id):
            continue
        if _opens_an_index(objects, *found):
            return found
    return None


def _opens_an_index(objects: ObjectStore, store_id: bytes, master: bytes) -> bool:
    """Whether a master key opens the store's first point index (True when
    the store has none yet: nothing to check against)."""
    from ..engine.sealing import KIND_INDEX, SealBroken

    first = next(iter(objects.list("indexes")), None)
    if first is None:
        return True
    name = first[0][len(objects.key()) + 1:] if objects.key() else first[0]
    try:
        _data_keys(master, store_id).open(KIND_INDEX, objects.get(first[0]), name)
    except SealBroken:
        return False
    except FileNotFoundError:
        return True
    return True

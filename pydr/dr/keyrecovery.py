"""Recovery keys of an object store (pydr.dr.storekeys has the rest of its
keys): the master key sealed to an X25519 public key whose private key,
kept offline, restores access when every passphrase is lost, in the manner
of Proxmox Backup Server's master key. Formats: docs/FORMAT.md, "Store
config and key files".

A recovered master key is taken only when it gives the store's key check
(its config's, and the vault's record when given), or, for a store made
before key checks, when it opens one of its point index versions: whoever
holds the (shareable) public key can seal a master key of their own.
"""

from __future__ import annotations

import contextlib

from ..engine import crashpoints
from ..errors import FormatError, InvalidArgument, WrongPassphrase
from . import keyfiles as kf, recoverykey
from .keyfiles import KeyFile, KeyInfo
from .keysearch import Search, older_key_versions, read_config, read_keys
from .storekeys import _data_keys, _new_key_fields, _put_key, _secret, _write_passphrase_key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterator, List, Optional, Tuple

    from ..endpoints.s3 import ObjectStore
    from ..engine.sealing import DataKeys

__all__ = ["add_recovery", "recover"]


def add_recovery(objects: ObjectStore, keys: DataKeys, public_pem: bytes, *,
                 label: Optional[str] = None, private: Any = None) -> KeyInfo:
    """Add a recovery key: the master key sealed to an X25519 public key
    (from :func:`make_recovery_pair`; crash point ``keys.added``). Whoever
    holds the private key can then :func:`recover` the store. Given the
    pair's `private` key, idempotent: when a recovery key it opens to this
    store's master key is there already (a run killed after the write, or
    the same command twice), nothing is written. Without it a key for the
    same public key is added again: one there already cannot be told from
    a forged one (anyone with the public key can seal a master key of their
    own), and passing over a forged one would leave the store without a
    recovery key.

    Args:
        objects: the store.
        keys: its data keys, from :func:`unlock`.
        public_pem: the recovery public key, PEM (SubjectPublicKeyInfo).
        label: the key's label (at most 200 characters).
        private: the pair's X25519PrivateKey (recoverykey.load_private), to
            find a key added already; None: none is looked for.

    Returns:
        The new key's KeyInfo (``recipient`` names the public key); the
        existing key's when nothing was written.

    Raises:
        FormatError: `public_pem` is not an X25519 public key.
        InvalidArgument: `private` is not `public_pem`'s private key.
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    public = recoverykey.load_public(public_pem, "the recovery public key")
    master, store_id = _secret(keys)
    if private is not None:
        if recoverykey.recipient(private.public_key()) != recoverykey.recipient(public):
            raise InvalidArgument("the recovery private key is not the public key's")
        for key in read_keys(objects)[0]:
            with contextlib.suppress(FormatError):
                if recoverykey.unseal(private, key) == (store_id, master):
                    return key.info
    fields = _new_key_fields(kf.RECOVERY, label)
    fields.update(recoverykey.seal_fields(public, fields["id"], store_id, master))
    info = _put_key(objects, fields)
    crashpoints.reached("keys.added")
    return info


def recover(objects: ObjectStore, private_pem: bytes, private_passphrase: Optional[bytes],
            new_passphrase: bytes, *, where: str = "the recovery private key",
            label: Optional[str] = "recovered", expect_check: Optional[str] = None) -> KeyInfo:
    """Open the store with its recovery private key and add a passphrase key
    for `new_passphrase` (crash point ``keys.added``): access again after
    every passphrase is lost. Run again after a kill, it adds no second key
    when `new_passphrase` opens one already.

    Anyone may seal a master key of their choice to a recovery public key
    (it is shareable), so a master key unsealed is accepted only when it
    gives the store's key check: the config's and `expect_check`. With
    neither (a store made before key checks), it must open one of the
    store's point indexes (any version, in a versioned bucket); when
    nothing can check it, recovery is refused.

    Args:
        objects: the store.
        private_pem: the recovery private key, PEM PKCS#8.
        private_passphrase: the private key's own passphrase.
        new_passphrase: the passphrase of the key added.
        where: how messages name the private key (its file).
        label: the new key's label (at most 200 characters).
        expect_check: the key check the caller recorded (the vault's
            object_stores row), or None.

    Returns:
        The KeyInfo of the passphrase key `new_passphrase` opens.

    Raises:
        WrongPassphrase: the private key does not decrypt with its
            passphrase, or no recovery key file of the store is sealed to it.
        FormatError: the private key is not one; damaged config; a
            recovery key sealed to it holds a master key that fails the
            key check (or opens no point index), naming the key file and
            what it failed; nothing to check the master key against.
        InvalidArgument: an empty new passphrase.
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    if not new_passphrase:
        raise InvalidArgument("the new passphrase is empty", path=objects.spec)
    private = recoverykey.load_private(private_pem, private_passphrase, where)
    config = read_config(objects)
    keys, _ = read_keys(objects)
    search = Search(objects, config, None, expect_check)
    versions = ((url, data) for url, data in older_key_versions(objects))
    store_id, master = _recovered(objects, search, private, keys, versions)
    for key in search.ordered(keys):
        done = search.opens(key, new_passphrase)
        if done is not None and done.master == master:
            return done.key.info  # a run cut short added it
    info = _write_passphrase_key(objects, store_id, master, new_passphrase, label)
    crashpoints.reached("keys.added")
    return info


def _recovered(objects: ObjectStore, search: Search, private: Any,
                        keys: List[KeyFile], versions: Iterator[Tuple[str, bytes]]
                        ) -> Tuple[bytes, bytes]:
    """(store id, master) from the first recovery key file sealed to
    `private` whose master key passes the store's checks (the current
    files, then older versions).

    Raises:
        WrongPassphrase: no recovery key file of the store is sealed to it.
        FormatError: one is, but its master key fails the checks, or
            nothing can check it (naming the key file and why).
    """
    def candidates() -> Iterator[KeyFile]:
        yield from keys
        for url, data in versions:
            try:
                yield kf.parse_key_file(data, url.rpartition("/")[2].partition("?")[0], url)
            except FormatError:
                continue

    config = search.config
    refused: List[str] = []
    for key in candidates():
        try:
            found = recoverykey.unseal(private, key)
        except FormatError:
            continue
        if found is None or (config is not None and found[0] != config.store_id):
            continue
        why = _unchecked(objects, search, *found)
        if why is None:
            return found
        refused.append(f"{key.info.url}: {why}")
    if refused:
        raise FormatError(f"a recovery key sealed to this private key was refused: "
                          f"{'; '.join(refused)} (anyone with the recovery public key can "
                          f"seal a master key of their own: refused, it would open the "
                          f"store to them)", path=objects.spec)
    raise WrongPassphrase(f"no recovery key of the store is sealed to this private key "
                          f"(recipient {recoverykey.recipient(private.public_key())})",
                          path=objects.spec)


def _unchecked(objects: ObjectStore, search: Search, store_id: bytes,
               master: bytes) -> Optional[str]:
    """Why (store id, master) is not accepted as the store's; None when a
    key check (or, with none recorded anywhere, a point index) vouches
    for it."""
    if search.checks():
        failed = search.failed_check(store_id, master)
        return None if failed is None else f"its master key fails the key check of {failed}"
    return _index_check(objects, store_id, master)


def _index_check(objects: ObjectStore, store_id: bytes, master: bytes) -> Optional[str]:
    """None when `master` opens a point index of the store (any version, in
    a versioned bucket; objects that are no sealed pydr object are passed
    over), else why not."""
    from ..engine.sealing import KIND_INDEX, SealBroken, is_sealed

    keys = _data_keys(master, store_id)
    failed = None
    for key, version in _index_versions(objects):
        try:
            blob = objects.get(key, version=version) if version else objects.get(key)
        except FileNotFoundError:
            continue
        if not is_sealed(blob):
            continue  # junk, or a plain store's: proves nothing either way
        name = key[len(objects.key()) + 1:] if objects.key() else key
        try:
            keys.open(KIND_INDEX, blob, name)
            return None
        except SealBroken:
            failed = failed or (objects.url(key) + (f"?versionId={version}" if version else ""))
    if failed is not None:
        return f"its master key does not open the point index {failed}"
    return ("nothing can check its master key: the config records no key check and no "
            "point index is there to open (give the vault's record: 'pydr key recover ITEM')")


def _index_versions(objects: ObjectStore) -> Iterator[Tuple[str, Optional[str]]]:
    """(key, version or None) of each object under indexes/: every version
    that is not a delete marker where the store lists versions."""
    if getattr(objects, "versions", None) is not None:
        try:
            for key, version, _, marker, *_ in objects.versions("indexes"):
                if not marker:
                    yield key, version
            return
        except ConnectionError:
            raise
        except OSError:  # refused or not implemented: the current objects only
            pass
    for key, *_ in objects.list("indexes"):
        yield key, None

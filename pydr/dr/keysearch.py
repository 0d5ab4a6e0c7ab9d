"""Finding the key that opens an object store: its config and key files
read (damaged ones set aside, named), the current passphrase keys tried,
then -- in a versioned bucket -- the older versions of the key files, which
an attacker's overwrite or delete marker hid. No writes. The API is
pydr.dr.storekeys.
"""

from __future__ import annotations

import dataclasses

from ..errors import FormatError, PassphraseRequired, WrongPassphrase
from . import keyfiles as kf
from .keyfiles import KeyFile, KeyInfo, StoreConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterator, List, Optional, Tuple

    from ..endpoints.s3 import ObjectStore

CONFIG = "config"
KEYS = "keys"
WRONG_HINT = ("give the store's passphrase with --passphrase-file FILE, PYDR_PASSPHRASE_FILE "
              "or PYDR_PASSPHRASE; if every passphrase is lost, 'pydr key recover' with the "
              "recovery private key")


@dataclasses.dataclass
class Opened:
    """A key file a passphrase (or recovery key) opened, and what it sealed."""

    key: KeyFile
    store_id: bytes
    master: bytes


# -- reading ------------------------------------------------------------------------


def read_config(objects: ObjectStore) -> Optional[StoreConfig]:
    """The store's config object, or None when it has none (an empty prefix,
    a version-1 store, or a creation cut short before its config).

    Raises:
        FormatError: the config is damaged or not pydr's (naming its URL).
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    try:
        data = objects.get(objects.key(CONFIG))
    except FileNotFoundError:
        return None
    return kf.parse_config(data, objects.url(objects.key(CONFIG)))


def key_names(objects: ObjectStore) -> List[str]:
    return sorted(k for k, _, _ in objects.list(KEYS))


def read_keys(objects: ObjectStore) -> Tuple[List[KeyFile], List[KeyInfo]]:
    """(usable key files, KeyInfo of the damaged ones) under keys/."""
    good, bad = [], []
    for name in key_names(objects):
        key_id, url = name.rpartition("/")[2], objects.url(name)
        try:
            if not kf.is_key_id(key_id):
                raise FormatError("not a key file's name (32 hex digits)", path=url)
            good.append(kf.parse_key_file(objects.get(name), key_id, url))
        except FileNotFoundError:
            continue  # removed since it was listed
        except FormatError as exc:
            bad.append(KeyInfo(key_id, None, None, None, None, None, url, exc.message))
    return good, bad


def older_key_versions(objects: ObjectStore) -> Iterator[Tuple[str, bytes]]:
    """(URL, bytes) of each older version of a key file, in a versioned
    bucket: the versions an overwrite or a delete marker hid. Nothing where
    the server keeps no versions or cannot list them."""
    versions = getattr(objects, "versions", None)
    if versions is not None:  # pydr.endpoints.s3.ObjectStore with versions
        listing = ((key, version) for key, version, latest, marker, *_ in versions(KEYS)
                   if not latest and not marker)
        for key, version in listing:
            try:
                yield f"{objects.url(key)}?versionId={version}", objects.get(key, version=version)
            except FileNotFoundError:
                continue
        return
    from ..endpoints.s3 import s3_error

    client, prefix = getattr(objects, "client", None), objects.key(KEYS) + "/"
    if client is None:
        return
    try:
        pages = client.get_paginator("list_object_versions").paginate(
            Bucket=objects.bucket, Prefix=prefix)
        old = [(v["Key"], v["VersionId"]) for page in pages for v in page.get("Versions", ())
               if not v.get("IsLatest") and v.get("VersionId") not in (None, "null")]
    except Exception as exc:
        error = s3_error(exc, objects.url(prefix))
        if isinstance(error, ConnectionError):
            raise error from None
        return  # versions not kept, not listed, or not allowed: no older keys
    for key, version in old:
        try:
            body = client.get_object(Bucket=objects.bucket, Key=key, VersionId=version)["Body"]
            yield f"{objects.url(key)}?versionId={version}", body.read()
        except Exception as exc:
            error = s3_error(exc, objects.url(key))
            if isinstance(error, ConnectionError):
                raise error from None


# -- opening --------------------------------------------------------------------------


def open_with(key: KeyFile, passphrase: bytes) -> Optional[Opened]:
    """What passphrase key `key` seals, if `passphrase` opens it."""
    payload = kf.unseal(kf.passphrase_kek(passphrase, key.kdf), key)
    if payload is None:
        return None
    store_id, master = kf.parse_payload(payload, key.info.url)
    return Opened(key, store_id, master)


class Search:
    """One search of a store's passphrase keys: what opened, and what did
    not, for the error when nothing does."""

    def __init__(self, objects, config, expect_id):
        self.objects, self.config, self.expect_id = objects, config, expect_id
        self.tried: List[str] = []        # URLs of keys that did not open
        self.damaged: List[KeyInfo] = []  # files that are no key
        self.foreign: List[Tuple[str, bytes]] = []  # opened, but another store's

    def want(self) -> Optional[bytes]:
        if self.config is not None:
            return self.config.store_id
        return bytes.fromhex(self.expect_id) if self.expect_id else None

    def opens(self, key: KeyFile, passphrase: bytes) -> Optional[Opened]:
        if key.info.kind != kf.PASSPHRASE:
            return None
        try:
            opened = open_with(key, passphrase)
        except FormatError as exc:
            self.damaged.append(dataclasses.replace(key.info, problem=exc.message))
            return None
        if opened is None:
            self.tried.append(key.info.url)
        elif self.want() not in (None, opened.store_id):
            self.foreign.append((key.info.url, opened.store_id))
            return None
        return opened

    def failure(self, objects) -> Exception:
        url = objects.spec
        if self.foreign:
            where, other = self.foreign[0]
            if self.config is not None:
                return FormatError(f"the config names store {self.config.id}, but the key "
                                   f"{where} that this passphrase opens is of store "
                                   f"{other.hex()}", path=objects.url(objects.key(CONFIG)))
            return FormatError(f"the key {where} that this passphrase opens is of store "
                               f"{other.hex()}, not of {self.expect_id}", path=url)
        if not self.tried:
            if self.damaged:
                d = self.damaged[0]
                more = f" (and {len(self.damaged) - 1} more)" if len(self.damaged) > 1 else ""
                return FormatError(f"no usable passphrase key: {d.problem}{more}", path=d.url)
            return FormatError("an encrypted store without any passphrase key "
                               f"(nothing under {KEYS}/)", path=url)
        damaged = "".join(f"; {d.url}: {d.problem}" for d in self.damaged)
        return WrongPassphrase(f"no key of the store opens with this passphrase (tried "
                               f"{len(self.tried)}: {', '.join(self.tried)}; a damaged key "
                               f"file fails the same way){damaged}", path=url, hint=WRONG_HINT)


def find_keys(objects: ObjectStore, passphrase: Optional[bytes], *, expect_id=None,
            want_all=False) -> Tuple[Optional[StoreConfig], List[Opened], List[KeyFile],
                                     Search]:
    """(config, keys `passphrase` opens, every usable key file, the search):
    the first key that opens (every one with `want_all`), else the older
    versions of the key files. Nothing opening is not an error here."""
    config = read_config(objects)
    if expect_id is not None and config is not None and config.id != expect_id:
        raise FormatError(f"the config names store {config.id}, but this store was recorded "
                          f"as {expect_id}", path=objects.url(objects.key(CONFIG)))
    keys, damaged = read_keys(objects)
    search = Search(objects, config, expect_id)
    search.damaged += damaged
    if config is not None and not config.encrypted:
        if keys:
            raise FormatError(f"the config says the store is not encrypted, yet it has "
                              f"{len(keys)} key files under {KEYS}/",
                              path=objects.url(objects.key(CONFIG)))
        return config, [], [], search
    if passphrase is None:
        if config is None and not keys and not damaged:
            return None, [], [], search
        raise PassphraseRequired("an encrypted store: its passphrase is needed (none given)",
                                 path=objects.spec, hint=WRONG_HINT)
    opened: List[Opened] = []
    for key in keys:
        found = search.opens(key, passphrase)
        if found is not None:
            opened.append(found)
            if not want_all:
                break
    if not opened and (keys or damaged or config is not None or expect_id is not None):
        opened += search_versions(objects, passphrase, search)
    return config, opened, keys, search


def search_versions(objects, passphrase, search) -> List[Opened]:
    for url, data in older_key_versions(objects):
        key_id = url.rpartition("/")[2].partition("?")[0]
        try:
            key = kf.parse_key_file(data, key_id, url)
        except FormatError:
            continue  # an old damaged version: the current ones were reported
        found = search.opens(key, passphrase)
        if found is not None:
            return [found]
    return []

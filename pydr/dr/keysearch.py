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
    from typing import Any, Iterator, List, Optional, Tuple

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
        data = objects.get(objects.key(CONFIG), max_size=kf.MAX_FILE)
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
            good.append(kf.parse_key_file(objects.get(name, max_size=kf.MAX_FILE), key_id, url))
        except FileNotFoundError:
            continue  # removed since it was listed
        except FormatError as exc:
            bad.append(KeyInfo(key_id, None, None, None, None, None, url, exc.message))
    return good, bad


def key_versions(objects: ObjectStore) -> List[Tuple[str, str, bool, bool]]:
    """(key, version, is latest, is a delete marker) of every version of
    every object under keys/ that has a version id: none in a bucket that
    keeps no versions, or on a server that cannot list them."""
    from ..endpoints.s3 import s3_error

    try:
        if getattr(objects, "versions", None) is not None:
            found = [(k, v, latest, marker) for k, v, latest, marker, *_ in
                     objects.versions(KEYS)]  # type: ignore[attr-defined]
        else:
            found = _Boto3Versions(objects).list()
    except ConnectionError:
        raise
    except OSError:  # refused, or not implemented: no older keys to be had
        return []
    except Exception as exc:  # botocore's, from the fallback
        error = s3_error(exc, objects.url(objects.key(KEYS)))
        if isinstance(error, ConnectionError):
            raise error from None
        return []
    return [(k, v, latest, marker) for k, v, latest, marker in found
            if v not in (None, "", "null")]


def older_key_versions(objects: ObjectStore) -> Iterator[Tuple[str, bytes]]:
    """(URL, bytes) of each older version of a key file, in a versioned
    bucket: the versions an overwrite or a delete marker hid."""
    for key, version, latest, marker in key_versions(objects):
        if latest or marker:
            continue
        try:
            if getattr(objects, "versions", None) is not None:
                data = objects.get(key, version=version,  # type: ignore[call-arg]
                                   max_size=kf.MAX_FILE)
            else:
                data = _Boto3Versions(objects).get(key, version)
        except FileNotFoundError:
            continue
        yield f"{objects.url(key)}?versionId={version}", data


def forget_versions(objects: ObjectStore, names: List[str]) -> int:
    """Delete every version and delete marker of the key files `names`
    (object keys), in a versioned bucket: a key removed must not open from
    an older version. Returns how many versions the server refused to
    delete (Object Lock retention): those keys still open from them."""
    wanted = set(names)
    found = [(k, v, marker) for k, v, _, marker in key_versions(objects) if k in wanted]
    doomed = [(k, v) for k, v, marker in found if not marker]
    markers = [(k, v) for k, v, marker in found if marker]
    if not found:
        return 0
    # the delete markers go last, and only where no version stays (locked): a marker
    # deleted above a version kept would make the removed key current again
    if getattr(objects, "versions", None) is not None:
        refused = objects.delete_versions(doomed)  # type: ignore[attr-defined]
        kept = {k for k, *_ in refused}
        objects.delete_versions([m for m in markers if m[0] not in kept])  # type: ignore
        return len(refused)
    refused_count = _Boto3Versions(objects).delete(doomed)
    if not refused_count:
        _Boto3Versions(objects).delete(markers)
    return refused_count


class _Boto3Versions:
    """Versions of objects through boto3, for an ObjectStore without
    versions() (before pydr.endpoints.s3 had them)."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.client: Any = getattr(objects, "client", None)  # None: not S3 (a test's store)

    def list(self) -> List[Tuple[str, str, bool, bool]]:
        if self.client is None:
            return []
        pages = self.client.get_paginator("list_object_versions").paginate(
            Bucket=self.objects.bucket, Prefix=self.objects.key(KEYS) + "/")
        return [(v["Key"], v.get("VersionId"), bool(v.get("IsLatest")), marker)
                for page in pages for marker, kind in ((False, "Versions"),
                                                       (True, "DeleteMarkers"))
                for v in page.get(kind, ())]

    def get(self, key: str, version: str) -> bytes:
        from ..endpoints.s3 import s3_error

        try:
            body = self.client.get_object(Bucket=self.objects.bucket, Key=key,
                                          VersionId=version)["Body"]
            return bytes(body.read())
        except Exception as exc:
            raise s3_error(exc, self.objects.url(key)) from None

    def delete(self, pairs: List[Tuple[str, str]]) -> int:
        from ..endpoints.s3 import s3_error

        refused = 0
        for start in range(0, len(pairs), 1000):
            batch = [{"Key": k, "VersionId": v} for k, v in pairs[start:start + 1000]]
            try:
                r = self.client.delete_objects(Bucket=self.objects.bucket,
                                               Delete={"Objects": batch, "Quiet": True})
            except Exception as exc:
                raise s3_error(exc, self.objects.url(batch[0]["Key"])) from None
            refused += len(r.get("Errors", ()))
        return refused


# -- opening --------------------------------------------------------------------------


def open_with(key: KeyFile, passphrase: bytes) -> Optional[Opened]:
    """What passphrase key `key` seals, if `passphrase` opens it."""
    assert key.kdf is not None  # a passphrase key's
    payload = kf.unseal(kf.passphrase_kek(passphrase, key.kdf), key)
    if payload is None:
        return None
    store_id, master = kf.parse_payload(payload, key.info.url)
    return Opened(key, store_id, master)


#: passphrase keys with other KDF parameters than pydr's that one search tries
MAX_COSTLY_KEYS = 4


def is_default_kdf(key: KeyFile) -> bool:
    """Whether a passphrase key's KDF has the parameters pydr writes."""
    return key.kdf is not None and all(key.kdf.get(k) == v for k, v in kf.KDF.items())


def kdf_cost(key: KeyFile) -> Tuple[int, int]:
    """(0 for pydr's parameters else 1, time x memory): the order keys are tried in."""
    if key.kdf is None or is_default_kdf(key):
        return 0, 0
    return 1, key.kdf["time_cost"] * key.kdf["memory_cost"]


class Search:
    """One search of a store's passphrase keys: what opened, and what did
    not, for the error when nothing does."""

    def __init__(self, objects: ObjectStore, config: Optional[StoreConfig],
                 expect_id: Optional[str], expect_check: Optional[str] = None) -> None:
        self.objects, self.config, self.expect_id = objects, config, expect_id
        self.expect_check = expect_check
        self.tried: List[str] = []        # URLs of keys that did not open
        self.damaged: List[KeyInfo] = []  # files that are no key
        self.foreign: List[Tuple[str, bytes]] = []  # opened, but another store's
        self.unchecked: List[Tuple[str, str]] = []  # opened, but fails a key check: (url, what)
        self.skipped: List[str] = []      # not tried: too many costly KDFs before them
        self.costly = 0                   # keys tried with other KDF parameters than ours

    def checks(self) -> List[Tuple[str, str]]:
        """(key check, what records it) that a master key must match: the
        config's, and the caller's record (the vault's)."""
        found = []
        if self.config is not None and self.config.key_check is not None:
            found.append((self.config.key_check,
                          f"the config {self.objects.url(self.objects.key(CONFIG))}"))
        if self.expect_check is not None:
            found.append((self.expect_check, "the vault's record of the store"))
        return found

    def failed_check(self, store_id: bytes, master: bytes) -> Optional[str]:
        """What records a key check that (store id, master) does not match;
        None when it matches every one (or there is none)."""
        from ..engine.sealing import key_check

        mine = key_check(master, store_id)
        return next((what for check, what in self.checks() if check != mine), None)

    def want(self) -> Optional[bytes]:
        """The store id a key's payload must name (None: any)."""
        if self.config is not None:
            return self.config.store_id
        return bytes.fromhex(self.expect_id) if self.expect_id else None

    def opens(self, key: KeyFile, passphrase: bytes) -> Optional[Opened]:
        """What passphrase key `key` seals, if `passphrase` opens it and it
        is the store's; else None, and the key is noted for failure()."""
        if key.info.kind != kf.PASSPHRASE:
            return None
        if not is_default_kdf(key):
            if self.costly >= MAX_COSTLY_KEYS:
                self.skipped.append(key.info.url)
                return None
            self.costly += 1
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
        elif self.failed_check(opened.store_id, opened.master) is not None:
            self.unchecked.append((key.info.url,
                                   self.failed_check(opened.store_id, opened.master) or ""))
            return None
        return opened

    def failure(self) -> Exception:
        """The error for a search in which no key opened."""
        objects, url = self.objects, self.objects.spec
        if self.foreign:
            where, other = self.foreign[0]
            if self.config is not None:
                return FormatError(f"the config names store {self.config.id}, but the key "
                                   f"{where} that this passphrase opens is of store "
                                   f"{other.hex()}", path=objects.url(objects.key(CONFIG)))
            return FormatError(f"the key {where} that this passphrase opens is of store "
                               f"{other.hex()}, not of {self.expect_id}", path=url)
        if self.unchecked:
            where, what = self.unchecked[0]
            return FormatError(f"the key {where} opens with this passphrase, but its master "
                               f"key fails the key check that {what} records: the key file "
                               f"or that record was tampered with", path=url)
        if not self.tried:
            if self.skipped:
                return WrongPassphrase(self._skipped(), path=url, hint=WRONG_HINT)
            if self.damaged:
                d = self.damaged[0]
                more = f" (and {len(self.damaged) - 1} more)" if len(self.damaged) > 1 else ""
                return FormatError(f"no usable passphrase key: {d.problem}{more}", path=d.url)
            return FormatError("an encrypted store without any passphrase key",
                               path=url, hint="'pydr key recover' adds one with the "
                                              "store's recovery private key")
        tried = list(dict.fromkeys(self.tried))
        damaged = "".join(f"; {d.url}: {d.problem}" for d in self.damaged)
        return WrongPassphrase(f"no key of the store opens with this passphrase (tried "
                               f"{len(tried)}: {', '.join(tried)}; a damaged key file fails "
                               f"the same way){damaged}"
                               + (f"; {self._skipped()}" if self.skipped else ""),
                               path=url, hint=WRONG_HINT)

    def _skipped(self) -> str:
        skipped = list(dict.fromkeys(self.skipped))
        return (f"{len(skipped)} key files with costly KDF parameters were not tried (at most "
                f"{MAX_COSTLY_KEYS} an unlock; a credential holder may have added them): "
                f"{', '.join(skipped)}")

    def ordered(self, keys: List[KeyFile]) -> List[KeyFile]:
        """`keys` in the order to try them: those with pydr's KDF parameters
        first, then the others cheapest first (a hostile key file with
        costly parameters cannot make every unlock slow)."""
        return sorted(keys, key=kdf_cost)


#: find_keys's and storekeys.unlock's default: the config is the current object
READ = "read"


def find_keys(objects: ObjectStore, passphrase: Optional[bytes], *,
              expect_id: Optional[str] = None, want_all: bool = False, config: Any = READ,
              expect_check: Optional[str] = None
              ) -> Tuple[Optional[StoreConfig], List[Opened], List[KeyFile], Search]:
    """(config, keys `passphrase` opens, every usable key file, the search):
    the first key that opens (every one with `want_all`), else the older
    versions of the key files. Nothing opening is not an error here.
    `config`: the store's config as read (READ: the current object), or
    the one to trust instead (an older version; None: none)."""
    if config == READ:
        config = read_config(objects)
    if expect_id is not None and config is not None and config.id != expect_id:
        raise FormatError(f"the config names store {config.id}, but this store was recorded "
                          f"as {expect_id}", path=objects.url(objects.key(CONFIG)))
    keys, damaged = read_keys(objects)
    search = Search(objects, config, expect_id, expect_check)
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
    for key in search.ordered(keys):
        found = search.opens(key, passphrase)
        if found is not None:
            opened.append(found)
            if not want_all:
                break
    if not opened:  # also where nothing is left: delete markers may hide it all
        opened += search_versions(objects, passphrase, search)
    return config, opened, keys, search


def search_versions(objects: ObjectStore, passphrase: bytes, search: Search) -> List[Opened]:
    """The first older version of a key file that `passphrase` opens."""
    keys = []
    for url, data in older_key_versions(objects):
        key_id = url.rpartition("/")[2].partition("?")[0]
        try:
            keys.append(kf.parse_key_file(data, key_id, url))
        except FormatError:
            continue  # an old damaged version: the current ones were reported
    for key in search.ordered(keys):
        found = search.opens(key, passphrase)
        if found is not None:
            return [found]
    return []

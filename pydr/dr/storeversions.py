"""Opening an encrypted store whose config or key files were deleted or
overwritten, in a bucket that keeps versions (docs/FORMAT.md, "Object
Lock and versions"; docs/SECURITY.md).

The vault records the store's id and encryption (object_stores). When the
current config is gone or disagrees with that record, the store is opened
from its versions instead: the newest config version naming the recorded
store, or, with none, the key files' payload (pydr.dr.storekeys.unlock
tries the older versions of the key files). What was found is kept as
:class:`Tampering`: pydr verify reports it (exit 7), and the next cycle
puts the recorded config back. Nothing here writes.
"""

from __future__ import annotations

import dataclasses

from ..errors import FormatError
from . import keyfiles as kf
from .keysearch import CONFIG, key_versions, read_keys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

    from ..endpoints.s3 import ObjectStore
    from .keyfiles import StoreConfig


@dataclasses.dataclass
class Tampering:
    """What an attacker did to a store's config and key files.

    Attributes:
        findings: one dict per object, as pydr verify reports tampering:
            {"kind": "config"|"key", "object" (URL), "points" (filled by
            the caller), "versions" (the versions pydr trusts), "current"
            (the current version, None when deleted), "what" ("deleted" or
            "overwritten"), "text"}.
        config: the config to put back (the recorded store's, as stored).
    """

    findings: List[Dict[str, Any]]
    config: bytes

    def texts(self) -> List[str]:
        """The findings in words ("config deleted", "key K deleted")."""
        return [f["text"] for f in self.findings]


def config_problem(config: Optional[StoreConfig], damaged: Optional[FormatError],
                   record: Any) -> Optional[Tuple[str, str]]:
    """("deleted"|"overwritten", text) when the current config (`config`,
    None when there is none; `damaged`, the error reading it) is not the
    one the vault recorded (`record`: an ObjectStoreRecord), else None."""
    if damaged is not None:
        return "overwritten", f"config overwritten: not a pydr config ({damaged.message})"
    if config is None:
        return "deleted", "config deleted"
    if config.id != record.id:
        return "overwritten", f"config overwritten: names store {config.id}"
    if config.encryption != record.encryption:
        return "overwritten", f"config overwritten: says encryption {config.encryption!r}"
    return None


def recorded_config(objects: ObjectStore, record: Any
                    ) -> Optional[Tuple[StoreConfig, bytes, str]]:
    """(config, its bytes, its version) of the newest version of the config
    object that names the recorded store with its recorded encryption; None
    when no version does (every one deleted, or never one)."""
    key = objects.key(CONFIG)
    for _, version, _, marker, *_ in objects.versions_of(key):  # newest first
        if marker or not version:
            continue
        url = f"{objects.url(key)}?versionId={version}"
        try:
            data = objects.get(key, version, max_size=kf.MAX_FILE)
            config = kf.parse_config(data, url)
        except (FileNotFoundError, FormatError):
            continue
        if (config.id, config.encryption) == (record.id, record.encryption):
            return config, data, version
    return None


def key_findings(objects: ObjectStore) -> List[Dict[str, Any]]:
    """A finding per key file whose current version is a delete marker
    (its older versions still there) or no usable key (overwritten)."""
    history: Dict[str, List[Tuple[str, bool, bool]]] = {}
    for key, version, latest, marker in key_versions(objects):
        history.setdefault(key, []).append((version, latest, marker))
    _, damaged = read_keys(objects)
    overwritten = {d.url: d for d in damaged}
    found = []
    for key in sorted(history):
        kept = [v for v, latest, marker in history[key] if not latest and not marker]
        current = next(((v, marker) for v, latest, marker in history[key] if latest), None)
        key_id, url = key.rpartition("/")[2], objects.url(key)
        if current is not None and current[1] and kept:
            found.append({"kind": "key", "object": url, "points": [], "versions": kept,
                          "current": None, "what": "deleted", "text": f"key {key_id} deleted"})
        elif url in overwritten and kept:
            found.append({"kind": "key", "object": url, "points": [], "versions": kept,
                          "current": current[0] if current else None, "what": "overwritten",
                          "text": f"key {key_id} overwritten: {overwritten[url].problem}"})
    return found


def open_from_versions(objects: ObjectStore, record: Any, passphrase: Optional[bytes],
                       problem: Tuple[str, str]) -> Tuple[Any, Tampering]:
    """Open the recorded store from its versions: the newest config version
    naming it, else the key files' payload (older versions of them too).

    Args:
        objects: the store, in a bucket that keeps versions.
        record: the vault's ObjectStoreRecord (an encrypted store's).
        passphrase: the store's passphrase.
        problem: what :func:`config_problem` found.

    Returns:
        (DataKeys, Tampering).

    Raises:
        WrongPassphrase: no key version opens with `passphrase`.
        FormatError: no key version is of the recorded store.
        PermissionError, ConnectionError, OSError: S3 refused or failed.
    """
    from . import storekeys

    found = recorded_config(objects, record)
    config, keys = storekeys.unlock(objects, passphrase, expect_id=record.id,
                                    config=found[0] if found else None,
                                    expect_check=record.key_check)
    if keys is None:  # cannot be: the recorded store is encrypted
        raise FormatError(f"the store recorded as {record.id} opens as unencrypted",
                          path=objects.spec)
    what, text = problem
    url = objects.url(objects.key(CONFIG))
    current = objects.head(objects.key(CONFIG))
    findings = [{"kind": "config", "object": url, "points": [],
                 "versions": [found[2]] if found else [],
                 "current": current.get("version") if current else None,
                 "what": what, "text": text}]
    findings += key_findings(objects)
    return keys, Tampering(findings, found[1] if found else config.to_bytes())

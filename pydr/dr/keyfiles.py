"""The formats of an object store's config and key files (docs/FORMAT.md,
"Store config and key files"): parsing that trusts nothing it reads, and
the sealing of a store's master key under a passphrase (argon2id) or a
recovery public key (X25519). No I/O: pydr.dr.storekeys reads and writes
the objects.

    PREFIX/config          {"format": "pydr-object-store", "version": 2, "id",
                            "encryption", "chunk_id", "created"}
    PREFIX/keys/<key id>   {"version": 1, "id", "kind", "created", "host", "label",
                            "kdf" | "ephemeral" + "recipient", "nonce", "sealed"}

A key file seals, with AES-256-GCM under a key-encryption key, the payload
{"store": store id hex, "master": base64 32 bytes}; the associated data is
b"pydr-key\\0" + the key id in ASCII hex, so a sealed payload moved into
another key file does not open.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import re

from ..errors import FormatError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional, Tuple

FORMAT = "pydr-object-store"
CONFIG_VERSION = 2
KEY_VERSION = 1
ENCRYPTED, PLAIN = "aes-256-gcm", "none"
CHUNK_IDS = {ENCRYPTED: "hmac-sha256-128", PLAIN: "xxh3-128"}
PASSPHRASE, RECOVERY = "passphrase", "recovery"

#: argon2id parameters of new passphrase keys (memory in KiB)
KDF = {"name": "argon2id", "time_cost": 3, "memory_cost": 65536, "parallelism": 4}
#: the bounds accepted when reading a key file: a hostile one must not make
#: the KDF take the machine's memory or an hour
KDF_LIMITS = {"time_cost": (1, 16), "memory_cost": (8, 1 << 18), "parallelism": (1, 16)}
#: the times a config or key file may carry (POSIX seconds): no NaN, no
#: infinity, nothing a clock or strftime cannot hold
TIME_LIMITS = (0, 1 << 35)
SALT_BYTES, NONCE_BYTES, MASTER_BYTES, STORE_ID_BYTES = 16, 12, 32, 16
MAX_FILE = 64 << 10  # a config or key file larger than this is not ours
RECOVERY_INFO = b"pydr recovery v1"
_HEX32 = re.compile(r"[0-9a-f]{32}\Z")


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """A store's config object (``PREFIX/config``).

    Attributes:
        id: the store's id, 32 hex digits (16 random bytes).
        encryption: "aes-256-gcm" (sealed chunks and indexes) or "none".
        chunk_id: how chunks are named: "hmac-sha256-128" or "xxh3-128".
        created: when the store was made, POSIX seconds.
        version: the config format's version (2).
        key_check: the store's key check (32 hex digits,
            pydr.engine.sealing.key_check of its master key and id), or
            None in a config written before there was one (and in an
            unencrypted store's). A master key whose check differs is not
            the store's: it is never accepted.
    """

    id: str
    encryption: str
    chunk_id: str
    created: float
    version: int = CONFIG_VERSION
    key_check: Optional[str] = None

    @property
    def encrypted(self) -> bool:
        """Whether chunks and indexes are sealed."""
        return self.encryption != PLAIN

    @property
    def store_id(self) -> bytes:
        """The id's 16 raw bytes (bound into every sealed object)."""
        return bytes.fromhex(self.id)

    def to_dict(self) -> Dict[str, Any]:
        """The config object's JSON fields, in the format's order."""
        fields = {"format": FORMAT, "version": self.version, "id": self.id,
                  "encryption": self.encryption, "chunk_id": self.chunk_id,
                  "created": self.created}
        if self.key_check is not None:
            fields["key_check"] = self.key_check
        return fields

    def to_bytes(self) -> bytes:
        """The config object as stored."""
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode()


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """What a key file says about itself (nothing it seals).

    Attributes:
        id: the key id, 32 hex digits (the object's name under keys/).
        kind: "passphrase" or "recovery"; None when the file is damaged.
        created: when the key was made, POSIX seconds (None if damaged).
        host: the host name of the machine that made it.
        label: the label given when it was made, or None.
        recipient: a recovery key's recipient: SHA-256 (hex) of the
            recovery public key; None for a passphrase key.
        url: the key file's s3:// URL.
        problem: why the file is not a key file pydr can use (damaged,
            foreign, a hostile KDF cost), else None.
    """

    id: str
    kind: Optional[str]
    created: Optional[float]
    host: Optional[str]
    label: Optional[str]
    recipient: Optional[str]
    url: str
    problem: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """The fields, for --json."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class KeyFile:
    """A parsed key file: its public fields (``info``) and its sealed payload."""

    info: KeyInfo
    kdf: Optional[Dict[str, Any]]
    ephemeral: Optional[bytes]
    nonce: bytes
    sealed: bytes
    data: bytes = dataclasses.field(default=b"", repr=False)  # the file as read


# -- parsing -------------------------------------------------------------------------


def _json_object(data: bytes, url: str, what: str) -> Dict[str, Any]:
    if len(data) > MAX_FILE:
        raise FormatError(f"{len(data)} bytes: too large for {what}", path=url)
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"not {what}: {exc}", path=url) from None
    if not isinstance(obj, dict):
        raise FormatError(f"not {what}: not a JSON object", path=url)
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number pydr writes")


def _time(obj: Dict[str, Any], name: str, url: str, what: str) -> float:
    value = _field(obj, name, (int, float), url, what)
    low, high = TIME_LIMITS
    if not low <= value <= high:  # NaN compares False too
        raise FormatError(f"{what}: field {name!r} ({value!r}) is not a time", path=url)
    return value


def _field(obj: Dict[str, Any], name: str, kinds: Any, url: str, what: str) -> Any:
    value = obj.get(name)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise FormatError(f"{what}: field {name!r} missing or of the wrong type", path=url)
    return value


def _b64(obj: Dict[str, Any], name: str, url: str, what: str, size: Optional[int] = None,
         minimum: int = 0) -> bytes:
    text = _field(obj, name, str, url, what)
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise FormatError(f"{what}: field {name!r} is not base64", path=url) from None
    if (size is not None and len(raw) != size) or len(raw) < minimum:
        raise FormatError(f"{what}: field {name!r} has {len(raw)} bytes", path=url)
    return raw


def parse_config(data: bytes, url: str) -> StoreConfig:
    """The StoreConfig in a config object's bytes.

    Raises:
        FormatError: not a pydr store config, another version, or a field
            missing, malformed or inconsistent (named, with `url`).
    """
    what = "a pydr object store config"
    obj = _json_object(data, url, what)
    if obj.get("format") != FORMAT:
        raise FormatError(f"not {what} (format {obj.get('format')!r})", path=url)
    version = _field(obj, "version", int, url, what)
    if version != CONFIG_VERSION:
        raise FormatError(f"a store config of version {version}; this pydr reads version "
                          f"{CONFIG_VERSION}", path=url)
    ident = _field(obj, "id", str, url, what)
    if not _HEX32.match(ident):
        raise FormatError(f"{what}: its id {ident!r} is not 32 hex digits", path=url)
    encryption = _field(obj, "encryption", str, url, what)
    if encryption not in CHUNK_IDS:
        raise FormatError(f"{what}: unknown encryption {encryption!r}", path=url)
    chunk_id = _field(obj, "chunk_id", str, url, what)
    if chunk_id != CHUNK_IDS[encryption]:
        raise FormatError(f"{what}: chunk ids {chunk_id!r} with encryption {encryption!r}",
                          path=url)
    created = _time(obj, "created", url, what)
    check = obj.get("key_check")
    if check is not None and (not isinstance(check, str) or not _HEX32.match(check)):
        raise FormatError(f"{what}: its key_check {check!r} is not 32 hex digits", path=url)
    return StoreConfig(ident, encryption, chunk_id, created, version, check)


def parse_key_file(data: bytes, key_id: str, url: str) -> KeyFile:
    """The KeyFile in the bytes of object keys/`key_id`.

    Raises:
        FormatError: not a pydr key file of version 1, its id is not its
            name, a field is missing or malformed, or its KDF asks for more
            than KDF_LIMITS allow.
    """
    what = "a pydr key file"
    obj = _json_object(data, url, what)
    version = _field(obj, "version", int, url, what)
    if version != KEY_VERSION:
        raise FormatError(f"a key file of version {version}; this pydr reads version "
                          f"{KEY_VERSION}", path=url)
    if obj.get("id") != key_id:
        raise FormatError(f"{what}: its id {obj.get('id')!r} is not its name", path=url)
    kind = _field(obj, "kind", str, url, what)
    created = _time(obj, "created", url, what)
    host = obj.get("host")
    label = obj.get("label")
    if not isinstance(host, (str, type(None))) or not isinstance(label, (str, type(None))):
        raise FormatError(f"{what}: host and label are text", path=url)
    kdf = ephemeral = recipient = None
    if kind == PASSPHRASE:
        kdf = _parse_kdf(obj.get("kdf"), url)
    elif kind == RECOVERY:
        ephemeral = _b64(obj, "ephemeral", url, what, 32)
        recipient = _field(obj, "recipient", str, url, what)
        if not re.fullmatch(r"[0-9a-f]{64}", recipient):
            raise FormatError(f"{what}: its recipient is not a SHA-256 in hex", path=url)
    else:
        raise FormatError(f"{what}: unknown kind {kind!r}", path=url)
    nonce = _b64(obj, "nonce", url, what, NONCE_BYTES)
    sealed = _b64(obj, "sealed", url, what, minimum=16)
    info = KeyInfo(key_id, kind, created, host, label, recipient, url)
    return KeyFile(info, kdf, ephemeral, nonce, sealed, bytes(data))


def _parse_kdf(kdf: Any, url: str) -> Dict[str, Any]:
    what = "a pydr key file's kdf"
    if not isinstance(kdf, dict) or kdf.get("name") != "argon2id":
        raise FormatError(f"{what} is not argon2id", path=url)
    out: Dict[str, Any] = {"name": "argon2id"}
    for name, (low, high) in KDF_LIMITS.items():
        value = _field(kdf, name, int, url, what)
        if not low <= value <= high:
            raise FormatError(f"{what}: {name} {value} is outside [{low}, {high}]", path=url)
        out[name] = value
    if out["memory_cost"] < 8 * out["parallelism"]:
        raise FormatError(f"{what}: memory_cost below 8 KiB a lane", path=url)
    out["salt"] = _b64(kdf, "salt", url, what, minimum=SALT_BYTES)
    return out


# -- sealing -------------------------------------------------------------------------


def associated_data(key_id: str) -> bytes:
    """The AEAD associated data of key file `key_id`'s payload."""
    return b"pydr-key\0" + key_id.encode("ascii")


def payload_bytes(store_id: bytes, master: bytes) -> bytes:
    """The key payload (JSON) that a key file seals."""
    return json.dumps({"store": store_id.hex(),
                       "master": base64.b64encode(master).decode()}).encode()


def parse_payload(data: bytes, url: str) -> Tuple[bytes, bytes]:
    """(store id, master key) from an opened payload.

    Raises:
        FormatError: the payload is not one (it authenticated, so whoever
            made the key file made it so).
    """
    what = "a pydr key payload"
    obj = _json_object(data, url, what)
    store = _field(obj, "store", str, url, what)
    if not _HEX32.match(store):
        raise FormatError(f"{what}: its store id is not 32 hex digits", path=url)
    return bytes.fromhex(store), _b64(obj, "master", url, what, MASTER_BYTES)


def passphrase_kek(passphrase: bytes, kdf: Dict[str, Any]) -> bytes:
    """The 32-byte key-encryption key argon2id derives from a passphrase
    with a key file's parameters (``kdf``: name, time_cost, memory_cost in
    KiB, parallelism, salt as bytes)."""
    from argon2.low_level import Type, hash_secret_raw

    return hash_secret_raw(passphrase, kdf["salt"], time_cost=kdf["time_cost"],
                           memory_cost=kdf["memory_cost"], parallelism=kdf["parallelism"],
                           hash_len=32, type=Type.ID)


def recovery_kek(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    """The 32-byte key-encryption key of a recovery key file:
    HKDF-SHA256(X25519 shared secret, salt = ephemeral public key +
    recipient public key (raw), info = b"pydr recovery v1")."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient,
                info=RECOVERY_INFO).derive(shared)


def seal(kek: bytes, key_id: str, store_id: bytes, master: bytes) -> Tuple[bytes, bytes]:
    """(nonce, sealed payload) of key file `key_id` under `kek`."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(kek).encrypt(nonce, payload_bytes(store_id, master),
                                      associated_data(key_id))


def unseal(kek: bytes, key: KeyFile) -> Optional[bytes]:
    """The payload `key` seals under `kek`, or None when it does not open
    (another passphrase, or a damaged file: AES-GCM cannot tell them apart)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(kek).decrypt(key.nonce, key.sealed, associated_data(key.info.id))
    except InvalidTag:
        return None


def key_file_bytes(fields: Dict[str, Any]) -> bytes:
    """A key file's bytes: its fields (bytes values as base64), in order."""
    def text(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: text(v) for k, v in value.items()}
        return base64.b64encode(value).decode() if isinstance(value, bytes) else value

    return (json.dumps(text(fields), indent=2) + "\n").encode()


def recipient_of(public_raw: bytes) -> str:
    """The recipient field naming a recovery public key (32 raw bytes)."""
    return hashlib.sha256(public_raw).hexdigest()


def is_key_id(text: str) -> bool:
    """Whether `text` is a key id (32 lower-case hex digits)."""
    return bool(_HEX32.match(text))

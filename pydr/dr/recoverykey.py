"""Recovery keys of object stores: an X25519 key pair whose public half
seals a store's master key in a key file of kind "recovery" (anyone may
add one, given the public key), and whose private half -- kept offline,
PEM PKCS#8 encrypted with a passphrase of its own -- opens it when every
passphrase of the store is lost (in the manner of Proxmox Backup Server's
master key). The key file's format: pydr.dr.keyfiles, docs/FORMAT.md.

Sealing: a fresh ephemeral X25519 key agrees a secret with the recipient;
HKDF-SHA256(secret, salt = ephemeral public + recipient public, info =
b"pydr recovery v1") is the AES-256-GCM key of the payload.
"""

from __future__ import annotations

import os

from ..errors import FormatError, InvalidArgument, WrongPassphrase
from . import keyfiles as kf

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional, Tuple

    from cryptography.hazmat.primitives.asymmetric.x25519 import (X25519PrivateKey,
                                                                  X25519PublicKey)

PRIVATE_MODE = 0o600


def _raw(public: X25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization as S

    return bytes(public.public_bytes(S.Encoding.Raw, S.PublicFormat.Raw))


def load_public(pem: bytes, where: str) -> X25519PublicKey:
    """The X25519 public key in PEM (SubjectPublicKeyInfo) bytes.

    Raises:
        FormatError: not a PEM public key, or not an X25519 one (naming
            `where`).
    """
    from cryptography.hazmat.primitives import serialization as S
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    try:
        key = S.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"not a PEM public key: {exc}", path=where) from None
    if not isinstance(key, X25519PublicKey):
        raise FormatError(f"a {type(key).__name__}, not an X25519 public key (make one with "
                          f"'pydr key create-recovery')", path=where)
    return key


def load_private(pem: bytes, passphrase: Optional[bytes], where: str) -> X25519PrivateKey:
    """The X25519 private key in PEM (PKCS#8) bytes, decrypted with
    `passphrase`.

    Raises:
        WrongPassphrase: the passphrase does not decrypt it.
        InvalidArgument: it is encrypted and no passphrase was given.
        FormatError: not a PEM private key, or not an X25519 one.
    """
    from cryptography.hazmat.primitives import serialization as S
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    encrypted = b"ENCRYPTED PRIVATE KEY" in pem[:200]
    try:
        key = S.load_pem_private_key(pem, password=passphrase if encrypted else None)
    except TypeError:
        raise InvalidArgument("the recovery private key is encrypted: its passphrase is "
                              "needed", path=where) from None
    except ValueError as exc:
        if encrypted:
            raise WrongPassphrase("the passphrase does not decrypt the recovery private key",
                                  path=where) from None
        raise FormatError(f"not a PEM private key: {exc}", path=where) from None
    if not isinstance(key, X25519PrivateKey):
        raise FormatError(f"a {type(key).__name__}, not an X25519 private key", path=where)
    return key


def recipient(public: X25519PublicKey) -> str:
    """The "recipient" field naming a public key (SHA-256 of its raw bytes, hex)."""
    return kf.recipient_of(_raw(public))


def seal_fields(public: X25519PublicKey, key_id: str, store_id: bytes, master: bytes) -> Dict[str, Any]:
    """The fields of recovery key file `key_id` sealing the master key to
    `public`: ephemeral, recipient, nonce, sealed."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = _raw(ephemeral.public_key())
    kek = kf.recovery_kek(ephemeral.exchange(public), ephemeral_raw, _raw(public))
    nonce, sealed = kf.seal(kek, key_id, store_id, master)
    return {"ephemeral": ephemeral_raw, "recipient": recipient(public), "nonce": nonce,
            "sealed": sealed}


def unseal(private: X25519PrivateKey, key: kf.KeyFile) -> Optional[Tuple[bytes, bytes]]:
    """(store id, master) that recovery key file `key` seals to `private`'s
    public key, or None when it does not open.

    Raises:
        FormatError: it opens, and the payload is not a key payload.
    """
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    public = private.public_key()
    if key.info.kind != kf.RECOVERY or key.info.recipient != recipient(public) \
            or key.ephemeral is None:
        return None
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(key.ephemeral))
    except ValueError:  # a degenerate ephemeral key (all-zero secret): not ours
        return None
    payload = kf.unseal(kf.recovery_kek(shared, key.ephemeral, _raw(public)), key)
    return None if payload is None else kf.parse_payload(payload, key.info.url)


def make_recovery_pair(private_path: str | os.PathLike[str],
                       public_path: str | os.PathLike[str], passphrase: bytes) -> str:
    """Make a recovery key pair: the private key as PEM PKCS#8 encrypted
    with `passphrase` (file mode 0600), the public key as PEM
    SubjectPublicKeyInfo. Neither file may exist already; each is written
    beside its name, synced, and linked into place (a kill leaves the file
    whole or absent).

    Args:
        private_path: where the private key goes (keep it offline).
        public_path: where the public key goes ('pydr key add-recovery'...).
        passphrase: encrypts the private key; not empty.

    Returns:
        The recipient (hex SHA-256 of the raw public key) that recovery key
        files sealed to this pair carry.

    Raises:
        InvalidArgument: an empty passphrase, or both paths the same.
        FileExistsError: a file is in the way (nothing is overwritten).
        OSError: a file cannot be written.
    """
    from cryptography.hazmat.primitives import serialization as S
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    if not passphrase:
        raise InvalidArgument("the recovery key's passphrase is empty")
    if os.path.abspath(private_path) == os.path.abspath(public_path):
        raise InvalidArgument("the private and the public key need two files",
                              path=os.fspath(private_path))
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise FileExistsError(17, "a file is in the way (not overwritten)", os.fspath(path))
    private = X25519PrivateKey.generate()
    private_pem = private.private_bytes(S.Encoding.PEM, S.PrivateFormat.PKCS8,
                                        S.BestAvailableEncryption(passphrase))
    public_pem = private.public_key().public_bytes(S.Encoding.PEM,
                                                   S.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, PRIVATE_MODE)
    _write_new(public_path, public_pem, 0o644)
    return recipient(private.public_key())


def _write_new(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    """Write a file that must not exist: a private temporary beside it,
    synced, then hard-linked to its name (which fails if one appeared)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.pydr-new.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
    finally:
        os.unlink(temp)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

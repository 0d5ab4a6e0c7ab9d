"""Sealed objects: what an encrypted object store holds (docs/FORMAT.md,
"Sealed objects").

Every chunk and point index of an encrypted store is an envelope around
the plain object (a chunk object, a point index):

    "PYDRSEAL" | version u16 = 1 | kind u16 | nonce (12) | AES-256-GCM ciphertext and tag

sealed with the store's encryption key. The associated data is the
envelope's first 24 bytes, the store's id and the object's name relative
to the store's prefix: an object renamed onto another's name, moved from
another store, or given another kind fails to open. A chunk's name is an
HMAC-SHA-256 of its plaintext under a second key (its first 16 bytes), so
names say nothing about contents and equal chunks are still one object.

Both keys come from the store's master key and id by HKDF-SHA256; the
master key itself is kept only wrapped, in the store's key files
(pydr.dr.storekeys).
"""

import hmac
import os
import struct

CIPHER = "aes-256-gcm"
CHUNK_ID = "hmac-sha256-128"
MAGIC = b"PYDRSEAL"
VERSION = 1
KIND_CHUNK, KIND_INDEX = 1, 2
NONCE_SIZE, TAG_SIZE, KEY_SIZE, ID_SIZE = 12, 16, 32, 16
_HEAD = struct.Struct("<8sHH12s")  # magic, version, kind, nonce
OVERHEAD = _HEAD.size + TAG_SIZE


class SealBroken(ValueError):
    """A sealed object does not open: damaged, renamed, of another store or
    kind, or not sealed at all. The caller names the object."""


def is_sealed(blob):
    """Whether `blob` starts like a sealed object (not that it opens)."""
    return bytes(blob[:len(MAGIC)]) == MAGIC


class DataKeys:
    """The keys of one store's data: chunk and index encryption, chunk names.

    Args:
        master: the store's 32-byte master key.
        store_id: the store's 16-byte id (its config's "id").
    """

    __slots__ = ("store_id", "_master", "_aead", "_mac")

    def __init__(self, master, store_id):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        if len(master) != KEY_SIZE or len(store_id) != ID_SIZE:
            raise ValueError(f"a master key is {KEY_SIZE} bytes and a store id {ID_SIZE}")
        self.store_id, self._master = bytes(store_id), bytes(master)
        okm = HKDF(hashes.SHA256(), 2 * KEY_SIZE, salt=self.store_id,
                   info=b"pydr data keys v1").derive(self._master)
        self._aead = AESGCM(okm[:KEY_SIZE])
        self._mac = okm[KEY_SIZE:]

    def __repr__(self):
        return f"<DataKeys of store {self.store_id.hex()}>"  # never the keys

    def chunk_id(self, data):
        """The 16-byte name of a chunk's bytes: HMAC-SHA-256, first 16 bytes."""
        return hmac.digest(self._mac, data, "sha256")[:ID_SIZE]

    def _ad(self, head, name):
        return b"".join((head, self.store_id, name.encode()))

    def seal(self, kind, plain, name):
        """The sealed object (bytes-like: a bytearray where cryptography has
        AESGCM.encrypt_into) of `plain` (bytes-like) of `kind` (KIND_CHUNK,
        KIND_INDEX) stored under `name` (relative to the store's prefix)."""
        nonce = os.urandom(NONCE_SIZE)
        head = _HEAD.pack(MAGIC, VERSION, kind, nonce)
        ad = self._ad(head, name)
        encrypt_into = getattr(self._aead, "encrypt_into", None)  # newer cryptography
        if encrypt_into is None:
            return head + self._aead.encrypt(nonce, plain, ad)
        # one buffer for the whole object: no 4 MiB copy of the ciphertext
        out = bytearray(len(head) + len(plain) + TAG_SIZE)
        out[:len(head)] = head
        encrypt_into(nonce, plain, ad, memoryview(out)[len(head):])
        return out

    def open(self, kind, blob, name):
        """The plain object sealed in `blob` as `kind` under `name`;
        SealBroken when it is not exactly that."""
        from cryptography.exceptions import InvalidTag

        if len(blob) < OVERHEAD:
            raise SealBroken(f"too short to be a sealed object ({len(blob)} bytes)")
        magic, version, got, nonce = _HEAD.unpack_from(blob)
        if magic != MAGIC:
            raise SealBroken("not a sealed object (an unencrypted store's, or foreign)")
        if version != VERSION:
            raise SealBroken(f"sealed object version {version} is not supported")
        if got != kind:
            raise SealBroken(f"a sealed object of kind {got}, not {kind}")
        head = bytes(blob[:_HEAD.size])
        try:
            return self._aead.decrypt(nonce, memoryview(blob)[_HEAD.size:], self._ad(head, name))
        except InvalidTag:
            raise SealBroken("fails authentication: damaged, or not this store's object of "
                             "this name") from None

    def export(self):
        """The keys as a plain dict, for a worker that captures a cycle
        (pydr.dr.chunkcapture.task): it holds the master key."""
        return {"master": self._master.hex(), "store": self.store_id.hex()}

    @classmethod
    def imported(cls, exported):
        """The DataKeys of :meth:`export`'s dict."""
        return cls(bytes.fromhex(exported["master"]), bytes.fromhex(exported["store"]))


KEY_CHECK_INFO = b"pydr key check v1"


def key_check(master, store_id):
    """The store's key check (32 hex digits): a value only its master key
    gives, kept in the config and the vault, so a master key sealed by
    someone else (anyone can seal to a recovery public key) is refused.
    HMAC-SHA-256(HKDF-SHA256(master, salt=store id, info=b"pydr key check
    v1"), b"pydr key check"), its first 16 bytes.

    Args:
        master: the store's 32-byte master key.
        store_id: the store's 16-byte id.

    Returns:
        32 lower-case hex digits.

    Raises:
        ValueError: a master key or store id of the wrong size.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if len(master) != KEY_SIZE or len(store_id) != ID_SIZE:
        raise ValueError(f"a master key is {KEY_SIZE} bytes and a store id {ID_SIZE}")
    checker = HKDF(hashes.SHA256(), KEY_SIZE, salt=bytes(store_id),
                   info=KEY_CHECK_INFO).derive(bytes(master))
    return hmac.digest(checker, b"pydr key check", "sha256")[:ID_SIZE].hex()

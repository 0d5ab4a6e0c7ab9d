"""DataKeys.seal writes the whole sealed object into one buffer where
`cryptography` has AESGCM.encrypt_into (a 4 MiB copy less per chunk:
benchmarks/bench_sealing.py), else joins header and ciphertext; the two
ways make the same format, and open takes any bytes-like object."""

import os

from pydr.engine.sealing import KIND_CHUNK, OVERHEAD, DataKeys


class WithoutEncryptInto:
    """An AESGCM as cryptography < 45 has it: no encrypt_into."""

    def __init__(self, aead):
        self.aead = aead

    def encrypt(self, *args):
        return self.aead.encrypt(*args)

    def decrypt(self, *args):
        return self.aead.decrypt(*args)


def test_both_ways_of_sealing_make_objects_either_opens():
    master, store = os.urandom(32), os.urandom(16)
    new, old = DataKeys(master, store), DataKeys(master, store)
    old._aead = WithoutEncryptInto(old._aead)
    plain, name = os.urandom(100_000), "chunks/abcd/" + "ab" * 16
    for sealer, opener in ((new, old), (old, new), (new, new), (old, old)):
        blob = sealer.seal(KIND_CHUNK, plain, name)
        assert len(blob) == len(plain) + OVERHEAD and plain not in blob
        assert opener.open(KIND_CHUNK, blob, name) == plain


def test_open_takes_any_bytes_like_object():
    k = DataKeys(os.urandom(32), os.urandom(16))
    plain, name = os.urandom(5000), "indexes/vm/x.pidx"
    blob = k.seal(KIND_CHUNK, plain, name)
    for form in (bytes(blob), bytearray(blob), memoryview(bytes(blob))):
        assert k.open(KIND_CHUNK, form, name) == plain

"""Sealed objects (pydr.engine.sealing): what an encrypted store's chunks
and indexes are wrapped in."""

import os

import pytest

from pydr.engine.sealing import KIND_CHUNK, KIND_INDEX, DataKeys, SealBroken, is_sealed


def keys(store_id=b"s" * 16, master=b"m" * 32):
    return DataKeys(master, store_id)


def test_a_sealed_object_opens_only_as_itself():
    k = keys()
    plain = os.urandom(5000)
    blob = k.seal(KIND_CHUNK, plain, "chunks/abcd/abcd00")
    assert is_sealed(blob) and plain not in blob
    assert k.open(KIND_CHUNK, blob, "chunks/abcd/abcd00") == plain
    for kind, name, other in ((KIND_CHUNK, "chunks/abcd/abcd01", k),  # renamed
                              (KIND_INDEX, "chunks/abcd/abcd00", k),  # another kind
                              (KIND_CHUNK, "chunks/abcd/abcd00", keys(b"t" * 16)),  # store
                              (KIND_CHUNK, "chunks/abcd/abcd00", keys(master=b"n" * 32))):
        with pytest.raises(SealBroken):
            other.open(kind, blob, name)
    for at in (0, 10, 13, 30, len(blob) - 1):  # magic, kind, nonce, ciphertext, tag
        bad = bytearray(blob)
        bad[at] ^= 1
        with pytest.raises(SealBroken):
            k.open(KIND_CHUNK, bytes(bad), "chunks/abcd/abcd00")
    with pytest.raises(SealBroken):
        k.open(KIND_CHUNK, blob[:20], "chunks/abcd/abcd00")


def test_chunk_names_are_keyed_and_the_keys_travel_as_a_dict():
    k = keys()
    data = b"x" * 4096
    assert k.chunk_id(data) != keys(master=b"n" * 32).chunk_id(data)
    assert len(k.chunk_id(data)) == 16 and k.chunk_id(data) == k.chunk_id(bytes(data))
    again = DataKeys.imported(k.export())
    assert again.chunk_id(data) == k.chunk_id(data)
    assert again.open(KIND_INDEX, k.seal(KIND_INDEX, b"i", "indexes/vm/x.pidx"),
                      "indexes/vm/x.pidx") == b"i"
    assert "m" * 8 not in repr(k)
    with pytest.raises(ValueError):
        DataKeys(b"short", b"s" * 16)


def test_the_key_check_depends_on_the_master_and_the_store_and_says_nothing_else():
    from pydr.engine.sealing import key_check

    check = key_check(b"m" * 32, b"s" * 16)
    assert len(check) == 32 and int(check, 16) >= 0
    assert check == key_check(b"m" * 32, b"s" * 16)
    assert check != key_check(b"n" * 32, b"s" * 16)
    assert check != key_check(b"m" * 32, b"t" * 16)
    # not the data keys' chunk id of anything obvious: another HKDF info
    assert check != keys().chunk_id(b"pydr key check").hex()
    with pytest.raises(ValueError):
        key_check(b"short", b"s" * 16)

"""Signature.diff: changed byte ranges, coalesced, against a brute-force model."""

import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pydr


def brute_force(a, b, bs):
    n = max(-(-len(a) // bs), -(-len(b) // bs))
    changed = [a[i * bs:(i + 1) * bs] != b[i * bs:(i + 1) * bs] for i in range(n)]
    ranges, limit = [], max(len(a), len(b))
    for i, c in enumerate(changed):
        if not c:
            continue
        start, end = i * bs, min((i + 1) * bs, limit)
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1][1] += end - start
        else:
            ranges.append([start, end - start])
    return ranges


def sign_bytes(tmp_path, name, data, bs):
    p = tmp_path / name
    p.write_bytes(data)
    return pydr.signature(p, block_size=bs)


def test_identical_images_have_no_diff(tmp_path):
    data = os.urandom(100_000)
    a = sign_bytes(tmp_path, "a", data, 4096)
    b = sign_bytes(tmp_path, "b", data, 4096)
    d = a.diff(b)
    assert d.shape == (0, 2) and d.dtype == np.uint64


def test_one_byte_at_block_edges(tmp_path):
    bs = 4096
    data = bytearray(os.urandom(10 * bs))
    a = sign_bytes(tmp_path, "a", bytes(data), bs)
    for pos in (0, bs - 1, bs, 5 * bs - 1, 10 * bs - 1):
        changed = bytearray(data)
        changed[pos] ^= 1
        b = sign_bytes(tmp_path, "b", bytes(changed), bs)
        assert a.diff(b).tolist() == [[pos // bs * bs, bs]]


def test_growth_and_shrinkage(tmp_path):
    bs = 1024
    data = os.urandom(5 * bs + 100)
    a = sign_bytes(tmp_path, "a", data, bs)
    grown = sign_bytes(tmp_path, "b", data + b"more" * 600, bs)
    assert a.diff(grown).tolist() == brute_force(data, data + b"more" * 600, bs)
    shrunk = sign_bytes(tmp_path, "c", data[:2 * bs + 1], bs)
    assert a.diff(shrunk).tolist() == [[2 * bs, len(data) - 2 * bs]]
    assert shrunk.diff(a).tolist() == [[2 * bs, len(data) - 2 * bs]]


def test_incompatible_signatures(tmp_path):
    data = os.urandom(10_000)
    a = sign_bytes(tmp_path, "a", data, 4096)
    b = sign_bytes(tmp_path, "b", data, 1024)
    with pytest.raises(pydr.IncompatibleSignatures):
        a.diff(b)
    c = pydr.signature(tmp_path / "a", block_size=4096, algorithm="xxh3-64")
    with pytest.raises(ValueError):
        a.diff(c)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), size=st.integers(0, 40_000), bs=st.sampled_from([512, 1024, 4096]),
       edits=st.lists(st.tuples(st.integers(0, 45_000), st.integers(1, 3000)), max_size=8),
       new_size=st.one_of(st.none(), st.integers(0, 45_000)))
def test_diff_matches_brute_force(tmp_path, seed, size, bs, edits, new_size):
    rng = random.Random(seed)
    old = rng.randbytes(size)
    new = bytearray(old)
    if new_size is not None:
        new = new[:new_size] + bytes(max(0, new_size - len(new)))
    for off, length in edits:
        if off < len(new):
            new[off:off + length] = rng.randbytes(min(length, len(new) - off))
    a = sign_bytes(tmp_path, "a", old, bs)
    b = sign_bytes(tmp_path, "b", bytes(new), bs)
    assert a.diff(b).tolist() == brute_force(old, bytes(new), bs)


def test_diff_is_vectorised_on_large_signatures():
    n = 1_000_000
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, size=(n, 2), dtype=np.uint64)
    h2 = h.copy()
    idx = rng.choice(n, 1000, replace=False)
    h2[idx, 1] ^= np.uint64(1)
    a = pydr.Signature(4096, n * 4096, "xxh3-128", h, np.zeros(n, bool))
    b = pydr.Signature(4096, n * 4096, "xxh3-128", h2, np.zeros(n, bool))
    d = a.diff(b)
    assert int(d[:, 1].sum()) == 1000 * 4096
    blocks = sorted(b for off, length in d.tolist()
                    for b in range(off // 4096, (off + length) // 4096))
    assert blocks == sorted(idx.tolist())

"""pytest-benchmark: the data path's crypto, in-process, on one 4 MiB chunk
(pydr.engine.sealing; docs/FORMAT.md, "Sealed objects").

    pytest benchmarks/bench_sealing.py --benchmark-only

What an encrypted store adds per chunk: a seal on upload (AES-256-GCM), an
open on restore, and a keyed name (HMAC-SHA-256) in place of XXH3-128. The
whole-process comparison on a real S3 server is compare_s3.py.
"""

import os

import pytest

from pydr.engine.chunks import CHUNK_SIZE, chunk_id
from pydr.engine.sealing import KIND_CHUNK, DataKeys


@pytest.fixture(scope="module")
def chunk():
    keys = DataKeys(os.urandom(32), os.urandom(16))
    data = os.urandom(CHUNK_SIZE)
    name = "chunks/" + keys.chunk_id(data).hex()[:4] + "/" + keys.chunk_id(data).hex()
    return keys, data, name


def _rate(benchmark, nbytes):
    if benchmark.stats is not None:  # None with --benchmark-disable (a plain test run)
        benchmark.extra_info["MiB/s"] = nbytes / (1 << 20) / benchmark.stats.stats.median


def test_seal(benchmark, chunk):
    keys, data, name = chunk
    sealed = benchmark(keys.seal, KIND_CHUNK, data, name)
    assert keys.open(KIND_CHUNK, sealed, name) == data
    _rate(benchmark, len(data))


def test_open(benchmark, chunk):
    keys, data, name = chunk
    sealed = keys.seal(KIND_CHUNK, data, name)
    assert benchmark(keys.open, KIND_CHUNK, sealed, name) == data
    _rate(benchmark, len(data))


@pytest.mark.parametrize("store", ["encrypted", "unencrypted"])
def test_chunk_id(benchmark, chunk, store):
    """The chunk's name: HMAC-SHA-256 (encrypted store) or XXH3-128."""
    keys, data, _ = chunk
    name_of = keys.chunk_id if store == "encrypted" else chunk_id
    assert len(benchmark(name_of, data)) == 16
    _rate(benchmark, len(data))

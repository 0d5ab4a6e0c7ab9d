"""Threads, progress and cancellation."""

import os
import random
import threading
import time

import pytest

import pydr
from pydr.engine import devices
from pydr.engine import bindings as B

from conftest import write_sparse


@pytest.fixture
def mixed(tmp_path):
    rng = random.Random(1)
    size = 9 * (1 << 20) + 333
    path = tmp_path / "mixed.img"
    islands = [(i * (1 << 20) + rng.randrange(4096), rng.randbytes(rng.randrange(1, 600_000)))
               for i in range(0, 9, 2)]
    write_sparse(path, size, islands)
    return path


@pytest.mark.parametrize("block_size", [512, 4096, 65536])
def test_same_result_for_every_thread_count(mixed, monkeypatch, block_size):
    # Small chunks so that many chunks (and so real interleaving) happen.
    monkeypatch.setattr(devices, "CHUNK_BYTES", 256 << 10)
    ref = pydr.signature(mixed, block_size=block_size, threads=1)
    for threads in (2, 3, 4, 7, 16):
        sig = pydr.signature(mixed, block_size=block_size, threads=threads)
        assert sig == ref, threads
        assert sig.stats.threads == min(threads, -(-ref.block_count // max(1, (256 << 10) // block_size)))


def test_progress_records(mixed, monkeypatch):
    monkeypatch.setattr(devices, "CHUNK_BYTES", 64 << 10)
    records = []
    sig = pydr.signature(mixed, block_size=4096, threads=2, progress=records.append)
    assert records, "progress was never called"
    last = records[-1]
    assert last.finished and last.done_bytes == last.total_bytes == sig.size
    assert last.read_bytes == sig.stats.bytes_read
    dones = [r.done_bytes for r in records]
    assert dones == sorted(dones)
    assert all(r.operation == "signature" and r.path == str(mixed) for r in records)
    # throttled: at most ~10 per second plus the final one
    assert len(records) <= last.elapsed / 0.1 + 2


def test_cancel_already_set():
    ev = threading.Event()
    ev.set()
    path = "/proc/self/exe"  # any readable file
    with pytest.raises(pydr.Cancelled):
        pydr.signature(os.path.realpath(path), cancel=ev)


def test_c_signer_honours_the_cancel_flag(mixed):
    progress = B.Progress()
    progress.request_cancel()
    size = os.path.getsize(mixed)
    n = -(-size // 4096)
    hashes, mask = bytearray(n * 16), bytearray(n)
    with B.OutputBuffers(hashes, mask, 2) as out, B.Signer(4096, B.ALGORITHMS["xxh3-128"]) as s:
        h, z = out.at(0)
        with pytest.raises(pydr.Cancelled) as info:
            s.sign(os.open(mixed, os.O_RDONLY), 0, size, h, z, n, progress, str(mixed))
    assert info.value.offset is not None


@pytest.mark.slow
def test_cancel_stops_promptly(tmp_path):
    path = tmp_path / "dense.img"
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(chunk)
    ev = threading.Event()
    seen = []

    def on_progress(rec):
        seen.append(rec)
        ev.set()

    # pread and 512-byte blocks: slow enough that 1 GiB is far from done
    # when the first progress report (after ~50 ms) cancels it.
    start = time.monotonic()
    with pytest.raises(pydr.Cancelled):
        pydr.signature(path, block_size=512, threads=1, use_mmap=False,
                       progress=on_progress, cancel=ev)
    assert seen and seen[-1].done_bytes < seen[-1].total_bytes
    assert time.monotonic() - start < 5


def test_invalid_arguments(mixed):
    with pytest.raises(ValueError):
        pydr.signature(mixed, threads=0)
    with pytest.raises(ValueError):
        pydr.signature(mixed, block_size=3000)
    with pytest.raises(ValueError):
        pydr.signature(mixed, block_size=256)
    with pytest.raises(ValueError):
        pydr.signature(mixed, block_size=128 << 20)
    with pytest.raises(ValueError):
        pydr.signature(mixed, algorithm="md5")

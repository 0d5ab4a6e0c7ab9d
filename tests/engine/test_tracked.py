"""A tracked resync batched by the bytes of its changed spans (pydr.engine.tracked):
scattered spans across many windows give exactly what a cold full resync gives --
the replica, its signature cache and the undo journal, record for record."""

import os
import random

import pytest

import pydr
from pydr.engine import journal as J
from pydr.engine import resync as R
from pydr.engine import tracked as T
from pydr.engine.sigcache_any import cached_signature
from pydr.engine.spans import batch_spans, packed_blocks, unpack_extents

BS = 4096


def write_islands(path, size, islands):
    """A sparse file of `size` bytes holding `islands` ({offset: bytes})."""
    with open(path, "wb") as f:
        f.truncate(size)
        for at, data in islands.items():
            f.seek(at)
            f.write(data)


def journal_of(path):
    """What an undo journal says: its header and each record (type, offset,
    length, payload hash)."""
    found = J.scan(path, step=True)
    return found.header, [r[2:] for r in found.records]


def rolled_back(path, undo):
    fd = os.open(path, os.O_RDWR)
    try:
        J.rollback_fd(fd, str(undo), str(path), False)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        return f.read()


def scattered(rng, size, count, window):
    """Block-aligned runs of 1-8 blocks, far apart, none across a multiple of
    `window` (a cold resync cuts its records there, a tracked one need not)."""
    runs, taken = {}, set()
    while len(runs) < count:
        at = rng.randrange(size // BS) * BS
        n = rng.randint(1, 8) * BS
        if at + n > size or at // window != (at + n - 1) // window:
            continue
        if any(abs(at - o) < (64 << 10) + 8 * BS for o in taken):
            continue
        taken.add(at)
        runs[at] = bytes(n) if rng.random() < 0.2 else rng.randbytes(n)
    return runs


@pytest.mark.parametrize("seed,cache,window,batch_range", [
    (0, True, None, None),            # 256 runs over 512 MiB: one batch
    (1, False, None, None),           # no cache: the target is signed over the spans
    (2, True, 256 << 10, None),       # batches cut by their bytes
    (3, True, None, 96 << 20),        # batches cut by the address range they reach
    (4, False, 128 << 10, 48 << 20),  # both
])
def test_scattered_spans_give_the_replica_and_undo_journal_of_a_cold_resync(
        tmp_path, monkeypatch, seed, cache, window, batch_range):
    if window:
        monkeypatch.setattr(R, "WINDOW", window)
    if batch_range:
        monkeypatch.setattr(T, "BATCH_RANGE", batch_range)
    rng = random.Random(seed)
    size = (512 << 20) - rng.choice([0, BS, 1000])  # sometimes a short last block
    base = {rng.randrange(size - 70_000): rng.randbytes(70_000) for _ in range(40)}
    runs = scattered(rng, size, 256, window or R.WINDOW)
    runs[size - 100] = rng.randbytes(100)  # the short last block changes too
    src, warm, cold = tmp_path / "src", tmp_path / "warm", tmp_path / "cold"
    write_islands(warm, size, base)
    write_islands(cold, size, base)
    sig = tmp_path / "warm.sig" if cache else None
    if cache:
        write_islands(src, size, base)
        pydr.resync(src, warm, signature_cache=sig)  # the cache of the target as it is
    old = warm.read_bytes()
    assert old == cold.read_bytes()
    write_islands(src, size, {**base, **runs})
    new = src.read_bytes()
    changed = [(at, len(data)) for at, data in runs.items()]
    rng.shuffle(changed)  # a tracker's order is no order
    warm_undo, cold_undo = tmp_path / "warm.undo", tmp_path / "cold.undo"
    stats = pydr.resync(src, warm, signature_cache=sig, changed_extents=changed,
                        keep_undo=warm_undo, verify=True)
    cold_stats = pydr.resync(src, cold, keep_undo=cold_undo)
    assert warm.read_bytes() == new == cold.read_bytes()
    assert stats.used_cache == cache
    assert stats.blocks_changed == cold_stats.blocks_changed > 0
    assert stats.bytes_written == cold_stats.bytes_written
    assert stats.source_bytes_read <= sum(n for _, n in changed) + 256 * (64 << 10)
    assert journal_of(warm_undo) == journal_of(cold_undo)
    if cache:
        assert cached_signature(sig) == pydr.signature(warm, block_size=BS)
    assert rolled_back(warm, warm_undo) == old


@pytest.mark.parametrize("seed", range(4))
def test_messy_tracked_extents_roll_back_to_the_old_target(tmp_path, monkeypatch, seed):
    """Unaligned, overlapping, window-crossing extents (some not changed at
    all), batches cut small: the replica, its cache and the kept undo
    journal are exact."""
    monkeypatch.setattr(R, "WINDOW", 64 << 10)
    monkeypatch.setattr(T, "BATCH_RANGE", 1 << 20)
    rng = random.Random(seed)
    size = (6 << 20) + rng.choice([0, 1, 4095])
    a = bytearray(rng.randbytes(size))
    hole = rng.randrange(size // 2)
    a[hole:hole + (1 << 20)] = bytes(1 << 20)  # zeros the cache knows as such
    src, dst, sig = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    src.write_bytes(bytes(a))
    dst.write_bytes(bytes(a))
    pydr.resync(src, dst, signature_cache=sig)
    b = bytearray(a)
    changed = []
    for _ in range(60):
        at = rng.randrange(size)
        n = rng.choice([1, 700, 4096, 70_000, 300_000])
        fill = bytes(n) if rng.random() < 0.3 else rng.randbytes(n)
        b[at:at + n] = fill[:size - at]
        changed.append((at, min(n, size - at)))
    changed += [(rng.randrange(size), 5000) for _ in range(10)]  # reported, not changed
    src.write_bytes(bytes(b))
    undo = tmp_path / "undo"
    pydr.resync(src, dst, signature_cache=sig, changed_extents=changed, keep_undo=undo)
    assert dst.read_bytes() == bytes(b)
    assert cached_signature(sig) == pydr.signature(dst, block_size=BS)
    assert rolled_back(dst, undo) == bytes(a)


def test_batches_hold_at_most_their_bytes_and_reach():
    spans = [(0, 8192), (1 << 20, (1 << 20) + 40960), (5 << 20, 9 << 20), (40 << 20, 40 << 20 | 4096)]
    batches = batch_spans(spans, BS, 1 << 20, 8 << 20)
    flat = [s for batch in batches for s in batch]
    # the same bytes, in order, each batch within its limits
    assert sum(e - s for s, e in flat) == sum(e - s for s, e in spans)
    assert all(flat[i][1] <= flat[i + 1][0] for i in range(len(flat) - 1))
    for batch in batches:
        assert sum(e - s for s, e in batch) <= 1 << 20
        assert batch[-1][1] - batch[0][0] <= 8 << 20
        assert all(s % BS == 0 for s, _ in batch)
    assert batches[0][:2] == [(0, 8192), (1 << 20, (1 << 20) + 40960)]
    assert batches[-1] == [(40 << 20, 40 << 20 | 4096)]  # too far from the one before
    assert len(batch_spans([(0, BS), (100 << 30, (100 << 30) + BS)], BS, 64 << 20, 4 << 30)) == 2


def test_packed_extents_are_cut_at_span_ends():
    import numpy as np

    spans = [(8192, 16384), (1 << 20, (1 << 20) + 4096), (2 << 20, (2 << 20) + 8192)]
    assert packed_blocks(spans, 4096, BS).tolist() == [1, 2, 255, 511, 512]
    # packed: [0, 8192) span 0, [8192, 12288) span 1, [12288, 20480) span 2
    ext = np.array([4096, 12288, 16384, 4096], np.uint64)
    zero = np.array([0, 1], np.uint8)
    disk, flags, packed = unpack_extents(ext, zero, spans)
    assert disk.tolist() == [12288, 4096, 1 << 20, 4096, 2 << 20, 4096, (2 << 20) + 4096, 4096]
    assert packed.tolist() == [4096, 4096, 8192, 4096, 12288, 4096, 16384, 4096]
    assert flags.tolist() == [0, 0, 0, 1]


def test_a_batch_buffer_costs_the_pages_touched_not_huge_pages():
    """numpy.empty of a large array asks for transparent huge pages: each
    scattered 4 KiB read into a batch's kept buffer would fault in 2 MiB.
    sparse_array's touched pages are 4 KiB ones."""
    import numpy as np

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    keep = T.sparse_array(1 << 30, np.uint8)
    before = rss()
    for i in range(64):
        keep[i * (16 << 20)] = 1  # 64 pages, 16 MiB apart
    grown = rss() - before
    assert keep.shape == (1 << 30,) and int(keep[16 << 20]) == 1
    assert grown < 16 << 20, f"{grown} bytes resident for 64 touched pages"
    # the mapping itself: no huge pages ("nh"), no swap reserved ("nr")
    address = keep.ctypes.data
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    flags = None
    for i, line in enumerate(lines):
        lo, _, hi = line.split()[0].partition("-")
        if hi and all(c in "0123456789abcdef" for c in lo + hi) and \
                int(lo, 16) <= address < int(hi, 16):
            flags = next(x for x in lines[i + 1:] if x.startswith("VmFlags:")).split()[1:]
            break
    assert flags is not None and "nh" in flags and "nr" in flags, flags
    h = T.sparse_array((1000, 2), np.uint64)
    assert h.shape == (1000, 2) and h.dtype == np.uint64 and h.flags.writeable


def test_a_damaged_cache_met_by_a_tracked_batch_reads_the_target_and_goes(tmp_path):
    """A segment's slot damaged: the batch that reads it signs the target
    instead, ends exact, and the cache (nothing describes the blocks a
    tracked cycle passed) is removed; the next cycle reads the target."""
    from pydr.engine import sigcache as S

    rng = random.Random(7)
    size = 4 * S.SEGMENT_BLOCKS * BS
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    src.write_bytes(rng.randbytes(size))
    pydr.resync(src, dst, signature_cache=cache)
    with open(cache, "r+b") as f:
        f.seek(S.HEADER_BYTES + 2 * S.ENTRY_BYTES)
        slot = S._ENTRY.unpack(f.read(S.ENTRY_BYTES))[0]
        f.seek(slot + 700)
        byte = f.read(1)[0]
        f.seek(slot + 700)
        f.write(bytes([byte ^ 1]))
    os.utime(cache)  # newer than the target still
    b = bytearray(src.read_bytes())
    changed = [(10, 10), (2 * S.SEGMENT_BLOCKS * BS + 5000, 3000), (size - 4096, 4096)]
    for at, n in changed:
        b[at:at + n] = rng.randbytes(n)
    src.write_bytes(bytes(b))
    stats = pydr.resync(src, dst, signature_cache=cache, changed_extents=changed)
    assert dst.read_bytes() == bytes(b)
    assert not stats.used_cache and not cache.exists()
    assert stats.blocks_changed == 3 and stats.target_bytes_read > 0

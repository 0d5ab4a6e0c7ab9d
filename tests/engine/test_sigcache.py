"""The signature cache, format v2 (pydr/engine/sigcache.py, docs/FORMAT.md):
its contents against a full signature, its size against the data, what a
cycle writes into it, its states across kills, damage, and the v1 format."""

import contextlib
import os
import random
import subprocess
import tracemalloc

import numpy as np
import pytest

import pydr
from pydr.dr import ownership
from pydr.engine import sigcache as S
from pydr.engine.sigcache import SignatureCache
from pydr.engine.sigcache_any import cached_signature, load_any
from pydr.errors import FormatError

from conftest import run_cli, write_sparse

BS = 4096
GiB, MiB = 1 << 30, 1 << 20


def always(_mtime):
    return True


def random_window(rng, count, zero_share=0.5):
    """(hashes, mask) of `count` blocks, about `zero_share` of them zeros
    (whose hash is the hash of a zero block, as the signer gives it)."""
    mask = bytearray(rng.random() < zero_share for _ in range(count))
    hashes = np.frombuffer(rng.randbytes(16 * count), dtype=np.uint8).reshape(count, 16).copy()
    hashes[np.frombuffer(mask, dtype=np.uint8) != 0] = np.frombuffer(S._zero_hash(BS), np.uint8)
    return bytearray(hashes.tobytes()), mask


def test_the_cache_of_a_resync_is_the_signature_of_the_target(tmp_path):
    """Data, zero runs written as data, holes and a short last block, across
    segments: the cache reads back as pydr.signature of the target, the
    zero blocks' hashes included though none is stored."""
    rng = random.Random(1)
    size = 3 * S.SEGMENT_BLOCKS * BS + 1234
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    write_sparse(src, size, [(0, rng.randbytes(MiB)), (5 * MiB, bytes(3 * MiB)),
                             (S.SEGMENT_BLOCKS * BS - 4096, rng.randbytes(8192)),
                             (size - 5000, rng.randbytes(5000))])
    pydr.resync(src, dst, signature_cache=cache)
    assert cached_signature(cache) == pydr.signature(dst, block_size=BS)
    with load_any(cache) as c:
        assert (c.state, c.n) == (S.CLEAN, -(-size // BS))
        assert c.all_zero(300, 1000) and not c.all_zero(0, 1)
        assert not c.all_zero(S.SEGMENT_BLOCKS - 1, 2)  # data on both sides of a segment edge
        assert c.all_zero(S.SEGMENT_BLOCKS + 1, S.SEGMENT_BLOCKS)  # a whole segment: no slot
        h, m = c.read(S.SEGMENT_BLOCKS - 3, 10)  # a range across two segments
    full = pydr.signature(dst, block_size=BS)
    first = S.SEGMENT_BLOCKS - 3
    assert bytes(h) == full.hashes.tobytes()[16 * first:16 * (first + 10)]


def test_a_sparse_terabyte_costs_its_data(tmp_path):
    """1 TiB holding 1 GiB in 64 runs of 16 MiB and 4096 scattered blocks:
    the cache takes at most 2 x (non-zero blocks x 16 bytes) + one bit per
    block (+ its header and segment table); reading it, updating it and
    committing stays within a few MiB of memory."""
    rng = random.Random(2)
    size = 1 << 40
    path = tmp_path / "c.sig"
    n = size // BS
    tracemalloc.start()
    cache = SignatureCache.create(path, block_size=BS, size=size)
    data_blocks = 0
    for run in range(64):
        first = run * (n // 64)
        count = 16 * MiB // BS
        h, _ = random_window(rng, count, 0)
        cache.update(first, h, bytes(count))
        data_blocks += count
    scattered = sorted(rng.sample(range(n), 4096))
    for first in scattered:
        h, _ = random_window(rng, 1, 0)
        cache.update(first, h, bytes(1))
    data_blocks += 4096
    cache.commit()
    cache.close()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * MiB, peak
    allocated = os.stat(path).st_blocks * 512
    overhead = S.HEADER_BYTES + S.table_bytes(n // S.SEGMENT_BLOCKS)
    assert allocated <= 2 * data_blocks * 16 + n // 8 + overhead, allocated
    gap = (16 * MiB // BS, n // 64)  # between the first two runs
    with load_any(path) as c:
        assert c.all_zero(gap[0], gap[1] - gap[0]) == (not any(gap[0] <= s < gap[1]
                                                               for s in scattered))
        assert not c.all_zero(gap[1] - 1, 2)
        assert bytes(c.read(n // 64, 4)[1]) == bytes(4)  # a run's blocks hold data
        assert len(c.read(n - 1, 5)[1]) == 1  # clipped to the disk


def test_an_update_writes_only_what_changed(tmp_path):
    """An opened cache, one block changed in a 64 MiB range of data: commit
    writes its hash, its segment entry and the header, not the cache."""
    rng = random.Random(3)
    path = tmp_path / "c.sig"
    count = 64 * MiB // BS
    cache = SignatureCache.create(path, block_size=BS, size=count * BS)
    h, m = random_window(rng, count, 0.1)
    cache.update(0, h, m)
    cache.commit()
    cache.close()
    cache = SignatureCache.open(path, block_size=BS, size=count * BS, trusted=always)
    assert cache.state == S.CHANGING
    changed = bytearray(h)
    k = next(i for i in range(100, count) if not m[i])
    changed[16 * k:16 * k + 16] = rng.randbytes(16)
    before = _wchar()
    cache.update(0, changed, m)  # the whole range given: only the block that differs is kept
    cache.commit()
    written = _wchar() - before
    cache.close()
    assert written <= 2 * 4096, written  # a hash, its table page, the header twice
    with load_any(path, verify=True) as c:
        assert c.state == S.CLEAN and c.read(0, count) == (changed, m)


def _wchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar")).split()[1])


def test_an_opened_cache_is_not_trusted_until_committed(tmp_path):
    """Opening marks it CHANGING: closed or aborted without a commit, the
    next open refuses it even where the target's mtime cannot tell (a block
    device: trusted() says yes), while a check of the old target may still
    read it."""
    rng = random.Random(4)
    path = tmp_path / "c.sig"
    cache = SignatureCache.create(path, block_size=BS, size=MiB)
    h, m = random_window(rng, MiB // BS)
    cache.update(0, h, m)
    cache.commit()
    cache.close()
    cache = SignatureCache.open(path, block_size=BS, size=MiB, trusted=always)
    cache.update(0, *random_window(rng, MiB // BS))
    cache.abort()
    assert not os.path.exists(str(path) + S.PENDING_SUFFIX)
    assert SignatureCache.open(path, block_size=BS, size=MiB, trusted=always) is None
    with load_any(path) as c:
        assert c.state == S.CHANGING and c.read(0, MiB // BS) == (h, m)  # the old target


@pytest.mark.parametrize("point,state", [("apply.synced", S.CHANGING),
                                         ("sigcache.updating", S.UPDATING)])
def test_a_killed_resync_leaves_a_cache_nothing_trusts(tmp_path, point, state):
    """Killed while the target changes or while the cache is rewritten: the
    cache says so, and running the command again ends with the target
    exact and a cache that describes it."""
    rng = random.Random(5)
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    a = rng.randbytes(8 * MiB)
    src.write_bytes(a)
    assert run_cli("resync", src, dst, "--signature-cache", cache).returncode == 0
    b = bytearray(a)
    b[3 * MiB:3 * MiB + 20_000] = rng.randbytes(20_000)
    src.write_bytes(bytes(b))
    r = run_cli("resync", src, dst, "--signature-cache", cache,
                env={**os.environ, "PYDR_CRASH_AT": point})
    assert r.returncode == -9, r.stderr
    with load_any(cache) as c:
        assert c.state == state
    assert SignatureCache.open(cache, block_size=BS, size=len(b), trusted=always) is None
    r = run_cli("resync", src, dst, "--signature-cache", cache)
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == bytes(b)
    assert cached_signature(cache) == pydr.signature(dst, block_size=BS)
    with load_any(cache) as c:
        assert c.state == S.CLEAN


@pytest.mark.parametrize("where", ["slot", "entry", "swap"])
def test_damage_is_found_where_it_is_read(tmp_path, where):
    """A flipped byte in a segment's slot or in its entry of the table, or
    two slots swapped:
    reading that segment raises FormatError naming the path and offset; a
    resync that meets it reads the target from there on, ends exact and
    removes the cache; the next one writes it anew."""
    rng = random.Random(6)
    size = 4 * S.SEGMENT_BLOCKS * BS
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    src.write_bytes(rng.randbytes(size))
    pydr.resync(src, dst, signature_cache=cache)
    with open(cache, "r+b") as f:
        entries = [S._ENTRY.unpack(_read_at(f, S.HEADER_BYTES + i * S.ENTRY_BYTES,
                                            S.ENTRY_BYTES))
                   for i in range(4)]
        if where == "slot":
            at = entries[2][0] + 700
            f.seek(at)
            f.write(bytes([_read_at(f, at, 1)[0] ^ 1]))
        elif where == "entry":
            at = S.HEADER_BYTES + 2 * S.ENTRY_BYTES + 9
            f.seek(at)
            f.write(bytes([_read_at(f, at, 1)[0] ^ 1]))
        else:
            slot1, slot2 = (_read_at(f, entries[i][0], S.SEGMENT_BLOCKS // 8
                                     + 16 * entries[i][2]) for i in (1, 2))
            f.seek(entries[1][0])
            f.write(slot2)
            f.seek(entries[2][0])
            f.write(slot1)
    os.utime(cache)  # newer than the target still
    with load_any(cache) as c:
        if where != "entry":  # (an entry's damage fails its whole table page)
            c.read(0, S.SEGMENT_BLOCKS)  # the first segment is whole
        with pytest.raises(FormatError) as exc:
            c.read(S.SEGMENT_BLOCKS, 2 * S.SEGMENT_BLOCKS)
    assert exc.value.path == str(cache) and exc.value.offset is not None
    with pytest.raises(FormatError):
        load_any(cache, verify=True)
    b = bytearray(src.read_bytes())
    b[10:20] = b"0123456789"
    b[3 * S.SEGMENT_BLOCKS * BS + 7] ^= 1
    src.write_bytes(bytes(b))
    os.utime(cache)
    stats = pydr.resync(src, dst, signature_cache=cache)
    assert dst.read_bytes() == bytes(b)
    assert not stats.used_cache and not cache.exists()  # nothing describes what it passed
    assert not pydr.resync(src, dst, signature_cache=cache).used_cache
    assert cached_signature(cache) == pydr.signature(dst, block_size=BS)


def _read_at(f, offset, length):
    f.seek(offset)
    return f.read(length)


def test_a_v1_cache_is_converted_once(tmp_path):
    """A cache of the previous release (a v1 signature file, newer than the
    target) is used by the next resync, which leaves it in v2: the target is
    not read."""
    rng = random.Random(7)
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    a = rng.randbytes(2 * MiB + 100)
    dst.write_bytes(a)
    pydr.signature(dst, block_size=BS).save(cache)
    b = bytearray(a)
    b[MiB:MiB + 10] = b"0123456789"
    src.write_bytes(bytes(b))
    stats = pydr.resync(src, dst, signature_cache=cache)
    assert stats.used_cache and stats.bytes_read == len(b)  # the source only
    assert dst.read_bytes() == bytes(b)
    assert cache.read_bytes()[:8] == S.MAGIC
    assert cached_signature(cache) == pydr.signature(dst, block_size=BS)


def test_the_binding_tells_copies_apart_but_not_states(tmp_path):
    """ownership.cache_digest (what binds a cache to its replica): equal for
    the same cache CLEAN and CHANGING (a resumed cycle may still use it), but
    different after a commit, and between two caches of the same contents."""
    rng = random.Random(8)
    one, two = tmp_path / "one.sig", tmp_path / "two.sig"
    h, m = random_window(rng, 256)
    for path in (one, two):
        c = SignatureCache.create(path, block_size=BS, size=256 * BS)
        c.update(0, h, m)
        c.commit()
        c.close()
    assert ownership.cache_digest(one) != ownership.cache_digest(two)
    clean = ownership.cache_digest(one)
    c = SignatureCache.open(one, block_size=BS, size=256 * BS, trusted=always)
    assert ownership.cache_digest(one) == clean
    c.commit()
    c.close()
    assert ownership.cache_digest(one) != clean


def test_a_loop_device_target_with_a_cache_left_changing_is_read(tmp_path):
    """A block device cannot tell by its mtime that it was written: a cycle
    killed while writing it leaves the cache CHANGING, and the rerun reads
    the device instead of trusting the cache."""
    rng = random.Random(9)
    backing, src, cache = tmp_path / "backing", tmp_path / "src", tmp_path / "dev.sig"
    backing.write_bytes(bytes(8 * MiB))
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        a = rng.randbytes(8 * MiB)
        src.write_bytes(a)
        assert run_cli("resync", src, dev, "--signature-cache", cache).returncode == 0
        b = bytearray(a)
        b[MiB:2 * MiB] = rng.randbytes(MiB)
        src.write_bytes(bytes(b))
        r = run_cli("resync", src, dev, "--signature-cache", cache,
                    env={**os.environ, "PYDR_CRASH_AT": "apply.written"})
        assert r.returncode == -9, r.stderr
        with load_any(cache) as c:
            assert c.state == S.CHANGING
        assert SignatureCache.open(cache, block_size=BS, size=len(b), trusted=always) is None
        r = run_cli("resync", src, dev, "--signature-cache", cache)
        assert r.returncode == 0, r.stderr
        with open(dev, "rb") as f:
            assert f.read() == bytes(b)
        assert cached_signature(cache) == pydr.signature(dev, block_size=BS)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_resync_leaves_no_cache_file_open(tmp_path):
    """A new cache's file, and an old one replaced by it, are closed by the
    resync itself: a descriptor left to the process's exit kept a replaced
    cache alive on FUSE (.fuse_hidden), and a power cut then left it."""
    import pydr

    src, dst, cache = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "dst.sig"
    src.write_bytes(os.urandom(1 << 20))

    def open_caches():
        found = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(str(cache)):
                    found.append(fd)
        return found

    pydr.resync(src, dst, signature_cache=cache)  # a new cache
    assert open_caches() == []
    with open(src, "ab") as f:
        f.write(b"grows")  # another size: a new cache replaces the old one
    pydr.resync(src, dst, signature_cache=cache)
    assert open_caches() == []
    with open(src, "r+b") as f:
        f.write(b"changed")  # same size: the cache is updated in place
    st = pydr.resync(src, dst, signature_cache=cache)
    assert st.used_cache and open_caches() == []
    assert dst.read_bytes() == src.read_bytes()


def test_a_planted_pending_hard_link_is_never_written_through(tmp_path):
    """A NAME.pending left beside the cache (here a hard link to another
    file) is replaced, never truncated or written into: the other file
    keeps its bytes and the cycle still ends exact."""
    rng = random.Random(13)
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    victim = tmp_path / "victim"
    src.write_bytes(rng.randbytes(MiB))
    victim.write_bytes(b"precious" * 1000)
    pydr.resync(src, dst, signature_cache=cache)
    os.link(victim, str(cache) + S.PENDING_SUFFIX)
    with open(src, "r+b") as f:
        f.seek(8192)
        f.write(rng.randbytes(4096))
    st = pydr.resync(src, dst, signature_cache=cache)
    assert st.used_cache
    assert victim.read_bytes() == b"precious" * 1000
    assert dst.read_bytes() == src.read_bytes()
    assert cached_signature(cache) == pydr.signature(dst, block_size=BS)


def test_a_stale_changing_cache_never_blocks_a_resume(tmp_path):
    """A cycle killed after its journal committed leaves the cache CHANGING
    (the target before that cycle); the source changes, the next cycle is
    killed mid-write: running the same command again finishes, exact, and
    is not refused as a damaged journal (the stale cache is not taken as
    the target before the journal being resumed)."""
    rng = random.Random(14)
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    data = bytearray(rng.randbytes(4 * MiB))
    src.write_bytes(bytes(data))
    assert run_cli("resync", src, dst, "--signature-cache", cache).returncode == 0
    data[0:8192] = rng.randbytes(8192)
    src.write_bytes(bytes(data))
    r = run_cli("resync", src, dst, "--signature-cache", cache,
                env={**os.environ, "PYDR_CRASH_AT": "apply.committed"})
    assert r.returncode == -9, r.stderr
    data[2 * MiB:2 * MiB + 8192] = rng.randbytes(8192)
    src.write_bytes(bytes(data))
    r = run_cli("resync", src, dst, "--signature-cache", cache,
                env={**os.environ, "PYDR_CRASH_AT": "apply.written"})
    assert r.returncode == -9, r.stderr
    r = run_cli("resync", src, dst, "--signature-cache", cache)
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == bytes(data)
    assert cached_signature(cache) == pydr.signature(dst, block_size=BS)


def test_info_and_diff_read_a_v2_cache(tmp_path):
    """`pydr info` describes and checks a healthy v2 cache (text and JSON),
    calls a damaged one corrupt (exit 7), and `pydr diff` takes a v2 cache
    as it takes a signature file."""
    import json

    rng = random.Random(15)
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    src.write_bytes(rng.randbytes(2 * MiB))
    pydr.resync(src, dst, signature_cache=cache)
    r = run_cli("info", cache, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    with load_any(cache) as c:
        assert info["format_version"] == 2 and info["state"] == "clean"
        assert (info["block_size"], info["image_size"], info["blocks"]) == (BS, 2 * MiB, c.n)
        assert info["generation"] == c.generation and info["segments"] == c.segments
    r = run_cli("info", cache)
    assert r.returncode == 0 and b"clean" in r.stdout, r.stderr
    old = tmp_path / "old.sig"
    pydr.signature(dst, block_size=BS).save(old)
    with open(src, "r+b") as f:
        f.seek(MiB)
        f.write(rng.randbytes(4096))
    pydr.resync(src, dst, signature_cache=cache)
    r = run_cli("diff", old, cache, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ranges"] == [[MiB, 4096]]
    SignatureCache.open(cache, block_size=BS, size=2 * MiB, trusted=always).abort()
    r = run_cli("info", cache, "--json")  # left CHANGING: described, not trusted by diff
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "target being changed"
    r = run_cli("diff", old, cache)
    assert r.returncode == 10 and b"interrupted" in r.stderr, r.stderr
    with load_any(cache) as c:
        seg_at = c._read_entry(0)[0]
    with open(cache, "r+b") as f:  # a flipped byte in segment 0's slot
        f.seek(seg_at + 700)
        b = f.read(1)
        f.seek(seg_at + 700)
        f.write(bytes([b[0] ^ 1]))
    assert run_cli("info", cache).returncode == 7
    assert run_cli("diff", old, cache).returncode == 7


def test_a_cache_put_back_from_an_older_cycle_is_not_trusted(tmp_path):
    """A cache copied back from an earlier cycle (a plain copy: a new
    mtime) after the source went back to what that cycle saw: the cache is
    bound to the target as the cycle that wrote it left it, so it is not
    used, the target is read, and the replica ends exact."""
    import shutil

    rng = random.Random(16)
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    a, b = rng.randbytes(4096), rng.randbytes(4096)
    rest = rng.randbytes(MiB)
    src.write_bytes(a + rest)
    pydr.resync(src, dst, signature_cache=cache)
    shutil.copyfile(cache, tmp_path / "old.sig")
    src.write_bytes(b + rest)
    pydr.resync(src, dst, signature_cache=cache)
    shutil.copyfile(tmp_path / "old.sig", cache)
    os.utime(cache, ns=(os.stat(dst).st_mtime_ns + 10**9,) * 2)  # newer than the target
    src.write_bytes(a + rest)
    st = pydr.resync(src, dst, signature_cache=cache)
    assert not st.used_cache
    assert dst.read_bytes() == a + rest


def test_a_cache_of_another_file_is_not_trusted(tmp_path):
    """The target replaced by another file of the same size (another
    inode) while its cache stays: the cache is not used."""
    rng = random.Random(17)
    src, dst, cache = tmp_path / "src", tmp_path / "dst", tmp_path / "dst.sig"
    src.write_bytes(rng.randbytes(MiB))
    pydr.resync(src, dst, signature_cache=cache)
    other = tmp_path / "other"
    other.write_bytes(rng.randbytes(MiB))
    os.replace(other, dst)
    os.utime(cache, ns=(os.stat(dst).st_mtime_ns + 10**9,) * 2)  # newer than the target
    st = pydr.resync(src, dst, signature_cache=cache)
    assert not st.used_cache
    assert dst.read_bytes() == src.read_bytes()
    with load_any(cache) as c:
        assert c.target[:3] == (os.stat(dst).st_dev, os.stat(dst).st_ino, MiB)

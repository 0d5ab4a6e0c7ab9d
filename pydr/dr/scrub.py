"""Scrubbing the replicas: `pydr verify ITEM` reads each replica (its
baseline, when the item is failed over) and compares it block by block with
the item's signature cache of that disk, which holds the replica's block
hashes as the last cycle left it.

Bit rot below the file system changes neither size nor mtime, so nothing
else notices it: the next cycle trusts the cache and writes nothing, and
every point (rolled back from the replica) is wrong. A replica that differs
from its cache marks all the item's points damaged and the item
resync-required (a `pydr replicate --resync` reads both sides again).

A local replica is read window by window and signed by the engine on
several threads (pydr.engine.signatures.sign_range); `sample` percent of
its windows are read. A remote one is signed where it lives (the SIGN
request) and compared whole."""

import contextlib
import fcntl
import os
import random

from ..engine import bindings as B
from ..engine import names
from ..engine.journal import journal_path
from ..engine.parallel import check_threads
from ..engine.progress import Throttle
from ..engine.signatures import CHUNK_BYTES, sign_range
from ..errors import Cancelled, FormatError, VaultError
from .store import LOCK_NAME

#: bytes of a replica signed at a time (on several threads, CHUNK_BYTES each)
WINDOW_BYTES = 4 * CHUNK_BYTES
#: the unit --sample picks from (finer, so that a small percentage reads little)
SAMPLE_WINDOW_BYTES = 16 << 20
#: differing offsets named in a report
SHOWN = 5


def scrub_item(vault, name, sample=100.0, threads=None, *, events=None, cancel=None):
    """Scrub every disk of item `name` that has a signature cache. Returns
    (disks scrubbed, bytes read, [problem text], [skipped text]: replicas
    not scrubbed because their cache is damaged, which is the cache's
    problem, reported by the check of the caches); a replica that differs
    from its cache has marked the points damaged and the item
    resync-required on the way. ``events``: an Emitter (pydr.dr.events)
    given each disk's "progress" in phase "verify"; ``cancel``: a
    threading.Event asked between windows (Cancelled)."""
    with _no_cycle_running(vault):
        return _scrub_disks(vault, name, sample, threads, events, cancel)


@contextlib.contextmanager
def _no_cycle_running(vault):
    """Hold the vault's lock shared while the replicas are read: a cycle
    (which takes it exclusive) writing a replica meanwhile would read as rot
    and mark every point damaged. A command that holds it already (the
    demo's vault) needs nothing more."""
    if vault.lock_fd is not None:
        yield
        return
    try:
        fd = os.open(os.path.join(vault.dir, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VaultError("the vault is locked by another pydr process (a cycle may be "
                             "writing the replicas), so they cannot be scrubbed now",
                             path=vault.dir, hint="run 'pydr verify' again once it ends") from None
        yield
    finally:
        os.close(fd)


def _scrub_disks(vault, name, sample, threads, events=None, cancel=None):
    from ..engine.sigcache import CLEAN
    from ..engine.sigcache_any import load_any

    scrubbed, nbytes, problems, skipped = 0, 0, [], []
    for d in vault.disks(name):
        cache = vault.cache_path(name, d["idx"])
        replica = vault.endpoint(name, d["replica"])
        try:  # every segment checked now: damage found mid-scrub would blame the replica
            with load_any(cache, verify=True) as found:
                clean = found.state == CLEAN
        except FileNotFoundError:
            continue  # none: nothing says what to expect
        except (FormatError, OSError) as exc:
            # damaged (verify_steps reports that): nothing says what to expect
            skipped.append(f"disk {d['idx']}: scrub of {replica} skipped: its signature "
                           f"cache is damaged ({exc})")
            continue
        if not clean:
            continue  # left by an interrupted cycle: it may not describe the replica
        base = replica.sidecar(names.BASE)
        disk = base if base.exists() else replica  # failed over: the baseline holds the steps' base
        try:
            if disk.local_path is not None:
                if os.path.exists(journal_path(disk.local_path)):
                    continue  # a cycle was interrupted: the cache describes no state yet
                shown = None
                if events:
                    def shown(done, total, idx=d["idx"], where=d["replica"]):
                        events.emit("progress", disk=idx, phase="verify", bytes_done=done,
                                    bytes_total=total, path=where)
                found, read = scrub_file(disk.local_path, cache, sample=sample, threads=threads,
                                         cancel=cancel, on_window=shown)
            else:
                found, read = scrub_remote(disk, cache, threads=threads)
        except (FormatError, OSError) as exc:
            problems.append(f"disk {d['idx']}, scrub of {disk}: {exc}")
            continue
        scrubbed += 1
        nbytes += read
        if found:
            problem = (f"disk {d['idx']}: the replica {disk} does not hold what its signature "
                       f"cache says the last cycle left: {found}")
            problems.append(problem)
            _mark_rotten(vault, name, problem)
    return scrubbed, nbytes, problems, skipped


def _mark_rotten(vault, name, reason):
    """Every point is damaged, and the next cycle must be a --resync (as
    pydr.dr.replication.mark_resync_required; not imported: the workflow
    imports this module)."""
    vault.mark_damaged(name, [p["id"] for p in vault.points(name)], reason)
    vault.set_item(name, state="resync-required", health="warning", last_error=reason)


def scrub_file(path, cache, *, sample=100.0, threads=None, rng=random, cancel=None,
               on_window=None):
    """Compare the file or block device `path` with the signature file
    `cache` (a random `sample` percent of its windows). Returns (text naming
    the first differing offsets, or None when they agree; bytes read).
    ``cancel`` (a threading.Event) is asked before each window (Cancelled);
    ``on_window(bytes read, bytes to read)`` is told after each."""
    import numpy as np

    from ..engine.sigcache_any import load_any

    threads = check_threads(threads)
    code = B.algorithm_code("xxh3-128")
    with load_any(cache) as reader:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = B.fd_size(fd, path)[0]
            if size != reader.size:
                return (f"it has {size} bytes, its cache {reader.size} "
                        f"(offset {min(size, reader.size)})"), 0
            bs = reader.block_size
            window = WINDOW_BYTES if sample >= 100.0 else SAMPLE_WINDOW_BYTES
            per_window = max(1, window // bs)
            windows = list(range(0, reader.n, per_window))
            if sample < 100.0 and windows:
                windows = sorted(rng.sample(windows, max(1, round(len(windows) * sample / 100.0))))
            differ, total, read = [], 0, 0
            wanted = sum(min(size, (w + per_window) * bs) - w * bs for w in windows)
            for first in windows:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("the scrub cancelled", path=path)
                count = min(per_window, reader.n - first)
                offset = first * bs
                length = min(size, offset + count * bs) - offset
                hashes, mask = bytearray(count * 16), bytearray(count)
                sign_range(fd, path, offset, length, bs, code, hashes, mask, threads=threads,
                           progress_record=B.Progress(), throttle=Throttle(None, "scrub", path,
                                                                            length))
                read += length
                want, _ = reader.read(first, count)
                got = np.frombuffer(hashes, dtype=np.uint64).reshape(count, 2)
                expected = np.frombuffer(bytes(want), dtype="<u8").reshape(count, 2)
                bad = np.nonzero((got != expected).any(axis=1))[0]
                total += len(bad)
                differ.extend(int(first + b) * bs for b in bad[:SHOWN - len(differ)])
                if on_window is not None:
                    on_window(read, wanted)
        finally:
            os.close(fd)
    return _describe(differ, total, bs), read


def scrub_remote(disk, cache, *, threads=None):
    """scrub_file for a disk at a remote place: signed there (the SIGN
    request), compared here, whole."""
    import numpy as np

    from ..engine.sigcache_any import load_any

    with load_any(cache) as reader:
        sig = disk.signature(block_size=reader.block_size, threads=threads)
        if sig.size != reader.size:
            return (f"it has {sig.size} bytes, its cache {reader.size} "
                    f"(offset {min(sig.size, reader.size)})"), 0
        want, _ = reader.read(0, reader.n)
        expected = np.frombuffer(bytes(want), dtype="<u8").reshape(reader.n, 2)
        bad = np.nonzero((sig.hashes.reshape(reader.n, 2) != expected).any(axis=1))[0]
        return _describe([int(b) * reader.block_size for b in bad[:SHOWN]], len(bad),
                         reader.block_size), sig.size


def _describe(offsets, total, block_size):
    if not total:
        return None
    shown = ", ".join(f"offset {o}" for o in offsets)
    more = f" and {total - len(offsets)} more" if total > len(offsets) else ""
    blocks = "1 block" if total == 1 else f"{total} blocks"
    return f"{blocks} of {block_size} bytes differ, at {shown}{more}"

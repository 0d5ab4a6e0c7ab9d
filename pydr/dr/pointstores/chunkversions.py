"""A chunk index in a bucket that keeps versions (pydr.dr.pointstores.
chunkindex; docs/FORMAT.md, "Object Lock and versions"): the tampering
verify reports, retention's deletes by version, and garbage collection of
versions.

Every object a point needs is named by key and version (its index's in the
vault, its chunks' in the index), so an overwrite or a delete marker on a
key changes which version is current, not what a restore reads. Those
changes are tampering to report, not damage; a locked version cannot be
deleted early, which is no error either.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ...engine.chunks import INDEX_MAGIC, ObjectRef
from ...engine.sealing import MAGIC as SEAL_MAGIC
from ...errors import FormatError, InvalidState


def latest_versions(objects: Any, under: str) -> Dict[str, Tuple[Optional[str], bool]]:
    """{key: (current version, is a delete marker)} of every key under
    `under` (relative to the store's prefix) in a versioned bucket."""
    latest = {}
    for key, version, is_latest, marker, _, _ in objects.versions(under):
        if is_latest:
            latest[key] = (version, marker)
    return latest


def _change(recorded: Iterable[str], current: Optional[Tuple[Optional[str], bool]]
            ) -> Optional[dict]:
    """What happened to a key whose recorded versions are `recorded`, given
    its current (version, delete marker); None when it still shows one of
    them."""
    if current is None:
        return None  # no version at all: a read of it fails, and says so (a problem)
    recorded = sorted(recorded)
    version, marker = current
    if marker:
        return {"what": "deleted", "current": version,
                "text": f"deleted (a delete marker hides version {', '.join(recorded)})"}
    if version not in recorded:
        return {"what": "overwritten", "current": version,
                "text": f"overwritten (its current version is {version}, not "
                        f"{', '.join(recorded)})"}
    return None


def tampering(store: Any, name: str, rows: Iterable[Any], recorded: Dict[bytes, set],
              points_of: Dict[bytes, List[int]]) -> List[dict]:
    """The objects of item `name`'s points whose key no longer shows a
    version the points recorded: [{"kind": "index"|"chunk", "object": URL,
    "points": [point ids], "versions": recorded, "current": the key's
    current version, "what": "overwritten"|"deleted", "text"}]. `rows` are
    its IndexRecords, `recorded` {chunk id: versions its indexes name},
    `points_of` {chunk id: points naming it}. A chunk key whose current
    version is another, sound copy of the chunk (another item's upload of
    the same bytes) is no tampering. Empty when nothing records a version
    (an unversioned bucket: nothing to compare)."""
    rows = [r for r in rows if r.version]
    chunks = {i: v for i, v in recorded.items() if v}
    found = []
    if rows:
        latest = latest_versions(store.objects, f"indexes/{name}")
        for r in rows:
            change = _change([r.version], latest.get(r.key))
            if change:
                found.append({"kind": "index", "object": store.url(r.key), "points": [r.point],
                              "versions": [r.version], **change})
    if chunks:
        latest = latest_versions(store.objects, "chunks")
        for ident in sorted(chunks):
            key = store.chunk_key(ident)
            change = _change(chunks[ident], latest.get(key))
            if change and change["what"] == "overwritten" and _sound(store, ident):
                continue
            if change:
                found.append({"kind": "chunk", "object": store.url(key),
                              "points": sorted(set(points_of.get(ident, ()))),
                              "versions": sorted(chunks[ident]), **change})
    return found


def _sound(store: Any, ident: bytes) -> bool:
    """Whether the current object of chunk `ident` is a sound copy of it."""
    try:
        store.get_chunk(ident)
    except (FileNotFoundError, FormatError):
        return False
    return True


def drop_versions(objects: Any, rows: List[Any], now: Optional[float] = None
                  ) -> Tuple[List[Any], List[Any]]:
    """Delete the index objects of `rows` (IndexRecords): each by its
    recorded version (a plain delete where none is recorded), never one
    whose recorded lock has not ended. Returns (rows deleted, rows kept:
    still locked, or refused by the server as locked)."""
    now = time.time() if now is None else now
    locked = [r for r in rows if r.retain_until and r.retain_until > now]
    free = [r for r in rows if not (r.retain_until and r.retain_until > now)]
    refused = {(k, v) for k, v, _ in objects.delete_versions((r.key, r.version) for r in free)}
    kept = [r for r in free if (r.key, r.version) in refused]
    return [r for r in free if (r.key, r.version) not in refused], locked + kept


def _ours(objects: Any, key: str, version: Optional[str]) -> bool:
    """Whether the object looks like a pydr index (plain or sealed): one
    that is not, such as an attacker's overwrite, names no chunk."""
    try:
        head = objects.get(key, version)[:8]
    except FileNotFoundError:
        return False
    return head in (INDEX_MAGIC, SEAL_MAGIC)


def _retained(objects: Any, pairs: List[Tuple[str, Optional[str]]]) -> List[Optional[float]]:
    """The Object Lock retain-until of each (key, version), None where it
    has none (or is gone), asked 8 at a time."""
    import concurrent.futures as cf

    def ask(pair):
        head = objects.head(*pair)
        return head["retain_until"] if head else None

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(ask, pairs))


def collect_versions(store: Any, *, grace: float, dry_run: bool, now: Optional[float] = None
                     ) -> dict:
    """Mark and sweep in a versioned bucket (pydr.dr.pointstores.chunkindex.
    collect_garbage's, there): every version of every index marks the chunk
    versions it names (a chunk named without a version keeps all of its);
    chunk versions none names and older than `grace` are deleted, by key
    and version, but those still under Object Lock (a HEAD each: never a
    delete tried early) or refused by the server are counted as "locked",
    index versions that are no pydr index as "foreign"; a damaged pydr index
    stops gc before it sweeps (InvalidState)."""
    objects = store.objects
    start = time.time() if now is None else now
    pairs, whole, indexes, foreign = set(), set(), 0, 0
    for key, version, _, marker, _, _ in objects.versions("indexes"):
        if marker or not key.endswith(".pidx"):
            continue
        try:
            index = store.get_index(key, ObjectRef(version))
        except FileNotFoundError:
            continue  # deleted meanwhile (by retention): it names nothing now
        except FormatError as exc:
            if not _ours(objects, key, version):
                foreign += 1
                continue
            raise InvalidState(f"garbage collection stopped before sweeping: {exc}",
                               path=store.url(key),
                               hint="run 'pydr verify' on the item, or remove that index"
                               ) from None
        indexes += 1
        for ident in index.chunk_ids():
            ref = index.refs.get(ident)
            if ref is not None and ref.version:
                pairs.add((ident, ref.version))
            else:
                whole.add(ident)
    doomed, sizes, young, total = [], {}, 0, 0
    for key, version, _, marker, modified, size in objects.versions("chunks"):
        try:
            ident = bytes.fromhex(key.rpartition("/")[2])
        except ValueError:
            continue  # not ours
        if marker or len(ident) != 16 or key != store.chunk_key(ident):
            continue  # a delete marker (left alone), or not ours
        total += 1
        if ident in whole or (ident, version) in pairs:
            continue
        if modified > start - grace:  # maybe a running cycle's: never swept
            young += 1
            continue
        doomed.append((key, version))
        sizes[(key, version)] = size
    # a version still under its lock is not even tried (a HEAD tells); one the server
    # refuses anyway (a legal hold, a clock apart) is counted the same way
    locked = {d for d, until in zip(doomed, _retained(objects, doomed))
              if until is not None and until > start}
    doomed = [d for d in doomed if d not in locked]
    refused = [] if dry_run else objects.delete_versions(doomed)
    locked |= {(k, v) for k, v, _ in refused}
    swept = [d for d in doomed if d not in locked]
    return {"store": store.spec, "indexes": indexes, "chunks": total,
            "referenced": len({i for i, _ in pairs} | whole), "swept": len(swept),
            "young": young, "bytes": sum(sizes[d] for d in swept), "dry_run": dry_run,
            "locked": len(locked), "foreign": foreign, "versions": True}

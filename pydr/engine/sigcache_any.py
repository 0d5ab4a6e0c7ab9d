"""Signature caches of either format read the same way (load_any), and a
whole cache as a Signature (cached_signature): for checks, scrubs and tests
(a cycle uses pydr.engine.sigcache.SignatureCache)."""

from __future__ import annotations

import os

from .sigcache import CLEAN, MAGIC, SignatureCache


def load_any(path: str, *, verify: bool = False):
    """A read-only view of the signature cache at `path` in either format,
    with ``block_size``, ``size``, ``n``, ``state``, ``read(first, count)``
    and ``close()``: a :class:`SignatureCache` (v2), or a
    :class:`pydr.engine.sigstream.SignatureReader` (v1, whose whole-file
    checksum is checked on opening; its state is CLEAN).

    Args:
        path: The cache file.
        verify: Check every segment of a v2 cache now (for checks of the
            vault), not only its header.

    Raises:
        FormatError: Not a signature cache, or damaged.
        OSError: It cannot be opened or read.
    """
    from .sigstream import SignatureReader

    path = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic != MAGIC:
        reader = SignatureReader(path)
        reader.state = CLEAN
        return reader
    cache = SignatureCache.load(path)
    if verify:
        try:
            cache.verify()
        except BaseException:
            cache.close()
            raise
    return cache


def cached_signature(path: str):
    """The whole signature cache at `path` (either format) as a
    :class:`pydr.Signature` of the disk it describes: 17 bytes a block in
    memory, for checks and tests, never for a cycle.

    Raises:
        FormatError: Not a signature cache, or damaged.
        OSError: It cannot be read.
    """
    from .signatures import Signature

    with load_any(path) as cache:
        hashes, mask = cache.read(0, cache.n)
        return Signature(cache.block_size, cache.size, "xxh3-128", hashes, mask)


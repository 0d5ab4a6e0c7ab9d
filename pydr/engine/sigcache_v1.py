"""The conversion of a signature cache in the previous format (v1, a
whole-disk signature file, as ``pydr signature`` writes it) to v2, once,
when a cycle opens it (pydr.engine.sigcache)."""

from __future__ import annotations

from ..errors import FormatError
from .sigcache_layout import SEGMENT_BLOCKS


def convert_v1(path: str, block_size: int, size: int, target=None, *, create) -> None:
    """Rewrite a v1 cache (a whole signature file) at `path` as v2, in
    place of it, reading the old file a chunk at a time. Raises FormatError
    or OSError (the caller then does without the cache). `create`:
    pydr.engine.sigcache.SignatureCache.create."""
    from .sigstream import SignatureReader

    with SignatureReader(path) as old:
        if old.block_size != block_size or old.size != size:
            raise FormatError("signature cache of another geometry", path=path, offset=0)
        new = create(path, block_size=old.block_size, size=old.size)
        try:
            step = 16 * SEGMENT_BLOCKS
            for first in range(0, old.n, step):
                hashes, mask = old.read(first, step)
                new.update(first, hashes, mask)
            new.commit(target)
        except BaseException:
            new.abort()
            raise
        new.close()

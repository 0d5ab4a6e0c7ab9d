"""pydr: block-level resync engine and disaster-recovery workflow.

The API users see::

    sig = pydr.signature("disk.img", block_size=65536, threads=2)
    sig.save("disk.sig"); old = pydr.Signature.load("disk.sig")
    changed = old.diff(sig)          # uint64 array of [offset, length] rows
    pydr.resync("disk.img", "backup@dr:/srv/disk.img")
    with pydr.Vault("/srv/vault", writer=True) as v:
        v.replicate("web")

The package is in layers (docs/ARCHITECTURE.md): pydr.engine (C-backed) <-
pydr.transport (the wire) <- pydr.endpoints (disks anywhere) <- pydr.dr
(vault and workflow) <- pydr.cli. Importing pydr loads the engine's
signatures only; the rest is imported when first used.
"""

from . import errors
from ._version import __version__
from .engine.progress import ProgressRecord
from .engine.signatures import (DEFAULT_ALGORITHM, DEFAULT_BLOCK_SIZE, Signature, SignStats,
                                signature)
from .errors import (AlreadyApplied, BaseMismatch, Cancelled, CorruptDelta, FileChanged,
                     FormatError, IncompatibleSignatures, NothingToRollBack, PydrError, SameFile,
                     UnfinishedApply, UnsupportedFile)


def resync(src, dst, **kwargs):
    """Make the disk dst byte-identical to src, wherever each is (a path or
    "[user@]host:PATH"); see pydr.endpoints.transfer.resync."""
    from .endpoints.transfer import resync as _resync

    return _resync(src, dst, **kwargs)


def make_delta(source, out, **kwargs):
    """Write a delta turning a base into source; see pydr.engine.delta.make_delta."""
    from .engine.delta import make_delta as _make_delta

    return _make_delta(source, out, **kwargs)


def apply_delta(delta, target, **kwargs):
    """Apply a delta crash-safely; see pydr.engine.apply.apply_delta."""
    from .engine.apply import apply_delta as _apply_delta

    return _apply_delta(delta, target, **kwargs)


def rollback(target):
    """Undo an interrupted apply; see pydr.engine.apply.rollback."""
    from .engine.apply import rollback as _rollback

    return _rollback(target)


def open_endpoint(spec, **kwargs):
    """The endpoint ("a disk somewhere") a spec names; see pydr.endpoints."""
    from .endpoints import open_endpoint as _open

    return _open(spec, **kwargs)


def __getattr__(name):
    # pydr.Vault and pydr.init_vault without loading the DR layer on import
    if name in ("Vault", "init_vault"):
        from .dr import vault

        return getattr(vault, name)
    raise AttributeError(f"module 'pydr' has no attribute {name!r}")


__all__ = [
    "AlreadyApplied", "BaseMismatch", "Cancelled", "CorruptDelta", "DEFAULT_ALGORITHM",
    "DEFAULT_BLOCK_SIZE", "FileChanged", "FormatError", "IncompatibleSignatures",
    "NothingToRollBack", "ProgressRecord", "PydrError", "SameFile", "SignStats", "Signature",
    "UnfinishedApply", "UnsupportedFile", "Vault", "__version__", "apply_delta", "errors",
    "init_vault", "make_delta", "open_endpoint", "resync", "rollback", "signature",
]

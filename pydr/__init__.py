"""pydr: block-level resync engine and disaster-recovery workflow.

The API users see::

    sig = pydr.signature("disk.img", block_size=65536, threads=2)
    sig.save("disk.sig"); old = pydr.Signature.load("disk.sig")
    changed = old.diff(sig)          # uint64 array of [offset, length] rows
"""

from . import errors
from .errors import (
    AlreadyApplied,
    BaseMismatch,
    CorruptDelta,
    NothingToRollBack,
    SameFile,
    UnfinishedApply,
    Cancelled,
    FileChanged,
    FormatError,
    IncompatibleSignatures,
    PydrError,
    UnsupportedFile,
)
from .progress import ProgressRecord
from .signatures import DEFAULT_ALGORITHM, DEFAULT_BLOCK_SIZE, Signature, SignStats, signature

__version__ = "0.1.0"


def resync(src, dst, **kwargs):
    """Make dst byte-identical to src; see pydr.sync.resync."""
    from .sync import resync as _resync

    return _resync(src, dst, **kwargs)


def make_delta(source, out, **kwargs):
    """Write a delta turning a base into source; see pydr.delta.make_delta."""
    from .delta import make_delta as _make_delta

    return _make_delta(source, out, **kwargs)


def apply_delta(delta, target, **kwargs):
    """Apply a delta crash-safely; see pydr.apply.apply_delta."""
    from .apply import apply_delta as _apply_delta

    return _apply_delta(delta, target, **kwargs)


def rollback(target):
    """Undo an interrupted apply; see pydr.apply.rollback."""
    from .apply import rollback as _rollback

    return _rollback(target)

__all__ = [
    "AlreadyApplied", "BaseMismatch", "CorruptDelta", "NothingToRollBack", "SameFile",
    "UnfinishedApply", "apply_delta", "make_delta", "resync", "rollback",
    "Cancelled", "DEFAULT_ALGORITHM", "DEFAULT_BLOCK_SIZE", "FileChanged", "FormatError",
    "IncompatibleSignatures", "ProgressRecord", "PydrError", "SignStats", "Signature",
    "UnsupportedFile", "errors", "signature", "__version__",
]

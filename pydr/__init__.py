"""pydr: block-level resync engine and disaster-recovery workflow.

The API users see::

    sig = pydr.signature("disk.img", block_size=65536, threads=2)
    sig.save("disk.sig"); old = pydr.Signature.load("disk.sig")
    changed = old.diff(sig)          # uint64 array of [offset, length] rows
"""

from . import errors
from .errors import (
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

__all__ = [
    "Cancelled", "DEFAULT_ALGORITHM", "DEFAULT_BLOCK_SIZE", "FileChanged", "FormatError",
    "IncompatibleSignatures", "ProgressRecord", "PydrError", "SignStats", "Signature",
    "UnsupportedFile", "errors", "signature", "__version__",
]

"""pydr's exceptions, and the one function that turns C return codes into them.

Every pydr error is a :class:`PydrError` and also the builtin a caller would
expect (``FormatError`` is a ``ValueError``, ...). Operating-system errors stay
``OSError`` subclasses with their errno and the path, so ``except
FileNotFoundError`` works as usual. Each class carries the exit code the CLI
uses for it; the codes are stable and listed in ``pydr --help``.
"""

import errno as _errno
import os

# CLI exit codes (stable; documented in README.md and `pydr --help`).
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_PERMISSION = 4
EXIT_IO = 5
EXIT_NO_SPACE = 6
EXIT_CORRUPT = 7
EXIT_MISMATCH = 8
EXIT_FILE_CHANGED = 9
EXIT_UNSUPPORTED = 10
EXIT_UNFINISHED = 11
EXIT_ALREADY_APPLIED = 12
EXIT_SAME_FILE = 13
EXIT_CANCELLED = 130


class PydrError(Exception):
    """Base class of pydr's own errors. ``path`` and ``offset`` say where."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message, *, path=None, offset=None):
        super().__init__(message)
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.offset = offset

    def __str__(self):
        text = self.message
        if self.offset is not None:
            text = f"{text} (at offset {self.offset})"
        if self.path is not None:
            text = f"{self.path}: {text}"
        return text


class Cancelled(PydrError):
    """The operation was cancelled (``cancel`` event set, or Ctrl-C)."""

    exit_code = EXIT_CANCELLED


class FileChanged(PydrError, RuntimeError):
    """A file ended before its expected size: it changed while being read."""

    exit_code = EXIT_FILE_CHANGED


class UnsupportedFile(PydrError, ValueError):
    """Not a regular file or block device (a FIFO, a socket, ...)."""

    exit_code = EXIT_UNSUPPORTED


class FormatError(PydrError, ValueError):
    """A pydr file is corrupt, truncated, of another version or not ours."""

    exit_code = EXIT_CORRUPT


class IncompatibleSignatures(PydrError, ValueError):
    """Two signatures cannot be compared (block size or algorithm differ)."""

    exit_code = EXIT_MISMATCH


class CorruptDelta(FormatError):
    """A delta (or undo journal) is corrupt, truncated or not ours."""


class BaseMismatch(PydrError, ValueError):
    """The target does not hold the image the delta was made against."""

    exit_code = EXIT_MISMATCH


class AlreadyApplied(BaseMismatch):
    """The target already holds the delta's result."""

    exit_code = EXIT_ALREADY_APPLIED


class UnfinishedApply(PydrError, RuntimeError):
    """An apply was interrupted on this target: finish it or roll it back."""

    exit_code = EXIT_UNFINISHED


class NothingToRollBack(PydrError, LookupError):
    """rollback was asked for a target that has no undo journal."""

    exit_code = EXIT_NOT_FOUND


class SameFile(PydrError, ValueError):
    """Source and target are the same file."""

    exit_code = EXIT_SAME_FILE


_ERRNO_EXIT = {
    _errno.ENOENT: EXIT_NOT_FOUND,
    _errno.ENOTDIR: EXIT_NOT_FOUND,
    _errno.EACCES: EXIT_PERMISSION,
    _errno.EPERM: EXIT_PERMISSION,
    _errno.EROFS: EXIT_PERMISSION,
    _errno.ENOSPC: EXIT_NO_SPACE,
    _errno.EDQUOT: EXIT_NO_SPACE,
    _errno.EISDIR: EXIT_UNSUPPORTED,
}


def exit_code_for(exc):
    """The CLI exit code for any exception pydr lets through."""
    if isinstance(exc, PydrError):
        return exc.exit_code
    if isinstance(exc, OSError):
        return _ERRNO_EXIT.get(exc.errno, EXIT_IO)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_CANCELLED
    return EXIT_INTERNAL


# pydr's C codes (csrc/pydr.h) -> exception classes.
_CODE_CLASSES = {
    -1001: Cancelled,
    -1002: FileChanged,
    -1003: UnsupportedFile,
    -1004: CorruptDelta,
    -1005: BaseMismatch,
    -1006: AlreadyApplied,
}


def raise_for_code(code, *, path=None, offset=None):
    """Raise the exception for a C return code; return None when it is 0.

    Negative errnos become the matching ``OSError`` subclass (the builtin
    picks it from the errno) with ``filename=path``; pydr's own codes become
    their :class:`PydrError` class. This is the only place that does it.
    """
    if code == 0:
        return
    from ._core import ffi, lib

    message = ffi.string(lib.pydr_strerror(code)).decode()
    if -1000 < code < 0:
        if offset is not None:
            message = f"{message} at offset {offset}"
        if path is not None:
            raise OSError(-code, message, os.fspath(path))
        raise OSError(-code, message)
    cls = _CODE_CLASSES.get(code, PydrError)
    raise cls(message, path=path, offset=offset)

"""pydr's exceptions, for every layer, and the CLI's exit codes.

Every pydr error is a :class:`PydrError` and also the builtin a caller would
expect (``FormatError`` is a ``ValueError``, ...). Operating-system errors stay
``OSError`` subclasses with their errno and the path, so ``except
FileNotFoundError`` works as usual. Each class carries the exit code the CLI
uses for it; the codes are stable and listed in ``pydr --help``. This module
imports nothing from pydr: every layer may use it. C return codes become these
exceptions in one function, :func:`pydr.engine.bindings.raise_for_code`.

A message states facts (what was found, where). Advice for a person -- the
command that gets them further -- is apart from it, in ``hint``, which the
CLI prints on a line of its own ("hint: ..."); a program reads ``item`` (the
item an error is about) and the class, never the words.
"""

from __future__ import annotations

import errno as _errno
import os

# typing costs ~4 ms at start-up: the checkers honour a TYPE_CHECKING of our own
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Optional

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
EXIT_VAULT = 14
EXIT_STATE = 15
EXIT_HOOK = 16
EXIT_PLAN = 17
EXIT_PROTOCOL = 18
EXIT_TRACKING = 19
EXIT_FLEET = 20
EXIT_SOME_FAILED = 21
EXIT_MACHINE = 22
EXIT_NOT_VERIFIED = 23
EXIT_CANCELLED = 130


class PydrError(Exception):
    """Base class of pydr's own errors.

    Args:
        message: what is wrong, as facts (no advice: that is ``hint``).
        path: the file, directory or spec the error is about, if any.
        offset: the byte offset in ``path`` the error is about, if any.
        item: the name of the protected item the error is about, if any.
        hint: advice for a person, e.g. "run 'pydr cleanup-test-failover
            web' first"; printed by the CLI on its own line, never part of
            ``str(error)``.

    ``str(error)`` is the message with the path and offset
    ("PATH: MESSAGE (at offset N)"). ``exit_code`` is the CLI's exit status
    for the class.
    """

    exit_code: int = EXIT_INTERNAL

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 offset: int | None = None, item: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path: str | None = os.fspath(path) if path is not None else None
        self.offset = offset
        self.item = item
        self.hint = hint

    def __str__(self) -> str:
        text = self.message
        if self.offset is not None:
            text = f"{text} (at offset {self.offset})"
        if self.path is not None:
            text = f"{self.path}: {text}"
        return text


class Cancelled(PydrError):
    """The operation was cancelled (``cancel`` event set, or Ctrl-C).

    ``result``: what the call did before it stopped, where it has one (a
    replication cycle's CycleResult; a recovery plan's PlanReport when
    raised by pydr.Vault.run_plan), else None. A cancelled plan's Cancelled
    also carries ``report``, the plan's raw entries (pydr.dr.plans.run_plan)."""

    exit_code = EXIT_CANCELLED
    result: Any = None
    report: Any  # set on a cancelled plan only


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


class DamagedJournal(CorruptDelta):
    """An undo journal or recovery-point step fails its checks in a way no
    torn write at a crash explains (a committed step that is not whole, a
    payload that fails its hash with valid records after it): damage."""


class DamagedPoint(FormatError):
    """A recovery point needs a damaged step: it is never restored."""


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


_ERRNO_EXIT: dict[Optional[int], int] = {
    _errno.ENOENT: EXIT_NOT_FOUND,
    _errno.ENOTDIR: EXIT_NOT_FOUND,
    _errno.EACCES: EXIT_PERMISSION,
    _errno.EPERM: EXIT_PERMISSION,
    _errno.EROFS: EXIT_PERMISSION,
    _errno.ENOSPC: EXIT_NO_SPACE,
    _errno.EDQUOT: EXIT_NO_SPACE,
    _errno.EEXIST: EXIT_STATE,  # a file in the way (a drill never writes over one)
    _errno.EISDIR: EXIT_UNSUPPORTED,
}


def exit_code_for(exc: BaseException) -> int:
    """The CLI exit code for any exception pydr lets through."""
    if isinstance(exc, PydrError):
        return exc.exit_code
    if isinstance(exc, OSError):
        return _ERRNO_EXIT.get(exc.errno, EXIT_IO)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_CANCELLED
    if isinstance(exc, ValueError):  # a wrong argument or option, as the CLI reports it
        return EXIT_USAGE
    return EXIT_INTERNAL


class TrackingLost(PydrError, RuntimeError):
    """Changed-block tracking cannot be trusted (a missing, in-use or
    inconsistent dirty bitmap): a checksum resync is needed."""

    exit_code = EXIT_TRACKING


class ProtocolError(PydrError, ValueError):
    """The peer broke the protocol (bad frame, size, order or version)."""

    exit_code = EXIT_PROTOCOL


class VaultError(PydrError, RuntimeError):
    """Not a vault, a vault of another version, or locked by another process."""

    exit_code = EXIT_VAULT


class UnknownName(PydrError, LookupError):
    """No such item, group or point."""

    exit_code = EXIT_NOT_FOUND


class InvalidArgument(PydrError, ValueError):
    """An argument of a call is not one the call accepts: a plan's groups,
    a point selector, an operation name, an option, a path that is not a
    path. The message names what was given and what was expected. Exit
    status 2, as for a bad option on the command line."""

    exit_code = EXIT_USAGE


class WrongThread(PydrError, RuntimeError):
    """A vault (pydr.Vault, its Store) was used from a thread other than
    the one that opened it: open one Vault per thread (readers never
    wait; one writer at a time). The message names the vault and both
    threads. It is a caller's bug; the CLI meets it only through a bug of
    pydr's own, hence exit status 1 (internal error), not 2: a person at
    the command line has no option to correct."""

    exit_code = EXIT_INTERNAL


class InvalidState(PydrError, RuntimeError):
    """The operation is not valid in the item's current state."""

    exit_code = EXIT_STATE


class HookFailed(PydrError, RuntimeError):
    """A quiesce, thaw or shutdown hook exited non-zero."""

    exit_code = EXIT_HOOK


class PlanFailed(PydrError, RuntimeError):
    """A recovery plan stopped at a failing hook or item; ``report`` (the
    plan's raw entries) says where. Raised by pydr.Vault.run_plan, it also
    carries ``result``: the PlanReport of what ran and what did not.

    Args:
        message: what failed.
        report: the plan's entries (pydr.dr.plans.run_plan).
        **kwargs: as PydrError (path, item, hint...).
    """

    exit_code = EXIT_PLAN
    report: Any
    result: Any  # set by pydr.Vault.run_plan

    def __init__(self, message: str, report: Any, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.report = report




class FleetError(PydrError, RuntimeError):
    """A fleet cycle could not run through its Dask scheduler, or some of
    its items failed (each item's job and status say why)."""

    exit_code = EXIT_FLEET


class NoWorkerForHost(FleetError, ConnectionError):
    """No Dask worker served an item's host within the host timeout: worth
    retrying once a worker (``pydr worker --host NAME``) is up."""


class SchedulerLost(FleetError, ConnectionError):
    """The connection to the Dask scheduler was lost while a fleet cycle's
    tasks ran: the items not yet recorded failed; worth retrying once the
    scheduler is back."""


class CycleFailed(PydrError, RuntimeError):
    """A replication cycle over several units (items, or groups of items)
    in which some failed: the others got their points. ``result`` is the
    CycleResult (pydr.dr.cycle); its ``failed`` outcomes carry each item's
    error and the exit code that error has alone. Exit status 21 whatever
    the items' errors: a script tells "some items failed" from one
    operation's error, and reads each item's cause from the outcomes. A
    call of one unit raises that unit's own error instead."""

    exit_code = EXIT_SOME_FAILED

    def __init__(self, message: str, result: Any = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.result = result


class PeerGone(PydrError, ConnectionError):
    """The other end of a connection died, refused it or never started: the
    ``--rsh`` command (ssh) exited, or the pydr it ran did. ``status`` is the
    rsh command's exit status (negative: killed by that signal; None: still
    running), ``stderr`` the last of what it wrote there (ssh's own words)."""

    exit_code = EXIT_PROTOCOL

    def __init__(self, message: str, *, status: int | None = None, stderr: str = "",
                 **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status = status
        self.stderr = stderr


class WrongPassphrase(PydrError, PermissionError):
    """No key of an encrypted object store opens with the passphrase given:
    refused before any chunk or index is read or written. ``path`` is the
    store (s3://BUCKET/PREFIX)."""

    exit_code = EXIT_PERMISSION


class PassphraseRequired(PydrError, PermissionError):
    """An encrypted object store is to be read or written and no passphrase
    was given (--passphrase-file, PYDR_PASSPHRASE_FILE, PYDR_PASSPHRASE).
    ``path`` is the store."""

    exit_code = EXIT_PERMISSION


class VaultDamaged(VaultError):
    """The vault's database cannot be read as it should: SQLite found it
    damaged (or it is not SQLite). ``path`` is the database file."""


class MachineError(PydrError, RuntimeError):
    """libvirt (or a bring-up hook) could not do what a machine needs: its
    daemon is unreachable, the domain is gone or was replaced (another
    UUID), a checkpoint or backup job was refused, a domain could not be
    defined or started. The message carries libvirt's own words."""

    exit_code = EXIT_MACHINE


class VerificationFailed(PydrError, RuntimeError):
    """A recovered machine did not pass its verification: ``probe`` names
    the probe that failed (pydr.dr.probes), the message what it saw. The
    result is recorded on the point either way."""

    exit_code = EXIT_NOT_VERIFIED

    def __init__(self, message: str, *, probe: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.probe = probe


class StdoutClosed(BrokenPipeError):
    """pydr's own standard output was closed by its reader (``pydr ... |
    head``): the one broken pipe that is not an error."""

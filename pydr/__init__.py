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
signatures only; the rest is imported when first used. Every exception class
of pydr.errors is importable from here (``pydr.VaultError``, ...).

The public names are typed (the package ships ``py.typed``) and documented in
the API reference (docs/api/).
"""

from __future__ import annotations

from types import ModuleType as _ModuleType

# "X as X": re-exported, for a type checker too
from . import errors as errors
from ._version import __version__ as __version__
from .engine.progress import ProgressRecord as ProgressRecord
from .engine.signatures import DEFAULT_ALGORITHM as DEFAULT_ALGORITHM
from .engine.signatures import DEFAULT_BLOCK_SIZE as DEFAULT_BLOCK_SIZE
from .engine.signatures import Signature as Signature
from .engine.signatures import SignStats as SignStats
from .engine.signatures import signature as signature

# typing costs ~4 ms at start-up: the checkers honour a TYPE_CHECKING of our own
TYPE_CHECKING = False
if TYPE_CHECKING:
    import os
    import threading
    from typing import BinaryIO, Callable, Iterable, Sequence, Tuple, Union

    from .dr.events import Event as Event
    from .dr.vault import Vault as Vault
    from .endpoints.base import Endpoint
    from .endpoints.transfer import TransferStats
    from .engine.apply import ApplyStats
    from .engine.delta import DeltaStats
    from .engine.resync import ResyncStats
    # the type checker's view of the loop below: every public name of pydr.errors
    from .errors import *  # noqa: F403

    _Path = Union[str, "os.PathLike[str]"]
    _Progress = Callable[[ProgressRecord], None]

# Every exception class (and exit code) of pydr.errors, mechanically: a class
# added there is exported here too (tests/test_api_docs.py checks it).
for _name, _value in vars(errors).items():
    if not _name.startswith("_") and not isinstance(_value, _ModuleType):
        globals()[_name] = _value
del _name, _value
_EXCEPTIONS = sorted(name for name, value in vars(errors).items()
                     if isinstance(value, type) and issubclass(value, BaseException)
                     and value.__module__ == errors.__name__)


def resync(src: _Path | Endpoint, dst: _Path | Endpoint, *, rsh: str | None = None,
           remote_pydr: str | None = None, block_size: int = 4096, threads: int | None = None,
           progress: _Progress | None = None, cancel: threading.Event | None = None,
           signature_cache: _Path | None = None,
           changed_extents: Iterable[Tuple[int, int]] | None = None, verify: bool = False,
           bwlimit: float | None = None, compress: bool = False, streams: int = 0,
           keep_undo: _Path | Sequence[_Path] | None = None, window: int | None = None,
           group: int | None = None) -> ResyncStats | TransferStats:
    """Make the disk `dst` byte-identical to `src`, wherever each is, reading
    and sending only what differs.

    Crash-safe: every block is written under an undo journal, so a resync
    that is killed (or cancelled) leaves `dst` as it was or finishes when run
    again with the same arguments. A missing `dst` file is created.

    Args:
        src: The disk to copy: a path (a file or block device), an image in a
            QEMU format, ``"[user@]host:PATH"`` (reached over `rsh`),
            ``nbd://...`` or an endpoint from :func:`open_endpoint`.
        dst: The disk to make equal to `src`, named the same ways.
        rsh: The command that reaches a remote host (default ``ssh``).
        remote_pydr: The ``pydr`` command on the remote host (default ``pydr``).
        block_size: The unit compared and written, in bytes (a power of two,
            512 to 16 MiB).
        threads: Hashing threads (default: the CPUs available, at most 8); the
            result is the same for any count.
        progress: Called with a :class:`ProgressRecord` about 10 times a second
            and once at the end.
        cancel: Setting this event stops the resync promptly with
            :class:`Cancelled`; `dst` is left as a killed resync leaves it.
        signature_cache: A signature cache of `dst` (two local disks only,
            docs/FORMAT.md): used instead of reading `dst` when it is valid and
            newer, then updated in place where `dst` changed (a v1 signature
            file is converted once).
        changed_extents: ``(offset, length)`` byte ranges of `src` that may have
            changed since the last resync (from a change tracker); only those are
            compared (two local disks only).
        verify: Read back every written range and compare hashes before the
            resync is committed (two local disks only).
        bwlimit: Bytes per second sent by the side holding `src` (across a
            connection only).
        compress: Compress the records on the wire with zstd (across a
            connection only).
        streams: Send a push's records over this many more connections.
        keep_undo: Where to keep the committed undo journal (the reverse delta
            that turns the new `dst` back into the old one), at `dst`'s place;
            the first usable of several is taken. By default it is deleted.
        window: Bytes signed per window of an exchange across a connection.
        group: Fine hashes per coarse digest in an exchange.

    Returns:
        For two disks this process opens (files, QEMU images, NBD exports), the
        engine's :class:`pydr.engine.resync.ResyncStats`; otherwise a
        :class:`pydr.endpoints.transfer.TransferStats` (bytes sent and received,
        direction).

    Raises:
        SameFile: `src` and `dst` are the same file.
        UnfinishedApply: `src` has an interrupted apply (roll it back first).
        Cancelled: `cancel` was set, or Ctrl-C.
        PeerGone: The remote side died or could not be reached.
        ProtocolError: The remote side broke the protocol.
        ValueError: An option that does not fit (``verify`` across a connection,
            a bad block size, ...).
        OSError: Reading or writing a disk failed (``FileNotFoundError`` for a
            missing `src`, ``PermissionError``, ...), with the path.

    Example::

        stats = pydr.resync("/img/web.img", "backup@dr:/srv/web.img", compress=True)
        print(stats.bytes_sent)
    """
    from .endpoints.transfer import resync as _resync

    stats: ResyncStats | TransferStats = _resync(src, dst, rsh=rsh, remote_pydr=remote_pydr, block_size=block_size,
                   threads=threads, progress=progress, cancel=cancel,
                   signature_cache=signature_cache, changed_extents=changed_extents,
                   verify=verify, bwlimit=bwlimit, compress=compress, streams=streams,
                   keep_undo=keep_undo, window=window, group=group)
    return stats


def make_delta(source: _Path, out: _Path | BinaryIO, *, against: Signature | _Path | None = None,
               target: _Path | None = None, block_size: int = 4096, threads: int | None = None,
               progress: _Progress | None = None,
               cancel: threading.Event | None = None) -> DeltaStats:
    """Write a delta: the records that turn a base image into `source`.

    The base is given either by its signature (`against`, so the base need
    not be here) or as an image (`target`, signed here). The delta (format in
    docs/FORMAT.md) is written in one pass, so it can go to a pipe; applied
    with :func:`apply_delta`, it checks that the target holds the base.

    Args:
        source: The new image (a file or block device).
        out: Where the delta goes: a path (written atomically), ``"-"`` for
            standard output, or a binary file object.
        against: The base's signature: a :class:`Signature` or a signature file
            (xxh3-128; its block size is used).
        target: The base image itself. Give exactly one of `against` and
            `target`.
        block_size: Block size when signing `target`, in bytes.
        threads: Hashing threads (default: the CPUs available, at most 8).
        progress: Called with a :class:`ProgressRecord` while `source` is signed.
        cancel: Setting this event stops the work with :class:`Cancelled` (no
            delta is left at a path `out`).

    Returns:
        A :class:`pydr.engine.delta.DeltaStats`: records, data bytes, zero
        bytes, the delta's size and the seconds it took.

    Raises:
        ValueError: Both or neither of `against` and `target` given.
        SameFile: `source` and `target` are the same file.
        IncompatibleSignatures: `against` is not an xxh3-128 signature.
        FormatError: The signature file `against` is corrupt or not one.
        Cancelled: `cancel` was set, or Ctrl-C.
        OSError: Reading an image or writing `out` failed, with the path.

    Example::

        pydr.make_delta("new.img", "update.delta", target="old.img")
        pydr.apply_delta("update.delta", "/srv/copy-of-old.img")
    """
    from .engine.delta import make_delta as _make_delta

    stats: DeltaStats = _make_delta(source, out, against=against, target=target,
                                    block_size=block_size, threads=threads, progress=progress,
                                    cancel=cancel)
    return stats


def apply_delta(delta: _Path | BinaryIO, target: _Path, *, progress: _Progress | None = None,
                cancel: threading.Event | None = None, verify: bool = False) -> ApplyStats:
    """Apply a delta to `target` crash-safely, turning the base into the result.

    Every record is checked (its own checksum, and the hash of the base
    blocks it replaces) before it is written, under an undo journal kept
    beside `target`. On any error `target` is restored. If an apply of the
    same delta to this target was interrupted, it is rolled back first and
    done again; a target that already holds the delta's whole result is left
    as it is.

    Args:
        delta: The delta: a path, ``"-"`` for standard input, or a binary file
            object (read once, front to back).
        target: The image to change (a file or block device).
        progress: Called with a :class:`ProgressRecord` about 10 times a second
            and once at the end.
        cancel: Setting this event stops the apply with :class:`Cancelled`;
            `target` is restored.
        verify: Re-read the whole target afterwards and compare it with the
            delta's result identity (rolled back on a mismatch).

    Returns:
        A :class:`pydr.engine.apply.ApplyStats`: records, bytes written and
        zeroed, journal bytes, seconds, and whether the target already held
        the result (``already_applied``).

    Raises:
        CorruptDelta: The delta is damaged, truncated or not a pydr delta
            (names the offset).
        BaseMismatch: `target` does not hold the image the delta was made
            against.
        UnfinishedApply: An apply of another delta was interrupted on `target`
            (see :func:`rollback`).
        Cancelled: `cancel` was set, or Ctrl-C.
        OSError: Reading or writing failed, with the path.

    Example::

        stats = pydr.apply_delta("update.delta", "/srv/disk.img", verify=True)
    """
    from .engine.apply import apply_delta as _apply_delta

    stats: ApplyStats = _apply_delta(delta, target, progress=progress, cancel=cancel,
                                     verify=verify)
    return stats


def rollback(target: _Path, *, cancel: threading.Event | None = None) -> int:
    """Undo an interrupted apply or resync on `target`, putting back the
    blocks it had changed from its undo journal.

    Args:
        target: The image an apply or resync was interrupted on.
        cancel: Once set, the rollback stops before its next journal record
            (:class:`Cancelled`); running it again finishes it.

    Returns:
        The number of bytes restored.

    Raises:
        NothingToRollBack: `target` has no undo journal (a ``LookupError``).
        DamagedJournal: The journal fails its checks in a way no torn write
            explains; nothing is guessed.
        OSError: Reading or writing failed, with the path.

    Example::

        try:
            pydr.apply_delta("update.delta", "disk.img")
        except pydr.UnfinishedApply:
            pydr.rollback("disk.img")
    """
    from .engine.apply import rollback as _rollback

    restored: int = _rollback(target, cancel=cancel)
    return restored


def open_endpoint(spec: _Path | Endpoint, *, rsh: str | None = None,
                  remote_pydr: str | None = None, format: str | None = None) -> Endpoint:
    """The endpoint ("a disk somewhere") a spec names, for :func:`resync` and
    the vault.

    Args:
        spec: ``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``
            (an NBD export); ``s3://BUCKET/PREFIX`` (an object store holding
            recovery points); ``qmp:SOCKET:NODE`` (a block node of a running
            QEMU); ``[user@]host:PATH`` (a disk on another host); or a local
            path (a raw file or block device, or a qcow2/vmdk/vhdx/vpc/vdi image,
            told by its first bytes or, if it does not exist yet, its
            extension). An :class:`pydr.endpoints.base.Endpoint` is returned as
            it is.
        rsh: The command that reaches a remote host (default ``ssh``).
        remote_pydr: The ``pydr`` command on the remote host.
        format: A local image's QEMU format, instead of detecting it.

    Returns:
        The :class:`pydr.endpoints.base.Endpoint`. Nothing is opened or
        contacted yet.

    Raises:
        ValueError: The spec is malformed.

    Example::

        disk = pydr.open_endpoint("backup@dr:/srv/web.img")
        pydr.resync("/img/web.img", disk)
    """
    from .endpoints import open_endpoint as _open

    endpoint: Endpoint = _open(spec, rsh=rsh, remote_pydr=remote_pydr, format=format)
    return endpoint


def init_vault(directory: _Path) -> str:
    """Create an empty vault in `directory` (created if missing), to be
    opened with :class:`Vault`.

    The vault holds hook command lines and the history of private disks: its
    directory is made 0700 and its files 0600, whatever the umask.

    Args:
        directory: Where the vault goes.

    Returns:
        `directory`, as a string.

    Raises:
        VaultError: A vault already exists there.
        OSError: The directory cannot be created or written, with the path.

    Example::

        pydr.init_vault("/srv/vault")
        with pydr.Vault("/srv/vault", writer=True) as v:
            v.protect("web", [("/img/web.img", "/dr/web.img")])
    """
    from .dr.vault import init_vault as _init_vault

    made: str = _init_vault(directory)
    return made


def __getattr__(name: str) -> object:
    # pydr.Vault and pydr.Event without loading the DR layer on import
    if name == "Vault":
        from .dr import vault

        return vault.Vault
    if name == "Event":
        from .dr import events

        return events.Event
    raise AttributeError(f"module 'pydr' has no attribute {name!r}")


__all__ = sorted([
    "DEFAULT_ALGORITHM", "DEFAULT_BLOCK_SIZE", "Event", "ProgressRecord", "SignStats",
    "Signature", "Vault", "__version__", "apply_delta", "errors", "init_vault", "make_delta",
    "open_endpoint", "resync", "rollback", "signature", *_EXCEPTIONS,
])


def __dir__() -> list[str]:
    return list(__all__)

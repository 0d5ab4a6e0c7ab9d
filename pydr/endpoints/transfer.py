"""Resync between two endpoints: make one disk byte-identical to another,
wherever each of them is.

Two disks this process reads and writes itself (``in_process``: files, QEMU
images, NBD exports) go through the engine's resync (pydr.engine.resync: windows hashed on every thread, a
signature cache that spares reading the target, change-tracking extents,
read-back verification). Any other pair goes through the exchange: the
source endpoint's role signs and sends, the target endpoint's role answers
and applies (pydr.transport.roles), so a push, a pull and a relay between
two hosts are the same few lines here.
"""

import time

from ..engine import bindings as B
from ..engine.devices import using_device
from ..engine.parallel import check_threads
from ..engine.progress import Record
from ..errors import InvalidArgument
from . import open_endpoint


class TransferStats(Record):
    """What a resync across a connection did (:func:`pydr.resync`). Read-only.

    Attributes:
        bytes_written: Bytes of data written to the target.
        bytes_zeroed: Bytes of the target zeroed.
        blocks_changed: Blocks that differed.
        bytes_sent: Bytes this process sent (both connections of a relay).
        bytes_received: Bytes this process received.
        bytes_read: Bytes pydr read in this process: source_bytes_read +
            target_bytes_read.
        journal_bytes: Size of the undo journal written.
        seconds: Wall-clock time taken.
        direction: ``"push"``, ``"pull"``, ``"relay"`` or ``"local"``.
        source_bytes_read: Bytes of the source read here (0 when another
            host read it): each byte once, plus the blocks that differ in
            windows beyond the exchange's keep budget (docs/PROTOCOL.md).
        target_bytes_read: Bytes of the target read here to hash it (0 when
            another host read it).
    """

    _fields = ("bytes_written", "bytes_zeroed", "blocks_changed", "bytes_sent", "bytes_received",
               "bytes_read", "journal_bytes", "seconds", "direction", "source_bytes_read",
               "target_bytes_read")
    __slots__ = _fields
    bytes_written: int
    bytes_zeroed: int
    blocks_changed: int
    bytes_sent: int
    bytes_received: int
    bytes_read: int
    journal_bytes: int
    seconds: float
    direction: str
    source_bytes_read: int
    target_bytes_read: int


def resync(src, dst, *, rsh=None, remote_pydr=None, **options):
    """The implementation of :func:`pydr.resync` (documented there): `src`
    and `dst` opened as endpoints, then :func:`transfer`."""
    stats, _ = transfer(open_endpoint(src, rsh=rsh, remote_pydr=remote_pydr),
                        open_endpoint(dst, rsh=rsh, remote_pydr=remote_pydr), **options)
    return stats


def transfer(src, dst, *, block_size=4096, threads=None, progress=None, cancel=None,
             keep_undo=None, signature_cache=None, changed_extents=None, verify=False,
             bwlimit=None, compress=False, streams=0, window=None, group=None):
    """Resync the endpoint `dst` from `src`; returns (stats, kept): `kept` is
    the index in `keep_undo` (specs at the target's place where the
    committed undo journal may be kept, a recovery-point step) of the one
    that holds it, or None.

    For two disks on this machine: ``signature_cache`` (a signature file of
    the target, used when valid), ``changed_extents`` (only these source
    ranges may have changed), ``verify`` (read back what was written),
    ``cancel`` (an Event). Across a connection: ``bwlimit`` (bytes/s sent by
    the side holding the source), ``compress`` (zstd on the wire),
    ``streams`` (a push's records over N more connections), ``window`` and
    ``group`` (the exchange's geometry)."""
    if keep_undo is not None and not isinstance(keep_undo, (list, tuple)):
        keep_undo = [keep_undo]
    B.check_block_size(block_size)
    threads = check_threads(threads)
    if src.in_process and dst.in_process:
        return _engine_resync(src, dst, block_size=block_size, threads=threads, progress=progress,
                              cancel=cancel, keep_undo=keep_undo, signature_cache=signature_cache,
                              changed_extents=changed_extents, verify=verify)
    if verify:
        raise InvalidArgument("verify reads the target back: only when both disks are on this "
                              "machine", hint="leave out --verify")
    if bwlimit is not None and bwlimit <= 0:
        raise ValueError("bwlimit must be a positive number of bytes per second")
    if streams and dst.in_process:
        raise InvalidArgument("streams are for a target on another host (a pull uses one "
                              "connection)", hint="leave out --streams")
    start = time.monotonic()
    wire = dict(bwlimit=bwlimit, compress=compress)
    with src.open_source(block_size=block_size, threads=threads, progress=progress,
                         window=window, group=group, **wire) as source:
        with dst.open_target(block_size=block_size, result_size=source.size, threads=threads,
                             keep_undo=keep_undo, streams=streams,
                             mode=getattr(source, "mode", None),
                             progress=None if source.reports_progress else progress,
                             **wire) as target:
            source.run(target)
            result = target.finish()
        sent = source.bytes_sent + target.bytes_sent
        received = source.bytes_received + target.bytes_received
        direction = {(False, True): "push", (True, False): "pull",
                     (True, True): "relay"}.get((bool(source.bytes_sent), bool(target.bytes_sent)),
                                                "local")
        source_read = int(source.bytes_read)
        target_read = int(getattr(target, "bytes_read", 0))  # 0: read on another host
        stats = TransferStats(result.bytes_written, result.bytes_zeroed, source.blocks_changed,
                              sent, received, source_read + target_read, result.journal_bytes,
                              time.monotonic() - start, direction, source_read, target_read)
    return stats, result.kept


def _engine_resync(src, dst, *, keep_undo, **options):
    """Two disks this process opens: the engine's resync, on paths or on the
    devices the endpoints open (a QEMU image's qemu-nbd, an NBD export)."""
    from ..engine.resync import resync as engine_resync

    keep, kept = dst.choose_undo(keep_undo)
    with src.engine_disk() as source:
        with dst.engine_disk(write=True, size=disk_size(source)) as target:
            stats = engine_resync(source, target, keep_undo=keep, **options)
    return stats, kept


def disk_size(disk):
    """The size of what engine_disk() yielded: a path or an open device."""
    with using_device(disk) as dev:
        return dev.size_now()

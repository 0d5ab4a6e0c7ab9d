"""Signing spans of a file (or block device) open in this process on
several threads, each byte read once, straight into a buffer the caller
keeps (sign_spans_range); the whole of a range without keeping is
devices.sign_range. FileDevice.sign (pydr.engine.devices) picks one.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from . import bindings as B
from .parallel import CANCEL_BYTES, run_chunks
from .spans import as_pairs, cut_units


def blocks_for(size: int, block_size: int) -> int:
    """How many blocks of `block_size` bytes cover `size` bytes."""
    return (size + block_size - 1) // block_size


def sign_spans_range(fd: int, path: Optional[str], offset: int, length: int, block_size: int,
                     code: int, hashes: Any, zero_mask: Any, *,
                     spans: List[Tuple[int, int]], keep: Any, threads: int,
                     progress_record: B.Progress, throttle: Any, cancel: Any = None,
                     use_mmap: bool = True, final_report: bool = True) -> int:
    """Sign the spans (checked (start, end) pairs, see pydr.engine.spans) of
    [offset, offset+length) of an open file into the range's buffers, on
    ``threads`` threads, each span byte read once: with ``keep`` (a
    writable buffer indexed from `offset`) by pread straight into it. The
    spans are cut into units of about CANCEL_BYTES (smaller when there is
    less work than threads), a thread takes a unit at a time and looks at
    ``cancel`` before each. Returns the threads used."""
    total = sum(stop - start for start, stop in spans)
    unit_bytes = min(CANCEL_BYTES, max(block_size, -(-total // max(1, threads))))
    units = cut_units(spans, block_size, unit_bytes)
    words = B.hash_words(code)
    keep_view = memoryview(keep).cast("B") if keep is not None else None

    def do_unit(signer, i):
        if cancel is not None and cancel.is_set():
            progress_record.request_cancel()  # the other workers stop too
        unit = units[i]
        first, last = unit[0][0], unit[-1][1]
        h, z = out.at((first - offset) // block_size)
        signer.sign_spans(fd, first, blocks_for(last - first, block_size), as_pairs(unit), h,
                          z, None if keep_view is None else
                          keep_view[first - offset:last - offset],
                          progress_record, path)

    used = max(1, min(threads, len(units)))
    with B.OutputBuffers(hashes, zero_mask, words) as out:
        run_chunks(len(units), used, lambda: B.Signer(block_size, code, use_mmap=use_mmap),
                   do_unit, progress_record, throttle, cancel, final_report)
    return used


def check_keep(keep: Any, length: int, name: Optional[str]) -> None:
    """ValueError unless keep is None or a writable buffer of at least
    `length` bytes."""
    if keep is None:
        return
    view = memoryview(keep)
    if view.readonly or view.nbytes < length:
        raise ValueError(f"{name}: keep must be a writable buffer of at least {length} bytes "
                         f"(got {view.nbytes}{', read-only' if view.readonly else ''})")

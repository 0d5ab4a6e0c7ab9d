"""Signing a file (or block device) open in this process on several
threads: the whole of a range through the C signer's mmap windows
(sign_range), or spans of it read once, straight into a buffer the caller
keeps (sign_spans_range). FileDevice.sign (pydr.engine.devices) picks one.
"""

from . import bindings as B
from .parallel import CANCEL_BYTES, run_chunks
from .spans import as_pairs, cut_units

# Each thread signing a file takes chunks of this many bytes (rounded to
# whole blocks).
CHUNK_BYTES = 64 * 1024 * 1024


def blocks_for(size, block_size):
    """How many blocks of `block_size` bytes cover `size` bytes."""
    return (size + block_size - 1) // block_size


def sign_range(fd, path, offset, length, block_size, code, hashes, zero_mask, *,
               threads, progress_record, throttle, cancel=None, use_mmap=True,
               final_report=True):
    """Sign [offset, offset+length) of an open file into caller buffers
    (``hashes``: blocks * words uint64, ``zero_mask``: one byte per block),
    on ``threads`` threads. offset is block aligned; the range may end on a
    short block only at the end of the file. Returns the threads used.

    Each thread signs its chunk CANCEL_BYTES at a time and looks at
    ``cancel`` before each piece: a set event stops it within one piece
    (the C core looks at the flag per mmap window or I/O buffer too), and
    a piece of holes costs no read but bounded CPU."""
    n = blocks_for(length, block_size)
    words = B.hash_words(code)
    per_chunk = max(1, CHUNK_BYTES // block_size)
    per_piece = max(1, min(per_chunk, CANCEL_BYTES // block_size))
    nchunks = (n + per_chunk - 1) // per_chunk
    end = offset + length

    def do_chunk(signer, i):
        b1 = min(n, (i + 1) * per_chunk)
        for b0 in range(i * per_chunk, b1, per_piece):
            if cancel is not None and cancel.is_set():
                progress_record.request_cancel()  # the other workers stop too
            b2 = min(b1, b0 + per_piece)
            start = offset + b0 * block_size
            h, z = out.at(b0)
            signer.sign(fd, start, min(end, offset + b2 * block_size) - start, h, z, b2 - b0,
                        progress_record, path)

    used = max(1, min(threads, nchunks))
    with B.OutputBuffers(hashes, zero_mask, words) as out:
        run_chunks(nchunks, used, lambda: B.Signer(block_size, code, use_mmap=use_mmap),
                   do_chunk, progress_record, throttle, cancel, final_report)
    return used


def sign_spans_range(fd, path, offset, length, block_size, code, hashes, zero_mask, *,
                     spans, keep, threads, progress_record, throttle, cancel=None,
                     use_mmap=True, final_report=True):
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


def check_keep(keep, length, name):
    """ValueError unless keep is None or a writable buffer of at least
    `length` bytes."""
    if keep is None:
        return
    view = memoryview(keep)
    if view.readonly or view.nbytes < length:
        raise ValueError(f"{name}: keep must be a writable buffer of at least {length} bytes "
                         f"(got {view.nbytes}{', read-only' if view.readonly else ''})")

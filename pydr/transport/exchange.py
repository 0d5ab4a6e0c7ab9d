"""The comparison of two images across a connection, in two levels and
pipelined (docs/PROTOCOL.md, "Exchange").

The side holding the source signs a window of it at 4 KiB and sends COARSE:
one digest per GROUP blocks. The side holding the target signs the same
window of its image and answers FINE with its 4 KiB hashes only for the
groups whose digests differ. The source side then knows exactly which blocks
differ and sends them as RECORDS. It runs up to LOOKAHEAD windows ahead of
the answers, so a round trip is paid once per transfer, not once per window,
and the hashes on the wire follow the changes, not the image size.

The same two halves run on the client (push: it has the source) and on the
server (pull: it has the source).

The source side reads each byte once: a window is read into a kept buffer
while it is signed, and its records are encoded from that buffer when the
FINE answer arrives. The windows waiting for their answer are kept while
their total stays within KEEP_BYTES (256 MiB: the LOOKAHEAD + 1 windows of
64 MiB a transfer at the default geometry has pending, so a full copy reads
the source once by default). A window beyond that budget (a larger window
or lookahead asked for, e.g. by the client of a pull) is signed without
being kept, and only the blocks found to differ in it are read again.
"""

import collections
import struct

import numpy as np

from ..engine import bindings as B
from . import protocol as P
from ..engine.delta import write_records
from ..engine.devices import blocks_for
from ..engine.signatures import Signature
from ..engine.resync import compare_window, encode_kept

WINDOW = 64 << 20       # image bytes per COARSE/FINE exchange
GROUP = 32              # 4 KiB blocks per coarse digest (128 KiB)
LOOKAHEAD = 3           # windows the source may run ahead of the FINE answers
NET_BATCH = 8 << 20     # record bytes per RECORDS frame (under the frame limit)
MAX_WINDOW_BLOCKS = 1 << 18  # a FINE frame stays under 5 MiB even with 1-block groups
MAX_GROUP = 1 << 16
#: bytes of source data the source side keeps for the windows awaiting their
#: FINE answer (LOOKAHEAD + 1 default windows): within it nothing is read twice
KEEP_BYTES = (LOOKAHEAD + 1) * WINDOW

COARSE_HEAD = struct.Struct("<QQI")  # window offset, window bytes, group (blocks)
FINE_HEAD = struct.Struct("<QQI")    # window offset, target bytes in the window, groups listed

_CODE = B.ALGORITHMS["xxh3-128"]


def group_digests(hashes, nblocks, block_size, group):
    """One 16-byte digest per `group` consecutive block hashes (the last group
    may be short): the digest pydr_hashes_digest_ranges gives."""
    k = -(-nblocks // group)
    ext = np.empty(2 * k, np.uint64)
    ext[0::2] = np.arange(k, dtype=np.uint64) * np.uint64(group * block_size)
    ext[1::2] = group * block_size
    return B.hashes_digest_ranges(hashes, nblocks, block_size, ext)


def blocks_of_groups(groups, group, nblocks):
    """The block numbers of the (increasing) `groups`, in order, below nblocks."""
    blocks = (np.asarray(groups, dtype=np.int64)[:, None] * group
              + np.arange(group, dtype=np.int64)).ravel()
    return blocks[blocks < nblocks]


def target_bytes(target_size, w0, w1, block_size):
    """How much of the window [w0, w1) of the source the target covers, in
    whole blocks (its last block may reach past w1 when w1 is the source's
    unaligned end)."""
    if w0 >= target_size:
        return 0
    return min(target_size, -(-w1 // block_size) * block_size) - w0


def _check_group(group):
    if not isinstance(group, int) or not 1 <= group <= MAX_GROUP:
        raise P.ProtocolError(f"bad coarse group size {group!r}")
    return group


class SourceSide:
    """Streams COARSE digests of the source's windows and, once the target's
    FINE answer to a window arrives, the records of the blocks that differ.

    ``send(ftype, payload)`` sends a frame; ``next_fine()`` returns the
    payload of the next FINE frame (blocking). Single-threaded: it never
    waits on its peer except for a FINE answer, and the target side answers
    every COARSE frame without waiting for anything. ``keep_bytes``: how
    much of the pending windows' data it keeps to encode their records from
    (see the module's docstring); a window beyond it is read again for the
    blocks that differ. ``bytes_reread``: the bytes read that second time."""

    def __init__(self, dev, size, block_size, send, next_fine, *, threads, shared, throttle,
                 window=WINDOW, group=GROUP, lookahead=LOOKAHEAD, first_seq=0,
                 batch=NET_BATCH, keep_bytes=KEEP_BYTES):
        self.dev, self.size, self.bs = dev, size, block_size
        self.send, self.next_fine = send, next_fine
        self.threads, self.shared, self.throttle = threads, shared, throttle
        self.window = max(block_size, min(window, MAX_WINDOW_BLOCKS * block_size)
                          // block_size * block_size)
        self.group = _check_group(group)
        self.lookahead = max(0, lookahead)
        self.seq = first_seq
        self.blocks_changed = 0
        self.data_bytes = 0
        self.buf = bytearray(batch)  # record bytes per RECORDS frame
        self.pending = collections.deque()
        # kept window buffers: as many as keep_bytes holds, made when first
        # needed (numpy.empty: pages cost only where data was read into them)
        self.keep_slots = max(0, keep_bytes) // self.window
        self.kept, self.free = 0, []
        self.bytes_reread = 0

    def _take_buffer(self):
        """A buffer for the next window's data, or None beyond keep_bytes."""
        if self.free:
            return self.free.pop()
        if self.kept < self.keep_slots:
            self.kept += 1
            return np.empty(self.window, np.uint8)
        return None

    def run(self):
        bs = self.bs
        for w0 in range(0, self.size, self.window):
            w1 = min(self.size, w0 + self.window)
            n = blocks_for(w1 - w0, bs)
            h, z = bytearray(16 * n), bytearray(n)
            keep = self._take_buffer()
            self.dev.sign(w0, w1 - w0, bs, _CODE, h, z, threads=self.threads,
                          progress_record=self.shared, throttle=self.throttle, final_report=False,
                          keep=keep)
            self.send(P.COARSE, COARSE_HEAD.pack(w0, w1 - w0, self.group) +
                      bytes(group_digests(h, n, bs, self.group)))
            self.pending.append((w0, w1, h, z, keep))
            if len(self.pending) > self.lookahead:
                self._settle()
            self.throttle.report(self.shared.done, self.shared.read)
        while self.pending:
            self._settle()
        return self

    def _settle(self):
        """Take the oldest window's FINE answer and send its changed blocks."""
        w0, w1, sh, sz, keep = self.pending.popleft()
        try:
            self._answer(w0, w1, sh, sz, keep)
        finally:
            if keep is not None:
                self.free.append(keep)

    def _answer(self, w0, w1, sh, sz, keep):
        bs, group = self.bs, self.group
        n = len(sz)
        payload = self.next_fine()
        if len(payload) < FINE_HEAD.size:
            raise P.ProtocolError("short FINE frame")
        f0, t_len, r = FINE_HEAD.unpack_from(payload)
        k = -(-n // group)
        if f0 != w0 or t_len > n * bs or r > k:
            raise P.ProtocolError(f"FINE frame does not answer the window at offset {w0}")
        m = blocks_for(t_len, bs)
        idx = np.frombuffer(payload, dtype="<u4", count=r, offset=FINE_HEAD.size).astype(np.int64)
        if r and (np.any(np.diff(idx) <= 0) or idx[-1] >= k):
            raise P.ProtocolError("FINE group numbers out of order or range")
        listed = blocks_of_groups(idx, group, m)
        body = memoryview(payload)[FINE_HEAD.size + 4 * r:]
        if len(body) != 16 * len(listed):
            raise P.ProtocolError("FINE frame sizes do not add up")
        # the target's hashes: equal to ours in the groups it did not list
        dh = np.frombuffer(sh, dtype=np.uint64, count=2 * m).reshape(m, 2).copy()
        dh[listed] = np.frombuffer(body, dtype="<u8").reshape(-1, 2)
        cmp = compare_window(Signature(bs, w1 - w0, "xxh3-128", sh, sz),
                             Signature(bs, t_len, "xxh3-128", dh.tobytes(), bytes(m)), w0, bs)
        if cmp:
            ext, zero, digests, blocks = cmp
            self.blocks_changed += blocks
            emit = lambda c: self.send(P.RECORDS, bytes(c))  # noqa: E731
            if keep is None:  # not kept (beyond keep_bytes): what differs is read again
                count, data, _ = write_records(self.dev, ext, zero, digests, emit,
                                               first_seq=self.seq, buf=self.buf)
                self.bytes_reread += data
            else:  # from the bytes that were signed: the source is not read again
                count, data, _ = encode_kept(keep, w0, w1, self.dev.name, ext, zero, digests,
                                             emit, first_seq=self.seq, buf=self.buf)
            self.seq += count
            self.data_bytes += data


class TargetSide:
    """Answers each COARSE frame with FINE: the target's hashes in the groups
    of that window whose digests differ from the source's (and always the
    group holding the last block when the two ends differ)."""

    def __init__(self, dev, size, block_size, send, *, threads, shared, throttle):
        self.dev, self.size, self.bs = dev, size, block_size
        self.send = send
        self.threads, self.shared, self.throttle = threads, shared, throttle
        self.next_offset = 0
        self.groups_sent = self.blocks_sent = 0

    def coarse(self, payload):
        bs = self.bs
        if len(payload) < COARSE_HEAD.size:
            raise P.ProtocolError("short COARSE frame")
        w0, length, group = COARSE_HEAD.unpack_from(payload)
        _check_group(group)
        n = blocks_for(length, bs)
        k = -(-n // group)
        if w0 != self.next_offset or not 0 < n <= MAX_WINDOW_BLOCKS:
            raise P.ProtocolError(f"COARSE frame for offset {w0} out of order or too large")
        if len(payload) != COARSE_HEAD.size + 16 * k:
            raise P.ProtocolError("COARSE frame sizes do not add up")
        self.next_offset = w0 + length
        t_len = target_bytes(self.size, w0, w0 + length, bs)
        m = blocks_for(t_len, bs)
        h, z = bytearray(16 * m), bytearray(m)
        if m:
            self.dev.sign(w0, t_len, bs, _CODE, h, z, threads=self.threads,
                          progress_record=self.shared, throttle=self.throttle, final_report=False)
        theirs = np.frombuffer(payload, dtype=np.uint8, offset=COARSE_HEAD.size).reshape(k, 16)
        mine = np.zeros((k, 16), np.uint8)
        km = -(-m // group)
        mine[:km] = np.frombuffer(group_digests(h, m, bs, group), dtype=np.uint8).reshape(km, 16)
        differ = (mine != theirs).any(axis=1)
        differ[km:] = False  # past the target's end: it has no hashes to give
        if t_len != length and min(n, m):
            differ[(min(n, m) - 1) // group] = True  # a short or longer last block
        idx = np.flatnonzero(differ)
        listed = blocks_of_groups(idx, group, m)
        hashes = np.frombuffer(h, dtype=np.uint8).reshape(m, 16)[listed]
        self.blocks_sent += len(listed)
        self.groups_sent += len(idx)
        self.send(P.FINE, FINE_HEAD.pack(w0, t_len, len(idx)) + idx.astype("<u4").tobytes()
                  + hashes.tobytes())
        self.throttle.report(self.shared.done, self.shared.read)

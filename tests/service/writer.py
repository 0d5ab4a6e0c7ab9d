"""A guest's writer for the end-to-end tests of `pydr run`, and its verifier.

The writer writes numbered 64 KiB records through NBD (pydr's own libnbd
binding, a connection to the qemu-storage-daemon's export), each into a
64 KiB slot of the disk chosen by a seeded generator, and flushes after each
one. A record carries its magic, seed, sequence number and slot offset, a
payload derived from (seed, seq), and a SHA-256 of all that at its end, so
a byte read back from a point tells which record it is and whether it is
intact. Each record's line in the log -- "SEQ OFFSET STARTED FLUSHED"
(epoch seconds before the write was sent and after the flush returned) --
is appended and fsynced after the flush: a point whose cut is at T holds
every record flushed before T.

Commands come on a FIFO, one a line: "stop N" (write up to record N, or
stop now if N is already written), "go" (write again), "quit". After a stop
the writer answers on the acks FIFO "stopped M T": M the last record
written, T the time after its flush. Run it as a script:

    python writer.py --uri URI --seed S --size BYTES --log LOG --commands FIFO --acks FIFO
                     [--rate MiB/s] [--first N]

`verify(image, seed, upto)` checks a materialised raw disk holds exactly
what records 1..upto make of a zeroed disk; `check_point(image, seed, log,
cut_at, created_at)` checks a point taken while the writer ran.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import struct
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

RECORD = 64 * 1024
MAGIC = b"PYDRWREC"
_HEADER = struct.Struct(">8sQQQ")  # magic, seed, seq, offset
_DIGEST = 32


def slots(size: int) -> int:
    """How many 64 KiB record slots a disk of `size` bytes has."""
    return size // RECORD


def offsets(seed: int, size: int, upto: int) -> List[int]:
    """The offsets of records 1..upto (index 0 is record 1) of a writer with
    `seed` on a disk of `size` bytes: pseudo-random 64 KiB-aligned slots."""
    rng = random.Random(seed)
    n = slots(size)
    return [rng.randrange(n) * RECORD for _ in range(upto)]


def record(seed: int, seq: int, offset: int) -> bytes:
    """The 64 KiB record `seq` of the writer with `seed`, for `offset`."""
    head = _HEADER.pack(MAGIC, seed, seq, offset)
    payload = random.Random(seed * 1_000_003 + seq).randbytes(
        RECORD - _HEADER.size - _DIGEST)
    body = head + payload
    return body + hashlib.sha256(body).digest()


def parse_record(block: bytes, seed: int, offset: int) -> Optional[int]:
    """The sequence number of the intact record of `seed` that `block` (64
    KiB read at `offset`) holds; None when the block is all zero.

    Raises:
        AssertionError: the block is neither zero nor an intact record of
            this writer written for this offset (it names the offset).
    """
    if block == bytes(len(block)):
        return None
    magic, rseed, seq, roff = _HEADER.unpack_from(block)
    assert magic == MAGIC and rseed == seed and roff == offset, \
        f"offset {offset}: not a record of writer {seed} for this offset"
    assert hashlib.sha256(block[:-_DIGEST]).digest() == block[-_DIGEST:], \
        f"offset {offset}: record {seq} is damaged (checksum)"
    assert block == record(seed, seq, offset), f"offset {offset}: record {seq} differs"
    return seq


@dataclass(frozen=True)
class LogLine:
    """One record as the writer's log has it."""

    seq: int
    offset: int
    started: float
    flushed: float


def read_log(path: str) -> List[LogLine]:
    """The writer's log, in order (a torn last line -- a killed writer -- is
    left out)."""
    out = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4 and line.endswith("\n"):
                out.append(LogLine(int(parts[0]), int(parts[1]), float(parts[2]),
                                   float(parts[3])))
    return out


def expected_image(seed: int, size: int, upto: int) -> bytearray:
    """A zeroed disk of `size` bytes with records 1..upto written in order."""
    img = bytearray(size)
    for seq, off in enumerate(offsets(seed, size, upto), 1):
        img[off:off + RECORD] = record(seed, seq, off)
    return img


def verify(image: str, seed: int, upto: int) -> None:
    """Check the raw disk `image` holds exactly records 1..upto of the writer
    with `seed` written in order onto a zeroed disk: each slot holds the
    last of those records aimed at it, intact, and every other slot is zero.

    Raises:
        AssertionError: naming the first slot (offset) that differs and what
            it holds instead.
    """
    size = os.path.getsize(image)
    want: Dict[int, int] = {}
    for seq, off in enumerate(offsets(seed, size, upto), 1):
        want[off] = seq
    with open(image, "rb") as f:
        for slot in range(slots(size)):
            off = slot * RECORD
            block = f.read(RECORD)
            got = parse_record(block, seed, off)
            assert got == want.get(off), \
                f"{image} offset {off}: holds record {got}, want {want.get(off)} (upto {upto})"


def check_point(image: str, seed: int, log: List[LogLine], cut_at: float,
                created_at: float) -> int:
    """Check a point taken while the writer ran: every slot holds an intact
    record (or zero) no older than the newest record aimed at it that was
    flushed before `cut_at`, and no record started after `created_at` (the
    point was recorded by then: it cannot hold later data). Returns how many
    records were flushed before the cut (the sequence the point covers).

    Raises:
        AssertionError: naming the slot (offset) and what it holds.
    """
    size = os.path.getsize(image)
    covered = 0
    floor: Dict[int, int] = {}       # offset -> newest record flushed before the cut
    allowed: Dict[int, set] = {}     # offset -> records the slot may hold
    for line in log:
        if line.flushed < cut_at:
            covered = line.seq
            floor[line.offset] = line.seq
        if line.started <= created_at:
            allowed.setdefault(line.offset, set()).add(line.seq)
    with open(image, "rb") as f:
        for slot in range(slots(size)):
            off = slot * RECORD
            got = parse_record(f.read(RECORD), seed, off)
            need = floor.get(off)
            if got is None:
                assert need is None, f"{image} offset {off}: zero, want record >= {need}"
                continue
            assert got in allowed.get(off, ()), \
                f"{image} offset {off}: record {got} was written after the point"
            assert need is None or got >= need, \
                f"{image} offset {off}: record {got} older than {need} flushed before the cut"
    return covered


# -- the writer process ------------------------------------------------------------------


class _Commands:
    """The commands FIFO, read without blocking between records. It is
    opened read-write so that it never reads as ended while no test holds
    it open."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self.buf = b""

    def poll(self, block: bool) -> Optional[str]:
        """The next command line; None when there is none and not `block`."""
        import select

        while b"\n" not in self.buf:
            if block:
                select.select([self.fd], [], [])
            try:
                self.buf += os.read(self.fd, 4096)
            except BlockingIOError:
                if not block:
                    return None
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode().strip()


def main(argv: Optional[List[str]] = None) -> int:
    """Run the writer (see the module's docstring); returns the exit status."""
    from pydr.engine import bindings as B

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--uri", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--size", type=int, required=True, help="the disk's size in bytes")
    p.add_argument("--log", required=True)
    p.add_argument("--commands", required=True)
    p.add_argument("--acks", required=True)
    p.add_argument("--rate", type=float, default=0, help="MiB/s (0: as fast as it can)")
    p.add_argument("--stopped", action="store_true", help="start stopped (wait for go)")
    a = p.parse_args(argv)
    dev = B.Device.open_nbd(a.uri, write=True)
    commands = _Commands(a.commands)
    acks = os.open(a.acks, os.O_WRONLY)
    log = open(a.log, "a")
    rng = random.Random(a.seed)
    n = slots(a.size)
    seq, last_flush, stop_at = 0, time.time(), (0 if a.stopped else None)
    t0 = time.monotonic()
    while True:
        while True:
            cmd = commands.poll(block=stop_at is not None and seq >= stop_at)
            if cmd is None:
                break
            if cmd == "quit":
                return 0
            if cmd == "go":
                stop_at = None
            elif cmd.startswith("stop "):
                stop_at = max(int(cmd.split()[1]), seq)
            if stop_at is not None and seq >= stop_at:
                os.write(acks, f"stopped {seq} {last_flush!r}\n".encode())
        off = rng.randrange(n) * RECORD
        seq += 1
        started = time.time()
        dev.pwrite(record(a.seed, seq, off), off)
        dev.flush()
        last_flush = time.time()
        log.write(f"{seq} {off} {started!r} {last_flush!r}\n")
        log.flush()
        os.fsync(log.fileno())
        if stop_at is not None and seq >= stop_at:
            os.write(acks, f"stopped {seq} {last_flush!r}\n".encode())
        if a.rate:  # pace: record seq is due at seq * RECORD / rate seconds
            ahead = t0 + seq * RECORD / (a.rate * 1024 * 1024) - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


if __name__ == "__main__":
    sys.exit(main())

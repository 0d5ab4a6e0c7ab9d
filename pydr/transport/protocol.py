"""pydr's wire protocol, version 2 (docs/PROTOCOL.md): length-prefixed frames
over a byte stream (ssh's stdin/stdout), checked before anything is allocated.
"""

import json
import queue
import struct
import threading as _threading

from .. import errors as E
from ..errors import ProtocolError

VERSION = 2
HEADER = struct.Struct("<IHH")  # payload length, frame type, flags (0)
MAX_PAYLOAD = 17 << 20          # a 16 MiB batch of records plus headers
MAX_JSON = 1 << 20

FLAG_ZSTD = 1  # the payload is zstd-compressed (only once both HELLOs offered "zstd")

HELLO, ERROR, STAT, STAT_OK, SIGN, SIGS, DONE = range(1, 8)  # 8 was version 1's ENCODE
RECORDS, APPLY, END, APPLY_OK, SEND, COARSE, FINE = range(9, 16)
BYTES, READ, WRITE, PATCH, DELTA, JOIN, MATERIALIZE, REMOVE, RENAME = range(16, 25)
NAMES = {v: k for k, v in dict(HELLO=HELLO, ERROR=ERROR, STAT=STAT, STAT_OK=STAT_OK, SIGN=SIGN,
                               SIGS=SIGS, DONE=DONE, RECORDS=RECORDS, APPLY=APPLY, END=END,
                               APPLY_OK=APPLY_OK, SEND=SEND, COARSE=COARSE, FINE=FINE, BYTES=BYTES,
                               READ=READ, WRITE=WRITE, PATCH=PATCH, DELTA=DELTA,
                               JOIN=JOIN, MATERIALIZE=MATERIALIZE, REMOVE=REMOVE,
                               RENAME=RENAME).items()}
BINARY = (SIGS, RECORDS, COARSE, FINE, BYTES)  # may be larger than a JSON frame
CHUNK = 4 << 20  # file bytes per BYTES frame


class Channel:
    """Frames over a pair of binary file objects. ``bwlimit`` (bytes/s) caps
    what this side sends, on average over the whole connection."""

    def __init__(self, rfile, wfile, bwlimit=None):
        self.r, self.w = rfile, wfile
        self.bytes_in = self.bytes_out = 0
        self.bwlimit = bwlimit
        self._started = None
        self.zstd = None  # set by enable_zstd() once both sides agreed
        self._send_lock = _threading.Lock()  # whole frames, whichever thread sends

    def enable_zstd(self, level=3):
        import zstandard

        self.zstd = (zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor())

    def _pace(self, nbytes):
        import time

        if not self.bwlimit:
            return
        now = time.monotonic()
        if self._started is None:
            self._started = now
        due = self._started + (self.bytes_out + nbytes) / self.bwlimit
        if due > now:
            time.sleep(due - now)

    def send(self, ftype, payload=b""):
        if len(payload) > MAX_PAYLOAD:
            raise ProtocolError(f"frame of {len(payload)} bytes is over the limit")
        flags = 0
        if self.zstd is not None and ftype == RECORDS and payload:
            packed = self.zstd[0].compress(bytes(payload))
            if len(packed) < len(payload):
                payload, flags = packed, FLAG_ZSTD
        with self._send_lock:
            self._pace(HEADER.size + len(payload))
            self.w.write(HEADER.pack(len(payload), ftype, flags))
            if payload:
                self.w.write(payload)
            self.w.flush()
            self.bytes_out += HEADER.size + len(payload)

    def send_json(self, ftype, obj):
        self.send(ftype, json.dumps(obj).encode())

    def _read_exact(self, n):
        chunks, got = [], 0
        while got < n:
            chunk = self.r.read(n - got)
            if not chunk:
                raise ConnectionResetError("the connection closed in the middle of a frame"
                                           if got or chunks else "the connection closed")
            chunks.append(chunk)
            got += len(chunk)
        self.bytes_in += n
        return b"".join(chunks)

    def recv(self):
        """(type, payload) of the next frame. Checked before allocating."""
        head = self._read_exact(HEADER.size)
        length, ftype, flags = HEADER.unpack(head)
        compressed = flags == FLAG_ZSTD and self.zstd is not None and ftype == RECORDS
        if (flags and not compressed) or ftype not in NAMES:
            raise ProtocolError(f"bad frame header (type {ftype}, flags {flags})")
        if length > MAX_PAYLOAD or (ftype not in BINARY and length > MAX_JSON):
            raise ProtocolError(f"frame of {length} bytes (type {NAMES[ftype]}) is over the limit")
        payload = self._read_exact(length) if length else b""
        if compressed:
            try:  # bounded: never more than a frame's worth of output
                payload = self.zstd[1].decompress(payload, max_output_size=MAX_PAYLOAD)
            except Exception:
                raise ProtocolError("a compressed frame does not decompress (or is too large)") from None
            if len(payload) > MAX_PAYLOAD:
                raise ProtocolError("a compressed frame expands past the limit")
        return ftype, payload


class ChunkReader:
    """A byte stream carried in BYTES frames, read like a binary file.
    ``next_chunk()`` returns the next frame's bytes, or None at the end."""

    def __init__(self, next_chunk, name):
        self._next = next_chunk
        self.name = name
        self._buf = bytearray()
        self._eof = False
        self.position = 0  # bytes handed out so far

    def _fill(self, n):
        while not self._eof and (n < 0 or len(self._buf) < n):
            chunk = self._next()
            if chunk is None:
                self._eof = True
            else:
                self._buf += chunk

    def read(self, n=-1):
        """Up to n bytes (fewer only at the end); n < 0: all that is left."""
        self._fill(n)
        n = len(self._buf) if n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.position += n
        return out

    def readinto(self, b):
        data = self.read(len(memoryview(b).cast("B")))
        memoryview(b).cast("B")[:len(data)] = data
        return len(data)

    def at_end(self):
        self._fill(1)
        return not self._buf


class ChunkWriter:
    """A binary file whose writes go out as BYTES frames of at most CHUNK."""

    def __init__(self, send):
        self._send = send
        self.written = 0

    def write(self, data):
        view = memoryview(data).cast("B")
        for pos in range(0, len(view), CHUNK):
            self._send(BYTES, bytes(view[pos:pos + CHUNK]))
        self.written += len(view)
        return len(view)

    def flush(self):
        pass


class Sender:
    """Sends frames from a thread of its own, so that the caller never blocks
    on a full pipe and always goes on reading what its peer sends (the peer
    may itself be blocked sending to us), or so that several connections
    send at once. ``maxsize`` bounds the frames queued (0: the protocol
    bounds them, e.g. one FINE frame per COARSE frame received)."""

    def __init__(self, ch, maxsize=0):
        self.ch = ch
        self.q = queue.Queue(maxsize)
        self.error = None
        self.thread = _threading.Thread(target=self._run, name="pydr-net-sender", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            try:
                self.ch.send(*item)
            except BaseException as exc:  # reported by the next send() or close()
                self.error = exc
                return

    def send(self, ftype, payload=b""):
        if self.error is not None:
            raise self.error
        self.q.put((ftype, payload))

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.q.put(None)  # the connection is closed next; the thread then ends


def zstd_available():
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def parse_json(payload, what):
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nesting: no frame is that deep
        raise ProtocolError(f"{what}: not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: not an object")
    return obj


def file_mode(value):
    """The permission bits a peer gave for a file this side creates: an int
    (its read and write bits only are kept, never set-id or execute), or
    None when it gave none (the file is then private)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o7777:
        raise ProtocolError("bad mode")
    return value & 0o666


def error_payload(exc):
    """An exception as an ERROR frame's JSON."""
    out = {"message": str(exc), "class": type(exc).__name__}
    if isinstance(exc, E.PydrError):
        out.update(message=exc.message, path=exc.path, offset=exc.offset)
    elif isinstance(exc, OSError):
        out.update(errno=exc.errno, message=exc.strerror or str(exc), path=exc.filename)
    return out


def raise_remote(info, host):
    """Re-raise a server's ERROR frame here, as the same kind of exception."""
    where = f"{host}:{info.get('path')}" if info.get("path") else None
    if "errno" in info and info["errno"] is not None:
        raise OSError(info["errno"], f"{info['message']} (on {host})", where)
    cls = getattr(E, info.get("class", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, E.PydrError)):
        cls = ProtocolError if info.get("class") == "ProtocolError" else E.PydrError
    raise cls(f"{info.get('message')} (on {host})", path=where, offset=info.get("offset"))

"""The records of a push over several connections at once (``--streams N``).

One ssh channel carries at most its window per round trip (OpenSSH: 2 MiB,
so ~20 MiB/s at 100 ms whatever the link). With N streams the client opens N
more connections to the same host, each running ``pydr serve --stdio`` that
is told JOIN: it connects to the main server process of the transfer over a
Unix socket and only relays bytes. The client deals the RECORDS frames out
round robin, each stream sending from a thread of its own; the main server
process reads every stream on a thread of its own and takes the frames back
in the same round-robin order, so the records arrive in sequence and are
applied exactly as over one connection.

Who may join: the socket is abstract (no file), named after a random token
that only the client and the main server know (sent over ssh); a joining
process must be of the same user (SO_PEERCRED) and send the token first.
"""

import contextlib
import hashlib
import hmac
import os
import queue
import socket
import struct
import threading
import time

from ..engine import bindings as B
from . import protocol as P
from ..engine.delta import RECORD_SPLIT

FRAME = B.RECORD_HEADER + RECORD_SPLIT  # record bytes per RECORDS frame: one whole record at most

DEPTH = 2              # frames queued per stream on either side
JOIN_TIMEOUT = 30.0    # seconds the main process waits for its streams
MAX_STREAMS = 16
_AUTH = struct.Struct("<32sI")  # token (hex), stream index


def new_token():
    return os.urandom(16).hex()


def _address(token):
    return "\0pydr-stream-" + hashlib.sha256(token.encode()).hexdigest()[:32]


def check_request(streams, token):
    if not isinstance(streams, int) or not 0 <= streams <= MAX_STREAMS:
        raise P.ProtocolError(f"bad number of streams {streams!r}")
    if streams and (not isinstance(token, str) or len(token) != 32):
        raise P.ProtocolError("bad stream token")


class Listener:
    """The main server process's end: accepts the streams of one transfer."""

    def __init__(self, token, count):
        self.token, self.count = token, count
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(_address(token))
        self.sock.listen(count)
        self.conns = []

    def shutdown(self):
        """Break every stream (their clients see the connection fail)."""
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def accept(self, timeout=JOIN_TIMEOUT):
        """Channels of the `count` streams, in stream order."""
        conns = [None] * self.count
        deadline = time.monotonic() + timeout
        try:
            while None in conns:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise P.ProtocolError(f"only {self.count - conns.count(None)} of "
                                          f"{self.count} streams joined")
                self.sock.settimeout(left)
                try:
                    c, _ = self.sock.accept()
                except socket.timeout:
                    continue
                index = self._admit(c)
                if index is None or conns[index] is not None:
                    c.close()
                    continue
                c.settimeout(None)
                conns[index] = c
            self.conns = conns
        except BaseException:
            for c in conns:
                if c is not None:
                    c.close()
            raise
        finally:
            self.sock.close()
        return [P.Channel(c.makefile("rb"), c.makefile("wb")) for c in conns]

    def _admit(self, c):
        creds = c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():
            return None
        c.settimeout(5)
        try:
            raw = b""
            while len(raw) < _AUTH.size:
                chunk = c.recv(_AUTH.size - len(raw))
                if not chunk:
                    return None
                raw += chunk
        except OSError:
            return None
        token, index = _AUTH.unpack(raw)
        if not hmac.compare_digest(token, self.token.encode()) or index >= self.count:
            return None
        return index


def relay(ch, token, index):
    """A JOINed `pydr serve --stdio`: connect to the main process of the
    transfer and copy bytes both ways until either side closes."""
    deadline = time.monotonic() + 10
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(_address(token))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise P.ProtocolError("the transfer this stream belongs to is not running") from None
            time.sleep(0.01)  # the main connection may not have got this far yet
    s.sendall(_AUTH.pack(token.encode(), index))

    def upstream():  # stdin (what is left in its buffer first) -> socket
        try:
            while chunk := ch.r.read1(1 << 16):
                s.sendall(chunk)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    try:
        while chunk := s.recv(1 << 16):
            ch.w.write(chunk)
            ch.w.flush()
    except OSError:
        pass
    # the main process has ended the transfer: whatever the client still
    # sends is of no use, and exiting now lets its ssh close at once
    s.close()


class Outgoing:
    """Deals RECORDS frames out round robin over several channels, each
    sending from a thread of its own (bounded queues)."""

    def __init__(self, channels):
        self.senders = [P.Sender(ch, maxsize=DEPTH) for ch in channels]
        self.frames = 0

    def send(self, ftype, payload):
        self.senders[self.frames % len(self.senders)].send(ftype, payload)
        self.frames += 1

    def finish(self):
        """END on every stream, then wait until everything is sent."""
        for s in self.senders:
            s.send(P.END)
        for s in self.senders:
            s.close()


class Incoming:
    """Reads several channels at once (a thread each) and hands their
    RECORDS frames to `handle` in round-robin order from a thread of its
    own, until the stream whose turn it is sends END. ``connect()`` gives
    the channels (it may block: it runs on that thread too); on an error
    ``on_error(exc)`` is called there."""

    def __init__(self, connect, handle, on_error):
        self.connect, self.handle, self.on_error = connect, handle, on_error
        self.error = None
        self.frames = 0
        self.merger = threading.Thread(target=self._merge, daemon=True, name="pydr-stream-merge")
        self.merger.start()

    @staticmethod
    def _read(ch, q):
        while True:
            try:
                item = ch.recv()
            except BaseException as exc:
                q.put(exc)
                return
            q.put(item)
            if item[0] == P.END:
                return

    def _merge(self):
        try:
            channels = self.connect()
            queues = [queue.Queue(maxsize=DEPTH) for _ in channels]
            for ch, q in zip(channels, queues):
                threading.Thread(target=self._read, args=(ch, q), daemon=True,
                                 name="pydr-stream-reader").start()
            while True:
                item = queues[self.frames % len(queues)].get()
                if isinstance(item, BaseException):
                    raise item
                ftype, payload = item
                if ftype == P.END:
                    return
                if ftype != P.RECORDS:
                    raise P.ProtocolError(f"unexpected {P.NAMES[ftype]} frame on a stream")
                self.handle(payload)
                self.frames += 1
        except BaseException as exc:
            self.error = exc
            self.on_error(exc)

    def wait(self):
        self.merger.join()
        if self.error is not None:
            raise self.error

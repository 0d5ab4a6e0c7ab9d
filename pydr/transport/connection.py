"""One running ``pydr serve --stdio`` on a host, reached through ``--rsh``
(default ``ssh``): frames out on its stdin, frames in from its stdout on a
reader thread, so that requests can follow HELLO without a round trip."""

import contextlib
import queue
import shlex
import subprocess
import threading
import time

from . import protocol as P


class Connection:
    """A running `pydr serve --stdio` on `host`, with a reader thread."""

    def __init__(self, host, *, rsh="ssh", remote_pydr="pydr", bwlimit=None, compress=False):
        self.host = host
        cmd = shlex.split(rsh) + [host, f"{shlex.quote(remote_pydr)} serve --stdio"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0)
        self.ch = P.Channel(self.proc.stdout, self.proc.stdin, bwlimit=bwlimit)
        self.frames = queue.Queue(maxsize=16)  # at most 16 frames (128 MiB) read ahead
        if compress and not P.zstd_available():
            raise ValueError("--compress needs the zstandard package (pip install zstandard)")
        self.ch.send_json(P.HELLO, {"protocol": P.VERSION,
                                    "capabilities": ["zstd"] if compress else []})
        self.compress = compress
        self.reader = None

    def handshake(self):
        """Read the server's HELLO. Done by the first next(): requests can be
        sent right behind our HELLO, without a round trip."""
        host = self.host
        ftype, payload = self._read_direct()
        if ftype == P.ERROR:
            P.raise_remote(P.parse_json(payload, "ERROR"), host)
        hello = P.parse_json(payload, "HELLO") if ftype == P.HELLO else {}
        if ftype != P.HELLO or hello.get("protocol") != P.VERSION:
            raise P.ProtocolError(f"{host} does not speak pydr protocol {P.VERSION}")
        if self.compress:
            if "zstd" not in (hello.get("capabilities") or []):
                raise ValueError(f"--compress: pydr on {host} cannot use zstd (install zstandard there)")
            self.ch.enable_zstd()
        self.reader = threading.Thread(target=self._read_loop, name="pydr-net-reader", daemon=True)
        self.reader.start()

    def _read_direct(self):
        try:
            return self.ch.recv()
        except ConnectionResetError:
            err = self.proc.stderr.read().decode(errors="replace").strip()
            raise ConnectionResetError(f"could not talk to pydr on {self.host}: "
                                       f"{err.splitlines()[-1] if err else 'connection closed'}") from None

    def _read_loop(self):
        try:
            while True:
                self.frames.put(self.ch.recv())
        except BaseException as exc:  # handed to the consumer
            self.frames.put(exc)

    def next(self, *expected):
        """The next frame, which must be one of `expected` (ERROR re-raised here)."""
        if self.reader is None:
            self.handshake()
        item = self.frames.get()
        if isinstance(item, BaseException):
            self.frames.put(item)  # the end of the stream stays: later reads see it at once
            if isinstance(item, ConnectionResetError):
                raise ConnectionResetError(f"the connection to {self.host} was lost") from item
            raise item
        ftype, payload = item
        if ftype == P.ERROR:
            P.raise_remote(P.parse_json(payload, "ERROR"), self.host)
        if expected and ftype not in expected:
            raise P.ProtocolError(f"{self.host} sent {P.NAMES[ftype]}, expected "
                                  f"{'/'.join(P.NAMES[e] for e in expected)}")
        return ftype, payload

    def raise_pending_error(self):
        """Raise the server's ERROR now if it has sent one (without waiting)."""
        if self.reader is None:
            return
        try:
            item = self.frames.queue[0]  # a peek: consumers are on this thread
        except IndexError:
            return
        if isinstance(item, BaseException) or item[0] == P.ERROR:
            self.next()

    def wait_for_error(self, timeout):
        """After a failure elsewhere: raise the server's ERROR if it sends one
        within `timeout` seconds (frames before it are dropped)."""
        if self.reader is None:
            with contextlib.suppress(Exception):
                self.handshake()
            if self.reader is None:
                return
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self.frames.get(timeout=left)
            except queue.Empty:
                return
            if isinstance(item, BaseException):
                return
            if item[0] == P.ERROR:
                P.raise_remote(P.parse_json(item[1], "ERROR"), self.host)

    def close(self, wait=True):
        """End our side (stdin: ssh still sends what is buffered); with
        `wait`, also stop reading and wait for the process."""
        for f in (self.proc.stdin, self.proc.stdout) if wait else (self.proc.stdin,):
            try:
                f.close()
            except OSError:
                pass
        if not wait:
            return
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""One running ``pydr serve --stdio`` on a host, reached through ``--rsh``
(default ``ssh``): frames out on its stdin, frames in from its stdout on a
reader thread, so that requests can follow HELLO without a round trip.

A peer that dies, refuses the connection or never starts shows up here as a
broken pipe on a write or the end of its stdout on a read, whichever comes
first: both become one :class:`pydr.errors.PeerGone` with the rsh command's
exit status and the last of its stderr (ssh's own words), never a bare
``BrokenPipeError``, which the CLI keeps for its own closed stdout."""

import contextlib
import os
import queue
import shlex
import signal
import subprocess
import threading
import time

from ..errors import InvalidArgument, PeerGone
from . import protocol as P

STDERR_TAIL = 4096  # bytes of the rsh command's stderr kept for the error
EXIT_WAIT = 10.0    # seconds a dead peer's rsh command gets to exit and say why


class _StderrTail:
    """Drains the rsh command's stderr on a thread (a chatty peer never
    blocks on a full pipe) and keeps its last STDERR_TAIL bytes."""

    def __init__(self, f):
        self.f = f
        self.tail = bytearray()
        self.thread = threading.Thread(target=self._run, name="pydr-rsh-stderr", daemon=True)
        self.thread.start()

    def _run(self):
        with contextlib.suppress(OSError, ValueError):
            while chunk := self.f.read(1 << 12):  # unbuffered: whatever is there
                self.tail += chunk
                del self.tail[:-STDERR_TAIL]

    def text(self, timeout):
        """What it said, once it ended (waits at most `timeout` seconds)."""
        self.thread.join(timeout)
        return bytes(self.tail).decode(errors="replace").strip()


class _PeerStdin:
    """Our end of the rsh command's stdin: a failing write means the peer
    is gone, and says so (Connection.gone)."""

    def __init__(self, f, conn):
        self.f, self.conn = f, conn

    def write(self, data):
        try:
            return self.f.write(data)
        except (OSError, ValueError) as exc:  # EPIPE, ECONNRESET; ValueError: closed by us
            raise self.conn.gone() from exc

    def flush(self):
        try:
            self.f.flush()
        except (OSError, ValueError) as exc:
            raise self.conn.gone() from exc

    def close(self):
        self.f.close()


class Connection:
    """A running `pydr serve --stdio` on `host`, with a reader thread."""

    def __init__(self, host, *, rsh="ssh", remote_pydr="pydr", bwlimit=None, compress=False,
                 spec=None):
        self.host = host
        self.spec = spec  # what the connection is for (host:PATH), named by its errors
        if compress and not P.zstd_available():
            raise InvalidArgument("compression needs the zstandard package, which is not "
                                  "installed",
                                  hint="pip install zstandard, or leave out --compress")
        self.cmd = shlex.split(rsh) + [host, f"{shlex.quote(remote_pydr)} serve --stdio"]
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, bufsize=0)
        except OSError as exc:  # no such rsh command, or not executable
            raise PeerGone(f"could not run --rsh {rsh!r} to reach {host}: {exc.strerror}",
                           path=spec) from None
        self._gone = None
        self._gone_lock = threading.Lock()
        self.stderr = _StderrTail(self.proc.stderr)
        self.ch = P.Channel(self.proc.stdout, _PeerStdin(self.proc.stdin, self), bwlimit=bwlimit)
        self.frames = queue.Queue(maxsize=16)  # at most 16 frames (128 MiB) read ahead
        self.compress = compress
        self.reader = None
        self.hello = False  # the server's HELLO came: it runs
        try:
            self.ch.send_json(P.HELLO, {"protocol": P.VERSION,
                                        "capabilities": ["zstd"] if compress else []})
        except BaseException:
            self.close()
            raise

    def gone(self):
        """The PeerGone for this connection (the same one for every caller,
        whichever of a write or a read noticed first): waits a little for the
        rsh command to end, for its status and the last of its stderr."""
        with self._gone_lock:
            if self._gone is None:
                self._gone = self._explain()
            return self._gone

    def _explain(self):
        try:
            status = self.proc.wait(timeout=EXIT_WAIT)
        except subprocess.TimeoutExpired:
            status = None
        said = self.stderr.text(timeout=EXIT_WAIT if status is not None else 0)
        rsh = os.path.basename(self.cmd[0])
        if status is None:
            how = f"{rsh} is still running"
        elif status < 0:
            try:
                how = f"{rsh} was killed by {signal.Signals(-status).name}"
            except ValueError:
                how = f"{rsh} was killed by signal {-status}"
        else:
            how = f"{rsh} exited with status {status}"
        lines = [ln.strip() for ln in said.splitlines() if ln.strip()]
        if lines:
            words = ": " + " | ".join(lines[-3:])
        else:  # not what we saw (a broken pipe or the end of its output: a race)
            how, words = f"{how}, nothing on its stderr", ""
        what = (f"the connection to pydr on {self.host} was lost" if self.hello
                else f"could not start pydr on {self.host}")
        return PeerGone(f"{what}{words} ({how})", status=status, stderr=said, path=self.spec)

    def handshake(self):
        """Read the server's HELLO. Done by the first next(): requests can be
        sent right behind our HELLO, without a round trip."""
        host = self.host
        ftype, payload = self._read_direct()
        self.hello = ftype == P.HELLO
        if ftype == P.ERROR:
            P.raise_remote(P.parse_json(payload, "ERROR"), host)
        hello = P.parse_json(payload, "HELLO") if ftype == P.HELLO else {}
        if ftype != P.HELLO or hello.get("protocol") != P.VERSION:
            raise P.ProtocolError(f"{host} does not speak pydr protocol {P.VERSION}")
        if self.compress:
            if "zstd" not in (hello.get("capabilities") or []):
                raise InvalidArgument(f"pydr on {host} cannot use zstd compression",
                                      hint="install zstandard there, or leave out --compress")
            self.ch.enable_zstd()
        self.reader = threading.Thread(target=self._read_loop, name="pydr-net-reader", daemon=True)
        self.reader.start()

    def _read_direct(self):
        try:
            return self.ch.recv()
        except OSError as exc:  # the end of its stdout (or a reset): it is gone
            raise self.gone() from exc

    def _read_loop(self):
        try:
            while True:
                self.frames.put(self.ch.recv())
        except BaseException as exc:  # handed to the consumer (as PeerGone there)
            self.frames.put(exc)

    def next(self, *expected):
        """The next frame, which must be one of `expected` (ERROR re-raised here)."""
        if self.reader is None:
            self.handshake()
        item = self.frames.get()
        if isinstance(item, BaseException):
            self.frames.put(item)  # the end of the stream stays: later reads see it at once
            if isinstance(item, OSError) and not isinstance(item, PeerGone):
                raise self.gone() from item
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

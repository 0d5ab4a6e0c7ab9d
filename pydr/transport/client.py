"""What a client asks of a host running ``pydr serve --stdio`` (reached
through ``--rsh``, default ``ssh``; docs/PROTOCOL.md), by host and path.

* The two roles of a resync across the connection: :class:`RemoteTarget`
  (a push: COARSE and RECORDS out, FINE back, optionally with the records
  over more connections, pydr.transport.stripes) and :class:`RemoteSource`
  (a pull: the server signs and sends, FINE answers go back from a sender
  thread, so that this side always keeps reading). They have the methods of
  the in-process roles (pydr.transport.roles). Records are applied under the
  undo journal there; a dropped connection keeps it, and the next transfer
  resumes.
* A disk's signature (SIGN), files read and written as streams (READ, WRITE),
  deltas applied and made there (PATCH, DELTA).
* The few file operations the DR workflow needs of a site (STAT, RENAME,
  REMOVE, MATERIALIZE), confined by the server to files pydr makes.
"""

import contextlib
import struct

from . import exchange as X
from . import protocol as P
from . import stripes as S
from ..errors import PeerGone
from .connection import Connection
from .roles import TargetResult


class Host:
    """How to reach a host: ``RSH HOST REMOTE_PYDR serve --stdio``."""

    def __init__(self, host, *, rsh=None, remote_pydr=None):
        self.host, self.rsh, self.remote_pydr = host, rsh or "ssh", remote_pydr or "pydr"

    def connect(self, *, bwlimit=None, compress=False, path=None):
        """A connection; `path` (there) is what its errors name."""
        return Connection(self.host, rsh=self.rsh, remote_pydr=self.remote_pydr,
                          bwlimit=bwlimit, compress=compress,
                          spec=self.spec(path) if path is not None else None)

    def spec(self, path):
        return f"{self.host}:{path}"

    def request(self, ftype, body, *expected):
        """One request on a connection of its own; the answer's JSON."""
        path = body.get("path", body.get("src", body.get("replica")))
        with self.connect(path=path if isinstance(path, str) else None) as conn:
            conn.ch.send_json(ftype, body)
            return P.parse_json(conn.next(*expected)[1], P.NAMES[expected[0]])

    # -- the site's files ----------------------------------------------------------
    def stat(self, path, *, source=False):
        """{"exists", "size", ...}; `source`: refuse a file with an unfinished apply."""
        return self.request(P.STAT, {"path": path, "source": bool(source)}, P.STAT_OK)

    def rename(self, src, dst):
        self.request(P.RENAME, {"src": src, "dst": dst}, P.DONE)

    def remove(self, paths, *, drill=None):
        body = {"paths": list(paths)}
        if drill is not None:
            body["drill"] = drill
        if body["paths"] or drill is not None:
            self.request(P.REMOVE, body, P.DONE)

    def materialize(self, replica, steps, dest, *, drill=False, method="auto"):
        """Returns the method the server used ("copy" from a server that
        does not say: it predates the others)."""
        done = self.request(P.MATERIALIZE, {"replica": replica, "steps": list(steps),
                                            "dest": dest, "drill": bool(drill),
                                            "method": method}, P.DONE)
        return (done or {}).get("method", "copy")

    # -- signatures and files ----------------------------------------------------------
    def signature_to(self, path, writer, *, block_size):
        """Stream the xxh3-128 signature of `path` into a SignatureWriter
        (window by window: bounded memory). Returns (bytes received, bytes
        the server read)."""
        with self.connect(path=path) as conn:
            conn.ch.send_json(P.SIGN, {"path": path, "block_size": block_size})
            while True:
                ftype, payload = conn.next(P.SIGS, P.DONE)
                if ftype == P.DONE:
                    done = P.parse_json(payload, "DONE")
                    return conn.ch.bytes_in, int(done.get("bytes_read", 0))
                if len(payload) < 16:
                    raise P.ProtocolError("short SIGS frame")
                first, n = struct.unpack_from("<QQ", payload)
                if len(payload) != 16 + 17 * n:
                    raise P.ProtocolError("SIGS frame sizes do not add up")
                if first != writer.written:
                    raise P.ProtocolError(f"{self.host} sent signatures out of order")
                writer.write(payload[16:16 + 16 * n], payload[16 + 16 * n:])

    def reader(self, path):
        return RemoteReader(self, path)

    def writer(self, path):
        return RemoteWriter(self, path)

    def apply(self, path, stream, *, name, verify=False):
        """Stream a delta (a binary file object) to the server, which applies
        it to `path` exactly as a local apply does. Returns its stats (dict)."""
        with self.connect(path=path) as conn:
            conn.ch.send_json(P.PATCH, {"path": path, "name": name, "verify": bool(verify)})
            try:
                _send_stream(conn, stream)
                return P.parse_json(conn.next(P.APPLY_OK)[1], "APPLY_OK")
            except Exception as exc:  # the server names our stream as host:name
                if getattr(exc, "path", None) == self.spec(name):
                    exc.path = name
                raise

    def delta(self, path, out, *, base):
        """Send the base's signature (a Signature); the server encodes the
        delta from `path` and streams it back into `out`. Returns its stats."""
        with self.connect(path=path) as conn:
            conn.ch.send_json(P.DELTA, {"path": path, "name": "<base signature>"})
            try:  # written straight onto the connection, not copied in memory first
                base._write(P.ChunkWriter(conn.ch.send))
            except ConnectionError:
                conn.next()  # the server gave up: raise what it said
                raise
            conn.ch.send(P.END)
            while True:
                ftype, payload = conn.next(P.BYTES, P.DONE)
                if ftype == P.DONE:
                    return P.parse_json(payload, "DONE")
                out.write(payload)


class RemoteTarget:
    """The target role of a resync for a disk on a host (a push). APPLY,
    then COARSE out and FINE back on one connection, RECORDS on it or on
    `streams` more; `finish()` sends END and waits for APPLY_OK.

    ``keep_undo``: a step path there, or a list of candidates of which the
    server keeps the step at the first that holds no committed step yet, and
    says which (TargetResult.kept)."""

    reports_progress = False

    def __init__(self, host, path, *, block_size, result_size, keep_undo=None, streams=0,
                 bwlimit=None, compress=False, mode=None):
        if not isinstance(streams, int) or not 0 <= streams <= S.MAX_STREAMS:
            raise ValueError(f"streams must be 0 to {S.MAX_STREAMS}")
        self.host, self.keep_undo = host, keep_undo
        self.kept = None
        self.extra = []
        self.out = None
        self.conn = host.connect(bwlimit=bwlimit, compress=compress, path=path)
        try:
            request = {"path": path, "block_size": block_size, "result_size": result_size}
            if keep_undo is not None:
                request["keep_undo"] = keep_undo
            if mode is not None:  # a target the server creates gets the source's bits
                request["mode"] = mode
            if streams:
                # started now, so that their ssh set-ups overlap the main one
                token = S.new_token()
                request.update(streams=streams, token=token)
                self.extra = [host.connect(bwlimit=bwlimit / streams if bwlimit else None,
                                           compress=compress, path=path)
                              for _ in range(streams)]
                for i, c in enumerate(self.extra):
                    c.ch.send_json(P.JOIN, {"token": token, "index": i})
            # no waiting for the handshake: the request and the first COARSE
            # frames travel with HELLO
            self.conn.ch.send_json(P.APPLY, request)
        except BaseException:
            self.close()
            raise
        self.frame_bytes = S.FRAME if self.extra else X.NET_BATCH

    @contextlib.contextmanager
    def _lost(self):
        try:
            yield
        except ConnectionError as exc:  # PeerGone from here on; a stream's own, if it broke
            self.conn.wait_for_error(timeout=10)  # raises what the server said, if it did
            if isinstance(exc, PeerGone):
                raise
            raise self.conn.gone() from exc

    def _opened(self, payload):  # STAT_OK: the server has opened the target
        self.kept = P.parse_json(payload, "STAT_OK").get("keep_undo")

    def coarse(self, payload):
        with self._lost():
            self.conn.ch.send(P.COARSE, payload)

    def next_fine(self):
        with self._lost():
            while True:
                ftype, payload = self.conn.next(P.FINE, P.STAT_OK)
                if ftype == P.FINE:
                    return payload
                self._opened(payload)

    def records(self, payload):
        with self._lost():
            if not self.extra:
                return self.conn.ch.send(P.RECORDS, bytes(payload))
            if self.out is None:  # after the main handshake: compression is agreed on
                for c in self.extra:
                    if self.conn.ch.zstd is not None:
                        c.ch.enable_zstd()
                self.out = S.Outgoing([c.ch for c in self.extra])
            self.out.send(P.RECORDS, bytes(payload))

    def finish(self):
        with self._lost():
            if self.extra:
                # every stream ends properly, also when nothing changed
                (self.out or S.Outgoing([c.ch for c in self.extra])).finish()
                for c in self.extra:  # their teardown overlaps the rest
                    c.close(wait=False)
            self.conn.ch.send(P.END)
            ftype, payload = self.conn.next(P.APPLY_OK, P.STAT_OK)
            if ftype == P.STAT_OK:  # an empty source: no FINE came before it
                self._opened(payload)
                ftype, payload = self.conn.next(P.APPLY_OK)
        res = P.parse_json(payload, "APPLY_OK")
        return TargetResult(res["bytes_written"], res["bytes_zeroed"], res.get("records", 0),
                            self.kept if self.keep_undo is not None else None,
                            res.get("journal_bytes", 0))

    @property
    def bytes_sent(self):
        return self.conn.ch.bytes_out + sum(c.ch.bytes_out for c in self.extra)

    @property
    def bytes_received(self):
        return self.conn.ch.bytes_in + sum(c.ch.bytes_in for c in self.extra)

    def close(self, exc=None):
        for c in self.extra:
            c.close()
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(exc)


class RemoteSource:
    """The source role of a resync for a disk on a host (a pull): SEND, then
    COARSE and RECORDS come in while FINE answers go out, then DONE. The
    server runs ahead of the answers; ``bwlimit`` paces what it sends."""

    reports_progress = False
    bytes_read = 0  # read there, not here

    def __init__(self, host, path, *, block_size, window=X.WINDOW, group=X.GROUP, bwlimit=None,
                 compress=False):
        self.host = host
        self.blocks_changed = 0
        self.conn = host.connect(compress=compress, path=path)
        try:
            req = {"path": path, "block_size": block_size, "window": window, "group": group}
            if bwlimit:
                req["bwlimit"] = bwlimit
            self.conn.ch.send_json(P.SEND, req)
            stat = P.parse_json(self.conn.next(P.STAT_OK)[1], "STAT_OK")
            self.size = stat["size"]
            self.mode = P.file_mode(stat.get("mode"))
        except BaseException:
            self.conn.close()
            raise

    def run(self, target):
        with P.Sender(self.conn.ch) as sender:
            while True:
                ftype, payload = self.conn.next(P.COARSE, P.RECORDS, P.DONE)
                if ftype == P.DONE:
                    done = P.parse_json(payload, "DONE")
                    break
                if ftype == P.COARSE:
                    target.coarse(payload)
                    sender.send(P.FINE, target.next_fine())
                else:
                    target.records(payload)
        self.blocks_changed = int(done.get("blocks_changed", 0))
        return self

    @property
    def bytes_sent(self):
        return self.conn.ch.bytes_out

    @property
    def bytes_received(self):
        return self.conn.ch.bytes_in

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RemoteReader(P.ChunkReader):
    """A file on a host read as a binary stream (READ)."""

    def __init__(self, host, path):
        self.conn = host.connect(path=path)
        try:
            self.conn.ch.send_json(P.READ, {"path": path})
            self.size = P.parse_json(self.conn.next(P.STAT_OK)[1], "STAT_OK")["size"]
        except BaseException:
            self.conn.close()
            raise
        super().__init__(self._next_chunk, host.spec(path))

    def _next_chunk(self):
        ftype, payload = self.conn.next(P.BYTES, P.DONE)
        return None if ftype == P.DONE else payload

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RemoteWriter(P.ChunkWriter):
    """A file on a host replaced atomically by what is written to it (WRITE):
    the server renames it into place only when commit() is called; on any
    error (or a dropped connection) the old file stays as it was."""

    def __init__(self, host, path):
        self.conn = host.connect(path=path)
        try:
            self.conn.ch.send_json(P.WRITE, {"path": path})
            self.conn.next(P.STAT_OK)  # refused paths are refused before any work is done
        except BaseException:
            self.conn.close()
            raise
        super().__init__(self._send)

    def _send(self, ftype, payload):
        self.conn.raise_pending_error()
        self.conn.ch.send(ftype, payload)

    def commit(self):
        self.conn.ch.send(P.END)
        self.conn.next(P.DONE)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.conn.close()


def _send_stream(conn, f):
    """Copy a binary file object to the connection as BYTES frames, then END;
    stops early if the server has already answered with an ERROR."""
    while True:
        chunk = f.read(P.CHUNK)
        if not chunk:
            break
        conn.raise_pending_error()
        try:
            conn.ch.send(P.BYTES, chunk)
        except ConnectionError:
            conn.next()  # the server gave up: raise what it said
            raise
    conn.ch.send(P.END)

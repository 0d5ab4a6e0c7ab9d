"""Resync with a remote site over ssh: ``pydr resync LOCAL host:PATH`` (push)
and ``pydr resync host:PATH LOCAL`` (pull).

The client runs ``pydr serve --stdio`` on the other side through ``--rsh``
(default ``ssh``) and talks docs/PROTOCOL.md with it over that one
connection. The comparison is pydr.exchange's: coarse digests from the side
holding the source, 4 KiB hashes back only where they differ, then the
changed blocks as delta records -- pipelined, so no round trip per block or
per window. Records are applied through the same journaled Applier as a
local resync (a dropped connection keeps the journal; running the command
again resumes).
"""

import contextlib
import os
import queue
import shlex
import struct
import subprocess
import threading
import time

from . import _bindings as B
from . import exchange as X
from . import journal as J
from . import protocol as P
from . import stripes as S
from ._parallel import check_threads
from .apply import Applier
from .progress import Record, Throttle
from .sites import parse_remote  # noqa: F401  (pydr.remote.parse_remote, as before)


class RemoteStats(Record):
    """bytes_written, bytes_zeroed, blocks_changed, bytes_sent, bytes_received, seconds, direction."""

    _fields = ("bytes_written", "bytes_zeroed", "blocks_changed", "bytes_sent", "bytes_received",
               "seconds", "direction")
    __slots__ = _fields


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


def _window_sigs(conn):
    """Yield (first_block, hashes bytes, mask bytes) of the peer's SIGS frames."""
    while True:
        ftype, payload = conn.next(P.SIGS, P.DONE)
        if ftype == P.DONE:
            return
        if len(payload) < 16:
            raise P.ProtocolError("short SIGS frame")
        first, n = struct.unpack_from("<QQ", payload)
        if len(payload) != 16 + 17 * n:
            raise P.ProtocolError("SIGS frame sizes do not add up")
        yield first, payload[16:16 + 16 * n], payload[16 + 16 * n:]


def remote_resync(src, dst, *, rsh="ssh", remote_pydr="pydr", block_size=4096, threads=None,
                  progress=None, window=X.WINDOW, bwlimit=None, compress=False, group=X.GROUP,
                  streams=0, keep_undo=None, on_kept=None):
    """Make dst equal to src where exactly one of them is "[user@]host:PATH".
    ``bwlimit`` (bytes/s) caps what the side holding the source sends.
    ``keep_undo``: where the committed undo journal is kept (a recovery-point
    step): for a push, a path on the server or a list of candidates, of which
    it takes the first that holds no committed step and tells
    ``on_kept(index)`` (see RemoteSite); for a pull, a local path."""
    rs, rd = parse_remote(src), parse_remote(dst)
    if bool(rs) == bool(rd):
        raise ValueError("exactly one of source and target must be remote ([user@]host:PATH)")
    B.check_block_size(block_size)
    threads = check_threads(threads)
    start = time.monotonic()
    if bwlimit is not None and bwlimit <= 0:
        raise ValueError("bwlimit must be a positive number of bytes per second")
    if not isinstance(streams, int) or not 0 <= streams <= S.MAX_STREAMS:
        raise ValueError(f"streams must be 0 to {S.MAX_STREAMS}")
    opts = dict(rsh=rsh, remote_pydr=remote_pydr, block_size=block_size, threads=threads,
                progress=progress, window=window, bwlimit=bwlimit, compress=compress, group=group)
    if rd:
        return _push(src, rd, start, streams=streams, keep_undo=keep_undo, on_kept=on_kept,
                     **opts)
    if streams:
        raise ValueError("--streams is for pushes only (a pull uses one connection)")
    return _pull(rs, dst, start, keep_undo=keep_undo, **opts)


def _push(src, remote, start, *, rsh, remote_pydr, block_size, threads, progress, window, bwlimit,
          compress, group, streams=0, keep_undo=None, on_kept=None):
    """This side has the source: APPLY, then COARSE/RECORDS out and FINE
    back on one connection (docs/PROTOCOL.md), then END -> APPLY_OK. With
    `streams`, the RECORDS go over that many more connections instead
    (pydr.stripes)."""
    host, path = remote
    J.check_no_unfinished_apply(src)
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    extra = []
    try:
        src_size, _ = B.fd_size(src_fd, src)
        throttle = Throttle(progress, "resync", f"{host}:{path}", src_size)
        shared = B.Progress()
        with Connection(host, rsh=rsh, remote_pydr=remote_pydr, bwlimit=bwlimit,
                        compress=compress) as conn:
            request = {"path": path, "block_size": block_size, "result_size": src_size}
            if keep_undo is not None:
                request["keep_undo"] = keep_undo
            out = None
            if streams:
                # started now, so that their ssh set-ups overlap the main one
                token = S.new_token()
                request.update(streams=streams, token=token)
                extra = [Connection(host, rsh=rsh, remote_pydr=remote_pydr, compress=compress,
                                    bwlimit=bwlimit / streams if bwlimit else None)
                         for _ in range(streams)]
                for i, c in enumerate(extra):
                    c.ch.send_json(P.JOIN, {"token": token, "index": i})
            # no waiting for the handshake: the request and the first COARSE
            # frames travel with HELLO
            conn.ch.send_json(P.APPLY, request)

            def next_fine():
                while True:
                    ftype, payload = conn.next(P.FINE, P.STAT_OK)
                    if ftype == P.FINE:
                        return payload
                    applying(payload)

            def applying(payload):  # STAT_OK: the server has opened the target
                kept = P.parse_json(payload, "STAT_OK").get("keep_undo")
                if on_kept is not None and keep_undo is not None:
                    on_kept(kept)

            def send(ftype, payload):
                nonlocal out
                if ftype != P.RECORDS or not extra:
                    return conn.ch.send(ftype, payload)
                if out is None:  # after the main handshake: compression is agreed on
                    for c in extra:
                        if conn.ch.zstd is not None:
                            c.ch.enable_zstd()
                    out = S.Outgoing([c.ch for c in extra])
                out.send(ftype, payload)

            try:
                side = X.SourceSide(src_fd, src, src_size, block_size, send, next_fine,
                                    threads=threads, shared=shared, throttle=throttle,
                                    window=window, group=group,
                                    batch=S.FRAME if extra else X.NET_BATCH).run()
                if out is not None:
                    out.finish()
                elif extra:  # nothing changed: the streams still end properly
                    S.Outgoing([c.ch for c in extra]).finish()
                for c in extra:  # their teardown overlaps the rest
                    c.close(wait=False)
            except (BrokenPipeError, ConnectionResetError) as exc:
                conn.wait_for_error(timeout=10)  # raises what the server said, if it did
                raise ConnectionResetError(f"a connection to {host} was lost") from exc
            conn.ch.send(P.END)
            ftype, payload = conn.next(P.APPLY_OK, P.STAT_OK)
            if ftype == P.STAT_OK:  # an empty source: no FINE came before it
                applying(payload)
                ftype, payload = conn.next(P.APPLY_OK)
            res = P.parse_json(payload, "APPLY_OK")
            sent = conn.ch.bytes_out + sum(c.ch.bytes_out for c in extra)
            received = conn.ch.bytes_in + sum(c.ch.bytes_in for c in extra)
    finally:
        for c in extra:
            c.close()
        os.close(src_fd)
    throttle.report(src_size, shared.read, finished=True)
    return RemoteStats(res["bytes_written"], res["bytes_zeroed"], side.blocks_changed, sent,
                       received, time.monotonic() - start, "push")


def _pull(remote, dst, start, *, rsh, remote_pydr, block_size, threads, progress, window, bwlimit,
          compress, group, keep_undo=None):
    """The server has the source: SEND, then COARSE/RECORDS come in and FINE
    answers go out (from a sender thread, so that this side always keeps
    reading), then DONE."""
    host, path = remote
    with Connection(host, rsh=rsh, remote_pydr=remote_pydr, compress=compress) as conn:
        req = {"path": path, "block_size": block_size, "window": window, "group": group}
        if bwlimit:
            req["bwlimit"] = bwlimit
        conn.ch.send_json(P.SEND, req)
        src_size = P.parse_json(conn.next(P.STAT_OK)[1], "STAT_OK")["size"]
        throttle = Throttle(progress, "resync", dst, src_size)
        shared = B.Progress()
        applier = Applier(dst, block_size=block_size, base_size=None, result_size=src_size,
                          kind=J.KIND_RESYNC, create=True)
        with applier, P.Sender(conn.ch) as sender:
            side = X.TargetSide(applier.fd, dst, applier.base_size, block_size, sender.send,
                                threads=threads, shared=shared, throttle=throttle)
            while True:
                ftype, payload = conn.next(P.COARSE, P.RECORDS, P.DONE)
                if ftype == P.DONE:
                    done = P.parse_json(payload, "DONE")
                    break
                if ftype == P.COARSE:
                    side.coarse(payload)
                    continue
                complete, count, bound, end = B.records_scan(payload)
                if complete != len(payload) or end:
                    raise P.ProtocolError("a RECORDS frame must hold whole records")
                applier.submit(payload, bound, count)
            applier.finish(keep_journal=keep_undo)
        sent, received = conn.ch.bytes_out, conn.ch.bytes_in
    st = applier.state
    throttle.report(src_size, shared.read, finished=True)
    return RemoteStats(int(st.data_bytes), int(st.zero_bytes), int(done.get("blocks_changed", 0)),
                       sent, received, time.monotonic() - start, "pull")


def remote_signature(spec, output, *, rsh="ssh", remote_pydr="pydr", block_size=4096):
    """Write the signature of a remote image ("[user@]host:PATH", xxh3-128)
    to the local file `output`, window by window (bounded memory)."""
    from .sigstream import SignatureWriter

    host, path = parse_remote(spec)
    B.check_block_size(block_size)
    start = time.monotonic()
    with Connection(host, rsh=rsh, remote_pydr=remote_pydr) as conn:
        conn.ch.send_json(P.STAT, {"path": path, "source": True})
        stat = P.parse_json(conn.next(P.STAT_OK)[1], "STAT_OK")
        if not stat["exists"]:
            raise FileNotFoundError(2, f"not found (on {host})", spec)
        writer = SignatureWriter(output, block_size, stat["size"])
        try:
            conn.ch.send_json(P.SIGN, {"path": path, "block_size": block_size})
            for first, h, z in _window_sigs(conn):
                if first != writer.written:
                    raise P.ProtocolError(f"{host} sent signatures out of order")
                writer.write(h, z)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        received = conn.ch.bytes_in
    return {"image": spec, "output": os.fspath(output), "size": stat["size"],
            "block_size": block_size, "blocks": writer.n, "zero_blocks": writer.zeros,
            "bytes_received": received, "seconds": round(time.monotonic() - start, 6)}


# -- remote files for signature, delta and apply ------------------------------


class RemoteReader(P.ChunkReader):
    """A remote file ("[user@]host:PATH") read as a binary stream (READ)."""

    def __init__(self, spec, *, rsh="ssh", remote_pydr="pydr"):
        host, path = parse_remote(spec)
        self.conn = Connection(host, rsh=rsh, remote_pydr=remote_pydr)
        try:
            self.conn.ch.send_json(P.READ, {"path": path})
            self.size = P.parse_json(self.conn.next(P.STAT_OK)[1], "STAT_OK")["size"]
        except BaseException:
            self.conn.close()
            raise
        super().__init__(self._next_chunk, spec)

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
    """A remote file replaced atomically by what is written to it (WRITE):
    the server renames it into place only when commit() is called; on any
    error (or a dropped connection) the old file stays as it was."""

    def __init__(self, spec, *, rsh="ssh", remote_pydr="pydr"):
        host, path = parse_remote(spec)
        self.spec = spec
        self.conn = Connection(host, rsh=rsh, remote_pydr=remote_pydr)
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
        except (BrokenPipeError, ConnectionResetError):
            conn.next()  # the server gave up: raise what it said
            raise
    conn.ch.send(P.END)


def _local_name(exc, host, name):
    """A server's error about the stream we sent names our file, not host:file."""
    if getattr(exc, "path", None) == f"{host}:{name}":
        exc.path = name
    return exc


def remote_apply(delta, spec, *, rsh="ssh", remote_pydr="pydr", verify=False):
    """`pydr apply DELTA host:TARGET`: stream the delta (a path, "-", or a
    binary file object) to the server, which applies it exactly as a local
    apply does. Returns the server's stats (dict)."""
    import contextlib
    import sys

    from .apply import ApplyStats

    host, path = parse_remote(spec)
    if hasattr(delta, "read"):
        opener, name = contextlib.nullcontext(delta), getattr(delta, "name", "<stream>")
    elif os.fspath(delta) == "-":
        opener, name = contextlib.nullcontext(sys.stdin.buffer), "<stdin>"
    else:
        opener, name = open(delta, "rb"), os.fspath(delta)
    with opener as f, Connection(host, rsh=rsh, remote_pydr=remote_pydr) as conn:
        conn.ch.send_json(P.PATCH, {"path": path, "name": name, "verify": bool(verify)})
        try:
            _send_stream(conn, f)
            res = P.parse_json(conn.next(P.APPLY_OK)[1], "APPLY_OK")
        except Exception as exc:
            _local_name(exc, host, name)
            raise
    return ApplyStats(*(res[k] for k in ApplyStats._fields))


def remote_delta(spec, out, *, base, rsh="ssh", remote_pydr="pydr"):
    """`pydr delta host:SOURCE`: send the base's signature (a Signature) to
    the server, which encodes the delta there and streams it back into `out`
    (a binary file object). Returns DeltaStats."""
    from .delta import DeltaStats

    host, path = parse_remote(spec)
    with Connection(host, rsh=rsh, remote_pydr=remote_pydr) as conn:
        conn.ch.send_json(P.DELTA, {"path": path, "name": "<base signature>"})
        try:  # written straight onto the connection, not copied in memory first
            base._write(P.ChunkWriter(conn.ch.send))
        except (BrokenPipeError, ConnectionResetError):
            conn.next()  # the server gave up: raise what it said
            raise
        conn.ch.send(P.END)
        while True:
            ftype, payload = conn.next(P.BYTES, P.DONE)
            if ftype == P.DONE:
                res = P.parse_json(payload, "DONE")
                break
            out.write(payload)
    return DeltaStats(*(res[k] for k in DeltaStats._fields))


class RemoteSite:
    """The requests the vault makes of a host holding replicas: pushes that
    keep their undo journal as a recovery-point step beside the replica,
    materialising a point there, and dropping steps. Paths are the host's."""

    def __init__(self, host, *, rsh="ssh", remote_pydr="pydr"):
        self.host, self.rsh, self.remote_pydr = host, rsh or "ssh", remote_pydr or "pydr"

    def _request(self, ftype, body, *expected):
        with Connection(self.host, rsh=self.rsh, remote_pydr=self.remote_pydr) as conn:
            conn.ch.send_json(ftype, body)
            return P.parse_json(conn.next(*expected)[1], P.NAMES[expected[0]])

    @staticmethod
    def step_path(replica_path, item, idx, step):
        head, tail = os.path.split(replica_path)
        return os.path.join(head, f".{tail}.pydr-steps", f"{item}-{idx}-{step}.undo")

    def push(self, src, path, *, keep_undo=None, progress=None, threads=None):
        """resync a local `src` onto `path` here. keep_undo: a step path here,
        or candidates (see remote_resync). Returns (stats, index kept at)."""
        kept = []
        st = remote_resync(src, self.spec(path), rsh=self.rsh, remote_pydr=self.remote_pydr,
                           keep_undo=keep_undo, on_kept=kept.append, progress=progress,
                           threads=threads)
        return st, (kept[0] if kept else None)

    def pull(self, path, dst, *, keep_undo=None, progress=None, threads=None):
        """resync `path` here onto a local `dst`; keep_undo: a local step path."""
        return remote_resync(self.spec(path), dst, rsh=self.rsh, remote_pydr=self.remote_pydr,
                             keep_undo=keep_undo, progress=progress, threads=threads)

    def spec(self, path):
        return f"{self.host}:{path}"

    def exists(self, path):
        return bool(self._request(P.STAT, {"path": path}, P.STAT_OK).get("exists"))

    def size(self, path):
        st = self._request(P.STAT, {"path": path, "source": True}, P.STAT_OK)
        if not st.get("exists"):
            raise FileNotFoundError(2, f"not found (on {self.host})", self.spec(path))
        return st["size"]

    def rename(self, src, dst):
        self._request(P.RENAME, {"src": src, "dst": dst}, P.DONE)

    def materialize(self, replica, steps, dest, threads=None, drill=False):
        self._request(P.MATERIALIZE, {"replica": replica, "steps": steps, "dest": dest,
                                      "drill": bool(drill)}, P.DONE)
        return self.spec(dest)

    def remove(self, paths):
        if paths:
            self._request(P.REMOVE, {"paths": paths}, P.DONE)

    def remove_drill(self, directory, paths):
        self._request(P.REMOVE, {"paths": paths, "drill": directory}, P.DONE)

"""Resync with a remote site over ssh: ``pydr resync LOCAL host:PATH`` (push)
and ``pydr resync host:PATH LOCAL`` (pull).

The client runs ``pydr serve --stdio`` on the other side through ``--rsh``
(default ``ssh``) and talks docs/PROTOCOL.md with it. Both directions are
pipelined: the side holding the target streams its 4 KiB signatures, window
by window, while the other compares and streams only the changed blocks as
delta records -- no round trip per block or per window. Pushed records are
applied by the server through the same journaled Applier as a local resync
(a dropped connection keeps the journal; running the command again resumes).
"""

import json
import os
import queue
import shlex
import struct
import subprocess
import threading
import time

import numpy as np

from . import _bindings as B
from . import journal as J
from . import protocol as P
from ._parallel import check_threads
from .apply import Applier
from .delta import write_records
from .progress import Record, Throttle
from .signatures import Signature, blocks_for, sign_range
from .sync import compare_window

NET_BATCH = 8 << 20


class RemoteStats(Record):
    """bytes_written, bytes_zeroed, blocks_changed, bytes_sent, bytes_received, seconds, direction."""

    _fields = ("bytes_written", "bytes_zeroed", "blocks_changed", "bytes_sent", "bytes_received",
               "seconds", "direction")
    __slots__ = _fields


def parse_remote(spec):
    """(host, path) for "[user@]host:PATH", else None (a local path)."""
    spec = os.fspath(spec)
    if spec.startswith(("/", "./", "../")) or ":" not in spec:
        return None
    host, path = spec.split(":", 1)
    if not host or "/" in host or not path:
        return None
    return host, path


class Connection:
    """A running `pydr serve --stdio` on `host`, with a reader thread."""

    def __init__(self, host, *, rsh="ssh", remote_pydr="pydr", handshake=True, bwlimit=None,
                 compress=False):
        self.host = host
        cmd = shlex.split(rsh) + [host, f"{shlex.quote(remote_pydr)} serve --stdio"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0)
        self.ch = P.Channel(self.proc.stdout, self.proc.stdin, bwlimit=bwlimit)
        self.frames = queue.Queue(maxsize=64)
        if compress and not P.zstd_available():
            raise ValueError("--compress needs the zstandard package (pip install zstandard)")
        self.ch.send_json(P.HELLO, {"protocol": P.VERSION,
                                    "capabilities": ["zstd"] if compress else []})
        self.compress = compress
        if handshake:
            self.handshake()

    def handshake(self):
        """Wait for the server's HELLO (connections can be started first and
        shaken hands with afterwards, so that their ssh set-ups overlap)."""
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

    def close(self):
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
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


class _Remote:
    """Signatures of a remote file, served window by window, in order."""

    def __init__(self, conn, block_size):
        self.it = _window_sigs(conn)
        self.bs = block_size
        self.h = bytearray()
        self.z = bytearray()
        self.first = 0  # block index of h[0]
        self.done = False

    def blocks(self, first, count):
        """(hashes, mask) for blocks [first, first+count), clipped at the end."""
        while not self.done and self.first + len(self.z) < first + count:
            try:
                f, h, z = next(self.it)
            except StopIteration:
                self.done = True
                break
            if f != self.first + len(self.z):
                raise P.ProtocolError("SIGS frames out of order")
            self.h += h
            self.z += z
        drop = first - self.first  # earlier blocks are no longer needed
        if drop > 0:
            del self.h[:16 * drop]
            del self.z[:drop]
            self.first = first
        count = max(0, min(count, len(self.z)))
        return bytearray(self.h[:16 * count]), bytearray(self.z[:count])


def remote_resync(src, dst, *, rsh="ssh", remote_pydr="pydr", block_size=4096, threads=None,
                  progress=None, window=64 << 20, bwlimit=None, compress=False):
    """Make dst equal to src where exactly one of them is "[user@]host:PATH".
    ``bwlimit`` (bytes/s) caps what this side sends (the records of a push)."""
    rs, rd = parse_remote(src), parse_remote(dst)
    if bool(rs) == bool(rd):
        raise ValueError("exactly one of source and target must be remote ([user@]host:PATH)")
    B.check_block_size(block_size)
    threads = check_threads(threads)
    start = time.monotonic()
    if bwlimit is not None and bwlimit <= 0:
        raise ValueError("bwlimit must be a positive number of bytes per second")
    if rd:
        return _push(src, rd, rsh, remote_pydr, block_size, threads, progress, window, start,
                     bwlimit, compress)
    return _pull(rs, dst, rsh, remote_pydr, block_size, threads, progress, window, start,
                 compress)


def _push(src, remote, rsh, remote_pydr, bs, threads, progress, window, start, bwlimit=None,
          compress=False):
    host, path = remote
    J.check_no_unfinished_apply(src)
    code = B.ALGORITHMS["xxh3-128"]
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        src_size, _ = B.fd_size(src_fd, src)
        throttle = Throttle(progress, "resync", f"{host}:{path}", src_size)
        shared = B.Progress()
        # two connections, set up at the same time: records go one way on the
        # first while the target's signatures stream back on the second
        with Connection(host, rsh=rsh, remote_pydr=remote_pydr, handshake=False,
                        bwlimit=bwlimit, compress=compress) as conn, \
                Connection(host, rsh=rsh, remote_pydr=remote_pydr, handshake=False) as sigconn:
            conn.handshake()
            sigconn.handshake()
            conn.ch.send_json(P.APPLY, {"path": path, "block_size": bs, "result_size": src_size})
            sigconn.ch.send_json(P.SIGN, {"path": path, "block_size": bs})
            _, payload = conn.next(P.STAT_OK)
            dst_size = P.parse_json(payload, "STAT_OK")["size"]
            remote_sigs = _Remote(sigconn, bs)
            blocks_changed = 0
            seq = 0
            buf = bytearray(NET_BATCH)
            for w0 in range(0, src_size, window):
                w1 = min(src_size, w0 + window)
                n = blocks_for(w1 - w0, bs)
                h, z = bytearray(16 * n), bytearray(n)
                sign_range(src_fd, src, w0, w1 - w0, bs, code, h, z, threads=threads,
                           progress_record=shared, throttle=throttle, final_report=False)
                d1 = min(dst_size, -(-w1 // bs) * bs) if w0 < dst_size else w0
                m = blocks_for(d1 - w0, bs)
                dh, dz = remote_sigs.blocks(w0 // bs, m)
                if len(dz) != m:
                    raise P.ProtocolError(f"{host} sent signatures for {len(dz)} of {m} blocks")
                cmp = compare_window(Signature(bs, w1 - w0, "xxh3-128", h, z),
                                     Signature(bs, d1 - w0, "xxh3-128", dh, dz), w0, bs)
                if cmp:
                    ext, zero, digests, blocks = cmp
                    blocks_changed += blocks
                    count, _, _ = write_records(src_fd, src, ext, zero, digests,
                                                lambda c: conn.ch.send(P.RECORDS, bytes(c)),
                                                first_seq=seq, buf=buf)
                    seq += count
                throttle.report(shared.done, shared.read)
            sent_sig, recv_sig = sigconn.ch.bytes_out, sigconn.ch.bytes_in
            conn.ch.send(P.END)
            _, payload = conn.next(P.APPLY_OK)
            res = P.parse_json(payload, "APPLY_OK")
            sent, received = conn.ch.bytes_out + sent_sig, conn.ch.bytes_in + recv_sig
    finally:
        os.close(src_fd)
    throttle.report(src_size, shared.read, finished=True)
    return RemoteStats(res["bytes_written"], res["bytes_zeroed"], blocks_changed, sent, received,
                       time.monotonic() - start, "push")


def _pull(remote, dst, rsh, remote_pydr, bs, threads, progress, window, start, compress=False):
    """Two connections: one streams the source's signatures, the other asks
    for the records of each changed window (one round trip per changed
    window; pipelining that is for later)."""
    host, path = remote
    code = B.ALGORITHMS["xxh3-128"]
    with Connection(host, rsh=rsh, remote_pydr=remote_pydr, handshake=False,
                    compress=compress) as conn, \
            Connection(host, rsh=rsh, remote_pydr=remote_pydr, handshake=False) as sigconn:
        conn.handshake()
        sigconn.handshake()
        conn.ch.send_json(P.STAT, {"path": path, "source": True})
        stat = P.parse_json(conn.next(P.STAT_OK)[1], "STAT_OK")
        if not stat["exists"]:
            raise FileNotFoundError(2, f"source not found (on {host})", f"{host}:{path}")
        src_size = stat["size"]
        throttle = Throttle(progress, "resync", dst, src_size)
        shared = B.Progress()
        sigconn.ch.send_json(P.SIGN, {"path": path, "block_size": bs})
        remote_sigs = _Remote(sigconn, bs)
        applier = Applier(dst, block_size=bs, base_size=None, result_size=src_size,
                          kind=J.KIND_RESYNC, create=True)
        with applier:
            dst_size = applier.base_size
            blocks_changed = 0
            seq = 0
            for w0 in range(0, src_size, window):
                w1 = min(src_size, w0 + window)
                n = blocks_for(w1 - w0, bs)
                sh, sz = remote_sigs.blocks(w0 // bs, n)
                if len(sz) != n:
                    raise P.ProtocolError(f"{host} sent signatures for {len(sz)} of {n} blocks")
                d1 = min(dst_size, -(-w1 // bs) * bs) if w0 < dst_size else w0
                m = blocks_for(d1 - w0, bs)
                dh, dz = bytearray(16 * m), bytearray(m)
                if m:
                    sign_range(applier.fd, dst, w0, d1 - w0, bs, code, dh, dz, threads=threads,
                               progress_record=shared, throttle=throttle, final_report=False)
                cmp = compare_window(Signature(bs, w1 - w0, "xxh3-128", sh, sz),
                                     Signature(bs, d1 - w0, "xxh3-128", dh, dz), w0, bs)
                if not cmp:
                    continue
                ext, zero, digests, blocks = cmp
                blocks_changed += blocks
                head = json.dumps({"path": path, "extents": len(zero), "first_seq": seq}).encode()
                conn.ch.send(P.ENCODE, struct.pack("<I", len(head)) + head +
                             ext.astype("<u8").tobytes() + zero.astype(np.uint8).tobytes() +
                             bytes(digests))
                seq += len(zero)
                while True:
                    ftype, payload = conn.next(P.RECORDS, P.DONE)
                    if ftype == P.DONE:
                        break
                    complete, count, bound, end = B.records_scan(payload)
                    if complete != len(payload) or end:
                        raise P.ProtocolError("a RECORDS frame must hold whole records")
                    applier.submit(payload, bound, count)
                throttle.report(shared.done, shared.read)
            applier.finish()
        sent = conn.ch.bytes_out + sigconn.ch.bytes_out
        received = conn.ch.bytes_in + sigconn.ch.bytes_in
    st = applier.state
    throttle.report(src_size, shared.read, finished=True)
    return RemoteStats(int(st.data_bytes), int(st.zero_bytes), blocks_changed, sent, received,
                       time.monotonic() - start, "pull")


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

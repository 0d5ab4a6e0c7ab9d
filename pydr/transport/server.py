"""``pydr serve --stdio``: the remote end of pydr's protocol.

Speaks only the protocol on stdin/stdout (diagnostics on stderr) and runs no
other commands. With ``--root DIR`` every path is resolved inside DIR;
anything outside -- "..", absolute paths elsewhere, symlinks that escape --
is refused before any file is opened or created.
"""

import contextlib
import errno
import os
import struct
import sys

from ..engine import bindings as B
from . import protocol as P
from . import stripes as S
from ..engine import crashpoints
from ..engine import journal as J
from ..engine import names
from ..engine.devices import open_disk
from ..engine.signatures import blocks_for, sign_range
from ..engine.progress import Throttle
from ..engine.parallel import default_threads

SIGN_WINDOW = 64 << 20


def resolve(path, root):
    """The real path to use for `path`, confined to `root` when given."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise P.ProtocolError("bad path")
    if root is None:
        return path
    root = os.path.realpath(root)
    full = path if os.path.isabs(path) else os.path.join(root, path)
    parent, name = os.path.split(os.path.normpath(full))
    if name in ("", ".", ".."):
        raise PermissionError(errno.EACCES, "not a file name", path)
    real = os.path.join(os.path.realpath(parent), name)
    if os.path.lexists(real):
        real = os.path.realpath(real)
    if os.path.commonpath([root, real]) != root or real == root:
        raise PermissionError(errno.EACCES, "outside the directory this server may use", path)
    return real


def serve(rfile, wfile, root=None):
    ch = P.Channel(rfile, wfile)
    ftype, payload = ch.recv()
    if ftype != P.HELLO:
        raise P.ProtocolError("expected HELLO")
    hello = P.parse_json(payload, "HELLO")
    if hello.get("protocol") != P.VERSION:
        ch.send_json(P.ERROR, {"class": "ProtocolError", "message":
                               f"protocol {hello.get('protocol')} is not supported (server speaks {P.VERSION})"})
        return
    from .._version import __version__

    offered = hello.get("capabilities") if isinstance(hello.get("capabilities"), list) else []
    caps = ["zstd"] if "zstd" in offered and P.zstd_available() else []
    ch.send_json(P.HELLO, {"protocol": P.VERSION, "pydr": __version__, "capabilities": caps})
    if caps:
        ch.enable_zstd()
    while True:
        try:
            ftype, payload = ch.recv()
        except ConnectionResetError:
            return
        except P.ProtocolError as exc:  # tell the peer why, then stop talking to it
            with contextlib.suppress(OSError):
                ch.send_json(P.ERROR, P.error_payload(exc))
            return
        try:
            if ftype == P.JOIN:  # this connection is one stream of a push: relay it
                _join(ch, payload)
                return
            handler = REQUESTS.get(ftype)
            if handler is None:
                raise P.ProtocolError(f"unexpected {P.NAMES[ftype]} frame")
            handler(ch, payload, root)
        except (ConnectionResetError, BrokenPipeError):
            return
        except P.ProtocolError as exc:
            with contextlib.suppress(OSError):
                ch.send_json(P.ERROR, P.error_payload(exc))
            return  # a broken peer: stop talking to it
        except Exception as exc:
            ch.send_json(P.ERROR, P.error_payload(exc))


def _stat(ch, payload, root):
    req = P.parse_json(payload, "STAT")
    path = resolve(req.get("path"), root)
    if not os.path.exists(path):
        ch.send_json(P.STAT_OK, {"exists": False, "size": 0})
        return
    J.check_no_unfinished_apply(path) if req.get("source") else None
    fd = open_disk(path)  # a FIFO is refused, never waited on
    try:
        size, is_block = B.fd_size(fd, path)
    finally:
        os.close(fd)
    from ..engine.identity import file_identity

    # identity: what tells a vault whether the file changed since (pydr.dr.ownership)
    ident = file_identity(path)
    ch.send_json(P.STAT_OK, {"exists": True, "size": size, "block_device": is_block,
                             "identity": list(ident) if isinstance(ident, tuple) else None})


def _sign(ch, payload, root):
    req = P.parse_json(payload, "SIGN")
    path = resolve(req.get("path"), root)
    bs = B.check_block_size(req.get("block_size"))
    fd = open_disk(path)
    read = B.Progress()
    try:
        size, _ = B.fd_size(fd, path)
        code = B.ALGORITHMS["xxh3-128"]
        window = max(bs, SIGN_WINDOW // bs * bs)
        for w0 in range(0, size, window):
            n = blocks_for(min(size, w0 + window) - w0, bs)
            h, z = bytearray(16 * n), bytearray(n)
            sign_range(fd, path, w0, min(size, w0 + window) - w0, bs, code, h, z,
                       threads=default_threads(), progress_record=read,
                       throttle=Throttle(None, "sign", path, 0), final_report=False)
            ch.send(P.SIGS, struct.pack("<QQ", w0 // bs, n) + bytes(h) + bytes(z))
    finally:
        os.close(fd)
    ch.send_json(P.DONE, {"size": size, "bytes_read": int(read.read)})


class _ClientTarget:
    """The target role across this connection, for a pull: the client
    answers COARSE with FINE and takes the RECORDS."""

    def __init__(self, ch, frame_bytes):
        self.ch, self.frame_bytes = ch, frame_bytes

    def coarse(self, payload):
        self.ch.send(P.COARSE, payload)

    def records(self, payload):
        self.ch.send(P.RECORDS, bytes(payload))

    def next_fine(self):
        ftype, data = self.ch.recv()
        if ftype != P.FINE:
            raise P.ProtocolError(f"unexpected {P.NAMES[ftype]} frame, expected FINE")
        return data


def _send(ch, payload, root):
    """Pull: this side has the source. STAT_OK, then COARSE and RECORDS
    frames as the client's FINE answers arrive, then DONE."""
    from . import exchange as X  # numpy: not needed by the other requests (a JOIN relay)
    from .roles import LocalSource

    req = P.parse_json(payload, "SEND")
    path = resolve(req.get("path"), root)
    bs = B.check_block_size(req.get("block_size"))
    bwlimit = req.get("bwlimit")
    if bwlimit is not None and (not isinstance(bwlimit, (int, float)) or bwlimit <= 0):
        raise P.ProtocolError("bad bwlimit")
    with LocalSource(path, block_size=bs, threads=default_threads(),
                     window=_int(req, "window", X.WINDOW), group=_int(req, "group", X.GROUP)) as src:
        ch.send_json(P.STAT_OK, {"exists": True, "size": src.size, "mode": src.mode})
        ch.bwlimit = bwlimit
        src.run(_ClientTarget(ch, X.NET_BATCH))
    ch.send_json(P.DONE, {"blocks_changed": src.blocks_changed, "data_bytes": src.data_bytes})


def _int(req, key, default):
    value = req.get(key, default)
    if not isinstance(value, int) or value <= 0:
        raise P.ProtocolError(f"bad {key}")
    return value


def _apply(ch, payload, root):
    """Push: this side has the target. STAT_OK, then FINE answers to the
    client's COARSE frames while its RECORDS are applied (from the main
    connection, or from `streams` extra connections, see pydr.transport.
    stripes), then APPLY_OK."""
    from .roles import LocalTarget  # numpy: not needed by the other requests

    req = P.parse_json(payload, "APPLY")
    path = resolve(req.get("path"), root)
    bs = B.check_block_size(req.get("block_size"))
    result = req.get("result_size")
    if not isinstance(result, int) or result < 0:
        raise P.ProtocolError("bad result size")
    mode = P.file_mode(req.get("mode"))
    keep, kept_at = _choose_step(path, req.get("keep_undo"), root)
    streams = req.get("streams", 0)
    S.check_request(streams, req.get("token"))
    listener = S.Listener(req["token"], streams) if streams else None
    incoming = None
    try:
        # a missing target starts empty (removed again if this fails); a
        # dropped connection keeps the journal, so the next push resumes
        with LocalTarget(path, block_size=bs, result_size=result, threads=default_threads(),
                         keep_undo=keep, mode=mode) as target:
            ch.send_json(P.STAT_OK, {"size": target.base_size, "keep_undo": kept_at})
            if listener is not None:
                def connect():
                    chans = listener.accept()
                    for c in chans:
                        if ch.zstd is not None:  # negotiated on the main connection
                            c.enable_zstd()
                    return chans

                def on_error(exc):
                    listener.shutdown()  # the client's streams fail; it then reads this:
                    with contextlib.suppress(OSError):
                        ch.send_json(P.ERROR, P.error_payload(exc))

                incoming = S.Incoming(connect, target.records, on_error)
            while True:
                ftype, data = ch.recv()
                if ftype == P.END:
                    break
                if ftype == P.COARSE:
                    target.coarse(data)
                    ch.send(P.FINE, target.next_fine())
                elif ftype == P.RECORDS and incoming is None:
                    target.records(data)
                else:
                    raise P.ProtocolError(f"unexpected {P.NAMES[ftype]} during APPLY")
            if incoming is not None:
                incoming.wait()
            res = target.finish()
        crashpoints.reached("server.applied")
    except (ConnectionResetError, BrokenPipeError):
        if incoming is not None and incoming.error is not None:
            return  # already reported on the main connection
        raise
    finally:
        if listener is not None:
            listener.shutdown()
    ch.send_json(P.APPLY_OK, {"bytes_written": res.bytes_written, "bytes_zeroed": res.bytes_zeroed,
                              "records": res.records, "journal_bytes": res.journal_bytes,
                              "groups_listed": target.side.groups_sent,
                              "blocks_listed": target.side.blocks_sent})


def _step_path(path, root):
    """A recovery-point step (a kept undo journal): only "*.undo" files in a
    ".*.pydr-steps" directory may be kept, read back or removed this way."""
    real = resolve(path, root)
    if not names.is_step(real):
        raise PermissionError(errno.EACCES, "not a recovery-point step", path)
    return real


DRILL_MARKER = ".pydr-drill"  # the disks a test failover wrote into a directory


def _choose_step(target, candidates, root):
    """(path, index) of the first of the offered step paths (a path or a list
    of up to 4) that does not hold a committed step yet, or (None, None).
    The client offers the next step and the one after it: if a killed cycle
    left the next one committed here but unregistered, the vault learns it
    from the index, with no extra round trip."""
    if candidates is None:
        return None, None
    if isinstance(candidates, str):
        candidates = [candidates]
    if not isinstance(candidates, list) or not 1 <= len(candidates) <= 4:
        raise P.ProtocolError("bad keep_undo")
    return J.choose_undo_path(target, [_step_path(p, root) for p in candidates])


def _materialize(ch, payload, root):
    """A disk as it was at a recovery point: a reflink clone (or, by method
    or where the file system cannot clone, a sparse copy) of the replica's
    latest state (its failover baseline if there is one) into `dest`, with
    the undo `steps` (newest first) rolled back onto it. With "drill", dest
    is recorded in its directory's drill marker, so that cleaning up the
    test failover may remove it again."""
    from ..engine.names import latest_state
    from ..engine.restore import materialize_file

    req = P.parse_json(payload, "MATERIALIZE")
    replica, dest = resolve(req.get("replica"), root), resolve(req.get("dest"), root)
    steps = req.get("steps")
    if not isinstance(steps, list):
        raise P.ProtocolError("bad steps")
    steps = [_step_path(p, root) for p in steps]
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if req.get("drill"):
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, "a test failover does not overwrite files", dest)
        with open(os.path.join(os.path.dirname(dest), DRILL_MARKER), "a") as f:
            f.write(os.path.basename(dest) + "\n")
            f.flush()
            os.fsync(f.fileno())
    method = req.get("method", "auto")
    if method not in ("auto", "reflink", "copy"):
        raise P.ProtocolError("bad method")
    used = materialize_file(latest_state(replica), steps, dest, threads=default_threads(),
                            method=method)
    ch.send_json(P.DONE, {"size": os.path.getsize(dest), "method": used})


def _rename(ch, payload, root):
    """The two renames of a failover, and nothing else: REPLICA -> its
    baseline .REPLICA.pydr-base, and .REPLICA.pydr-new -> REPLICA."""
    req = P.parse_json(payload, "RENAME")
    src, dst = resolve(req.get("src"), root), resolve(req.get("dst"), root)
    if not names.is_failover_rename(src, dst):
        raise PermissionError(errno.EACCES, "not a rename a failover makes", req.get("src"))
    os.replace(src, dst)
    fd = os.open(os.path.dirname(dst), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    ch.send_json(P.DONE, {})


def _remove(ch, payload, root):
    """Drop files pydr made: steps, baselines, half-made disks; or, with
    "drill": DIR, the disks a test failover wrote there (its marker lists
    them), then the marker and DIR if that leaves it empty."""
    req = P.parse_json(payload, "REMOVE")
    paths = req.get("paths")
    if not isinstance(paths, list):
        raise P.ProtocolError("bad paths")
    drill = req.get("drill")
    listed = set()
    if drill is not None:
        drill = resolve(drill, root)
        with contextlib.suppress(FileNotFoundError):
            listed = set(open(os.path.join(drill, DRILL_MARKER)).read().split("\n")) - {""}
    real = [resolve(p, root) for p in paths]
    for r, p in zip(real, paths):
        in_drill = drill is not None and os.path.dirname(r) == drill and os.path.basename(r) in listed
        if not (in_drill or names.is_sidecar(r)):
            raise PermissionError(errno.EACCES, "not a file pydr made", p)
    removed = 0
    for r in real:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(r)
            removed += 1
    if drill is not None and listed <= {os.path.basename(r) for r in real}:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(drill, DRILL_MARKER))
        with contextlib.suppress(OSError):
            os.rmdir(drill)
    ch.send_json(P.DONE, {"removed": removed})


def _join(ch, payload):
    req = P.parse_json(payload, "JOIN")
    S.check_request(1, req.get("token"))
    if not isinstance(req.get("index"), int) or req["index"] < 0:
        raise P.ProtocolError("bad stream index")
    S.relay(ch, req["token"], req["index"])


def _stream_in(ch):
    """The client's BYTES frames up to END, as a binary file."""

    def next_chunk():
        ftype, data = ch.recv()
        if ftype == P.END:
            return None
        if ftype != P.BYTES:
            raise P.ProtocolError(f"unexpected {P.NAMES[ftype]} frame in a byte stream")
        return data

    return next_chunk


def _drain(reader):
    """After an error, read the rest of the client's stream so that it is not
    left blocked sending it; then the ERROR frame is what it reads next."""
    with contextlib.suppress(P.ProtocolError):
        while reader.read(P.CHUNK):
            pass


def _read(ch, payload, root):
    """A file's bytes: STAT_OK with its size, BYTES frames, DONE."""
    req = P.parse_json(payload, "READ")
    path = resolve(req.get("path"), root)
    with open(path, "rb") as f:
        size, _ = B.fd_size(f.fileno(), path)
        ch.send_json(P.STAT_OK, {"exists": True, "size": size})
        total = 0
        while chunk := f.read(P.CHUNK):
            ch.send(P.BYTES, chunk)
            total += len(chunk)
    ch.send_json(P.DONE, {"size": total})


def _write(ch, payload, root):
    """Replace a file with the client's BYTES frames, atomically: nothing
    changes unless END arrives (a dropped connection removes the temp file)."""
    from ..engine.atomic import atomic_write

    req = P.parse_json(payload, "WRITE")
    path = resolve(req.get("path"), root)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    with atomic_write(path, through=False) as f:
        ch.send_json(P.STAT_OK, {"exists": True, "size": 0})  # the client may stream now
        reader = P.ChunkReader(_stream_in(ch), path)
        while chunk := reader.read(P.CHUNK):
            f.write(chunk)
    ch.send_json(P.DONE, {"size": reader.position})


def _patch(ch, payload, root):
    """`pydr apply DELTA host:TARGET`: the delta arrives as BYTES frames and
    is applied exactly as a local apply (journal, base checks, rollback)."""
    from ..engine.apply import apply_delta

    req = P.parse_json(payload, "PATCH")
    path = resolve(req.get("path"), root)
    reader = P.ChunkReader(_stream_in(ch), str(req.get("name") or "<delta>"))
    try:
        st = apply_delta(reader, path, verify=bool(req.get("verify")))
    except P.ProtocolError:
        raise
    except BaseException:
        _drain(reader)
        raise
    ch.send_json(P.APPLY_OK, st._asdict())


def _delta(ch, payload, root):
    """`pydr delta host:SOURCE ...`: the base's signature arrives as BYTES
    frames; the delta goes back as BYTES frames, then DONE with its stats."""
    from ..engine.delta import make_delta
    from ..engine.signatures import Signature

    req = P.parse_json(payload, "DELTA")
    path = resolve(req.get("path"), root)
    name = str(req.get("name") or "<signature>")
    reader = P.ChunkReader(_stream_in(ch), name)
    try:
        base = Signature._read(reader, name)
        if not reader.at_end():
            raise P.ProtocolError(f"data after the end of the signature {name}")
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "source image not found", path)
    except P.ProtocolError:
        raise
    except BaseException:
        _drain(reader)
        raise
    st = make_delta(path, P.ChunkWriter(ch.send), against=base, threads=default_threads())
    ch.send_json(P.DONE, st._asdict())


REQUESTS = {P.STAT: _stat, P.SIGN: _sign, P.SEND: _send, P.APPLY: _apply, P.READ: _read,
            P.WRITE: _write, P.PATCH: _patch, P.DELTA: _delta, P.MATERIALIZE: _materialize,
            P.REMOVE: _remove, P.RENAME: _rename}


def main_stdio(root=None):
    """Entry point of `pydr serve --stdio`."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames may reach the peer
    try:
        serve(stdin, stdout, root)
    except P.ProtocolError as exc:
        print(f"pydr serve: {exc}", file=sys.stderr)
        return P.ProtocolError.exit_code
    return 0

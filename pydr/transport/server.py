"""``pydr serve --stdio``: the remote end of pydr's protocol.

Speaks only the protocol on stdin/stdout (diagnostics on stderr) and runs no
other commands. With ``--root DIR`` every file is opened beneath a directory
fd of DIR, never through a symlink, "..", or a path outside
(pydr.transport.places, pydr.engine.beneath); files with more than one link
and devices, FIFOs and sockets are refused; error frames name paths relative
to DIR.
"""

import contextlib
import errno
import os
import stat
import struct
import sys

from ..engine import bindings as B
from . import protocol as P
from . import stripes as S
from ..engine import crashpoints
from ..engine import journal as J
from ..engine import beneath
from ..engine import names
from .._version import __version__
from ..engine.atomic import atomic_write, fsync_dir
from ..engine.devices import blocks_for, sign_range
from ..engine.identity import file_identity
from ..errors import UnsupportedFile
from .places import DRILL_MARKER, Scope, drill_listing, drill_name_ok, open_drill_dir, parent_rel
from ..engine.signatures import Signature
from ..engine.progress import Throttle
from ..engine.parallel import default_threads

SIGN_WINDOW = 64 << 20


def serve(rfile, wfile, root=None):
    """Answer one peer's requests; with `root`, only files beneath it (see
    pydr.transport.places)."""
    scope = Scope(root)
    try:
        _serve(P.Channel(rfile, wfile), scope)
    finally:
        scope.close()


def _serve(ch, scope):
    ftype, payload = ch.recv()
    if ftype != P.HELLO:
        raise P.ProtocolError("expected HELLO")
    hello = P.parse_json(payload, "HELLO")
    if hello.get("protocol") != P.VERSION:
        ch.send_json(P.ERROR, {"class": "ProtocolError", "message":
                               f"protocol {hello.get('protocol')} is not supported (server speaks {P.VERSION})"})
        return

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
            handler(ch, payload, scope)
        except (ConnectionResetError, BrokenPipeError):
            return
        except P.ProtocolError as exc:
            with contextlib.suppress(OSError):
                ch.send_json(P.ERROR, scope.scrub(P.error_payload(exc)))
            return  # a broken peer: stop talking to it
        except Exception as exc:
            ch.send_json(P.ERROR, scope.scrub(P.error_payload(exc)))
        finally:
            scope.release()  # the fds this request opened


def _stat(ch, payload, scope):
    req = P.parse_json(payload, "STAT")
    try:
        place = scope.place(req.get("path"))
    except (FileNotFoundError, NotADirectoryError):  # its directory is not there (yet)
        ch.send_json(P.STAT_OK, {"exists": False, "size": 0})
        return
    if not place.exists():
        ch.send_json(P.STAT_OK, {"exists": False, "size": 0})
        return
    if req.get("source"):
        place.check_sidecars(*JOURNAL_SIDECARS)
        J.check_no_unfinished_apply(place.journal_target())

    fd = place.open(os.O_RDONLY)
    try:
        size, is_block = B.fd_size(fd, place.path)
        # identity: what tells a vault whether the file changed since (pydr.dr.ownership)
        ident = file_identity(place.path, fd=fd)
    finally:
        os.close(fd)
    ch.send_json(P.STAT_OK, {"exists": True, "size": size, "block_device": is_block,
                             "identity": list(ident) if isinstance(ident, tuple) else None})


def _sign(ch, payload, scope):
    req = P.parse_json(payload, "SIGN")
    place = scope.place(req.get("path"))
    bs = B.check_block_size(req.get("block_size"))
    path = place.path
    fd = place.open(os.O_RDONLY)
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


def _send(ch, payload, scope):
    """Pull: this side has the source. STAT_OK, then COARSE and RECORDS
    frames as the client's FINE answers arrive, then DONE."""
    from . import exchange as X  # numpy: not needed by the other requests (a JOIN relay)
    from .roles import LocalSource

    req = P.parse_json(payload, "SEND")
    place = scope.place(req.get("path"))
    bs = B.check_block_size(req.get("block_size"))
    bwlimit = req.get("bwlimit")
    if bwlimit is not None and (not isinstance(bwlimit, (int, float)) or bwlimit <= 0):
        raise P.ProtocolError("bad bwlimit")
    place.check_sidecars(*JOURNAL_SIDECARS)
    dev, _ = place.device()
    with dev, LocalSource(dev, block_size=bs, threads=default_threads(),
                          window=_int(req, "window", X.WINDOW),
                          group=_int(req, "group", X.GROUP)) as src:
        ch.send_json(P.STAT_OK, {"exists": True, "size": src.size, "mode": src.mode})
        ch.bwlimit = bwlimit
        src.run(_ClientTarget(ch, X.NET_BATCH))
    ch.send_json(P.DONE, {"blocks_changed": src.blocks_changed, "data_bytes": src.data_bytes})


def _int(req, key, default):
    value = req.get(key, default)
    if not isinstance(value, int) or value <= 0:
        raise P.ProtocolError(f"bad {key}")
    return value


def _apply(ch, payload, scope):
    """Push: this side has the target. STAT_OK, then FINE answers to the
    client's COARSE frames while its RECORDS are applied (from the main
    connection, or from `streams` extra connections, see pydr.transport.
    stripes), then APPLY_OK."""
    from .roles import LocalTarget  # numpy: not needed by the other requests

    req = P.parse_json(payload, "APPLY")
    place = scope.place(req.get("path"))
    bs = B.check_block_size(req.get("block_size"))
    result = req.get("result_size")
    if not isinstance(result, int) or result < 0:
        raise P.ProtocolError("bad result size")
    mode = P.file_mode(req.get("mode"))
    streams = req.get("streams", 0)
    S.check_request(streams, req.get("token"))
    place.check_sidecars(*JOURNAL_SIDECARS)
    # a missing target starts empty (removed again if this fails); a
    # dropped connection keeps the journal, so the next push resumes
    dev, created = place.device(write=True, create=True, mode=mode)
    with dev:
        try:
            keep, kept_at = _choose_step(place, dev, req.get("keep_undo"), scope)
            res, target = _apply_records(ch, req, dev, bs, result, streams, keep, kept_at,
                                         mode, LocalTarget)
        except BaseException:
            if created and not place.exists(f".{place.name}{names.UNDO}") \
                    and os.fstat(dev.fd).st_size == 0:
                with contextlib.suppress(OSError):
                    place.unlink()
            raise
    if res is None:
        return  # the error was reported on the main connection already
    ch.send_json(P.APPLY_OK, {"bytes_written": res.bytes_written, "bytes_zeroed": res.bytes_zeroed,
                              "records": res.records, "journal_bytes": res.journal_bytes,
                              "groups_listed": target.side.groups_sent,
                              "blocks_listed": target.side.blocks_sent})


def _apply_records(ch, req, dev, bs, result, streams, keep, kept_at, mode, LocalTarget):
    """(result, target) of the records the client sends for APPLY."""
    listener = S.Listener(req["token"], streams) if streams else None
    incoming = None
    try:
        with LocalTarget(dev, block_size=bs, result_size=result, threads=default_threads(),
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
            return None, None  # already reported on the main connection
        raise
    finally:
        if listener is not None:
            listener.shutdown()
    return res, target


# the files beside a disk the engine opens by name for its journal
JOURNAL_SIDECARS = (names.UNDO, names.UNDO + ".keep", names.UNDO + ".keep" + names.NEW)
# what a pushed file may not be named: pydr's own files beside a disk
_RESERVED = (names.UNDO, names.UNDO + ".keep", names.NEW, DRILL_MARKER)


def _step_place(scope, path):
    """A recovery-point step (a kept undo journal): only "*.undo" files in a
    ".*.pydr-steps" directory may be kept, read back or removed this way."""
    place = scope.place(path)
    if not names.is_step(place.rel):
        raise PermissionError(errno.EACCES, "not a recovery-point step", place.rel)
    return place


def _choose_step(place, dev, candidates, scope):
    """(path, index) of the first of the offered step paths (a path or a list
    of up to 4) that does not hold a committed step yet, or (None, None).
    The client offers the next step and the one after it: if a killed cycle
    left the next one committed here but unregistered, the vault learns it
    from the index, with no extra round trip. Beneath --root a step must be
    in the target's own ".TARGET.pydr-steps" directory."""
    if candidates is None:
        return None, None
    if isinstance(candidates, str):
        candidates = [candidates]
    if not isinstance(candidates, list) or not 1 <= len(candidates) <= 4:
        raise P.ProtocolError("bad keep_undo")
    if not place.confined:
        steps = [_step_place(scope, p).path for p in candidates]
        return J.choose_undo_path(place.journal_target(), steps)
    steps_dir = f".{place.name}{names.STEPS}"
    head = place.rel[:-len(place.name)]
    steps = []
    for candidate in candidates:
        rel = scope.relative(candidate) if isinstance(candidate, str) else None
        name = rel[len(head) + len(steps_dir) + 1:] if rel else ""
        if rel != f"{head}{steps_dir}/{name}" or "/" in name or not name.endswith(".undo"):
            raise PermissionError(errno.EACCES, f"not a recovery-point step beside {place.rel} "
                                  f"({head}{steps_dir}/NAME.undo)", str(candidate))
        fd = beneath.open_dir(place.dir_fd, steps_dir, create=True)  # never through a link
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        finally:
            os.close(fd)
        if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1):
            raise UnsupportedFile("not a regular file with one link: refused", path=rel)
        steps.append(f"{place.sibling_path(names.STEPS)}/{name}")
    return J.choose_undo_path(dev, steps)


def _materialize(ch, payload, scope):
    """A disk as it was at a recovery point: a reflink clone (or, by method
    or where the file system cannot clone, a sparse copy) of the replica's
    latest state (its failover baseline if there is one) into `dest`, with
    the undo `steps` (newest first) rolled back onto it. With "drill", dest
    is recorded in its directory's drill marker, so that cleaning up the
    test failover may remove it again."""
    from ..engine.restore import materialize_file  # the resync: not for every request

    req = P.parse_json(payload, "MATERIALIZE")
    replica = scope.place(req.get("replica"))
    steps = req.get("steps")
    if not isinstance(steps, list):
        raise P.ProtocolError("bad steps")
    method = req.get("method", "auto")
    if method not in ("auto", "reflink", "copy"):
        raise P.ProtocolError("bad method")
    steps = [_step_place(scope, p) for p in steps]
    dest = scope.place(req.get("dest"), create_dirs=True)
    if dest.name.endswith(_RESERVED) or names.is_sidecar(dest.rel) or names.STEPS + "/" in dest.rel:
        raise PermissionError(errno.EACCES, "pydr's own files are not made this way", dest.rel)
    if replica.confined:
        # the source and the steps are opened here, beneath DIR, and the
        # engine reads them through their fds: no name is looked up again
        base = f".{replica.name}{names.BASE}"
        source_name = base if replica.exists(base) else replica.name
        source = replica.proc_path(scope.hold(replica.open(os.O_RDONLY, name=source_name),
                                              replica.rel))
        steps = [s.proc_path(scope.hold(s.open(os.O_RDONLY), s.rel)) for s in steps]
        dest.check_sidecars(names.NEW, names.NEW + names.UNDO)
        st = dest.lstat()
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise UnsupportedFile("not a regular file: not replaced", path=dest.rel)
    else:
        source, steps = names.latest_state(replica.path), [s.path for s in steps]
    if req.get("drill"):
        if dest.exists():
            raise FileExistsError(errno.EEXIST, "a test failover does not overwrite files", dest.rel)
        if not drill_name_ok(dest.name):
            raise PermissionError(errno.EACCES, "a drill's disk needs a plain file name", dest.rel)
        fd = dest.open(os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600, name=DRILL_MARKER)
        with os.fdopen(fd, "ab") as f:
            f.write(os.fsencode(dest.name) + b"\n")
            f.flush()
            os.fsync(f.fileno())
    used = materialize_file(source, steps, dest.path, threads=default_threads(), method=method)
    ch.send_json(P.DONE, {"size": dest.lstat().st_size, "method": used})


def _rename(ch, payload, scope):
    """The two renames of a failover, and nothing else: REPLICA -> its
    baseline .REPLICA.pydr-base, and .REPLICA.pydr-new -> REPLICA. Beneath
    --root only a regular file with one link is renamed, and only over a
    regular file or nothing."""
    req = P.parse_json(payload, "RENAME")
    if not names.is_failover_rename(scope.name_of(req.get("src")), scope.name_of(req.get("dst"))):
        raise PermissionError(errno.EACCES, "not a rename a failover makes", req.get("src"))
    src, dst = scope.place(req.get("src")), scope.place(req.get("dst"))
    if not src.confined:
        os.replace(src.path, dst.path)
        fsync_dir(dst.path)
        ch.send_json(P.DONE, {})
        return
    st = src.lstat()
    if st is None:
        raise FileNotFoundError(errno.ENOENT, "no such file", src.rel)
    old = src.lstat(dst.name)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or \
            (old is not None and not stat.S_ISREG(old.st_mode)):
        raise UnsupportedFile("a failover renames regular files with one link only", path=src.rel)
    # one directory fd for both names: they cannot end up in two places
    os.rename(src.name, dst.name, src_dir_fd=src.dir_fd, dst_dir_fd=src.dir_fd)
    os.fsync(src.dir_fd)
    ch.send_json(P.DONE, {})


def _remove(ch, payload, scope):
    """Drop files pydr made: steps, baselines, half-made disks; or, with
    "drill": DIR, the disks a test failover wrote there (its marker lists
    them), then the marker and DIR if that leaves it empty. Only marker
    lines that are plain names are honoured."""
    req = P.parse_json(payload, "REMOVE")
    paths = req.get("paths")
    if not isinstance(paths, list):
        raise P.ProtocolError("bad paths")
    drill = req.get("drill")
    listed, drill_dir = None, None
    if drill is not None:
        drill = scope.place(drill)
        with contextlib.suppress(FileNotFoundError):  # removed by a run that was killed
            drill_dir = scope.hold(open_drill_dir(drill), drill.rel)
            listed = drill_listing(drill, drill_dir)
    places = []
    for p in paths:
        with contextlib.suppress(FileNotFoundError):  # its directory is gone: nothing to remove
            places.append(scope.place(p))
    listed = set() if listed is None else listed
    for place in places:
        in_drill = drill is not None and parent_rel(place) == drill.rel and place.name in listed
        never_written = drill is not None and parent_rel(place) == drill.rel \
            and drill_name_ok(place.name) and not place.exists()  # a drill cut off before it
        if not (in_drill or names.is_sidecar(place.rel) or never_written):
            raise PermissionError(errno.EACCES, "not a file pydr made", place.rel)
    places = [p for p in places if p.exists()]
    removed = 0
    for place in places:
        with contextlib.suppress(FileNotFoundError):
            place.unlink()
            removed += 1
    marked = drill_dir is not None and drill_listing(drill, drill_dir) is not None
    if marked and listed <= {p.name for p in places}:  # a directory no drill marked stays
        with contextlib.suppress(FileNotFoundError):
            if drill.confined:
                os.unlink(DRILL_MARKER, dir_fd=drill_dir)
            else:
                os.unlink(os.path.join(drill.path, DRILL_MARKER))
        with contextlib.suppress(OSError):
            if drill.confined:
                os.rmdir(drill.name, dir_fd=drill.dir_fd)
            else:
                os.rmdir(drill.path)
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


def _read(ch, payload, scope):
    """A file's bytes: STAT_OK with its size, BYTES frames, DONE."""
    req = P.parse_json(payload, "READ")
    place = scope.place(req.get("path"))
    with os.fdopen(place.open(os.O_RDONLY), "rb") as f:
        size, _ = B.fd_size(f.fileno(), place.path)
        ch.send_json(P.STAT_OK, {"exists": True, "size": size})
        total = 0
        while chunk := f.read(P.CHUNK):
            ch.send(P.BYTES, chunk)
            total += len(chunk)
    ch.send_json(P.DONE, {"size": total})


def _write(ch, payload, scope):
    """Replace a file with the client's BYTES frames, atomically: nothing
    changes unless END arrives (a dropped connection removes the temp file).
    pydr's own files beside a disk (journals, keep notes, temp files, drill
    markers) are not written this way."""

    req = P.parse_json(payload, "WRITE")
    place = scope.place(req.get("path"))
    name = os.path.basename(place.path)
    if name.endswith(_RESERVED) or names.STEPS + "/" in place.rel:
        raise PermissionError(errno.EACCES, "pydr's own files are not written this way", place.rel)
    st = place.lstat()
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", place.rel)
    with atomic_write(place.path, through=False) as f:  # its temp file is never opened through a link
        ch.send_json(P.STAT_OK, {"exists": True, "size": 0})  # the client may stream now
        reader = P.ChunkReader(_stream_in(ch), place.rel)
        while chunk := reader.read(P.CHUNK):
            f.write(chunk)
    ch.send_json(P.DONE, {"size": reader.position})


def _patch(ch, payload, scope):
    """`pydr apply DELTA host:TARGET`: the delta arrives as BYTES frames and
    is applied exactly as a local apply (journal, base checks, rollback)."""
    from ..engine.apply import apply_delta  # the apply: only for this request

    req = P.parse_json(payload, "PATCH")
    place = scope.place(req.get("path"))
    reader = P.ChunkReader(_stream_in(ch), str(req.get("name") or "<delta>"))
    try:
        place.check_sidecars(*JOURNAL_SIDECARS)
        if place.confined:
            dev, _ = place.device(write=True)
            with dev:
                st = apply_delta(reader, dev, verify=bool(req.get("verify")))
        else:
            st = apply_delta(reader, place.path, verify=bool(req.get("verify")))
    except P.ProtocolError:
        raise
    except BaseException:
        _drain(reader)
        raise
    ch.send_json(P.APPLY_OK, st._asdict())


def _delta(ch, payload, scope):
    """`pydr delta host:SOURCE ...`: the base's signature arrives as BYTES
    frames; the delta goes back as BYTES frames, then DONE with its stats."""
    from ..engine.delta import make_delta  # only for this request

    req = P.parse_json(payload, "DELTA")
    place = scope.place(req.get("path"))
    name = str(req.get("name") or "<signature>")
    reader = P.ChunkReader(_stream_in(ch), name)
    try:
        base = Signature._read(reader, name)
        if not reader.at_end():
            raise P.ProtocolError(f"data after the end of the signature {name}")
        if not place.exists():
            raise FileNotFoundError(errno.ENOENT, "source image not found", place.rel)
        source = place.proc_path(scope.hold(place.open(os.O_RDONLY), place.rel)) \
            if place.confined else place.path
    except P.ProtocolError:
        raise
    except BaseException:
        _drain(reader)
        raise
    st = make_delta(source, P.ChunkWriter(ch.send), against=base, threads=default_threads())
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

"""A hostile peer against `pydr serve --stdio --root DIR`: every request
type with "..", absolute paths, symlinks and hard links made before and
during a request, keep notes and drill markers that point out, devices and
FIFOs. Nothing outside DIR may be read, created, changed or named: a
sentinel tree beside DIR is compared before and after (contents, mtimes,
listing), and no error text holds DIR's absolute path.

The server runs as a subprocess (the installed `pydr`), once with openat2
and once with the O_NOFOLLOW walk it falls back to (PYDR_BENEATH=walk).
"During a request" is made deterministic by the protocol's own order (the
peer acts between the server's STAT_OK and its next frame) or by a hook
around the confined open in an in-process server, never by sleeping.
"""

import io
import json
import os
import stat
import subprocess

import pytest

from pydr.engine import beneath
from pydr.engine import bindings as B
from pydr.engine import journal as J
from pydr.errors import InvalidState
from pydr.transport import protocol as P
from pydr.transport.server import serve

from conftest import PYDR

SECRET = b"outside secret\n" * 300


@pytest.fixture(params=["openat2", "walk"])
def site(request, tmp_path):
    """DIR (tmp/root) with a replica, and a sentinel tree beside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.img").write_bytes(SECRET)
    (outside / "sub" / "victim.img").write_bytes(SECRET[:4096])
    (root / "disk.img").write_bytes(bytes(range(256)) * 64)
    env = dict(os.environ, PYDR_BENEATH="walk" if request.param == "walk" else "")
    before = snapshot(tmp_path, root)
    yield {"root": root, "outside": outside, "tmp": tmp_path, "env": env}
    assert snapshot(tmp_path, root) == before, "something outside DIR changed"


def snapshot(tmp, root):
    """Every path under `tmp` but DIR: kind, contents, mtime, mode."""
    out = {}
    for dirpath, dirs, files in os.walk(tmp):
        if os.path.realpath(dirpath).startswith(os.path.realpath(root)):
            dirs[:] = []
            continue
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            if os.path.realpath(path) == os.path.realpath(root):
                continue
            st = os.lstat(path)
            data = open(path, "rb").read() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(path, tmp)] = (st.st_mode, st.st_mtime_ns, st.st_size, data)
    return out


class Peer:
    """A protocol client of a `pydr serve --stdio --root DIR` subprocess."""

    def __init__(self, site):
        self.root = site["root"]
        self.proc = subprocess.Popen([PYDR, "serve", "--stdio", "--root", str(self.root)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=site["env"], cwd=site["tmp"])
        self.ch = P.Channel(self.proc.stdout, self.proc.stdin)
        self.ch.send_json(P.HELLO, {"protocol": P.VERSION})
        assert self.ch.recv()[0] == P.HELLO
        self.errors = []

    def request(self, ftype, body):
        self.ch.send_json(ftype, body)

    def reply(self):
        """(frame type, JSON or bytes) of the next frame; ERROR texts are
        checked for DIR's absolute path."""
        ftype, payload = self.ch.recv()
        if ftype == P.ERROR:
            info = json.loads(payload)
            self.errors.append(info)
            for real in {str(self.root), os.path.realpath(self.root)}:
                assert real not in json.dumps(info), info
            return ftype, info
        return ftype, (json.loads(payload) if ftype not in P.BINARY else payload)

    def ask(self, ftype, body):
        """Send a request (and, for PATCH and DELTA, a stream: an empty
        delta, a signature of 64 KiB of zeros); frames up to the last
        (DONE, APPLY_OK, ERROR)."""
        self.request(ftype, body)
        if ftype == P.DELTA:
            from pydr.engine.signatures import signature

            zeros = self.root.parent / "zeros"
            zeros.write_bytes(bytes(64 << 10))
            try:
                signature(zeros, algorithm="xxh3-128")._write(P.ChunkWriter(self.ch.send))
            finally:
                zeros.unlink()
        if ftype in (P.PATCH, P.DELTA):
            self.ch.send(P.END)
        frames = []
        while True:
            frames.append(self.reply())
            if frames[-1][0] in (P.DONE, P.APPLY_OK, P.ERROR) or \
                    (ftype == P.STAT and frames[-1][0] == P.STAT_OK):
                return frames

    def write(self, path, data, between=None):
        """WRITE `data` to `path`; `between()` runs after the server opened
        its temp file (STAT_OK), before any byte is sent."""
        self.request(P.WRITE, {"path": path})
        ftype, info = self.reply()
        if ftype == P.ERROR:
            return ftype, info
        if between is not None:
            between()
        self.ch.send(P.BYTES, data)
        self.ch.send(P.END)
        return self.reply()

    def apply(self, path, size, keep_undo=None):
        """An APPLY that sends no records (the target keeps its bytes)."""
        body = {"path": path, "block_size": 4096, "result_size": size}
        if keep_undo is not None:
            body["keep_undo"] = keep_undo
        self.request(P.APPLY, body)
        ftype, info = self.reply()
        if ftype == P.ERROR:
            return ftype, info
        self.ch.send(P.END)
        return self.reply()

    def close(self):
        self.proc.stdin.close()
        assert self.proc.wait() == 0, self.proc.stderr.read()


@pytest.fixture
def peer(site):
    p = Peer(site)
    yield p
    p.close()


def refused(frames, *words):
    ftype, info = frames[-1] if isinstance(frames, list) else frames
    assert ftype == P.ERROR, frames
    text = json.dumps(info)
    assert any(w in text for w in words), info
    return info


ESCAPES = ["../outside/secret.img", "/etc/passwd", "out/../../outside/secret.img"]


def _escape_requests(site, path):
    o = str(site["outside"] / "secret.img")
    return [
        (P.STAT, {"path": path, "source": True}),
        (P.READ, {"path": path}),
        (P.SIGN, {"path": path, "block_size": 4096}),
        (P.SEND, {"path": path, "block_size": 4096}),
        (P.APPLY, {"path": path, "block_size": 4096, "result_size": 0}),
        (P.APPLY, {"path": "disk.img", "block_size": 4096, "result_size": 0,
                   "keep_undo": path}),
        (P.PATCH, {"path": path}),
        (P.DELTA, {"path": path}),
        (P.MATERIALIZE, {"replica": path, "steps": [], "dest": "m.img"}),
        (P.MATERIALIZE, {"replica": "disk.img", "steps": [], "dest": path}),
        (P.MATERIALIZE, {"replica": "disk.img", "steps": [path], "dest": "m.img"}),
        (P.REMOVE, {"paths": [path]}),
        (P.REMOVE, {"paths": [], "drill": path}),
        (P.RENAME, {"src": path, "dst": o}),
        (P.RENAME, {"src": "disk.img", "dst": path}),
    ]


@pytest.mark.parametrize("path", ESCAPES + ["escape/secret.img", "link.img"])
def test_every_request_refuses_paths_out_of_dir(site, path):
    """"..", absolute paths elsewhere, and symlinks (a directory and a
    file) made before the request: every request type is refused."""
    os.symlink(site["outside"], site["root"] / "escape")
    os.symlink(site["outside"] / "secret.img", site["root"] / "link.img")
    for ftype, body in _escape_requests(site, path):
        p = Peer(site)  # some refusals end the connection (the stream left unread)
        frames = p.ask(ftype, body)
        info = refused(frames, "outside", "symlink", "not a", "Permission", "No such")
        assert "secret" not in json.dumps([f for f in frames if f[0] != P.ERROR]), (ftype, frames)
        p.proc.stdin.close()
        p.proc.wait()
        assert info.get("class") != "ProtocolError" or ftype in (P.PATCH, P.DELTA), info
    assert not (site["root"] / "m.img").exists()
    p = Peer(site)
    if path == "link.img":  # WRITE replaces the link itself, never what it points to
        assert p.write(path, b"mine")[0] == P.DONE
        assert (site["root"] / "link.img").read_bytes() == b"mine"
    else:
        refused(p.write(path, b"mine"), "outside", "symlink")
    p.close()


def test_keep_note_pointing_out_is_not_followed(peer, site):
    """Finding 1: a committed journal and a keep note naming a place out of
    the replica's steps: STAT (source) and APPLY refuse, naming the note;
    the journal stays (nothing is lost); nothing is created outside."""
    root = site["root"]
    journal = _committed_journal(root / ".x.pydr-undo")
    # a peer can no longer WRITE pydr's own files ...
    refused(peer.write(".x.pydr-undo", journal), "pydr's own files")
    refused(peer.write(".x.pydr-undo.keep", b"/any/path"), "pydr's own files")
    (root / "x").write_bytes(b"\0" * 8192)
    for note in (str(site["outside"] / "planted" / "x.undo"), "../outside/x.undo",
                 ".x.pydr-steps/../../outside/x.undo", ".x.pydr-steps/a/b.undo",
                 ".y.pydr-steps/x.undo"):
        # ... but someone who can write to DIR may have made them
        (root / ".x.pydr-undo").write_bytes(journal)
        (root / ".x.pydr-undo.keep").write_text(note)
        info = refused(peer.ask(P.STAT, {"path": "x", "source": True}), "keep note")
        assert info["path"] == ".x.pydr-undo.keep", info
        refused(peer.apply("x", 8192), "keep note")
        assert (root / ".x.pydr-undo").read_bytes() == journal
    assert not (site["outside"] / "planted").exists()
    # the one form it honours: a step in the replica's own steps directory
    (root / ".x.pydr-undo.keep").write_text(".x.pydr-steps/vm-0-1.undo")
    assert peer.ask(P.STAT, {"path": "x", "source": True})[-1][1]["exists"]
    assert (root / ".x.pydr-steps" / "vm-0-1.undo").read_bytes() == journal
    assert not (root / ".x.pydr-undo").exists() and not (root / ".x.pydr-undo.keep").exists()


def test_keep_note_steps_dir_symlink_is_not_followed(peer, site):
    """A note of the honoured form, but .x.pydr-steps is a symlink out."""
    root = site["root"]
    (root / "x").write_bytes(b"\0" * 8192)
    journal = _committed_journal(root / ".x.pydr-undo")
    (root / ".x.pydr-undo").write_bytes(journal)
    (root / ".x.pydr-undo.keep").write_text(".x.pydr-steps/vm-0-1.undo")
    os.symlink(site["outside"] / "sub", root / ".x.pydr-steps")
    refused(peer.ask(P.STAT, {"path": "x", "source": True}), "symlink")
    assert (root / ".x.pydr-undo").read_bytes() == journal


def test_local_keep_note_is_followed_only_where_steps_go(tmp_path):
    """The local (non-serve) path: root's pydr settling a committed journal
    in a replica directory others may write to follows a note only into
    .REPLICA.pydr-steps/ or to the step the caller offers."""
    replicas, vault = tmp_path / "replicas", tmp_path / "vault" / "undo" / "vm"
    replicas.mkdir()
    target = replicas / "disk.img"
    target.write_bytes(b"\0" * 4096)
    journal = _committed_journal(replicas / ".disk.img.pydr-undo")
    (replicas / ".disk.img.pydr-undo").write_bytes(journal)
    evil = tmp_path / "etc" / "cron.d" / "job"
    (replicas / ".disk.img.pydr-undo.keep").write_text(str(evil))
    with pytest.raises(InvalidState, match="keep note") as exc:
        J.pending_journal(target)
    assert exc.value.path.endswith(".disk.img.pydr-undo.keep")
    with pytest.raises(InvalidState):
        J.pending_journal(target, allowed=[str(vault / "0-2.undo")])
    assert not evil.parent.exists() and (replicas / ".disk.img.pydr-undo").exists()
    # the step the vault offers now: honoured (a kill after COMMIT, before the move)
    (replicas / ".disk.img.pydr-undo.keep").write_text(str(vault / "0-1.undo"))
    assert J.pending_journal(target, allowed=[str(vault / "0-1.undo")]) is None
    assert (vault / "0-1.undo").read_bytes() == journal
    # a note written now is relative to the replica's directory where it can be
    J.write_keep_note(target, replicas / ".disk.img.pydr-steps" / "vm-0-3.undo")
    assert (replicas / ".disk.img.pydr-undo.keep").read_text() == ".disk.img.pydr-steps/vm-0-3.undo"


def test_new_symlink_is_not_written_through(peer, site):
    """Finding 2: a .x.pydr-new symlink (made before the request) does not
    let WRITE overwrite the file it points to."""
    root = site["root"]
    os.symlink(site["outside"] / "secret.img", root / ".x.img.pydr-new")
    frames = peer.write("x.img", b"hostile" * 100)
    refused(frames, "symlink", "Too many levels", "not a regular")
    assert not (root / "x.img").exists()


def test_write_target_swapped_for_a_symlink_during_the_request(peer, site):
    """A symlink put where the file was while the bytes stream in: the
    rename replaces the link, it never writes through it."""
    root = site["root"]
    (root / "x.img").write_bytes(b"old")

    def swap():
        os.unlink(root / "x.img")
        os.symlink(site["outside"] / "secret.img", root / "x.img")

    assert peer.write("x.img", b"new bytes", between=swap)[0] == P.DONE
    assert not os.path.islink(root / "x.img") and (root / "x.img").read_bytes() == b"new bytes"


def test_base_symlink_is_not_materialized(peer, site):
    """Finding 2: a .R.pydr-base symlink out: MATERIALIZE refuses, and READ
    of its dest returns no outside byte."""
    root = site["root"]
    os.symlink(site["outside"] / "secret.img", root / ".disk.img.pydr-base")
    refused(peer.ask(P.MATERIALIZE, {"replica": "disk.img", "steps": [], "dest": "m.img"}),
            "symlink")
    refused(peer.ask(P.READ, {"path": "m.img"}), "No such")
    assert not (root / "m.img").exists()


def test_drill_marker_symlink_is_not_appended_through(peer, site):
    root = site["root"]
    (root / "d").mkdir()
    os.symlink(site["outside"] / "secret.img", root / "d" / ".pydr-drill")
    refused(peer.ask(P.MATERIALIZE, {"replica": "disk.img", "steps": [], "dest": "d/m.img",
                                     "drill": True}), "symlink")


def test_drill_marker_holds_plain_names_only(peer, site):
    """A newline in a drill disk's name would put a second line into the
    marker that REMOVE honours: refused; and a planted marker's lines that
    are not plain names are ignored."""
    root = site["root"]
    (root / "d").mkdir()
    (root / "d" / "victim.img").write_bytes(b"keep me")
    refused(peer.ask(P.MATERIALIZE, {"replica": "disk.img", "steps": [],
                                     "dest": "d/evil\nvictim.img", "drill": True}), "plain")
    assert not (root / "d" / ".pydr-drill").exists()
    refused(peer.ask(P.REMOVE, {"paths": ["d/victim.img"], "drill": "d"}), "not a file pydr made")
    (root / "d" / ".pydr-drill").write_text("../disk.img\nvictim.img\x1b\n")
    refused(peer.ask(P.REMOVE, {"paths": ["d/victim.img\x1b"], "drill": "d"}),
            "not a file pydr made")
    assert (root / "d" / "victim.img").read_bytes() == b"keep me"
    # a real drill disk is listed and removed
    assert peer.ask(P.MATERIALIZE, {"replica": "disk.img", "steps": [], "dest": "d/m.img",
                                    "drill": True})[-1][0] == P.DONE
    assert peer.ask(P.REMOVE, {"paths": ["d/m.img"], "drill": "d"})[-1][1] == {"removed": 1}


def test_hard_links_are_refused(peer, site):
    """Finding 2: a hard link to an outside file is neither read nor
    written through."""
    root = site["root"]
    os.link(site["outside"] / "secret.img", root / "hard.img")
    refused(peer.ask(P.READ, {"path": "hard.img"}), "hard link")
    refused(peer.ask(P.SIGN, {"path": "hard.img", "block_size": 4096}), "hard link")
    refused(peer.apply("hard.img", 4096), "hard link")
    refused(peer.ask(P.RENAME, {"src": "hard.img", "dst": ".hard.img.pydr-base"}), "one link")
    os.link(site["outside"] / "sub" / "victim.img", root / ".x.img.pydr-new")
    refused(peer.write("x.img", b"through the link?"), "one link")


def test_rename_renames_regular_files_only(peer, site):
    root = site["root"]
    (root / "vm").mkdir()
    (root / "vm" / "inside").write_bytes(b"x")
    refused(peer.ask(P.RENAME, {"src": "vm", "dst": ".vm.pydr-base"}), "regular files")
    (root / ".r.pydr-base").mkdir()
    (root / "r").write_bytes(b"r")
    refused(peer.ask(P.RENAME, {"src": "r", "dst": ".r.pydr-base"}), "regular files")
    assert (root / "vm" / "inside").exists() and (root / "r").read_bytes() == b"r"
    (root / "s").write_bytes(b"s")
    assert peer.ask(P.RENAME, {"src": "s", "dst": ".s.pydr-base"})[-1][0] == P.DONE
    assert (root / ".s.pydr-base").read_bytes() == b"s"


def test_fifos_and_devices_are_refused_without_blocking(peer, site):
    root = site["root"]
    os.mkfifo(root / "fifo.img")
    os.mknod(root / "null.img", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    for name in ("fifo.img", "null.img"):
        refused(peer.ask(P.STAT, {"path": name}), "not a regular file")
        refused(peer.ask(P.READ, {"path": name}), "not a regular file")
        refused(peer.ask(P.SIGN, {"path": name, "block_size": 4096}), "not a regular file")
        refused(peer.apply(name, 0), "not a regular file")
    os.mkfifo(root / ".disk.img.pydr-undo")  # a journal the engine would open by name
    refused(peer.apply("disk.img", 16384), "not a regular file")


def test_errors_name_paths_relative_to_dir(peer, site):
    """No error frame carries DIR's absolute path (Peer.reply checks each);
    they name the file relative to DIR."""
    (site["root"] / "sub").mkdir()
    info = refused(peer.ask(P.READ, {"path": "sub/missing.img"}), "No such")
    assert info["path"] == "sub/missing.img"
    info = refused(peer.ask(P.SIGN, {"path": str(site["root"] / "sub" / "missing.img"),
                                     "block_size": 4096}), "No such")
    assert info["path"] == "sub/missing.img"
    os.mkfifo(site["root"] / "sub" / ".d.img.pydr-undo")
    (site["root"] / "sub" / "d.img").write_bytes(b"d")
    info = refused(peer.ask(P.STAT, {"path": "sub/d.img", "source": True}), "not a regular")
    assert info["path"] == "sub/.d.img.pydr-undo"
    assert len(peer.errors) == 3


def _in_process(root, ftype, body):
    payload = json.dumps(body).encode()
    out = io.BytesIO()
    serve(io.BytesIO(_hello() + P.HEADER.pack(len(payload), ftype, 0) + payload), out,
          root=str(root))
    data, pos, frames = out.getvalue(), 0, []
    while pos < len(data):
        length, t, _ = P.HEADER.unpack_from(data, pos)
        frames.append((t, data[pos + P.HEADER.size:pos + P.HEADER.size + length]))
        pos += P.HEADER.size + length
    return frames[1:]


def _hello():
    body = json.dumps({"protocol": P.VERSION}).encode()
    return P.HEADER.pack(len(body), P.HELLO, 0) + body


@pytest.mark.parametrize("swap", ["file", "directory"])
@pytest.mark.parametrize("ftype", [P.READ, P.SEND, P.SIGN])
def test_swapped_for_a_symlink_between_directory_and_file(tmp_path, monkeypatch, swap, ftype):
    """Finding 2: the file (or its directory) is swapped for a symlink out
    after the server opened the directory, before it opens the file (a hook
    around the open puts the attacker exactly there): the pull returns no
    outside byte."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "vm").mkdir(parents=True)
    outside.mkdir()
    (outside / "disk.img").write_bytes(SECRET)
    (root / "vm" / "disk.img").write_bytes(b"\1" * 4096)
    real_open = beneath.open_file

    def attacker_then_open(dir_fd, rel, *args, **kw):
        if swap == "file":
            os.unlink(root / "vm" / "disk.img")
            os.symlink(outside / "disk.img", root / "vm" / "disk.img")
        else:
            os.rename(root / "vm", root / "vm.old")
            os.symlink(outside, root / "vm")
        return real_open(dir_fd, rel, *args, **kw)

    monkeypatch.setattr(beneath, "open_file", attacker_then_open)
    frames = _in_process(root, ftype, {"path": "vm/disk.img", "block_size": 4096})
    assert SECRET[:64] not in b"".join(f[1] for f in frames)
    if swap == "file":
        assert frames[-1][0] == P.ERROR and b"symlink" in frames[-1][1]
    else:  # the directory opened first is the one read: the moved one
        assert frames[-1][0] != P.ERROR or ftype == P.SEND, frames[-1]


@pytest.mark.parametrize("mode", ["openat2", "walk"])
def test_beneath_refuses_every_way_out(tmp_path, monkeypatch, mode):
    """The engine module on its own, both ways: "..", absolute paths,
    symlinks (final or on the way), hard links, FIFOs, directories."""
    monkeypatch.setattr(beneath, "_openat2", None if mode == "openat2" else False)
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_bytes(b"f")
    os.symlink("/etc", tmp_path / "d" / "up")
    os.symlink("e/f", tmp_path / "d" / "rel")
    os.link(tmp_path / "d" / "e" / "f", tmp_path / "d" / "hard")
    os.mkfifo(tmp_path / "d" / "fifo")
    top = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = beneath.open_beneath(top, "e/f", os.O_RDONLY)
        assert os.read(fd, 1) == b"f"
        os.close(fd)
        if mode == "openat2":
            assert beneath._openat2 is True  # this kernel has it: the openat2 path ran
        for rel in ("../d/e/f", "/etc/passwd", "up/passwd", "rel", "e/../e/f"):
            with pytest.raises(PermissionError):
                beneath.open_beneath(top, rel, os.O_RDONLY)
        with pytest.raises(PermissionError, match="hard links"):
            beneath.open_file(top, "hard", os.O_RDONLY)
        with pytest.raises(Exception, match="not a regular file"):
            beneath.open_file(top, "fifo", os.O_RDONLY)
        with pytest.raises(IsADirectoryError):
            beneath.open_file(top, "e", os.O_RDONLY)
        with pytest.raises(PermissionError):
            beneath.open_dir(top, "up/x", create=True)
        fd = beneath.open_dir(top, "new/deeper", create=True)
        os.close(fd)
        assert (tmp_path / "d" / "new" / "deeper").is_dir()
        assert not os.path.exists("/etc/x")
    finally:
        os.close(top)


def _committed_journal(path):
    """The bytes of a committed undo journal (a header, one record, COMMIT)."""
    header = J.pack_header(J.KIND_RESYNC, 4096, 4096, 4096)
    payload = b"\0" * 4096
    rec = B.record_build(B.DATA, 0, 4096, seq=0,
                         payload_hash=B.hash_bytes(B.ALGORITHMS["xxh3-64"], payload)[0]) + payload
    data = header + rec + B.record_build(B.COMMIT)
    path.write_bytes(data)
    assert J.read_journal(path) == (J.parse_header(data, path), True)
    os.unlink(path)
    return data


def test_drill_cleanup_run_again_after_its_directory_went(peer, site):
    """"Run the same command again": a drill's cleanup killed after it
    removed the directory is asked again, and succeeds with nothing to do."""
    root = site["root"]
    assert peer.ask(P.MATERIALIZE, {"replica": "disk.img", "steps": [], "dest": "d/m.img",
                                    "drill": True})[-1][0] == P.DONE
    assert (root / "d" / ".pydr-drill").read_text() == "m.img\n"
    for removed in (1, 0):
        frames = peer.ask(P.REMOVE, {"paths": ["d/m.img", "d/.m.img.pydr-new"], "drill": "d"})
        assert frames[-1] == (P.DONE, {"removed": removed}), frames
        assert not (root / "d").exists()


def test_apply_keeps_its_step_only_in_its_own_steps_directory(peer, site):
    """keep_undo beneath --root: only .TARGET.pydr-steps/NAME.undo beside the
    target, a real directory (not a symlink out); there the step is kept."""
    root, size = site["root"], 16384
    refused(peer.apply("disk.img", size, keep_undo=".other.img.pydr-steps/vm-0-1.undo"),
            "recovery-point step beside")
    os.symlink(site["outside"] / "sub", root / ".disk.img.pydr-steps")
    refused(peer.apply("disk.img", size, keep_undo=".disk.img.pydr-steps/vm-0-1.undo"),
            "symlink")
    os.unlink(root / ".disk.img.pydr-steps")
    ftype, info = peer.apply("disk.img", size, keep_undo=[".disk.img.pydr-steps/vm-0-1.undo"])
    assert ftype == P.APPLY_OK, info
    assert J.read_journal(root / ".disk.img.pydr-steps" / "vm-0-1.undo")[1]  # committed
    assert not (root / ".disk.img.pydr-undo").exists()
    assert not (root / ".disk.img.pydr-undo.keep").exists()


# -- found by an adversarial review after the suite above was written ---------------------------
def test_stat_of_a_file_in_a_directory_not_made_yet_says_it_is_not_there(peer, site):
    """A drill into a new directory asks first: the answer is "not there",
    not an error that wedges the drill."""
    frames = peer.ask(P.STAT, {"path": "new/dir/disk.img"})
    assert frames[-1] == (P.STAT_OK, {"exists": False, "size": 0}), frames
    assert not (site["root"] / "new").exists()


def test_materialize_never_makes_pydrs_own_files(peer, site):
    """A forged drill marker (or journal, keep note, step) made by
    MATERIALIZE would let REMOVE delete a replica: refused."""
    for dest in ("d/.pydr-drill", "d/.x.pydr-undo", "d/.x.pydr-undo.keep", "d/.x.pydr-base",
                 "d/.x.pydr-new", "d/.x.pydr-steps/1.undo"):
        refused(peer.ask(P.MATERIALIZE, {"replica": "disk.img", "steps": [], "dest": dest}),
                "pydr's own files")
    assert not (site["root"] / "d" / ".pydr-drill").exists()


def test_remove_of_a_drill_that_wrote_nothing_and_of_an_unmarked_directory(peer, site):
    """A drill cut off before its first disk is cleaned up (its disks are
    not there: nothing to remove); a directory no drill marked is never
    removed, empty or not."""
    root = site["root"]
    (root / "empty").mkdir()
    frames = peer.ask(P.REMOVE, {"paths": ["empty/os.img"], "drill": "empty"})
    assert frames[-1] == (P.DONE, {"removed": 0}), frames
    assert (root / "empty").is_dir()


def test_a_deeply_nested_hello_is_a_protocol_error_not_a_crash(site):
    proc = subprocess.Popen([PYDR, "serve", "--stdio", "--root", str(site["root"])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=site["env"])
    ch = P.Channel(proc.stdout, proc.stdin)
    ch.send(P.HELLO, b"[" * 100000 + b"]" * 100000)
    proc.stdin.close()
    assert proc.wait() == 18, proc.stderr.read()
    assert b"internal error" not in proc.stderr.read()


def test_a_signature_header_claiming_a_gigabyte_costs_no_gigabyte(site):
    """A DELTA request's streamed signature: the buffer grows with the bytes
    that arrive, not with what the 64-byte header claims."""
    import struct

    from pydr.engine import signatures as S

    n = 60_000_000  # 960 MiB of hashes claimed, none sent
    fields = S._HEADER.pack(S.MAGIC, S.VERSION, B.ALGORITHMS["xxh3-128"], 4096, n * 4096, n, 0, 0, 0)
    header = fields + struct.pack("<Q", B.hash_bytes(B.ALGORITHMS["xxh3-64"], fields)[0])
    p = Peer(site)
    p.request(P.DELTA, {"path": "disk.img", "name": "sig"})
    p.ch.send(P.BYTES, header)
    p.ch.send(P.END)
    refused(p.reply(), "truncated")
    with open(f"/proc/{p.proc.pid}/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    assert peak < 300_000, f"peak {peak} KiB"  # a Python process with the engine: ~100 MiB
    p.close()

"""QEMU's own tools, driven by pydr: a qemu-nbd child serving a disk image
on a private unix socket (it dies with pydr, even on SIGKILL), qemu-img for
images and persistent dirty bitmaps, and a QMP client for a running QEMU or
qemu-storage-daemon (docs/QEMU.md)."""

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time

from ..engine.atomic import create_file
from ..errors import FormatError, PydrError, TrackingLost, UnsupportedFile

FORMATS = ("qcow2", "vmdk", "vhdx", "vpc", "vdi")
EXTENSIONS = {".qcow2": "qcow2", ".qcow": "qcow2", ".vmdk": "vmdk", ".vhdx": "vhdx",
              ".vhd": "vpc", ".vpc": "vpc", ".vdi": "vdi"}
START_TIMEOUT = 20.0  # seconds a qemu-nbd may take to listen (it is killed after)


def _pause(waited):
    """Sleep between two looks at something QEMU is about to do: 1 ms for
    the first 50 looks (it usually takes a few: a cycle of a service waits
    for it), then 5 ms. Returns `waited` + 1."""
    time.sleep(0.001 if waited < 50 else 0.005)
    return waited + 1


class QemuError(PydrError, RuntimeError):
    """A QEMU tool refused what pydr asked (its own message is included)."""

    exit_code = 5


def detect_format(path):
    """The QEMU format of a disk image file, from its magic ("raw" when it
    has none); for a file that does not exist yet, from its extension."""
    import stat

    try:
        # O_NONBLOCK: a FIFO must not wait for a writer (the engine refuses it)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode) and not stat.S_ISBLK(os.fstat(fd).st_mode):
                return "raw"
            head = f.read(512)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 512))
            tail = f.read(512)
    except FileNotFoundError:
        return EXTENSIONS.get(os.path.splitext(path)[1].lower(), "raw")
    except (IsADirectoryError, PermissionError, OSError):
        return "raw"  # let the engine name the problem
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:4] == b"KDMV" or head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:8] == b"conectix" or (size >= 512 and tail[:8] == b"conectix"):
        return "vpc"  # dynamic VHDs start with the footer's copy, fixed ones end with it
    if head[0x40:0x44] == b"\x7f\x10\xda\xbe":
        return "vdi"
    return "raw"


def tool(name, package="qemu-utils"):
    path = shutil.which(name)
    if path is None:
        raise UnsupportedFile(f"{name} is not installed", path=name,
                              hint=f"install {package} (Debian: apt-get install "
                                   f"--no-install-recommends {package})")
    return path


def _last_line(text):
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def qemu_img(*args, path=None):
    """Run qemu-img; QemuError with its own last line if it fails."""
    r = subprocess.run([tool("qemu-img"), *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise QemuError(f"qemu-img {args[0]} failed: {_last_line(r.stderr or r.stdout)}",
                        path=path)
    return r.stdout


def image_info(path, fmt=None):
    out = qemu_img("info", "--output=json", "-U", *(["-f", fmt] if fmt else []), path, path=path)
    return json.loads(out)


def bitmaps(path):
    """{name: flags} of the persistent dirty bitmaps of a qcow2 image."""
    return bitmaps_of(image_info(path, "qcow2"))


def bitmaps_of(info):
    """{name: flags} of the persistent dirty bitmaps in a qcow2 image's
    `qemu-img info` (image_info)."""
    found = (info.get("format-specific", {}).get("data", {}) or {}).get("bitmaps", []) or []
    return {b["name"]: list(b.get("flags", [])) for b in found}


def _die_with_parent():
    """A preexec_fn: the child gets SIGTERM when pydr dies. prctl is found
    here, in pydr, once: the child, between fork and exec, only calls it
    (importing ctypes there cost every qemu-nbd start ~10 ms)."""
    global _PRCTL
    if _PRCTL is None:
        import ctypes

        _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
    prctl = _PRCTL
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_PRCTL = None


class QemuNbd:
    """A qemu-nbd serving `path` (in `fmt`) on a private unix socket, as a
    child of this process: stopped by close(), and by the kernel if pydr
    dies. ``bitmap``: a persistent dirty bitmap exported with it."""

    def __init__(self, path, fmt, *, read_only=True, bitmap=None):
        self.path = os.fspath(path)
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="pydr-qemu-")
        self.socket = os.path.join(self.dir, "nbd.sock")
        # writes are made durable by NBD flushes (pydr flushes before it commits)
        cmd = [tool("qemu-nbd"), "--format", fmt, "--socket", self.socket, "--shared", "8",
               "--cache", "writeback"]
        cmd += ["--read-only"] if read_only else ["--discard", "unmap"]
        if bitmap:
            cmd += ["--bitmap", bitmap]
        cmd.append(self.path)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, preexec_fn=_die_with_parent())
        self.fmt, self.bitmap = fmt, bitmap
        deadline = time.monotonic() + START_TIMEOUT
        waited = 0
        while not os.path.exists(self.socket):
            self.check()
            if time.monotonic() > deadline:
                self.close()
                raise QemuError(f"qemu-nbd did not listen within {START_TIMEOUT:.0f} s",
                                path=self.path)
            waited = _pause(waited)

    def check(self):
        """Raise what made qemu-nbd exit (it may listen first and then fail to
        open the image), if it did."""
        if self.proc.poll() is None:
            return
        err = _last_line(self.proc.stderr.read().decode(errors="replace"))
        self.close()
        if self.bitmap and "itmap" in err:
            raise TrackingLost(f"qemu-nbd cannot export the dirty bitmap {self.bitmap}: {err}",
                               path=self.path)
        raise FormatError(f"qemu-nbd could not open it as {self.fmt}: {err}", path=self.path)

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.socket}"

    def connect(self, opener):
        """opener(uri), retried while the socket refuses: its file exists
        from bind() on, before qemu-nbd listens. What made qemu-nbd exit,
        if it did, is raised instead of "connection refused"."""
        deadline = time.monotonic() + START_TIMEOUT
        waited = 0
        while True:
            try:
                return opener(self.uri)
            except ConnectionRefusedError:
                self.check()
                if time.monotonic() > deadline:
                    raise
                waited = _pause(waited)
            except (OSError, PydrError):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=1)  # exiting? then say why
                self.check()
                raise

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def socket_identity(path):
    """(device, inode) of a unix socket file, or None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class QmpError(QemuError):
    """QEMU answered a QMP command with an error."""


class Qmp:
    """A QMP connection to a running QEMU or qemu-storage-daemon."""

    def __init__(self, path, timeout=60):
        self.path = path
        self.file = None
        # the socket file it connects through (taken first: a restarted QEMU binds a new one)
        self.socket_identity = socket_identity(path)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise ConnectionRefusedError(exc.errno, f"QMP socket refuses: {exc.strerror}",
                                         path) from None
        self.file = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def alive(self):
        """Whether this connection can be used again: its socket file is the
        one it connected through (a restarted QEMU or qemu-storage-daemon
        binds a new one) and QEMU has not closed it. Events waiting on it
        are fine (execute() skips them)."""
        import select

        if self.file is None or socket_identity(self.path) != self.socket_identity:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            # readable with nothing to read: QEMU closed it (events are read by execute)
            return not readable or bool(self.sock.recv(1, socket.MSG_PEEK))
        except OSError:
            return False

    def _read(self):
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionResetError(f"QMP connection closed by {self.path}")
            msg = json.loads(line)
            if "event" not in msg:  # events are not answers
                return msg

    def execute(self, command, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise QmpError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}",
                           path=self.path)
        return reply.get("return")

    def transaction(self, actions):
        """Several QMP actions at once: all of them or none (QEMU's own)."""
        return self.execute("transaction", actions=[{"type": t, "data": d} for t, d in actions])

    def close(self):
        with contextlib.suppress(OSError):
            if self.file is not None:
                self.file.close()
            self.sock.close()
        self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Fleece:
    """A point-in-time view of the block node `node` of a running QEMU (or
    qemu-storage-daemon), exported over NBD on a private unix socket, as
    libvirt's pull-mode backup does: a scratch qcow2 overlay over the node,
    filled by a "blockdev-backup sync=none" job (copy-before-write), so the
    export keeps the node's content of the cut while the guest writes on.

    ``actions``: more QMP transaction actions that must happen at the same
    instant (dirty-bitmap rotation); ``bitmap``: one exported with the view.
    ``template``: a callable(size) giving an empty qcow2 image of that
    virtual size that the scratch overlay is copied from (a service keeps
    one: pydr.dr.warm), instead of a `qemu-img create` each time.
    close() tears everything down (the export, pydr's NBD server, the job,
    the overlay and its file)."""

    def __init__(self, qmp, node, *, actions=(), bitmap=None, nbd_socket=None, template=None):
        import tempfile
        import uuid

        self.qmp, self.node = qmp, node
        clear_left_fleeces(qmp, node, nbd_socket=nbd_socket)  # a killed pydr's, on this node
        tag = f"{fleece_tag(node)}-{uuid.uuid4().hex[:6]}"  # node-names: 31 characters at most
        self.overlay, self.job, self.export = f"pydr-fleece-{tag}", f"pydr-job-{tag}", f"pydr-{tag}"
        self.dir = tempfile.mkdtemp(prefix="pydr-fleece-")
        # held while this process lives: clear_left_fleeces leaves a held fleece alone
        self._held = _hold(os.path.join(self.dir, "held"))
        # QEMU runs one NBD server: pydr's own, or the one it runs already (nbd_socket)
        self.socket = nbd_socket or os.path.join(self.dir, "nbd.sock")
        self.done = []
        try:
            size = node_size(qmp, node)
            scratch = os.path.join(self.dir, "overlay.qcow2")
            # private: it takes the disk's old blocks; copyfile and qemu-img keep these bits
            create_file(scratch)
            if template is not None:  # a fresh copy of an empty image: what create makes
                shutil.copyfile(template(size), scratch)
            else:
                qemu_img("create", "-q", "-f", "qcow2", scratch, str(size), path=scratch)
            qmp.execute("blockdev-add", driver="qcow2", **{"node-name": self.overlay},
                        file={"driver": "file", "filename": scratch}, backing=node)
            self.done.append("overlay")
            qmp.transaction(list(actions) + [("blockdev-backup", {
                "device": node, "target": self.overlay, "sync": "none", "job-id": self.job})])
            self.done.append("job")
            if nbd_socket is None:
                try:
                    qmp.execute("nbd-server-start",
                                addr={"type": "unix", "data": {"path": self.socket}})
                except QmpError as exc:
                    raise QemuError(f"QEMU at {qmp.path} runs an NBD server already: name its "
                                    "unix socket as qmp:SOCKET:NODE?nbd=PATH so that pydr adds "
                                    f"its export there ({exc})", path=qmp.path) from None
                self.done.append("server")
            export = {"type": "nbd", "id": self.export, "node-name": self.overlay,
                      "name": self.export, "writable": False}
            if bitmap:
                export["bitmaps"] = [{"node": node, "name": bitmap}]
            qmp.execute("block-export-add", **export)
            self.done.append("export")
        except BaseException:
            self.close()
            raise

    @property
    def uri(self):
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def close(self):
        q = self.qmp
        with contextlib.suppress(QemuError, OSError):
            if "export" in self.done:
                q.execute("block-export-del", id=self.export)
        with contextlib.suppress(QemuError, OSError):
            if "server" in self.done:
                q.execute("nbd-server-stop")
        with contextlib.suppress(QemuError, OSError):
            if "job" in self.done:
                q.execute("block-job-cancel", device=self.job, force=True)
                waited = 0  # the job ends asynchronously; the overlay waits for it
                while waited < 850:  # about 4 s, as before
                    if not any(j.get("device") == self.job for j in q.execute("query-block-jobs")):
                        break
                    waited = _pause(waited)
        with contextlib.suppress(QemuError, OSError):
            if "overlay" in self.done:
                q.execute("blockdev-del", **{"node-name": self.overlay})
        shutil.rmtree(self.dir, ignore_errors=True)
        self.done = []
        if self._held is not None:
            os.close(self._held)
            self._held = None


def fleece_tag(node):
    """The part of the names of a fleece of block node `node` (its overlay
    pydr-fleece-TAG-*, backup job pydr-job-TAG-*, export pydr-TAG-*) that
    says which node it is of: 8 hex digits of the node name's SHA-256 (a
    node name may be longer than a node name may hold, or start with '#')."""
    import hashlib

    return hashlib.sha256(node.encode()).hexdigest()[:8]


def _wait_gone(qmp, command, key, value):
    """Wait until no entry of `command`'s list has `key` == `value` (about 4 s);
    QemuError if it stays."""
    waited = 0
    while any(e.get(key) == value for e in qmp.execute(command)):
        if waited >= 850:
            raise QemuError(f"QEMU at {qmp.path} still lists {value!r} ({command})",
                            path=qmp.path)
        waited = _pause(waited)


def _hold(path):
    """An fd of `path` (created) with an exclusive flock on it: a process's
    mark that lasts exactly as long as it does."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _held(directory):
    """Whether a live process holds the fleece of `directory` (_hold)."""
    import fcntl

    try:
        fd = os.open(os.path.join(directory, "held"), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False  # none: made by a pydr killed before it held it, or gone
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _scratch_file(filename):
    """The scratch file of an overlay from its node's filename (a json:
    pseudo-filename when its backing is another node)."""
    if filename.startswith("json:"):
        try:
            child = json.loads(filename[len("json:"):]).get("file") or {}
        except ValueError:
            return ""
        return child.get("filename", "") if isinstance(child, dict) else ""
    return filename


def _own_scratch_dir(overlay):
    """The scratch directory of a left fleece whose overlay file QEMU names
    `overlay`, if it is one pydr could have made (Fleece: mkdtemp with the
    prefix pydr-fleece- in the temporary directory, owned by this user, no
    symlink on the way); else None: a name from a QMP reply is not trusted
    with a recursive removal."""
    import tempfile

    if not overlay or os.path.basename(overlay) != "overlay.qcow2":
        return None
    d = os.path.dirname(overlay)
    top = os.path.realpath(tempfile.gettempdir())
    if (not os.path.basename(d).startswith("pydr-fleece-") or os.path.realpath(d) != d
            or os.path.dirname(d) != top):
        return None
    try:
        st = os.lstat(d)
    except OSError:
        return None
    return d if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() else None


def clear_left_fleeces(qmp, node, *, nbd_socket=None):
    """Remove what a killed pydr left of its fleeces of block node `node`
    (found by their names only: fleece_tag): cancel its backup jobs and
    wait for their end, remove its NBD exports, the NBD server pydr started
    (when `nbd_socket` is None and the server's socket is in the left
    fleece's directory), its overlay nodes and their scratch directories.
    A fleece a live pydr holds (the flock in its directory) is not left:
    it stays. Another program's jobs, exports and nodes are never touched. Returns
    the names removed (jobs, exports, overlays)."""
    tag = fleece_tag(node)
    overlays = {n["node-name"]: n.get("file", "") for n in qmp.execute("query-named-block-nodes")
                if str(n.get("node-name", "")).startswith(f"pydr-fleece-{tag}-")}
    # each overlay's scratch directory, where it is one pydr makes (a name from a QMP
    # reply is looked into only then); a fleece another pydr holds now (its
    # directory's flock) is its, not left
    scratch = {n: _own_scratch_dir(_scratch_file(f)) for n, f in overlays.items()}
    live = {name[len(f"pydr-fleece-{tag}-"):] for name, d in scratch.items()
            if d is not None and _held(d)}
    overlays = {n: f for n, f in overlays.items() if n[len(f"pydr-fleece-{tag}-"):] not in live}
    jobs = [j["device"] for j in qmp.execute("query-block-jobs")
            if str(j.get("device", "")).startswith(f"pydr-job-{tag}-")
            and j["device"][len(f"pydr-job-{tag}-"):] not in live]
    exports = [e["id"] for e in qmp.execute("query-block-exports")
               if str(e.get("id", "")).startswith(f"pydr-{tag}-")
               and e["id"][len(f"pydr-{tag}-"):] not in live]
    for job in jobs:  # first: the job writes into the overlay
        with contextlib.suppress(QmpError):  # it may have ended meanwhile
            qmp.execute("block-job-cancel", device=job, force=True)
        _wait_gone(qmp, "query-block-jobs", "device", job)
    for export in exports:
        with contextlib.suppress(QmpError):
            qmp.execute("block-export-del", id=export)
        _wait_gone(qmp, "query-block-exports", "id", export)
    dirs = [scratch[n] for n in overlays if scratch[n] is not None]
    if nbd_socket is None and any(os.path.exists(os.path.join(d, "nbd.sock")) for d in dirs):
        with contextlib.suppress(QmpError):  # pydr's own server, on a socket in its directory
            qmp.execute("nbd-server-stop")
    for overlay in overlays:
        qmp.execute("blockdev-del", **{"node-name": overlay})
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    return jobs + exports + list(overlays)


def node_size(qmp, node):
    for n in qmp.execute("query-named-block-nodes"):
        if n.get("node-name") == node:
            return n["image"]["virtual-size"]
    raise FileNotFoundError(2, f"no block node {node!r} in QEMU", qmp.path)


def node_bitmaps(qmp, node):
    """{name: info} of the dirty bitmaps of a block node (query-named-block-nodes)."""
    for n in qmp.execute("query-named-block-nodes"):
        if n.get("node-name") == node:
            # a bitmap without a name is a block job's own (a backup's copy-before-write)
            return {b["name"]: b for b in n.get("dirty-bitmaps") or [] if "name" in b}
    raise FileNotFoundError(2, f"no block node {node!r} in QEMU", qmp.path)

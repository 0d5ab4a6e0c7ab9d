"""Shared fixtures of the `pydr run` tests: a qemu-storage-daemon holding a
tracked qcow2 disk (an NBD export for the guest's writer, a QMP socket for
pydr), a vault protecting it with --cbt, the writer process of
tests/service/writer.py driven through FIFOs, and a `pydr run --events`
process whose event lines the tests wait on (never on time).

A module the tests import their fixtures from, not a conftest.py: with no
__init__.py here (other tests import their neighbours by name), a
tests/service/conftest.py would be imported as "conftest" in place of
tests/conftest.py, and every `from conftest import ...` under tests/ that
runs after it would get this file. Other engineers add their fixtures at the
end of this file."""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from pydr.dr.vault import Vault, init_vault

from conftest import pydr_command
from qemuhelp import DaemonSockets, cli, end_by_pidfd, start_qcow2_daemon

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
#: how long a test waits for a line before it calls the run hung (a guard, not an assertion)
HANG = 300

needs_qemu = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-storage-daemon")),
    reason="needs qemu-utils and qemu-system-common (scripts/bootstrap installs them)")


class QsdDisk(DaemonSockets):
    """A qcow2 image held by qemu-storage-daemon: node disk0, an NBD export
    "disk0" (writable, for the guest's writer) and a QMP socket; its dirty
    bitmaps live in the daemon."""

    def __init__(self, directory, name="disk", size=64 * MiB):
        self.dir = directory
        self.image = os.path.join(directory, f"{name}.qcow2")
        self.size = size
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.image, str(size)],
                       check=True)
        self.qmp = os.path.join(directory, f"{name}.qmp")
        self.nbd = os.path.join(directory, f"{name}.nbd")
        self.pidfd = None
        self.start()

    def start(self):
        for s in (self.qmp, self.nbd):
            if os.path.exists(s):
                os.unlink(s)
        _, self.pidfd = start_qcow2_daemon(self.image + ".pid", self.image, self.qmp, self.nbd)

    def stop(self):
        if self.pidfd is not None:
            end_by_pidfd(self.pidfd, signal.SIGTERM, gone_ok=True)
            self.pidfd = None


class Writer:
    """The writer process (tests/service/writer.py) on a QsdDisk: `stop(n)`
    returns (last record written, time after its flush); `go()` resumes."""

    def __init__(self, disk, directory, seed, rate=0.0, stopped=False):
        self.seed, self.size = seed, disk.size
        self.log = os.path.join(directory, f"writer{seed}.log")
        self.commands = os.path.join(directory, f"writer{seed}.cmd")
        self.acks = os.path.join(directory, f"writer{seed}.ack")
        for fifo in (self.commands, self.acks):
            os.mkfifo(fifo)
        # read-write opens: neither side waits for the other, neither sees an end
        self._cmd = os.open(self.commands, os.O_RDWR)
        self._ack = os.open(self.acks, os.O_RDWR)
        self._buf = b""
        args = [sys.executable, os.path.join(HERE, "writer.py"), "--uri", disk.uri,
                "--seed", str(seed), "--size", str(disk.size), "--log", self.log,
                "--commands", self.commands, "--acks", self.acks, "--rate", str(rate)]
        self.proc = subprocess.Popen(args + (["--stopped"] if stopped else []),
                                     cwd=tempfile.gettempdir())

    def _ack_line(self):
        while b"\n" not in self._buf:
            ready, _, _ = select.select([self._ack], [], [], HANG)
            if not ready:
                pytest.fail(f"the writer did not answer (exit {self.proc.poll()})")
            self._buf += os.read(self._ack, 4096)
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def send(self, command):
        os.write(self._cmd, (command + "\n").encode())

    def stop(self, n=0):
        """Stop after record `n` (or now, if it is written); returns (last
        record, epoch time after its flush)."""
        self.send(f"stop {n}")
        word, seq, at = self._ack_line().split()
        assert word == "stopped"
        return int(seq), float(at)

    def go(self):
        self.send("go")

    def close(self):
        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(timeout=HANG)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.close(self._cmd)
        os.close(self._ack)


class RunService:
    """`pydr run --vault VAULT --events ARGS` with its event lines: `wait_for`
    reads lines until one matches, keeping every line read in `events`."""

    def __init__(self, vault, *args, env=None):
        self.vault = vault
        self.events = []
        self.proc = subprocess.Popen(
            pydr_command() + ["run", "--vault", str(vault), "--events", *map(str, args)],
            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=tempfile.gettempdir())
        self._buf = b""

    def next_event(self):
        """The next event line (a dict); None once the service's stdout ended."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], HANG)
            if not ready:
                pytest.fail(f"pydr run printed nothing for {HANG} s; events: {self.events[-5:]}")
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        event = json.loads(line)
        self.events.append(event)
        return event

    def wait_for(self, match):
        """Read events until `match(event)` is true; returns that event.
        Fails the test when the service ends first (with its stderr)."""
        while True:
            event = self.next_event()
            if event is None:
                self.proc.wait()
                pytest.fail(f"pydr run ended (exit {self.proc.returncode}) before the event: "
                            f"{self.proc.stderr.read().decode()}")
            if match(event):
                return event

    def drain(self):
        """Read the remaining events and wait for the exit; returns the exit
        status (the negative signal number when killed)."""
        while self.next_event() is not None:
            pass
        return self.proc.wait()

    def signal(self, sig):
        self.proc.send_signal(sig)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def finished(item, failed_ok=False):
    """An event matcher: the end of a replicate of `item` that made a point.
    A failed replicate of `item` fails the test (with its message) unless
    `failed_ok`."""
    def match(e):
        if e.get("item") != item or e.get("operation") != "replicate":
            return False
        if e.get("kind") == "failed" and not failed_ok:
            pytest.fail(f"a cycle of {item} failed: {e.get('message')}")
        return e.get("kind") == "finished"
    return match


def points(vault, item):
    """Item `item`'s points (PointInfo, oldest first), read as a reader."""
    with Vault(vault) as v:
        return v.points(item)


def set_target(vault, item, seconds, **more):
    """Give `item` a policy: target RPO `seconds` (and policies columns `more`)."""
    with Vault(vault, writer=True) as v:
        v.store.put_policy("item", item, target_rpo=float(seconds), **more)


def materialize(vault, item, point_id, directory):
    """Materialise point `point_id` of `item` into `directory`; its one disk's path."""
    with Vault(vault, writer=True) as v:
        (path,) = v.materialize(item, point_id, str(directory)).paths
    return path


@pytest.fixture
def qsd_disk(tmp_path):
    """A QsdDisk of 64 MiB in tmp_path (stopped at the end)."""
    disk = QsdDisk(str(tmp_path))
    yield disk
    disk.stop()


@pytest.fixture
def protected_qsd(qsd_disk, tmp_path):
    """(disk, vault, replica): a vault in tmp_path/vault protecting item "vm"
    (the QsdDisk, --cbt) into tmp_path/replica.img; no policy yet."""
    vault = tmp_path / "vault"
    init_vault(vault)
    replica = tmp_path / "replica.img"
    r = cli(vault, "protect", "vm", "--disk", f"{qsd_disk.spec}={replica}", "--cbt")
    assert r.returncode == 0, r.stderr
    return qsd_disk, vault, replica


@pytest.fixture
def writer_factory(tmp_path):
    """start(disk, seed, rate=0, stopped=False) -> Writer; all closed at the end."""
    made = []

    def start(disk, seed, rate=0.0, stopped=False):
        made.append(Writer(disk, str(tmp_path), seed, rate=rate, stopped=stopped))
        return made[-1]

    yield start
    for w in made:
        w.close()


@pytest.fixture
def services():
    """start(vault, *args, env=None) -> RunService; all killed at the end."""
    made = []

    def start(vault, *args, env=None):
        made.append(RunService(vault, *args, env=env))
        return made[-1]

    yield start
    for s in made:
        s.close()


def listening_ports(pid):
    """The TCP ports process `pid` listens on (its sockets' inodes looked up
    in /proc/net/tcp and tcp6): how a test finds `--metrics HOST:0`'s port."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def health_event(item, new):
    """An event matcher: `item`'s RPO health changed to `new`."""
    return lambda e: (e.get("kind") == "health" and e.get("item") == item
                      and f"-> {new}" in (e.get("message") or ""))


def round_end(e):
    """An event matcher: the end of one of pydr run's rounds."""
    return e.get("operation") == "run" and e.get("kind") == "finished" and e.get("item") is None


def protect_file(vault, directory, name, size=4 * MiB, source=None):
    """Protect item `name`: a random file disk (at `source`, or
    DIRECTORY/NAME.img) replicated to DIRECTORY/NAME-replica.img; returns
    (source, replica)."""
    source = source or os.path.join(directory, f"{name}.img")
    with open(source, "wb") as f:
        f.write(os.urandom(size))
    replica = os.path.join(directory, f"{name}-replica.img")
    r = cli(vault, "protect", name, "--disk", f"{source}={replica}")
    assert r.returncode == 0, r.stderr
    return source, replica

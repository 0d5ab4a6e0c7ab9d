"""QEMU tools for the tests: writes with qemu-io, an image's content as
qemu-img reads it, and read-only or writable qemu-nbd exports on unix
sockets (stopped by whoever started them), qemu-storage-daemons known by
a pidfd; and the cycles of the item "vm"
that the tracked-disk tests run."""

import contextlib
import json
import os
import select
import signal
import subprocess

import pytest

from pydr.dr.vault import init_vault

from conftest import run_cli, sha


def qemu_io(target, *commands, fmt="qcow2"):
    """Run qemu-io `commands` ("write -P 0x11 0 4M", ...) on an image or NBD URI."""
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    subprocess.run(args + [str(target)], check=True, capture_output=True)


def raw_sha(image, tmp_path, fmt=None):
    """SHA-256 of what qemu-img reads as the image's raw content (`fmt`
    probed when None)."""
    out = tmp_path / "raw-of.img"
    subprocess.run(["qemu-img", "convert"] + (["-f", fmt] if fmt else []) +
                   ["-O", "raw", str(image), str(out)], check=True)
    try:
        return sha(out)
    finally:
        out.unlink()


@contextlib.contextmanager
def qemu_nbd_servers(tmp_path):
    """Yields start(image, fmt="raw", read_only=True, shared=4) -> URI: a
    qemu-nbd of the image on a unix socket in tmp_path, returned once it
    listens (start.procs: the processes, in order); stops them all on exit."""
    procs = []

    def start(image, fmt="raw", read_only=True, shared=4):
        sock = tmp_path / f"nbd{len(procs)}.sock"
        cmd = ["qemu-nbd", "-f", fmt, "-k", str(sock), "-t", "-e", str(shared), str(image)]
        procs.append(subprocess.Popen(cmd + (["-r"] if read_only else []),
                                      stderr=subprocess.PIPE))
        for _ in range(500):  # until it listens
            if sock.exists():
                return f"nbd+unix:///?socket={sock}"
            if procs[-1].poll() is not None:
                pytest.fail(procs[-1].stderr.read().decode())
            subprocess.run(["sleep", "0.01"])
        pytest.fail("qemu-nbd did not listen")

    start.procs = procs
    try:
        yield start
    finally:
        for p in procs:
            p.terminate()
            p.wait()


def cli(vault, *args, env=None):
    """`pydr ARGS --vault VAULT` (the CompletedProcess)."""
    return run_cli(*args, "--vault", vault, env=env)


def replicate(vault, *extra):
    """One cycle of item 'vm' that must succeed; returns its --json result."""
    r = cli(vault, "replicate", "vm", "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def qcow2_and_vault(tmp_path, size, *writes):
    """tmp_path/os.qcow2 of `size` ("128M") holding the qemu-io `writes`, and
    an empty vault tmp_path/vault; returns (image, replica path, vault)."""
    img = tmp_path / "os.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), size], check=True)
    qemu_io(img, *writes)
    vault = tmp_path / "vault"
    init_vault(vault)
    return img, tmp_path / "replica.img", vault


def start_storage_daemon(pid_file, *args, sockets=()):
    """Run `qemu-storage-daemon --daemonize --pidfile PID_FILE ARGS`: the
    parent exits once startup is complete (its sockets listen) or failed, so
    there is nothing to wait for by time. Fails the test unless it started
    and every path in `sockets` exists. Returns (pid, pidfd): the daemon is
    not our child, and a pidfd names it even once its pid is reused."""
    r = subprocess.run(["qemu-storage-daemon", "--daemonize", "--pidfile", str(pid_file), *args],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or not all(os.path.exists(p) for p in sockets):
        pytest.fail(f"qemu-storage-daemon did not start: {r.stderr}")
    with open(pid_file) as f:
        pid = int(f.read())
    return pid, os.pidfd_open(pid)


def start_qcow2_daemon(pid_file, image, qmp, nbd, file_options=""):
    """A qemu-storage-daemon holding qcow2 `image` as node disk0: a writable
    NBD export "disk0" on unix socket `nbd` (the guest's writer) and a QMP
    monitor on `qmp` (pydr's); `file_options` go on its file node
    (",aio=threads"). Returns (pid, pidfd), as start_storage_daemon."""
    return start_storage_daemon(
        pid_file,
        "--blockdev", f"driver=file,node-name=file0,filename={image}{file_options}",
        "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "type=nbd,id=writer,node-name=disk0,name=disk0,writable=on",
        "--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp0",
        "--monitor", "chardev=qmp0", sockets=(qmp, nbd))


class DaemonSockets:
    """What a disk held by :func:`start_qcow2_daemon` offers, from its
    sockets ``self.qmp`` and ``self.nbd``."""

    @property
    def spec(self):
        """The disk as `pydr protect --disk` takes it."""
        return f"qmp:{self.qmp}:disk0?nbd={self.nbd}"

    @property
    def uri(self):
        """The writer's NBD URI."""
        return f"nbd+unix:///disk0?socket={self.nbd}"


def end_by_pidfd(pidfd, sig=signal.SIGTERM, *, gone_ok=False):
    """Send `sig` to the process of `pidfd`, wait until it is gone (its
    pidfd readable), close the pidfd. A process already gone raises
    ProcessLookupError unless `gone_ok`."""
    try:
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            if not gone_ok:
                raise
        select.select([pidfd], [], [])
    finally:
        os.close(pidfd)

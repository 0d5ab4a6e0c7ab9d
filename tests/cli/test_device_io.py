"""Outputs and inputs that are not regular files: a character device or FIFO
given as -o is written through (never renamed over), a directory as -o is
refused, and a FIFO, socket or character device given as a disk is refused
with exit 10 without waiting for a writer.

Each command runs with a subprocess timeout as a safety net only (a
regression would hang there instead of hanging the suite); what is asserted
is the exit code and the message."""

import os
import socket
import stat
import subprocess
import threading

import pytest

from conftest import LOCAL_RSH, PYDR, pydr_command

SAFETY_NET = 60  # seconds; never reached unless a fix regresses into blocking


def cli(*args):
    return subprocess.run(pydr_command() + [str(a) for a in args], capture_output=True,
                          timeout=SAFETY_NET, cwd="/tmp")


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


def read_fifo(path, into):
    """A reader thread for `path`: its whole content lands in `into`."""
    def run():
        with open(path, "rb") as f:
            into.append(f.read())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("command", ["signature", "delta"])
def test_dev_null_as_output_is_written_through_and_stays_a_device(disk, tmp_path, command):
    before = os.stat("/dev/null")
    args = ["signature", disk, "-o", "/dev/null"] if command == "signature" else \
        ["delta", disk, "--target", tmp_path / "empty.img", "-o", "/dev/null"]
    (tmp_path / "empty.img").write_bytes(b"")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode)
    assert (after.st_rdev, after.st_ino, stat.S_IMODE(after.st_mode)) == \
        (before.st_rdev, before.st_ino, stat.S_IMODE(before.st_mode))
    assert not os.path.exists("/dev/.null.pydr-new")


@pytest.mark.parametrize("command", ["signature", "delta"])
def test_a_fifo_as_output_gets_the_bytes_and_stays_a_fifo(disk, tmp_path, command):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    if command == "signature":
        args, plain = ["signature", disk, "-o"], ["signature", disk, "-o", tmp_path / "plain"]
    else:
        (tmp_path / "base.img").write_bytes(os.urandom(1 << 20))
        args = ["delta", disk, "--target", tmp_path / "base.img", "-o"]
        plain = args + [tmp_path / "plain"]
    got = []
    reader = read_fifo(fifo, got)
    r = cli(*args, fifo)
    reader.join(SAFETY_NET)
    assert r.returncode == 0, r.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not os.path.exists(tmp_path / ".out.fifo.pydr-new")
    assert cli(*plain).returncode == 0
    assert got == [(tmp_path / "plain").read_bytes()]


def test_a_directory_or_a_symlink_to_one_as_output_is_refused(disk, tmp_path):
    out = tmp_path / "outdir"
    out.mkdir()
    (tmp_path / "link").symlink_to(out)
    for target in (out, tmp_path / "link"):
        r = cli("signature", disk, "-o", target)
        assert r.returncode == 10, r.stderr
        assert str(target).encode() in r.stderr and b"directory" in r.stderr
    assert os.listdir(out) == []
    assert os.path.islink(tmp_path / "link")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".pydr-new")]


def refused(r, path):
    assert r.returncode == 10, (r.returncode, r.stderr)
    assert str(path).encode() in r.stderr, r.stderr
    assert b"Traceback" not in r.stderr


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "disk.fifo"
    os.mkfifo(path)
    return path


def test_a_fifo_as_a_disk_is_refused_without_waiting(disk, fifo, tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(1 << 20))
    delta = tmp_path / "d.delta"
    assert cli("delta", disk, "--target", base, "-o", delta).returncode == 0
    for args in (["signature", fifo, "-o", tmp_path / "x.sig"],
                 ["resync", fifo, tmp_path / "new.img"],
                 ["resync", disk, fifo],
                 ["delta", fifo, "--target", base, "-o", tmp_path / "x.delta"],
                 ["delta", disk, "--target", fifo, "-o", tmp_path / "x.delta"],
                 ["apply", delta, fifo]):
        r = cli(*args)
        refused(r, fifo)
        assert b"FIFO" in r.stderr, (args, r.stderr)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    for name in ("x.sig", "new.img", "x.delta"):
        assert not (tmp_path / name).exists(), name


def test_a_socket_and_a_character_device_as_a_disk_are_refused(tmp_path):
    sock_path = tmp_path / "disk.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        r = cli("signature", sock_path, "-o", tmp_path / "x.sig")
        refused(r, sock_path)
        assert b"socket" in r.stderr
    r = cli("resync", "/dev/zero", tmp_path / "new.img")
    refused(r, "/dev/zero")
    assert b"character device" in r.stderr and not (tmp_path / "new.img").exists()


def test_a_fifo_is_refused_by_protect(fifo, tmp_path):
    vault = tmp_path / "vault"
    assert cli("vault", "init", vault).returncode == 0
    r = cli("protect", "vm", "--disk", f"{fifo}={tmp_path / 'replica.img'}", "--vault", vault)
    refused(r, fifo)
    assert not (tmp_path / "replica.img").exists()


def test_a_fifo_pulled_through_serve_is_refused(fifo, tmp_path):
    r = cli("resync", f"127.0.0.1:{fifo}", tmp_path / "back.img", "--rsh", LOCAL_RSH,
            "--remote-pydr", PYDR)
    refused(r, fifo)
    assert b"FIFO" in r.stderr and not (tmp_path / "back.img").exists()


def test_a_fifo_pushed_to_through_serve_is_refused(disk, fifo):
    r = cli("resync", disk, f"127.0.0.1:{fifo}", "--rsh", LOCAL_RSH, "--remote-pydr", PYDR)
    refused(r, fifo)


def test_serve_never_writes_through_nor_replaces_a_device_the_client_names(disk):
    before = os.stat("/dev/null")
    r = cli("signature", disk, "-o", "127.0.0.1:/dev/null", "--rsh", LOCAL_RSH,
            "--remote-pydr", PYDR)
    assert r.returncode == 10, r.stderr
    assert b"/dev/null" in r.stderr
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino

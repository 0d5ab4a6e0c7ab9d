"""The fixed cost of a one-shot tracked cycle: what a `pydr replicate` of a
--cbt qcow2 item starts, counted from the processes it really runs (qemu-img
and qemu-nbd on PATH are wrappers that log their arguments, then exec the
real tool), and the crash safety of the shorter sequence: the bitmaps are
listed once per cut, a recording bitmap is not enabled again, the size comes
from `qemu-img info` instead of a qemu-nbd of its own. Replicas are exact."""

import json
import os
import select
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import pydr_command, run_cli, sha
from qemuhelp import qcow2_and_vault, qemu_io, raw_sha

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-nbd", "qemu-io")),
    reason="needs qemu-utils (scripts/bootstrap installs it)")
MiB = 1 << 20


@pytest.fixture
def logged_tools(tmp_path):
    """A PATH whose qemu-img and qemu-nbd log one JSON line of their argv to
    a file, then exec the real tool. Returns (env, read_log)."""
    bindir, log = tmp_path / "bin", tmp_path / "tools.log"
    bindir.mkdir()
    for name in ("qemu-img", "qemu-nbd"):
        real = shutil.which(name)
        wrapper = bindir / name
        wrapper.write_text(
            f"#!{sys.executable}\n"
            "import json, os, sys\n"
            f"with open({str(log)!r}, 'a') as f:\n"
            f"    f.write(json.dumps([{name!r}] + sys.argv[1:]) + '\\n')\n"
            f"os.execv({real!r}, [{real!r}] + sys.argv[1:])\n")
        wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}

    def read_log():
        if not log.exists():
            return []
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        log.unlink()
        return lines

    return env, read_log


@pytest.fixture
def qcow2_item(tmp_path):
    img, replica, vault = qcow2_and_vault(tmp_path, "64M", "write -P 0x11 0 4M",
                                          "write -P 0x22 40M 1M")
    r = run_cli("protect", "vm", "--disk", f"{img}={replica}", "--cbt", "--vault", vault)
    assert r.returncode == 0, r.stderr
    r = run_cli("replicate", "vm", "--vault", vault)  # the first (full) cycle
    assert r.returncode == 0, r.stderr
    return img, replica, vault


def bitmap_ops(log):
    """[(operations, bitmap name)] of the qemu-img bitmap calls, in order."""
    return [(tuple(a for a in argv[2:-2] if a.startswith("--")), argv[-1])
            for argv in log if argv[:2] == ["qemu-img", "bitmap"]]


def image_bitmaps(img):
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img)],
                                     check=True, capture_output=True).stdout)
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"].get("bitmaps", [])}


def test_a_tracked_cycle_starts_one_qemu_nbd_and_rotates_with_three_bitmap_calls(
        qcow2_item, logged_tools, tmp_path):
    img, replica, vault = qcow2_item
    env, read_log = logged_tools
    read_log()
    qemu_io(img, "write -P 0x33 8M 4k", "write -P 0x44 50M 4k")
    r = run_cli("replicate", "vm", "--vault", vault, "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes_written"] == 8192
    assert sha(replica) == raw_sha(img, tmp_path)
    log = read_log()
    # the image is read by one qemu-nbd (its size came from qemu-img info)
    assert [argv[0] for argv in log].count("qemu-nbd") == 1, log
    # listed by validate, for the size, and once by the cut (it was four, with a qemu-nbd)
    assert sum(argv[:2] == ["qemu-img", "info"] for argv in log) <= 3, log
    # the recording bitmap is not enabled again: new one added, old frozen, then dropped
    assert bitmap_ops(log) == [(("--add", "--enable"), "pydr-2"), (("--disable",), "pydr-1"),
                               (("--remove",), "pydr-1")], log
    assert image_bitmaps(img) == {"pydr-2": ["auto"]}


def test_after_a_kill_at_the_cut_the_frozen_bitmap_is_merged_and_records_again(
        qcow2_item, logged_tools, tmp_path):
    """Killed after its cut, a cycle leaves pydr-1 frozen and pydr-2
    recording: the next cut's one listing enables pydr-1 (it was disabled:
    first, so that a write while the others go is in one of them), merges
    pydr-2 into it, removes it, then rotates, and every change (before and
    after the kill) reaches the replica."""
    img, replica, vault = qcow2_item
    env, read_log = logged_tools
    qemu_io(img, "write -P 0x55 12M 64k")
    r = subprocess.run(pydr_command() + ["replicate", "vm", "--vault", str(vault)],
                       env={**env, "PYDR_CRASH_AT": "cycle.cut"}, capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert image_bitmaps(img) == {"pydr-1": [], "pydr-2": ["auto"]}
    qemu_io(img, "write -P 0x66 30M 4k")  # recorded by pydr-2 only
    read_log()
    r = run_cli("replicate", "vm", "--vault", vault, env=env)
    assert r.returncode == 0, r.stderr
    assert sha(replica) == raw_sha(img, tmp_path)
    assert bitmap_ops(read_log()) == [
        (("--enable",), "pydr-1"), (("--merge",), "pydr-1"), (("--remove",), "pydr-2"),
        (("--add", "--enable"), "pydr-2"), (("--disable",), "pydr-1"), (("--remove",), "pydr-1")]
    assert image_bitmaps(img) == {"pydr-2": ["auto"]}


def test_the_size_of_an_image_is_its_virtual_size_and_a_damaged_one_fails_as_a_read_does(
        tmp_path):
    from pydr.endpoints.qemu import QemuImageEndpoint
    from pydr.errors import FormatError

    img = tmp_path / "odd.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(3 * MiB + 512)],
                   check=True)
    ep = QemuImageEndpoint(str(img), "qcow2")
    with ep.engine_disk() as dev:
        assert ep.size() == dev.size == 3 * MiB + 512
    not_qcow2 = tmp_path / "raw.qcow2"
    not_qcow2.write_bytes(b"\x01" * 65536)
    with pytest.raises(FormatError) as exc:
        QemuImageEndpoint(str(not_qcow2), "qcow2").size()
    assert str(not_qcow2) in str(exc.value)
    with pytest.raises(FormatError) as exc:  # as before: what qemu-nbd says of it
        QemuImageEndpoint(str(tmp_path / "missing.qcow2"), "qcow2").size()
    assert "missing.qcow2" in str(exc.value)


def test_the_encode_buffer_is_zeros_and_writable():
    from pydr.engine.delta import BATCH_BYTES, encode_buffer

    buf = encode_buffer()
    assert len(buf) >= BATCH_BYTES
    with memoryview(buf) as m:
        assert not m.readonly and m.format == "B"
        assert bytes(m[:4096]) == bytes(4096) and bytes(m[-4096:]) == bytes(4096)
        m[5:8] = b"abc"
    assert bytes(memoryview(buf)[5:8]) == b"abc"


CHILD = """
import sys
from pydr.transport.qemu import QemuNbd
from pydr.engine.devices import NbdDevice
server = QemuNbd(sys.argv[1], "qcow2")
# serving (a SIGTERM before qemu-nbd's main loop runs can be lost: not this test's subject)
server.connect(lambda uri: NbdDevice(uri)).close()
print(server.proc.pid, flush=True)
sys.stdin.read()  # until killed
"""


def test_a_qemu_nbd_still_dies_with_pydr(tmp_path):
    """SIGKILL of the pydr process: the kernel sends its qemu-nbd SIGTERM
    (PR_SET_PDEATHSIG, now set up in pydr before the fork)."""
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(img)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, cwd=tmp_path)
    try:
        pid = int(child.stdout.readline())
        pidfd = os.pidfd_open(pid)
    finally:
        child.kill()
        child.wait()
    try:
        # readable once qemu-nbd has exited; the bound only stops a broken test hanging
        ready, _, _ = select.select([pidfd], [], [], 60)
        assert ready == [pidfd], f"qemu-nbd {pid} outlived the pydr that started it"
    finally:
        os.close(pidfd)


def test_a_vanished_source_sets_health_and_last_error(tmp_path, qcow2_item):
    """A cycle that fails in its check (qemu-img info of a missing image)
    records that on the item, as any failed cycle: health and last_error."""
    img, _, vault = qcow2_item
    img.rename(tmp_path / "away.qcow2")
    r = run_cli("replicate", "vm", "--vault", vault)
    assert r.returncode != 0
    st = json.loads(run_cli("status", "vm", "--json", "--vault", vault).stdout)
    st = st[0] if isinstance(st, list) else st
    assert st["health"] in ("warning", "critical")
    assert st["last_error"] and "No such file" in st["last_error"]
    assert json.loads(run_cli("jobs", "--json", "--vault", vault).stdout)[0]["state"] == "failed"

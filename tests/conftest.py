import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import xxhash

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL_RSH = os.path.join(HERE, "local_rsh")  # runs the "remote" pydr here, in place of ssh
ROOT = os.path.dirname(HERE)
# Test the installed package (with its compiled pydr._core), never the source
# tree that `python -m pytest` puts first on sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]


MASK64 = (1 << 64) - 1


def oracle(data, block_size, algorithm):
    """Expected per-block hashes computed by python-xxhash, as Python ints."""
    out = []
    for start in range(0, len(data), block_size):
        block = data[start:start + block_size]
        if algorithm == "xxh3-64":
            out.append(xxhash.xxh3_64_intdigest(block))
        else:
            d = xxhash.xxh3_128_intdigest(block)
            out.append((d & MASK64, d >> 64))
    return out


def as_ints(sig):
    if sig.algorithm == "xxh3-64":
        return [int(h) for h in sig.hashes]
    return [(int(lo), int(hi)) for lo, hi in sig.hashes]


def zero_oracle(data, block_size):
    return [not any(data[s:s + block_size]) for s in range(0, len(data), block_size)]


def write_sparse(path, size, islands):
    """A sparse file of `size` bytes with data written only at `islands`
    [(offset, bytes)]; returns the full logical content as bytes when small."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in islands:
            f.seek(off)
            f.write(data)
    return path


def fs_has_holes(directory):
    """Whether the file system under `directory` reports holes."""
    probe = os.path.join(directory, ".hole-probe")
    with open(probe, "wb") as f:
        f.truncate(1 << 20)
        f.seek(512 << 10)
        f.write(b"x")
    try:
        fd = os.open(probe, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_DATA) > 0
        except OSError:
            return False
        finally:
            os.close(fd)
    finally:
        os.unlink(probe)


@pytest.fixture
def holes(tmp_path):
    if not fs_has_holes(str(tmp_path)):
        pytest.skip("the file system under the temp dir does not report holes")
    return tmp_path


@pytest.fixture
def xfs_dir(tmp_path):
    """A 1 GiB XFS file system with reflink on a loop device, mounted (the
    tests run as root: .ci/run); unmounted afterwards."""
    import shutil

    if not shutil.which("mkfs.xfs"):
        pytest.fail("mkfs.xfs is missing: scripts/bootstrap installs xfsprogs")
    img, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    with open(img, "wb") as f:
        f.truncate(1 << 30)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], check=True)
    mnt.mkdir()
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"cannot mount a loop device (the tests run as root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)])


def sha(path):
    """SHA-256 of a file (to compare images)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def rchar(pid="self"):
    """Bytes process `pid` has read through syscalls so far (/proc/PID/io
    rchar: files and sockets, not what it reads through mmap)."""
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def pydr_command():
    """The `pydr` console script installed with the pydr under test: the one
    beside this interpreter (a venv's bin/), never another one on PATH."""
    exe = os.path.join(os.path.dirname(sys.executable), "pydr")
    if os.access(exe, os.X_OK):
        return [exe]
    return [sys.executable, "-m", "pydr.cli"]


def run_cli(*args, input=None, env=None):
    """Run the installed `pydr` command; returns CompletedProcess. It runs in
    the temp dir, so `python -m` can never pick up the source tree."""
    import tempfile

    return subprocess.run(pydr_command() + [str(a) for a in args], capture_output=True,
                          input=input, env=env, timeout=300, cwd=tempfile.gettempdir())


@pytest.fixture
def faulty_image(tmp_path):
    """Mount a FUSE file system serving a 16 MiB random image whose bytes
    [bad_start, bad_end) fail with EIO. Yields a function(bad_start, bad_end)
    -> (path in the mount, the data)."""
    pytest.importorskip("fuse", reason="fusepy is not installed (pip install fusepy)")
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("FUSE needs /dev/fuse and root here")
    mounts = []
    counter = [0]

    def make(bad_start, bad_end, size=16 << 20, mode="read", data=None, backing=None,
             mountpoint=None):
        if backing is None:
            backing = tmp_path / f"backing{counter[0]}.img"
            data = os.urandom(size) if data is None else data
            backing.write_bytes(data)
        counter[0] += 1
        mnt = mountpoint or tmp_path / f"mnt{counter[0]}"
        mnt.mkdir(exist_ok=True)
        proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "faultyfs.py"), str(backing), str(mnt),
             str(bad_start), str(bad_end), mode],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        mounts.append((proc, mnt))
        target = mnt / "disk.img"
        for _ in range(100):
            if target.exists():
                return str(target), data
            if proc.poll() is not None:
                pytest.fail(f"faultyfs did not mount: {proc.stderr.read().decode()}")
            time.sleep(0.05)
        pytest.fail("faultyfs did not mount in 5 s")

    def unmount_all():
        for proc, mnt in mounts:
            subprocess.run(["umount", str(mnt)], capture_output=True)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        mounts.clear()

    make.unmount_all = unmount_all
    yield make
    unmount_all()


PYDR = pydr_command()[0]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("sshd", "ssh", "ssh-keygen")):
        pytest.skip("needs root and openssh-server/openssh-client")
    if not os.access(PYDR, os.X_OK):
        pytest.skip("needs the installed pydr script")
    d = tmp_path_factory.mktemp("sshd")
    root = d / "replicas"
    root.mkdir()
    for key in ("host_key", "client_key", "confined_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    confined = (d / "confined_key.pub").read_text().strip()
    (d / "authorized_keys").write_text(
        (d / "client_key.pub").read_text() +
        f'command="{PYDR} serve --stdio --root {root}",restrict {confined}\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\n"
        f"UsePAM no\nPidFile {d / 'sshd.pid'}\nAllowUsers root\n")
    os.makedirs("/run/sshd", exist_ok=True)
    # its log goes to a file: a pipe nobody reads fills after ~250 connections
    # and then every sshd process blocks on its next log line
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([shutil.which("sshd"), "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=log, stderr=log)
    log.close()
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()}")
    base = (f"ssh -p {port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            f"-o BatchMode=yes -o LogLevel=ERROR")
    yield {"rsh": f"{base} -i {d / 'client_key'}", "confined": f"{base} -i {d / 'confined_key'}",
           "root": root}
    proc.terminate()
    proc.wait()


def pytest_terminal_summary(terminalreporter):
    """The reliability figures of this run (README's table comes from here)."""
    import collections

    try:
        from crashmatrix import RESULTS
    except ImportError:
        return
    if not RESULTS:
        return
    rows = collections.OrderedDict()
    for scenario, point, n, outcome, verified in RESULTS:
        row = rows.setdefault(scenario, {"points": set(), "kills": 0, "cuts": 0, "verified": 0})
        row["points"].add(point)
        row["kills" if outcome == "killed" else "cuts"] += 1
        row["verified"] += verified
    terminalreporter.section("crash safety: every run was finished by running it again")
    terminalreporter.write_line("| operation | crash points | kills survived | power cuts survived "
                                "| recovery points verified |")
    terminalreporter.write_line("|---|---:|---:|---:|---:|")
    for scenario, row in rows.items():
        terminalreporter.write_line(f"| {scenario} | {len(row['points'])} | {row['kills']} | "
                                    f"{row['cuts']} | {row['verified']} |")
    total = {k: sum(r[k] for r in rows.values()) for k in ("kills", "cuts", "verified")}
    terminalreporter.write_line(f"| all | {len(set().union(*(r['points'] for r in rows.values())))}"
                                f" | {total['kills']} | {total['cuts']} | {total['verified']} |")

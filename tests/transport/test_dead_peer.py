"""A remote end that dies, refuses the connection or never starts is an
error (exit 18, PeerGone) that carries the rsh command's own words and
status, for every command that talks to it: resync push and pull,
signature, replicate. Only pydr's own closed stdout is the quiet case.

The dead-at-once cases run 20 times each: a broken pipe on our first write
and the end of the peer's output on our first read race, and both must end
the same way."""

import json
import os
import random
import shutil
import subprocess

import pytest

from conftest import LOCAL_RSH, PYDR, run_cli

RUNS = 20


def _env():
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(PYDR) + os.pathsep + env.get("PATH", "")
    return env


def _commands(tmp_path):
    """(name, argv, what must not appear) of each command talking to 'h'."""
    src = tmp_path / "big.img"
    src.write_bytes(random.Random(1).randbytes(4 << 20))
    pulled = tmp_path / "pulled.img"
    sig = tmp_path / "f.sig"
    return [("push", ["resync", src, "h:/srv/x.img"], None),
            ("pull", ["resync", "h:/srv/x.img", pulled], pulled),
            ("signature", ["signature", "h:/srv/x.img", "-o", sig], sig)]


@pytest.mark.parametrize("which", ["push", "pull", "signature"])
def test_rsh_that_exits_at_once(tmp_path, which):
    name, argv, output = next(c for c in _commands(tmp_path) if c[0] == which)
    for run in range(RUNS):
        r = run_cli(*argv, "--rsh", "sh -c 'exit 255'")
        assert r.returncode == 18, (run, r.returncode, r.stderr)
        assert b"could not start pydr on h" in r.stderr, (run, r.stderr)
        assert b"exited with status 255" in r.stderr, (run, r.stderr)
        assert b"h:/srv/x.img" in r.stderr and b"Traceback" not in r.stderr, r.stderr
        assert output is None or not output.exists(), (run, os.listdir(tmp_path))


def test_rsh_that_says_why_and_exits(tmp_path):
    """ssh's own message (its last lines on stderr) is in ours."""
    _, argv, _ = _commands(tmp_path)[0]
    rsh = ("sh -c 'echo \"ssh: Could not resolve hostname h: Name or service not known\" >&2;"
           " echo \"(second line)\" >&2; exit 255'")
    r = run_cli(*argv, "--rsh", rsh)
    assert r.returncode == 18, r.stderr
    line = r.stderr.decode().strip()
    assert line.count("\n") == 0, line  # one line
    assert "Could not resolve hostname h: Name or service not known | (second line)" in line, line
    assert "exited with status 255" in line, line


def test_rsh_that_cannot_be_run(tmp_path):
    _, argv, _ = _commands(tmp_path)[0]
    r = run_cli(*argv, "--rsh", str(tmp_path / "no-such-ssh"))
    assert r.returncode == 18, r.stderr
    assert b"could not run --rsh" in r.stderr and b"No such file" in r.stderr, r.stderr


@pytest.mark.parametrize("which", ["push", "pull", "signature"])
def test_ssh_connection_refused(tmp_path, which):
    """A real ssh to a port where nothing listens (a DR site whose sshd is
    down): it failed silently about one run in three."""
    if not shutil.which("ssh"):
        pytest.skip("needs openssh-client")
    name, argv, output = next(c for c in _commands(tmp_path) if c[0] == which)
    argv = [str(a).replace("h:", "127.0.0.1:", 1) if str(a).startswith("h:") else a for a in argv]
    rsh = "ssh -p 1 -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
    for run in range(RUNS):
        r = run_cli(*argv, "--rsh", rsh)
        assert r.returncode == 18, (run, r.returncode, r.stderr)
        assert b"could not start pydr on 127.0.0.1" in r.stderr, (run, r.stderr)
        assert b"Connection refused" in r.stderr and b"status 255" in r.stderr, (run, r.stderr)
        assert output is None or not output.exists(), run


def _images(tmp_path, size=32 << 20):
    a = random.Random(2).randbytes(size)
    (tmp_path / "src.img").write_bytes(a)
    (tmp_path / "dst.img").write_bytes(random.Random(3).randbytes(size))
    return a


def test_peer_killed_in_the_middle_of_a_push(tmp_path):
    """The server is SIGKILLed after its second written batch (a crash
    point, set for the remote pydr only): exit 18, the signal named; the
    same command again finishes the copy."""
    a = _images(tmp_path)
    argv = ["resync", tmp_path / "src.img", f"h:{tmp_path / 'dst.img'}"]
    r = subprocess.run(
        [PYDR, *map(str, argv), "--rsh", f"env PYDR_CRASH_AT=apply.written:2 {LOCAL_RSH}",
         "--remote-pydr", PYDR],
        capture_output=True, env=_env())
    assert r.returncode == 18, r.stderr
    assert b"the connection to pydr on h was lost" in r.stderr, r.stderr
    assert b"status 137" in r.stderr or b"SIGKILL" in r.stderr, r.stderr
    assert (tmp_path / "dst.img").read_bytes() != a
    r = subprocess.run([PYDR, *map(str, argv), "--rsh", LOCAL_RSH, "--remote-pydr", PYDR],
                       capture_output=True,
                       env=_env())
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dst.img").read_bytes() == a


CUT_RSH = """\
import os, signal, subprocess, sys
# an rsh whose pydr is SIGKILLed once it has sent LIMIT bytes: a peer that
# dies in the middle of a transfer, at a byte count rather than a time
limit = int(sys.argv[1])
server = subprocess.Popen([sys.argv[2], "serve", "--stdio"], stdout=subprocess.PIPE)
while limit > 0 and (chunk := server.stdout.read1(min(limit, 1 << 16))):
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
    limit -= len(chunk)
os.kill(server.pid, signal.SIGKILL)
sys.exit(-server.wait())
"""


def test_peer_killed_in_the_middle_of_a_pull(tmp_path):
    """The server is SIGKILLed after it sent 1 MiB: exit 18, the rsh's
    status named; the same command again finishes the copy."""
    import sys

    a = _images(tmp_path)
    (tmp_path / "cut_rsh.py").write_text(CUT_RSH)
    argv = ["resync", f"h:{tmp_path / 'src.img'}", tmp_path / "dst.img"]
    cut = f"{sys.executable} {tmp_path / 'cut_rsh.py'} {1 << 20} {PYDR}"
    r = subprocess.run([PYDR, *map(str, argv), "--rsh", cut], capture_output=True, env=_env())
    assert r.returncode == 18, r.stderr
    assert b"the connection to pydr on h was lost" in r.stderr, r.stderr
    assert b"exited with status 9" in r.stderr, r.stderr
    assert (tmp_path / "dst.img").read_bytes() != a
    r = subprocess.run([PYDR, *map(str, argv), "--rsh", LOCAL_RSH, "--remote-pydr", PYDR],
                       capture_output=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dst.img").read_bytes() == a


def test_replicate_to_a_dead_site(tmp_path):
    """A remote replica whose site is down: replicate exits 18 with ssh's
    message, its job is recorded failed with that message, and no point is
    made; once the site is back the same command makes the point."""
    site = tmp_path / "site-b"
    site.mkdir()
    disk = tmp_path / "os.img"
    disk.write_bytes(random.Random(4).randbytes(8 << 20))
    down = tmp_path / "site-down"
    rsh = tmp_path / "rsh"
    rsh.write_text(f"#!/bin/sh\nif [ -e {down} ]; then\n"
                   f"  echo 'ssh: connect to host dr port 22: Connection refused' >&2; exit 255\n"
                   f"fi\nexec {LOCAL_RSH} \"$@\"\n")
    rsh.chmod(0o755)
    vault = tmp_path / "vault"
    assert run_cli("vault", "init", vault).returncode == 0
    r = run_cli("protect", "vm", "--vault", vault, "--disk", f"{disk}=dr:{site / 'os.img'}",
                "--rsh", rsh, "--remote-pydr", PYDR, env=_env())
    assert r.returncode == 0, r.stderr
    assert run_cli("replicate", "vm", "--vault", vault, env=_env()).returncode == 0
    down.touch()
    for cycle in range(3):
        r = run_cli("replicate", "vm", "--vault", vault, env=_env())
        assert r.returncode == 18, (cycle, r.stderr)
        assert b"Connection refused" in r.stderr, r.stderr
    jobs = [j for j in json.loads(run_cli("jobs", "--vault", vault, "--json").stdout)[::-1]
            if j["kind"] == "replicate"]  # oldest first
    assert [j["state"] for j in jobs] == ["succeeded"] + ["failed"] * 3, jobs
    assert all("Connection refused" in j["error"] for j in jobs[1:]), jobs
    points = json.loads(run_cli("points", "vm", "--vault", vault, "--json").stdout)
    assert [p["id"] for p in points] == [1]
    down.unlink()
    r = run_cli("replicate", "vm", "--vault", vault, env=_env())
    assert r.returncode == 0, r.stderr
    assert (site / "os.img").read_bytes() == disk.read_bytes()


def test_own_stdout_closed_is_quiet(tmp_path):
    """`pydr signature IMG -o - | head -c 8`: our stdout's reader left; not
    an error (exit 0, nothing on stderr). The signature (16384 blocks: ~280 KiB) is more
    than a pipe holds, so the broken pipe does happen."""
    img = tmp_path / "a.img"
    img.write_bytes(random.Random(5).randbytes(64 << 20))
    r = subprocess.run(f"{PYDR} signature {img} --block-size 4096 -o - | head -c 8 > /dev/null; "
                       "echo \"${PIPESTATUS[0]}\" >&2",
                       shell=True, executable="/bin/bash", capture_output=True)
    assert r.stderr.decode().strip() == "0", r.stderr


def test_a_broken_pipe_that_is_not_our_stdout_is_an_error(capsys):
    """report_error keeps the quiet case for StdoutClosed alone: any other
    broken pipe (a helper process, a socket) is an I/O error, said."""
    from pydr import errors as E
    from pydr.cli.common import report_error

    assert report_error(BrokenPipeError(32, "Broken pipe", "/run/x.sock")) == E.EXIT_IO
    assert "/run/x.sock: Broken pipe" in capsys.readouterr().err
    assert report_error(E.PeerGone("could not start pydr on h", path="h:/x")) == 18
    assert report_error(E.StdoutClosed(32, "Broken pipe", "<stdout>")) == 0
    assert capsys.readouterr().err.count("\n") == 1


def test_peer_killed_in_the_middle_of_a_signature(tmp_path):
    """The server is SIGKILLed after 64 KiB of a ~140 KiB signature: exit
    18, and no signature file (not even a partial one) is left."""
    import sys

    _images(tmp_path)
    (tmp_path / "cut_rsh.py").write_text(CUT_RSH)
    cut = f"{sys.executable} {tmp_path / 'cut_rsh.py'} {64 << 10} {PYDR}"
    sig = tmp_path / "f.sig"
    r = subprocess.run([PYDR, "signature", f"h:{tmp_path / 'src.img'}", "--block-size", "4096",
                        "-o", str(sig), "--rsh", cut], capture_output=True, env=_env())
    assert r.returncode == 18, r.stderr
    assert b"the connection to pydr on h was lost" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["cut_rsh.py", "dst.img", "src.img"]


def test_replicate_through_ssh_to_a_site_whose_sshd_is_down(tmp_path):
    """The first cycle of an item whose replica is behind a real ssh to a
    closed port: exit 18 with ssh's words, the job failed, no point."""
    if not shutil.which("ssh"):
        pytest.skip("needs openssh-client")
    disk = tmp_path / "os.img"
    disk.write_bytes(random.Random(6).randbytes(1 << 20))
    vault = tmp_path / "vault"
    assert run_cli("vault", "init", vault).returncode == 0
    rsh = "ssh -p 1 -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
    r = run_cli("protect", "vm", "--vault", vault, "--disk",
                f"{disk}=127.0.0.1:{tmp_path / 'replica.img'}", "--rsh", rsh)
    assert r.returncode == 0, r.stderr
    r = run_cli("replicate", "vm", "--vault", vault)
    assert r.returncode == 18, r.stderr
    assert b"Connection refused" in r.stderr and b"ssh exited with status 255" in r.stderr
    jobs = json.loads(run_cli("jobs", "--vault", vault, "--json").stdout)
    assert [j["state"] for j in jobs if j["kind"] == "replicate"] == ["failed"], jobs
    assert json.loads(run_cli("points", "vm", "--vault", vault, "--json").stdout) == []
    assert not (tmp_path / "replica.img").exists()


def test_a_chatty_rsh_neither_blocks_nor_floods_the_error(tmp_path):
    """200 KB on the rsh command's stderr (more than a pipe holds): a push
    still finishes; a failing one shows its last words, from the last 4 KiB
    kept."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(random.Random(8).randbytes(1 << 20))
    noise = "yes pydr-noise | head -c 200000 >&2; echo >&2"
    r = subprocess.run([PYDR, "resync", str(src), f"h:{dst}", "--remote-pydr", PYDR,
                        "--rsh", f"sh -c '{noise}; exec {LOCAL_RSH} \"$@\"' chatty"],
                       capture_output=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    assert dst.read_bytes() == src.read_bytes()
    r = run_cli("resync", src, "h:/srv/x.img",
                "--rsh", f"sh -c '{noise}; echo last words >&2; exit 255'")
    assert r.returncode == 18, r.stderr[-500:]
    assert r.stderr.endswith(b"| last words (sh exited with status 255)\n"), r.stderr[-500:]
    assert len(r.stderr) < 4096 + 500, len(r.stderr)

"""Remote resync over a real sshd on 127.0.0.1 (throwaway keys): push, pull,
a forced-command key confined to a root, a killed connection resumed, the
bytes on the wire, and fuzzed frames into the server."""

import contextlib
import io
import os
import random
import signal
import socket
import subprocess
import time

import pytest

from pydr.transport import protocol as P
from pydr.endpoints import parse_remote
from pydr.transport.server import serve

from conftest import PYDR, pydr_command, run_cli


def remote(sshd, *args, confined=False):
    rsh = sshd["confined" if confined else "rsh"]
    return run_cli("resync", *args, "--rsh", rsh, "--remote-pydr", PYDR, "--json",
                   env=dict(os.environ))


def images(tmp_path, size=8 << 20, seed=1):
    rng = random.Random(seed)
    a = rng.randbytes(size)
    b = bytearray(a)
    for off in rng.sample(range(0, size, 4096), size // 4096 // 50):
        b[off:off + 100] = rng.randbytes(100)
    (tmp_path / "old.img").write_bytes(a)
    (tmp_path / "new.img").write_bytes(bytes(b))
    return a, bytes(b)


def test_parse_remote():
    assert parse_remote("host:/srv/x") == ("host", "/srv/x")
    assert parse_remote("me@h:x.img") == ("me@h", "x.img")
    for local in ("/abs/x", "./a:b", "plain", "dir/a:b", ":x", "h:"):
        assert parse_remote(local) is None, local


def test_push_and_pull(sshd, tmp_path):
    a, b = images(tmp_path)
    target = tmp_path / "target.img"
    target.write_bytes(a)
    r = remote(sshd, tmp_path / "new.img", f"127.0.0.1:{target}")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == b
    pulled = tmp_path / "pulled.img"
    pulled.write_bytes(a[:1 << 20])  # shorter: grows
    r = remote(sshd, f"127.0.0.1:{tmp_path / 'new.img'}", pulled)
    assert r.returncode == 0, r.stderr
    assert pulled.read_bytes() == b
    assert subprocess.run(["cmp", str(pulled), str(tmp_path / "new.img")]).returncode == 0
    # and shrink the remote one
    (tmp_path / "small.img").write_bytes(b[:3 << 20])
    assert remote(sshd, tmp_path / "small.img", f"127.0.0.1:{target}").returncode == 0
    assert target.read_bytes() == b[:3 << 20]


def test_bytes_on_the_wire(sshd, tmp_path):
    """1% of the 4 KiB blocks and a 1 MiB run changed: the wire carries at
    most 1.1x the changed data plus 1% of the image."""
    import json

    size = 64 << 20
    rng = random.Random(3)
    a = os.urandom(size)
    b = bytearray(a)
    blocks = rng.sample(range(size // 4096), size // 4096 // 100)
    for blk in blocks:
        b[blk * 4096:blk * 4096 + 4096] = rng.randbytes(4096)
    b[20 << 20:21 << 20] = rng.randbytes(1 << 20)
    (tmp_path / "src.img").write_bytes(bytes(b))
    target = tmp_path / "dst.img"
    target.write_bytes(a)
    r = remote(sshd, tmp_path / "src.img", f"127.0.0.1:{target}")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    changed = st["bytes_written"]
    wire = st["bytes_sent"] + st["bytes_received"]
    assert changed >= len(blocks) * 4096
    assert wire <= 1.1 * changed + 0.01 * size, (wire, changed)
    assert target.read_bytes() == bytes(b)


def test_forced_command_is_confined_to_its_root(sshd, tmp_path):
    root = sshd["root"]
    a, b = images(tmp_path, size=1 << 20)
    r = remote(sshd, tmp_path / "new.img", "127.0.0.1:disk.img", confined=True)
    assert r.returncode == 0, r.stderr
    assert (root / "disk.img").read_bytes() == b
    outside = tmp_path / "outside.img"
    os.symlink(tmp_path, root / "escape")
    for spec in (f"127.0.0.1:{outside}", "127.0.0.1:../outside.img", "127.0.0.1:escape/outside.img",
                 "127.0.0.1:/etc/passwd"):
        r = remote(sshd, tmp_path / "new.img", spec, confined=True)
        assert r.returncode == 4, (spec, r.stderr)
        assert b"outside the directory" in r.stderr and b"Traceback" not in r.stderr
    assert not outside.exists()
    r = remote(sshd, "127.0.0.1:../../etc/hostname", tmp_path / "pulled", confined=True)
    assert r.returncode == 4 and not (tmp_path / "pulled").exists()


@pytest.mark.parametrize("streams", [0, 3])
def test_killed_connection_then_rerun(sshd, tmp_path, streams):
    """SIGKILL of the client in the middle of a push (over one connection,
    or with --streams 3), then the same command again: it finishes. The
    server is held (PYDR_STOP_AT) after its third journaled batch, so the
    client always dies mid-push; then the server, continued, finds the
    connection closed and keeps the journal."""
    import ctypes
    import shlex

    from pydr.engine import journal as J

    extra = ["--streams", str(streams)] if streams else []
    size = 192 << 20
    a = os.urandom(size)
    b = bytearray(a)
    for off in range(0, size, 1 << 20):
        b[off:off + (512 << 10)] = os.urandom(512 << 10)
    (tmp_path / "src.img").write_bytes(bytes(b))
    target = tmp_path / "dst.img"
    target.write_bytes(a)
    journal = J.journal_path(target)
    pidfile = tmp_path / "server.pid"
    # the server runs here, in place of ssh, with the stop point armed
    rsh = shlex.join(["sh", "-c", f'echo $$ >> {shlex.quote(str(pidfile))}; '
                      'export PYDR_STOP_AT=apply.journaled:3; eval "exec $2"', "rsh"])
    cmd = pydr_command() + ["resync", str(tmp_path / "src.img"), f"127.0.0.1:{target}", *extra,
                            "--rsh", rsh, "--remote-pydr", PYDR]
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # the orphaned server becomes our child
    try:
        p = subprocess.Popen(cmd, stderr=subprocess.PIPE, cwd=tmp_path)
        server = _wait_stopped(pidfile, p)
        p.send_signal(signal.SIGKILL)  # the client dies: the connection drops
        p.wait()
        os.kill(server, signal.SIGCONT)
        for pid in _pids(pidfile):  # the server and its --streams relays see it and end
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    assert os.path.exists(journal)  # kept: the target can be finished or rolled back
    assert J.read_journal(journal) == (J.read_journal(journal)[0], False)  # not committed
    assert target.read_bytes() != bytes(b)
    r = remote(sshd, tmp_path / "src.img", f"127.0.0.1:{target}", *extra)
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == bytes(b)
    assert not os.path.exists(journal)


def _pids(pidfile):
    return [int(line) for line in pidfile.read_text().split()] if pidfile.exists() else []


def _wait_stopped(pidfile, client):
    """The pid of the server once it stopped at its PYDR_STOP_AT point (a
    stop lasts until SIGCONT: waiting for it is not a race)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert client.poll() is None, client.stderr.read().decode()
        for pid in _pids(pidfile):
            with contextlib.suppress(FileNotFoundError, IndexError):
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "T":
                        return pid
        time.sleep(0.01)
    raise AssertionError("the server never reached its stop point")


def _hello():
    import json

    body = json.dumps({"protocol": P.VERSION}).encode()
    return P.HEADER.pack(len(body), P.HELLO, 0) + body


def test_fuzzed_frames_never_crash_the_server(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    (tmp_path / "f.img").write_bytes(os.urandom(100_000))
    frame = st.builds(lambda t, f, body: P.HEADER.pack(len(body), t, f) + body,
                      st.integers(0, 22), st.sampled_from([0, 0, 0, 1]), st.binary(max_size=300))
    lying = st.builds(lambda t, n: P.HEADER.pack(n, t, 0), st.integers(1, 21),
                      st.integers(P.MAX_PAYLOAD - 5, 2**32 - 1))
    junk = st.binary(max_size=200)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.one_of(frame, lying, junk), max_size=6))
    def run(parts):
        out = io.BytesIO()
        try:
            serve(io.BytesIO(_hello() + b"".join(parts)), out, root=str(tmp_path))
        except (P.ProtocolError, ConnectionResetError):
            pass
        # whatever it answered is well-formed frames
        data, pos = out.getvalue(), 0
        while pos < len(data):
            length, ftype, flags = P.HEADER.unpack_from(data, pos)
            assert ftype in P.NAMES and flags == 0 and length <= P.MAX_PAYLOAD
            pos += P.HEADER.size + length
        assert pos == len(data)

    run()
    assert sorted(os.listdir(tmp_path)) == ["f.img"]


def test_through_a_slow_link(sshd, tmp_path):
    """Push and pull through a relay that adds 60 ms of round trip: same
    results (the protocol does not depend on timing)."""
    import socket as s_

    from relay import relay

    a, b = images(tmp_path, size=4 << 20, seed=9)
    port = int(sshd["rsh"].split("-p ")[1].split()[0])
    with s_.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        relay_port = probe.getsockname()[1]
    server = relay(relay_port, port, 0.03)
    try:
        slow = sshd["rsh"].replace(f"-p {port}", f"-p {relay_port}")
        target = tmp_path / "slow.img"
        target.write_bytes(a)
        r = run_cli("resync", tmp_path / "new.img", f"127.0.0.1:{target}", "--rsh", slow,
                    "--remote-pydr", PYDR, env=dict(os.environ))
        assert r.returncode == 0, r.stderr
        assert target.read_bytes() == b
        back = tmp_path / "back.img"
        r = run_cli("resync", f"127.0.0.1:{target}", back, "--rsh", slow,
                    "--remote-pydr", PYDR, env=dict(os.environ))
        assert r.returncode == 0, r.stderr
        assert back.read_bytes() == b
    finally:
        server.close()


def test_bwlimit_paces_the_push(sshd, tmp_path):
    import json

    (tmp_path / "src.img").write_bytes(os.urandom(3 << 20))
    target = tmp_path / "t.img"
    target.write_bytes(bytes(3 << 20))
    t = time.monotonic()
    r = run_cli("resync", tmp_path / "src.img", f"127.0.0.1:{target}", "--rsh", sshd["rsh"],
                "--remote-pydr", PYDR, "--bwlimit", "4M", "--json", env=dict(os.environ))
    elapsed = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    sent = json.loads(r.stdout)["bytes_sent"]
    assert sent > 3 << 20
    assert elapsed >= sent / (4 << 20) * 0.9  # a lower bound: a slow machine only adds time
    assert target.read_bytes() == (tmp_path / "src.img").read_bytes()
    # a pull: the server holds the source and paces what it sends
    back = tmp_path / "back.img"
    back.write_bytes(bytes(3 << 20))
    t = time.monotonic()
    r = run_cli("resync", f"127.0.0.1:{tmp_path / 'src.img'}", back, "--rsh", sshd["rsh"],
                "--remote-pydr", PYDR, "--bwlimit", "4M", "--json", env=dict(os.environ))
    elapsed = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    received = json.loads(r.stdout)["bytes_received"]
    assert received > 3 << 20 and elapsed >= received / (4 << 20) * 0.9
    assert back.read_bytes() == (tmp_path / "src.img").read_bytes()


def test_compress(sshd, tmp_path):
    import json

    pytest.importorskip("zstandard")
    words = b"replica failover commit reprotect failback vault journal extent "
    text = (words * ((8 << 20) // len(words) + 1))[:8 << 20]
    (tmp_path / "text.img").write_bytes(text)
    target = tmp_path / "t.img"
    target.write_bytes(os.urandom(8 << 20))
    r = run_cli("resync", tmp_path / "text.img", f"127.0.0.1:{target}", "--rsh", sshd["rsh"],
                "--remote-pydr", PYDR, "--compress", "--json", env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["bytes_written"] == 8 << 20 and st["bytes_sent"] < (1 << 20)
    assert target.read_bytes() == text
    back = tmp_path / "back.img"
    r = run_cli("resync", f"127.0.0.1:{target}", back, "--rsh", sshd["rsh"], "--remote-pydr", PYDR,
                "--compress", "--json", env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes_received"] < (1 << 20) and back.read_bytes() == text


def test_compressed_frames_are_bounded(tmp_path):
    """A zstd bomb in a RECORDS frame is a protocol error, not 20 MiB."""
    import json

    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "t.img").write_bytes(bytes(4096))
    hello = json.dumps({"protocol": P.VERSION, "capabilities": ["zstd"]}).encode()
    apply = json.dumps({"path": "t.img", "block_size": 4096, "result_size": 4096}).encode()
    bomb = zstandard.ZstdCompressor().compress(bytes(20 << 20))
    stream = (P.HEADER.pack(len(hello), P.HELLO, 0) + hello +
              P.HEADER.pack(len(apply), P.APPLY, 0) + apply +
              P.HEADER.pack(len(bomb), P.RECORDS, P.FLAG_ZSTD) + bomb)
    out = io.BytesIO()
    serve(io.BytesIO(stream), out, root=str(tmp_path))
    assert b"does not decompress" in out.getvalue() or b"past the limit" in out.getvalue()
    assert (tmp_path / "t.img").read_bytes() == bytes(4096)
    # without negotiating zstd, the flag itself is refused
    plain = json.dumps({"protocol": P.VERSION}).encode()
    out = io.BytesIO()
    serve(io.BytesIO(P.HEADER.pack(len(plain), P.HELLO, 0) + plain +
                     P.HEADER.pack(len(bomb), P.RECORDS, P.FLAG_ZSTD) + bomb), out, root=str(tmp_path))
    assert b"bad frame header" in out.getvalue()


def test_remote_signature(sshd, tmp_path):
    import pydr

    a, _ = images(tmp_path, size=3 << 20)
    r = run_cli("signature", f"127.0.0.1:{tmp_path / 'old.img'}", "-o", tmp_path / "r.sig",
                "--block-size", "4K", "--rsh", sshd["rsh"], "--remote-pydr", PYDR,
                env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert pydr.Signature.load(tmp_path / "r.sig") == pydr.signature(tmp_path / "old.img", block_size=4096)
    r = run_cli("signature", "127.0.0.1:/nonexistent.img", "-o", tmp_path / "x.sig",
                "--rsh", sshd["rsh"], "--remote-pydr", PYDR, env=dict(os.environ))
    assert r.returncode == 3 and b"nonexistent" in r.stderr and not (tmp_path / "x.sig").exists()


def cli(sshd, *args, confined=False):
    rsh = sshd["confined" if confined else "rsh"]
    return run_cli(*args, "--rsh", rsh, "--remote-pydr", PYDR, env=dict(os.environ))


def test_delta_and_apply_with_remote_paths(sshd, tmp_path):
    """Every path of signature/delta/apply may be host:PATH; the results are
    the bytes the local commands give."""
    a, b = images(tmp_path)
    old, new = tmp_path / "old.img", tmp_path / "new.img"
    h = "127.0.0.1:"
    # signature: local image -> remote file, remote image -> remote file
    assert cli(sshd, "signature", old, "-o", f"{h}{tmp_path / 'r1.sig'}", "--block-size", "4K").returncode == 0
    assert cli(sshd, "signature", f"{h}{old}", "-o", f"{h}{tmp_path / 'r2.sig'}",
               "--block-size", "4K").returncode == 0
    assert run_cli("signature", old, "-o", tmp_path / "l.sig", "--block-size", "4K").returncode == 0
    assert (tmp_path / "r1.sig").read_bytes() == (tmp_path / "l.sig").read_bytes() \
        == (tmp_path / "r2.sig").read_bytes()
    # the reference delta, made locally
    assert run_cli("delta", new, "--against", tmp_path / "l.sig", "-o", tmp_path / "l.delta").returncode == 0
    ref = (tmp_path / "l.delta").read_bytes()
    cases = {
        "remote-out": ("delta", new, "--against", tmp_path / "l.sig", "-o", f"{h}{tmp_path / 'd1'}"),
        "remote-sig": ("delta", new, "--against", f"{h}{tmp_path / 'l.sig'}", "-o", tmp_path / "d2"),
        "remote-base-image": ("delta", new, "--target", f"{h}{old}", "-o", tmp_path / "d3"),
        "remote-source": ("delta", f"{h}{new}", "--against", tmp_path / "l.sig", "-o", tmp_path / "d4"),
        "all-remote": ("delta", f"{h}{new}", "--target", f"{h}{old}", "-o", f"{h}{tmp_path / 'd5'}"),
    }
    for label, args in cases.items():
        r = cli(sshd, *args)
        assert r.returncode == 0, (label, r.stderr)
    for i in range(1, 6):
        assert (tmp_path / f"d{i}").read_bytes() == ref, i
    # apply: local delta -> remote target, remote delta -> local target
    (tmp_path / "t1.img").write_bytes(a)
    (tmp_path / "t2.img").write_bytes(a)
    r = cli(sshd, "apply", tmp_path / "l.delta", f"{h}{tmp_path / 't1.img'}", "--json", "--verify")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t1.img").read_bytes() == b
    import json
    assert json.loads(r.stdout)["bytes_written"] > 0
    r = cli(sshd, "apply", f"{h}{tmp_path / 'l.delta'}", tmp_path / "t2.img")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t2.img").read_bytes() == b
    # twice: the remote target already holds the result, and it says so
    r = cli(sshd, "apply", tmp_path / "l.delta", f"{h}{tmp_path / 't1.img'}", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["already_applied"], r.stderr
    assert (tmp_path / "t1.img").read_bytes() == b


def test_remote_apply_refuses_bad_deltas_and_loses_nothing(sshd, tmp_path):
    a, b = images(tmp_path)
    h = "127.0.0.1:"
    assert run_cli("delta", tmp_path / "new.img", "--target", tmp_path / "old.img",
                   "-o", tmp_path / "good.delta").returncode == 0
    good = (tmp_path / "good.delta").read_bytes()
    target = tmp_path / "t.img"
    # a flipped byte in the middle: corrupt (exit 7), naming the local delta and an offset
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    (tmp_path / "bad.delta").write_bytes(bytes(bad))
    target.write_bytes(a)
    r = cli(sshd, "apply", tmp_path / "bad.delta", f"{h}{target}")
    assert r.returncode == 7, r.stderr
    assert str(tmp_path / "bad.delta").encode() in r.stderr and b"offset" in r.stderr
    assert b"Traceback" not in r.stderr
    assert target.read_bytes() == a and not any(p.name.endswith("pydr-undo") for p in tmp_path.iterdir())
    # truncated
    (tmp_path / "short.delta").write_bytes(good[:len(good) * 2 // 3])
    r = cli(sshd, "apply", tmp_path / "short.delta", f"{h}{target}")
    assert r.returncode == 7 and target.read_bytes() == a, r.stderr
    # the wrong base: refused (exit 8), the target restored
    other = bytearray(a)
    other[:4096 * 64] = os.urandom(4096 * 64)
    target.write_bytes(bytes(other))
    r = cli(sshd, "apply", tmp_path / "good.delta", f"{h}{target}")
    assert r.returncode == 8, r.stderr
    assert target.read_bytes() == bytes(other)
    # a remote output outside a confined root: refused, nothing created
    r = cli(sshd, "delta", tmp_path / "new.img", "--target", tmp_path / "old.img",
            "-o", f"{h}../escape.delta", confined=True)
    assert r.returncode == 4, r.stderr
    assert not (sshd["root"].parent / "escape.delta").exists()
    # a remote source that does not exist: exit 3, no output left behind
    r = cli(sshd, "delta", f"{h}{tmp_path / 'missing.img'}", "--target", tmp_path / "old.img",
            "-o", tmp_path / "m.delta")
    assert r.returncode == 3 and b"missing.img" in r.stderr and not (tmp_path / "m.delta").exists()


def test_fuzzed_streams_into_file_requests(tmp_path):
    """WRITE, PATCH and DELTA requests followed by fuzzed BYTES: the image is
    never changed, no temp or journal file is left, and a WRITE creates its
    file only when END arrives."""
    import json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    image = os.urandom(64 << 10)
    (tmp_path / "f.img").write_bytes(image)

    def frame(ftype, body=b""):
        return P.HEADER.pack(len(body), ftype, 0) + body

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(op=st.sampled_from([P.WRITE, P.PATCH, P.DELTA]),
           chunks=st.lists(st.binary(max_size=400), max_size=4), end=st.booleans())
    def run(op, chunks, end):
        path = "out.bin" if op == P.WRITE else "f.img"
        stream = _hello() + frame(op, json.dumps({"path": path}).encode())
        stream += b"".join(frame(P.BYTES, c) for c in chunks) + (frame(P.END) if end else b"")
        try:
            serve(io.BytesIO(stream), io.BytesIO(), root=str(tmp_path))
        except (P.ProtocolError, ConnectionResetError):
            pass
        assert (tmp_path / "f.img").read_bytes() == image
        names = set(os.listdir(tmp_path)) - {"f.img"}
        if op == P.WRITE and end:
            assert names == {"out.bin"} and (tmp_path / "out.bin").read_bytes() == b"".join(chunks)
            os.unlink(tmp_path / "out.bin")
        else:
            assert not names, names

    run()


def test_push_over_several_streams(sshd, tmp_path):
    """--streams 3: the records go over three more ssh connections and are
    applied in order; same bytes as one connection, through a slow link too,
    and a push killed in the middle is finished by running it again."""
    import json

    from relay import relay

    a, b = images(tmp_path, size=24 << 20, seed=5)
    b = b[:4 << 20] + os.urandom(9 << 20) + b[13 << 20:]  # records of the largest size too
    (tmp_path / "new.img").write_bytes(b)
    target = tmp_path / "t.img"
    target.write_bytes(a)
    r = remote(sshd, tmp_path / "new.img", f"127.0.0.1:{target}", "--streams", "3")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == b and json.loads(r.stdout)["bytes_written"] > 0
    port = int(sshd["rsh"].split("-p ")[1].split()[0])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        relay_port = probe.getsockname()[1]
    server = relay(relay_port, port, 0.02)
    try:
        target.write_bytes(a)
        r = run_cli("resync", tmp_path / "new.img", f"127.0.0.1:{target}", "--streams", "2",
                    "--rsh", sshd["rsh"].replace(f"-p {port}", f"-p {relay_port}"),
                    "--remote-pydr", PYDR, "--compress", env=dict(os.environ))
        assert r.returncode == 0, r.stderr
        assert target.read_bytes() == b
    finally:
        server.close()
    # an empty source over streams: the target is truncated
    (tmp_path / "empty").write_bytes(b"")
    assert remote(sshd, tmp_path / "empty", f"127.0.0.1:{target}", "--streams", "2").returncode == 0
    assert target.read_bytes() == b""


def test_streams_admit_only_their_transfer():
    """A process that connects to a transfer's socket without its token (or
    with another index than expected) is dropped; the right one is let in."""
    import threading

    from pydr.transport import stripes as S

    token = S.new_token()
    listener = S.Listener(token, 1)
    got = {}
    t = threading.Thread(target=lambda: got.update(ch=listener.accept(timeout=10)))
    t.start()
    for bad in (S._AUTH.pack(b"0" * 32, 0), S._AUTH.pack(token.encode(), 7), b"short"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(S._address(token))
            s.sendall(bad)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""  # closed on us
    good = socket.socket(socket.AF_UNIX)
    good.connect(S._address(token))
    good.sendall(S._AUTH.pack(token.encode(), 0))
    t.join(10)
    assert len(got["ch"]) == 1
    good.sendall(P.HEADER.pack(0, P.END, 0))
    assert got["ch"][0].recv() == (P.END, b"")
    good.close()
    listener.shutdown()
    with pytest.raises(P.ProtocolError, match="only 0 of 2 streams"):
        S.Listener(S.new_token(), 2).accept(timeout=0.2)


def test_site_requests_touch_only_what_pydr_made(tmp_path):
    """REMOVE, RENAME, MATERIALIZE and APPLY's keep_undo act only on files
    pydr makes (steps: *.undo in .*.pydr-steps; .NAME.pydr-base/-new; disks
    a drill wrote, listed in its directory's marker): replicas and other
    files cannot be deleted, renamed or replaced through them."""
    import json

    (tmp_path / "f.img").write_bytes(b"x" * 8192)
    steps = tmp_path / ".f.img.pydr-steps"
    steps.mkdir()
    (steps / "vm-0-1.undo").write_bytes(b"not a journal")

    def ask(ftype, body):
        payload = json.dumps(body).encode()
        out = io.BytesIO()
        serve(io.BytesIO(_hello() + P.HEADER.pack(len(payload), ftype, 0) + payload), out,
              root=str(tmp_path))
        return out.getvalue()

    refused = (b"not a file pydr made", b"outside", b"not a recovery-point step",
               b"not a rename a failover makes")
    for body in ({"paths": ["f.img"]}, {"paths": [".f.img.pydr-steps/../f.img"]},
                 {"paths": ["../etc/x.undo"]}, {"paths": ["f.img"], "drill": "."}):
        assert any(m in ask(P.REMOVE, body) for m in refused), body
    for src, dst in (("f.img", "g.img"), ("f.img", ".g.img.pydr-base"), ("f.img", "sub/.f.img.pydr-base")):
        assert any(m in ask(P.RENAME, {"src": src, "dst": dst}) for m in refused)
    assert (tmp_path / "f.img").exists() and not (tmp_path / "g.img").exists()
    reply = ask(P.MATERIALIZE, {"replica": "f.img", "steps": ["f.img"], "dest": "out.img"})
    assert b"not a recovery-point step" in reply and not (tmp_path / "out.img").exists()
    reply = ask(P.MATERIALIZE, {"replica": "f.img", "steps": [".f.img.pydr-steps/vm-0-1.undo"],
                                "dest": "out.img"})
    assert b"damaged" in reply  # a step is checked before it is rolled back
    reply = ask(P.APPLY, {"path": "f.img", "block_size": 4096, "result_size": 8192,
                          "keep_undo": "kept.img"})
    assert b"not a recovery-point step" in reply
    assert ask(P.REMOVE, {"paths": [".f.img.pydr-steps/vm-0-1.undo"]}).count(b'"removed": 1') == 1
    assert sorted(os.listdir(tmp_path)) == [".f.img.pydr-steps", "f.img"]  # no half-made out.img
    # a drill's disks: written with the marker, removable only while listed there
    assert b'"size": 8192' in ask(P.MATERIALIZE, {"replica": "f.img", "steps": [],
                                                   "dest": "drill/f.img", "drill": True})
    assert b"does not overwrite" in ask(P.MATERIALIZE, {"replica": "f.img", "steps": [],
                                                        "dest": "drill/f.img", "drill": True})
    (tmp_path / "drill" / "mine.txt").write_bytes(b"user file")
    assert b"not a file pydr made" in ask(P.REMOVE, {"paths": ["drill/mine.txt"], "drill": "drill"})
    assert b'"removed": 1' in ask(P.REMOVE, {"paths": ["drill/f.img"], "drill": "drill"})
    assert sorted(os.listdir(tmp_path / "drill")) == ["mine.txt"]  # kept, and so is the dir
    assert (tmp_path / "f.img").read_bytes() == b"x" * 8192

"""The two-level, pipelined comparison of pydr.transport.exchange, end to end through
`pydr serve --stdio` (started by tests/local_rsh instead of ssh, so that
many small cases run quickly; test_remote.py does the same over a real
sshd): push and pull round trips on odd sizes, tiny windows and groups, and
the hashes on the wire following the changes rather than the image."""

import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydr.transport import exchange as X
from pydr.transport import protocol as P
from pydr.endpoints.transfer import resync as remote_resync

from conftest import LOCAL_RSH as RSH
from conftest import PYDR


def sync(src, dst, **kw):
    return remote_resync(src, dst, rsh=RSH, remote_pydr=PYDR, **kw)


@st.composite
def image_pair(draw):
    """(old, new): new made from old by rewrites, zeroing, growth or shrink."""
    size = draw(st.integers(0, 40)) * 4096 + draw(st.sampled_from([0, 0, 1, 100, 4095]))
    rng = random.Random(draw(st.integers(0, 2**32)))
    old = bytearray(rng.randbytes(size))
    new = bytearray(old)
    for _ in range(draw(st.integers(0, 6))):
        if not new:
            break
        at = rng.randrange(len(new))
        n = rng.choice([1, 100, 4096, 20000])
        new[at:at + n] = bytes(len(new[at:at + n])) if rng.random() < 0.3 else rng.randbytes(len(new[at:at + n]))
    change = draw(st.sampled_from(["same", "same", "grow", "shrink"]))
    if change == "grow":
        new += rng.randbytes(draw(st.integers(1, 30000)))
    elif change == "shrink" and new:
        del new[draw(st.integers(0, len(new) - 1)):]
    return bytes(old), bytes(new)


@pytest.mark.skipif(not os.access(PYDR, os.X_OK), reason="needs the installed pydr script")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pair=image_pair(), window_blocks=st.integers(1, 9), group=st.integers(1, 5),
       pull=st.booleans())
def test_round_trip(tmp_path_factory, pair, window_blocks, group, pull):
    old, new = pair
    d = tmp_path_factory.mktemp("x")
    (d / "src").write_bytes(new)
    (d / "dst").write_bytes(old)
    src, dst = str(d / "src"), str(d / "dst")
    if pull:
        st_ = sync(f"localhost:{src}", dst, window=window_blocks * 4096, group=group)
    else:
        st_ = sync(src, f"localhost:{dst}", window=window_blocks * 4096, group=group)
    assert (d / "dst").read_bytes() == new
    assert not os.path.exists(str(d / "dst") + ".pydr-journal")
    changed = sum(1 for b in range(0, max(len(old), len(new)), 4096)
                  if old[b:b + 4096] != new[b:b + 4096] and b < len(new))
    assert st_.blocks_changed <= changed + 1


@pytest.mark.skipif(not os.access(PYDR, os.X_OK), reason="needs the installed pydr script")
@pytest.mark.parametrize("pull", [False, True])
def test_hashes_on_the_wire_follow_the_changes(tmp_path, pull):
    """64 MiB image, three changed blocks close together: the 4 KiB hashes of
    one 128 KiB group cross the wire, not those of all 16,384 blocks."""
    size = 64 << 20
    old = bytearray(os.urandom(size))
    new = bytearray(old)
    for b in (1000, 1001, 1010):
        new[b * 4096:b * 4096 + 4096] = os.urandom(4096)
    (tmp_path / "src").write_bytes(new)
    (tmp_path / "dst").write_bytes(old)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    st_ = sync(f"h:{src}", dst) if pull else sync(src, f"h:{dst}")
    assert (tmp_path / "dst").read_bytes() == new
    assert st_.blocks_changed == 3 and st_.bytes_written == 3 * 4096
    coarse = size // (X.GROUP * 4096) * 16          # 8 KiB of group digests
    fine = X.GROUP * 16                               # one group's 4 KiB hashes
    wire = st_.bytes_sent + st_.bytes_received
    assert wire < 3 * (4096 + 64) + coarse + fine + 4096, wire  # + frame headers and JSON
    # all 4 KiB hashes would be 256 KiB on their own (version 1 sent them)
    assert wire < size // 4096 * 16 // 8


def test_group_digests_match_per_group_hashing():
    from pydr.engine import bindings as B

    rng = np.random.default_rng(1)
    h = rng.integers(0, 2**63, size=2 * 70, dtype=np.uint64).tobytes()
    got = bytes(X.group_digests(h, 70, 4096, 32))
    assert len(got) == 3 * 16
    for g in range(3):
        block = h[16 * 32 * g:16 * min(70, 32 * (g + 1))]
        assert got[16 * g:16 * g + 16] == bytes(B.hashes_digest_ranges(
            block, len(block) // 16, 4096, np.array([0, len(block) // 16 * 4096], np.uint64)))


def test_target_side_refuses_bad_coarse_frames(tmp_path):
    from pydr.engine import bindings as B
    from pydr.engine.progress import Throttle

    from pydr.engine.devices import FileDevice

    (tmp_path / "t").write_bytes(os.urandom(1 << 20))
    dev = FileDevice(tmp_path / "t")
    sent = []
    side = X.TargetSide(dev, 1 << 20, 4096, lambda *f: sent.append(f),
                        threads=1, shared=B.Progress(), throttle=Throttle(None, "x", "t", 0))
    try:
        bad = [b"",                                                     # short
               X.COARSE_HEAD.pack(4096, 4096, 1) + bytes(16),          # not in order
               X.COARSE_HEAD.pack(0, 8192, 1) + bytes(16),             # digests missing
               X.COARSE_HEAD.pack(0, 4096, 0),                         # group 0
               X.COARSE_HEAD.pack(0, (X.MAX_WINDOW_BLOCKS + 1) * 4096, 1 << 16)]  # window too large
        for payload in bad:
            with pytest.raises(P.ProtocolError):
                side.coarse(payload)
        assert not sent
        side.coarse(X.COARSE_HEAD.pack(0, 8192, 1) + bytes(32))  # a good one is answered
        (ftype, payload), = sent
        assert ftype == P.FINE and X.FINE_HEAD.unpack_from(payload) == (0, 8192, 2)
    finally:
        dev.close()

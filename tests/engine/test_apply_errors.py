"""Bad input for delta/apply/resync: a clear error, the target unchanged."""

import os
import random
import subprocess
from pathlib import Path

import pytest

import pydr
from pydr.engine import journal as J

from conftest import pydr_command, run_cli


@pytest.fixture
def pair(tmp_path):
    rng = random.Random(1)
    a = rng.randbytes(3 << 20)
    b = bytearray(a)
    for off in (0, 70_000, 1 << 20, 2_500_000):
        b[off:off + 20_000] = rng.randbytes(20_000)
    b[1_500_000:1_700_000] = bytes(200_000)
    (tmp_path / "a.img").write_bytes(a)
    (tmp_path / "b.img").write_bytes(bytes(b))
    pydr.make_delta(tmp_path / "b.img", tmp_path / "d.delta", target=tmp_path / "a.img")
    return tmp_path, a, bytes(b)


def assert_untouched(path, content):
    assert path.read_bytes() == content
    assert not os.path.exists(J.journal_path(path))


def cli_error(r, code, *needles):
    err = r.stderr.decode()
    assert r.returncode == code, (r.returncode, err)
    assert "Traceback" not in err and err.startswith("pydr: ") and err.count("\n") == 1, err
    for n in needles:
        assert str(n) in err, (n, err)


def test_truncated_delta_at_many_points(pair):
    d, a, _ = pair
    raw = (d / "d.delta").read_bytes()
    bad = d / "bad.delta"
    cuts = [0, 5, 50, 95, 96, 97, 150, 160, len(raw) // 3, len(raw) // 2, len(raw) - 65,
            len(raw) - 64, len(raw) - 1]
    for cut in cuts:
        bad.write_bytes(raw[:cut])
        with pytest.raises(pydr.CorruptDelta) as info:
            pydr.apply_delta(bad, d / "a.img")
        assert str(bad) in str(info.value)
        assert_untouched(d / "a.img", a)


def test_flipped_bytes_everywhere(pair):
    d, a, _ = pair
    raw = bytearray((d / "d.delta").read_bytes())
    bad = d / "bad.delta"
    positions = list(range(0, 96, 7)) + list(range(96, 96 + 64, 5)) + \
        list(range(200, len(raw), len(raw) // 40)) + list(range(len(raw) - 64, len(raw), 9))
    for pos in positions:
        flipped = bytearray(raw)
        flipped[pos] ^= 0x10
        bad.write_bytes(bytes(flipped))
        with pytest.raises(pydr.PydrError) as info:
            pydr.apply_delta(bad, d / "a.img")
        assert isinstance(info.value, (pydr.CorruptDelta, pydr.BaseMismatch)), (pos, info.value)
        assert_untouched(d / "a.img", a)


def test_trailing_garbage(pair):
    d, a, _ = pair
    (d / "bad.delta").write_bytes((d / "d.delta").read_bytes() + b"x")
    with pytest.raises(pydr.CorruptDelta, match="after the end"):
        pydr.apply_delta(d / "bad.delta", d / "a.img")
    assert_untouched(d / "a.img", a)


@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b"garbage!" * 100, "bad magic")])
def test_empty_and_garbage(pair, content, needle):
    d, a, _ = pair
    (d / "bad.delta").write_bytes(content)
    r = run_cli("apply", d / "bad.delta", d / "a.img")
    cli_error(r, 7, needle, d / "bad.delta")
    assert_untouched(d / "a.img", a)


def test_signature_file_given_as_delta(pair):
    d, a, _ = pair
    pydr.signature(d / "a.img").save(d / "a.sig")
    r = run_cli("apply", d / "a.sig", d / "a.img")
    cli_error(r, 7, "bad magic")
    assert_untouched(d / "a.img", a)


def test_delta_for_another_base(pair):
    d, a, _ = pair
    other = bytearray(a)
    other[75_000] ^= 1  # inside a block the delta replaces
    (d / "other.img").write_bytes(bytes(other))
    r = run_cli("apply", d / "d.delta", d / "other.img")
    cli_error(r, 8, "does not hold the image", "offset 69632")  # the record's start
    assert_untouched(d / "other.img", bytes(other))


def test_delta_for_a_base_of_another_size(pair):
    d, a, _ = pair
    (d / "short.img").write_bytes(a[:1000])
    r = run_cli("apply", d / "d.delta", d / "short.img")
    cli_error(r, 8, "1000 bytes")
    assert_untouched(d / "short.img", a[:1000])


def test_same_delta_twice(pair):
    """Applied again (as after a run killed once it had finished): the whole
    target is checked, found to hold the result, left as it is; exit 0."""
    d, a, b = pair
    assert run_cli("apply", d / "d.delta", d / "a.img").returncode == 0
    r = run_cli("apply", d / "d.delta", d / "a.img")
    assert r.returncode == 0 and b"already holds the delta's result" in r.stdout, r.stderr
    assert_untouched(d / "a.img", b)


def test_a_target_that_holds_the_result_only_in_part_is_refused(pair):
    """The delta's records find their result there, but the target differs
    elsewhere: that is not "already applied", and nothing is written."""
    d, a, b = pair
    partly = bytearray(b)
    partly[-1] ^= 0xFF  # past every block the delta's first record replaces
    (d / "partly.img").write_bytes(bytes(partly))
    r = run_cli("apply", d / "d.delta", d / "partly.img")
    # 8, never 12: exit 12 says the work is done, and this target is not the result
    cli_error(r, 8, d / "partly.img", "not all of it", "offset 0")
    assert_untouched(d / "partly.img", bytes(partly))


def test_corrupt_signature_for_delta(pair):
    d, _, _ = pair
    (d / "bad.sig").write_bytes(b"PYDRSIG\x00" + bytes(100))
    r = run_cli("delta", d / "b.img", "--against", d / "bad.sig", "-o", d / "x.delta")
    cli_error(r, 7, d / "bad.sig")
    assert not (d / "x.delta").exists()


def test_missing_paths(pair):
    d, a, _ = pair
    cli_error(run_cli("apply", d / "nope.delta", d / "a.img"), 3, "nope.delta")
    cli_error(run_cli("apply", d / "d.delta", d / "nope.img"), 3, "nope.img")
    cli_error(run_cli("resync", d / "nope.img", d / "a.img"), 3, "nope.img")
    cli_error(run_cli("delta", d / "nope.img", "--target", d / "a.img", "-o", d / "x"), 3)
    assert_untouched(d / "a.img", a)


def test_directory_target(pair):
    d, _, _ = pair
    (d / "dir").mkdir()
    cli_error(run_cli("apply", d / "d.delta", d / "dir"), 10, "dir")
    cli_error(run_cli("resync", d / "b.img", d / "dir"), 10, "dir")


def test_read_only_target(pair):
    d, a, _ = pair
    target = d / "a.img"
    target.chmod(0o444)
    cmd = pydr_command() + ["apply", str(d / "d.delta"), str(target)]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] + cmd
    r = subprocess.run(cmd, capture_output=True, cwd=d, timeout=60)
    cli_error(r, 4, "Permission denied", target)
    target.chmod(0o644)
    assert_untouched(target, a)


def test_src_and_dst_the_same(pair):
    d, a, _ = pair
    cli_error(run_cli("resync", d / "a.img", d / "a.img"), 13, "same file")
    cli_error(run_cli("delta", d / "a.img", "--target", d / "a.img", "-o", d / "x"), 13)
    assert_untouched(d / "a.img", a)


def test_rollback_without_journal(pair):
    d, _, _ = pair
    cli_error(run_cli("rollback", d / "a.img"), 3, "no interrupted apply")


def test_no_space_left(tmp_path):
    """ENOSPC while applying: the target is restored, nothing is left over."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        target = mnt / "t.img"
        with open(target, "wb") as f:  # 4 MiB sparse: almost no space used
            f.truncate(4 << 20)
            f.seek(0)
            f.write(b"header")
        before = target.read_bytes()
        (tmp_path / "full.img").write_bytes(b"header" + os.urandom((4 << 20) - 6))
        pydr.make_delta(tmp_path / "full.img", tmp_path / "d", target=target)
        r = run_cli("apply", tmp_path / "d", target)
        cli_error(r, 6, "No space left", target)
        assert target.read_bytes() == before
        assert os.listdir(mnt) == ["t.img"]
    finally:
        subprocess.run(["umount", str(mnt)])


def test_eio_while_applying_then_rollback(faulty_image, tmp_path, monkeypatch):
    """EIO on target writes: the automatic restore hits the same bad range,
    so the journal is kept (exit 11) and, once the device is healthy again,
    'pydr rollback' restores the exact old contents."""
    rng = random.Random(8)
    old = rng.randbytes(8 << 20)
    new = bytearray(old)
    new[1 << 20:(1 << 20) + 10] = b"0123456789"  # written fine
    new[6 << 20:(6 << 20) + 10] = b"0123456789"  # the bad range
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(bytes(new))
    pydr.make_delta(tmp_path / "new.img", tmp_path / "d", target=tmp_path / "old.img")
    backing = tmp_path / "backing.img"
    backing.write_bytes(old)
    jdir = tmp_path / "journals"
    monkeypatch.setenv("PYDR_JOURNAL_DIR", str(jdir))
    path, _ = faulty_image(6 << 20, (6 << 20) + 1, mode="write", backing=backing)
    r = run_cli("apply", tmp_path / "d", path, env={**os.environ, "PYDR_JOURNAL_DIR": str(jdir)})
    cli_error(r, 11, "Input/output error", "pydr rollback")
    # any other command refuses the target now, naming both ways out
    r = run_cli("signature", path, "-o", tmp_path / "s", env={**os.environ, "PYDR_JOURNAL_DIR": str(jdir)})
    cli_error(r, 11, "pydr apply", "pydr rollback")
    faulty_image.unmount_all()
    path, _ = faulty_image(1 << 40, (1 << 40) + 1, mode="write", backing=backing,
                           mountpoint=Path(path).parent)  # the same device, healthy now
    r = run_cli("rollback", path, env={**os.environ, "PYDR_JOURNAL_DIR": str(jdir)})
    assert r.returncode == 0, r.stderr
    faulty_image.unmount_all()
    assert backing.read_bytes() == old
    assert os.listdir(jdir) == []


def test_fuzz_record_parser_and_apply(tmp_path):
    """Random and mutated byte strings through the C record scanner and the
    verify-and-journal step: errors only, never a crash or a write."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from pydr.engine import bindings as B

    target = tmp_path / "t.img"
    content = os.urandom(64 << 10)
    target.write_bytes(content)
    good = B.record_build(B.DATA, 4096, 4096, (1, 2), 0, 0) + bytes(4096)
    fd = os.open(target, os.O_RDONLY)
    device = B.Device.open_fd(fd, name=str(target))
    scratch = bytearray(B.RECORD_MAX + 4096)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.one_of(st.binary(max_size=5000),
                     st.builds(lambda pos, val: good[:pos] + bytes([val]) + good[pos + 1:],
                               st.integers(0, len(good) - 1), st.integers(0, 255))))
    def run(blob):
        try:
            complete, count, bound, end = B.records_scan(blob)
        except pydr.CorruptDelta:
            return
        journal = bytearray(B.journal_capacity(bound, count, 4096))
        try:
            device.apply_prepare(blob[:complete], 4096, len(content), len(content),
                                 B.ApplyState(), scratch, journal)
        except (pydr.CorruptDelta, pydr.BaseMismatch, OSError, pydr.PydrError):
            pass

    try:
        run()
    finally:
        device.close()
        os.close(fd)
    assert target.read_bytes() == content

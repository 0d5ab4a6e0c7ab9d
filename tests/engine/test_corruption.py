"""The corruption sweep: every file pydr reads back -- signature, delta,
undo journal (uncommitted: a rerun or a rollback reads it), signature
cache -- with a bit flipped in its header, in its payload and at its end,
and cut short. The command that reads it must never exit 0 with wrong data
and never 1 (an internal bug): the damage is exit 7, naming the file.
Contents are checked against hashlib (SHA-256) as the oracle. The steps of
a vault (committed journals) and vault.db: tests/dr/test_damaged_points.py."""

import hashlib
import os
import random

import pytest
import xxhash

import pydr
from pydr.engine import journal as J

from conftest import run_cli, sha

HEADER = 96  # signature, delta and undo journal headers alike (docs/FORMAT.md)
RECORD = 64


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def cut(path, nbytes):
    os.truncate(path, os.path.getsize(path) - nbytes)


def damages(payload_at):
    """(name, function(path)) for the four kinds of damage; `payload_at`:
    an offset inside the first payload the file holds."""
    return [
        ("header", lambda p: flip(p, 20)),
        ("payload", lambda p: flip(p, payload_at)),
        ("end", lambda p: flip(p, os.path.getsize(p) - 1)),
        ("truncated", lambda p: cut(p, 37)),
    ]


DAMAGES = ["header", "payload", "end", "truncated"]


def damage(path, kind, payload_at):
    dict(damages(payload_at))[kind](path)


def assert_damage_reported(r, path):
    err = r.stderr.decode()
    assert r.returncode == 7, (r.returncode, err)
    assert "Traceback" not in err and str(path) in err and "offset" in err, err


@pytest.fixture
def images(tmp_path):
    """old.img and new.img (5 changed regions, one zeroed, so a delta and an
    undo journal hold several DATA and ZERO records), and d.delta."""
    rng = random.Random(3)
    old = rng.randbytes(3 << 20)
    new = bytearray(old)
    for off in (0, 70_000, 1 << 20, 2_500_000):
        new[off:off + 20_000] = rng.randbytes(20_000)
    new[1_500_000:1_700_000] = bytes(200_000)
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(bytes(new))
    pydr.make_delta(tmp_path / "new.img", tmp_path / "d.delta", target=tmp_path / "old.img")
    return tmp_path, hashlib.sha256(old).hexdigest(), hashlib.sha256(new).hexdigest()


@pytest.mark.parametrize("kind", DAMAGES)
def test_signature(images, kind):
    d, _, _ = images
    assert run_cli("signature", d / "old.img", "-o", d / "old.sig").returncode == 0
    damage(d / "old.sig", kind, HEADER + 10)  # in the block hashes
    r = run_cli("delta", d / "new.img", "--against", d / "old.sig", "-o", d / "x.delta")
    assert_damage_reported(r, d / "old.sig")
    assert not (d / "x.delta").exists()


@pytest.mark.parametrize("kind", DAMAGES)
def test_delta(images, kind):
    d, old, _ = images
    damage(d / "d.delta", kind, HEADER + RECORD + 1000)
    r = run_cli("apply", d / "d.delta", d / "old.img")
    assert_damage_reported(r, d / "d.delta")
    assert sha(d / "old.img") == old  # untouched
    assert not os.path.exists(J.journal_path(d / "old.img"))


def interrupted_apply(d, crash_at):
    """old.img with an apply of d.delta killed at `crash_at`; returns the
    path of its (uncommitted) undo journal."""
    r = run_cli("apply", d / "d.delta", d / "old.img",
                env={**os.environ, "PYDR_CRASH_AT": crash_at})
    assert r.returncode == -9, r.stderr
    path = J.journal_path(d / "old.img")
    assert not J.read_journal(path)[1]  # uncommitted
    assert len(J.scan(path).records) >= 3
    return path


def first_data_payload(path):
    """The offset of the middle of the first DATA record's payload, which
    valid records follow."""
    found = J.scan(path)
    pos, size, kind = next((r[0], r[1], r[2]) for r in found.records[:-1] if r[2] == 1)
    return pos + RECORD + (size - RECORD) // 2


@pytest.mark.parametrize("command", ["rollback", "apply"])
@pytest.mark.parametrize("kind", DAMAGES)
def test_uncommitted_journal_whose_batch_was_written(images, kind, command):
    """Killed once the batch was written: every record's range holds new
    data, so no damage is a torn tail. A rollback, or the rerun of the
    apply (which rolls back first), reports it and writes no record that
    fails its checks."""
    d, old, new = images
    journal = interrupted_apply(d, "apply.written")
    damage(journal, kind, first_data_payload(journal))
    args = ("rollback", d / "old.img") if command == "rollback" else (
        "apply", d / "d.delta", d / "old.img")
    r = run_cli(*args)
    assert_damage_reported(r, journal)
    assert os.path.exists(journal)  # kept: nothing of it is thrown away
    r = run_cli(*args)  # and again: the same answer, never a success with wrong data
    assert_damage_reported(r, journal)


def test_a_damaged_record_header_inside_an_apply_journal(images):
    """A record header in the middle fails: its range, and those of the
    records after it, cannot be read, so it looks like a torn tail. The
    rollback without it does not give the apply's base back (its identity,
    in the journal's header): exit 7, the journal kept."""
    d, old, _ = images
    journal = interrupted_apply(d, "apply.written")
    second = J.scan(journal).records[1][0]
    flip(journal, second + 10)
    r = run_cli("rollback", d / "old.img")
    assert_damage_reported(r, journal)
    assert os.path.exists(journal)


def interrupted_resync(d, crash_at):
    """A resync of new.img onto old.img killed at `crash_at`; returns the
    path of its (uncommitted) undo journal."""
    r = run_cli("resync", d / "new.img", d / "old.img",
                env={**os.environ, "PYDR_CRASH_AT": crash_at})
    assert r.returncode == -9, r.stderr
    path = J.journal_path(d / "old.img")
    assert J.scan(path).header["kind"] == J.KIND_RESYNC
    assert len(J.scan(path).records) >= 3
    return path


@pytest.mark.parametrize("command", ["rollback", "resync"])
@pytest.mark.parametrize("kind", DAMAGES)
def test_uncommitted_resync_journal_whose_batch_was_written(images, kind, command):
    """The same for a resync's journal, which a rerun resumes (cutting a
    torn tail off) rather than rolls back: no base identity to check it
    against, so the tail is checked against the target first."""
    d, old, new = images
    journal = interrupted_resync(d, "apply.written")
    damage(journal, kind, first_data_payload(journal))
    args = ("rollback", d / "old.img") if command == "rollback" else (
        "resync", d / "new.img", d / "old.img")
    r = run_cli(*args)
    assert_damage_reported(r, journal)
    assert os.path.exists(journal)


@pytest.mark.parametrize("kind", ["end", "truncated"])
def test_torn_tail_of_a_resync_is_cut_off_and_the_resync_finished(images, kind):
    d, old, new = images
    journal = interrupted_resync(d, "apply.journaled")
    damage(journal, kind, None)
    r = run_cli("resync", d / "new.img", d / "old.img")
    assert r.returncode == 0, r.stderr
    assert sha(d / "old.img") == new
    assert not os.path.exists(journal)


@pytest.mark.parametrize("kind", ["end", "truncated"])
def test_torn_tail_of_a_batch_not_yet_written_is_rolled_back_exactly(images, kind):
    """Killed once the batch was journaled, before it was written: a torn
    tail is what a crash there leaves; the valid prefix is enough, and the
    rollback is exact (checked against the apply's base identity)."""
    d, old, _ = images
    journal = interrupted_apply(d, "apply.journaled")
    damage(journal, kind, None)
    r = run_cli("rollback", d / "old.img")
    assert r.returncode == 0, r.stderr
    assert sha(d / "old.img") == old
    assert not os.path.exists(journal)


@pytest.mark.parametrize("command", ["rollback", "resync"])
@pytest.mark.parametrize("crash_at", ["apply.written", "apply.synced"])
def test_a_bad_first_record_header_of_a_written_resync_batch(images, crash_at, command):
    """The reviewer's C6: one bit in the first record header of a resync
    journal whose batch reached the target. No record before it is valid,
    but the records found after it no longer match the target: the journal
    was needed whole. Exit 7 naming the journal, kept, the target left as it
    is -- never "0 B restored" with exit 0."""
    d, old, new = images
    journal = interrupted_resync(d, crash_at)
    flip(journal, HEADER + 14)
    assert J.scan(journal).records == []  # what the valid prefix alone would restore
    before = sha(d / "old.img")
    args = ("rollback", d / "old.img") if command == "rollback" else (
        "resync", d / "new.img", d / "old.img")
    r = run_cli(*args)
    assert_damage_reported(r, journal)
    assert "offset 96" in r.stderr.decode()
    assert os.path.exists(journal)
    assert sha(d / "old.img") == before  # nothing written on the strength of it


@pytest.mark.parametrize("record", [0, 1])
def test_a_bad_record_header_in_a_batch_not_yet_written_is_a_tear(images, record):
    """Killed once the batch was journaled, before it was written: the
    records after a bad header still find their old contents in the target,
    so it is a torn write -- a rerun finishes the resync, a rollback gives
    the old image back."""
    d, old, new = images
    journal = interrupted_resync(d, "apply.journaled")
    flip(journal, J.scan(journal).records[record][0] + 14)
    r = run_cli("rollback", d / "old.img")
    assert r.returncode == 0, r.stderr
    assert sha(d / "old.img") == old
    journal = interrupted_resync(d, "apply.journaled")
    flip(journal, J.scan(journal).records[record][0] + 14)
    r = run_cli("resync", d / "new.img", d / "old.img")
    assert r.returncode == 0, r.stderr
    assert sha(d / "old.img") == new


def test_more_than_one_batch_after_a_bad_record_header_is_damage(images):
    """A crash tears only the batch being journaled: more bytes after a bad
    record header than one batch can journal is damage, even where no
    valid record can be found in them."""
    d, old, _ = images
    journal = interrupted_resync(d, "apply.journaled")
    flip(journal, HEADER + 14)
    header = J.scan(journal).header
    with open(journal, "ab") as f:
        f.write(bytes(J.batch_journal_limit(header)))
    r = run_cli("rollback", d / "old.img")
    assert_damage_reported(r, journal)
    assert sha(d / "old.img") == old


def cached_resync_killed(d, crash_at):
    """old.img with a signature cache describing it (a resync that changed
    nothing wrote it), then a resync to new.img killed at `crash_at`."""
    (d / "same.img").write_bytes((d / "old.img").read_bytes())
    r = run_cli("resync", d / "same.img", d / "old.img", "--signature-cache", d / "c.sig")
    assert r.returncode == 0, r.stderr
    r = run_cli("resync", d / "new.img", d / "old.img", "--signature-cache", d / "c.sig",
                env={**os.environ, "PYDR_CRASH_AT": crash_at})
    assert r.returncode == -9, r.stderr
    return J.journal_path(d / "old.img")


@pytest.mark.parametrize("records_lost", [1, 2])
def test_records_lost_at_a_record_boundary_are_found_with_the_cache(images, records_lost):
    """A journal cut exactly at a record boundary after its batch reached
    the target (a lost write) looks whole. On resume, the signature cache
    (the target before the resync) shows blocks changed that no record
    covers: exit 7 naming the journal, which is kept."""
    d, old, new = images
    journal = cached_resync_killed(d, "apply.synced")
    records = J.scan(journal).records
    assert len(records) > records_lost
    os.truncate(journal, records[-records_lost][0])
    r = run_cli("resync", d / "new.img", d / "old.img", "--signature-cache", d / "c.sig")
    assert_damage_reported(r, journal)
    assert "records were lost" in r.stderr.decode()
    assert os.path.exists(journal)


@pytest.mark.parametrize("crash_at", ["apply.journaled", "apply.synced"])
def test_a_whole_journal_resumes_with_the_cache(images, crash_at):
    """The same check finds nothing to say about a journal that is whole."""
    d, old, new = images
    journal = cached_resync_killed(d, crash_at)
    r = run_cli("resync", d / "new.img", d / "old.img", "--signature-cache", d / "c.sig")
    assert r.returncode == 0, r.stderr
    assert sha(d / "old.img") == new
    assert not os.path.exists(journal)


def test_a_torn_header_alone_means_the_target_was_not_touched(images):
    d, old, _ = images
    journal = interrupted_apply(d, "apply.journaled")
    os.truncate(journal, HEADER)
    flip(journal, 20)
    r = run_cli("apply", d / "d.delta", d / "old.img")
    assert r.returncode == 0, r.stderr
    assert sha(d / "old.img") == hashlib.sha256((d / "new.img").read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", DAMAGES)
def test_signature_cache(tmp_path, kind):
    """A cache is only an aid: a damaged one is never trusted (the target is
    read instead, and the replica is exact), and `pydr verify` names it."""
    rng = random.Random(5)
    src, rep = tmp_path / "src.img", tmp_path / "site-b" / "src.img"
    rep.parent.mkdir()
    src.write_bytes(rng.randbytes(2 << 20))
    env = {**os.environ, "PYDR_VAULT": str(tmp_path / "vault")}
    assert run_cli("vault", "init", tmp_path / "vault", env=env).returncode == 0
    assert run_cli("protect", "vm", "--disk", f"{src}={rep}", env=env).returncode == 0
    assert run_cli("replicate", "vm", env=env).returncode == 0
    cache = tmp_path / "vault" / "cache" / "vm" / "0.sig"
    assert cache.exists()
    damage(cache, kind, HEADER + 100)
    r = run_cli("verify", "vm", env=env)
    assert_damage_reported(r, cache)
    with open(src, "r+b") as f:
        f.seek(1 << 20)
        f.write(rng.randbytes(5000))
    r = run_cli("replicate", "vm", env=env)
    assert r.returncode == 0, r.stderr
    assert xxhash.xxh3_128_hexdigest(rep.read_bytes()) == \
        xxhash.xxh3_128_hexdigest(src.read_bytes())
    assert run_cli("verify", "vm", env=env).returncode == 0  # written again, whole

"""Merged undo steps (pydr.engine.journalmerge): rolling the merged journal
back gives exactly the bytes that rolling back both steps gives."""

import itertools
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pydr.engine import bindings as B
from pydr.engine import journal as J
from pydr.engine.journalmerge import NotMergeable, merge_chain, merge_steps
from pydr.errors import DamagedJournal

BS = 4096
_names = itertools.count()  # file names (hypothesis seeds `random` for each example)


def write_step(path, records, old_size, new_size, *, block_size=BS, kind=J.KIND_APPLY,
               base_id=bytes(16), result_id=bytes(16)):
    """A committed undo journal at `path` holding `records`: (offset, bytes)
    for DATA, (offset, int length) for ZERO."""
    j = J.Journal.create(str(path), kind=kind, block_size=block_size, old_size=old_size,
                         new_size=new_size, base_id=base_id, result_id=result_id)
    buf = bytearray()
    for seq, (offset, what) in enumerate(records):
        if isinstance(what, int):
            buf += B.record_build(B.ZERO, offset, what, seq=seq)
        else:
            h = B.hash_bytes(B.ALGORITHMS["xxh3-64"], what)[0]
            buf += B.record_build(B.DATA, offset, len(what), payload_hash=h, seq=seq) + what
    j.append(buf)
    j.commit()
    j.close()
    return str(path)


def cycle(disk, writes, new_size=None):
    """Apply `writes` [(offset, bytes)] to `disk` (a bytearray, changed in
    place) and resize it as an apply does; returns the undo records
    (the old contents of each written range, the dropped tail of a shrink)."""
    old_size = len(disk)
    new_size = old_size if new_size is None else new_size
    records = []
    if new_size < old_size:
        records.append((new_size, bytes(disk[new_size:])))
    for off, data in writes:
        end = min(off + len(data), old_size)
        if off < end:
            records.append((off, bytes(disk[off:end])))
    for off, data in writes:
        if off + len(data) > len(disk):
            disk.extend(bytes(off + len(data) - len(disk)))
        disk[off:off + len(data)] = data
    del disk[new_size:]
    disk.extend(bytes(new_size - len(disk)))
    return records


def rolled_back(tmp_path, current, *steps):
    """The bytes of a disk holding `current` after the steps are rolled back in order."""
    target = tmp_path / f"disk{next(_names)}"
    target.write_bytes(bytes(current))
    fd = os.open(target, os.O_RDWR)
    try:
        for step in steps:
            J.rollback_fd(fd, step, str(target), False, step=True)
    finally:
        os.close(fd)
    return target.read_bytes()


def random_writes(rng, size, n, max_len=40_000):
    out = []
    for _ in range(n):
        length = rng.randrange(1, max_len)
        off = rng.randrange(0, size - length)
        out.append((off, rng.randbytes(length)))
    return out


def test_three_cycles_of_random_writes_merge_to_the_same_bytes(tmp_path):
    rng = random.Random(23)
    disk = bytearray(rng.randbytes(1 << 20))
    states, steps = [bytes(disk)], []
    for k in range(3):
        records = cycle(disk, random_writes(rng, len(disk), 30))
        steps.append(write_step(tmp_path / f"s{k}", records, len(disk), len(disk)))
        states.append(bytes(disk))
    m12 = merge_steps(steps[1], steps[2], str(tmp_path / "m12")).path
    assert rolled_back(tmp_path, states[3], m12) == states[1]
    m012 = merge_steps(steps[0], m12, str(tmp_path / "m012"))
    assert rolled_back(tmp_path, states[3], m012.path) == states[0]
    assert rolled_back(tmp_path, states[3], steps[2], steps[1], steps[0]) == states[0]
    m01 = merge_steps(steps[0], steps[1], str(tmp_path / "m01")).path
    assert rolled_back(tmp_path, states[2], m01) == states[0]
    # an ordinary committed journal, no two records over one byte, and the size recorded
    header = J.check_step(m012.path)
    assert (header["old_size"], header["new_size"]) == (1 << 20, 1 << 20)
    spans = sorted((r[3], r[3] + r[4]) for r in J.scan(m012.path, step=True).records)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert os.path.getsize(m012.path) == m012.bytes + J.COMMIT_SIZE
    # in proportion to the steps: no bigger than both together
    assert m012.bytes <= os.path.getsize(steps[0]) + os.path.getsize(m12)


def test_overlap_takes_the_older_steps_bytes(tmp_path):
    older = write_step(tmp_path / "o", [(0, b"A" * 100)], 1000, 1000)
    newer = write_step(tmp_path / "n", [(50, b"B" * 100), (500, 20)], 1000, 1000)
    merged = merge_steps(older, newer, str(tmp_path / "m")).path
    got = rolled_back(tmp_path, b"x" * 1000, merged)
    assert got == b"A" * 100 + b"B" * 50 + b"x" * 350 + bytes(20) + b"x" * 480
    assert got == rolled_back(tmp_path, b"x" * 1000, newer, older)


def test_disjoint_records_are_all_kept(tmp_path):
    older = write_step(tmp_path / "o", [(0, b"A" * 10), (900, 50)], 1000, 1000)
    newer = write_step(tmp_path / "n", [(100, b"B" * 10), (400, 30)], 1000, 1000)
    merged = merge_steps(older, newer, str(tmp_path / "m"))
    assert merged.records == 4
    assert rolled_back(tmp_path, b"x" * 1000, merged.path) == \
        rolled_back(tmp_path, b"x" * 1000, newer, older)


def test_records_overlapping_within_a_step_keep_the_first(tmp_path):
    # a resumed resync journals one range twice: the first record holds the original
    older = write_step(tmp_path / "o", [(10, b"1" * 20), (0, b"2" * 40)], 100, 100,
                       kind=J.KIND_RESYNC)
    newer = write_step(tmp_path / "n", [(0, b"3" * 100)], 100, 100)
    m = merge_steps(older, newer, str(tmp_path / "m"))
    want = b"2" * 10 + b"1" * 20 + b"2" * 10 + b"3" * 60
    assert rolled_back(tmp_path, b"x" * 100, m.path) == want
    assert J.check_step(m.path)["kind"] == J.KIND_RESYNC  # a resync's journal has no identities
    assert m.header["base_id"] == bytes(16)


@pytest.mark.parametrize("sizes", [(1 << 20, 1 << 20, 3 << 19), (1 << 20, 3 << 19, 1 << 19),
                                   (1 << 20, 1 << 19, 3 << 19), (1 << 19, 1 << 20, 3 << 18),
                                   (1 << 19, (1 << 20) + 77, 1 << 20)])
def test_size_changes_roll_back_right(tmp_path, sizes):
    rng = random.Random(sum(sizes))
    disk = bytearray(rng.randbytes(sizes[0]))
    states, steps = [bytes(disk)], []
    for k, size in enumerate(sizes[1:] + (sizes[-1],)):
        writes = random_writes(rng, min(len(disk), size), 10)
        old = len(disk)
        steps.append(write_step(tmp_path / f"s{k}", cycle(disk, writes, size), old, size))
        states.append(bytes(disk))
    merged = merge_steps(steps[0], steps[1], str(tmp_path / "m")).path
    assert rolled_back(tmp_path, states[2], merged) == states[0]
    again = merge_steps(merged, steps[2], str(tmp_path / "m2")).path
    assert rolled_back(tmp_path, states[3], again) == states[0]


def test_steps_that_do_not_follow_each_other_are_refused(tmp_path):
    older = write_step(tmp_path / "o", [(0, b"A")], 1000, 2000)
    newer = write_step(tmp_path / "n", [(0, b"B")], 1000, 1000)
    with pytest.raises(NotMergeable, match="do not follow each other") as exc:
        merge_steps(older, newer, str(tmp_path / "m"))
    assert exc.value.path == newer and exc.value.exit_code == 10
    other_bs = write_step(tmp_path / "b", [(0, b"B")], 2000, 2000, block_size=BS * 2)
    with pytest.raises(NotMergeable, match="different block sizes"):
        merge_steps(older, other_bs, str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_damage_is_refused_naming_the_step_and_nothing_is_left(tmp_path):
    older = write_step(tmp_path / "o", [(0, b"A" * 100)], 1000, 1000)
    newer = write_step(tmp_path / "n", [(200, b"B" * 100)], 1000, 1000)
    raw = bytearray(open(newer, "rb").read())
    raw[J.HEADER_SIZE + B.RECORD_HEADER + 5] ^= 1
    open(newer, "wb").write(raw)
    with pytest.raises(DamagedJournal) as exc:
        merge_steps(older, newer, str(tmp_path / "m"))
    assert exc.value.path == newer and exc.value.offset == J.HEADER_SIZE
    assert not (tmp_path / "m").exists()
    with open(tmp_path / "m", "wb"):
        pass
    with pytest.raises(FileExistsError):  # never written over
        merge_steps(older, older, str(tmp_path / "m"))


def draw_records(draw, limit, most):
    """Up to `most` records of a step within `limit` bytes: (offset, length)
    of zeros, or (offset, bytes) of one drawn value."""
    out = []
    for _ in range(draw(st.integers(0, most))):
        off = draw(st.integers(0, limit - 1))
        length = draw(st.integers(1, limit - off))
        if draw(st.booleans()):
            out.append((off, length))
        else:
            out.append((off, bytes([draw(st.integers(1, 255))]) * length))
    return out


@st.composite
def journals(draw):
    s0, s1, s2 = (draw(st.integers(1, 3000)) for _ in range(3))
    return (s0, s1, s2), draw_records(draw, max(s0, s1), 6), draw_records(draw, max(s1, s2), 6)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(journals())
def test_any_two_journals_merge_to_rolling_back_both(tmp_path, case):
    (s0, s1, s2), older_records, newer_records = case
    tag = next(_names)
    older = write_step(tmp_path / f"o{tag}", older_records, s0, s1)
    newer = write_step(tmp_path / f"n{tag}", newer_records, s1, s2)
    merged = merge_steps(older, newer, str(tmp_path / f"m{tag}")).path
    current = bytes(random.Random(s2).randbytes(s2))
    assert rolled_back(tmp_path, current, merged) == rolled_back(tmp_path, current, newer, older)


@st.composite
def chains(draw):
    sizes = [draw(st.integers(1, 3000)) for _ in range(draw(st.integers(3, 5)))]
    return sizes, [draw_records(draw, max(a, b), 5) for a, b in zip(sizes, sizes[1:])]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chains())
def test_a_chain_merged_in_one_pass_rolls_back_like_every_step(tmp_path, case):
    sizes, steps_records = case
    steps = [write_step(tmp_path / f"c{next(_names)}", recs, old, new)
             for recs, old, new in zip(steps_records, sizes, sizes[1:])]
    merged = merge_chain(steps, str(tmp_path / f"m{next(_names)}"))
    current = bytes(random.Random(sizes[-1]).randbytes(sizes[-1]))
    assert rolled_back(tmp_path, current, merged.path) == \
        rolled_back(tmp_path, current, *reversed(steps))
    pairwise = steps[0]
    for step in steps[1:]:  # the same journal as merging two at a time
        pairwise = merge_steps(pairwise, step, str(tmp_path / f"p{next(_names)}")).path
    assert open(pairwise, "rb").read() == open(merged.path, "rb").read()


def test_a_chain_that_does_not_follow_is_refused_naming_the_step(tmp_path):
    a = write_step(tmp_path / "a", [(0, b"A")], 100, 100)
    b = write_step(tmp_path / "b", [(0, b"B")], 100, 200)
    c = write_step(tmp_path / "c", [(0, b"C")], 100, 100)
    with pytest.raises(NotMergeable) as exc:
        merge_chain([a, b, c], str(tmp_path / "m"))
    assert exc.value.path == c and not (tmp_path / "m").exists()

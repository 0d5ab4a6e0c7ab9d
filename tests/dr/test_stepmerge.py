"""Retention tiers on a step chain (pydr.dr.stepmerge): the points the tiers
let go are thinned by merging undo steps; every kept point stays exact, the
steps directory holds one file per step, and a kill during a merge is
finished by the next retention."""

import errno
import json
import os
import random
import subprocess
import sys
import time

import pytest

from pydr.dr import drills, stepmerge
from pydr.dr import points as points_module
from pydr.dr.points import apply_retention, materialize
from pydr.dr.policy import set_policy
from pydr.dr.replication import replicate
from pydr.dr.stepdigest import digest
from pydr.dr.tiers import Tiers, points_to_keep
from pydr.dr.vault import Vault, init_vault
from pydr.engine import journal as J
from pydr.errors import UnknownName

from conftest import run_cli, sha
from test_s3 import s3, swift  # noqa: F401 (fixtures: a bucket in a local Swift)

T0 = 1772323200.0  # 2026-03-01 00:00:00 UTC, on an hour's boundary


class Clock:
    """The cycles' clock: time.time() reads it (a cut, a point's record, a
    cycle's retention); it moves only when the test says, plus 1 ms a read
    so that times stay in order."""

    def __init__(self, start):
        self.at = start

    def __call__(self):
        self.at += 0.001
        return self.at

    def advance(self, seconds):
        self.at += seconds


@pytest.fixture
def vault_dir(tmp_path, monkeypatch):
    d = tmp_path / "vault"
    init_vault(d)
    monkeypatch.setenv("PYDR_VAULT", str(d))
    return d


@pytest.fixture
def clock(monkeypatch):
    c = Clock(T0)
    monkeypatch.setattr(time, "time", c)
    return c


class Source:
    """A source disk written at random between cycles; remembers what each
    point's source was (sha256) and when its data was cut."""

    def __init__(self, tmp_path, seed, size=2 << 20, tag=""):
        self.path, self.replica = tmp_path / f"{tag}src.img", tmp_path / f"{tag}rep.img"
        self.rng = random.Random(seed)
        self.data = bytearray(self.rng.randbytes(size))
        self.path.write_bytes(self.data)
        self.history = {}  # point id -> (sha256 of the source, the point's data time)

    def change(self, grow=0):
        # a hot block every cycle rewrites (as a journal or a superblock): the
        # steps overlap there, where the older step's bytes must win
        self.data[8192:8192 + 4096] = self.rng.randbytes(4096)
        for _ in range(self.rng.randrange(1, 4)):
            length = 64 << 10
            off = self.rng.randrange(0, len(self.data) - length)
            self.data[off:off + length] = self.rng.randbytes(length)
        self.data += self.rng.randbytes(grow)
        self.path.write_bytes(self.data)

    def cycle(self, v, clock, minutes=10, grow=0):
        clock.advance(minutes * 60)
        self.change(grow)
        res = replicate(v.store, ["db"])  # its retention runs at the clock's time
        assert res.point_id not in self.history
        self.history[res.point_id] = (sha(self.path), v.store.point("db", res.point_id).data_time)
        return res.point_id


def hour(t):
    return int(t // 3600)


def waiting(history, expected):
    """The points the tiers let go that wait for the newest point's hour to
    end (their newer kept neighbour is the newest point, which a later
    point of that hour would displace): the others of that hour."""
    newest = max(history, key=lambda pid: history[pid][1])
    return {pid for pid, (_, at) in history.items()
            if pid not in expected and hour(at) == hour(history[newest][1])}


def two_hours_of_points(v, src, clock):
    """Item db protected, a point every 10 minutes (00:10 .. 02:00), then kept
    by three hourly tiers: 00:50, 01:50 and 02:00 stay, 01:00 .. 01:40 are
    thinned (merged), the older ones dropped. Returns the tiers."""
    v.protect("db", [(str(src.path), str(src.replica))], retention=1000)
    for _ in range(12):  # 00:10 .. 02:00
        src.cycle(v, clock)
    tiers = Tiers(hourly=3)
    set_policy(v.store, "item", "db", keep=tiers)
    return tiers


def to_keep(src, tiers, now):
    """The points the tiers keep of those `src` made (its history)."""
    return points_to_keep([(pid, at) for pid, (_, at) in src.history.items()], tiers, now)


def thinned(src, expected):
    """The points between the oldest and newest kept ones that are let go."""
    return [pid for pid in src.history if min(expected) < pid < max(expected)
            and pid not in expected]


def check_kept_points(v, src, tmp_path, tag):
    """Every point the vault has materialises to its source's bytes; the
    steps directory holds exactly the files the steps rows name (one per
    step the kept points need); nothing is left to remove."""
    store = v.store
    kept = [p.id for p in store.points("db")]
    for pid in kept:
        path, = materialize(store, "db", pid, tmp_path / tag / f"m{pid}")
        assert sha(path) == src.history[pid][0], (tag, pid)
    rows = store.steps("db")
    assert len(rows) == len(kept) - 1  # the oldest kept point needs no step of its own
    folder = os.path.join(store.dir, "undo", "db")
    files = {os.path.join(folder, f) for f in os.listdir(folder)}
    assert files == {r.path for r in rows}, (files - {r.path for r in rows},
                                             {r.path for r in rows} - files)
    for r in rows:  # each row as recorded: a whole committed journal, its size and digest
        J.check_step(r.path)
        assert os.path.getsize(r.path) in (r.bytes, r.bytes + J.COMMIT_SIZE)
        assert r.digest == digest(r.path)
    assert store.doomed("db") == []
    return kept


def test_tiers_keep_their_points_exact_and_merge_the_rest(tmp_path, vault_dir, clock):
    src = Source(tmp_path, seed=23)
    tiers = Tiers(within=1800, hourly=3, daily=2)
    with Vault(vault_dir, writer=True) as v:
        v.protect("db", [(str(src.path), str(src.replica))], retention=1000)
        set_policy(v.store, "item", "db", keep=tiers)
        for k in range(29):  # every 10 minutes to 04:50; the disk grows once
            src.cycle(v, clock, grow=(256 << 10) if k == 14 else 0)
        now = clock.at + 3600  # an hour later: within keeps nothing more than the newest
        notes = apply_retention(v.store, "db", now)
        assert notes == []  # every step here is on this machine and mergeable
        expected = to_keep(src, tiers, now)
        kept = check_kept_points(v, src, tmp_path, "final")
        later = waiting(src.history, expected)
        assert later and set(kept) == expected | later
        src.cycle(v, clock, minutes=60)  # a new hour: the last one's rep is kept for good
        now = clock.at + 60
        expected = to_keep(src, tiers, now)
        assert apply_retention(v.store, "db", now) == []
        kept = check_kept_points(v, src, tmp_path, "next hour")
        assert set(kept) == expected | waiting(src.history, expected)
        assert not later & set(kept)  # they went, merged
        dropped = set(src.history) - expected
        assert any(pid > min(kept) for pid in dropped)  # middle points thinned, not only old ones
        assert any(".m" in r.path for r in v.store.steps("db"))  # by merged steps
        for pid in dropped:
            with pytest.raises(UnknownName):
                v.store.point("db", pid)
    r = run_cli("vault", "check", "--json", env=dict(os.environ))
    assert r.returncode == 0, json.loads(r.stdout)["problems"]


def test_two_disks_one_idle_in_most_cycles(tmp_path, vault_dir, clock):
    """A disk that did not change still gets its step each cycle (or shares
    one with the point before): either way each disk's chain is merged on
    its own and every kept point is exact on both disks."""
    a, b = Source(tmp_path, seed=1, tag="a-"), Source(tmp_path, seed=2, size=1 << 20, tag="b-")
    tiers = Tiers(within=1200, hourly=3)
    history = {}
    with Vault(vault_dir, writer=True) as v:
        v.protect("db", [(str(a.path), str(a.replica)), (str(b.path), str(b.replica))],
                  retention=1000)
        set_policy(v.store, "item", "db", keep=tiers)
        for k in range(16):
            clock.advance(600)
            a.change()
            if k % 3 == 0:
                b.change()
            pid = replicate(v.store, ["db"]).point_id
            history[pid] = ((sha(a.path), sha(b.path)), v.store.point("db", pid).data_time)
        now = clock.at + 1800
        apply_retention(v.store, "db", now)
        expected = points_to_keep([(pid, at) for pid, (_, at) in history.items()], tiers, now)
        kept = [p.id for p in v.store.points("db")]
        later = waiting(history, expected)
        assert set(kept) == expected | later and len(expected | later) < len(history) - 2
        for pid in kept:
            out = tmp_path / "out" / str(pid)
            made = materialize(v.store, "db", pid, out)
            assert (sha(out / a.replica.name), sha(out / b.replica.name)) == history[pid][0]
            assert len(made) == 2
        rows = v.store.steps("db")
        assert any(".m" in r.path for r in rows if r.idx == 0)
        folder = os.path.join(v.store.dir, "undo", "db")
        assert {os.path.join(folder, f) for f in os.listdir(folder)} == {r.path for r in rows}
        assert v.store.doomed("db") == []
    r = run_cli("vault", "check", "--json", env=dict(os.environ))
    assert r.returncode == 0, json.loads(r.stdout)["problems"]


def test_without_keep_the_count_retention_stays(tmp_path, vault_dir, clock):
    src = Source(tmp_path, seed=5)
    with Vault(vault_dir, writer=True) as v:
        v.protect("db", [(str(src.path), str(src.replica))], retention=3)
        for _ in range(6):
            src.cycle(v, clock)
        kept = check_kept_points(v, src, tmp_path, "count")
    assert kept == sorted(src.history)[-3:]
    assert not any(".m" in p for p in os.listdir(vault_dir / "undo" / "db"))


def test_steps_that_cannot_be_merged_stay_and_a_note_says_so(tmp_path, vault_dir, clock,
                                                             monkeypatch):
    src = Source(tmp_path, seed=7)
    with Vault(vault_dir, writer=True) as v:
        two_hours_of_points(v, src, clock)
        before = {r.path for r in v.store.steps("db")}
        monkeypatch.setattr(stepmerge, "_local", lambda vault, name, spec: None)  # "another host"
        notes = apply_retention(v.store, "db", clock.at + 60)
        assert notes and all("another host" in n and "not merged" in n for n in notes), notes
        monkeypatch.undo()
        kept = [p.id for p in v.store.points("db")]
        assert len(kept) == 3  # the records went
        rows = {r.path for r in v.store.steps("db")}
        assert rows <= before and len(rows) > len(kept) - 1  # the steps stayed, unmerged
        for pid in kept:
            path, = materialize(v.store, "db", pid, tmp_path / "out" / str(pid))
            assert sha(path) == src.history[pid][0]


def test_a_merge_that_fails_for_now_leaves_its_point_for_the_next_retention(
        tmp_path, vault_dir, clock, monkeypatch):
    src = Source(tmp_path, seed=3)
    with Vault(vault_dir, writer=True) as v:
        tiers = two_hours_of_points(v, src, clock)
        now = clock.at + 60

        def no_space(steps, dest):
            with open(dest, "wb") as f:  # half-written, as a full disk leaves it
                f.write(b"PYDRUND")
            raise OSError(errno.ENOSPC, "No space left on device", dest)

        monkeypatch.setattr(stepmerge, "merge_chain", no_space)
        notes = apply_retention(v.store, "db", now)
        assert len(notes) == 1 and "could not be merged now" in notes[0], notes
        expected = to_keep(src, tiers, now)
        middle = thinned(src, expected)
        assert len(middle) == 5
        assert {p.id for p in v.store.points("db")} >= set(middle)  # they stay, for later
        monkeypatch.undo()
        assert apply_retention(v.store, "db", now) == []
        kept = check_kept_points(v, src, tmp_path, "retried")  # no half-written file left
    assert set(kept) == expected


def test_a_damaged_step_is_not_merged_and_marks_its_points(tmp_path, vault_dir, clock):
    src = Source(tmp_path, seed=9)
    with Vault(vault_dir, writer=True) as v:
        two_hours_of_points(v, src, clock)
        victim = v.store.steps("db")[-2]  # the step of the 01:10 point, which is thinned
        raw = bytearray(open(victim.path, "rb").read())
        raw[J.HEADER_SIZE + 64 + 10] ^= 0xFF  # in the first record's payload
        open(victim.path, "wb").write(raw)
        notes = apply_retention(v.store, "db", clock.at + 60)
        assert any("not merged" in n and "damaged" in n and victim.path in n for n in notes), notes
        assert victim.path in {r.path for r in v.store.steps("db")}  # it stays as it is
        points = v.store.points("db")
        assert len(points) == 3 and points[0].damaged
        assert not points[1].damaged and not points[2].damaged
        for p in points[1:]:
            path, = materialize(v.store, "db", p.id, tmp_path / "out" / str(p.id))
            assert sha(path) == src.history[p.id][0]


def test_a_drills_point_stays_whatever_the_tiers_say(tmp_path, vault_dir, clock):
    src = Source(tmp_path, seed=13)
    with Vault(vault_dir, writer=True) as v:
        tiers = two_hours_of_points(v, src, clock)
        now = clock.at + 60
        expected = to_keep(src, tiers, now)
        drilled = min(pid for pid in src.history if pid > min(expected))  # one to be thinned
        drills.test_failover(v.store, "db", str(tmp_path / "drill"), drilled)
        assert apply_retention(v.store, "db", now) == []
        kept = check_kept_points(v, src, tmp_path, "drill")
        assert set(kept) == expected | {drilled}
        assert any(".m" in r.path for r in v.store.steps("db"))  # the one after it merged
        assert sha(tmp_path / "drill" / src.replica.name) == src.history[drilled][0]


def test_points_waiting_to_be_thinned_do_not_pile_up(tmp_path, vault_dir, clock, monkeypatch):
    """Kept only by `within` (no period tier) behind a long drill's point,
    the points let go would wait for ever: past MAX_WAITING they go."""
    src = Source(tmp_path, seed=21)
    with Vault(vault_dir, writer=True) as v:
        v.protect("db", [(str(src.path), str(src.replica))], retention=1000)
        first = src.cycle(v, clock)
        drills.test_failover(v.store, "db", str(tmp_path / "drill"), first)
        set_policy(v.store, "item", "db", keep=Tiers(within=1200))
        monkeypatch.setattr(points_module, "MAX_WAITING", 3)
        for _ in range(4):  # each within 20 minutes of the next: they wait
            src.cycle(v, clock)
        now = clock.at + 1500  # the first three of them are out of `within`
        assert apply_retention(v.store, "db", now) == []
        assert len(v.store.points("db")) == 5  # three wait (at most MAX_WAITING)
        src.cycle(v, clock, minutes=30)
        kept = check_kept_points(v, src, tmp_path, "valve")  # four waiting: thinned
    assert kept == [first, max(src.history)]


RETENTION = """
import sys
from pydr.dr.vault import Vault
with Vault(sys.argv[1], writer=True) as v:
    v.apply_retention("db", now=float(sys.argv[2]))
"""


@pytest.mark.parametrize("kill", ["retention.merged", "retention.swapped"])
def test_a_kill_during_a_merge_is_finished_by_the_next_retention(tmp_path, vault_dir, clock,
                                                                 kill):
    src = Source(tmp_path, seed=11)
    with Vault(vault_dir, writer=True) as v:
        tiers = two_hours_of_points(v, src, clock)
    now = clock.at + 60
    expected = to_keep(src, tiers, now)
    assert len(expected) == 3  # 00:50, 01:50 and 02:00; 01:00 .. 01:40 thinned, merged
    assert len(thinned(src, expected)) == 5
    env = dict(os.environ, PYDR_CRASH_AT=kill)
    r = subprocess.run([sys.executable, "-c", RETENTION, str(vault_dir), repr(now)], env=env,
                       capture_output=True, cwd=tmp_path, timeout=300)
    assert r.returncode == -9, (r.returncode, r.stderr.decode())
    # what the kill left is a cleanup the next retention does, not damage
    r = run_cli("vault", "check", "--json", env=dict(os.environ))
    assert r.returncode == 0, json.loads(r.stdout)["problems"]
    with Vault(vault_dir, writer=True) as v:
        folder = vault_dir / "undo" / "db"
        rows = {r.path for r in v.store.steps("db")}
        merged = [f for f in os.listdir(folder) if ".m" in f]
        assert len(merged) == 1, os.listdir(folder)
        if kill == "retention.merged":  # the merged file is there, no row names it
            assert str(folder / merged[0]) not in rows and v.store.doomed("db") == []
        else:  # the rows name it; the two old files are still to remove
            # the run of steps between 00:50 and 01:50 (five thinned points' and
            # 01:50's own): all six old files
            assert str(folder / merged[0]) in rows and len(v.store.doomed("db")) == 6
        for pid in expected:  # the points kept are exact even before the next retention
            path, = materialize(v.store, "db", pid, tmp_path / "killed" / str(pid))
            assert sha(path) == src.history[pid][0]
        v.apply_retention("db", now=now)
        kept = check_kept_points(v, src, tmp_path, "after")
    assert set(kept) == expected
    r = run_cli("vault", "check", "--json", env=dict(os.environ))
    assert r.returncode == 0, json.loads(r.stdout)["problems"]
    assert json.loads(r.stdout)  # a report, parsed


def test_a_chunk_index_thins_by_dropping_the_points_indexes(s3):
    """A point index holds its whole point: the points the tiers let go from
    the middle lose their records and their index objects (a drill's older
    point stays, so the others are in the middle); the kept ones are exact."""
    from test_s3 import keys

    ctx, tmp = s3, s3["tmp"]
    img = tmp / "os.img"
    rng = random.Random(17)
    data = bytearray(rng.randbytes(8 << 20))
    img.write_bytes(data)
    history = {}
    with Vault(ctx["vault"], writer=True) as v:
        v.protect("vm", [(str(img), ctx["url"])])
        for _ in range(5):
            off = rng.randrange(0, len(data) - 4096)
            data[off:off + 4096] = rng.randbytes(4096)
            img.write_bytes(data)
            pid = replicate(v.store, ["vm"]).point_id
            history[pid] = sha(img)
        assert len(keys(ctx, "indexes")) == 5
        first = min(history)
        drills.test_failover(v.store, "vm", str(tmp / "drill"), first)
        set_policy(v.store, "item", "vm", keep=Tiers(hourly=1))
        assert apply_retention(v.store, "vm", time.time() + 60) == []
        kept = [p.id for p in v.store.points("vm")]
        assert kept == [first, max(history)]
        assert len(keys(ctx, "indexes")) == 2
        for pid in kept:
            path, = materialize(v.store, "vm", pid, tmp / "out" / str(pid))
            assert sha(path) == history[pid]

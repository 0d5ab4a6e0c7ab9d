"""cancel= on the vault's long operations: a cycle, a failover and a drill of
a 1 GiB disk, cancelled from inside their first progress event (no timer),
stop within a few MiB of reading, end as a kill leaves them, and the same
call run again finishes them exactly.

The work done after the cancel is counted in bytes the process read from
storage (/proc/self/io read_bytes; the disk's pages are dropped from the
page cache first, so every read reaches the counter). The same counter
over the whole rerun shows that it counts."""

import os
import random
import threading

import pytest

from pydr.dr.events import Event
from pydr.dr.vault import Vault, init_vault
from pydr.errors import Cancelled

from conftest import sha
from disks import evict

DISK = 1 << 30
REGION = 32 << 20  # data written at four places of the disk; the rest is a hole
PLACES = (0, 300 << 20, 600 << 20, DISK - REGION)
AFTER_CANCEL = 24 << 20  # bytes read after the cancel: a few engine buffers, not the disk


def read_bytes():
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


def write_regions(path, seed):
    rng = random.Random(seed)
    block = bytearray(rng.randbytes(1 << 20))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, DISK)
        for start in PLACES:
            for mib in range(REGION >> 20):
                block[:8] = (start + (mib << 20) + seed).to_bytes(8, "little")
                os.pwrite(fd, block, start + (mib << 20))
    finally:
        os.close(fd)


@pytest.fixture
def item(tmp_path):
    """Vault tmp_path/vault with item 'big': one 1 GiB sparse disk
    (256 MiB of data in four places), replica at tmp_path/site-b."""
    init_vault(tmp_path / "vault")
    src = tmp_path / "big.img"
    write_regions(src, 1)
    (tmp_path / "site-b").mkdir()
    rep = tmp_path / "site-b" / "big.img"
    with Vault(tmp_path / "vault", writer=True) as v:
        v.protect("big", [(src, rep)])
    return tmp_path / "vault", src, rep


class CancelAtFirst:
    """An events= sink that sets `cancel` on the first "progress" event with
    bytes (of `phase`), noting read_bytes then."""

    def __init__(self, phase):
        self.phase, self.cancel, self.events, self.read_then = phase, threading.Event(), [], None

    def __call__(self, event):
        assert isinstance(event, Event)
        self.events.append(event)
        if event.kind == "progress" and event.phase == self.phase and event.bytes_total \
                and not self.cancel.is_set():
            self.read_then = read_bytes()
            self.cancel.set()

    def read_after(self):
        assert self.read_then is not None, "no progress event came"
        return read_bytes() - self.read_then


def test_a_cancelled_cycle_ends_within_a_few_mib_and_a_rerun_finishes_it(item):
    vault, src, rep = item
    evict(src)
    with Vault(vault, writer=True) as v:
        sink = CancelAtFirst("transfer")
        with pytest.raises(Cancelled):
            v.replicate("big", events=sink, cancel=sink.cancel)
        assert sink.read_after() < AFTER_CANCEL
        assert sink.events[-1].kind == "cancelled" and sink.events[-1].item == "big"
        # as Ctrl-C (a kill that pydr saw) leaves it: no point, the job cancelled; an
        # operator's stop is no fault: health and last_error as they were
        row = v.item("big")
        assert (row["state"], row["health"], row["last_error"], row["operation"]) == (
            "protecting", "ok", None, None)
        assert v.points("big") == []
        assert [j.state for j in v.jobs() if j.kind == "replicate"] == ["cancelled"]
        evict(src)
        before = read_bytes()
        result = v.replicate("big")  # the same call again
        assert read_bytes() - before >= len(PLACES) * REGION  # the counter counts: all data read
        assert result.point_id == 1 and v.item("big")["state"] == "protected"
        # newest first: the rerun's job, then the cancelled one
        assert [j.state for j in v.jobs() if j.kind == "replicate"] == ["succeeded",
                                                                        "cancelled"]
    assert sha(rep) == sha(src)


def _two_points(vault, src, tmp_path):
    """Points 1 and 2 of 'big' (its data changed between them); returns the
    source's sha256 at point 1."""
    with Vault(vault, writer=True) as v:
        v.replicate("big")
        first = sha(src)
        write_regions(src, 2)
        v.replicate("big")
    return first


def test_a_cancelled_drill_stops_mid_copy_and_a_rerun_finishes_it(item, tmp_path):
    vault, src, rep = item
    first = _two_points(vault, src, tmp_path)
    drill = tmp_path / "drill"
    evict(rep)
    with Vault(vault, writer=True) as v:
        sink = CancelAtFirst("materialize")
        with pytest.raises(Cancelled):
            v.test_failover("big", drill, "1", method="copy", events=sink, cancel=sink.cancel)
        assert sink.read_after() < AFTER_CANCEL
        assert sink.events[-1].kind == "cancelled"
        # as a kill leaves a drill: recorded, interrupted, no disk half-made
        row = v.item("big")
        assert row["test_dir"] == str(drill) and row["operation"] == "test-failover"
        assert not (drill / "big.img").exists()
        assert [p.name for p in drill.iterdir()] == []  # no .big.img.pydr-new left either
        assert [j.state for j in v.jobs() if j.kind == "test-failover"] == ["cancelled"]
        r = v.test_failover("big", drill, "1", method="copy")
        assert r.notes == ("resumed",) and r.point == 1
        assert v.item("big")["operation"] is None
    assert sha(drill / "big.img") == first


def test_a_cancelled_failover_stops_mid_copy_and_a_rerun_finishes_it(item, tmp_path):
    vault, src, rep = item
    first = _two_points(vault, src, tmp_path)
    latest = sha(rep)
    evict(rep)
    with Vault(vault, writer=True) as v:
        sink = CancelAtFirst("bring-up")
        with pytest.raises(Cancelled):
            v.failover("big", "1", method="copy", events=sink, cancel=sink.cancel)
        assert sink.read_after() < AFTER_CANCEL
        assert sink.events[-1].kind == "cancelled"
        assert all(".pydr-" not in (e.path or "") for e in sink.events)
        row = v.item("big")  # as a kill leaves it: failing over, to be finished
        assert (row["state"], row["operation"], row["failover_point"]) == (
            "failing-over", "failover", 1)
        assert [j.state for j in v.jobs() if j.kind == "failover"] == ["cancelled"]
        r = v.failover("big", "1")
        assert r.notes == ("resumed",) and r.point == 1
        assert v.item("big")["state"] == "failed-over"
    assert sha(rep) == first != latest


@pytest.fixture
def two_items(tmp_path):
    """Vault tmp_path/vault with items 'a' and 'b', one 4 MiB disk each."""
    init_vault(tmp_path / "vault")
    (tmp_path / "site-b").mkdir()
    rng = random.Random(7)
    pairs = {}
    with Vault(tmp_path / "vault", writer=True) as v:
        for name in ("a", "b"):
            src = tmp_path / f"{name}.img"
            src.write_bytes(rng.randbytes(4 << 20))
            pairs[name] = (src, tmp_path / "site-b" / f"{name}.img")
            v.protect(name, [pairs[name]])
    return tmp_path / "vault", pairs


def test_a_cancelled_call_leaves_the_items_it_had_not_begun_untouched(two_items):
    vault, pairs = two_items
    with Vault(vault, writer=True) as v:
        sink = CancelAtFirst("transfer")
        with pytest.raises(Cancelled):
            v.replicate(["a", "b"], events=sink, cancel=sink.cancel)
        ended = {e.item: e.message for e in sink.events if e.kind == "cancelled"}
        assert set(ended) == {"a", "b"}
        assert ended["b"] == "the call stopped before this item's cycle began"
        assert not [e for e in sink.events if e.item == "b" and e.kind == "progress"]
        a, b = v.item("a"), v.item("b")
        assert (a["health"], a["last_error"], b["health"], b["last_error"]) == (
            "ok", None, "ok", None)
        assert [j.state for j in v.jobs() if j.kind == "replicate"] == ["cancelled"] * 2
        result = v.replicate(["a", "b"])  # the same call again
        assert sorted(result.items) == ["a", "b"]
    for src, rep in pairs.values():
        assert sha(src) == sha(rep)


def test_a_cancelled_plan_stops_its_items_and_runs_no_later_group(two_items, tmp_path):
    vault, pairs = two_items
    drills = tmp_path / "drills"
    with Vault(vault, writer=True) as v:
        v.replicate(["a", "b"])
        v.create_plan("p", [{"items": ["a"]}, {"items": ["b"]}])
        sink = CancelAtFirst("materialize")
        with pytest.raises(Cancelled) as caught:
            v.run_plan("p", "test-failover", directory=str(drills), events=sink,
                       cancel=sink.cancel)
        assert [(e["item"], e["status"]) for e in caught.value.report] == [
            ("a", "failed"), ("b", "not run")]
        report = caught.value.result  # the same, as the PlanReport a caller reads
        assert (report.ok, report.operation, report.error) == (False, "test-failover",
                                                              str(caught.value))
        assert [(s.items, tuple(s.outcomes), s.not_run) for s in report.steps] == [
            (("a",), ("a",), ()), (("b",), (), ("b",))]
        assert report.steps[0].outcomes["a"].exit_code == Cancelled.exit_code
        assert sink.events[-1].kind == "cancelled" and sink.events[-1].item is None
        assert v.item("a")["operation"] == "test-failover"  # interrupted: the rerun finishes it
        assert v.item("b")["test_dir"] is None
        v.run_plan("p", "test-failover", directory=str(drills))
    for name, (src, _) in pairs.items():
        assert sha(drills / name / f"{name}.img") == sha(src)


def test_a_cancelled_fleet_call_drops_the_tasks_not_back(tmp_path):
    """Host hv-b has no worker: b's task waits on the scheduler. The cancel
    is set once a's task is back: a is recorded, b's task is cancelled and
    b ends as a killed cycle (job cancelled); a rerun with hv-b's worker
    replicates b."""
    pytest.importorskip("distributed")
    from pydr.dr.fleet import Fleet
    from test_fleet import make_cluster, write_disk

    init_vault(tmp_path / "vault")
    (tmp_path / "site-b").mkdir()
    pairs = {}
    with Vault(tmp_path / "vault", writer=True) as v:
        for n, (name, host) in enumerate((("a", "hv-a"), ("b", "hv-b"))):
            pairs[name] = (tmp_path / f"{name}.img", tmp_path / "site-b" / f"{name}.img")
            write_disk(pairs[name][0], n)
            v.protect(name, [pairs[name]], host=host)
    cancel, events = threading.Event(), []

    def cancel_once_a_is_back(event):
        events.append(event)
        if event.item == "a" and event.phase == "transfer" and event.disk is None:
            cancel.set()

    with make_cluster(["hv-a"], tmp_path) as cluster, \
            Vault(tmp_path / "vault", writer=True) as v, \
            Fleet(cluster.scheduler_address) as fleet:
        with pytest.raises(Cancelled):
            v.replicate(["a", "b"], executor=fleet.executor(), events=cancel_once_a_is_back,
                        cancel=cancel)
        ended = {e.item: e.kind for e in events if e.kind in ("finished", "cancelled")}
        assert ended == {"a": "finished", "b": "cancelled", None: "cancelled"}
        assert len(v.points("a")) == 1 and v.points("b") == []
        jobs = {j.item: j.state for j in v.jobs() if j.kind == "replicate"}
        assert jobs == {"a": "succeeded", "b": "cancelled"}
        assert v.item("b")["operation"] is None
        assert (v.item("b")["health"], v.item("b")["last_error"]) == ("ok", None)
    with make_cluster(["hv-b"], tmp_path) as cluster, \
            Vault(tmp_path / "vault", writer=True) as v, \
            Fleet(cluster.scheduler_address) as fleet:
        v.replicate(["b"], executor=fleet.executor())
        assert len(v.points("b")) == 1
    for src, rep in pairs.values():
        assert sha(src) == sha(rep)


def test_a_cancel_ends_the_wait_for_the_next_retry():
    """A retry is scheduled after a recoverable error; the cancel, set while
    the policy waits for it, ends the retries: no second attempt."""
    import errno

    from pydr.dr.retry import RetryPolicy

    cancel, attempts, waits = threading.Event(), [], []

    def attempt():
        attempts.append(1)
        raise OSError(errno.EIO, "I/O error", "/dev/lying-disk")

    def sleep(seconds):  # the wait for attempt 2: the operator cancels meanwhile
        waits.append(seconds)
        cancel.set()

    policy = RetryPolicy(clock=lambda: 0.0, sleep=sleep, cancel=cancel)
    with pytest.raises(Cancelled):
        policy.run(attempt)
    assert (len(attempts), waits) == (1, [60])

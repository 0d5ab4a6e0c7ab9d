"""The review's findings on cancel and on errors about one item, one test
each: a failback cancelled before or after its shutdown hook (review 1 #1),
a cancelled operation seen as interrupted by the process that ran it (#4),
no stale operation record after the next one (#5), the CycleResult of a
cancelled call of several items (#7), ``.item`` on every error about one
item (review 2 U2), and an operator's cancel that is no fault (U10).

Every cancel is set from inside an event (no timer)."""

import os
import random
import threading

import pytest

from pydr.dr.results import CycleResult
from pydr.dr.vault import Vault, init_vault
from pydr.errors import Cancelled, InvalidState, UnknownName

from conftest import sha


@pytest.fixture
def vault(tmp_path):
    """Vault tmp_path/vault with items 'web' (two 4 MiB disks), 'a', 'b' and
    'c' (one 1 MiB disk each); replicas in tmp_path/site-b."""
    init_vault(tmp_path / "vault")
    (tmp_path / "site-b").mkdir()
    rng = random.Random(21)
    with Vault(tmp_path / "vault", writer=True) as v:
        for name, sizes in (("web", (4 << 20, 4 << 20)), ("a", (1 << 20,)), ("b", (1 << 20,)),
                            ("c", (1 << 20,))):
            pairs = []
            for i, size in enumerate(sizes):
                src = tmp_path / f"{name}{i}.img"
                src.write_bytes(rng.randbytes(size))
                pairs.append((str(src), str(tmp_path / "site-b" / f"{name}{i}.img")))
            v.protect(name, pairs)
    return tmp_path / "vault"


def cancel_on(wanted):
    """(cancel, sink): the sink sets cancel at the first event for which
    wanted(event) is true; it keeps every event in sink.events."""
    cancel = threading.Event()

    def sink(event):
        sink.events.append(event)
        if wanted(event):
            cancel.set()

    sink.events = []
    return cancel, sink


def test_a_failback_cancelled_before_its_hook_runs_nothing_and_after_it_stays_pending(
        vault, tmp_path):
    """Review 1 #1: a cancel set before the call runs no shutdown hook and
    records nothing; once the hook ran, the failback stays recorded
    (interrupted) and running it again finishes it."""
    mark = tmp_path / "SHUTDOWN_RAN"
    with Vault(vault, writer=True) as v:
        v.replicate("web")
        v.failover("web")
        v.commit("web")
        v.reprotect("web")
        before = [p.id for p in v.points("web")]
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(Cancelled) as caught:
            v.failback("web", shutdown_hook=f"touch {mark}", cancel=cancel)
        assert not mark.exists()  # the machine was not shut down
        assert caught.value.item == "web"
        st = v.status("web")
        assert (st.state, st.direction, st.operation) == ("protected", "reverse", None)
        assert "failback" not in [j.kind for j in v.jobs(item="web")]
        # the hook runs, then the final cycle is cancelled as it starts
        cancel, sink = cancel_on(lambda e: e.operation == "replicate" and e.kind == "started")
        with pytest.raises(Cancelled):
            v.failback("web", shutdown_hook=f"touch {mark}", events=sink, cancel=cancel)
        assert mark.exists()
        st = v.status("web")
        assert (st.state, st.operation.name, st.operation.interrupted) == (
            "protected", "failback", True)
        assert st.operation.command == "pydr failback web"
        assert [p.id for p in v.points("web")] == before  # the final cycle made no point
        # a drill meanwhile, and its clean-up, do not erase the failback's record
        drill = v.test_failover("web", tmp_path / "drill")
        assert v.status("web").operation.name == "failback"
        v.cleanup_test_failover("web")
        st = v.status("web")
        assert (drill.point, st.operation.name, st.operation.interrupted) == (
            before[-1], "failback", True)
        r = v.failback("web")  # the same call again finishes it
        made = [p.id for p in v.points("web")]
        assert made[:-1] == before and r.point == made[-1] > before[-1] and r.notes == ()
        st = v.status("web")
        assert (st.state, st.direction, st.operation) == ("failed-over", "reverse", None)


def test_a_cancelled_operation_is_interrupted_for_the_process_that_ran_it(vault, tmp_path):
    """Review 1 #4: while the drill runs, its process says it runs; once
    the cancel stopped it, the same Vault says it is interrupted."""
    seen = []
    with Vault(vault, writer=True) as v:
        v.replicate("web")

        def look(event):
            if event.kind == "progress" and event.phase == "materialize":
                seen.append(v.status("web").operation.interrupted)
            return event.kind == "progress" and event.phase == "materialize" and event.disk == 1

        cancel, sink = cancel_on(look)
        with pytest.raises(Cancelled):
            v.test_failover("web", tmp_path / "drill", method="copy", events=sink,
                            cancel=cancel)
        assert seen and not any(seen)  # running, while it ran
        op = v.status("web").operation
        assert (op.name, op.interrupted) == ("test-failover", True)
        assert op.command.startswith("pydr test-failover web --to ")


def test_the_next_operation_replaces_an_interrupted_ones_record(vault, tmp_path):
    """Review 1 #5: a failover after a cancelled drill is recorded as the
    failover (a kill of it says 'pydr failover'), and when it ends, no
    record of the drill stays behind saying it is interrupted."""
    with Vault(vault, writer=True) as v:
        v.replicate("web")
        cancel, sink = cancel_on(
            lambda e: e.kind == "progress" and e.phase == "materialize" and e.disk == 1)
        with pytest.raises(Cancelled):
            v.test_failover("web", tmp_path / "drill", method="copy", events=sink,
                            cancel=cancel)
        assert v.status("web").operation.name == "test-failover"
        recorded = []
        v.failover("web", events=lambda e: recorded.append(v.status("web").operation)
                   if e.kind == "started" and e.operation == "failover" else None)
        assert [(op.name, op.command, op.interrupted) for op in recorded] == [
            ("failover", "pydr failover web", False)]
        st = v.status("web")
        assert (st.state, st.operation) == ("failed-over", None)


def test_a_cancelled_call_of_several_items_carries_their_outcomes(vault):
    """Review 1 #7: cancelled once item a got its point, Cancelled carries
    the CycleResult: a's point, b and c stopped (exit code 130)."""
    with Vault(vault, writer=True) as v:
        cancel, sink = cancel_on(lambda e: e.kind == "finished" and e.item == "a")
        with pytest.raises(Cancelled) as caught:
            v.replicate(["a", "b", "c"], events=sink, cancel=cancel)
        result = caught.value.result
        assert isinstance(result, CycleResult)
        assert result.point_id == 1 and result.items == ("a",)
        by_item = result.by_item
        assert [(n, by_item[n].status, by_item[n].point_id) for n in "abc"] == [
            ("a", "succeeded", 1), ("b", "failed", None), ("c", "failed", None)]
        assert [by_item[n].exit_code for n in "bc"] == [130, 130]
        assert [p.id for p in v.points("a")] == [1] and v.points("b") == v.points("c") == []
        assert caught.value.item is None  # about several items


def test_every_error_about_one_item_names_it(vault, tmp_path):
    """Review 2 U2: .item on the errors of a call about one item, an
    OSError's too (which keeps its builtin type)."""
    with Vault(vault, writer=True) as v:
        v.replicate("web")
        calls = [
            (UnknownName, "nosuch", lambda: v.status("nosuch")),
            (UnknownName, "nosuch", lambda: v.points("nosuch")),
            (UnknownName, "web", lambda: v.point("web", 999)),
            (UnknownName, "web", lambda: v.test_failover("web", tmp_path / "d", point=999)),
            (InvalidState, "web", lambda: v.commit("web")),
            (InvalidState, "web", lambda: v.reprotect("web")),
            (InvalidState, "web", lambda: v.failback("web")),
            (InvalidState, "web", lambda: v.change_point("web", 1)),
        ]
        for kind, name, call in calls:
            with pytest.raises(kind) as caught:
                call()
            assert caught.value.item == name, caught.value
        cancel = threading.Event()
        cancel.set()
        for call in (lambda: v.replicate("web", cancel=cancel),
                     lambda: v.failover("web", cancel=cancel)):
            with pytest.raises(Cancelled) as caught:
                call()
            assert caught.value.item == "web"
        os.unlink(tmp_path / "a0.img")
        with pytest.raises(FileNotFoundError) as caught:
            v.replicate("a")
        assert caught.value.item == "a"


@pytest.mark.parametrize("phase", ["started", "cut", "transfer"])
def test_an_operators_cancel_is_no_fault(vault, phase):
    """Review 2 U10: a cycle cancelled at any phase leaves the item's health
    and last_error as they were, as a kill does; its job says cancelled,
    and a rerun replicates it."""
    with Vault(vault, writer=True) as v:
        v.store.set_item("web", health="critical", last_error="an earlier error")
        cancel, sink = cancel_on(
            lambda e: e.item == "web" and (e.kind if phase == "started" else e.phase) == phase)
        with pytest.raises(Cancelled):
            v.replicate("web", events=sink, cancel=cancel)
        st = v.status("web")
        assert (st.health, st.last_error, st.point_count) == ("critical", "an earlier error", 0)
        assert [(j.kind, j.state) for j in v.jobs(item="web", limit=1)] == [
            ("replicate", "cancelled")]
        r = v.replicate("web")
        assert r.point_id == 1 and v.status("web").health == "ok"
    for i in (0, 1):
        assert sha(vault.parent / f"web{i}.img") == sha(vault.parent / "site-b" / f"web{i}.img")

"""pydr.dr.schedule: which items pydr run replicates when, over a real
vault with plain file disks and a fake clock (no waiting)."""

import os
from types import SimpleNamespace

import pytest

from pydr.dr import schedule
from pydr.dr.vault import Vault, init_vault

MiB = 1 << 20


def policy(target=None, priority=0):
    return SimpleNamespace(target_rpo=target, priority=priority)


@pytest.fixture
def vault(tmp_path):
    """A writer Vault with items a, b, c (1 MiB file disks, no point yet)."""
    init_vault(tmp_path / "v")
    v = Vault(tmp_path / "v", writer=True)
    for name in "abc":
        src = tmp_path / f"{name}.img"
        src.write_bytes(os.urandom(4096) + bytes(MiB - 4096))
        v.protect(name, [(str(src), str(tmp_path / f"r{name}.img"))])
    yield v
    v.close()


def data_time(v, name):
    return v.store.points(name)[-1].data_time


def test_an_item_without_a_point_is_due_at_once(vault):
    assert schedule.due_items(vault.store, {"a": policy(60)}, 1000.0) == ["a"]
    assert schedule.next_due(vault.store, {"a": policy(60)}, 1000.0) == 1000.0


def test_due_once_the_data_age_plus_the_last_duration_reaches_half_the_target(vault):
    vault.replicate("a")
    t = data_time(vault, "a")
    pol = {"a": policy(60)}
    assert schedule.due_items(vault.store, pol, t + 29.9) == []
    assert schedule.next_due(vault.store, pol, t + 10) == pytest.approx(t + 30)
    assert schedule.due_items(vault.store, pol, t + 30) == ["a"]
    # a cycle that took 10 s starts 10 s earlier
    assert schedule.due_items(vault.store, pol, t + 20, {"a": 10.0}) == ["a"]
    assert schedule.due_items(vault.store, pol, t + 19.9, {"a": 10.0}) == []


def test_items_without_a_target_are_not_scheduled(vault):
    pols = {"a": policy(None), "b": policy(None)}
    assert schedule.due_items(vault.store, pols, 1e9) == []
    assert schedule.next_due(vault.store, pols, 1e9) is None
    assert schedule.summary(schedule.plans(vault.store, pols, 1e9)) == {
        "a": "no target RPO", "b": "no target RPO"}


def test_priority_first_then_the_most_overdue(vault):
    vault.replicate("a")
    vault.replicate("b")
    ta, tb = data_time(vault, "a"), data_time(vault, "b")
    now = max(ta, tb) + 1000
    pols = {"a": policy(100), "b": policy(10), "c": policy(100, priority=5)}
    # c (no point) has the priority; b is due since tb + 5, a since ta + 50: b is more overdue
    assert schedule.due_items(vault.store, pols, now) == ["c", "b", "a"]


def test_a_failed_item_waits_for_its_next_retry(vault):
    vault.store.set_item("a", attempts=2, next_retry=2000.0, last_error="EIO")
    pol = {"a": policy(60)}
    assert schedule.due_items(vault.store, pol, 1999.0) == []
    assert schedule.next_due(vault.store, pol, 1000.0) == 2000.0
    plan = schedule.plan_item(vault.store, "a", pol["a"], 1999.0)
    assert plan.status == "retry" and "attempt 3" in plan.why
    assert schedule.due_items(vault.store, pol, 2000.0) == ["a"]


def test_resync_required_is_due_as_a_resync(vault):
    vault.replicate("a")
    vault.store.set_item("a", state="resync-required", last_error="tracking lost")
    plan = schedule.plan_item(vault.store, "a", policy(60), data_time(vault, "a") + 30)
    assert (plan.status, plan.resync, plan.why) == ("due", True, "resync required")


@pytest.mark.parametrize("state", ["failed-over", "failing-over", "committing",
                                   "failover-committed"])
def test_failed_over_and_committed_items_are_paused(vault, state):
    vault.store.set_item("a", state=state)
    pols = {"a": policy(60), "b": policy(60)}
    assert schedule.due_items(vault.store, pols, 1000.0) == ["b"]
    assert schedule.summary(schedule.plans(vault.store, pols, 1000.0)) == {
        "a": f"paused: {state}"}


def test_an_item_under_a_drill_is_paused(vault, tmp_path):
    vault.store.set_item("a", test_dir=str(tmp_path / "drill"))
    plan = schedule.plan_item(vault.store, "a", policy(60), 1000.0)
    assert (plan.status, plan.when) == ("paused", None)
    assert "drill" in plan.why
    assert schedule.next_due(vault.store, {"a": policy(60)}, 1000.0) is None

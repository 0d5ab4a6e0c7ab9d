"""pydr.dr.parallel_executor: units' work on a pool of threads, the vault
on the calling thread. Concurrency is proven with a barrier (both works
must be in flight at once), never with time."""

import os
import threading

import pytest

from pydr.dr import stepcapture
from pydr.dr.cycle import replicate
from pydr.dr.parallel_executor import ParallelExecutor
from pydr.dr.vault import Vault, init_vault
from pydr.errors import Cancelled, InvalidArgument

MiB = 1 << 20


@pytest.fixture
def vault(tmp_path):
    init_vault(tmp_path / "v")
    v = Vault(tmp_path / "v", writer=True)
    for name in "abc":
        (tmp_path / f"{name}.img").write_bytes(os.urandom(MiB))
        v.protect(name, [(str(tmp_path / f"{name}.img"), str(tmp_path / f"r{name}.img"))])
    yield v
    v.close()


def wrap_tasks(monkeypatch, before):
    """stepcapture.task's work runs before(name) first, on its pool thread."""
    real = stepcapture.task

    def task(v, name, opts):
        fn, argument = real(v, name, opts)

        def work(arg):
            before(name)
            return fn(arg)
        return work, argument

    monkeypatch.setattr(stepcapture, "task", task)


def same_bytes(tmp_path, name):
    with open(tmp_path / f"{name}.img", "rb") as f, open(tmp_path / f"r{name}.img", "rb") as g:
        return f.read() == g.read()


def test_two_units_work_at_once_on_pool_threads(vault, tmp_path, monkeypatch):
    barrier = threading.Barrier(2, timeout=120)  # broken unless both are in flight together
    threads = {}

    def before(name):
        threads[name] = threading.current_thread().name
        barrier.wait()

    wrap_tasks(monkeypatch, before)
    result = replicate(vault.store, ["a", "b"], executor=ParallelExecutor(2))
    assert sorted(result.items) == ["a", "b"] and result.failed == ()
    assert all(t.startswith("pydr-cycle") for t in threads.values())
    assert threads["a"] != threads["b"]
    assert same_bytes(tmp_path, "a") and same_bytes(tmp_path, "b")
    assert result.point_id is not None and len(vault.points("a")) == len(vault.points("b")) == 1


def test_one_unit_or_one_job_runs_on_the_calling_thread(vault, monkeypatch):
    def before(name):
        raise AssertionError("no work goes to the pool")

    wrap_tasks(monkeypatch, before)
    assert replicate(vault.store, ["a"], executor=ParallelExecutor(2)).items == ("a",)
    assert sorted(replicate(vault.store, ["a", "b"], executor=ParallelExecutor(1)).items) == [
        "a", "b"]


def test_a_failed_work_is_its_units_failure_only(vault, monkeypatch):
    def before(name):
        if name == "b":
            raise OSError(5, "Input/output error", "b.img")

    wrap_tasks(monkeypatch, before)
    from pydr.errors import CycleFailed

    with pytest.raises(CycleFailed) as caught:
        replicate(vault.store, ["a", "b", "c"], executor=ParallelExecutor(2))
    by = caught.value.result.by_item
    assert (by["a"].status, by["b"].status, by["c"].status) == ("succeeded", "failed",
                                                                "succeeded")
    assert by["b"].exit_code == 5 and vault.item("b")["health"] == "warning"


def test_a_cancel_leaves_the_work_not_begun_unrun(vault, monkeypatch):
    """Two pool threads, three units: a's and b's work set the cancel once
    both run; c's never starts and ends cancelled, a and b are recorded."""
    cancel = threading.Event()
    barrier = threading.Barrier(2, timeout=120, action=cancel.set)
    ran = []

    def before(name):
        ran.append(name)
        barrier.wait()

    wrap_tasks(monkeypatch, before)
    with pytest.raises(Cancelled) as caught:
        replicate(vault.store, ["a", "b", "c"], executor=ParallelExecutor(2), cancel=cancel)
    by = caught.value.result.by_item
    assert sorted(ran) == ["a", "b"]
    assert (by["a"].status, by["b"].status) == ("succeeded", "succeeded")
    assert by["c"].status == "failed" and by["c"].exit_code == 130
    assert vault.points("c") == [] and vault.jobs(item="c")[0].state == "cancelled"


def test_jobs_must_be_a_positive_int():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InvalidArgument):
            ParallelExecutor(bad)


def test_with_warm_state_untracked_items_still_go_to_the_pool(vault, monkeypatch):
    """Warm state serves tracked disks and QEMU sources only: items of plain
    files run on the pool as without it (both in flight at once)."""
    from pydr.dr.warm import WarmState

    barrier = threading.Barrier(2, timeout=120)
    wrap_tasks(monkeypatch, lambda name: barrier.wait())
    with WarmState() as warm:
        result = replicate(vault.store, ["a", "b"], executor=ParallelExecutor(2), warm=warm)
    assert sorted(result.items) == ["a", "b"]

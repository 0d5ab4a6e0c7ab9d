"""One result style (pydr.dr.results): every result a Vault call answers
round-trips through to_dict(), json.dumps and from_dict() with the values
of a real vault, and every ``--json`` of the vault's commands prints exactly
to_dict() of the result the Vault method returned (the CLI runs in this
process; each Vault method is wrapped to keep what it returned)."""

import dataclasses
import json
import os
import threading
from datetime import datetime, timedelta, timezone

import pytest

from pydr.cli import main
from pydr.dr import results as R
from pydr.dr.vault import Vault, init_vault
from pydr.errors import CycleFailed, PlanFailed, UnknownName

SPIED = ("protect", "status", "points", "jobs", "replicate", "materialize", "test_failover",
         "cleanup_test_failover", "failover", "change_point", "commit", "reprotect",
         "failback", "run_plan")


def round_trip(result):
    """result survives to_dict -> json -> from_dict unchanged; its dict has
    "type" and "version" first and ISO 8601 UTC times."""
    d = result.to_dict()
    assert list(d)[:2] == ["type", "version"] and d["version"] == 1
    assert d["type"] == type(result).TYPE
    text = json.dumps(d)
    back = type(result).from_dict(json.loads(text))
    assert back == result and R.result_from_dict(json.loads(text)) == result
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, datetime):
            assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
            assert d[f.name].endswith("Z") and R.parse_iso(d[f.name]) == value
    return d


@pytest.fixture
def spy(monkeypatch):
    """{method: [what each call returned]} of the Vault methods the CLI calls."""
    calls = {m: [] for m in SPIED}
    for name in SPIED:
        real = getattr(Vault, name)

        def wrapped(self, *args, _real=real, _name=name, **kwargs):
            out = _real(self, *args, **kwargs)
            calls[_name].append(out)
            return out

        monkeypatch.setattr(Vault, name, wrapped)
    return calls


@pytest.fixture
def site(tmp_path):
    vault = tmp_path / "vault"
    init_vault(vault)
    (tmp_path / "b").mkdir()
    for n in ("vm", "a", "b"):
        (tmp_path / f"{n}.img").write_bytes(os.urandom(1 << 20))
    return tmp_path, vault


def run(capsys, vault, *args, code=0):
    """`pydr ARGS --json --vault VAULT` in this process: its JSON output."""
    capsys.readouterr()
    try:
        rc = main([*map(str, args), "--json", "--vault", str(vault)])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc == code, err
    return json.loads(out)


def same(printed, result):
    """The CLI printed exactly to_dict() of the result (a list of results)."""
    if isinstance(result, list):
        assert printed == [r.to_dict() for r in result]
        for r in result:
            round_trip(r)
    else:
        assert printed == result.to_dict()
        round_trip(result)


def test_every_vault_command_prints_the_to_dict_of_its_vault_call(site, spy, capsys):
    tmp, vault = site
    vm = tmp / "vm.img"

    def cli(method, *args, code=0):
        printed = run(capsys, vault, *args, code=code)
        same(printed, spy[method][-1])
        return spy[method][-1]

    st = cli("protect", "protect", "vm", "--disk", f"{vm}={tmp / 'b' / 'vm.img'}",
             "--retention", "5")
    assert isinstance(st, R.ItemStatus) and st.state == "protecting" and st.point_count == 0
    assert st.disks == (R.DiskStatus(0, str(vm), str(tmp / "b" / "vm.img"), None),)
    for n in ("a", "b"):
        cli("protect", "protect", n, "--disk", f"{tmp / (n + '.img')}={tmp / 'b' / (n + '.img')}")
    first = cli("replicate", "replicate", "vm")
    assert isinstance(first, R.CycleResult) and first.items == ("vm",)
    assert first.by_item["vm"].status == "succeeded" and first.failed == ()
    with open(vm, "r+b") as f:
        f.write(os.urandom(4096))
    second = cli("replicate", "replicate", "vm")
    assert second.point_id == first.point_id + 1
    third = cli("replicate", "replicate", "--all")
    assert third.items == ("a", "b", "vm") and set(third.by_item) == {"a", "b", "vm"}

    # the read-only calls: the CLI's output is the same call's to_dict(), up to the
    # age of the data (rpo_seconds), which moves with the clock between the two
    status = cli("status", "status", "vm")
    assert status.latest_point == third.point_id and status.rpo_seconds >= 0
    assert status.latest_point_at <= datetime.now(timezone.utc)
    again = Vault(vault).status("vm")
    assert dataclasses.replace(again, rpo_seconds=status.rpo_seconds) == status
    printed = run(capsys, vault, "status")  # one Vault.status call an item
    every = spy["status"][-3:]
    same(printed, every)
    assert [s.item for s in every] == ["a", "b", "vm"]
    points = cli("points", "points", "vm")
    assert [p.id for p in points] == [first.point_id, second.point_id, third.point_id]
    assert all(p.cut_at <= p.created_at for p in points)
    jobs = cli("jobs", "jobs")
    assert [j.id for j in jobs] == sorted((j.id for j in jobs), reverse=True)
    assert jobs[0].kind == "replicate" and jobs[-1].kind == "protect"
    with Vault(vault) as v:
        assert v.jobs() == jobs and v.job(jobs[0].id) == jobs[0]
        assert [j.item for j in v.jobs(item="a")] == ["a", "a"]
        assert v.jobs(state="failed") == [] and len(v.jobs(limit=2)) == 2
        assert v.jobs(since=datetime.now(timezone.utc) + timedelta(hours=1)) == []
        assert v.jobs(since=0) == jobs
        with pytest.raises(UnknownName):
            v.job(10_000)
    cli("jobs", "jobs", "--item", "vm", "--state", "succeeded", "--limit", "1")

    made = cli("materialize", "materialize", "vm", "--point", first.point_id,
               "--to", tmp / "m")
    assert made.operation == "materialize" and made.paths == (str(tmp / "m" / "vm.img"),)
    drill = cli("test_failover", "test-failover", "vm", "--to", tmp / "drill", "--point",
                first.point_id)
    assert (drill.operation, drill.point, drill.already_done) == ("test-failover", 1, False)
    again = cli("test_failover", "test-failover", "vm", "--to", tmp / "drill")
    assert again.already_done and again.notes
    clean = cli("cleanup_test_failover", "cleanup-test-failover", "vm")
    assert clean.removed == drill.paths
    assert cli("cleanup_test_failover", "cleanup-test-failover", "vm").already_done

    over = cli("failover", "failover", "vm", "--point", "latest-processed")
    assert (over.operation, over.point, over.direction) == ("failover", third.point_id,
                                                             "forward")
    moved = cli("change_point", "change-point", "vm", "--point", first.point_id)
    assert moved.point == first.point_id and moved.method
    done = cli("commit", "commit", "vm")
    assert (done.operation, done.direction) == ("commit", "reverse")
    back = cli("reprotect", "reprotect", "vm")
    assert isinstance(back.cycle, R.CycleResult) and back.point == back.cycle.point_id
    assert back.cycle.by_item["vm"].status == "succeeded"
    home = cli("failback", "failback", "vm", "--shutdown-hook", "true")
    assert home.operation == "failback" and home.point is not None
    assert cli("commit", "commit", "vm").direction == "forward"

    assert run(capsys, vault, "plan", "create", "ab", "--group", "a", "--pre-hook", "true",
               "--group", "b")["plan"] == "ab"
    plan = cli("run_plan", "plan", "test-failover", "ab", "--to", tmp / "plan")
    assert isinstance(plan, R.PlanReport) and plan.ok and plan.error is None
    assert [(s.group, s.items, s.not_run) for s in plan.steps] == [(1, ("a",), ()),
                                                                  (2, ("b",), ())]
    assert plan.steps[0].hooks == (R.PlanHook("pre", True, 0),)
    assert all(isinstance(o, R.OperationResult) and o.operation == "test-failover"
               for o in plan.outcomes.values())
    assert os.path.exists(plan.outcomes["b"].paths[0])
    cli("run_plan", "plan", "cleanup-test-failover", "ab")


def test_failures_inside_many_item_results(site, capsys):
    """A cycle of several items where one fails, and a plan that stops: each
    item's outcome is in the result, the error with its exit code."""
    tmp, vault = site
    with Vault(vault, writer=True) as v:
        for n in ("a", "b"):
            v.protect(n, [(tmp / f"{n}.img", tmp / "b" / f"{n}.img")])
        v.replicate("a")
        os.rename(tmp / "b.img", tmp / "gone.img")
        with pytest.raises(CycleFailed) as caught:
            v.replicate(["a", "b"])
        result = caught.value.result
        round_trip(result)
        assert [o.item for o in result.failed] == ["b"] and result.items == ("a",)
        assert result.by_item["b"].exit_code == 3 and "b.img" in result.by_item["b"].error
        assert result.by_item["a"].point_id == result.point_id
        v.create_plan("ab", [{"items": ["a"]}, {"items": ["b"]}])
        with pytest.raises(PlanFailed) as stopped:
            v.run_plan("ab", "failover", point="latest-processed", planned=True)
        report = stopped.value.result
        round_trip(report)
        assert not report.ok and "group 2" in report.error
        failed = report.steps[1].outcomes["b"]
        assert isinstance(failed, R.ItemError) and failed.item == "b"
        assert failed.exit_code == 15 and "cannot fail over" in failed.error  # no point yet
        assert not failed.recoverable
        assert isinstance(report.steps[0].outcomes["a"], R.OperationResult)
    printed = run(capsys, vault, "plan", "commit", "ab", code=17)
    assert printed["type"] == "plan-report" and not printed["ok"]
    assert printed["steps"][0]["outcomes"]["a"]["operation"] == "commit"


def test_each_result_class_round_trips_and_refuses_other_shapes():
    at = datetime(2026, 12, 6, 22, 45, 10, 123456, tzinfo=timezone.utc)
    outcome = R.ItemOutcome("web", "failed", None, "disk not found", 3, 0, False)
    cycle = R.CycleResult(None, [], 0, 0, 0.1, "crash-consistent", [4], [outcome])
    assert cycle.items == () and cycle.jobs == (4,) and cycle.failed == (outcome,)
    samples = [
        R.PointInfo(1, "web", at, at - timedelta(seconds=3), "crash-consistent", "snapshot",
                    10, None),
        R.JobInfo(2, "replicate", "web", "failed", 0.5, 10, at, None, "boom", 42, None, None),
        R.ItemError("web", "boom", 5, True, "run it again"),
        outcome, cycle,
        R.OperationResult("web", "reprotect", 3, (), (), None, "reverse", False, ("resumed",),
                          cycle),
        R.PlanReport("p", "commit", False, (R.PlanStep(1, ("web", "db"), {
            "web": R.ItemError("web", "boom", 5)}, ("db",), (R.PlanHook("pre", True, 0),)),),
            "stopped"),
    ]
    for r in samples:
        round_trip(r)
    assert R.iso(at) == "2026-12-06T22:45:10.123456Z"
    with pytest.raises(ValueError, match="not a point"):
        R.PointInfo.from_dict(samples[1].to_dict())
    with pytest.raises(ValueError, match="version 2"):
        R.JobInfo.from_dict({**samples[1].to_dict(), "version": 2})
    newer = {**samples[2].to_dict(), "added_later": 1}  # a field added: still read
    assert R.ItemError.from_dict(newer) == samples[2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        samples[0].id = 5


def test_events_and_cancel_are_forwarded_only_when_given(site, monkeypatch):
    """The Vault passes events/cancel on to the workflow only when a caller
    gives them (the workflow functions of a branch without them still run)."""
    from pydr.dr import cycle

    tmp, vault = site
    seen = []
    real = cycle.replicate

    def recording(store, names, **kwargs):
        seen.append({k: kwargs[k] for k in ("events", "cancel") if k in kwargs})
        kwargs.pop("events", None), kwargs.pop("cancel", None)
        return real(store, names, **kwargs)

    monkeypatch.setattr("pydr.dr.vault.R.replicate", recording)
    stop, sink = threading.Event(), seen.append
    with Vault(vault, writer=True) as v:
        v.protect("a", [(tmp / "a.img", tmp / "b" / "a.img")])
        v.replicate("a")
        v.replicate("a", events=sink, cancel=stop)
    assert seen == [{}, {"events": sink, "cancel": stop}]

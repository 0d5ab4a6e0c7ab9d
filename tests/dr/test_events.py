"""events= on the vault's operations: typed Events naming the item, each
disk, the job and the phase, with bytes done reaching bytes total, paths a
person knows (never a hidden .pydr-new file), and `pydr ... --events`
printing exactly their to_dict() as JSON lines."""

import datetime
import json
import os
import random

import pytest

from pydr.dr.events import KINDS, PHASES, Event
from pydr.dr.vault import Vault, init_vault

from conftest import run_cli, sha
from test_s3 import s3, swift  # noqa: F401  (fixtures: a Swift server, a bucket)

SIZES = (3 << 20, 1 << 20)


@pytest.fixture
def web(tmp_path):
    """Vault tmp_path/vault with item 'web': two random disks a.img (3 MiB)
    and c.img (1 MiB) replicated to tmp_path/site-b."""
    init_vault(tmp_path / "vault")
    rng = random.Random(21)
    (tmp_path / "site-b").mkdir()
    pairs = []
    for name, size in zip(("a", "c"), SIZES):
        src = tmp_path / f"{name}.img"
        src.write_bytes(rng.randbytes(size))
        pairs.append((src, tmp_path / "site-b" / f"{name}.img"))
    with Vault(tmp_path / "vault", writer=True) as v:
        v.protect("web", pairs)
    return tmp_path / "vault", pairs


def job_of(v, kind):
    """The id of the newest job of `kind` (Vault.jobs: newest first)."""
    return [j.id for j in v.jobs() if j.kind == kind][0]


def check_events(events, operation, job, phase, paths):
    """The Events of one item's `operation`: all typed and about 'web';
    "started" first and "finished" last, both naming `job`; every disk's
    progress in `phase` named by its person's path, reaching its total."""
    assert all(isinstance(e, Event) for e in events)
    mine = [e for e in events if e.operation == operation]
    assert all(e.item == "web" and e.kind in KINDS for e in mine)
    assert all(e.phase is None or e.phase in PHASES for e in mine)
    assert mine[0].kind == "started" and mine[-1].kind == "finished"
    assert {e.job for e in mine} == {job}
    for e in events:  # never a file pydr works through
        assert ".pydr-" not in (e.path or ""), e
        d = e.to_dict()
        assert (d["type"], d["version"]) == ("event", 1) and d["at"].endswith("Z")
        assert json.loads(json.dumps(d)) == d
        assert datetime.datetime.fromisoformat(d["at"].replace("Z", "+00:00")) == e.at
    progress = [e for e in mine if e.kind == "progress" and e.phase == phase]
    assert {e.disk for e in progress} == {0, 1}
    for disk, (path, size) in enumerate(zip(paths, SIZES)):
        own = [e for e in progress if e.disk == disk]
        assert {e.path for e in own} == {str(path)}
        assert own[-1].bytes_done == own[-1].bytes_total == size
        assert all(0 <= e.bytes_done <= e.bytes_total for e in own)
    return mine


def test_a_cycle_names_the_item_each_disk_the_job_and_its_phases(web):
    vault, pairs = web
    events = []
    with Vault(vault, writer=True) as v:
        result = v.replicate("web", events=events.append)
        job = job_of(v, "replicate")
    mine = check_events(events, "replicate", job, "transfer", [r for _, r in pairs])
    assert [e.phase for e in mine if e.kind == "progress" and e.disk is None] == ["cut", "record"]
    assert mine[-1].message == f"point {result.point_id}"
    assert mine[-1].bytes_done == sum(SIZES)  # the first cycle moves every byte


def test_a_drill_names_its_own_disks_never_their_temporary_files(web, tmp_path):
    vault, pairs = web
    drill = tmp_path / "drill"
    events = []
    with Vault(vault, writer=True) as v:
        v.replicate("web")
        v.test_failover("web", drill, "latest", method="copy", events=events.append)
        job = job_of(v, "test-failover")
        removed = []
        v.cleanup_test_failover("web", events=removed.append)
    check_events(events, "test-failover", job, "materialize",
                 [drill / "a.img", drill / "c.img"])
    assert [e.kind for e in removed] == ["started", "finished"]
    assert removed[0].operation == "cleanup-test-failover" and removed[0].job is not None


def test_a_failover_reports_the_replicas_it_brings_up(web):
    vault, pairs = web
    events = []
    with Vault(vault, writer=True) as v:
        v.replicate("web")
        for src, _ in pairs:  # the latest changes, replicated by the failover first
            with open(src, "r+b") as f:
                f.write(os.urandom(4096))
        r = v.failover("web", "latest", method="copy", events=events.append)
        job = job_of(v, "failover")
        cycle = job_of(v, "replicate")
    assert r.point == 2
    check_events(events, "failover", job, "bring-up", [rep for _, rep in pairs])
    ran = [e for e in events if e.operation == "replicate"]  # its last cycle, first
    assert ran[0].kind == "started" and ran[-1].kind == "finished" and ran[-1].job == cycle
    assert events.index(ran[-1]) < min(i for i, e in enumerate(events)
                                       if e.operation == "failover")
    for src, rep in pairs:
        assert sha(src) == sha(rep)


def test_a_failed_operation_says_so_in_an_event(web):
    vault, _ = web
    events = []
    with Vault(vault, writer=True) as v, pytest.raises(Exception) as caught:
        v.failover("web", "latest", events=events.append)  # no point yet
    assert [(e.kind, e.operation, e.item) for e in events][-1] == ("failed", "failover", "web")
    assert events[-1].message == str(caught.value)


def test_run_plan_emits_events_not_dicts(web, tmp_path):
    vault, _ = web
    events = []
    with Vault(vault, writer=True) as v:
        v.replicate("web")
        v.create_plan("drill", [{"items": ["web"], "pre": "true", "post": None}])
        v.run_plan("drill", "test-failover", directory=str(tmp_path / "drills"),
                   events=events.append)
    assert all(isinstance(e, Event) for e in events)
    plan = [e for e in events if e.kind in ("plan-step", "hook") or e.item is None]
    assert [(e.kind, e.item) for e in plan] == [("hook", None), ("plan-step", None),
                                                ("plan-step", "web"), ("finished", None)]
    assert plan[1].message == "plan drill: group 1 of 1 started (web)"
    assert plan[2].message == "plan drill: group 1: succeeded"
    kinds = [e.kind for e in events if e.item == "web" and e.operation == "test-failover"]
    assert kinds[0] == "started" and "progress" in kinds and kinds[-2:] == ["finished",
                                                                           "plan-step"]


def test_the_cli_prints_the_api_s_events_as_json_lines(web):
    vault, pairs = web
    env = dict(os.environ, PYDR_VAULT=str(vault))
    api = []
    with Vault(vault, writer=True) as v:
        v.replicate("web", events=api.append)
    for src, _ in pairs:
        with open(src, "r+b") as f:
            f.write(os.urandom(8192))
    r = run_cli("replicate", "web", "--events", env=env)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stderr.decode().splitlines()]
    for d in lines:  # each line is exactly an Event's to_dict()
        fields = {k: v for k, v in d.items() if k not in ("type", "version")}
        fields["at"] = datetime.datetime.fromisoformat(fields["at"].replace("Z", "+00:00"))
        assert Event(**fields).to_dict() == d
    def shape(records):
        """What does not depend on the cycle's number or timing: the events
        but a disk's progress on the way, each once (a disk's end may come
        twice: the engine's report of its last bytes, if its report interval
        had passed, then the report of its end)."""
        out = []
        for d in records:
            if d["kind"] == "progress" and d["bytes_done"] != d["bytes_total"]:
                continue
            fields = (d["kind"], d["operation"], d["item"], d["disk"], d["phase"], d["path"],
                      d["bytes_total"])
            if not out or out[-1] != fields:
                out.append(fields)
        return out

    assert shape(lines) == shape(e.to_dict() for e in api)
    with Vault(vault) as v:
        assert {d["job"] for d in lines} == {job_of(v, "replicate")}
    for src, rep in pairs:
        assert sha(src) == sha(rep)


def test_verify_reads_each_replica_with_events_and_stops_on_cancel(web):
    import threading

    from pydr.errors import Cancelled

    vault, pairs = web
    events = []
    with Vault(vault, writer=True) as v:
        v.replicate("web")
        report = v.verify("web", events=events.append)
        assert report["problems"] == []
        check_events(events, "verify", None, "verify", [r for _, r in pairs])
        stop, stopped = threading.Event(), []

        def cancel_at_first(event):
            stopped.append(event)
            if event.kind == "progress":
                stop.set()

        with pytest.raises(Cancelled):
            v.verify("web", events=cancel_at_first, cancel=stop)
    # the first disk's only window was read; the second disk never was
    assert [(e.kind, e.disk) for e in stopped] == [("started", None), ("progress", 0),
                                                   ("cancelled", None)]


def test_an_object_store_item_reports_compare_upload_and_download(s3, tmp_path):
    """A chunk index: each disk's "compare" (its signature) and "upload"
    (its chunks) progress, named by the source; a cancel at the first upload
    stops the cycle, and a rerun finishes it; a drill's download names its
    own disks."""
    import threading

    from pydr.errors import Cancelled

    rng = random.Random(5)
    pairs = []
    for name, size in zip(("a", "c"), (6 << 20, 5 << 20)):
        src = tmp_path / f"{name}.img"
        src.write_bytes(rng.randbytes(size))
        pairs.append((src, s3["url"]))
    with Vault(s3["vault"], writer=True) as v:
        v.protect("web", pairs)
        stop, seen = threading.Event(), []

        def cancel_at_first_upload(event):
            seen.append(event)
            if event.phase == "upload":
                stop.set()

        with pytest.raises(Cancelled):
            v.replicate("web", events=cancel_at_first_upload, cancel=stop)
        assert seen[-1].kind == "cancelled" and v.points("web") == []
        # the chunks of disk 0 in flight end; disk 1 is never signed nor uploaded
        first = next(i for i, e in enumerate(seen) if e.phase == "upload")
        assert seen[first].disk == 0
        assert not [e for e in seen if e.disk == 1 and e.phase in ("compare", "upload")]
        events = []
        v.replicate("web", events=events.append)
        job = job_of(v, "replicate")
        drill, made = tmp_path / "drill", []
        v.test_failover("web", drill, "latest", events=made.append)
        drill_job = job_of(v, "test-failover")
    sizes = {0: 6 << 20, 1: 5 << 20}
    for phase in ("compare", "upload"):
        mine = [e for e in events if e.phase == phase]
        assert {e.disk for e in mine} == {0, 1} and {e.job for e in mine} == {job}
        for disk, (src, _) in enumerate(pairs):
            own = [e for e in mine if e.disk == disk]
            assert {e.path for e in own} == {str(src)}
            assert own[-1].bytes_done == own[-1].bytes_total == sizes[disk]
    names = [drill / "a.img", drill / "c.img"]
    shown = [e for e in made if e.phase == "materialize"]
    assert {e.path for e in shown} == {str(n) for n in names}
    assert {e.job for e in made} == {drill_job}
    for (src, _), copy in zip(pairs, names):
        assert sha(copy) == sha(src)

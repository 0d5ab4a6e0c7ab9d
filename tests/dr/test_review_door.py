"""The review's findings on the Vault's door (one test each): a close() from
another thread keeps the writer lock; a raising events= callback neither
fails the operation nor marks the item unhealthy, and a bad events= or
cancel= is refused before a job starts; a cancelled operation names the
disk, never its hidden .pydr-new file; bad arguments are InvalidArgument,
use after close() is VaultError; the store's methods a DR tool needs are
explicit and an unknown attribute is the Vault's error; lock_timeout
without writer is refused."""

import datetime
import logging
import os
import random
import sqlite3
import subprocess
import sys
import threading

import pytest

from pydr.dr.vault import Vault, init_vault
from pydr.errors import Cancelled, InvalidArgument, VaultError, WrongThread


@pytest.fixture
def web(tmp_path):
    """Vault tmp_path/vault with item 'web': two random disks (2 MiB, 1 MiB)
    replicated to tmp_path/site-b, one cycle done (point 1)."""
    init_vault(tmp_path / "vault")
    rng = random.Random(7)
    (tmp_path / "site-b").mkdir()
    pairs = []
    for name, size in (("a", 2 << 20), ("c", 1 << 20)):
        src = tmp_path / f"{name}.img"
        src.write_bytes(rng.randbytes(size))
        pairs.append((str(src), str(tmp_path / "site-b" / f"{name}.img")))
    with Vault(tmp_path / "vault", writer=True) as v:
        v.protect("web", pairs)
        assert v.replicate("web").point_id == 1
    return tmp_path / "vault", pairs


def job_states(v):
    return [(j.kind, j.state) for j in v.jobs(item="web")]


def test_close_from_another_thread_raises_and_keeps_the_writer_lock(web):
    # review1 #2: Store.close() swallowed WrongThread and let go of the lock
    vault, _ = web
    v = Vault(vault, writer=True)
    caught = []

    def close_elsewhere():
        try:
            v.close()
        except BaseException as exc:  # the exception of that thread, for the assertions
            caught.append(exc)

    t = threading.Thread(target=close_elsewhere)
    t.start()
    t.join()
    assert len(caught) == 1 and isinstance(caught[0], WrongThread)
    with pytest.raises(VaultError, match="writer"):  # the lock is still held
        Vault(vault, writer=True)
    assert v.status("web").state == "protected"  # still open in its own thread
    assert v.replicate("web").point_id == 2
    v.close()
    with Vault(vault, writer=True) as w:  # let go once closed by its thread
        assert [p.id for p in w.points("web")] == [1, 2]


@pytest.mark.parametrize("when", [("started", None), ("progress", "transfer"),
                                  ("progress", "record"), ("finished", None)])
def test_a_raising_events_callback_is_logged_and_the_cycle_succeeds(web, when, caplog):
    # review1 #6 / review2 U5: the callback's error failed the cycle, marked
    # the item critical, or turned a recorded point into an exception
    vault, _ = web
    seen, raised = [], []

    def callback(event):
        seen.append(event)
        if (event.kind, event.phase) == when:
            raised.append(event)
            raise RuntimeError("the orchestrator's logging bug")

    with Vault(vault, writer=True) as v, caplog.at_level(logging.ERROR, "pydr.events"):
        result = v.replicate("web", events=callback)
        assert result.point_id == 2 and not result.failed
        status = v.status("web")
        assert (status.health, status.last_error) == ("ok", None)
        assert job_states(v)[0] == ("replicate", "succeeded")
        assert [p.id for p in v.points("web")] == [1, 2]
    assert raised and seen[-1].kind == "finished"  # it still got what came after
    logged = [r for r in caplog.records if r.name == "pydr.events"]
    assert 1 <= len(logged) <= len(raised)  # logged with its traceback, not flooding
    assert all("the orchestrator's logging bug" in r.exc_text for r in logged)


@pytest.mark.parametrize("options,message", [
    ({"events": 5}, "events must be a callable"),
    ({"cancel": True}, "cancel must be a threading.Event"),
    ({"cancel": "stop"}, "cancel must be a threading.Event"),
])
def test_a_bad_events_or_cancel_is_refused_at_the_door(web, tmp_path, options, message):
    # review1 #6: events=5 left a failed job and health critical; cancel=True
    # an AttributeError and a cancelled job
    vault, _ = web
    with Vault(vault, writer=True) as v:
        before = job_states(v)
        for call in (lambda: v.replicate("web", **options),
                     lambda: v.test_failover("web", str(tmp_path / "drill"), **options),
                     lambda: v.failover("web", **options),
                     lambda: v.materialize("web", 1, str(tmp_path / "m"), **options),
                     lambda: v.verify("web", **options)):
            with pytest.raises(InvalidArgument, match=message):
                call()
        assert job_states(v) == before  # no job started
        status = v.status("web")
        assert (status.state, status.health, status.last_error) == ("protected", "ok", None)
        assert not (tmp_path / "drill").exists() and not (tmp_path / "m").exists()


def test_a_cancelled_drill_names_the_disk_not_its_hidden_file(web, tmp_path):
    # review1 #10: "cancelled" events and Cancelled named .a.img.pydr-new
    vault, _ = web
    cancel = threading.Event()
    events = []

    def callback(event):
        events.append(event)
        if event.kind == "progress" and event.phase == "materialize":
            cancel.set()  # stops the copy of the disk it reports on

    drill = tmp_path / "drill"
    with Vault(vault, writer=True) as v:
        with pytest.raises(Cancelled) as caught:
            v.test_failover("web", str(drill), point=1, method="copy", events=callback,
                            cancel=cancel)
    assert ".pydr-" not in str(caught.value) and ".pydr-" not in (caught.value.path or "")
    assert caught.value.path == str(drill / "a.img")
    ended = [e for e in events if e.kind == "cancelled"]
    assert len(ended) == 1
    assert ".pydr-" not in ended[0].message and str(drill / "a.img") in ended[0].message
    for e in events:
        assert ".pydr-" not in (e.path or "") + (e.message or ""), e


def test_bad_arguments_are_invalid_argument_and_use_after_close_is_vault_error(web, tmp_path):
    # review1 #12 / review2 U4: OverflowError, AttributeError, KeyError,
    # TypeError, plain ValueError, silent [] and a str point came through
    vault, _ = web
    m = str(tmp_path / "m")
    with Vault(vault, writer=True) as v:
        before = job_states(v)
        naive = datetime.datetime(2020, 1, 1)
        for call, message in [
            (lambda: v.jobs(since="yesterday"), "since must be a tz-aware datetime"),
            (lambda: v.jobs(since=naive), "has no time zone"),
            (lambda: v.jobs(limit=-1), "limit must be an int"),
            (lambda: v.jobs(state="exploded"), "state must be one of"),
            (lambda: v.job(True), "a job id must be an int"),
            (lambda: v.job(10**30), "a job id must be an int"),
            (lambda: v.point("web", 10**30), "a point id must be an int"),
            (lambda: v.point("web", "1"), "a point id must be an int"),
            (lambda: v.replicate(None), "names must be"),
            (lambda: v.replicate(5), "names must be"),
            (lambda: v.replicate([]), "names must be"),
            (lambda: v.replicate("web", threads=0), "threads must be an int"),
            (lambda: v.materialize("web", 10**30, m), "no point id is that large"),
            (lambda: v.materialize("web", 1, m, method="zfs"), "method must be one of"),
            (lambda: v.test_failover("web", m, point=10**30), "no point id is that large"),
            (lambda: v.test_failover("web", m, method="zfs"), "method must be one of"),
            (lambda: v.failover("web", method="zfs"), "method must be one of"),
            (lambda: v.failover("web", point="oldest"), "a point must be"),
            (lambda: v.verify("web", sample=0), "sample must be a percentage"),
            (lambda: v.verify("web", sample=500), "sample must be a percentage"),
            (lambda: v.apply_retention("web", now=float("nan")), "now must be epoch seconds"),
            (lambda: v.jobs(since=float("inf")), "is not a time"),
        ]:
            with pytest.raises(InvalidArgument, match=message):
                call()
        assert job_states(v) == before and not os.path.exists(m)
        assert v.status("web").state == "protected"
        # a point's digits and a selector resolve as test_failover resolves them
        assert v.materialize("web", "1", m).to_dict()["point"] == 1
        assert v.materialize("web", "latest-processed", str(tmp_path / "m2")).point == 1
        assert [j.kind for j in v.jobs(state=["succeeded"], limit=1)] == ["materialize"]
    with pytest.raises(VaultError, match="closed") as caught:
        v.status("web")
    assert not isinstance(caught.value, sqlite3.Error)
    with pytest.raises(VaultError, match="closed"):
        v.replicate("web")
    v.close()  # closing twice is no error


def test_the_store_methods_a_tool_needs_are_the_vaults_own(web, tmp_path):
    # review2 U3: __getattr__ sent everything to the store (typed Any), and a
    # typo was "'Store' object has no attribute"
    vault, pairs = web
    for name in ("items", "item", "disks", "plans", "plan", "vault_id", "integrity_check"):
        # a method of the Vault's own classes (not reached through the store)
        assert any(name in vars(k) for k in Vault.__mro__[:-1]), name
        assert getattr(Vault, name).__doc__, name
    with Vault(vault) as v:
        assert [(d.idx, d.source, d.replica) for d in v.disks("web")] == [
            (i, s, r) for i, (s, r) in enumerate(pairs)]
        assert v.plans() == []
        assert v.integrity_check() == []
        assert len(v.vault_id()) == 32
        with pytest.raises(AttributeError, match="'Vault' object has no attribute 'replicat'"):
            v.replicat("web")
    # hidden from type checkers: a typo is mypy's error, not Any
    wrong = tmp_path / "wrong.py"
    wrong.write_text("import pydr\n"
                     "v = pydr.Vault('/srv/vault')\n"
                     "v.replicat('web')\n"
                     "disks = v.disks('web')\n"
                     "reveal_type(disks)\n")
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir",
                        str(tmp_path / "cache"), wrong.name], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert 'wrong.py:3: error: "Vault" has no attribute "replicat"' in r.stdout, r.stdout
    assert "DiskRecord" in [line for line in r.stdout.splitlines()
                            if line.startswith("wrong.py:5:")][0], r.stdout


def test_lock_timeout_without_writer_is_refused(web):
    # review2 U16: a reader takes no lock; lock_timeout was ignored silently
    vault, _ = web
    with pytest.raises(InvalidArgument, match="lock_timeout=5 is for a writer"):
        Vault(vault, lock_timeout=5)
    with Vault(vault, writer=True, lock_timeout=5) as v:
        assert v.writer

"""Errors a program can act on (issue 21): each bad call a new user made
("What was found") is refused at the door by a PydrError subclass whose
message names what was expected; messages state facts and the advice is
in ``.hint``, which the CLI prints on its own line; ``.item`` names the
item; the thread rule (WrongThread); a second writer in this process told
so; ``Vault(lock_timeout=)`` waiting for a holder in another process."""

import inspect
import os
import pickle
import subprocess
import sys
import threading

import pytest

from pydr.dr import plans, store_lock
from pydr.dr.cycle import replicate
from pydr.dr.points import select_point
from pydr.dr.results import OperationResult, PlanReport
from pydr.dr.vault import Vault, init_vault
from pydr.errors import (EXIT_USAGE, InvalidArgument, InvalidState, PydrError, UnknownName,
                         VaultError, WrongThread, exit_code_for)

from conftest import run_cli

SIZE = 128 << 10


@pytest.fixture
def vault(tmp_path):
    """db and web in group shop, solo on its own; one point each."""
    directory = tmp_path / "v"
    init_vault(directory)
    (tmp_path / "dr").mkdir()
    with Vault(directory, writer=True) as v:
        for n, name in enumerate(("db", "web", "solo")):
            src = tmp_path / f"{name}.img"
            src.write_bytes(bytes([n + 1]) * SIZE)
            v.protect(name, [(str(src), str(tmp_path / "dr" / f"{name}.img"))],
                      group=None if name == "solo" else "shop")
        replicate(v.store, ["db", "web", "solo"])
    return directory


# -- the exception classes -------------------------------------------------------------


def test_item_and_hint_are_apart_from_the_message():
    exc = InvalidState("item 'web' is failed over", path="/v", item="web",
                       hint="run 'pydr commit web'")
    assert str(exc) == "/v: item 'web' is failed over"  # the hint is never in the message
    assert (exc.item, exc.hint, exc.path) == ("web", "run 'pydr commit web'", "/v")
    back = pickle.loads(pickle.dumps(exc))  # as a fleet's worker sends it back
    assert (type(back), str(back), back.item, back.hint) == (InvalidState, str(exc), "web",
                                                             exc.hint)
    plain = PydrError("x")
    assert plain.item is None and plain.hint is None


def test_new_classes_are_the_builtins_a_caller_expects():
    assert issubclass(InvalidArgument, ValueError) and issubclass(InvalidArgument, PydrError)
    assert InvalidArgument.exit_code == EXIT_USAGE == exit_code_for(InvalidArgument("x")) == 2
    assert issubclass(WrongThread, RuntimeError) and issubclass(WrongThread, PydrError)
    assert WrongThread.exit_code == 1  # only a bug of pydr's own meets it at the CLI


# -- plans ------------------------------------------------------------------------------


def test_create_plan_takes_lists_of_item_names(vault):
    with Vault(vault, writer=True) as v:
        stored = v.create_plan("p", [["db"], ["web", "solo"]])
        assert stored == [{"items": ["db"], "pre": None, "post": None},
                          {"items": ["web", "solo"], "pre": None, "post": None}]
        assert v.plan("p").definition == stored
        mixed = v.create_plan("q", [("db",), {"items": ["web"], "post": "true"}])
        assert mixed[1] == {"items": ["web"], "pre": None, "post": "true"}


@pytest.mark.parametrize("groups, says", [
    ("db", "a plan's groups must be a list of groups, each a list of item names, or a dict "
           '{"items": [names], "pre": CMD or None, "post": CMD or None}; not one of type str'),
    ({"items": ["db"], "pre": "SECRET"}, "a plan's groups must be a list of groups"),
    ([], "a plan needs at least one group"),
    ([["db"], 5], "group 2 (groups[1]) is of type int: expected a list of item names, or a "
                  "dict"),
    ([["db"], "web"], "group 2 (groups[1]) is of type str: expected a list of item names"),
    ([{"item": ["db"]}], "group 1 (groups[0]) has keys 'item': expected a list of item names"),
    ([["db"], []], "group 2 (groups[1]) has items []: expected a non-empty list of item names"),
    ([{"items": "db"}], "group 1 (groups[0]) has items 'db': expected a non-empty list"),
    ([["db", 7]], "group 1 (groups[0]) has items ['db', 7]: expected a non-empty list"),
    ([{"items": ["db"], "pre": 3}], "its 'pre' hook must be a shell command (a non-empty str) "
                                    "or None, not one of type int"),
    ([{"items": ["db"], "post": " "}], "its 'post' hook must be a shell command (a non-empty "
                                       "str) or None, not a blank str"),
    ([["db"], ["web", "db"]], "item 'db' is in two groups of the plan: group 1 and group 2"),
])
def test_create_plan_refuses_other_shapes_naming_the_group(vault, groups, says):
    with Vault(vault, writer=True) as v:
        with pytest.raises(InvalidArgument) as err:
            v.create_plan("p", groups)
        assert says in str(err.value)
        assert "SECRET" not in str(err.value)  # a hook's command line is never shown
        with pytest.raises(UnknownName):
            v.plan("p")  # nothing was recorded


def test_create_plan_names_every_unknown_item(vault):
    with Vault(vault, writer=True) as v:
        with pytest.raises(UnknownName, match=r"items that are not protected: 'nope', 'gone'"):
            v.create_plan("p", [["db", "nope"], ["gone"]])
        with pytest.raises(InvalidArgument, match="a plan's name must be"):
            v.create_plan("a/b", [["db"]])


def test_run_plan_refuses_an_unknown_operation_listing_the_valid_ones(vault):
    with Vault(vault, writer=True) as v:
        v.create_plan("p", [["db"]])
        jobs = len(v.jobs())
        with pytest.raises(InvalidArgument) as err:
            v.run_plan("p", "test_failover", directory=str(vault.parent / "drill"))
        assert "unknown plan operation 'test_failover': expected one of 'failover', " \
               "'test-failover', 'cleanup-test-failover', 'commit', 'reprotect', 'failback'" \
               in str(err.value)
        assert err.value.hint == "did you mean 'test-failover'?"
        assert len(v.jobs()) == jobs  # nothing ran


@pytest.mark.parametrize("options, says", [
    ({}, "plan operation 'test-failover' needs the option 'directory'"),
    ({"to": None}, "plan operation 'test-failover' needs the option 'directory'"),
    ({"directory": 42}, "test-failover's option 'directory' must be a path"),
    ({"directory": "/a", "to": "/b"}, "test-failover was given both directory='/a' and to='/b'"),
    ({"dirctory": "/a"}, "unknown option 'dirctory' for plan operation 'test-failover': "
                         "expected 'directory', 'to', 'point'"),
    ({"directory": "/a", "planned": True}, "plan operation 'test-failover' takes no option "
                                           "'planned'"),
    ({"directory": "/a", "point": "newest"}, "a point must be a point id"),
])
def test_run_plan_checks_its_options_at_the_door(vault, options, says):
    """pydr.dr.plans.run_plan checks every option; Vault.run_plan takes the
    ones its signature names (``directory``, not the old ``to``) and hands
    them to it, so it gives the same errors; any other keyword is Python's
    TypeError there."""
    vault_keywords = set(inspect.signature(Vault.run_plan).parameters)
    with Vault(vault, writer=True) as v:
        v.create_plan("p", [["db"]])
        calls = [lambda: plans.run_plan(v.store, "p", "test-failover", **options)]
        if set(options) <= vault_keywords:
            calls.append(lambda: v.run_plan("p", "test-failover", **options))
        else:
            assert set(options) - vault_keywords <= {"to", "dirctory"}
            with pytest.raises(TypeError, match="unexpected keyword argument"):
                v.run_plan("p", "test-failover", **options)
        for call in calls:
            with pytest.raises(InvalidArgument) as err:
                call()
            assert says in str(err.value)
            assert not isinstance(err.value, KeyError)
            assert v.item("db").test_dir is None  # nothing ran


def test_run_plan_test_failover_takes_directory_or_to(vault):
    """Vault.run_plan takes ``directory`` (the name Vault.test_failover
    uses); the internal pydr.dr.plans.run_plan also takes the old ``to``."""
    drill = vault.parent / "drill"
    with Vault(vault, writer=True) as v:
        v.create_plan("p", [["db"], ["solo"]])
        report = v.run_plan("p", "test-failover", directory=drill)
        assert isinstance(report, PlanReport) and report.ok and report.error is None
        assert sorted(report.outcomes) == ["db", "solo"]
        assert all(isinstance(o, OperationResult) and o.operation == "test-failover"
                   for o in report.outcomes.values())
        assert report.outcomes["db"].paths == (str(drill / "db" / "db.img"),)
        assert (drill / "db" / "db.img").read_bytes() == bytes([1]) * SIZE
        assert (drill / "solo" / "solo.img").read_bytes() == bytes([3]) * SIZE
        v.run_plan("p", "cleanup-test-failover")
        assert not (drill / "db").exists()
        with pytest.raises(TypeError, match="unexpected keyword argument 'to'"):
            v.run_plan("p", "test-failover", to=str(drill))  # the old name, not on the Vault
        assert v.item("db").test_dir is None and not (drill / "db").exists()
        plans.run_plan(v.store, "p", "test-failover", to=str(drill),
                       point="latest-processed")  # the old name, kept by the plans module
        assert (drill / "db" / "db.img").read_bytes() == bytes([1]) * SIZE
        assert (drill / "solo" / "solo.img").read_bytes() == bytes([3]) * SIZE
        with pytest.raises(InvalidArgument, match="plan operation 'commit' takes no option "
                                                  "'point'"):
            v.run_plan("p", "commit", point=1)


# -- point selectors -------------------------------------------------------------------


@pytest.mark.parametrize("point", ["newest", "1.5", "", "-1", "0", 0, -2, 1.0, True, [1]])
def test_a_bad_point_selector_lists_the_forms_accepted(vault, point):
    with Vault(vault) as v:
        with pytest.raises(InvalidArgument) as err:
            select_point(v.store, "db", point)
    assert ("a point must be a point id (a positive int, or its digits as a str) or one of "
            "'latest', 'latest-processed', 'latest-app-consistent', not " + repr(point)) \
        == err.value.message


def test_good_point_selectors_pick_points(vault):
    with Vault(vault) as v:
        (point,) = [p.id for p in v.points("db")]
        assert select_point(v.store, "db", str(point)) == select_point(v.store, "db", point) \
            == point
        assert select_point(v.store, "db", "latest-processed") == point
        with pytest.raises(UnknownName):
            select_point(v.store, "db", point + 10)


def test_a_bad_selector_at_the_cli_is_a_usage_error(vault):
    r = run_cli("test-failover", "db", "--to", vault.parent / "drill", "--point", "newest",
                "--vault", vault)
    assert r.returncode == 2, r.stderr
    assert b"a point must be a point id" in r.stderr and b"'latest-processed'" in r.stderr


# -- names: items and groups -----------------------------------------------------------


def test_replicate_takes_a_groups_name(vault):
    with open(vault.parent / "db.img", "r+b") as f:
        f.write(b"\xee" * 4096)
    with Vault(vault, writer=True) as v:
        before = {n: len(v.points(n)) for n in ("db", "web", "solo")}
        result = v.replicate("shop")
        assert sorted(result.items) == ["db", "web"]
        after = {n: len(v.points(n)) for n in ("db", "web", "solo")}
        assert after == {"db": before["db"] + 1, "web": before["web"] + 1, "solo": before["solo"]}
        replica = (vault.parent / "dr" / "db.img").read_bytes()
        assert replica == (vault.parent / "db.img").read_bytes()
        with pytest.raises(UnknownName, match="no protected item or replication group named "
                                              "'nope'") as err:
            replicate(v.store, ["solo", "nope"])
        assert err.value.item == "nope"
        with pytest.raises(InvalidArgument, match="an item's or a group's name, or a list"):
            replicate(v.store, [3])


def test_a_name_is_never_both_an_items_and_a_groups(vault):
    tmp = vault.parent
    (tmp / "x.img").write_bytes(b"\0" * SIZE)
    with Vault(vault, writer=True) as v:
        with pytest.raises(InvalidState, match="'shop' is the name of a replication group"):
            v.protect("shop", [(str(tmp / "x.img"), str(tmp / "dr" / "x.img"))])
        with pytest.raises(InvalidState, match="'solo' is the name of a protected item"):
            v.protect("x", [(str(tmp / "x.img"), str(tmp / "dr" / "x.img"))], group="solo")
        with pytest.raises(InvalidState, match="'x' is the name of a replication group"):
            v.protect("x", [(str(tmp / "x.img"), str(tmp / "dr" / "x.img"))], group="x")
        assert not v.has_item("shop") and not v.has_item("x")


# -- paths -----------------------------------------------------------------------------


def test_a_directory_that_is_not_a_path_is_refused_at_the_door(vault, tmp_path):
    for bad in (123, None, b"/tmp/v", ["/tmp/v"], ""):
        with pytest.raises(InvalidArgument, match="the vault's directory must be a path"):
            Vault(bad)
        with pytest.raises(InvalidArgument, match="the vault's directory must be a path"):
            init_vault(bad)
    with Vault(vault, writer=True) as v:
        with pytest.raises(InvalidArgument, match="test_failover's directory must be a path "
                                                  r"\(a non-empty str or os.PathLike\), not 42"):
            v.test_failover("db", 42)
        with pytest.raises(InvalidArgument, match="materialize's directory must be a path"):
            v.materialize("db", v.points("db")[0].id, object())
        assert v.item("db").test_dir is None


# -- facts in the message, advice in the hint --------------------------------------------


def test_advice_moved_to_the_hint_and_the_cli_prints_it(vault, tmp_path):
    with pytest.raises(VaultError) as err:
        Vault(tmp_path / "nowhere")
    assert err.value.message == "not a pydr vault (no vault.db)"
    assert err.value.hint == f"create one with 'pydr vault init {tmp_path / 'nowhere'}'"
    r = run_cli("status", "db", "--vault", tmp_path / "nowhere")
    assert r.returncode == 14
    assert r.stderr.decode().splitlines() == [
        f"pydr: {tmp_path / 'nowhere'}: not a pydr vault (no vault.db)",
        f"hint: create one with 'pydr vault init {tmp_path / 'nowhere'}'"]

    with Vault(vault, writer=True) as v:
        v.test_failover("db", tmp_path / "drill")
        with pytest.raises(InvalidState) as err:
            v.test_failover("db", tmp_path / "elsewhere")
    assert err.value.item == "db" and "pydr" not in err.value.message
    assert err.value.message == f"a test failover of 'db' is already in {tmp_path / 'drill'}"
    assert err.value.hint == "run 'pydr cleanup-test-failover db' first"
    r = run_cli("test-failover", "db", "--to", tmp_path / "elsewhere", "--vault", vault)
    assert r.returncode == 15
    assert r.stderr.decode().splitlines() == [
        f"pydr: {vault}: a test failover of 'db' is already in {tmp_path / 'drill'}",
        "hint: run 'pydr cleanup-test-failover db' first"]


def test_an_error_without_advice_prints_no_hint_line(vault):
    r = run_cli("status", "nope", "--vault", vault)
    assert r.returncode == 3
    assert r.stderr.decode().splitlines() == [f"pydr: {vault}: no protected item named 'nope'"]


# -- the thread rule -------------------------------------------------------------------


def test_a_vault_used_from_another_thread_raises_wrong_thread(vault):
    caught = []

    def use(v):
        try:
            v.status("db")
        except BaseException as exc:  # handed to the test's thread
            caught.append(exc)

    with Vault(vault) as v:
        t = threading.Thread(target=use, args=(v,), name="orchestrator-worker")
        t.start()
        t.join()
        (exc,) = caught
        assert isinstance(exc, WrongThread) and isinstance(exc, RuntimeError)
        assert exc.path == str(vault)
        here = threading.current_thread()
        assert (f"the vault was opened in thread {here.name!r} (id {here.ident}) and used in "
                f"thread 'orchestrator-worker' (id {t.ident})") == exc.message
        assert exc.hint == "open a Vault of its own in each thread (readers never wait)"
        assert v.item("db").name == "db"  # its own thread still uses it


def test_one_vault_per_thread_works(vault):
    seen = {}

    def read(name):
        with Vault(vault) as v:  # opened in this thread
            seen[name] = len(v.points(name))

    threads = [threading.Thread(target=read, args=(n,)) for n in ("db", "web", "solo")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"db": 1, "web": 1, "solo": 1}


# -- the lock ----------------------------------------------------------------------------


def test_a_second_writer_in_this_process_is_told_so(vault):
    with Vault(vault, writer=True):
        with pytest.raises(VaultError) as err:
            Vault(vault, writer=True)
        assert err.value.message == ("this process already has the vault open as a writer "
                                     f"(another Vault object, pid {os.getpid()})")
        assert "another pydr process" not in str(err.value)
        with Vault(vault) as reader:  # readers never wait
            assert reader.has_item("db")
    with Vault(vault, writer=True) as again:  # released when the first closed
        assert again.lock_fd is not None


@pytest.mark.parametrize("timeout", [-1, "5", True, float("inf"), float("nan")])
def test_a_bad_lock_timeout_is_refused(vault, timeout):
    with pytest.raises(InvalidArgument, match="lock_timeout must be None or a number of "
                                              "seconds >= 0"):
        Vault(vault, writer=True, lock_timeout=timeout)


HOLDER = """
import sys
from pydr.dr.vault import Vault
v = Vault(sys.argv[1], writer=True)
print("holding", flush=True)
sys.stdin.readline()
v.close()
print("released", flush=True)
sys.stdin.readline()
"""


def test_lock_timeout_waits_for_a_holder_in_another_process(vault, monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(vault)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=vault.parent)
    try:
        assert child.stdout.readline() == "holding\n"
        with pytest.raises(VaultError) as err:
            Vault(vault, writer=True, lock_timeout=0.2)
        assert err.value.message.startswith(
            f"the vault is locked by another pydr process (pid {child.pid}: ")
        assert err.value.message.endswith("; waited 0.2 s")
        assert err.value.hint == "wait for it to end, then run the command again"
        with pytest.raises(VaultError, match=f"pid {child.pid}"):
            Vault(vault, writer=True)  # no timeout: refused at once

        # a waiting open: its first attempt finds the lock held; the child is
        # told to release it at the first pause, and the next attempt takes it
        pauses = []

        def pause(seconds):
            pauses.append(seconds)
            if len(pauses) == 1:
                child.stdin.write("release\n")
                child.stdin.flush()
                assert child.stdout.readline() == "released\n"

        monkeypatch.setattr(store_lock, "_pause", pause)
        with Vault(vault, writer=True, lock_timeout=60) as v:
            assert v.lock_fd is not None and v.has_item("db")
        assert len(pauses) == 1 and 0 < pauses[0] <= 0.1
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    assert child.returncode == 0


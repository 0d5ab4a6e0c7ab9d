"""Hooks have a timeout (PYDR_HOOK_TIMEOUT, default 300 s): a hook that never
returns is killed with its process group, the cycle fails (HookFailed) and
says why, and a quiesce hook that timed out is still thawed. The hooks here
block on a FIFO nobody writes: no sleeps, no timing asserted."""

import json
import os
import select

import pytest

from pydr.dr.hooks import HookTimedOut, hook_timeout, run_hook
from pydr.dr.vault import init_vault
from pydr.errors import EXIT_HOOK, HookFailed, InvalidArgument

from conftest import run_cli


def _gone(pid):
    """The process ends (its pidfd turns readable: an event, no timing
    judged; the 30 s only stop a broken test), or has ended already."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], 30)[0])
    finally:
        os.close(fd)


def _blocking_hook(tmp_path, name):
    """A hook that starts a child and both block on a FIFO forever; their pids in files."""
    fifo = tmp_path / f"{name}.fifo"
    os.mkfifo(fifo)
    return (f"echo $$ > {tmp_path / (name + '.pid')}; cat {fifo} > /dev/null & "
            f"echo $! > {tmp_path / (name + '.child')}; cat {fifo} > /dev/null")


def _pids(tmp_path, name):
    return [int((tmp_path / f"{name}.{k}").read_text()) for k in ("pid", "child")]


def test_a_hook_that_never_returns_is_killed_with_its_child(tmp_path, monkeypatch):
    monkeypatch.setenv("PYDR_HOOK_TIMEOUT", "1")
    with pytest.raises(HookTimedOut, match=r"quiesce hook of 'x' did not finish within 1 s"):
        run_hook(_blocking_hook(tmp_path, "q"), "quiesce hook of 'x'")
    assert all(_gone(p) for p in _pids(tmp_path, "q"))


@pytest.mark.parametrize("text", ["abc", "0", "-5", "nan", "inf"])
def test_a_bad_timeout_names_the_variable(monkeypatch, text):
    monkeypatch.setenv("PYDR_HOOK_TIMEOUT", text)
    with pytest.raises(InvalidArgument, match="PYDR_HOOK_TIMEOUT"):
        hook_timeout()


def test_the_default_timeout(monkeypatch):
    monkeypatch.delenv("PYDR_HOOK_TIMEOUT", raising=False)
    assert hook_timeout() == 300
    with pytest.raises(HookFailed, match=r"shutdown hook failed \(exit 3\): oops"):
        run_hook("echo oops >&2; exit 3", "shutdown hook")


@pytest.fixture
def item(tmp_path, monkeypatch):
    d = tmp_path / "vault"
    init_vault(d)
    monkeypatch.setenv("PYDR_VAULT", str(d))
    (tmp_path / "s.img").write_bytes(os.urandom(1 << 20))
    log = tmp_path / "hooks.log"
    r = cli("protect", "h", "--disk", f"{tmp_path / 's.img'}={tmp_path / 'r.img'}",
            "--quiesce-hook", _blocking_hook(tmp_path, "q"), "--thaw-hook", f"echo thaw >> {log}")
    assert r.returncode == 0, r.stderr
    return log


def cli(*args, **env):
    return run_cli(*args, env=dict(os.environ, **env))


def test_a_cycle_whose_quiesce_hook_hangs_fails_and_is_thawed(tmp_path, item):
    r = cli("replicate", "h", "--app-consistent", PYDR_HOOK_TIMEOUT="1")
    assert r.returncode == EXIT_HOOK, r.stderr
    assert b"quiesce hook of 'h' did not finish within 1 s" in r.stderr
    assert all(_gone(p) for p in _pids(tmp_path, "q"))
    assert item.read_text().split() == ["thaw"]  # it may have frozen before it hung
    st = json.loads(cli("status", "h", "--json").stdout)
    st = st[0] if isinstance(st, list) else st
    assert st["health"] == "critical" and "did not finish within 1 s" in st["last_error"]
    assert json.loads(cli("points", "h", "--json").stdout) == []


def test_a_bad_timeout_stops_the_cycle_before_it_runs(tmp_path, item):
    r = cli("replicate", "h", "--app-consistent", PYDR_HOOK_TIMEOUT="soon")
    assert r.returncode == 2 and b"PYDR_HOOK_TIMEOUT" in r.stderr
    assert not (tmp_path / "q.pid").exists()  # no hook ran


def test_a_plan_whose_pre_hook_hangs_stops_and_says_why(tmp_path, item):
    hook = _blocking_hook(tmp_path, "pre")
    assert cli("plan", "create", "p", "--group", "h", "--pre-hook", hook).returncode == 0
    r = cli("plan", "test-failover", "p", "--to", str(tmp_path / "drill"), "--json",
            PYDR_HOOK_TIMEOUT="1")
    assert r.returncode != 0
    assert b"the pre hook of group 1 did not finish within 1 s" in r.stdout + r.stderr
    assert all(_gone(p) for p in _pids(tmp_path, "pre"))
    assert not (tmp_path / "drill").exists() or not os.listdir(tmp_path / "drill")


def test_a_failing_thaw_after_a_hung_quiesce_does_not_hide_why(tmp_path, monkeypatch):
    """The cut thaws a quiesce hook that timed out; if that thaw fails too
    (nothing was frozen), the error reported is still the timeout."""
    from pydr.dr.agent import cut
    monkeypatch.setenv("PYDR_HOOK_TIMEOUT", "1")
    log = tmp_path / "thaw.log"
    hooks = [("x", _blocking_hook(tmp_path, "q"), f"echo thaw >> {log}; exit 1")]
    with pytest.raises(HookTimedOut, match="quiesce hook of 'x' did not finish"):
        with cut([], hooks=hooks):
            pass
    assert log.read_text().split() == ["thaw"]


def test_a_hook_never_sees_a_passphrase(tmp_path, monkeypatch):
    for name in ("PYDR_PASSPHRASE", "PYDR_PASSPHRASE_FILE", "PYDR_NEW_PASSPHRASE",
                 "PYDR_RECOVERY_PASSPHRASE_FILE"):
        monkeypatch.setenv(name, "secret " + name)
    monkeypatch.setenv("PYDR_HOOK_TIMEOUT", "60")
    dump = tmp_path / "env"
    run_hook(f"env > {dump}", "quiesce hook of 'vm'")
    seen = dump.read_text()
    assert "secret" not in seen and "PASSPHRASE" not in seen
    assert "PYDR_HOOK_TIMEOUT=60" in seen  # the rest of the environment is kept

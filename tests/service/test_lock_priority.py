"""The vault lock's waiter priority (pydr.dr.store_lock): a writer that
waits for the lock goes before pydr run's next round, and the CLI waits
for the lock by default only while pydr run serves the vault."""

import fcntl
import os
import subprocess
import sys
import threading
import time

import pytest

from pydr.dr import store_lock
from pydr.dr.store import Store
from pydr.dr.vault import Vault, init_vault
from pydr.errors import VaultError

MiB = 1 << 20


def pydr(*args, env=None, wait=True):
    """The installed pydr (beside this interpreter), run in /tmp."""
    exe = os.path.join(os.path.dirname(sys.executable), "pydr")
    cmd = [exe] + [str(a) for a in args]
    full_env = {k: v for k, v in os.environ.items() if k != "PYDR_LOCK_WAIT"}
    full_env.update(env or {})
    if not wait:
        return subprocess.Popen(cmd, env=full_env, cwd="/tmp", stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=full_env, cwd="/tmp", capture_output=True, text=True,
                          timeout=300)


def until_a_writer_waits(directory, proc):
    """Return once a writer holds the shared flock on vault.lock.wait (it is
    waiting for vault.lock). A state reached, not a time: the bound only
    ends a test that failed."""
    fd = os.open(os.path.join(directory, store_lock.WAIT_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            fcntl.flock(fd, fcntl.LOCK_UN)
            time.sleep(0.01)
        raise AssertionError("the writer never waited for the lock")
    finally:
        os.close(fd)


@pytest.fixture
def vault(tmp_path):
    init_vault(tmp_path / "v")
    for name in "ab":
        (tmp_path / f"{name}.img").write_bytes(os.urandom(MiB))
    return tmp_path / "v"


def protect_args(tmp_path, vault, name):
    return ["protect", name, "--vault", vault, "--disk",
            f"{tmp_path / (name + '.img')}={tmp_path / ('r' + name + '.img')}"]


def test_a_waiting_writer_goes_before_the_service(tmp_path, vault):
    holder = Store(vault, writer=True)
    op = pydr(*protect_args(tmp_path, vault, "a"), env={"PYDR_LOCK_WAIT": "120"}, wait=False)
    try:
        until_a_writer_waits(str(vault), op)
        seen = {}

        def service_round():
            def open_writer():
                v = Vault(vault, writer=True)
                seen["a protected"] = v.store.has_item("a")
                return v
            store_lock.take_after_waiters(str(vault), open_writer, pause=0.001).close()

        t = threading.Thread(target=service_round)
        t.start()  # it tries at once, many times: the waiting writer still goes first
        holder.close()
        out, err = op.communicate(timeout=120)
        t.join(120)
    finally:
        holder.close()
        if op.poll() is None:
            op.kill()
    assert op.returncode == 0, err
    assert seen["a protected"] is True  # the service got the lock after the operator


def test_take_after_waiters_ends_when_cancelled(vault):
    cancel = threading.Event()
    cancel.set()
    with Store(vault, writer=True):
        assert store_lock.take_after_waiters(
            str(vault), lambda: Vault(vault, writer=True), cancel=cancel) is None


def test_other_vault_errors_are_not_waited_out(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VaultError, match="not a pydr vault"):
        store_lock.take_after_waiters(str(tmp_path / "empty"),
                                      lambda: Vault(tmp_path / "empty", writer=True))


def test_the_cli_refuses_at_once_when_no_service_runs(tmp_path, vault):
    with Store(vault, writer=True):
        r = pydr(*protect_args(tmp_path, vault, "a"))
    assert r.returncode == 14, r.stderr
    assert "locked by another pydr process" in r.stderr and "waited" not in r.stderr


def test_the_cli_waits_while_pydr_run_serves_the_vault(tmp_path, vault):
    """run.lock held (as pydr run holds it): a writer command waits for
    vault.lock by default, unless --lock-wait 0 says not to."""
    run_lock = os.open(os.path.join(vault, store_lock.RUN_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(run_lock, fcntl.LOCK_EX)
    holder = Store(vault, writer=True)
    try:
        assert store_lock.service_running(str(vault))
        r = pydr(*protect_args(tmp_path, vault, "b"), "--lock-wait", "0")
        assert r.returncode == 14, r.stderr
        op = pydr(*protect_args(tmp_path, vault, "a"), wait=False)
        until_a_writer_waits(str(vault), op)
        holder.close()
        out, err = op.communicate(timeout=120)
        assert op.returncode == 0, err
    finally:
        holder.close()
        os.close(run_lock)
    assert not store_lock.service_running(str(vault))
    with Vault(vault) as v:
        assert v.items() == ["a"]


def test_a_lock_wait_that_is_not_a_duration_is_a_usage_error(tmp_path, vault):
    r = pydr(*protect_args(tmp_path, vault, "a"), env={"PYDR_LOCK_WAIT": "soon"})
    assert r.returncode == 2 and "PYDR_LOCK_WAIT" in r.stderr, r.stderr
    r = pydr(*protect_args(tmp_path, vault, "a"), "--lock-wait", "-1")
    assert r.returncode == 2 and "--lock-wait" in r.stderr, r.stderr
    with Vault(vault) as v:
        assert v.items() == []


def test_a_writer_gives_up_after_lock_wait_naming_the_holder(tmp_path, vault):
    with Store(vault, writer=True):
        r = pydr(*protect_args(tmp_path, vault, "a"), "--lock-wait", "0.2")
    assert r.returncode == 14
    assert f"pid {os.getpid()}" in r.stderr and "waited 0.2 s" in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_run_lock_that_is_no_regular_file_is_refused_naming_it(tmp_path, vault, kind):
    """A FIFO at run.lock used to make every writer command hang in open();
    a symlink was followed. Now the command is refused at once (exit 14),
    the message naming run.lock. (The subprocess's timeout only ends a test
    that failed.)"""
    path = os.path.join(vault, store_lock.RUN_LOCK)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        (tmp_path / "elsewhere").write_text("")
        os.symlink(tmp_path / "elsewhere", path)
    else:
        os.mkdir(path)
    r = pydr(*protect_args(tmp_path, vault, "a"))  # before the fix: hung in open()
    assert r.returncode == 14, r.stderr
    assert path in r.stderr and "Invalid argument" not in r.stderr
    with pytest.raises(VaultError, match="run.lock"):
        store_lock.service_running(str(vault))

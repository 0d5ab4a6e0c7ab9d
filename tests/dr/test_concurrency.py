"""Two commands on one vault at once. The first is stopped at a crash point
(PYDR_STOP_AT: SIGSTOP there; waitpid(WUNTRACED) says when, so no timing is
involved) while it holds the vault; the second is served (readers) or
refused with exit 14 naming the holder; then the first goes on, and its
result stands."""

import json
import os
import signal
import sqlite3
import subprocess

import pytest

from pydr.dr.vault import Vault

from conftest import pydr_command, run_cli, sha
from disks import scribble
from test_crash_matrix import machine, sources


@pytest.fixture
def ctx(tmp_path):
    ctx = machine(tmp_path)
    for s in sources(ctx)[0]:
        scribble(s, 3, blocks=12)
    return ctx


def stopped_at(point, *args):
    """Start `pydr ARGS` and return it once it has stopped at `point`."""
    p = subprocess.Popen(pydr_command() + [str(a) for a in args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "PYDR_STOP_AT": point})
    _, status = os.waitpid(p.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"it ended instead of stopping at {point}"
    return p


def go_on(p):
    os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    return p.returncode, err


def cli(ctx, *args):
    return run_cli(*args, "--vault", ctx["vault"])


def test_two_cycles_at_once_and_readers_during_one(ctx):
    first = stopped_at("cycle.disk", "replicate", "vm", "--vault", ctx["vault"])
    try:
        r = cli(ctx, "replicate", "vm")
        assert r.returncode == 14, r.stderr
        assert f"pid {first.pid}".encode() in r.stderr and b"replicate vm" in r.stderr
        # readers are served while the cycle runs
        st = json.loads(cli(ctx, "status", "vm", "--json").stdout)
        assert st["operation"] == {"name": "replicate", "command": "pydr replicate vm",
                                   "interrupted": False}
        assert len(json.loads(cli(ctx, "points", "vm", "--json").stdout)) == 3
        jobs = json.loads(cli(ctx, "jobs", "--json").stdout)
        assert jobs[0]["kind"] == "replicate" and jobs[0]["state"] == "running"  # newest first
    finally:
        code, err = go_on(first)
    assert code == 0, err
    src, rep = sources(ctx)
    assert [sha(x) for x in rep] == [sha(x) for x in src]
    db = sqlite3.connect(os.path.join(ctx["vault"], "vault.db"))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Vault(ctx["vault"]) as v:
        assert len(v.store.points("vm")) == 3 and v.store.jobs()[-1]["state"] == "succeeded"


def test_a_cycle_during_a_failover_is_refused_and_the_failover_stands(ctx):
    first = stopped_at("failover.baseline", "failover", "vm", "--point", "2",
                       "--vault", ctx["vault"])
    try:
        r = cli(ctx, "replicate", "vm")
        assert r.returncode == 14 and b"failover vm" in r.stderr, r.stderr
        st = json.loads(cli(ctx, "status", "vm", "--json").stdout)
        assert st["state"] == "failing-over" and st["operation"]["interrupted"] is False
    finally:
        code, err = go_on(first)
    assert code == 0, err
    assert [sha(x) for x in sources(ctx)[1]] == ctx["history"]["vm"][2]
    r = cli(ctx, "replicate", "vm")  # now the state says no
    assert r.returncode == 15 and b"failed-over" in r.stderr
    assert [sha(x) for x in sources(ctx)[1]] == ctx["history"]["vm"][2]


def test_status_names_an_interrupted_operation_and_its_command(ctx):
    r = subprocess.run(pydr_command() + ["failover", "vm", "--point", "2", "--vault",
                                         ctx["vault"]],
                       env={**os.environ, "PYDR_CRASH_AT": "failover.disk"}, capture_output=True)
    assert r.returncode == -signal.SIGKILL
    st = json.loads(cli(ctx, "status", "vm", "--json").stdout)
    assert st["operation"] == {"name": "failover", "command": "pydr failover vm --point 2",
                               "interrupted": True}
    text = cli(ctx, "status", "vm").stdout.decode()
    assert "interrupted failover: run 'pydr failover vm --point 2'" in text
    assert cli(ctx, *st["operation"]["command"].split()[1:]).returncode == 0
    assert json.loads(cli(ctx, "status", "vm", "--json").stdout)["operation"] is None

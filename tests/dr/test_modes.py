"""Permission bits follow the data: with umask 022 and a private (0600)
source, nothing pydr makes from it is readable by others -- the replica, the
first full copy of a resync (here and through serve), recovery points,
drills, failover disks and baselines, reflink clones, qcow2 overlays. The
vault is 0700 with 0600 files, a vault made wider is tightened by the next
writer, and a hook's command line (which may hold a password) is in no
message, status or job."""

import json
import os
import stat

import pytest

from conftest import LOCAL_RSH, PYDR, run_cli
from disks import change, mkfs
from test_s3 import s3, swift  # noqa: F401  (fixtures: an object store on 127.0.0.1)


@pytest.fixture(autouse=True)
def umask_022():
    old = os.umask(0o022)  # inherited by every pydr the tests run
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def cli(*args):
    return run_cli(*args, env=dict(os.environ))


def disk(path, bits, size=1 << 20):
    path.write_bytes(os.urandom(size))
    os.chmod(path, bits)
    return path


# source bits -> the bits of a copy (read and write only: never wider)
MODES = [(0o600, 0o600), (0o640, 0o640), (0o644, 0o644), (0o400, 0o400), (0o755, 0o644)]


@pytest.mark.parametrize("source_bits,copy_bits", MODES)
def test_a_new_resync_target_takes_the_source_bits(tmp_path, source_bits, copy_bits):
    src = disk(tmp_path / "src.img", source_bits)
    r = cli("resync", src, tmp_path / "copy.img")
    assert r.returncode == 0, r.stderr
    assert mode(tmp_path / "copy.img") == copy_bits
    os.chmod(tmp_path / "copy.img", 0o644)  # an existing target keeps its own bits
    with open(src, "r+b") as f:
        f.write(b"changed")
    assert cli("resync", src, tmp_path / "copy.img").returncode == 0
    assert mode(tmp_path / "copy.img") == 0o644


@pytest.mark.parametrize("direction", ["push", "pull"])
@pytest.mark.parametrize("source_bits,copy_bits", [(0o600, 0o600), (0o640, 0o640)])
def test_the_first_copy_through_serve_takes_the_source_bits(tmp_path, direction, source_bits,
                                                            copy_bits):
    src = disk(tmp_path / "src.img", source_bits)
    target = tmp_path / "copy.img"
    a, b = (src, f"127.0.0.1:{target}") if direction == "push" else (f"127.0.0.1:{src}", target)
    r = cli("resync", a, b, "--rsh", LOCAL_RSH, "--remote-pydr", PYDR)
    assert r.returncode == 0, r.stderr
    assert mode(target) == copy_bits


def vault_modes_are_private(vault):
    for dirpath, dirnames, filenames in os.walk(vault):
        assert mode(dirpath) == 0o700, dirpath
        for n in filenames:
            assert mode(os.path.join(dirpath, n)) == 0o600, os.path.join(dirpath, n)


@pytest.fixture
def item(tmp_path, monkeypatch):
    """An item 'vm' with a private ext4 disk replicated in two cycles."""
    vault = tmp_path / "vault"
    assert cli("vault", "init", vault).returncode == 0
    monkeypatch.setenv("PYDR_VAULT", str(vault))
    src = mkfs(tmp_path, "os", size="16M")
    os.chmod(src, 0o600)
    (tmp_path / "site-b").mkdir()
    replica = tmp_path / "site-b" / "os.img"
    assert cli("protect", "vm", "--disk", f"{src}={replica}").returncode == 0
    for cycle in range(2):
        if cycle:
            change(src, tmp_path, tag=cycle)
        r = cli("replicate", "vm")
        assert r.returncode == 0, r.stderr
    return tmp_path, vault, replica


def test_every_disk_made_from_a_private_source_is_private(item):
    tmp_path, vault, replica = item
    assert mode(replica) == 0o600
    vault_modes_are_private(vault)  # steps in undo/, signature caches in cache/
    for method in ([], ["--copy"], ["--as", "qcow2"]):
        out = tmp_path / f"points{len(method)}"
        r = cli("materialize", "vm", "--point", "1", "--to", out, *method)
        assert r.returncode == 0, r.stderr
        assert mode(out / "os.img") == 0o600, method
    for method in (["--copy"], ["--as", "qcow2"]):
        r = cli("test-failover", "vm", "--point", "1", "--to", tmp_path / "drill", *method)
        assert r.returncode == 0, r.stderr
        assert mode(tmp_path / "drill" / "os.img") == 0o600, method
        assert cli("cleanup-test-failover", "vm").returncode == 0
    r = cli("failover", "vm", "--point", "1", "--copy")
    assert r.returncode == 0, r.stderr
    assert mode(replica) == 0o600
    assert mode(tmp_path / "site-b" / ".os.img.pydr-base") == 0o600
    r = cli("change-point", "vm", "--point", "2", "--as", "qcow2")
    assert r.returncode == 0, r.stderr
    assert mode(replica) == 0o600
    vault_modes_are_private(vault)
    assert not [n for n in os.listdir(tmp_path / "site-b") if mode(tmp_path / "site-b" / n) & 0o077]


def test_reflink_clones_keep_the_source_bits(xfs_dir, tmp_path, monkeypatch):
    vault = tmp_path / "vault"
    assert cli("vault", "init", vault).returncode == 0
    monkeypatch.setenv("PYDR_VAULT", str(vault))
    src = disk(xfs_dir / "src.img", 0o600, 4 << 20)
    replica = xfs_dir / "replica.img"
    assert cli("protect", "vm", "--disk", f"{src}={replica}").returncode == 0
    assert cli("replicate", "vm").returncode == 0
    r = cli("test-failover", "vm", "--to", xfs_dir / "drill", "--reflink", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["method"] == "reflink"
    assert mode(xfs_dir / "drill" / "replica.img") == 0o600
    # the snapshot of the source a cycle reads (a reflink clone beside it)
    from pydr.endpoints.local import LocalEndpoint

    snap = LocalEndpoint(str(src)).snapshot()
    assert snap is not None and mode(snap.path) == 0o600
    os.unlink(snap.path)


def test_a_wider_vault_is_tightened_by_the_next_writer(item):
    tmp_path, vault, replica = item
    os.chmod(vault, 0o755)
    os.chmod(vault / "undo", 0o755)
    os.chmod(vault / "vault.db", 0o644)
    assert cli("status", "vm").returncode == 0  # a reader changes nothing
    assert (mode(vault), mode(vault / "vault.db")) == (0o755, 0o644)
    assert cli("replicate", "vm").returncode == 0
    vault_modes_are_private(vault)


SECRET = "pw=hunter2-do-not-show"


def test_a_hook_command_is_never_shown(tmp_path, monkeypatch):
    vault = tmp_path / "vault"
    assert cli("vault", "init", vault).returncode == 0
    monkeypatch.setenv("PYDR_VAULT", str(vault))
    src = disk(tmp_path / "src.img", 0o600)
    r = cli("protect", "vm", "--disk", f"{src}={tmp_path / 'replica.img'}",
            "--quiesce-hook", f"echo failing >&2; exit 3 # {SECRET}",
            "--thaw-hook", f"true # {SECRET}")
    assert r.returncode == 0, r.stderr
    # the lock file names the command holding it to a refused one: not its hooks
    assert b"--quiesce-hook" in (vault / "vault.lock").read_bytes()
    assert SECRET.encode() not in (vault / "vault.lock").read_bytes()
    r = cli("replicate", "vm", "--app-consistent")
    assert r.returncode == 16
    assert b"quiesce hook" in r.stderr and b"exit 3" in r.stderr and b"failing" in r.stderr
    assert SECRET.encode() not in r.stderr + r.stdout
    for args in (["status", "vm", "--json"], ["status", "vm"], ["jobs", "--json"], ["jobs"],
                 ["points", "vm", "--json"]):
        r = cli(*args)
        assert r.returncode == 0, (args, r.stderr)
        assert SECRET.encode() not in r.stdout + r.stderr, args
    assert SECRET.encode() not in (vault / "vault.lock").read_bytes()
    st = json.loads(cli("status", "vm", "--json").stdout)
    assert st["hooks"] == {"quiesce": True, "thaw": True}  # that they are set, not what
    # a plan's hooks: neither its definition nor its report shows them
    assert cli("replicate", "vm").returncode == 0
    r = cli("plan", "create", "p", "--group", "vm", "--pre-hook", f"exit 5 # {SECRET}", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["groups"][0]["pre"] == "<hook set>"
    assert SECRET.encode() not in r.stdout + r.stderr
    r = cli("plan", "failover", "p", "--point", "latest-processed", "--json")
    assert r.returncode == 17 and b"exit 5" in r.stderr, r.stderr
    report = json.loads(r.stdout)
    assert not report["ok"] and report["steps"][0]["not_run"] == ["vm"]
    assert report["steps"][0]["hooks"] == [{"hook": "pre", "ok": False, "exit_code": 5}]
    assert SECRET.encode() not in r.stdout + r.stderr
    for args in (["status", "vm", "--json"], ["jobs", "--json"]):
        assert SECRET.encode() not in cli(*args).stdout, args
    vault_modes_are_private(vault)


def test_disks_downloaded_from_an_object_store_are_private(s3):
    from test_s3 import cli as s3_cli, ok

    src = disk(s3["tmp"] / "os.img", 0o640, 2 << 20)
    ok(s3_cli(s3, "protect", "vm", "--disk", f"{src}={s3['url']}"))
    ok(s3_cli(s3, "replicate", "vm"))
    out = s3["tmp"] / "points"
    ok(s3_cli(s3, "materialize", "vm", "--point", "1", "--to", out))
    assert mode(out / "os.img") == 0o600  # the object store keeps no bits: private
    ok(s3_cli(s3, "failover", "vm", "--to", s3["tmp"] / "up"))
    assert mode(s3["tmp"] / "up" / "os.img") == 0o600
    vault_modes_are_private(s3["vault"])

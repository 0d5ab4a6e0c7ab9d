"""What other local users can do to a vault's disks, found by an adversarial
review: a directory they may change, a journal they planted, an option
abbreviated past the hook redaction, a materialisation over production.

pydr keeps journals, keep notes and half-made disks beside a disk under
predictable names, so a directory someone else may rename entries in is
refused outright (as sshd's StrictModes), and a journal pydr did not make
is never rolled back or kept as a recovery point."""

import os
import pwd

import pytest

from conftest import run_cli, sha
from pydr.engine import bindings as B
from pydr.engine import journal as J


def cli(vault, *args):
    return run_cli(*args, env=dict(os.environ, PYDR_VAULT=str(vault)))


def protected(tmp_path, replica_dir, size=1 << 20):
    """A vault with item vm (one disk in replica_dir) and one point."""
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(size))
    vault = tmp_path / "vault"
    assert cli(vault, "vault", "init", vault).returncode == 0
    r = cli(vault, "protect", "vm", "--disk", f"{src}={replica_dir / 'rep.img'}")
    assert r.returncode == 0, r.stderr
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 0, r.stderr
    return vault, src


def change(src):
    with open(src, "r+b") as f:
        f.seek(8192)
        f.write(os.urandom(4096))


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_a_directory_others_may_change_is_refused(tmp_path, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    vault, src = protected(tmp_path, shared)
    before = sha(shared / "rep.img")
    os.chmod(shared, mode)
    change(src)
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 4, r.stderr
    assert str(shared).encode() in r.stderr and b"other users may change" in r.stderr
    assert sha(shared / "rep.img") == before  # nothing written
    assert sorted(os.listdir(shared)) == [".rep.img.pydr-owner", "rep.img"]
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    r = cli(vault, "materialize", "vm", "--point", "1", "--to", out)
    assert r.returncode == 4 and b"other users may change" in r.stderr, r.stderr
    assert os.listdir(out) == []
    os.chmod(shared, 0o755)  # made private again: the same command finishes
    assert cli(vault, "replicate", "vm").returncode == 0
    assert sha(shared / "rep.img") == sha(src)


def test_a_sticky_world_writable_directory_is_fine(tmp_path):
    """/tmp's kind: others may add names but not rename or remove pydr's."""
    shared = tmp_path / "sticky"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    vault, src = protected(tmp_path, shared)
    change(src)
    assert cli(vault, "replicate", "vm").returncode == 0
    assert sha(shared / "rep.img") == sha(src)


def test_a_journal_pydr_did_not_make_is_never_taken(tmp_path):
    """Another user plants a committed-looking undo journal (its hashes are
    right: anyone can compute xxh3) beside a replica in a sticky directory:
    the cycle refuses it instead of keeping it as a recovery-point step."""
    shared = tmp_path / "sticky"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    vault, src = protected(tmp_path, shared)
    payload = b"EVIL" * 1024
    rec = B.record_build(B.DATA, 0, 4096,
                         payload_hash=B.hash_bytes(B.ALGORITHMS["xxh3-64"], payload)[0])
    planted = shared / ".rep.img.pydr-undo"
    planted.write_bytes(J.pack_header(J.KIND_RESYNC, 4096, 1 << 20, 1 << 20) + rec + payload)
    nobody = pwd.getpwnam("nobody")
    os.chown(planted, nobody.pw_uid, nobody.pw_gid)
    steps_before = sorted(os.listdir(vault / "undo" / "vm")) if (vault / "undo" / "vm").exists() \
        else []
    change(src)
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 4, r.stderr
    assert b"not a file pydr made" in r.stderr and str(planted).encode() in r.stderr
    assert planted.exists()  # left for a person to look at
    after = sorted(os.listdir(vault / "undo" / "vm")) if (vault / "undo" / "vm").exists() else []
    assert after == steps_before
    r = cli(vault, "rollback", shared / "rep.img")
    assert r.returncode == 4 and b"not a file pydr made" in r.stderr, r.stderr


def test_materialize_never_writes_over_a_protected_disk(tmp_path):
    """A typo in --to (the sources' directory) must not roll production
    back to an old point."""
    (tmp_path / "b").mkdir()
    vault, src = protected(tmp_path, tmp_path / "b")
    change(src)
    assert cli(vault, "replicate", "vm").returncode == 0
    live = sha(src)
    os.rename(src, tmp_path / "rep.img")  # the source now has the replica's name
    src = tmp_path / "rep.img"
    r = cli(vault, "protect", "db", "--disk", f"{tmp_path / 'rep.img'}={tmp_path / 'b' / 'db.img'}")
    assert r.returncode == 0, r.stderr
    r = cli(vault, "materialize", "vm", "--point", "1", "--to", tmp_path)
    assert r.returncode == 15, r.stderr
    assert b"protects" in r.stderr and b"source of item 'db'" in r.stderr
    assert sha(src) == live


def test_hook_options_cannot_be_abbreviated_past_the_redaction(tmp_path):
    """argparse would take --quiesce for --quiesce-hook; the lock file (shown
    to any refused command) hides hooks by their full option name."""
    from pydr.dr.store import redact_argv

    r = cli(tmp_path / "v", "protect", "vm", "--disk", "a=b", "--quiesce", "mysql -pS3CRET")
    assert r.returncode == 2, r.stderr
    assert redact_argv(["pydr", "failover", "vm", "--shutdown", "mysql -pS3CRET",
                        "--thaw=x -pS3CRET"]) == [
        "pydr", "failover", "vm", "--shutdown-hook", "<hook set>", "--thaw-hook=<hook set>"]

"""Bring-up hooks: a machine that is not a libvirt domain (``pydr protect
... --bring-up-hook CMD``) is brought up by its hook, given the recovered
disks and the point as JSON on stdin; a failing hook is exit 22, the disks
left as they are. No libvirt needed."""

import json
import os
import subprocess
import sys

PYDR = os.path.join(os.path.dirname(sys.executable), "pydr")


def cli(*args, env=None):
    return subprocess.run([PYDR, *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=300)


def _protected(tmp_path, hook):
    vault = tmp_path / "vault"
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.write(os.urandom(1 << 20))
    assert cli("vault", "init", vault).returncode == 0
    r = cli("protect", "app", "--disk", f"{src}={tmp_path / 'rep.img'}", "--vault", vault,
            "--bring-up-hook", hook)
    assert r.returncode == 0, r.stderr
    assert cli("replicate", "app", "--vault", vault).returncode == 0
    return vault


def test_the_hook_gets_the_disks_and_the_point_as_json(tmp_path):
    got = tmp_path / "got.json"
    vault = _protected(tmp_path, f"cat > {got}; env > {tmp_path / 'env'}")
    r = cli("test-failover", "app", "--to", tmp_path / "drill", "--vault", vault, "--json",
            env={"PYDR_PASSPHRASE": "secret-pass"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    payload = json.loads(got.read_text())
    assert payload == {"item": "app", "point": out["point"], "role": "drill", "xml": None,
                       "disks": [{"idx": 0, "path": str(tmp_path / "drill" / "rep.img"),
                                  "format": "raw"}]}
    assert out["machine"]["kind"] == "hook"
    assert "secret-pass" not in (tmp_path / "env").read_text()  # never a passphrase

    # a failover: the hook is told about the replica paths that now hold the point
    r = cli("cleanup-test-failover", "app", "--vault", vault)
    assert r.returncode == 0, r.stderr
    r = cli("failover", "app", "--point", "latest-processed", "--vault", vault, "--json")
    assert r.returncode == 0, r.stderr
    payload = json.loads(got.read_text())
    assert payload["role"] == "failover"
    assert payload["disks"][0]["path"] == str(tmp_path / "rep.img")


def test_a_failing_hook_is_exit_22_and_leaves_the_disks(tmp_path):
    vault = _protected(tmp_path, "echo 'no such host' >&2; exit 3")
    r = cli("test-failover", "app", "--to", tmp_path / "drill", "--vault", vault)
    assert r.returncode == 22, r.stdout + r.stderr
    assert "bring-up hook" in r.stderr and "exit 3" in r.stderr and "no such host" in r.stderr
    assert (tmp_path / "drill" / "rep.img").exists()  # the disks stay as they are
    # the hidden command line: never in status or the error
    assert "no such host' >&2" not in r.stderr


def test_verify_needs_a_libvirt_machine(tmp_path):
    vault = _protected(tmp_path, "true")
    r = cli("test-failover", "app", "--to", tmp_path / "drill", "--vault", vault, "--verify",
            "--verify-console", "READY")
    assert r.returncode == 2 and "libvirt" in r.stderr, r.stderr
    assert not (tmp_path / "drill").exists()


def test_machine_options_on_a_disk_item_are_refused(tmp_path):
    vault = tmp_path / "vault"
    src = tmp_path / "src.img"
    src.write_bytes(b"\1" * 65536)
    assert cli("vault", "init", vault).returncode == 0
    assert cli("protect", "d", "--disk", f"{src}={tmp_path / 'r.img'}",
               "--vault", vault).returncode == 0
    assert cli("replicate", "d", "--vault", vault).returncode == 0
    r = cli("failover", "d", "--vault", vault, "--network-map", "a=b")
    assert r.returncode == 2 and "no machine" in r.stderr, r.stderr
    r = cli("test-failover", "d", "--to", tmp_path / "x", "--vault", vault, "--verify-console",
            "X")
    assert r.returncode == 2 and "needs --verify" in r.stderr, r.stderr

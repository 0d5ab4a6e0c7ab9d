"""Bring-up errors that need no running libvirtd: hostile domain XML is
refused (exit 7) before it is recorded, an unreachable recovery connection
is exit 22 with the disks made and the command finishing on a rerun."""

import os
import subprocess
import sys

import pytest

from pydr import Vault
from pydr.errors import FormatError, InvalidArgument

PYDR = os.path.join(os.path.dirname(sys.executable), "pydr")

XML = """<domain type='qemu'><name>app</name>
<uuid>0b3e5f0a-6c1d-4d59-9a55-4f3a9c2d7e10</uuid><devices>
<disk type='file' device='disk'><driver name='qemu' type='raw'/>
<source file='{src}'/><target dev='vda' bus='virtio'/></disk>
</devices></domain>"""


def cli(*args):
    return subprocess.run([PYDR, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture
def vault(tmp_path):
    v = tmp_path / "vault"
    src = tmp_path / "src.img"
    src.write_bytes(b"\7" * (1 << 20))
    assert cli("vault", "init", v).returncode == 0
    assert cli("protect", "app", "--disk", f"{src}={tmp_path / 'rep.img'}",
               "--vault", v).returncode == 0
    assert cli("replicate", "app", "--vault", v).returncode == 0
    return v, src


def test_hostile_domain_xml_is_refused_and_nothing_is_recorded(vault):
    v, src = vault
    hostile = ('<!DOCTYPE d [<!ENTITY a "aaaaaaaa">]>' + XML.format(src=src)
               .replace("<name>app</name>", "<name>&a;</name>"))
    with Vault(str(v), writer=True) as vv:
        with pytest.raises(FormatError, match="DOCTYPE"):
            vv.attach_machine("app", hostile)
        with pytest.raises(InvalidArgument, match="disks"):  # two disks for one
            vv.attach_machine("app", XML.format(src=src).replace(
                "</devices>", "<disk type='file' device='disk'><source file='/x'/>"
                              "<target dev='vdb'/></disk></devices>"))
        assert vv.store.machine("app") is None


def test_an_unreachable_recovery_connection_is_exit_22_and_a_rerun_finishes(vault, tmp_path):
    v, src = vault
    with Vault(str(v), writer=True) as vv:
        vv.attach_machine("app", XML.format(src=src),
                          uri=f"qemu:///system?socket={tmp_path}/no-such-sock")
    r = cli("test-failover", "app", "--to", tmp_path / "drill", "--vault", v)
    assert r.returncode == 22, r.stdout + r.stderr
    assert "no-such-sock" in r.stderr and "cannot connect" in r.stderr
    assert (tmp_path / "drill" / "rep.img").exists()  # the disks were made
    # the same command with a connection that answers is the way out; here it is
    # still unreachable: the same error, nothing lost, the drill still cleans up
    r = cli("test-failover", "app", "--to", tmp_path / "drill", "--vault", v)
    assert r.returncode == 22
    r = cli("cleanup-test-failover", "app", "--vault", v)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "drill" / "rep.img").exists()

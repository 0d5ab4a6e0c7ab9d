"""What a libvirt checkpoint vouches for: the vault records, with each
point, the checkpoint's creation time and each disk's file and size at the
cut; a checkpoint deleted and made again under pydr's name, a disk resized,
a target pointed at another file (even one holding a same-named bitmap),
or a disk plugged in, is a lost chain (exit 19, resync-required), never a
point that silently misses changes or names a disk it has no copy of."""

import json
import shutil

from guestkit import guest_kit, wait_for_console  # noqa: F401
from libvirtd import libvirtd  # noqa: F401 (the fixture)

from pydr.dr.vault import Vault

from test_libvirt_capture import BOOT, cli, guest, protected, replicate  # noqa: F401


def lost(vault, *words):
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 19, r.stderr
    for word in words:
        assert word in r.stderr, r.stderr
    with Vault(vault) as v:
        assert v.store.item("vm")["state"] == "resync-required"
    return r


def test_a_checkpoint_vouches_only_for_the_disks_it_was_made_on(guest, tmp_path):
    vault, _ = protected(guest, tmp_path)
    first = replicate(vault)
    with Vault(vault) as v:
        row = v.store.point_machine("vm", first["point_id"])
    record = json.loads(row.checkpoint)
    assert record["disks"]["vda"]["source"] == guest.disk
    assert record["disks"]["vda"]["capacity"] == guest.dom.blockInfo("vda")[0]
    created, nonce = record["created"].split("/")
    assert created.isdigit() and len(nonce) == 16
    name = record["name"]

    # deleted and made again under pydr's name: it misses what changed before
    guest.libvirtd.virsh("checkpoint-delete", guest.name, name)
    guest.libvirtd.virsh("checkpoint-create-as", guest.name, name, "--diskspec",
                         "vda,checkpoint=bitmap")
    lost(vault, "made again", name)
    replicate(vault, "--resync")
    replicate(vault)  # tracked again

    # resized: its bitmap says nothing of the grown part
    size = guest.dom.blockInfo("vda")[0]
    guest.libvirtd.virsh("blockresize", guest.name, "vda", f"{size + (16 << 20)}B")
    lost(vault, "resized")
    replicate(vault, "--resync")
    replicate(vault)

    # the target pointed at another file with the same bitmaps (a copy)
    guest.dom.destroy()  # SIGTERM: the bitmaps are written back
    other = str(tmp_path / "other.qcow2")
    shutil.copyfile(guest.disk, other)
    xml = guest.dom.XMLDesc(2).replace(guest.disk, other)
    guest.libvirtd.conn().defineXML(xml)
    guest.dom.create()
    wait_for_console(guest.log, r"PYDR-READY", timeout=BOOT, domain=guest.dom,
                     after=0)
    lost(vault, "is now", other)
    replicate(vault, "--resync")
    replicate(vault)

    # a disk plugged in: never captured while the point's XML names it
    vdb = str(tmp_path / "vdb.raw")
    with open(vdb, "wb") as f:
        f.truncate(4 << 20)
    guest.libvirtd.virsh("attach-disk", guest.name, vdb, "vdb", "--persistent")
    r = lost(vault, "vdb", "protect")
    assert "protected again" in r.stderr and "not protected" in r.stderr
    r = cli(vault, "replicate", "vm", "--resync")  # a resync cannot mend it either
    assert r.returncode == 19 and "vdb" in r.stderr, r.stderr

"""Points made by copy-on-write: reflink clones on XFS (a loop device made
here), qcow2 overlays on any file system (real qemu-img, qemu-nbd, qemu-io),
and the copy they fall back to. The disks are real ext4 file systems
(mkfs.ext4 -d), changed with debugfs -w; every point is compared with the
source at its cycle and checked with e2fsck -fn."""

import json
import os
import random
import subprocess

import pytest

from pydr.dr.vault import Vault, init_vault

from conftest import run_cli, sha
from qemuhelp import raw_sha

MiB = 1 << 20


def ext4(path, size_mb, seed):
    tree = path.parent / f"tree-{path.name}"
    rng = random.Random(seed)
    (tree / "etc").mkdir(parents=True)
    for i in range(20):
        (tree / "etc" / f"f{i}.conf").write_text(f"v{i}={rng.random()}\n" * rng.randrange(5, 300))
    (tree / "data.bin").write_bytes(rng.randbytes(6 * MiB))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(path),
                    f"{size_mb}M"], check=True, capture_output=True)
    subprocess.run(["rm", "-rf", str(tree)], check=True)


def write_file(img, name, nbytes, seed):
    """The machine writes a file into its ext4 disk (and removes another)."""
    payload = img.parent / f"payload-{seed}"
    payload.write_bytes(random.Random(seed).randbytes(nbytes))
    script = img.parent / "cmds"
    script.write_text(f"write {payload} /{name}\nrm /etc/f{seed % 20}.conf\n")
    subprocess.run(["debugfs", "-w", "-f", str(script), str(img)], check=True,
                   capture_output=True)
    payload.unlink()


def fsck_clean(img):
    return subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True).returncode == 0


def used_bytes(directory):
    st = os.statvfs(directory)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def protected(tmp_path, replica_dir, cycles=3, change=MiB):
    """Item "vm" with one 64 MiB ext4 disk at site A, replicated `cycles`
    times into replica_dir with `change` bytes written between cycles;
    returns (vault, source, replica, {point: sha of the source then})."""
    site_a = tmp_path / "site-a"
    site_a.mkdir()
    replica_dir.mkdir(exist_ok=True)
    src, rep = site_a / "vm.img", replica_dir / "vm.img"
    ext4(src, 64, 1)
    init_vault(tmp_path / "vault")
    history = {}
    with Vault(tmp_path / "vault", writer=True) as v:
        v.protect("vm", [(str(src), str(rep))], retention=10)
        for cycle in range(cycles):
            if cycle:
                write_file(src, f"file{cycle}", change, cycle)
            history[v.replicate("vm").point_id] = sha(src)
    return tmp_path / "vault", src, rep, history


def pydr_json(*args):
    r = run_cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_dr_cycle_on_xfs_clones_and_costs_the_change(tmp_path, xfs_dir):
    vault, src, rep, history = protected(tmp_path, xfs_dir / "site-b")
    v_ = ["--vault", vault]
    before = used_bytes(xfs_dir)
    drill = pydr_json("test-failover", "vm", "--to", xfs_dir / "drill", "--point", "1", *v_)
    assert drill["method"] == "reflink"
    disk, = drill["paths"]
    assert sha(disk) == history[1] and fsck_clean(disk)
    # the clone shares the replica's extents: it costs what changed since point 1
    assert used_bytes(xfs_dir) - before <= 4 * MiB
    assert "shared" in subprocess.run(["filefrag", "-v", disk], capture_output=True,
                                      text=True).stdout
    run_cli("cleanup-test-failover", "vm", *v_)
    assert not (xfs_dir / "drill").exists()

    before = used_bytes(xfs_dir)
    res = pydr_json("failover", "vm", "--point", "2", *v_)
    assert res["method"] == "reflink" and sha(rep) == history[2] and fsck_clean(rep)
    # the baseline (the old replica, renamed) and the clone share their blocks
    assert used_bytes(xfs_dir) - before <= 3 * MiB
    with Vault(vault) as v:
        assert [j["method"] for j in v.store.jobs() if j["kind"] == "failover"] == ["reflink"]

    write_file(rep, "at-site-b", MiB, 7)  # the machine works at site B
    res = pydr_json("change-point", "vm", "--point", "1", *v_)
    assert res["method"] == "reflink" and sha(rep) == history[1] and fsck_clean(rep)

    res = pydr_json("commit", "vm", *v_)
    # only the owner file is left: the disk stays the item's (its source after reprotect)
    assert [n for n in os.listdir(xfs_dir / "site-b") if n.startswith(".")] == [
        f".{rep.name}.pydr-owner"]
    write_file(rep, "after-commit", MiB, 8)
    res = pydr_json("reprotect", "vm", *v_)
    assert res["cycle"]["bytes_written"] < 8 * MiB  # only the differences move back
    assert sha(src) == sha(rep)
    # failback: site A's disk is on a file system that cannot clone (the temp
    # dir's): the point is copied there, and the result says so
    res = pydr_json("failback", "vm", "--shutdown-hook", "true", *v_)
    assert res["method"] == "copy" and sha(src) == sha(rep) and fsck_clean(src)


def test_overlays_on_ext4_hold_the_point_and_take_the_vms_writes(tmp_path):
    site_b = tmp_path / "site-b"
    vault, src, rep, history = protected(tmp_path, site_b)
    v_ = ["--vault", vault]
    rep_sha = sha(rep)
    drill = pydr_json("test-failover", "vm", "--to", tmp_path / "drill", "--point", "1",
                      "--as", "qcow2", *v_)
    assert drill["method"] == "qcow2"
    disk, = drill["paths"]
    assert open(disk, "rb").read(4) == b"QFI\xfb"
    assert raw_sha(disk, tmp_path) == history[1]
    assert os.path.getsize(disk) < 4 * MiB  # the blocks that differ, not the disk
    # the drill's VM writes into its overlay; the replica does not change
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1M 2M", disk], check=True,
                   capture_output=True)
    assert raw_sha(disk, tmp_path) != history[1] and sha(rep) == rep_sha
    # while the overlay reads the replica, a cycle would change the drill under it
    r = run_cli("replicate", "vm", *v_)
    assert r.returncode != 0 and "cleanup-test-failover" in r.stderr.decode() and sha(rep) == rep_sha
    assert run_cli("cleanup-test-failover", "vm", *v_).returncode == 0
    assert not (tmp_path / "drill").exists()

    res = pydr_json("failover", "vm", "--point", "2", "--as", "qcow2", *v_)
    assert res["method"] == "qcow2" and raw_sha(rep, tmp_path) == history[2]
    base = site_b / ".vm.img.pydr-base"
    base_sha = sha(base)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 8M 1M", str(rep)], check=True,
                   capture_output=True)
    assert sha(base) == base_sha  # the VM's writes land in the overlay
    res = pydr_json("change-point", "vm", "--point", "1", *v_)  # as the failover made it
    assert res["method"] == "qcow2" and raw_sha(rep, tmp_path) == history[1]
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x66 20M 64k", str(rep)],
                   check=True, capture_output=True)
    expected = raw_sha(rep, tmp_path)
    res = pydr_json("commit", "vm", *v_)
    assert any("flattened" in n for n in res["notes"])
    assert open(rep, "rb").read(4) != b"QFI\xfb" and sha(rep) == expected
    assert [n for n in os.listdir(site_b) if n.startswith(".")] == [f".{rep.name}.pydr-owner"]
    res = pydr_json("reprotect", "vm", *v_)
    assert sha(src) == sha(rep) and res["cycle"]["bytes_written"] < 8 * MiB


def test_without_reflink_it_copies_and_says_so(tmp_path):
    vault, src, rep, history = protected(tmp_path, tmp_path / "site-b", cycles=2)
    v_ = ["--vault", vault]
    r = run_cli("test-failover", "vm", "--to", tmp_path / "drill", "--point", "1", "--reflink",
                *v_)
    assert r.returncode != 0 and "reflink" in r.stderr.decode() and "Traceback" not in r.stderr.decode()
    assert not (tmp_path / "drill").exists() or not os.listdir(tmp_path / "drill")
    run_cli("cleanup-test-failover", "vm", *v_)
    r = run_cli("failover", "vm", "--point", "1", "--progress", "--json", *v_)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["method"] == "copy" and sha(rep) == history[1]
    assert "failover" in r.stderr.decode() and "%" in r.stderr.decode()  # the copy shows its progress
    r = run_cli("failover", "vm", "--point", "1", *v_)
    assert r.returncode == 0 and "already" in r.stdout.decode()


def test_as_qcow2_without_qemu_img_names_the_package(tmp_path):
    vault, src, rep, history = protected(tmp_path, tmp_path / "site-b", cycles=2)
    env = dict(os.environ, PATH=str(tmp_path / "empty-bin"))
    r = run_cli("test-failover", "vm", "--to", tmp_path / "drill", "--as", "qcow2",
                "--vault", vault, env=env)
    assert r.returncode != 0 and "qemu-utils" in r.stderr.decode() and "Traceback" not in r.stderr.decode()
    assert not (tmp_path / "drill").exists() or not os.listdir(tmp_path / "drill")
    assert sha(rep) == history[2]


@pytest.mark.parametrize("flag", ["--copy", "--as raw"])
def test_copy_forced_on_xfs(tmp_path, xfs_dir, flag):
    vault, src, rep, history = protected(tmp_path, xfs_dir / "site-b", cycles=2)
    res = pydr_json("materialize", "vm", "--point", "1", "--to", xfs_dir / "out",
                    *flag.split(), "--vault", vault)
    assert res["method"] == ("copy" if flag == "--copy" else "reflink")
    assert sha(res["paths"][0]) == history[1]

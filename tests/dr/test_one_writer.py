"""A replica has one writer: a second vault (or item) is refused, and a write
to a replica outside pydr's cycles marks the points it broke, stops plain
cycles (resync-required) and is repaired by 'pydr replicate ITEM --resync'."""

import json
import os
import shutil
import stat

import pytest

from pydr.dr import ownership
from pydr.dr.vault import Vault, init_vault

from conftest import run_cli, sha

MiB = 1 << 20


def cli(vault, *args, env=None):
    return run_cli(*args, env=dict(os.environ, PYDR_VAULT=str(vault), **(env or {})))


def write_at(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def status(vault, item):
    return json.loads(cli(vault, "status", item, "--json").stdout)


def protected_item(tmp_path, points, skew=0):
    """A vault with item "vm" (one 4 MiB disk) and `points` points, cycle n
    changing 64 KiB at n MiB + `skew`; returns (vault, source, replica,
    {point id: sha256 of the source at it})."""
    vault, src, rep = tmp_path / "vault", tmp_path / "src.img", tmp_path / "dr" / "rep.img"
    init_vault(vault)
    rep.parent.mkdir()
    src.write_bytes(os.urandom(4 * MiB))
    assert cli(vault, "protect", "vm", "--disk", f"{src}={rep}").returncode == 0
    history = {}
    for n in range(points):
        write_at(src, n * MiB + skew, os.urandom(64 << 10))
        r = cli(vault, "replicate", "vm", "--json")
        assert r.returncode == 0, r.stderr
        history[json.loads(r.stdout)["point_id"]] = sha(src)
    return vault, src, rep, history


@pytest.fixture
def item(tmp_path):
    return protected_item(tmp_path, 2)


def materialized(vault, tmp_path, point):
    out = tmp_path / f"point{point}"
    r = cli(vault, "materialize", "vm", "--point", point, "--to", out)
    assert r.returncode == 0, r.stderr
    return sha(out / "rep.img")


def test_the_owner_file_names_the_vault_item_and_disk(item):
    vault, _, rep, _ = item
    owner_path = rep.parent / ".rep.img.pydr-owner"
    assert stat.S_IMODE(os.stat(owner_path).st_mode) == 0o600
    owner = ownership.decode(owner_path.read_bytes(), str(owner_path))
    with Vault(vault) as v:
        assert (owner.vault_id, owner.item, owner.idx) == (v.vault_id(), "vm", 0)
    assert owner.vault_dir == str(vault) and owner.replica == str(rep)


def test_owner_records_refuse_damage_with_the_offset(item):
    _, _, rep, _ = item
    blob = (rep.parent / ".rep.img.pydr-owner").read_bytes()
    where = "x"
    with pytest.raises(ValueError, match="checksum") as exc:
        ownership.decode(blob[:40] + bytes([blob[40] ^ 1]) + blob[41:], where)
    assert exc.value.offset == len(blob) - 16
    with pytest.raises(ValueError, match="truncated"):
        ownership.decode(blob[:20], where)
    with pytest.raises(ValueError, match="not a pydr owner"):
        ownership.decode(b"X" + blob[1:], where)
    with pytest.raises(ValueError, match="header says"):
        ownership.decode(blob + b"\0", where)
    assert ownership.decode(blob, where).item == "vm"


def test_release_removes_only_its_own_claim(item, tmp_path):
    """What removing an item will call (no command removes items yet)."""
    from pydr.endpoints import open_endpoint

    vault, _, rep, _ = item
    owner_path = rep.parent / ".rep.img.pydr-owner"
    with Vault(vault) as v:
        me = ownership.Owner(v.vault_id(), str(vault), "vm", 0, str(rep))
    stranger = ownership.Owner("cd" * 16, "/elsewhere", "vm", 0, str(rep))
    assert not ownership.release(open_endpoint(str(rep)), stranger)
    assert owner_path.exists()
    assert ownership.release(open_endpoint(str(rep)), me)
    assert not owner_path.exists()
    other = tmp_path / "other"
    init_vault(other)
    src2 = tmp_path / "s2.img"
    src2.write_bytes(os.urandom(MiB))
    assert cli(other, "protect", "vm2", "--disk", f"{src2}={rep}").returncode == 0


def test_a_second_vault_protecting_the_same_replica_is_refused(item, tmp_path):
    vault, _, rep, _ = item
    other, src2 = tmp_path / "other-vault", tmp_path / "src2.img"
    init_vault(other)
    src2.write_bytes(os.urandom(MiB))
    owner_before = (rep.parent / ".rep.img.pydr-owner").read_bytes()
    r = cli(other, "protect", "vm2", "--disk", f"{src2}={rep}")
    with Vault(vault) as v:
        first_id = v.vault_id()
    assert r.returncode == 15, r.stderr
    assert first_id.encode() in r.stderr and str(vault).encode() in r.stderr
    assert b"'vm'" in r.stderr and str(rep).encode() in r.stderr
    with Vault(other) as v:
        assert v.items() == []
    assert (rep.parent / ".rep.img.pydr-owner").read_bytes() == owner_before


def test_protect_refuses_a_replica_owned_before_its_first_cycle(tmp_path):
    """The owner file is written by protect: two vaults protecting one path
    before either cycles are refused too."""
    a, b = tmp_path / "a", tmp_path / "b"
    init_vault(a)
    init_vault(b)
    src, rep = tmp_path / "s.img", tmp_path / "r.img"
    src.write_bytes(os.urandom(MiB))
    assert cli(a, "protect", "x", "--disk", f"{src}={rep}").returncode == 0
    r = cli(b, "protect", "y", "--disk", f"{src}={rep}")
    assert r.returncode == 15 and b"is owned by" in r.stderr


def test_a_cycle_refuses_a_replica_another_vault_claimed(item, tmp_path):
    """An owner file naming another vault (written by an older pydr of that
    vault, or by hand) stops the cycle before anything is written."""
    vault, src, rep, _ = item
    owner_path = rep.parent / ".rep.img.pydr-owner"
    stranger = ownership.Owner("ab" * 16, "/elsewhere/vault", "db", 0, str(rep))
    owner_path.write_bytes(ownership.encode(stranger))
    before = sha(rep)
    write_at(src, 0, os.urandom(4096))
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 15 and b"/elsewhere/vault" in r.stderr and b"'db'" in r.stderr
    assert sha(rep) == before


def test_a_symlinked_owner_file_is_not_followed(tmp_path):
    vault, src, rep = tmp_path / "v", tmp_path / "s.img", tmp_path / "r.img"
    init_vault(vault)
    src.write_bytes(os.urandom(MiB))
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    os.symlink(target, tmp_path / ".r.img.pydr-owner")
    r = cli(vault, "protect", "x", "--disk", f"{src}={rep}")
    assert r.returncode == 10 and b"symbolic link" in r.stderr
    assert target.read_bytes() == b"keep"


def test_a_manual_resync_onto_the_replica_breaks_old_points(item, tmp_path):
    """The adversarial trial: 'pydr resync' onto a replica, then a cycle.
    The cycle refuses (exit 15, resync-required, the reason in last_error),
    every older point is marked damaged, the replica is left as it is; then
    --resync re-reads the replica and the points recorded from then on are
    exact."""
    vault, src, rep, history = item
    intruder = tmp_path / "intruder.img"
    intruder.write_bytes(os.urandom(4 * MiB))
    assert run_cli("resync", intruder, rep).returncode == 0
    write_at(src, 2 * MiB, os.urandom(4096))
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 15, r.stderr
    assert b"was written outside pydr since point 2" in r.stderr
    assert b"pydr replicate vm --resync" in r.stderr
    assert sha(rep) == sha(intruder)  # the refused cycle wrote nothing
    st = status(vault, "vm")
    assert st["state"] == "resync-required"
    assert "outside pydr since point 2" in st["last_error"]
    assert st["damaged_points"] == sorted(history)
    with Vault(vault) as v:
        assert all("outside pydr" in p["damaged"] for p in v.store.points("vm"))
    again = cli(vault, "replicate", "vm")  # running it again does not hide it
    assert again.returncode == 15 and b"--resync" in again.stderr

    r = cli(vault, "replicate", "vm", "--resync", "--json")
    assert r.returncode == 0, r.stderr
    third = json.loads(r.stdout)["point_id"]
    assert sha(rep) == sha(src)
    history[third] = sha(src)
    st = status(vault, "vm")
    assert st["state"] == "protected" and st["last_error"] is None
    assert st["damaged_points"] == [1, 2]
    write_at(src, 3 * MiB, os.urandom(8192))
    r = cli(vault, "replicate", "vm", "--json")
    assert r.returncode == 0, r.stderr
    fourth = json.loads(r.stdout)["point_id"]
    history[fourth] = sha(src)
    assert status(vault, "vm")["damaged_points"] == [1, 2]
    for point in (third, fourth):
        assert materialized(vault, tmp_path, point) == history[point]


def test_a_stale_cache_newer_than_the_replica_sends_the_item_to_resync(item, tmp_path):
    """The replica written behind pydr's back with its mtime set back, so
    the signature cache still looks newer: the cycle does not trust the
    cache and exit 12 for ever; the change of ctime sends the item to
    resync-required, and --resync repairs it."""
    vault, src, rep, history = item
    cache = vault / "cache" / "vm" / "0.sig"
    old = os.stat(rep)
    write_at(rep, MiB, os.urandom(4096))
    os.utime(rep, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert os.stat(cache).st_mtime_ns >= os.stat(rep).st_mtime_ns
    write_at(src, MiB, os.urandom(4096))
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 15, r.stderr
    assert b"outside pydr since point 2" in r.stderr
    assert not cache.exists()  # it described another replica
    assert status(vault, "vm")["damaged_points"] == sorted(history)
    assert cli(vault, "replicate", "vm", "--resync").returncode == 0
    assert sha(rep) == sha(src)
    write_at(src, 0, os.urandom(4096))
    assert cli(vault, "replicate", "vm").returncode == 0
    assert sha(rep) == sha(src)


def test_a_cache_that_lies_is_not_used(item, tmp_path):
    """A signature cache that does not describe the replica although the
    replica is as the last cycle left it (the cache itself replaced): its
    digest is not the one the replica's identity record binds, so the cycle
    drops it and reads the replica -- the replica ends exact, and no point
    is blamed for a lying cache."""
    vault, src, rep, history = item
    cache = vault / "cache" / "vm" / "0.sig"
    other = tmp_path / "other.img"
    other.write_bytes(os.urandom(4 * MiB))
    assert run_cli("signature", other, "-o", tmp_path / "lie.sig", "--block-size", "4096",
                   "--algorithm", "xxh3-128").returncode == 0
    shutil.copyfile(tmp_path / "lie.sig", cache)
    write_at(src, 0, os.urandom(4096))
    r = cli(vault, "replicate", "vm", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes_read"] >= 2 * 4 * MiB  # both sides read: no cache
    history[json.loads(r.stdout)["point_id"]] = sha(src)
    assert sha(rep) == sha(src)
    st = status(vault, "vm")
    assert st["state"] == "protected" and st["damaged_points"] == []
    for point, digest in history.items():
        assert materialized(vault, tmp_path, point) == digest


def test_a_removed_replica_is_not_silently_copied_again(item):
    vault, src, rep, history = item
    rep.unlink()
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 15 and b"is missing" in r.stderr
    assert not rep.exists()
    assert status(vault, "vm")["damaged_points"] == sorted(history)
    assert cli(vault, "replicate", "vm", "--resync").returncode == 0
    assert sha(rep) == sha(src)


def test_a_killed_cycle_is_not_an_outside_write(item, tmp_path):
    """Killed after it wrote the replica, before it recorded what it left:
    running the command again finishes the cycle, and no point is marked."""
    vault, src, rep, history = item
    write_at(src, 0, os.urandom(8192))
    r = cli(vault, "replicate", "vm", env={"PYDR_CRASH_AT": "resync.cache"})
    assert r.returncode == -9
    r = cli(vault, "replicate", "vm", "--json")
    assert r.returncode == 0, r.stderr
    history[json.loads(r.stdout)["point_id"]] = sha(src)
    assert status(vault, "vm")["damaged_points"] == []
    for point, digest in history.items():
        assert materialized(vault, tmp_path, point) == digest


def test_points_stay_exact_across_quiet_cycles(item, tmp_path):
    """No false alarm: cycles, a materialisation (which reads the replica)
    and cycles with nothing changed leave every point usable."""
    vault, src, rep, history = item
    assert materialized(vault, tmp_path, 1) == history[1]
    for _ in range(2):
        r = cli(vault, "replicate", "vm", "--json")
        assert r.returncode == 0, r.stderr
        history[json.loads(r.stdout)["point_id"]] = sha(src)
    assert status(vault, "vm")["damaged_points"] == []
    for point, digest in history.items():
        assert materialized(vault, tmp_path, point) == digest


def test_an_older_vault_adopts_its_replica(item, tmp_path):
    """What a vault made before owner files has: no owner file, no recorded
    identity. The next cycle claims the replica (without trusting the
    cache) and binds it from then on."""
    vault, src, rep, history = item
    (rep.parent / ".rep.img.pydr-owner").unlink()
    (vault / "cache" / "vm" / "0.replica").unlink()
    with Vault(vault, writer=True) as v, v.db:  # what the migration from schema 7 marks
        v.db.execute("INSERT INTO meta VALUES ('adopt-identity:vm', 'schema 7')")
    write_at(src, 0, os.urandom(4096))
    r = cli(vault, "replicate", "vm", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes_read"] >= 2 * 4 * MiB  # both sides read: no cache
    assert (rep.parent / ".rep.img.pydr-owner").exists()
    assert ownership.read_state(str(vault), "vm", 0).identity is not None
    write_at(rep, 0, b"outside")
    assert cli(vault, "replicate", "vm").returncode == 15


def test_qcow2_replicas_have_one_writer_too(tmp_path):
    if not shutil.which("qemu-img"):
        pytest.fail("qemu-img is missing: scripts/bootstrap installs qemu-utils")
    vault, src, rep = tmp_path / "v", tmp_path / "s.img", tmp_path / "r.qcow2"
    init_vault(vault)
    src.write_bytes(os.urandom(2 * MiB))
    assert cli(vault, "protect", "q", "--disk", f"{src}={rep}").returncode == 0
    for _ in range(2):
        write_at(src, 0, os.urandom(4096))
        r = cli(vault, "replicate", "q")
        assert r.returncode == 0, r.stderr
    assert (tmp_path / ".r.qcow2.pydr-owner").exists()
    other = tmp_path / "o.img"
    other.write_bytes(os.urandom(2 * MiB))
    assert run_cli("resync", other, rep).returncode == 0
    r = cli(vault, "replicate", "q")
    assert r.returncode == 15 and b"outside pydr since point 2" in r.stderr
    assert status(vault, "q")["damaged_points"] == [1, 2]
    assert cli(vault, "replicate", "q", "--resync").returncode == 0


def test_a_remote_replica_has_one_writer(sshd, tmp_path):
    """host:PATH replicas: the owner file is written there (through the
    server's WRITE), a second vault reaching the same path is refused, and
    a write there outside pydr is seen through the server's STAT (its
    ctime) as it is here."""
    from conftest import PYDR

    site_b = tmp_path / "site-b"
    site_b.mkdir()
    src = tmp_path / "s.img"
    src.write_bytes(os.urandom(MiB))
    reach = ("--rsh", sshd["rsh"], "--remote-pydr", PYDR)
    a, b = tmp_path / "a", tmp_path / "b"
    init_vault(a)
    init_vault(b)
    spec = f"127.0.0.1:{site_b / 'r.img'}"
    assert cli(a, "protect", "x", "--disk", f"{src}={spec}", *reach).returncode == 0
    r = cli(a, "replicate", "x")
    assert r.returncode == 0, r.stderr
    owner = ownership.decode((site_b / ".r.img.pydr-owner").read_bytes(), "owner")
    assert (owner.item, owner.replica) == ("x", spec)
    r = cli(b, "protect", "y", "--disk", f"{src}={spec}", *reach)
    assert r.returncode == 15 and b"is owned by" in r.stderr and str(a).encode() in r.stderr
    write_at(src, 0, os.urandom(4096))
    assert cli(a, "replicate", "x").returncode == 0
    write_at(site_b / "r.img", 4096, b"written there by someone else")
    write_at(src, 8192, os.urandom(4096))
    r = cli(a, "replicate", "x")
    assert r.returncode == 15 and b"outside pydr since point 2" in r.stderr, r.stderr
    assert status(a, "x")["damaged_points"] == [1, 2]
    assert cli(a, "replicate", "x", "--resync").returncode == 0
    assert sha(site_b / "r.img") == sha(src)

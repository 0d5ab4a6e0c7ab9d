"""The file undo steps are rolled back onto is checked before a restore:
an outside write to a replica (or, after a failover, to its baseline) stops
verify, materialize, drills, failover and change-point (exit 7, the points
marked damaged, nothing moved), and a damaged or missing identity record
refuses instead of turning the check off."""

import json
import os

import pytest

from pydr.dr import ownership
from pydr.dr.vault import Vault, init_vault

from conftest import run_cli, sha
from test_one_writer import protected_item

MiB = 1 << 20


def cli(vault, *args, env=None):
    return run_cli(*args, env=dict(os.environ, PYDR_VAULT=str(vault), **(env or {})))


def flip_bit(path, offset=MiB):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def status(vault, item="vm"):
    return json.loads(cli(vault, "status", item, "--json").stdout)


@pytest.fixture
def item(tmp_path):
    """A vault with item "vm" (one 4 MiB disk) and three points."""
    return protected_item(tmp_path, 3, skew=4096)


def test_an_outside_write_to_the_replica_stops_every_restore(item, tmp_path):
    vault, _, rep, history = item
    flip_bit(rep)
    r = cli(vault, "verify", "vm")
    assert r.returncode == 7 and b"was written outside pydr" in r.stderr
    assert str(rep).encode() in r.stderr
    assert status(vault)["damaged_points"] == sorted(history)
    assert status(vault)["state"] == "resync-required"
    r = cli(vault, "materialize", "vm", "--point", "1", "--to", tmp_path / "m")
    assert r.returncode == 7 and not (tmp_path / "m" / "rep.img").exists()
    assert cli(vault, "test-failover", "vm", "--to", tmp_path / "drill").returncode != 0
    assert not (tmp_path / "drill" / "rep.img").exists()
    before = sha(rep)
    assert cli(vault, "failover", "vm", "--point", "2").returncode != 0
    assert sha(rep) == before and not (rep.parent / ".rep.img.pydr-base").exists()


def test_materialize_checks_the_replica_before_it_reads_it(item, tmp_path):
    """Without a verify first: the first command after the write refuses."""
    vault, _, rep, history = item
    flip_bit(rep)
    r = cli(vault, "materialize", "vm", "--point", "2", "--to", tmp_path / "m")
    assert r.returncode == 7 and b"was written outside pydr" in r.stderr
    assert not (tmp_path / "m" / "rep.img").exists()
    assert status(vault)["damaged_points"] == sorted(history)
    assert cli(vault, "replicate", "vm", "--resync").returncode == 0  # the way out


def test_an_outside_write_to_the_baseline_stops_change_point(item):
    vault, _, rep, history = item
    assert cli(vault, "failover", "vm", "--point", "2").returncode == 0
    assert sha(rep) == history[2]
    base = rep.parent / ".rep.img.pydr-base"
    assert ownership.read_state(str(vault), "vm", 0, ownership.BASELINE).identity is not None
    flip_bit(base)
    r = cli(vault, "change-point", "vm", "--point", "3")
    assert r.returncode == 7 and b"baseline" in r.stderr and str(base).encode() in r.stderr
    assert b"nothing was moved" in r.stderr
    assert sha(rep) == history[2]  # the failed-over disk is left as it is
    s = status(vault)
    assert s["state"] == "failed-over" and s["health"] == "critical"
    assert s["damaged_points"] == sorted(history)


def test_a_resumed_failover_checks_the_baseline(item):
    vault, _, rep, history = item
    r = cli(vault, "failover", "vm", "--point", "2", env={"PYDR_CRASH_AT": "failover.baseline"})
    assert r.returncode == -9
    base = rep.parent / ".rep.img.pydr-base"
    flip_bit(base)
    before = sha(base)
    r = cli(vault, "failover", "vm", "--point", "2")
    assert r.returncode == 7 and b"baseline" in r.stderr
    assert not rep.exists() and sha(base) == before
    assert status(vault)["damaged_points"] == sorted(history)


def test_a_failover_killed_before_its_baseline_record_still_checks_size_and_mtime(item):
    """Killed between the rename and its record: the replica's record still
    holds the size and mtime a rename keeps."""
    vault, _, rep, history = item
    r = cli(vault, "failover", "vm", "--point", "2", env={"PYDR_CRASH_AT": "failover.baseline"})
    assert r.returncode == -9
    ownership.forget_state(str(vault), "vm", 0, ownership.BASELINE)
    base = rep.parent / ".rep.img.pydr-base"
    with open(base, "ab") as f:
        f.write(b"x")
    r = cli(vault, "failover", "vm", "--point", "2")
    assert r.returncode == 7 and b"changed size" in r.stderr


def test_clean_failovers_resumed_or_not_stay_exact(item):
    """No false alarm: a failover killed after its rename finishes, and
    change-point goes on to other points, each exact."""
    vault, _, rep, history = item
    r = cli(vault, "failover", "vm", "--point", "1", env={"PYDR_CRASH_AT": "failover.baseline"})
    assert r.returncode == -9
    r = cli(vault, "failover", "vm", "--point", "1")
    assert r.returncode == 0, r.stderr
    assert sha(rep) == history[1]
    for point in (3, 2):
        r = cli(vault, "change-point", "vm", "--point", str(point))
        assert r.returncode == 0, r.stderr
        assert sha(rep) == history[point]
    assert cli(vault, "verify", "vm").returncode == 0
    assert status(vault)["damaged_points"] == []


def test_a_damaged_identity_record_refuses_naming_the_file(item, tmp_path):
    vault, src, rep, history = item
    record = vault / "cache" / "vm" / "0.replica"
    data = bytearray(record.read_bytes())
    data[len(data) // 2] ^= 0x10
    record.write_bytes(bytes(data))
    with open(rep, "r+b") as f:  # the write the record would have shown
        f.seek(100 * 4096)
        f.write(os.urandom(4096))
    for args in (("replicate", "vm"), ("verify", "vm"),
                 ("materialize", "vm", "--point", "3", "--to", tmp_path / "m")):
        r = cli(vault, *args)
        assert r.returncode == 7, (args, r.stderr)
        if args[0] == "materialize":  # verify's scrub found the write and marked the points
            assert b"is damaged" in r.stderr or str(record).encode() in r.stderr, r.stderr
        else:
            assert str(record).encode() in r.stderr and b"offset" in r.stderr, r.stderr
    assert not (tmp_path / "m" / "rep.img").exists()
    assert status(vault)["state"] == "resync-required"
    r = cli(vault, "replicate", "vm", "--resync")
    assert r.returncode == 0, r.stderr
    assert sha(rep) == sha(src)
    assert ownership.read_state(str(vault), "vm", 0).identity is not None


def test_a_missing_identity_record_refuses(item, tmp_path):
    vault, _, rep, _ = item
    (vault / "cache" / "vm" / "0.replica").unlink()
    r = cli(vault, "materialize", "vm", "--point", "3", "--to", tmp_path / "m")
    assert r.returncode == 7 and b"is missing" in r.stderr
    r = cli(vault, "replicate", "vm")
    assert r.returncode == 7 and b"0.replica" in r.stderr


def test_only_an_item_from_before_identity_records_adopts_without_one(item, tmp_path):
    """The migration from schema 7 marks the items it found; such an item
    restores without a record until its next cycle records one."""
    vault, _, rep, history = item
    (vault / "cache" / "vm" / "0.replica").unlink()
    with Vault(vault, writer=True) as v, v.db:
        v.db.execute("INSERT INTO meta VALUES ('adopt-identity:vm', 'schema 7')")
    r = cli(vault, "materialize", "vm", "--point", "2", "--to", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert sha(tmp_path / "m" / "rep.img") == history[2]
    assert cli(vault, "replicate", "vm").returncode == 0
    with Vault(vault) as v:
        assert v.db.execute("SELECT COUNT(*) FROM meta WHERE key LIKE 'adopt-identity:%'"
                            ).fetchone()[0] == 0
    flip_bit(rep)
    assert cli(vault, "verify", "vm").returncode == 7


def test_a_stale_cache_put_back_is_not_used(tmp_path):
    """The vault's disk returns an older, valid signature cache: the cycle
    reads the replica instead, which ends equal to the source."""
    vault, src, rep = tmp_path / "vault", tmp_path / "src.img", tmp_path / "rep.img"
    init_vault(vault)
    src.write_bytes(os.urandom(4 * MiB))
    assert cli(vault, "protect", "vm", "--disk", f"{src}={rep}").returncode == 0
    assert cli(vault, "replicate", "vm").returncode == 0
    cache = vault / "cache" / "vm" / "0.sig"
    old_cache, old_block = cache.read_bytes(), src.read_bytes()[10 * 4096:11 * 4096]
    with open(src, "r+b") as f:
        f.seek(10 * 4096)
        f.write(os.urandom(4096))
    assert cli(vault, "replicate", "vm").returncode == 0
    with open(src, "r+b") as f:  # the source puts the block back
        f.seek(10 * 4096)
        f.write(old_block)
    cache.write_bytes(old_cache)
    r = cli(vault, "replicate", "vm", "--json")
    assert r.returncode == 0, r.stderr
    assert sha(rep) == sha(src)
    point = json.loads(r.stdout)["point_id"]
    r = cli(vault, "materialize", "vm", "--point", str(point), "--to", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert sha(tmp_path / "m" / "rep.img") == sha(src)


def test_swapped_caches_do_not_damage_points(tmp_path):
    vault, rep_dir = tmp_path / "vault", tmp_path / "dr"
    init_vault(vault)
    rep_dir.mkdir()
    srcs = [tmp_path / f"{n}.img" for n in "ab"]
    for s in srcs:
        s.write_bytes(os.urandom(4 * MiB))
    assert cli(vault, "protect", "vm", *sum((["--disk", f"{s}={rep_dir / s.name}"]
                                             for s in srcs), [])).returncode == 0
    history = {}
    for n in range(2):
        for s in srcs:
            with open(s, "r+b") as f:
                f.seek(n * MiB)
                f.write(os.urandom(8192))
        r = cli(vault, "replicate", "vm", "--json")
        assert r.returncode == 0, r.stderr
        history[json.loads(r.stdout)["point_id"]] = [sha(s) for s in srcs]
    caches = vault / "cache" / "vm"
    a, b = (caches / "0.sig").read_bytes(), (caches / "1.sig").read_bytes()
    (caches / "0.sig").write_bytes(b)
    (caches / "1.sig").write_bytes(a)
    r = cli(vault, "replicate", "vm", "--json")
    assert r.returncode == 0, r.stderr
    history[json.loads(r.stdout)["point_id"]] = [sha(s) for s in srcs]
    assert status(vault)["damaged_points"] == []
    for point, digests in history.items():
        out = tmp_path / f"m{point}"
        assert cli(vault, "materialize", "vm", "--point", str(point), "--to", out).returncode == 0
        assert [sha(out / s.name) for s in srcs] == digests

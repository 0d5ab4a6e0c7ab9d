"""Point stores (pydr.dr.pointstores): the one function that picks an item's
kind, the protect rules each kind sets, and the error a caller gets when it
asks for a capability the item's kind lacks. No object store is reached
here: picking a kind and refusing a capability need none (test_s3 runs the
chunk index against a real S3 server)."""

import os

import pytest

from conftest import run_cli
from pydr.dr import pointstores
from pydr.dr.pointstores import point_store
from pydr.dr.pointstores.base import PointStore, files_at
from pydr.dr.pointstores.chunkindex import ChunkIndex
from pydr.dr.pointstores.stepchain import StepChain
from pydr.dr.vault import Vault, init_vault
from pydr.endpoints import open_endpoint
from pydr.errors import EXIT_UNSUPPORTED, UnknownName, UnsupportedFile

BUCKET = "s3://pydr-test-bucket/site-b"


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    """protect opens (or makes) an item's object store before it records the
    item (pydr.dr.objectstore.prepare_store, against Swift in
    test_s3_crypt): here it is stood in for by an unencrypted store, and
    every call is checked to name the item's store."""
    from pydr.dr import objectstore

    def prepare_store(vault, spec, *, encrypt=True):
        assert spec.startswith("s3://") and "#" not in spec and encrypt
        return ("0" * 32, "none")

    monkeypatch.setattr(objectstore, "prepare_store", prepare_store)


@pytest.fixture
def vault(tmp_path):
    """A vault with a step-chain item (web) and a chunk-index item (db)."""
    for n in ("web", "db"):
        with open(tmp_path / f"{n}.img", "wb") as f:
            f.truncate(1 << 20)
    init_vault(tmp_path / "vault")
    with Vault(tmp_path / "vault", writer=True) as v:
        v.protect("web", [(str(tmp_path / "web.img"), str(tmp_path / "dr" / "web.img"))])
        v.protect("db", [(str(tmp_path / "db.img"), BUCKET)])
        yield v


def test_point_store_picks_the_kind_from_the_replicas(vault):
    web, db = point_store(vault.store, "web"), point_store(vault.store, "db")
    assert type(web) is StepChain and web.name == "web" and web.vault is vault.store
    assert type(db) is ChunkIndex and db.name == "db"
    # an object-store replica is recorded by item and file name
    assert vault.disks("db")[0]["replica"] == f"{BUCKET}#db/db.img"


def test_points_left_in_an_object_store_keep_the_chunk_index(vault, tmp_path):
    """After a failover downloaded db's point, its replica is a local disk,
    and its points are still indexes in the store until commit: the chunk
    index still holds it. Once the indexes are gone (commit), the step chain
    does (reprotect replicates it like any local disk)."""
    local = str(tmp_path / "up" / "db.img")
    with vault.db:  # what failover leaves: the disk moved, the point's index recorded
        vault.db.execute("UPDATE disks SET replica=? WHERE item='db'", (local,))
        vault.set_item("db", state="failed-over", failover_dir=str(tmp_path / "up"))
        vault.db.execute("INSERT INTO object_indexes(item, point, store, key, bytes) "
                         "VALUES ('db', 1, ?, ?, 0)",
                         (BUCKET, "dr/indexes/db/x.pidx"))
    assert type(point_store(vault.store, "db")) is ChunkIndex
    with vault.db:  # what commit leaves
        vault.db.execute("DELETE FROM object_indexes WHERE item='db'")
    assert type(point_store(vault.store, "db")) is StepChain


def test_point_store_of_an_unknown_item(vault):
    with pytest.raises(UnknownName, match="nope"):
        point_store(vault.store, "nope")


def test_capabilities_are_asked_for_not_kinds(vault):
    web, db = point_store(vault.store, "web"), point_store(vault.store, "db")
    assert web.can("verify") and db.can("verify")
    assert db.can("collect_garbage") and not web.can("collect_garbage")
    with pytest.raises(ValueError, match="no point store capability named 'gc'"):
        web.can("gc")
    assert db.require("collect_garbage") == db.collect_garbage


def test_a_missing_capability_names_the_item_and_its_kind(vault):
    with pytest.raises(UnsupportedFile) as err:
        vault.collect_garbage("web")
    assert "item 'web'" in str(err.value) and "step chain" in str(err.value)
    assert "collect garbage" in str(err.value) and err.value.path == vault.dir
    assert err.value.exit_code == EXIT_UNSUPPORTED


def test_gc_of_a_step_chain_item_on_the_command_line(vault, tmp_path):
    r = run_cli("gc", "web", "--vault", tmp_path / "vault")
    assert r.returncode == EXIT_UNSUPPORTED, r.stderr
    assert b"'web'" in r.stderr and b"step chain" in r.stderr and b"Traceback" not in r.stderr


class _NoVerify(PointStore):
    """A kind without the verify capability, for the test below."""

    kind = "test kind"

    @classmethod
    def holds(cls, vault, name):
        return name == "web"


def test_a_new_kind_is_one_line_in_kinds(vault, monkeypatch):
    """A kind added to KINDS is picked, and the workflow (Vault.verify)
    refuses what it cannot do by asking for the capability."""
    monkeypatch.setattr(pointstores, "KINDS", (_NoVerify,) + pointstores.KINDS)
    assert type(point_store(vault.store, "web")) is _NoVerify
    assert type(point_store(vault.store, "db")) is ChunkIndex
    with pytest.raises(UnsupportedFile, match="item 'web' keeps its points in a test kind, "
                                              "which cannot check"):
        vault.verify("web")


def test_protect_rules_of_a_chunk_index(vault, tmp_path):
    for n in ("a", "other"):
        (tmp_path / f"{n}.img").write_bytes(b"\0" * 4096)
    src, other = str(tmp_path / "a.img"), tmp_path / "other.img"
    with pytest.raises(ValueError, match="all in one object store, or none is"):
        vault.protect("mixed", [(src, BUCKET), (str(other), str(tmp_path / "dr" / "o.img"))])
    with pytest.raises(ValueError, match="all in one object store, or none is"):
        vault.protect("two", [(src, BUCKET), (str(other), "s3://another-bucket/x")])
    with pytest.raises(ValueError, match="needs a raw file or block device as its source"):
        vault.protect("tracked", [(str(other), BUCKET)], cbt=True)
    assert not {"mixed", "two", "tracked"} & set(vault.items())
    assert not os.path.exists(tmp_path / "dr" / "o.img")


def test_a_step_chain_needs_a_place_with_files(tmp_path):
    """Materialise, drill clean-up, overlays: asked of the replica's place as
    a capability; an NBD export has none, and says so by name."""
    nbd = open_endpoint("nbd://127.0.0.1:1/export")
    with pytest.raises(UnsupportedFile, match="no files beside it") as err:
        files_at(nbd)
    assert err.value.path == nbd.spec
    here = open_endpoint(str(tmp_path / "disk.img"))
    assert files_at(here) is here


def test_records_of_two_kinds_are_refused(vault, tmp_path):
    """A replica spec edited in the vault to another kind: point_store
    refuses the item (VaultDamaged, exit 14, naming it) instead of sending
    a cycle or a restore to the other kind's place."""
    from pydr.errors import EXIT_VAULT, VaultDamaged

    def refused(name, why):
        with pytest.raises(VaultDamaged, match=why) as err:
            point_store(vault.store, name)
        assert f"item {name!r}" in str(err.value) and err.value.exit_code == EXIT_VAULT

    with vault.db:  # a step-chain item with a step, edited to s3://
        vault.db.execute("INSERT INTO steps(item, idx, step, path, bytes) "
                         "VALUES ('web', 0, 1, '/x/0-1.undo', 1)")
        vault.db.execute("UPDATE disks SET replica=? WHERE item='web'", (f"{BUCKET}#web/web.img",))
    refused("web", "undo steps of its disks")
    with vault.db:  # ... with a point but no step yet
        vault.db.execute("DELETE FROM steps WHERE item='web'")
        vault.db.execute("INSERT INTO points(id, item, created, consistency, bytes, cut) "
                         "VALUES (5, 'web', 0, 'crash-consistent', 0, 'none')")
    refused("web", r"points \[5\] have no point index")
    # an object-store item with a point, one disk edited to a local path (its source!)
    with vault.db:
        vault.db.execute("INSERT INTO points(id, item, created, consistency, bytes, cut) "
                         "VALUES (6, 'db', 0, 'crash-consistent', 0, 'none')")
        vault.db.execute("INSERT INTO object_indexes(item, point, store, key, bytes) "
                         "VALUES ('db', 6, ?, 'k.pidx', 0)", (BUCKET,))
    assert type(point_store(vault.store, "db")) is ChunkIndex
    with vault.db:
        vault.db.execute("UPDATE disks SET replica=? WHERE item='db'", (str(tmp_path / "db.img"),))
    refused("db", "not in an object store, nor where a failover brought its points up")
    # failed over, but the replica is not in the failover's directory
    vault.set_item("db", state="failed-over", failover_dir=str(tmp_path / "up"))
    refused("db", "nor where a failover brought its points up")
    with vault.db:
        vault.db.execute("UPDATE disks SET replica=? WHERE item='db'",
                         (str(tmp_path / "up" / "db.img"),))
    assert type(point_store(vault.store, "db")) is ChunkIndex  # what a failover leaves


def test_a_group_is_all_in_an_object_store_or_none_is(vault, tmp_path):
    """A group's cycle makes one point of one kind: protect refuses an item
    of the other kind into it (ValueError: exit 2), and records nothing."""
    for n in ("f", "o", "f2"):
        (tmp_path / f"{n}.img").write_bytes(b"\0" * 4096)
    vault.protect("f", [(str(tmp_path / "f.img"), str(tmp_path / "dr" / "f.img"))], group="g")
    with pytest.raises(ValueError, match="item 'f' of the group is not, this one is"):
        vault.protect("o", [(str(tmp_path / "o.img"), BUCKET)], group="g")
    assert not vault.has_item("o")
    vault.protect("o", [(str(tmp_path / "o.img"), BUCKET)], group="h")  # a group of its own
    with pytest.raises(ValueError, match="item 'o' of the group is, this one is not"):
        vault.protect("f2", [(str(tmp_path / "f2.img"), str(tmp_path / "dr" / "f2.img"))],
                      group="h")


@pytest.mark.parametrize("method", ["qcow2", "reflink"])
def test_an_object_store_refuses_a_method_it_cannot(vault, tmp_path, method):
    db = point_store(vault.store, "db")
    dest = open_endpoint(str(tmp_path / "m" / "db.img"))
    for call in (lambda: db.materialize_disk(1, vault.disks("db")[0], dest, method=method),
                 lambda: db.bring_up_disk(1, vault.disks("db")[0], method=method)):
        with pytest.raises(UnsupportedFile, match=f"never made by {method}") as err:
            call()
        assert err.value.exit_code == EXIT_UNSUPPORTED and "'db'" in str(err.value)
    assert not (tmp_path / "m").exists()


def test_an_io_error_checking_a_step_names_it(vault, tmp_path, monkeypatch):
    """A disk that fails a read of a local undo step: the OSError names the
    step's file (the CLI prints it), not a bare "Input/output error"."""
    import errno

    from pydr.dr.pointstores import steps as S

    step = tmp_path / "0-1.undo"
    step.write_bytes(b"x" * 100)
    with vault.db:
        vault.db.execute("INSERT INTO steps(item, idx, step, path, bytes) "
                         "VALUES ('web', 0, 1, ?, 0)", (str(step),))
    row = vault.db.execute("SELECT step, path, bytes, digest FROM steps WHERE item='web'").fetchone()

    def eio(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(S.J, "check_step", eio)
    with pytest.raises(OSError) as err:
        S.check_step(vault.store, "web", 0, row)
    assert err.value.errno == errno.EIO and err.value.filename == str(step)

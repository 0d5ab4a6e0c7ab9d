"""What the review of the merged tree found in the labels of points and at
protect's door, each held by one test:

* review1 #3: a point of several disks -- an item's, or a group's members'
  -- is cut one disk at a time (one FICLONE, one QMP transaction or one
  bitmap per disk): never "crash-consistent", which promises one instant.
  It is "disk-consistent" (app-consistent with hooks); the schema-9
  migration relabels the points older code labelled so.
* review1 #8: item, group and plan names are checked (InvalidArgument
  naming what is allowed).
* review1 #9: a path that is not UTF-8 is refused at protect, naming it,
  and no protect job is left running.
* review2 U4 (protect): a replica that is its source, a relative remote
  replica, disks given as a dict: InvalidArgument naming what is expected.
"""

import os
import sqlite3
import subprocess

import pytest

from pydr.dr.rpo import CONSISTENCIES, consistency_of, weakest
from pydr.dr.vault import Vault, init_vault
from pydr.errors import InvalidArgument, UnknownName

from conftest import pydr_command, run_cli
from test_rpo import PickledExecutor  # a fleet worker's pickled task, in-process

MiB = 1 << 20


def random_file(path, size=MiB):
    path.write_bytes(os.urandom(size))
    return path


def labels(v, name):
    return [(p.cut, p.consistency) for p in v.points(name)]


# -- review1 #3: several disks are not cut at one instant ------------------------------------

def test_several_disks_cut_one_by_one_are_disk_consistent_not_crash_consistent(xfs_dir,
                                                                               tmp_path):
    """XFS (reflink): one disk alone is crash-consistent; an item of two
    disks, a local group of two items and a fleet's group (each member a
    task) are cut disk by disk: "disk-consistent", which a cycle's result
    gives as its weakest label. With hooks held over every cut:
    app-consistent."""
    init_vault(tmp_path / "v")
    hooks = {"quiesce_hook": "true", "thaw_hook": "true"}
    with Vault(tmp_path / "v", writer=True) as v:
        disk = lambda n: (random_file(xfs_dir / f"{n}.img"), xfs_dir / f"r-{n}.img")  # noqa: E731
        v.protect("one", [disk("one")])
        v.protect("two", [disk("two0"), disk("two1")])
        v.protect("ga", [disk("ga")], group="g")
        v.protect("gb", [disk("gb")], group="g")
        v.protect("fa", [disk("fa")], group="f")
        v.protect("fb", [disk("fb")], group="f")
        v.protect("hooked", [disk("h0"), disk("h1")], **hooks)

        assert v.replicate("one").consistency == "crash-consistent"
        assert labels(v, "one") == [("reflink", "crash-consistent")]

        assert v.replicate("two").consistency == "disk-consistent"
        assert labels(v, "two") == [("reflink", "disk-consistent")]

        result = v.replicate("g")
        assert result.consistency == "disk-consistent"
        assert labels(v, "ga") == labels(v, "gb") == [("reflink", "disk-consistent")]

        result = v.replicate("f", executor=PickledExecutor())
        assert result.consistency == "disk-consistent" and not result.failed
        assert labels(v, "fa") == labels(v, "fb") == [("reflink", "disk-consistent")]

        result = v.replicate("hooked", app_consistent=True)
        assert result.consistency == "app-consistent"
        assert labels(v, "hooked") == [("reflink", "app-consistent")]

        # a call of several units: the weakest label of what it recorded
        assert v.replicate(["one", "two"]).consistency == "disk-consistent"
    assert [consistency_of(c, hooks_ran=False, disks=2) for c in ("reflink", "fleece",
                                                                  "bitmap", "none")] == \
        ["disk-consistent"] * 3 + ["inconsistent"]
    assert consistency_of("bitmap", hooks_ran=True, disks=3) == "app-consistent"
    assert consistency_of("fleece", hooks_ran=False, disks=1) == "crash-consistent"
    assert weakest(["crash-consistent", "disk-consistent", "app-consistent"]) == \
        "disk-consistent"
    assert CONSISTENCIES.index("inconsistent") < CONSISTENCIES.index("disk-consistent") \
        < CONSISTENCIES.index("crash-consistent")


def test_the_schema_9_migration_relabels_points_of_several_disks(tmp_path):
    """A vault as schema 8 left it (the columns of 9 dropped, every point
    without hooks labelled crash-consistent): points of an item of two
    disks, and of a group's members sharing a point id, become
    disk-consistent; one disk alone, items of no group sharing an id (an
    --all call: separate cuts, one disk each) and app-consistent points keep
    their label; cut "none" becomes inconsistent."""
    init_vault(tmp_path / "v")
    with Vault(tmp_path / "v", writer=True) as v:
        disk = lambda n: (random_file(tmp_path / f"{n}.img"), tmp_path / f"r-{n}.img")  # noqa
        v.protect("one", [disk("one")])
        v.protect("two", [disk("two0"), disk("two1")])
        v.protect("ga", [disk("ga")], group="g")
        v.protect("gb", [disk("gb")], group="g")
        v.protect("u1", [disk("u1")])
        v.protect("u2", [disk("u2")])
        v.protect("hooked", [disk("h0"), disk("h1")])
    db = sqlite3.connect(tmp_path / "v" / "vault.db")
    rows = [(1, "one", "crash-consistent", "reflink"),
            (2, "two", "crash-consistent", "reflink"),
            (3, "two", "crash-consistent", "fleece"),
            (4, "ga", "crash-consistent", "reflink"), (4, "gb", "crash-consistent", "reflink"),
            (5, "ga", "crash-consistent", "reflink"),  # ga alone in its call: one disk
            (6, "u1", "crash-consistent", "reflink"), (6, "u2", "crash-consistent", "reflink"),
            (7, "hooked", "app-consistent", "reflink"),
            (8, "two", "crash-consistent", "none")]
    db.executemany("INSERT INTO points(id, item, created, consistency, bytes, cut) "
                   "VALUES (?, ?, 100.0, ?, 0, ?)", [(i, n, c, k) for i, n, c, k in rows])
    db.execute("ALTER TABLE points DROP COLUMN cut_at")
    db.execute("ALTER TABLE items DROP COLUMN last_success_at")
    db.execute("ALTER TABLE disks DROP COLUMN granularity")
    db.execute("ALTER TABLE items DROP COLUMN rpo_health")
    for table in ("policies", "alerts", "doomed_files", "object_stores"):
        db.execute(f"DROP TABLE {table}")
    db.execute("PRAGMA user_version=8")
    db.commit()
    db.close()
    with Vault(tmp_path / "v") as v:  # a reader migrates too
        got = {(p.id, p.item): p.consistency for n in ("one", "two", "ga", "gb", "u1", "u2",
                                                        "hooked") for p in v.points(n)}
    assert got == {(1, "one"): "crash-consistent",
                   (2, "two"): "disk-consistent", (3, "two"): "disk-consistent",
                   (4, "ga"): "disk-consistent", (4, "gb"): "disk-consistent",
                   (5, "ga"): "crash-consistent",
                   (6, "u1"): "crash-consistent", (6, "u2"): "crash-consistent",
                   (7, "hooked"): "app-consistent",
                   (8, "two"): "inconsistent"}


# -- review1 #8: names ------------------------------------------------------------------------

BAD_NAMES = ["..", ".", "a\nb", "web\x00x", "x" * 129, "-x", "a/b", "web db", "wéb", "", 5]


def test_item_group_and_plan_names_are_checked(tmp_path):
    """Refused with InvalidArgument naming what is allowed, nothing recorded
    (no item, no job, no directory under the vault); 128 characters of the
    allowed ones pass, and the CLI says the same with exit status 2."""
    init_vault(tmp_path / "v")
    src = random_file(tmp_path / "s.img")
    with Vault(tmp_path / "v", writer=True) as v:
        for bad in BAD_NAMES:
            with pytest.raises(InvalidArgument, match=r"an item's name must be 1 to 128 of the "
                               r"characters A-Z a-z 0-9 '\.' '_' '-'") as err:
                v.protect(bad, [(src, tmp_path / "r.img")])
            assert repr(bad)[:20] in str(err.value)
            with pytest.raises(InvalidArgument, match=r"a group's name must be 1 to 128"):
                v.protect("web", [(src, tmp_path / "r.img")], group=bad)
        assert v.items() == [] and v.jobs() == []
        good = "A-z.0_9-" + "x" * 120
        v.protect(good, [(src, tmp_path / "r.img")], group="g.1")
        assert [r.name for r in v.store.item_records()] == [good]
        for bad in BAD_NAMES + ["x" * 5000]:
            with pytest.raises(InvalidArgument, match=r"a plan's name must be 1 to 128"):
                v.create_plan(bad, [[good]])
            if isinstance(bad, str) and bad:
                with pytest.raises(UnknownName):
                    v.plan(bad)  # nothing was recorded
        v.create_plan("shop.v1-2_x", [[good]])
        assert v.plan("shop.v1-2_x").definition[0]["items"] == [good]
    assert sorted(os.listdir(tmp_path / "v" / "undo")) == []
    r = run_cli("protect", "..", "--disk", f"{src}={tmp_path / 'r2.img'}", "--vault",
                tmp_path / "v")
    assert r.returncode == 2 and b"an item's name must be" in r.stderr, r.stderr


# -- review1 #9: a path that is not UTF-8 -----------------------------------------------------

def test_a_path_that_is_not_utf8_is_refused_naming_it(tmp_path, monkeypatch):
    """os.fsdecode of bytes that are not UTF-8 gives a str the vault cannot
    store: InvalidArgument naming it (its repr) and the argument, before a
    job starts; nothing recorded. A failure after the protect job started
    ends the job (failed), never leaves it running."""
    init_vault(tmp_path / "v")
    src = random_file(tmp_path / "s.img")
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/rep\xff\xfe.img")
    with Vault(tmp_path / "v", writer=True) as v:
        with pytest.raises(InvalidArgument, match="the replica of disk 0 .* is not UTF-8") as err:
            v.protect("web", [(src, bad)])
        assert repr(bad) in str(err.value) and err.value.path == bad
        with pytest.raises(InvalidArgument, match="the source of disk 0 .* is not UTF-8"):
            v.protect("web", [(bad, tmp_path / "r.img")])
        with pytest.raises(InvalidArgument, match="holds a NUL"):
            v.protect("web", [(src, str(tmp_path / "r\x00.img"))])
        with pytest.raises(InvalidArgument, match="the quiesce hook") as err:
            v.protect("web", [(src, tmp_path / "r.img")], quiesce_hook="echo \udcff SECRET",
                      thaw_hook="true")
        assert "SECRET" not in str(err.value)  # a hook's command line is never shown
        assert v.items() == [] and v.jobs() == []

        def broken(*args, **kwargs):
            raise OSError(5, "Input/output error", str(tmp_path / "v" / "vault.db"))

        monkeypatch.setattr(v.store, "add_item", broken)
        with pytest.raises(OSError):
            v.protect("web", [(src, tmp_path / "r.img")])
        job, = v.jobs()
        assert (job.kind, job.item, job.state) == ("protect", "web", "failed")
        assert "Input/output error" in job.error
        monkeypatch.undo()
        assert v.items() == []
        v.protect("web", [(src, tmp_path / "r.img")])  # the same call again
        assert [j.state for j in v.jobs()] == ["succeeded", "failed"]
    # the CLI: exit status 2, the path named (escaped), nothing recorded
    r = subprocess.run(pydr_command() + [b"protect", b"db", b"--disk",
                                         os.fsencode(src) + b"=" + os.fsencode(bad),
                                         b"--vault", os.fsencode(tmp_path / "v")],
                       capture_output=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert b"the replica of disk 0 " in r.stderr and b"rep\\udcff\\udcfe.img" in r.stderr
    assert b"is not UTF-8 text" in r.stderr
    with Vault(tmp_path / "v") as v:
        assert [r.name for r in v.store.item_records()] == ["web"] and len(v.jobs()) == 2


# -- review2 U4: protect's arguments ----------------------------------------------------------

def test_protect_refuses_bad_disks_naming_what_is_expected(tmp_path):
    init_vault(tmp_path / "v")
    src = random_file(tmp_path / "s.img")
    with Vault(tmp_path / "v", writer=True) as v:
        cases = [
            ([(src, src)], r"replica .*s\.img is the source disk itself: a replica is another "
                           r"file or device"),
            ([(src, "localhost:rel/r.img")], r"remote replica localhost:rel/r\.img needs an "
                                             r"absolute path: expected \[user@\]host:/PATH"),
            ({str(src): str(tmp_path / "r.img")}, r"disks must be a list of \(source, "
                                                  r"replica\) pairs, each a str or "
                                                  r"os\.PathLike path, not a dict"),
            ((str(src), str(tmp_path / "r.img")), r"disk 0 is '.*s\.img': expected a "
                                                  r"\(source, replica\) pair"),
            ([(src, tmp_path / "r.img", "x")], r"disk 0 is .*: expected a \(source, replica\)"),
            ([(src, 5)], r"the replica of disk 0 must be a non-empty str, not 5"),
            ([], r"an item needs at least one disk"),
        ]
        for disks, says in cases:
            with pytest.raises(InvalidArgument, match=says):
                v.protect("web", disks)
        assert v.items() == [] and v.jobs() == []
    r = run_cli("protect", "two", "--disk", f"{src}={src}", "--vault", tmp_path / "v")
    assert r.returncode == 2 and b"is the source disk itself" in r.stderr

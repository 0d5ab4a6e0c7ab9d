"""The conformance suite of the point stores, in the manner of restic's
internal/backend/test: one table of stores (tests/pointstores.py: a local
file replica, a replica on an ssh host, a step chain materialised as qcow2
overlays, an S3 bucket), one set of cases, each run against every store
through the public surface (the `pydr` command) only:

* cycles with known writes, every point materialised exactly;
* a drill, and its clean-up leaves nothing;
* failover to a point, change-point to another, commit;
* retention: the dropped points' steps or objects are gone, the kept
  points exact;
* a cycle killed at each of its crash points, then run again: the point is
  exact and nothing is left that an uninterrupted cycle does not leave.

A case a store does not support asserts the store's clear refusal. Adding
a point store means passing these cases."""

import uuid

import pytest

from pointstores import (DISKS, STORES, FileStore, Item, Qcow2Store, S3Store, SshStore,
                         shape)
from test_s3 import swift  # noqa: F401  (the fixture: a Swift server)


@pytest.fixture(params=STORES)
def store(request, tmp_path):
    """Each point store, a fresh one per case."""
    kind = request.param
    if kind == "ssh":
        made = SshStore(tmp_path, request.getfixturevalue("sshd"))
    elif kind == "s3":
        made = S3Store(tmp_path, request.getfixturevalue("swift"), f"pydr-{uuid.uuid4().hex[:12]}")
    else:
        made = {"file": FileStore, "qcow2": Qcow2Store}[kind](tmp_path)
    yield made
    made.close()


def test_every_point_materialises_as_its_cycle_left_the_sources(store, tmp_path):
    """Three cycles with known writes between them: each point, made the
    store's way, reads byte for byte as the sources did at its cycle, and
    the store's own check finds nothing wrong."""
    item = Item(store)
    for _ in range(3):
        item.cycle()
    assert item.check_points(tmp_path / "out") == [1, 2, 3]
    assert len(set(map(tuple, item.history.values()))) == 3  # the writes changed every point
    report = store.ok("verify", "vm")
    assert report["problems"] == [] and report["points"] == 3


def test_a_drill_shows_its_point_and_its_cleanup_leaves_nothing(store, tmp_path):
    """A drill of point 1 while replication goes on (or, where the drill's
    overlays read the replicas, waits: refused, clearly); its clean-up
    removes the drill and leaves the footprint as the cycles made it."""
    item = Item(store)
    for _ in range(2):
        item.cycle()
    before = store.footprint()
    drills = tmp_path / "drills"
    res = store.ok("test-failover", "vm", "--to", store.place(drills / "vm"), "--point", "1",
                   *store.method)
    assert res["point"] == 1 and res["method"] in store.methods
    disks = [store.local(p) for p in res["paths"]]
    assert [store.read(d) for d in disks] == item.history[1]
    if store.overlays:  # a cycle would change the drill's disks under it
        item.change()
        r = store.cli("replicate", "vm")
        assert r.returncode == 15 and b"cleanup-test-failover" in r.stderr, r.stderr
        added = set()
    else:
        item.cycle()
        added = item.born[3]
    assert [store.read(d) for d in disks] == item.history[1]  # the drill is as it was
    assert item.status()["state"] == "protected"
    store.ok("cleanup-test-failover", "vm")
    assert not drills.exists() or list(drills.iterdir()) == []
    assert store.footprint() == before | added  # nothing left beside the replicas or in the store


def test_failover_to_a_point_change_point_then_commit(store, tmp_path):
    """A failover the store cannot do is refused; failover to point 1, the
    machine writes at site B, change-point to point 2 (exact: made again
    from what the points were made on), commit: the disks stay, and
    nothing any point needed is left."""
    item = Item(store)
    for _ in range(2):
        item.cycle()
    before = store.footprint()
    options, says = store.refused_failover(tmp_path / "up")
    r = store.cli("failover", "vm", "--point", "1", *options)
    assert r.returncode == 2 and says in r.stderr, r.stderr  # a usage error, nothing done
    assert item.status()["state"] == "protected" and store.footprint() == before
    assert not (tmp_path / "up").exists()
    res = store.ok("failover", "vm", "--point", "1", *store.failover_options(tmp_path / "up"),
                   *store.method)
    assert res["point"] == 1 and res["method"] in store.methods
    disks = [store.local(d["replica"]) for d in item.status()["disks"]]
    assert [d.rsplit("/", 1)[1] for d in disks] == list(DISKS)
    assert [store.read(d) for d in disks] == item.history[1]
    for n, d in enumerate(disks):
        store.machine_writes(d, 50 + n)  # the machine works at site B
    res = store.ok("change-point", "vm", "--point", "2")
    assert res["point"] == 2 and res["method"] in store.methods  # made as the failover made them
    assert [store.read(d) for d in disks] == item.history[2]
    res = store.ok("commit", "vm")
    st = item.status()
    assert (st["state"], st["direction"]) == ("failover-committed", "reverse")
    assert item.points() == []
    if store.overlays:  # flattened: each disk one raw file again
        assert all(open(d, "rb").read(4) != b"QFI\xfb" for d in disks)
    assert [store.read(d) for d in disks] == item.history[2]
    if store.collects_garbage:  # commit drops the indexes; gc sweeps their chunks
        store.ok("gc", *store.garbage_options(), "--grace", "0")
    # nothing a point needed is left: no step, baseline, index or chunk
    assert store.footprint() <= item.without_points(), store.footprint() - item.without_points()


def test_retention_drops_what_only_the_dropped_points_needed(store, tmp_path):
    """Retention 2 over three cycles: the footprint is exactly what the
    kept points need (Store.needed: by the names each cycle added), and
    they are exact. Only an object store collects garbage; a step chain
    refuses gc clearly (exit 10: the item's kind cannot)."""
    item = Item(store, retention=2)
    for _ in range(3):
        item.cycle()
    assert item.points() == [2, 3]
    if store.collects_garbage:
        store.ok("gc", *store.garbage_options(), "--grace", "0")
    else:  # a step chain has no garbage: its steps go with the points
        r = store.cli("gc", "vm")
        assert r.returncode == 10 and b"step chain" in r.stderr and b"vm" in r.stderr, r.stderr
    expected = set().union(*(item.born[c] for c in store.needed(2, 3)))
    assert store.footprint() == expected, (store.footprint() - expected,
                                           expected - store.footprint())
    assert item.check_points(tmp_path / "out") == [2, 3]


#: the crash points of a cycle this suite kills at (the engine's own, inside
#: each disk's transfer, are the crash matrix's)
CYCLE_POINTS = ("cycle.", "s3.", "retention.")


def test_a_cycle_killed_at_each_crash_point_is_finished_by_running_it_again(store, tmp_path):
    """Killed at each crash point of a cycle, the same command finishes it:
    the item is protected and healthy, and the point before the kill and
    the new one are exact (what the killed cycle kept is adopted). Retention
    2 keeps the footprint's shape from the second cycle on: after the kills
    and one more cycle, whose retention drops what the last rerun adopted
    for the point before it, the shape is the one an uninterrupted cycle
    leaves (no half-made step, journal, pending log or index that nothing
    names)."""
    item = Item(store, retention=2)
    item.cycle()
    item.change()
    log = tmp_path / "points.log"
    store.ok("replicate", "vm", env={"PYDR_CRASH_LOG": str(log)})
    item.cycles += 1
    item.history[item.cycles] = item.now()
    steady = shape(store.footprint() - store.garbage())
    passed = [p for p in log.read_text().split() if p.startswith(CYCLE_POINTS)]
    assert {"cycle.cut", "cycle.disk", "cycle.point", "cycle.done"} <= set(passed), passed
    for kill in dict.fromkeys(passed):  # each point once, in the order a cycle passes them
        item.change()
        item.cycles += 1
        r = store.cli("replicate", "vm", env={"PYDR_CRASH_AT": kill})
        assert r.returncode == -9, (kill, r.returncode, r.stderr.decode())
        st = item.status()
        if st["latest_point"] == item.cycles:  # killed after its point was recorded
            item.history[item.cycles] = item.now()
            item.cycles += 1
        else:
            op = st["operation"]
            assert op["interrupted"] and op["command"] == "pydr replicate vm", (kill, op)
        res = store.ok("replicate", "vm")
        assert res["point_id"] == item.cycles, (kill, res)
        item.history[item.cycles] = item.now()
        st = item.status()
        assert (st["state"], st["health"], st["operation"], st["point_count"]) == (
            "protected", "ok", None, 2), (kill, st)
        item.check_points(tmp_path / "out" / kill, [item.cycles - 1, item.cycles])
    item.cycle()
    left = shape(store.footprint() - store.garbage())
    assert left == steady, (left - steady, steady - left)
    if store.collects_garbage:  # and no chunk is left that no point needs
        store.ok("gc", *store.garbage_options(), "--grace", "0")
        assert len(store.garbage()) == len(item.points()) * len(DISKS), store.garbage()

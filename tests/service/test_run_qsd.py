"""`pydr run` end to end on a live disk: qemu-storage-daemon holds a tracked
qcow2 disk, a writer process writes numbered, checksummed records into it
through NBD, and the tests wait on the service's event lines (never on
time) for a point whose cut is after a known record; that point
materialises exactly the writer's data up to it. And a failover of one of
two items while it runs pauses that item only; reprotect resumes it."""

import json
import shutil
import signal

import pytest

from pydr.dr.vault import Vault

from qemuhelp import cli

from service_fixtures import (finished, materialize, needs_qemu, points,  # noqa: F401
                              protect_file, protected_qsd, qsd_disk, services, set_target,
                              writer_factory)
from writer import RECORD, check_point, expected_image, read_log, record, verify

pytestmark = needs_qemu


def one_cycle(vault):
    r = cli(vault, "replicate", "vm", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_writer_and_its_verifier_on_a_one_shot_cycle(protected_qsd, writer_factory, tmp_path):
    """The harness itself: records 1..N written through NBD are what a
    point taken after the writer stopped holds, and the verifier finds a
    damaged record, a missing one and one too many."""
    disk, vault, replica = protected_qsd
    w = writer_factory(disk, seed=5)
    n, stopped_at = w.stop(40)
    assert n >= 40
    res = one_cycle(vault)
    (p,) = [p for p in points(vault, "vm") if p.id == res["point_id"]]
    assert p.cut_at.timestamp() > stopped_at
    path = materialize(vault, "vm", p.id, tmp_path / "m")
    verify(path, 5, n)
    log = read_log(w.log)
    assert [line.seq for line in log] == list(range(1, n + 1))
    assert check_point(path, 5, log, p.cut_at.timestamp(), p.created_at.timestamp()) == n
    with pytest.raises(AssertionError, match="want"):
        verify(path, 5, n - 1)  # record n is one the verifier did not expect
    with pytest.raises(AssertionError, match="want"):
        verify(path, 5, n + 1)  # and n + 1 is missing
    with open(path, "r+b") as f:  # one byte of the last record damaged
        f.seek(log[-1].offset + 1000)
        b = f.read(1)
        f.seek(log[-1].offset + 1000)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(AssertionError, match=f"offset {log[-1].offset}: record {n} is damaged"):
        verify(path, 5, n)
    # the writer goes on where it stopped
    w.go()
    m, _ = w.stop(n + 10)
    assert m >= n + 10
    one_cycle(vault)
    newest = points(vault, "vm")[-1]
    verify(materialize(vault, "vm", newest.id, tmp_path / "m2"), 5, m)
    expected = expected_image(5, disk.size, m)
    with open(replica, "rb") as f:
        assert f.read() == bytes(expected)
    assert record(5, 1, 0)[:8] == b"PYDRWREC" and len(record(5, 1, 0)) == RECORD


def point_of(event):
    """The point id a replicate "finished" event names ("point 7")."""
    word, pid = event["message"].split()
    assert word == "point"
    return int(pid)


def test_pydr_run_makes_a_point_after_the_writer_stops_that_holds_exactly_its_data(
        protected_qsd, writer_factory, services, tmp_path):
    """Target 2 s; the writer writes 64 KiB records at 2 MiB/s while pydr
    run makes points; the writer stops at N; the first point whose cut is
    after N's flush holds exactly records 1..N, and every point made while
    it wrote holds every record flushed before its cut."""
    disk, vault, _ = protected_qsd
    set_target(vault, "vm", 2)
    w = writer_factory(disk, seed=11, rate=2)
    s = services(vault)
    during = [point_of(s.wait_for(finished("vm"))) for _ in range(3)]
    n, stopped_at = w.stop()
    while True:
        pid = point_of(s.wait_for(finished("vm")))
        (p,) = [p for p in points(vault, "vm") if p.id == pid]
        if p.cut_at.timestamp() > stopped_at:
            break
        during.append(pid)
    s.signal(signal.SIGTERM)
    assert s.drain() == 0, s.proc.stderr.read().decode()
    assert n > 0
    verify(materialize(vault, "vm", p.id, tmp_path / "after"), 11, n)
    log = read_log(w.log)
    kept = {q.id: q for q in points(vault, "vm")}
    covered = []
    for pid in during:
        if pid in kept:  # retention may have thinned it
            q = kept[pid]
            path = materialize(vault, "vm", pid, tmp_path / f"p{pid}")
            covered.append(check_point(path, 11, log, q.cut_at.timestamp(),
                                       q.created_at.timestamp()))
            shutil.rmtree(tmp_path / f"p{pid}")
    # the points made while it wrote cover more and more of its records
    assert covered and covered == sorted(set(covered)) and 0 < covered[-1] <= n, covered


def newest_job(vault, item, kind):
    with Vault(vault) as v:
        return max(j.id for j in v.jobs(item=item) if j.kind == kind)


def test_a_failover_pauses_that_item_the_other_goes_on_and_reprotect_resumes_it(
        protected_qsd, writer_factory, services, tmp_path):
    """Two items under pydr run: "vm" (the live disk, written meanwhile) and
    "b" (a file disk). `pydr failover b` while it runs waits for the
    service's lock, then b is paused (no cycle of b after it, its RPO health
    "paused") while vm keeps getting points; commit and reprotect b: its
    cycles come back."""
    disk, vault, _ = protected_qsd
    protect_file(vault, str(tmp_path), "b")
    set_target(vault, "vm", 2)
    set_target(vault, "b", 2)
    writer_factory(disk, seed=41, rate=1)
    s = services(vault)
    s.wait_for(finished("b"))
    r = cli(vault, "failover", "b", "--point", "latest-processed")
    assert r.returncode == 0, r.stderr
    failover_job = newest_job(vault, "b", "failover")
    # vm goes on: two of its cycles started after the failover's job
    later = []
    while len(later) < 2:
        e = s.wait_for(finished("vm"))
        if e["job"] > failover_job:
            later.append(e["job"])
    with Vault(vault) as v:
        assert v.item("b")["state"] == "failed-over"
        assert not [j for j in v.jobs(item="b") if j.kind == "replicate" and j.id > failover_job]
    st = json.loads(cli(vault, "status", "b", "--json").stdout)
    assert st["rpo_health"] == "paused", st
    for op in ("commit", "reprotect"):
        r = cli(vault, op, "b")
        assert r.returncode == 0, (op, r.stderr)
    reprotect_job = newest_job(vault, "b", "reprotect")
    while True:  # b is scheduled again
        e = s.wait_for(finished("b"))
        if e["job"] > reprotect_job:
            break
    s.signal(signal.SIGTERM)
    assert s.drain() == 0
    with Vault(vault) as v:
        assert v.item("b")["state"] == "protected"

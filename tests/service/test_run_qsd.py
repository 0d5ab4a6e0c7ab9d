"""`pydr run` end to end on a live disk: qemu-storage-daemon holds a tracked
qcow2 disk, a writer process writes numbered, checksummed records into it
through NBD, and the tests wait on the service's event lines (never on
time) for a point whose cut is after a known record; that point
materialises exactly the writer's data up to it."""

import json
import os
import shutil

import pytest

from qemuhelp import cli

from .conftest import (finished, materialize, needs_qemu, points, set_target)
from .writer import RECORD, check_point, expected_image, read_log, record, verify

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

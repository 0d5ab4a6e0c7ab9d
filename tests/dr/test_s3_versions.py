"""The versioned ObjectStore methods (pydr.endpoints.s3) against a real S3
server that keeps versions and Object Lock: SeaweedFS on 127.0.0.1
(tests/seaweed.py), started once for the module. Each test has a bucket of
its own."""

import time
import uuid

import pytest

from pydr.endpoints.s3 import ObjectStore
from seaweed import OTHER_KEY, OTHER_SECRET, seaweed  # noqa: F401 (the fixture)

DAY = 86400.0



def _store(seaweed, monkeypatch, *, lock):
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    bucket = f"pydr-{uuid.uuid4().hex[:12]}"
    seaweed.client().create_bucket(Bucket=bucket, **(
        {"ObjectLockEnabledForBucket": True} if lock else {}))
    return ObjectStore(f"s3://{bucket}/dr")


@pytest.fixture
def locked(seaweed, monkeypatch):
    """An ObjectStore in a fresh bucket with Object Lock (so versioned)."""
    return _store(seaweed, monkeypatch, lock=True)


@pytest.fixture
def plain(seaweed, monkeypatch):
    """An ObjectStore in a fresh bucket without versions or Object Lock."""
    return _store(seaweed, monkeypatch, lock=False)


def test_lock_configuration(locked, plain):
    assert locked.lock_configuration()["ObjectLockEnabled"] == "Enabled"
    assert plain.lock_configuration() is None


def test_put_returns_versions_and_get_reads_each(locked):
    key = locked.key("chunks", "k")
    v1 = locked.put(key, b"one")
    v2 = locked.put(key, b"two")
    assert v1 and v2 and v1 != v2
    assert locked.get(key) == b"two"
    assert locked.get(key, v1) == b"one"
    assert locked.get(key, v2) == b"two"
    assert locked.head(key, v1)["version"] == v1
    assert locked.head(key)["version"] == v2
    assert locked.head(key, v1)["retain_until"] is None


def test_unversioned_bucket_has_no_version(plain):
    key = plain.key("chunks", "k")
    assert plain.put(key, b"one") is None
    assert plain.head(key)["version"] is None
    assert [v[1:4] for v in plain.versions("chunks")] == [(None, True, False)]


def test_locked_version_survives_its_delete_an_overwrite_and_a_delete_marker(locked):
    key = locked.key("chunks", "k")
    until = time.time() + DAY
    v = locked.put(key, b"kept", lock=("compliance", until))
    head = locked.head(key, v)
    assert head["lock_mode"] == "compliance"
    assert abs(head["retain_until"] - until) < 2  # the server keeps whole seconds
    assert locked.delete_versions([(key, v)]) == [(key, v, "AccessDenied")]
    assert locked.delete_versions([(key, None)]) == []  # a delete marker: allowed
    assert locked.head(key) is None
    with pytest.raises(FileNotFoundError):
        locked.get(key)
    bad = locked.put(key, b"evil")
    assert locked.get(key) == b"evil"
    assert locked.get(key, v) == b"kept"
    kinds = sorted((ver == v, latest, marker) for _, ver, latest, marker, _, _ in
                   locked.versions("chunks"))
    # the attacker's version is the latest; below it the marker and the locked version
    assert kinds == [(False, False, True), (False, True, False), (True, False, False)]
    assert [x[1] for x in locked.versions("chunks") if x[2]] == [bad]


def test_unlocked_versions_are_deleted_for_good(locked):
    key = locked.key("chunks", "k")
    v = locked.put(key, b"free")
    assert locked.delete_versions([(key, v)]) == []
    assert list(locked.versions("chunks")) == []
    with pytest.raises(FileNotFoundError):
        locked.get(key, v)
    assert locked.delete_versions([(key, v)]) == []  # already gone: no error


def test_retention_extends_and_is_never_shortened(locked):
    key = locked.key("indexes", "i")
    until = time.time() + DAY
    v = locked.put(key, b"index", lock=("compliance", until))
    locked.set_retention(key, v, "compliance", until + DAY)
    assert abs(locked.head(key, v)["retain_until"] - (until + DAY)) < 2
    with pytest.raises(PermissionError):
        locked.set_retention(key, v, "compliance", until)
    assert abs(locked.head(key, v)["retain_until"] - (until + DAY)) < 2


def test_governance_lock_is_recorded(locked):
    key = locked.key("indexes", "g")
    v = locked.put(key, b"g", lock=("governance", time.time() + DAY))
    assert locked.head(key, v)["lock_mode"] == "governance"
    assert locked.delete_versions([(key, v)]) == [(key, v, "AccessDenied")]


def test_versions_pages_through_many(locked):
    for i in range(5):
        locked.put(locked.key("chunks", f"k{i}"), b"x")
        locked.put(locked.key("chunks", f"k{i}"), b"y")
    found = list(locked.versions("chunks"))
    assert len(found) == 10
    assert sum(1 for f in found if f[2]) == 5
    assert all(f[5] == 1 and f[4] > 0 for f in found)


def test_a_reader_cannot_lock(locked, monkeypatch):
    key = locked.key("chunks", "k")
    v = locked.put(key, b"x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", OTHER_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", OTHER_SECRET)
    reader = ObjectStore(locked.spec)
    assert reader.get(key, v) == b"x"
    with pytest.raises(PermissionError):
        reader.set_retention(key, v, "compliance", time.time() + DAY)

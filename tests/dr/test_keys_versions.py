"""Store keys in a versioned bucket, against a real S3 server that keeps
versions: SeaweedFS on 127.0.0.1 (tests/seaweed.py), started once for the
module. An attacker with the owner's credentials who overwrites or deletes
the key files and the config does not lock the owner out; the owner's own
`key remove` and `key passwd` do revoke (every version goes)."""

import json
import os
import uuid

import pytest

from conftest import run_cli
from pydr.dr import storekeys
from pydr.endpoints.s3 import ObjectStore
from pydr.errors import WrongPassphrase
from seaweed import seaweed  # noqa: F401 (the fixture)

OLD, NEW, THIRD = b"correct horse", b"battery staple", b"third one"



@pytest.fixture
def s3(seaweed, tmp_path, monkeypatch):
    env = seaweed.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = seaweed.client()
    bucket = f"pydr-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    url = f"s3://{bucket}/dr"
    files = {}
    for name, value in (("old", OLD), ("new", NEW), ("third", THIRD)):
        files[name] = tmp_path / f"{name}.pass"
        files[name].write_bytes(value)
    return {"env": dict(os.environ), "client": client, "bucket": bucket, "url": url,
            "objects": ObjectStore(url), "pass": files}


def master_of(keys):
    return bytes.fromhex(keys.export()["master"])


def opens(ctx, passphrase, expect_id=None):
    try:
        return master_of(storekeys.unlock(ctx["objects"], passphrase, expect_id=expect_id)[1])
    except WrongPassphrase:
        return None


def current(ctx):
    page = ctx["client"].list_objects_v2(Bucket=ctx["bucket"], Prefix="dr/")
    return sorted(o["Key"] for o in page.get("Contents", ()))


def test_an_attacker_overwriting_and_deleting_the_keys_does_not_lock_the_owner_out(s3):
    ctx = s3
    config, keys = storekeys.create_store(ctx["objects"], OLD)
    storekeys.add_key(ctx["objects"], keys, NEW)
    names = [k for k in current(ctx) if "/keys/" in k]
    assert len(names) == 2
    for name in names:  # overwritten with a key of the attacker's own making
        ctx["client"].put_object(Bucket=ctx["bucket"], Key=name, Body=json.dumps(
            {"version": 1, "id": name.rpartition("/")[2], "kind": "passphrase"}).encode())
    assert opens(ctx, OLD) == opens(ctx, NEW) == master_of(keys)
    for name in names + ["dr/config"]:  # then deleted: a delete marker on each
        ctx["client"].delete_object(Bucket=ctx["bucket"], Key=name)
    assert current(ctx) == []
    assert opens(ctx, OLD, expect_id=config.id) == master_of(keys)
    assert opens(ctx, THIRD, expect_id=config.id) is None
    # the owner's command works as well: a new key from the passphrase
    r = run_cli("key", "add", ctx["url"], "--passphrase-file", ctx["pass"]["new"],
                "--new-passphrase-file", ctx["pass"]["third"], env=ctx["env"], input=b"")
    assert r.returncode == 0, r.stderr
    assert opens(ctx, THIRD) == master_of(keys)


def test_the_owners_remove_and_passwd_revoke_every_version(s3):
    ctx = s3
    _, keys = storekeys.create_store(ctx["objects"], OLD)
    doomed = storekeys.add_key(ctx["objects"], keys, NEW).id
    r = run_cli("key", "remove", ctx["url"], doomed, "--passphrase-file", ctx["pass"]["old"],
                env=ctx["env"], input=b"")
    assert r.returncode == 0, r.stderr
    r = run_cli("key", "passwd", ctx["url"], "--passphrase-file", ctx["pass"]["old"],
                "--new-passphrase-file", ctx["pass"]["third"], env=ctx["env"], input=b"")
    assert r.returncode == 0, r.stderr
    versions = ctx["client"].list_object_versions(Bucket=ctx["bucket"], Prefix="dr/keys/")
    left = {v["Key"] for v in versions.get("Versions", []) + versions.get("DeleteMarkers", [])}
    assert len(left) == 1 and doomed not in "".join(left)  # the new key only
    assert opens(ctx, OLD) is None and opens(ctx, NEW) is None
    assert opens(ctx, THIRD) == master_of(keys)

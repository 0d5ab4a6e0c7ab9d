"""A libvirt domain whose replicas are in an object store (s3://, the Swift
fixture of tests/dr/test_s3.py): each cycle reads the backup job's export
whole, uploads the chunks the store lacks, and the point holds every record
the guest synced before its cut, with the domain's XML."""

import json
import os
import uuid

import boto3
import pytest

from guestkit import guest_kit, last_synced, verify_records  # noqa: F401
from libvirtd import libvirtd  # noqa: F401 (the fixture)

from pydr.dr.vault import Vault

from conftest import run_cli
from s3server import swift  # noqa: F401 (the fixture)
from test_libvirt_capture import guest, synced_after  # noqa: F401

PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def s3(swift, tmp_path):
    """A fresh bucket, the environment that points pydr at it (its store
    encrypted, pydr's default), a vault."""
    env = {**os.environ, **swift.env(), "PYDR_S3_ADDRESSING": "path",
           "PYDR_PASSPHRASE": PASSPHRASE}
    client = boto3.client("s3", endpoint_url=swift.endpoint, region_name="us-east-1",
                          aws_access_key_id=swift.access_key,
                          aws_secret_access_key=swift.secret_key)
    bucket = f"pydr-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    vault = tmp_path / "vault"
    assert run_cli("vault", "init", vault).returncode == 0
    return {"env": env, "url": f"s3://{bucket}/dr", "vault": str(vault)}


def cli(ctx, *args):
    r = run_cli(*args, "--vault", ctx["vault"], env=ctx["env"])
    r.stdout, r.stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    return r


def test_a_libvirt_domain_into_an_object_store(guest, s3, tmp_path):
    r = cli(s3, "protect", "vm", "--libvirt", guest.name, "--connect", guest.uri,
            "--to", s3["url"], "--json")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert done["disks"][0]["replica"] == s3["url"]
    r = cli(s3, "replicate", "vm", "--json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    synced = synced_after(guest, last_synced(guest.log))
    r = cli(s3, "replicate", "vm", "--json")
    assert r.returncode == 0, r.stderr
    second = json.loads(r.stdout)
    assert second["point_id"] > first["point_id"]
    with Vault(s3["vault"]) as v:
        row = v.store.point_machine("vm", second["point_id"])
        checkpoint = v.store.disks("vm")[0]["bitmap"]
    assert row is not None and json.loads(row.checkpoint)["name"] == checkpoint
    assert guest.libvirtd.virsh("checkpoint-list", guest.name, "--name").split() == [checkpoint]
    r = cli(s3, "test-failover", "vm", "--point", str(second["point_id"]), "--to",
            str(tmp_path / "drill"), "--json")
    assert r.returncode == 0, r.stderr
    (path,) = json.loads(r.stdout)["paths"]
    assert verify_records(path) >= synced

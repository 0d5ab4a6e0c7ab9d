"""The keys of an encrypted object store (pydr.dr.storekeys, `pydr key`),
against a real S3 server: OpenStack Swift with s3api on 127.0.0.1
(tests/s3server.py), started once for the module, a bucket of its own per
test. Store creation is the API's (protect calls it); the key commands run
as the installed `pydr`. The fine-grained cases, with an in-memory store:
tests/dr/test_keys_unit.py."""

import json
import os
import subprocess
import sys
import time
import uuid

import boto3
import pytest

from conftest import pydr_command, run_cli
from pydr.dr import keyrecovery, storekeys
from pydr.endpoints.s3 import ObjectStore
from pydr.errors import WrongPassphrase
from test_s3 import swift  # noqa: F401 (the fixture)


def master_of(keys):
    """The master key that DataKeys were made from."""
    return bytes.fromhex(keys.export()["master"])


OLD, NEW, THIRD = b"correct horse", b"battery staple", b"third one"



@pytest.fixture
def s3(swift, tmp_path, monkeypatch):
    """A fresh bucket, the environment that points pydr at it (also this
    process's, for the API), and passphrase files."""
    env = {**swift.env(), "PYDR_S3_ADDRESSING": "path"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("PYDR_PASSPHRASE", "PYDR_PASSPHRASE_FILE", "PYDR_NEW_PASSPHRASE",
              "PYDR_NEW_PASSPHRASE_FILE", "PYDR_RECOVERY_PASSPHRASE",
              "PYDR_RECOVERY_PASSPHRASE_FILE"):
        monkeypatch.delenv(k, raising=False)
    client = boto3.client("s3", endpoint_url=swift.endpoint, region_name="us-east-1",
                          aws_access_key_id=swift.access_key,
                          aws_secret_access_key=swift.secret_key)
    bucket = f"pydr-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    files = {}
    for name, value in (("old", OLD), ("new", NEW), ("third", THIRD)):
        files[name] = tmp_path / f"{name}.pass"
        files[name].write_bytes(value + b"\n")  # a trailing newline is not part of it
    url = f"s3://{bucket}/dr"
    return {"env": dict(os.environ), "client": client, "bucket": bucket, "url": url,
            "objects": ObjectStore(url), "tmp": tmp_path, "pass": files}


def cli(ctx, *args, env=None):
    return run_cli(*args, env={**ctx["env"], **(env or {})}, input=b"")  # stdin: no terminal


def ok(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if r.stdout.strip().startswith((b"{", b"[")) else r.stdout


def snapshot(ctx):
    """{key: ETag} of every object in the bucket."""
    page = ctx["client"].list_objects_v2(Bucket=ctx["bucket"])
    return {o["Key"]: o["ETag"] for o in page.get("Contents", ())}


def opens(ctx, passphrase):
    """The master key `passphrase` opens the store with, or None."""
    try:
        return master_of(storekeys.unlock(ctx["objects"], passphrase)[1])
    except WrongPassphrase:
        return None


def key_list(ctx):
    return ok(cli(ctx, "key", "list", ctx["url"], "--json"))


def flip(ctx, key, at):
    data = bytearray(ctx["client"].get_object(Bucket=ctx["bucket"], Key=key)["Body"].read())
    data[at] ^= 0x01
    ctx["client"].put_object(Bucket=ctx["bucket"], Key=key, Body=bytes(data))


def test_a_store_is_made_and_opens_with_its_passphrase_only(s3):
    ctx = s3
    config, keys = storekeys.create_store(ctx["objects"], OLD, label="ops")
    assert config.encrypted and config.chunk_id == "hmac-sha256-128" and len(config.id) == 32
    assert sorted(snapshot(ctx)) == sorted(["dr/config", f"dr/keys/{key_list(ctx)['keys'][0]['id']}"])
    listed = key_list(ctx)
    assert listed["store"] == ctx["url"] and listed["config"] == config.to_dict()
    [key] = listed["keys"]
    assert key["kind"] == "passphrase" and key["label"] == "ops" and key["problem"] is None
    assert key["url"] == f"{ctx['url']}/keys/{key['id']}"
    # the master key is not in the bucket in the clear
    for k in snapshot(ctx):
        body = ctx["client"].get_object(Bucket=ctx["bucket"], Key=k)["Body"].read()
        assert master_of(keys) not in body and master_of(keys).hex().encode() not in body
    assert opens(ctx, OLD) == master_of(keys) and opens(ctx, NEW) is None
    # the same creation again opens the store, it makes no second one
    again, keys2 = storekeys.create_store(ctx["objects"], OLD)
    assert again == config and master_of(keys2) == master_of(keys) and len(snapshot(ctx)) == 2


def test_a_wrong_passphrase_exits_4_naming_the_store_and_writes_nothing(s3):
    ctx = s3
    storekeys.create_store(ctx["objects"], OLD)
    before = snapshot(ctx)
    for args in (["add", "--new-passphrase-file", ctx["pass"]["third"]], ["passwd",
                 "--new-passphrase-file", ctx["pass"]["third"]], ["remove", "0000"]):
        r = cli(ctx, "key", args[0], ctx["url"], *args[1:],
                "--passphrase-file", ctx["pass"]["new"])
        assert r.returncode == 4, (args, r.stderr)
        assert f"pydr: {ctx['url']}: no key of the store opens with this passphrase" \
            in r.stderr.decode()
        assert b"Traceback" not in r.stderr
        assert snapshot(ctx) == before
    r = cli(ctx, "key", "add", ctx["url"], "--new-passphrase-file", ctx["pass"]["third"])
    assert r.returncode == 4 and b"passphrase is needed" in r.stderr  # none given, no tty
    r = cli(ctx, "key", "add", ctx["url"], env={"PYDR_PASSPHRASE": ""})
    assert r.returncode == 2 and b"empty" in r.stderr
    assert snapshot(ctx) == before


def test_key_add_remove_and_passwd(s3):
    ctx = s3
    _, keys = storekeys.create_store(ctx["objects"], OLD, label="first")
    first = key_list(ctx)["keys"][0]["id"]
    added = ok(cli(ctx, "key", "add", ctx["url"], "--label", "second", "--json",
                   "--passphrase-file", ctx["pass"]["old"],
                   env={"PYDR_NEW_PASSPHRASE_FILE": str(ctx["pass"]["new"])}))
    assert added["kind"] == "passphrase" and added["label"] == "second"
    assert {k["id"] for k in key_list(ctx)["keys"]} == {first, added["id"]}
    assert opens(ctx, OLD) == opens(ctx, NEW) == master_of(keys)
    # passwd: the keys OLD opens are replaced by one THIRD opens, with their label
    out = ok(cli(ctx, "key", "passwd", ctx["url"], "--json",
                 env={"PYDR_PASSPHRASE": OLD.decode(), "PYDR_NEW_PASSPHRASE": THIRD.decode()}))
    assert out["label"] == "first"
    assert {k["id"] for k in key_list(ctx)["keys"]} == {added["id"], out["id"]}
    assert opens(ctx, OLD) is None and opens(ctx, THIRD) == opens(ctx, NEW) == master_of(keys)
    # remove by a unique prefix; the last passphrase key stays
    r = ok(cli(ctx, "key", "remove", ctx["url"], added["id"][:6], "--json",
               "--passphrase-file", ctx["pass"]["third"]))
    assert r == {"store": ctx["url"], "removed": added["id"]}
    assert opens(ctx, NEW) is None and opens(ctx, THIRD) == master_of(keys)
    r = cli(ctx, "key", "remove", ctx["url"], out["id"], "--passphrase-file",
            ctx["pass"]["third"])
    assert r.returncode == 15 and b"last passphrase key" in r.stderr
    r = cli(ctx, "key", "remove", ctx["url"], "ffffffff", "--passphrase-file",
            ctx["pass"]["third"])
    assert r.returncode == 3 and b"no key 'ffffffff'" in r.stderr
    assert [k["id"] for k in key_list(ctx)["keys"]] == [out["id"]]
    text = ok(cli(ctx, "key", "list", ctx["url"])).decode()
    assert out["id"] in text and "encryption aes-256-gcm" in text


def test_recovery_key_opens_a_store_whose_passphrases_are_lost(s3):
    ctx, tmp = s3, s3["tmp"]
    _, keys = storekeys.create_store(ctx["objects"], OLD)
    private, public = tmp / "dr.pem", tmp / "dr.pub"
    made = ok(cli(ctx, "key", "create-recovery", ctx["url"], "--private-key", private,
                  "--public-key", public, "--json", "--passphrase-file", ctx["pass"]["old"],
                  "--recovery-passphrase-file", ctx["pass"]["third"]))
    assert made["kind"] == "recovery" and len(made["recipient"]) == 64
    assert os.stat(private).st_mode & 0o777 == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    # files in the way are never overwritten
    r = cli(ctx, "key", "create-recovery", ctx["url"], "--private-key", private, "--public-key",
            tmp / "other.pub", "--passphrase-file", ctx["pass"]["old"],
            "--recovery-passphrase-file", ctx["pass"]["third"])
    assert r.returncode == 15 and str(private).encode() in r.stderr
    assert b"leave out --private-key" in r.stderr and not (tmp / "other.pub").exists()
    # the same public key sealed again (one recovery key for many stores)
    again = ok(cli(ctx, "key", "create-recovery", ctx["url"], "--public-key", public, "--json",
                   "--passphrase-file", ctx["pass"]["old"]))
    assert again["recipient"] == made["recipient"] and again["id"] != made["id"]
    # the passphrase OLD is forgotten: the private key adds NEW
    recover = ["key", "recover", ctx["url"], "--private-key", private,
               "--new-passphrase-file", ctx["pass"]["new"]]
    r = cli(ctx, *recover, "--recovery-passphrase-file", ctx["pass"]["old"])
    assert r.returncode == 4 and str(private).encode() in r.stderr
    assert opens(ctx, NEW) is None
    out = ok(cli(ctx, *recover, "--json", "--recovery-passphrase-file", ctx["pass"]["third"]))
    assert out["kind"] == "passphrase" and out["label"] == "recovered"
    assert opens(ctx, NEW) == master_of(keys)  # the same master: the data keys are the store's
    # run again, it adds no second key
    again = ok(cli(ctx, *recover, "--json", "--recovery-passphrase-file", ctx["pass"]["third"]))
    assert again["id"] == out["id"] and len(key_list(ctx)["keys"]) == 4
    # a key pair that is not the store's opens nothing
    storekeys.make_recovery_pair(tmp / "x.pem", tmp / "x.pub", THIRD)
    r = cli(ctx, "key", "recover", ctx["url"], "--private-key", tmp / "x.pem",
            "--new-passphrase-file", ctx["pass"]["third"],
            "--recovery-passphrase-file", ctx["pass"]["third"])
    assert r.returncode == 4 and b"no recovery key of the store is sealed" in r.stderr


def test_damaged_config_and_key_files_are_refused_naming_the_object(s3):
    ctx = s3
    _, keys = storekeys.create_store(ctx["objects"], OLD)
    first = key_list(ctx)["keys"][0]["id"]
    second = storekeys.add_key(ctx["objects"], keys, NEW).id
    keyfile = f"dr/keys/{first}"
    body = ctx["client"].get_object(Bucket=ctx["bucket"], Key=keyfile)["Body"].read()
    # a flipped byte in the sealed payload: skipped, the other key opens...
    flip(ctx, keyfile, body.index(b'"sealed": "') + 15)
    assert opens(ctx, NEW) == master_of(keys)
    # ...and when none does, the error names the file that failed
    r = cli(ctx, "key", "add", ctx["url"], "--passphrase-file", ctx["pass"]["old"],
            "--new-passphrase-file", ctx["pass"]["third"])
    assert r.returncode == 4 and f"{ctx['url']}/keys/{first}".encode() in r.stderr
    # a flipped byte in the JSON: listed with its problem, refused naming it
    flip(ctx, f"dr/keys/{second}", 0)
    listed = {k["id"]: k for k in key_list(ctx)["keys"]}
    assert listed[second]["kind"] is None and "not a pydr key file" in listed[second]["problem"]
    r = cli(ctx, "key", "add", ctx["url"], "--passphrase-file", ctx["pass"]["new"],
            "--new-passphrase-file", ctx["pass"]["third"])
    assert r.returncode == 4 and f"{ctx['url']}/keys/{second}: not a pydr key file".encode() \
        in r.stderr
    flip(ctx, f"dr/keys/{second}", 0)  # back
    assert opens(ctx, NEW) == master_of(keys)
    # the config: a flipped digit of its id, then of its format
    config = ctx["client"].get_object(Bucket=ctx["bucket"], Key="dr/config")["Body"].read()
    flip(ctx, "dr/config", config.index(b'"id": "') + 8)
    r = cli(ctx, "key", "add", ctx["url"], "--passphrase-file", ctx["pass"]["new"],
            "--new-passphrase-file", ctx["pass"]["third"])
    assert r.returncode == 7 and r.stderr.startswith(f"pydr: {ctx['url']}/config: ".encode())
    flip(ctx, "dr/config", config.index(b'"id": "') + 8)
    flip(ctx, "dr/config", config.index(b"pydr-object-store"))
    for args in (["list"], ["add", "--passphrase-file", ctx["pass"]["new"]]):
        r = cli(ctx, "key", args[0], ctx["url"], *args[1:])
        assert r.returncode == 7, r.stderr
        assert f"pydr: {ctx['url']}/config: not a pydr object store config".encode() in r.stderr


# -- crash points: a kill at each leaves the store openable, a rerun finishes ------------

CREATE = ("import sys; from pydr.dr import storekeys; from pydr.endpoints.s3 import ObjectStore;"
          "c, k = storekeys.create_store(ObjectStore(sys.argv[1]), sys.argv[2].encode());"
          "print(c.id, k.export()['master'])")


def create(ctx, env=None):
    return subprocess.run([sys.executable, "-c", CREATE, ctx["url"], OLD.decode()],
                          capture_output=True, env={**ctx["env"], **(env or {})}, timeout=120,
                          cwd=ctx["tmp"])


@pytest.mark.parametrize("point", ["keys.created", "keys.config"])
def test_a_killed_store_creation_is_finished_by_running_it_again(s3, point):
    ctx = s3
    r = create(ctx, env={"PYDR_CRASH_AT": point})
    assert r.returncode == -9, r.stderr
    # created: a key and no config yet; either way the passphrase opens it
    assert ("dr/config" in snapshot(ctx)) == (point == "keys.config")
    master = opens(ctx, OLD)
    assert master is not None
    r = create(ctx)
    assert r.returncode == 0, r.stderr
    store_id, master_hex = r.stdout.decode().split()
    assert master_hex == master.hex()
    assert storekeys.read_config(ctx["objects"]).id == store_id
    assert len(snapshot(ctx)) == 2  # the config and the one key


@pytest.mark.parametrize("point", ["keys.added", "keys.removed"])
def test_a_killed_passwd_leaves_a_passphrase_that_opens_and_finishes_when_run_again(s3, point):
    ctx = s3
    _, keys = storekeys.create_store(ctx["objects"], OLD)
    args = ["key", "passwd", ctx["url"], "--passphrase-file", ctx["pass"]["old"],
            "--new-passphrase-file", ctx["pass"]["new"], "--json"]
    r = cli(ctx, *args, env={"PYDR_CRASH_AT": point})
    assert r.returncode == -9, r.stderr
    old, new = opens(ctx, OLD), opens(ctx, NEW)
    assert master_of(keys) in (old, new)  # never neither
    assert (old, new) == ((master_of(keys), master_of(keys)) if point == "keys.added"
                          else (None, master_of(keys)))
    info = ok(cli(ctx, *args))
    assert opens(ctx, OLD) is None and opens(ctx, NEW) == master_of(keys)
    assert [k["id"] for k in key_list(ctx)["keys"]] == [info["id"]]  # no stray key


@pytest.mark.parametrize("command", ["add", "remove", "create-recovery", "recover"])
def test_a_killed_key_command_leaves_the_store_open_and_finishes_when_run_again(s3, command):
    ctx, tmp = s3, s3["tmp"]
    _, keys = storekeys.create_store(ctx["objects"], OLD)
    given = ["--passphrase-file", ctx["pass"]["old"]]
    if command == "remove":
        doomed = storekeys.add_key(ctx["objects"], keys, NEW).id
        args, point = ["remove", ctx["url"], doomed, *given], "keys.removed"
    elif command == "recover":
        public = storekeys.make_recovery_pair(tmp / "r.pem", tmp / "r.pub", THIRD)
        assert public
        keyrecovery.add_recovery(ctx["objects"], keys, (tmp / "r.pub").read_bytes())
        args, point = ["recover", ctx["url"], "--private-key", tmp / "r.pem",
                       "--recovery-passphrase-file", ctx["pass"]["third"],
                       "--new-passphrase-file", ctx["pass"]["new"]], "keys.added"
    elif command == "add":
        args, point = ["add", ctx["url"], *given, "--new-passphrase-file",
                       ctx["pass"]["new"]], "keys.added"
    else:
        args, point = ["create-recovery", ctx["url"], *given, "--public-key", tmp / "r.pub",
                       "--private-key", tmp / "r.pem", "--recovery-passphrase-file",
                       ctx["pass"]["third"]], "keys.added"
    r = cli(ctx, "key", *args, env={"PYDR_CRASH_AT": point})
    assert r.returncode == -9, r.stderr
    assert opens(ctx, OLD) == master_of(keys)
    before = key_list(ctx)["keys"]
    r = cli(ctx, "key", *args, "--json")  # the same command (the pair is made already)
    if command == "remove":  # done already: the key is gone
        assert ok(r) == {"store": ctx["url"], "removed": doomed} and opens(ctx, NEW) is None
    else:
        info = ok(r)
        assert opens(ctx, OLD) == master_of(keys)
        if command in ("add", "recover"):
            assert opens(ctx, NEW) == master_of(keys)
        if command in ("add", "create-recovery"):  # the key the kill left is kept, not doubled
            assert info["already_there"] and info["id"] in [k["id"] for k in before]
            assert key_list(ctx)["keys"] == before and len(before) == 2
            again = ok(cli(ctx, "key", *args))  # and a third run: the same
            assert b"already there" in again and key_list(ctx)["keys"] == before


def test_key_commands_on_an_unencrypted_store_say_it_has_no_keys(s3):
    ctx = s3
    storekeys.create_store(ctx["objects"], None, encrypt=False)
    for given in ([], ["--passphrase-file", ctx["pass"]["old"]]):  # none asked, none needed
        r = cli(ctx, "key", "add", ctx["url"], *given, "--new-passphrase-file",
                ctx["pass"]["new"])
        assert r.returncode == 15, r.stderr
        assert b"unencrypted" in r.stderr and b"no keys" in r.stderr
        assert b"passphrase is needed" not in r.stderr
    assert key_list(ctx)["keys"] == []


def test_pydr_run_reads_the_passphrase_file_again_each_round(s3):
    """After `pydr key passwd` and an update of the passphrase file, the
    service's next round opens the store: no restart. Meanwhile the item's
    failure says how to give the passphrase and its RPO health is critical
    at once (an alert)."""
    from pydr.dr.service import Service

    ctx, tmp = s3, s3["tmp"]
    vault = tmp / "vault"
    ok(cli(ctx, "vault", "init", vault))
    img = tmp / "a.img"
    img.write_bytes(os.urandom(1 << 20))
    given = tmp / "run.pass"
    given.write_bytes(OLD + b"\n")
    ok(cli(ctx, "protect", "vm", "--vault", vault, "--disk", f"{img}={ctx['url']}",
           "--rpo", "60s", "--passphrase-file", given))
    now = [time.time()]
    service = Service(vault, jobs=1, passphrase_file=given, clock=lambda: now[0],
                      warm=False, notify=lambda state: None)
    assert service.run_once().succeeded == ["vm"]
    said = ok(cli(ctx, "key", "passwd", ctx["url"], "--passphrase-file", ctx["pass"]["old"],
                  "--new-passphrase-file", ctx["pass"]["new"]))
    assert b"'pydr run'" in said and b"scripts" in said  # they need the new one
    now[0] += 3600
    failed = service.run_once()
    assert list(failed.failed) == ["vm"] and failed.exit_codes["vm"] == 4
    assert "--passphrase-file" in failed.failed["vm"]
    assert [(t["item"], t["new"]) for t in failed.transitions] == [("vm", "critical")]
    assert "not replicated: the object store's passphrase" in failed.transitions[0]["message"]
    given.write_bytes(NEW + b"\n")  # what the operator does after passwd
    now[0] += 3600
    mended = service.run_once()
    assert mended.succeeded == ["vm"] and not mended.failed
    # (its health follows its RPO again: no passphrase failure is held against it)
    assert all("passphrase" not in t["message"] for t in mended.transitions)


def test_key_add_and_create_recovery_twice_add_one_key(s3):
    ctx, tmp = s3, s3["tmp"]
    storekeys.create_store(ctx["objects"], OLD)
    given = ["--passphrase-file", ctx["pass"]["old"]]
    add = ["key", "add", ctx["url"], *given, "--new-passphrase-file", ctx["pass"]["new"],
           "--json"]
    first = ok(cli(ctx, *add))
    assert not first["already_there"]
    second = ok(cli(ctx, *add))
    assert second["already_there"] and second["id"] == first["id"]
    recovery = ["key", "create-recovery", ctx["url"], *given, "--public-key", tmp / "r.pub",
                "--private-key", tmp / "r.pem", "--recovery-passphrase-file",
                ctx["pass"]["third"], "--json"]
    made = ok(cli(ctx, *recovery))
    assert not made["already_there"]
    assert ok(cli(ctx, *recovery))["id"] == made["id"]  # the same command again
    kinds = sorted(k["kind"] for k in key_list(ctx)["keys"])
    assert kinds == ["passphrase", "passphrase", "recovery"]
    # a pair in the way that is not one (another public key): refused, nothing added
    storekeys.make_recovery_pair(tmp / "r2.pem", tmp / "r2.pub", THIRD)
    mixed = [tmp / "r2.pub" if a == tmp / "r.pub" else a for a in recovery]
    r = cli(ctx, *mixed)
    assert r.returncode == 15 and b"in the way" in r.stderr
    assert sorted(k["kind"] for k in key_list(ctx)["keys"]) == kinds


def test_an_item_names_its_store(s3):
    ctx, tmp = s3, s3["tmp"]
    vault = tmp / "vault"
    ok(cli(ctx, "vault", "init", vault))
    img = tmp / "a.img"
    img.write_bytes(b"\0" * (1 << 20))
    ok(cli(ctx, "protect", "vm", "--vault", vault, "--disk", f"{img}={ctx['url']}",
           env={"PYDR_PASSPHRASE": OLD.decode()}))
    config, _ = storekeys.create_store(ctx["objects"], OLD)
    listed = ok(cli(ctx, "key", "list", "vm", "--vault", vault, "--json"))
    assert listed["store"] == ctx["url"] and listed["config"]["id"] == config.id
    r = cli(ctx, "key", "list", "nosuch", "--vault", vault)
    assert r.returncode == 3


def test_help_reads_like_a_man_page():
    for sub in ("list", "add", "remove", "passwd", "recover", "create-recovery"):
        r = run_cli("key", sub, "--help")
        assert r.returncode == 0
        text = r.stdout.decode()
        assert "examples:" in text and "exit status" in text and "PYDR_PASSPHRASE_FILE" in text
    assert "--passphrase " not in text  # never on the command line


def test_passphrases_typed_at_a_terminal(s3):
    """With nothing else given and standard input a terminal, the store's
    passphrase is asked once and a new one twice; two that differ are
    refused before anything is written. Each answer is typed once its
    prompt is on standard error (getpass flushes what was typed before)."""
    import pty

    ctx = s3
    _, keys = storekeys.create_store(ctx["objects"], OLD)

    def typed(answers, *args):
        controller, terminal = pty.openpty()
        p = subprocess.Popen([*pydr_command(), "key", *args], stdin=terminal,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ctx["env"],
                             start_new_session=True)  # no controlling terminal: stdin is asked
        try:
            for prompt, answer in answers:
                seen = b""
                while not seen.endswith(prompt):
                    byte = p.stderr.read(1)
                    assert byte, f"no prompt {prompt!r}: {seen!r}"
                    seen += byte
                os.write(controller, answer + b"\n")
            out, err = p.communicate(timeout=120)
        finally:
            p.kill()
            os.close(controller)
            os.close(terminal)
        return p.returncode, out, err

    before = snapshot(ctx)
    store = f"passphrase of {ctx['url']}: ".encode()
    code, _, err = typed([(store, OLD), (b"the new passphrase: ", NEW), (b"again: ", THIRD)],
                         "add", ctx["url"])
    assert code == 2 and b"the two passphrases typed differ" in err
    assert snapshot(ctx) == before
    code, out, err = typed([(store, OLD), (b"the new passphrase: ", NEW), (b"again: ", NEW)],
                           "add", ctx["url"], "--json")
    assert code == 0, err
    assert json.loads(out)["kind"] == "passphrase" and opens(ctx, NEW) == master_of(keys)

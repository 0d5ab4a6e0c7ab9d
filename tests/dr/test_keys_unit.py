"""The keys of an object store (pydr.dr.storekeys, keyfiles, recoverykey,
passphrases) on an in-memory store: the fine-grained and hostile cases.
The commands against a real S3 server: tests/dr/test_keys.py."""

import base64
import json
import os

import pytest

from pydr.dr import keyfiles, keyrecovery, storekeys
from pydr.dr.passphrases import new_passphrase_from, passphrase_from, recovery_passphrase_from
from pydr.errors import (FormatError, InvalidArgument, InvalidState, PassphraseRequired,
                         UnknownName, WrongPassphrase)


def master_of(keys):
    """The master key that DataKeys were made from."""
    return bytes.fromhex(keys.export()["master"])


class MemoryStore:
    """pydr.endpoints.s3.ObjectStore's calls, in memory; with `versioned`,
    every put and delete keeps the older versions (versions(), get(version=))."""

    def __init__(self, spec="s3://bucket/dr", versioned=False):
        self.spec = spec
        self.bucket, _, self.prefix = spec[len("s3://"):].partition("/")
        self.objects, self.history, self.versioned = {}, [], versioned
        self.sizes_read = []  # what get() returned: nothing over a bound it was given
        if not versioned:
            self.versions = None

    def key(self, *parts):
        return "/".join(p for p in (self.prefix, *parts) if p)

    def url(self, key):
        return f"s3://{self.bucket}/{key}"

    def put(self, key, data):
        self.objects[key] = bytes(data)
        self.history.append((key, f"v{len(self.history)}", bytes(data)))

    def get(self, key, version=None, *, max_size=None):
        if version is not None:
            data = next(d for k, v, d in self.history if (k, v) == (key, version))
        elif key not in self.objects:
            raise FileNotFoundError(2, "no such object", self.url(key))
        else:
            data = self.objects[key]
        if max_size is not None and len(data) > max_size:  # as ObjectStore.get refuses it
            raise FormatError(f"object holds {len(data)} bytes, more than {max_size}",
                              path=self.url(key))
        self.sizes_read.append(len(data))
        return data

    def list(self, under):
        for k in sorted(self.objects):
            if k.startswith(self.key(under) + "/"):
                yield k, 0.0, len(self.objects[k])

    def delete(self, keys):
        for k in keys:
            self.objects.pop(k, None)
            self.history.append((k, f"v{len(self.history)}", None))  # a delete marker

    def delete_versions(self, pairs):
        doomed = set(pairs)
        self.history = [h for h in self.history if (h[0], h[1]) not in doomed]
        return []

    def versions(self, under):
        latest = {k: v for k, v, _ in self.history}
        for k, v, d in self.history:
            if k.startswith(self.key(under) + "/"):
                yield k, v, latest[k] == v, d is None, 0.0, len(d or b"")


@pytest.fixture
def store():
    return MemoryStore()


def key_ids(store):
    return sorted(k.rpartition("/")[2] for k in store.objects if "/keys/" in k)


def edit_key(store, key_id, **fields):
    name = store.key("keys", key_id)
    obj = json.loads(store.objects[name])
    for k, v in fields.items():
        obj["kdf" if k.startswith("kdf_") else k] = (
            {**obj["kdf"], k[4:]: v} if k.startswith("kdf_") else v)
    store.objects[name] = json.dumps(obj).encode()


def test_unlock_opens_with_any_passphrase_key_and_refuses_others(store):
    config, keys = storekeys.create_store(store, b"one")
    storekeys.add_key(store, keys, b"two")
    for passphrase in (b"one", b"two"):
        got, opened = storekeys.unlock(store, passphrase, expect_id=config.id)
        assert got == config and master_of(opened) == master_of(keys)
    with pytest.raises(WrongPassphrase) as e:
        storekeys.unlock(store, b"three")
    assert e.value.path == store.spec and e.value.exit_code == 4 and "tried 2" in str(e.value)
    with pytest.raises(PassphraseRequired):
        storekeys.unlock(store, None)
    with pytest.raises(FormatError, match="recorded as"):
        storekeys.unlock(store, b"one", expect_id="0" * 32)


def test_an_unencrypted_store_has_no_keys_and_a_version_1_store_is_left_alone(store):
    config, keys = storekeys.create_store(store, None, encrypt=False)
    assert keys is None and config.encryption == "none" and config.chunk_id == "xxh3-128"
    assert storekeys.unlock(store, None) == (config, None)
    assert storekeys.create_store(store, b"x") == (config, None)  # opened as it is
    v1 = MemoryStore("s3://bucket/old")
    v1.put("old/chunks/abcd/" + "ab" * 16, b"chunk")
    with pytest.raises(InvalidState, match="version-1"):
        storekeys.create_store(v1, b"x")
    assert storekeys.read_config(v1) is None and list(v1.objects) == ["old/chunks/abcd/" + "ab" * 16]
    with pytest.raises(FileNotFoundError):
        storekeys.unlock(v1, b"x")
    with pytest.raises(PassphraseRequired):
        storekeys.create_store(MemoryStore(), None)


def test_a_config_saying_none_beside_key_files_is_refused(store):
    config, keys = storekeys.create_store(store, b"one")
    store.objects["dr/config"] = json.dumps({**config.to_dict(), "encryption": "none",
                                             "chunk_id": "xxh3-128"}).encode()
    with pytest.raises(FormatError, match="not encrypted, yet it has 1 key files"):
        storekeys.unlock(store, b"one")


def test_a_creation_cut_short_after_its_key_is_finished_with_the_same_config(store):
    config, keys = storekeys.create_store(store, b"one")
    del store.objects["dr/config"]
    # it opens (the config a rerun writes), and a wrong passphrase never finishes it
    assert storekeys.unlock(store, b"one")[0] == config
    with pytest.raises(WrongPassphrase):
        storekeys.create_store(store, b"two")
    assert "dr/config" not in store.objects
    again, keys2 = storekeys.create_store(store, b"one")
    assert again == config and master_of(keys2) == master_of(keys)
    assert keyfiles.parse_config(store.objects["dr/config"], "c") == config


@pytest.mark.parametrize("damage, message", [
    ({"version": 2}, "key file of version 2"),
    ({"id": "0" * 32}, "is not its name"),
    ({"kind": "other"}, "unknown kind"),
    ({"nonce": "AAAA"}, "'nonce' has 3 bytes"),
    ({"sealed": "!!"}, "'sealed' is not base64"),
    ({"kdf_name": "scrypt"}, "is not argon2id"),
    ({"kdf_memory_cost": 1 << 30}, "memory_cost 1073741824 is outside"),
    ({"kdf_time_cost": 10 ** 6}, "time_cost 1000000 is outside"),
    ({"kdf_parallelism": 0}, "parallelism 0 is outside"),
    ({"kdf_time_cost": 17}, "time_cost 17 is outside [1, 16]"),
    ({"kdf_memory_cost": (1 << 18) + 1}, "memory_cost 262145 is outside [8, 262144]"),
    ({"kdf_parallelism": 17}, "parallelism 17 is outside [1, 16]"),
    ({"created": 1e300}, "field 'created' (1e+300) is not a time"),
    ({"created": -1}, "field 'created' (-1) is not a time"),
    ({"created": float("nan")}, "NaN is not a number pydr writes"),
    ({"created": float("-inf")}, "-Infinity is not a number pydr writes"),
])
def test_a_damaged_or_hostile_key_file_is_named_and_skipped(store, damage, message):
    _, keys = storekeys.create_store(store, b"one")
    [bad] = key_ids(store)
    storekeys.add_key(store, keys, b"two")
    edit_key(store, bad, **damage)
    assert master_of(storekeys.unlock(store, b"two")[1]) == master_of(keys)  # another key opens
    listed = {k.id: k for k in storekeys.list_keys(store)}
    assert listed[bad].kind is None and message in listed[bad].problem
    with pytest.raises(WrongPassphrase) as e:  # none opens: the damaged one is named
        storekeys.unlock(store, b"one")
    assert f"s3://bucket/dr/keys/{bad}" in str(e.value) and message in str(e.value)
    storekeys.remove_key(store, keys, bad)  # a damaged file can be removed
    assert bad not in key_ids(store)


def test_only_damaged_keys_are_a_format_error_naming_the_file(store):
    storekeys.create_store(store, b"one")
    [only] = key_ids(store)
    store.objects[f"dr/keys/{only}"] = b"\x00garbage"
    with pytest.raises(FormatError) as e:
        storekeys.unlock(store, b"one")
    assert e.value.path == f"s3://bucket/dr/keys/{only}" and e.value.exit_code == 7
    store.objects["dr/keys/readme"] = b"x"
    assert [k.problem for k in storekeys.list_keys(store) if k.id == "readme"] == [
        "not a key file's name (32 hex digits)"]


def test_a_sealed_payload_moved_into_another_key_file_does_not_open(store):
    _, keys = storekeys.create_store(store, b"one")
    [a] = key_ids(store)
    b = storekeys.add_key(store, keys, b"two").id
    obj_a = json.loads(store.objects[f"dr/keys/{a}"])
    store.objects[f"dr/keys/{b}"] = json.dumps({**obj_a, "id": b}).encode()  # a's seal, b's name
    del store.objects[f"dr/keys/{a}"]
    for passphrase in (b"one", b"two"):  # the associated data names the key
        with pytest.raises(WrongPassphrase):
            storekeys.unlock(store, passphrase)


def test_a_key_of_another_store_is_refused_naming_the_config(store):
    _, keys = storekeys.create_store(store, b"one")
    other = MemoryStore()
    storekeys.create_store(other, b"two")
    [foreign] = key_ids(other)
    store.objects[f"dr/keys/{foreign}"] = other.objects[f"dr/keys/{foreign}"]
    assert master_of(storekeys.unlock(store, b"one")[1]) == master_of(keys)
    with pytest.raises(FormatError, match="is of store") as e:
        storekeys.unlock(store, b"two")
    assert e.value.path == "s3://bucket/dr/config"


def test_the_last_passphrase_key_is_never_removed(store):
    _, keys = storekeys.create_store(store, b"one")
    [only] = key_ids(store)
    with pytest.raises(InvalidState, match="last passphrase key"):
        storekeys.remove_key(store, keys, only)
    with pytest.raises(UnknownName):
        storekeys.remove_key(store, keys, "zzzz")
    with pytest.raises(InvalidArgument, match="label"):
        storekeys.add_key(store, keys, b"two", label="x" * 201)
    assert storekeys.remove_key(store, keys, "f" * 32) == "f" * 32  # not there: done
    assert key_ids(store) == [only]


def test_passwd_run_again_after_each_step_finishes_without_a_stray_key(store):
    _, keys = storekeys.create_store(store, b"one", label="ops")
    info = storekeys.change_passphrase(store, b"one", b"two")
    assert info.label == "ops" and key_ids(store) == [info.id]
    assert storekeys.change_passphrase(store, b"one", b"two") == info  # done already
    with pytest.raises(WrongPassphrase):
        storekeys.change_passphrase(store, b"three", b"four")
    with pytest.raises(InvalidArgument):
        storekeys.change_passphrase(store, b"two", b"two")
    # the state a kill at keys.added leaves: both keys
    storekeys.add_key(store, keys, b"three")
    again = storekeys.change_passphrase(store, b"two", b"three")
    assert key_ids(store) == [again.id]
    assert master_of(storekeys.unlock(store, b"three")[1]) == master_of(keys)


def test_keys_an_attacker_deleted_or_overwrote_open_from_their_older_versions():
    store = MemoryStore(versioned=True)
    config, keys = storekeys.create_store(store, b"one")
    [key_id] = key_ids(store)
    store.put(f"dr/keys/{key_id}", b"{}")  # overwritten
    assert master_of(storekeys.unlock(store, b"one")[1]) == master_of(keys)
    store.delete([f"dr/keys/{key_id}", "dr/config"])  # a delete marker on each
    assert master_of(storekeys.unlock(store, b"one", expect_id=config.id)[1]) == master_of(keys)
    with pytest.raises(WrongPassphrase):
        storekeys.unlock(store, b"two", expect_id=config.id)


def test_creating_the_store_again_after_an_attackers_deletes_brings_it_back():
    store = MemoryStore(versioned=True)
    config, keys = storekeys.create_store(store, b"one")
    [key_id] = key_ids(store)
    store.delete(list(store.objects))
    with pytest.raises(WrongPassphrase):  # never a new store over the old one's versions
        storekeys.create_store(store, b"two")
    assert store.objects == {}
    again, keys2 = storekeys.create_store(store, b"one")
    assert again == config and master_of(keys2) == master_of(keys)
    assert key_ids(store) == [key_id]  # the key is put back from its version


def test_a_removed_or_changed_passphrase_does_not_open_from_an_older_version():
    store = MemoryStore(versioned=True)
    _, keys = storekeys.create_store(store, b"one")
    doomed = storekeys.add_key(store, keys, b"two").id
    store.put(f"dr/keys/{doomed}", store.objects[f"dr/keys/{doomed}"])  # a second version
    storekeys.remove_key(store, keys, doomed)
    assert not [h for h in store.history if doomed in h[0]]  # no version, no marker
    storekeys.change_passphrase(store, b"one", b"three")
    for gone in (b"one", b"two"):
        with pytest.raises(WrongPassphrase):
            storekeys.unlock(store, gone)
    assert master_of(storekeys.unlock(store, b"three")[1]) == master_of(keys)


def ed25519_public_pem():
    from cryptography.hazmat.primitives import serialization as S
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().public_key().public_bytes(
        S.Encoding.PEM, S.PublicFormat.SubjectPublicKeyInfo)


def test_recovery_needs_the_private_key_and_its_passphrase(store, tmp_path):
    _, keys = storekeys.create_store(store, b"one")
    recipient = storekeys.make_recovery_pair(tmp_path / "r.pem", tmp_path / "r.pub", b"rpass")
    assert oct(os.stat(tmp_path / "r.pem").st_mode & 0o777) == "0o600"
    info = keyrecovery.add_recovery(store, keys, (tmp_path / "r.pub").read_bytes())
    assert info.recipient == recipient and info.kind == "recovery"
    private = (tmp_path / "r.pem").read_bytes()
    with pytest.raises(WrongPassphrase):
        keyrecovery.recover(store, private, b"wrong", b"new")
    with pytest.raises(InvalidArgument):
        keyrecovery.recover(store, private, None, b"new")
    with pytest.raises(FormatError):
        keyrecovery.recover(store, b"not pem", b"rpass", b"new")
    with pytest.raises(FormatError, match="not a PEM public key"):
        keyrecovery.add_recovery(store, keys, b"-----BEGIN PUBLIC KEY-----\nAAAA\n"
                                            b"-----END PUBLIC KEY-----\n")
    with pytest.raises(FormatError, match="Ed25519PublicKey, not an X25519 public key"):
        keyrecovery.add_recovery(store, keys, ed25519_public_pem())
    added = keyrecovery.recover(store, private, b"rpass", b"new")
    assert master_of(storekeys.unlock(store, b"new")[1]) == master_of(keys)
    assert keyrecovery.recover(store, private, b"rpass", b"new") == added  # no second key
    with pytest.raises(FileExistsError):
        storekeys.make_recovery_pair(tmp_path / "r.pem", tmp_path / "s.pub", b"x")
    assert not (tmp_path / "s.pub").exists()


def test_add_recovery_with_its_private_key_adds_one_key_and_is_not_fooled_by_a_forged_one(
        store, tmp_path):
    from pydr.dr import recoverykey

    config, keys = storekeys.create_store(store, b"one")
    storekeys.make_recovery_pair(tmp_path / "r.pem", tmp_path / "r.pub", b"rpass")
    public_pem = (tmp_path / "r.pub").read_bytes()
    private = recoverykey.load_private((tmp_path / "r.pem").read_bytes(), b"rpass", "r.pem")
    forged = {"version": 1, "id": "0" * 32, "kind": "recovery", "created": 0, "host": "x",
              "label": None}  # same recipient, another master key
    forged.update(recoverykey.seal_fields(recoverykey.load_public(public_pem, "p"), "0" * 32,
                                          config.store_id, os.urandom(32)))
    store.put("dr/keys/" + "0" * 32, keyfiles.key_file_bytes(forged))
    first = keyrecovery.add_recovery(store, keys, public_pem, private=private)
    assert first.id != "0" * 32  # the forged one is no reason to skip
    again = keyrecovery.add_recovery(store, keys, public_pem, private=private)
    assert again.id == first.id  # found: nothing written
    assert sorted(k.id for k in storekeys.list_keys(store) if k.kind == "recovery") == \
        sorted(["0" * 32, first.id])
    storekeys.make_recovery_pair(tmp_path / "s.pem", tmp_path / "s.pub", b"rpass")
    other = recoverykey.load_private((tmp_path / "s.pem").read_bytes(), b"rpass", "s.pem")
    with pytest.raises(InvalidArgument, match="not the public key's"):
        keyrecovery.add_recovery(store, keys, public_pem, private=other)


def test_a_forged_recovery_key_is_passed_over_for_the_one_that_opens_an_index(store, tmp_path):
    from pydr.dr import recoverykey
    from pydr.engine.sealing import KIND_INDEX

    config, keys = storekeys.create_store(store, b"one")
    storekeys.make_recovery_pair(tmp_path / "r.pem", tmp_path / "r.pub", b"rpass")
    public_pem = (tmp_path / "r.pub").read_bytes()
    # anyone may seal a master key to the public key: a forged one, first in the listing
    forged = {"version": 1, "id": "0" * 32, "kind": "recovery", "created": 0, "host": "x",
              "label": None}
    forged.update(recoverykey.seal_fields(recoverykey.load_public(public_pem, "p"), "0" * 32,
                                          config.store_id, os.urandom(32)))
    store.put("dr/keys/" + "0" * 32, keyfiles.key_file_bytes(forged))
    keyrecovery.add_recovery(store, keys, public_pem)
    name = "indexes/vm/x.pidx"
    store.put(f"dr/{name}", keys.seal(KIND_INDEX, b"an index", name))
    keyrecovery.recover(store, (tmp_path / "r.pem").read_bytes(), b"rpass", b"new")
    assert master_of(storekeys.unlock(store, b"new")[1]) == master_of(keys)


def test_passphrase_sources_in_restics_order(tmp_path):
    f = tmp_path / "p"
    f.write_bytes(b"from file\r\n")
    env = {"PYDR_PASSPHRASE_FILE": str(f), "PYDR_PASSPHRASE": "from env"}
    assert passphrase_from(None, {}) is None
    assert passphrase_from(None, {"PYDR_PASSPHRASE": "from env"}) == b"from env"
    assert passphrase_from(None, env) == b"from file"
    g = tmp_path / "g"
    g.write_bytes(b"given\n\n")  # one newline stripped, not two
    assert passphrase_from(g, env) == b"given\n"
    assert new_passphrase_from(None, env) is None
    assert new_passphrase_from(None, {"PYDR_NEW_PASSPHRASE": "n"}) == b"n"
    assert recovery_passphrase_from(None, {"PYDR_RECOVERY_PASSPHRASE_FILE": str(f)}) == \
        b"from file"
    (tmp_path / "empty").write_bytes(b"\n")
    for bad in ({"PYDR_PASSPHRASE": ""}, {"PYDR_PASSPHRASE_FILE": str(tmp_path / "empty")}):
        with pytest.raises(InvalidArgument, match="empty"):
            passphrase_from(None, bad)
    with pytest.raises(FileNotFoundError):
        passphrase_from(tmp_path / "missing", {})


def test_config_parsing_refuses_what_is_not_a_version_2_config():
    good = {"format": "pydr-object-store", "version": 2, "id": "ab" * 16,
            "encryption": "aes-256-gcm", "chunk_id": "hmac-sha256-128", "created": 1}
    assert keyfiles.parse_config(json.dumps(good).encode(), "u").id == "ab" * 16
    for bad, message in [({"version": 3}, "version 3"), ({"id": "AB" * 16}, "not 32 hex"),
                         ({"encryption": "rot13"}, "unknown encryption"),
                         ({"chunk_id": "xxh3-128"}, "chunk ids 'xxh3-128' with"),
                         ({"created": "today"}, "'created'"), ({"format": "x"}, "format 'x'")]:
        with pytest.raises(FormatError, match=message) as e:
            keyfiles.parse_config(json.dumps({**good, **bad}).encode(), "s3://b/p/config")
        assert e.value.path == "s3://b/p/config"
    for raw in (b"\xff", b"[]", b"x" * (keyfiles.MAX_FILE + 1)):
        with pytest.raises(FormatError):
            keyfiles.parse_config(raw, "u")
    assert base64.b64decode(json.loads(keyfiles.key_file_bytes({"a": b"\x01"}))["a"]) == b"\x01"


def test_versions_under_object_lock_that_cannot_be_deleted_are_reported():
    class Locked(MemoryStore):
        def delete_versions(self, pairs):
            return [(k, v, "AccessDenied") for k, v in pairs if v is not None]

    store = Locked(versioned=True)
    _, keys = storekeys.create_store(store, b"one")
    doomed = storekeys.add_key(store, keys, b"two").id
    with pytest.raises(InvalidState, match="under Object Lock retention"):
        storekeys.remove_key(store, keys, doomed)
    assert doomed not in key_ids(store)  # the current file is gone all the same
    assert master_of(storekeys.unlock(store, b"two")[1]) == master_of(keys)  # as reported


# -- key checks: a master key nothing vouches for is never accepted ------------------


def forge_recovery(store, config, public_pem, key_id="0" * 32, master=None):
    """What anyone holding the recovery public key can do: seal a master key
    of their choice to it, with the store's id, under keys/."""
    from pydr.dr import recoverykey

    forged = {"version": 1, "id": key_id, "kind": "recovery", "created": 0, "host": "x",
              "label": None}
    forged.update(recoverykey.seal_fields(recoverykey.load_public(public_pem, "p"), key_id,
                                          config.store_id, master or os.urandom(32)))
    store.put(store.key("keys", key_id), keyfiles.key_file_bytes(forged))


def recovery_pair(tmp_path):
    storekeys.make_recovery_pair(tmp_path / "r.pem", tmp_path / "r.pub", b"rpass")
    return (tmp_path / "r.pem").read_bytes(), (tmp_path / "r.pub").read_bytes()


def test_the_config_records_the_key_check_of_the_master_key(store):
    from pydr.engine.sealing import key_check

    config, keys = storekeys.create_store(store, b"one")
    assert config.key_check == key_check(master_of(keys), config.store_id)
    assert json.loads(store.objects["dr/config"])["key_check"] == config.key_check
    assert storekeys.unlock(store, b"one")[0].key_check == config.key_check
    # a creation cut short before its config: the config written has it too
    del store.objects["dr/config"]
    assert storekeys.create_store(store, b"one")[0].key_check == config.key_check


def test_a_recovery_key_forged_with_the_public_key_is_refused_with_no_index_to_check(
        tmp_path):
    store = MemoryStore(versioned=True)
    config, keys = storekeys.create_store(store, b"one")
    private, public = recovery_pair(tmp_path)
    keyrecovery.add_recovery(store, keys, public)
    evil = b"E" * 32
    forge_recovery(store, config, public, master=evil)  # lists first; no index anywhere
    keyrecovery.recover(store, private, b"rpass", b"new")
    assert master_of(storekeys.unlock(store, b"new")[1]) == master_of(keys)
    # the forged key alone: refused (exit 7), naming it, never accepted
    genuine = [i for i in key_ids(store) if i != "0" * 32 and
               json.loads(store.objects[store.key("keys", i)])["kind"] == "recovery"]
    store.delete([store.key("keys", i) for i in genuine])
    store.delete_versions([(k, v) for k, v, _ in store.history
                           if k.rpartition("/")[2] in genuine])
    with pytest.raises(FormatError) as e:
        keyrecovery.recover(store, private, b"rpass", b"newer")
    assert e.value.exit_code == 7 and "keys/" + "0" * 32 in str(e.value)
    assert "fails the key check of the config" in str(e.value)
    with pytest.raises(WrongPassphrase):
        storekeys.unlock(store, b"newer")  # no key was added for it


def test_a_forged_key_that_the_config_was_changed_to_vouch_for_fails_the_vaults_check(
        store, tmp_path):
    from pydr.engine.sealing import key_check

    config, keys = storekeys.create_store(store, b"one")
    private, public = recovery_pair(tmp_path)
    evil = b"E" * 32
    forge_recovery(store, config, public, master=evil)
    store.objects["dr/config"] = json.dumps(
        {**config.to_dict(), "key_check": key_check(evil, config.store_id)}).encode()
    with pytest.raises(FormatError, match="fails the key check of the vault's record"):
        keyrecovery.recover(store, private, b"rpass", b"new", expect_check=config.key_check)
    # the owner's passphrase key fails the tampered config's check: said, exit 7
    with pytest.raises(FormatError, match="fails the key check that the config") as e:
        storekeys.unlock(store, b"one")
    assert e.value.exit_code == 7
    store.objects["dr/config"] = config.to_bytes()
    assert master_of(storekeys.unlock(store, b"one", expect_check=config.key_check)[1]) \
        == master_of(keys)
    with pytest.raises(FormatError, match="the vault's record"):
        storekeys.unlock(store, b"one", expect_check="0" * 32)


def without_key_check(store, config):
    """The config of a store made before configs had a key check."""
    fields = config.to_dict()
    del fields["key_check"]
    store.objects["dr/config"] = json.dumps(fields).encode()


def test_with_no_key_check_anywhere_a_master_key_must_open_an_index_version(tmp_path):
    from pydr.engine.sealing import KIND_INDEX

    store = MemoryStore(versioned=True)
    config, keys = storekeys.create_store(store, b"one")
    without_key_check(store, config)
    private, public = recovery_pair(tmp_path)
    forge_recovery(store, config, public)
    # nothing at all to check against: refused, not accepted, not "no key" (exit 4)
    with pytest.raises(FormatError, match="nothing can check its master key") as e:
        keyrecovery.recover(store, private, b"rpass", b"new")
    assert e.value.exit_code == 7
    keyrecovery.add_recovery(store, keys, public)
    name = "indexes/vm/x.pidx"
    store.put(f"dr/{name}", keys.seal(KIND_INDEX, b"an index", name))
    store.delete([f"dr/{name}"])  # hidden by a delete marker: the version still checks
    store.put("dr/indexes/!/0.pidx", b"ransom note")  # junk lists first: passed over
    keyrecovery.recover(store, private, b"rpass", b"new")
    assert master_of(storekeys.unlock(store, b"new")[1]) == master_of(keys)


def test_a_junk_object_under_indexes_does_not_stop_recovery(store, tmp_path):
    config, keys = storekeys.create_store(store, b"one")
    private, public = recovery_pair(tmp_path)
    keyrecovery.add_recovery(store, keys, public)
    store.put("dr/indexes/!/0.pidx", b"ransom note")
    keyrecovery.recover(store, private, b"rpass", b"new")
    assert master_of(storekeys.unlock(store, b"new")[1]) == master_of(keys)


# -- hostile key files: costly KDFs, terminal escapes ------------------------------


def test_keys_with_pydrs_kdf_are_tried_first_and_costly_ones_are_capped(store, monkeypatch):
    import base64

    config, keys = storekeys.create_store(store, b"one")
    for i in range(6):  # in bounds, named to sort first, sealing nothing
        kid = f"{i:032x}"
        store.put(store.key("keys", kid), keyfiles.key_file_bytes({
            "version": 1, "id": kid, "kind": "passphrase", "created": 1, "host": "h",
            "label": None, "kdf": {"name": "argon2id", "time_cost": 1 + i,
                                   "memory_cost": 64, "parallelism": 1,
                                   "salt": base64.b64encode(os.urandom(16)).decode()},
            "nonce": os.urandom(12), "sealed": os.urandom(80)}))
    costs = []
    real = keyfiles.passphrase_kek
    monkeypatch.setattr(keyfiles, "passphrase_kek",
                        lambda p, kdf: costs.append(kdf["time_cost"]) or real(p, kdf))
    assert master_of(storekeys.unlock(store, b"one")[1]) == master_of(keys)
    assert costs == [keyfiles.KDF["time_cost"]]  # the owner's key first, alone
    costs.clear()
    with pytest.raises(WrongPassphrase) as e:
        storekeys.unlock(store, b"wrong")
    assert costs == [3, 1, 2, 3, 4]  # pydr's, then the cheapest 4 (time costs 1-4)
    assert "2 key files with costly KDF parameters were not tried" in str(e.value)
    assert f"keys/{5:032x}" in str(e.value) and f"keys/{4:032x}" in str(e.value)


def test_key_list_shows_no_terminal_escapes_and_no_hostile_number_crashes_it(
        store, monkeypatch, capsys):
    import argparse

    from pydr.cli import keys as cli

    _, keys = storekeys.create_store(store, b"one")
    [first] = key_ids(store)
    edit_key(store, first, label="\x1b[2J\x1b]0;owned\x07fake", host="\x1b[31mhost")
    storekeys.add_key(store, keys, b"two")
    [second] = [i for i in key_ids(store) if i != first]
    edit_key(store, second, created=1e300)
    store.put(store.key("keys", "f" * 32), b'{"version": 1, "id": "' + b"f" * 32
              + b'", "created": -Infinity}')
    monkeypatch.setattr(cli, "_objects", lambda args: store)
    assert cli.cmd_list(argparse.Namespace(store=store.spec, json=False)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J" in out and "\\x1b[31mhost" in out
    assert out.count("damaged") == 2 and "is not a time" in out and "-Infinity" in out
    assert cli.cmd_list(argparse.Namespace(store=store.spec, json=True)) == 0
    listed = json.loads(capsys.readouterr().out)["keys"]
    assert {k["id"]: k["label"] for k in listed}[first] == "\x1b[2J\x1b]0;owned\x07fake"


def test_an_oversized_config_or_key_file_is_refused_by_its_size_before_it_is_read():
    """A config or key file bigger than any pydr writes (keyfiles.MAX_FILE)
    is damage named by its object, and is never read whole (the store is
    asked with a bound); the store still opens from its sound key."""
    from pydr.dr.keysearch import read_keys

    store = MemoryStore(versioned=True)
    storekeys.create_store(store, b"pass")
    store.put(store.key("keys", "ab" * 16), b"{" + b" " * (1 << 20) + b"}")
    keys, damaged = read_keys(store)
    assert [d.id for d in damaged] == ["ab" * 16] and len(keys) == 1
    assert storekeys.unlock(store, b"pass")[1] is not None
    config = store.get(store.key("config"))
    store.put(store.key("config"), config + b" " * (1 << 20))
    with pytest.raises(FormatError) as e:
        storekeys.read_config(store)
    assert e.value.path == store.url(store.key("config"))
    assert store.sizes_read and max(store.sizes_read) <= keyfiles.MAX_FILE

"""Items whose replicas are in an object store (s3://BUCKET/PREFIX;
pydr.endpoints.s3, layout in docs/FORMAT.md): which items, their store,
and the vault's local copies of their newest index.

A cycle signs each source at 4 KiB and compares it with the signature of
the last point, kept in the vault (vault/objects/ITEM/), so the store is
never read back. The 4 MiB chunks holding a changed block are read, named
by their XXH3-128 (in an encrypted store: a keyed MAC, and sealed), and
uploaded unless the store has that id already (the
last point names it, or this cycle's interrupted predecessor uploaded it:
its ids are logged in vault/objects/ITEM/pending). All-zero chunks are not
stored. Then the point index is uploaded, and only then the vault records
the point with the index's key: no recorded point names a chunk that is
not stored. The capture is pydr.dr.chunkcapture; the points -- restore,
failover, retention, verify and garbage collection -- are the chunk
index's (pydr.dr.pointstores.chunkindex).

A store is opened in one place, :func:`chunk_store_at`: its config is
compared with the vault's record of it (object_stores) and an encrypted
one unlocked with the passphrase (docs/FORMAT.md, "Which store a vault
trusts"); :func:`prepare_store` makes a new one for ``pydr protect``.

Garbage collection never sweeps a chunk younger than the grace period: a
cycle running meanwhile has uploaded its new chunks within it
(docs/FORMAT.md, "Garbage collection").
"""

import os

from ..errors import FormatError, InvalidState, PassphraseRequired

BLOCK = 4096  # the comparison's block: what changed, in 4 KiB blocks
UPLOADS = 8   # chunks in flight
DEFAULT_GRACE = 24 * 3600.0
PENDING_TRUST = 0.5  # a logged upload is trusted for this share of the grace period


def is_object_item(vault, name):
    """Whether the item replicates to an object store."""
    return any(d["replica"].startswith("s3://") for d in vault.disks(name))


def has_object_points(vault, name):
    """Whether the item's points are in an object store (also after its
    failover moved its replicas to local disks)."""
    return vault.has_indexes(name)


def store_of(vault, name):
    """The ObjectStore of the item's replicas, or of its points."""
    from ..endpoints.s3 import ObjectStore

    latest = vault.latest_index(name)
    if latest is not None:  # its points' store (also half-way through a failover of its disks)
        return ObjectStore(latest.store)
    for d in vault.disks(name):
        if d["replica"].startswith("s3://"):
            return vault.endpoint(name, d["replica"]).store
    raise InvalidState(f"item {name!r} has neither replicas nor points in an object store",
                       path=vault.dir)


def chunk_store(vault, name):
    """The ChunkStore (pydr.dr.chunkstore) of the item's replicas or points:
    every chunk and index is read and written through it."""
    return chunk_store_at(vault, store_of(vault, name).spec)


def chunk_store_at(vault, spec):
    """The ChunkStore of the store `spec` (s3://BUCKET/PREFIX): THE place an
    object store is opened. Its config is read and compared with the
    vault's object_stores record; an encrypted store is unlocked with the
    vault's passphrase (``vault.passphrase``, else --passphrase-file's
    environment: PYDR_PASSPHRASE_FILE, PYDR_PASSPHRASE). The store's keys
    are kept in ``vault.unlocked`` for the vault's lifetime, never written.

    When the vault recorded an encrypted store and its config is gone or
    disagrees with the record (an attack, or an accident), a bucket that
    keeps versions opens it from them (pydr.dr.storeversions): the
    ChunkStore's ``tampered`` lists what was found, for verify, and
    :func:`put_back_config` repairs it.

    Raises PassphraseRequired (encrypted, no passphrase given) or
    WrongPassphrase (no key opens with it), both naming the store;
    FormatError naming the store when it is not the one the vault
    recorded (another id, its encryption changed, its config gone) and
    no version of it is left; the S3 errors of pydr.endpoints.s3 (no
    bucket, credentials refused)."""
    from ..endpoints.s3 import ObjectStore
    from .chunkstore import ChunkStore

    objects = ObjectStore(spec)
    if objects.spec not in vault.unlocked:
        vault.unlocked[objects.spec] = _open(vault, objects)
    chunks = ChunkStore(objects, vault.unlocked[objects.spec])
    found = vault.tampered_stores.get(objects.spec)
    if found is not None:
        chunks.tampered = [dict(f) for f in found.findings]
    return chunks


def put_back_config(vault, chunks):
    """Put back the config of a store found tampered with (its config
    deleted or overwritten: see :func:`chunk_store_at`): the recorded
    store's, as its newest good version has it. Returns what was found and
    put back, in words, for the item's warning; None when nothing was to
    be done. Key files deleted are not put back: their older versions still
    open the store, and a passphrase removed on purpose must stay removed.

    Raises the S3 errors of pydr.endpoints.s3 (the put refused, ...)."""
    found = vault.tampered_stores.get(chunks.spec)
    if found is None or not any(f["kind"] == "config" for f in found.findings):
        return None
    from .storekeys import CONFIG

    chunks.objects.put(chunks.objects.key(CONFIG), found.config)
    del vault.tampered_stores[chunks.spec]  # repaired: a long-running service says it once
    return (f"object store {chunks.spec} was tampered with ({'; '.join(found.texts())}): "
            f"its config was put back")


def prepare_store(vault, spec, *, encrypt=True):
    """Open the store `spec` for a new item (``pydr protect``), making it
    when its prefix is empty: encrypted (a passphrase key and the config,
    pydr.dr.storekeys.create_store) unless `encrypt` is False. A store
    already there is opened as it is (a version-1 store, without a
    config, stays unencrypted), and checked against the vault's record as
    :func:`chunk_store_at` checks it; an unencrypted one the vault has no
    record of is joined only when `encrypt` is False. Writes nothing into the vault: the
    caller records ``(spec, id, encryption)`` with the item.

    Returns:
        (store id, encryption, key check) to record: ("", "none", None) for
        a version-1 store.

    Raises:
        As chunk_store_at (a wrong passphrase before anything is written);
        InvalidState naming the store when it is unencrypted (objects
        without a config, or a config saying "none"), the vault has no
        record of it and `encrypt` is True; the S3 errors when the bucket cannot be reached.
    """
    from ..endpoints.s3 import ObjectStore
    from . import storekeys

    objects = ObjectStore(spec)
    objects.check()  # a missing bucket or refused credentials: said now, not as "no config"
    record = vault.object_store(objects.spec)
    fresh = record is None and storekeys.read_config(objects) is None
    if fresh and _has(objects, "keys"):  # a creation cut short (by a kill): finished
        config, keys = storekeys.create_store(objects, _passphrase(vault, objects.spec))
        found = (config.id, config.encryption, config.key_check)
    elif fresh and not _has(objects, "chunks") and not _has(objects, "indexes"):
        passphrase = _passphrase(vault, objects.spec) if encrypt else None
        config, keys = storekeys.create_store(objects, passphrase, encrypt=encrypt)
        found = (config.id, config.encryption, config.key_check)
    else:
        keys, found, tampering = _unlock(vault, objects, record)
        if record is None and found[:2] == (V1_ID, PLAIN):
            _refuse_sealed_without_keys(objects)
        if record is None and encrypt and found[1] == PLAIN:
            _refuse_plain(objects.spec, found)
        if tampering is not None:
            vault.tampered_stores[objects.spec] = tampering
    vault.unlocked[objects.spec] = keys
    return found


def _refuse_sealed_without_keys(objects):
    """FormatError naming the store when a prefix with no config holds
    sealed objects: an encrypted store whose config and key files are gone
    (deleted in a bucket without versions). Joining it unencrypted would
    write plain chunks beside the sealed ones."""
    from ..engine.sealing import MAGIC, is_sealed
    from .chunkstore import MAX_CHUNK_OBJECT, MAX_INDEX_OBJECT

    for under, bound in (("indexes", MAX_INDEX_OBJECT), ("chunks", MAX_CHUNK_OBJECT)):
        for key, _, size in objects.list(under):
            if size < len(MAGIC) or size > bound:  # not an object pydr writes
                continue
            if is_sealed(objects.get(key, max_size=bound)[:len(MAGIC)]):
                raise FormatError(f"object store {objects.spec} holds sealed objects ({key}) "
                                  f"but no config and no key files: an encrypted store whose "
                                  f"keys are gone; refused", path=objects.url(key),
                                  hint="put back copies of its config and keys/ (any S3 "
                                       "client), or give another prefix")
            break  # one object of each kind tells


def _refuse_plain(spec, found):
    """InvalidState: an unencrypted store the vault has no record of is not
    joined unless the caller opted out of encryption -- objects put in an
    empty prefix before the first protect (by anyone who can write there)
    must not make pydr write plain chunks."""
    what = (f"a config of store {found[0]} saying encryption 'none'" if found[0] else
            "objects but no config (a version-1 store, unencrypted)")
    raise InvalidState(f"object store {spec} holds {what}: protecting into it would write "
                       f"plain chunks, and encryption was asked for; refused", path=spec,
                       hint="join the unencrypted store knowingly with --no-encrypt "
                            "(pydr.Vault.protect(..., encrypt=False)), or give another prefix")


#: what the vault records for a version-1 store (chunks and indexes, no config)
V1_ID, PLAIN = "", "none"


def _has(objects, under):
    return next(iter(objects.list(under)), None) is not None


def _passphrase(vault, spec):
    """The passphrase the caller gave the vault, else the environment's, else
    one typed at the terminal when the caller (the CLI) set
    ``vault.ask_passphrase`` (asked once a command)."""
    if vault.passphrase is not None:
        return vault.passphrase
    from .storekeys import passphrase_from

    found = passphrase_from()
    ask = getattr(vault, "ask_passphrase", None)
    if found is None and ask is not None:
        found = vault.passphrase = ask(f"passphrase of {spec}: ")
    if found is None:
        raise PassphraseRequired(
            "the object store is encrypted and no passphrase was given", path=spec,
            hint="give it with --passphrase-file FILE, PYDR_PASSPHRASE_FILE or PYDR_PASSPHRASE "
                 "(pydr.Vault(..., passphrase=...)); for a new store, --no-encrypt opts out")
    return found


def _open(vault, objects):
    """The DataKeys of the store (None: unencrypted), checked against the
    vault's record; a writer records a store it had no record of (a vault
    older than the record: its first sight)."""
    objects.check()
    record = vault.object_store(objects.spec)
    keys, found, tampering = _unlock(vault, objects, record)
    if tampering is not None:
        vault.tampered_stores[objects.spec] = tampering
    if record is None and vault.writer:
        vault.add_object_store(objects.spec, *found)
    elif record is not None and record.key_check is None and found[2] and vault.writer:
        vault.set_key_check(objects.spec, found[2])  # recorded before key checks: first sight
    return keys


def _unlock(vault, objects, record):
    """(DataKeys or None, (id, encryption) found, Tampering or None) of the
    store, refused (FormatError) when it disagrees with `record` -- unless
    the vault recorded an encrypted store and the bucket keeps versions:
    then it is opened from its versions (pydr.dr.storeversions), and the
    Tampering says what was done to it."""
    from . import storekeys

    spec = objects.spec
    try:
        config, damaged = storekeys.read_config(objects), None
    except FormatError as exc:
        config, damaged = None, exc
    if _from_versions_possible(record):
        from . import storeversions

        problem = storeversions.config_problem(config, damaged, record)
        if problem is not None and objects.versioned():
            keys, tampering = storeversions.open_from_versions(
                objects, record, _passphrase(vault, spec), problem)
            return keys, (record.id, record.encryption, record.key_check), tampering
    if damaged is not None:
        raise damaged
    if config is None:
        _compare(spec, record, V1_ID, PLAIN)
        if record is None and _has(objects, "keys"):  # a creation cut short: its key says
            config, keys = storekeys.unlock(objects, _passphrase(vault, spec))
            return keys, (config.id, config.encryption, config.key_check), None
        return None, (V1_ID, PLAIN, None), None
    _compare(spec, record, config.id, config.encryption)
    # an unencrypted config is checked too: key files beside "none" are a downgrade
    passphrase = _passphrase(vault, spec) if config.encrypted else None
    # the key check the vault recorded: a config rewritten to vouch for another master
    # key (a forged key file) is refused
    config, keys = storekeys.unlock(objects, passphrase, expect_id=config.id,
                                    expect_check=record.key_check if record else None)
    _compare(spec, record, config.id, config.encryption)  # as unlock read it: no race
    return keys, (config.id, config.encryption, config.key_check), None


def _from_versions_possible(record):
    """Whether the vault recorded an encrypted store (one with an id): its
    config and keys can then be found in older versions."""
    return record is not None and bool(record.id) and record.encryption != PLAIN


def _compare(spec, record, found_id, encryption):
    """FormatError naming the store unless (`found_id`, `encryption`) is
    what the vault recorded (nothing recorded: any is accepted). A store
    swapped or downgraded must never make pydr write plain chunks into it
    or trust objects that are not its own."""
    if record is None or (record.id, record.encryption) == (found_id, encryption):
        return
    was = f"store {record.id} ({record.encryption})" if record.id else \
        "a version-1 store (no config, unencrypted)"
    if not found_id:
        now = "its config is gone"
    elif record.id != found_id:
        now = f"its config names store {found_id} ({encryption})"
    else:
        now = f"its config says encryption {encryption!r}"
    raise FormatError(f"object store {spec} is not the store this vault recorded: the vault "
                      f"recorded {was}, and {now}; refused (pydr neither writes plain chunks "
                      f"into an encrypted store nor trusts another store's objects)", path=spec,
                      hint="if the bucket was restored or replaced, put back its config; a "
                           "store that is really new needs items protected anew")


def _dir(vault, name):
    path = os.path.join(vault.dir, "objects", name)
    os.makedirs(path, mode=0o700, exist_ok=True)  # in the vault: private
    return path


def latest_index(vault, name):
    """(point id, index key, local name, index version, retain-until) of the
    item's newest point, or None."""
    latest = vault.latest_index(name)
    if latest is None:
        return None
    return (latest.point, latest.key, os.path.basename(latest.key)[:-len(".pidx")],
            latest.version, latest.retain_until)

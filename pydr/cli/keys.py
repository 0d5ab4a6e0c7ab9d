"""pydr key list|add|remove|passwd|recover|create-recovery: the keys of an
encrypted object store (pydr.dr.storekeys; formats in docs/FORMAT.md).
Passphrases come from files, the environment or a terminal prompt
(pydr.dr.passphrases), never from the command line."""

from .common import add_json, add_vault_dir, command, print_json, timestamp
from ..errors import InvalidArgument, InvalidState, PassphraseRequired, PydrError

STORE_HELP = "the object store: s3://BUCKET/PREFIX, or an item replicated to it"

PASSPHRASES = """\
passphrases (never on the command line):
  the store's        --passphrase-file FILE, $PYDR_PASSPHRASE_FILE, $PYDR_PASSPHRASE
  a new one          --new-passphrase-file FILE, $PYDR_NEW_PASSPHRASE_FILE,
                     $PYDR_NEW_PASSPHRASE
  a recovery key's   --recovery-passphrase-file FILE, $PYDR_RECOVERY_PASSPHRASE_FILE,
                     $PYDR_RECOVERY_PASSPHRASE
  in that order; a file's trailing newline is not part of it. With none of them and
  standard input a terminal, pydr asks (a new passphrase twice). A wrong passphrase
  exits with status 4 before anything is written."""


def _objects(args):
    """The ObjectStore that STORE names (a URL, or an item's store)."""
    return _objects_and_check(args)[0]


def _objects_and_check(args):
    """(the ObjectStore that STORE names, the key check the vault records
    for it: None for a URL or no record)."""
    from ..endpoints.s3 import SCHEME, ObjectStore

    if args.store.startswith(SCHEME):
        return ObjectStore(args.store), None
    from ..dr.objectstore import store_of
    from .vault import open_vault

    with open_vault(args) as v:
        v.store.item(args.store)  # UnknownName (exit 3) when there is no such item
        objects = ObjectStore(store_of(v.store, args.store).spec)
        record = v.store.object_store(objects.spec)
        return objects, getattr(record, "key_check", None)


def _text(value):
    """`value` for a terminal: control characters (a hostile key file's
    label or host may hold escape sequences) shown escaped."""
    text = "" if value is None else str(value)
    return "".join(c if c.isprintable() else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   for c in text)


def _passphrase(args, objects):
    from ..dr.passphrases import ask_passphrase, passphrase_from

    given = passphrase_from(args.passphrase_file) or ask_passphrase(
        f"passphrase of {objects.spec}: ")
    if given is None:
        raise PassphraseRequired("an encrypted store: its passphrase is needed (none given)",
                                 path=objects.spec,
                                 hint="give it with --passphrase-file FILE, "
                                      "PYDR_PASSPHRASE_FILE or PYDR_PASSPHRASE")
    return given


def _new_passphrase(args, what="the new passphrase"):
    from ..dr.passphrases import ask_passphrase, new_passphrase_from

    given = new_passphrase_from(args.new_passphrase_file) or ask_passphrase(
        f"{what}: ", twice=True)
    if given is None:
        raise InvalidArgument(f"{what} is needed: give it with --new-passphrase-file FILE, "
                              "PYDR_NEW_PASSPHRASE_FILE or PYDR_NEW_PASSPHRASE")
    return given


def _recovery_passphrase(args, twice=False):
    from ..dr.passphrases import ask_passphrase, recovery_passphrase_from

    given = recovery_passphrase_from(args.recovery_passphrase_file) or ask_passphrase(
        "passphrase of the recovery private key: ", twice=twice)
    if given is None:
        raise InvalidArgument("the recovery private key's passphrase is needed: give it with "
                              "--recovery-passphrase-file FILE, PYDR_RECOVERY_PASSPHRASE_FILE "
                              "or PYDR_RECOVERY_PASSPHRASE")
    return given


def _unlocked(args, objects, check=None):
    from ..dr.storekeys import read_config, unlock

    config = read_config(objects)  # before asking a passphrase that is not needed
    if config is not None and not config.encrypted:
        raise InvalidState("the store is unencrypted (its config says \"encryption\": "
                           "\"none\"): it has no keys", path=objects.spec)
    config, keys = unlock(objects, _passphrase(args, objects), expect_check=check)
    if keys is None:
        raise InvalidState("the store is unencrypted: it has no keys", path=objects.spec)
    return keys


def _added(objects, add):
    """(KeyInfo dict, whether it was there already) of `add()`, which
    returns an existing key rather than adding a second one."""
    from ..dr.storekeys import list_keys

    before = {k.id for k in list_keys(objects)}
    info = add().to_dict()
    return info, info["id"] in before


def _show_added(args, info, there):
    if args.json:
        print_json({**info, "already_there": there})
    elif there:
        _show(info, "already there:")
    else:
        _show(info, "added")


def _show(info, verb):
    label = f" ({info['label']})" if info.get("label") else ""
    print(_text(f"{verb} {info['kind']} key {info['id']}{label}"))


def cmd_list(args):
    from ..dr.storekeys import list_keys, read_config

    objects = _objects(args)
    config = read_config(objects)
    keys = [k.to_dict() for k in list_keys(objects)]
    if args.json:
        print_json({"store": objects.spec, "config": config.to_dict() if config else None,
                    "keys": keys})
        return 0
    if config is None:
        state = "no config (a version-1 store, an empty prefix, or a creation cut short)"
    else:
        state = f"store {config.id}, encryption {config.encryption}"
    print(_text(f"{objects.spec}: {state}, {len(keys)} keys"))
    for k in keys:
        print(f"  {_text(k['id'])}  {_text(k['kind'] or 'damaged'):<10}  "
              f"{_when(k['created']):<19}  {_text(k['host'] or '-')}  {_text(k['label'])}")
        if k["problem"]:
            print(f"    problem: {_text(k['problem'])}")
    return 0


def _when(created):
    try:
        return timestamp(created) or "-"
    except (OverflowError, OSError, ValueError):  # keyfiles refuses these: never a crash
        return "-"


def cmd_add(args):
    from ..dr.storekeys import add_key

    objects, check = _objects_and_check(args)
    keys = _unlocked(args, objects, check)
    new = _new_passphrase(args)
    info, there = _added(objects, lambda: add_key(objects, keys, new, label=args.label))
    _show_added(args, info, there)
    return 0


def cmd_remove(args):
    from ..dr.storekeys import remove_key

    objects, check = _objects_and_check(args)
    keys = _unlocked(args, objects, check)
    removed = remove_key(objects, keys, args.key_id)
    print_json({"store": objects.spec, "removed": removed}) if args.json \
        else print(f"removed key {removed}")
    return 0


def cmd_passwd(args):
    from ..dr.storekeys import change_passphrase

    objects = _objects(args)
    old = _passphrase(args, objects)
    info = change_passphrase(objects, old, _new_passphrase(args)).to_dict()
    print_json(info) if args.json else _show(info, "the passphrase now opens")
    if not args.json:
        print(_PASSWD_NOTE)
    return 0


_PASSWD_NOTE = ("note: only the new passphrase opens the store now: update the passphrase "
                "file or variable that 'pydr run' (PYDR_PASSPHRASE_FILE, --passphrase-file; "
                "it is read again each round) and your scripts use")


def cmd_create_recovery(args):
    from ..dr.keyrecovery import add_recovery
    from ..dr.storekeys import make_recovery_pair

    objects, check = _objects_and_check(args)
    keys = _unlocked(args, objects, check)  # the store opens, before any file is made
    private = None  # the pair's private key, when it was made already (a rerun)
    if args.private_key:
        passphrase = _recovery_passphrase(args, twice=True)
        try:
            make_recovery_pair(args.private_key, args.public_key, passphrase)
        except FileExistsError as exc:
            private = _made_already(args, passphrase)
            if private is None:
                raise InvalidState("a file is in the way: a key pair is never written over one",
                                   path=exc.filename,
                                   hint=f"to seal the store to the public key "
                                        f"{args.public_key} already made, leave out "
                                        f"--private-key") from None
    with open(args.public_key, "rb") as f:
        public = f.read(1 << 16)
    info, there = _added(objects, lambda: add_recovery(objects, keys, public, label=args.label,
                                                       private=private))
    _show_added(args, info, there)
    return 0


def _made_already(args, passphrase):
    """The private key of --private-key when it and --public-key are both
    there and a pair: the private key opens with `passphrase` and its public
    key is the public key file's (a run killed after making them); else None."""
    from ..dr import recoverykey

    try:
        with open(args.private_key, "rb") as f:
            private = recoverykey.load_private(f.read(1 << 16), passphrase, args.private_key)
        with open(args.public_key, "rb") as f:
            public = recoverykey.load_public(f.read(1 << 16), args.public_key)
    except (OSError, PydrError):
        return None
    same = recoverykey.recipient(private.public_key()) == recoverykey.recipient(public)
    return private if same else None


def cmd_recover(args):
    from ..dr.keyrecovery import recover

    objects, check = _objects_and_check(args)
    with open(args.private_key, "rb") as f:
        private = f.read(1 << 16)
    info = recover(objects, private, _recovery_passphrase(args), _new_passphrase(args),
                   where=args.private_key, expect_check=check).to_dict()
    print_json(info) if args.json else _show(info, "recovered: the new passphrase opens")
    return 0


def _common(p, *, passphrase=True, new=False, recovery=False):
    p.add_argument("store", metavar="STORE", help=STORE_HELP)
    if passphrase:
        p.add_argument("--passphrase-file", metavar="FILE",
                       help="the store's passphrase is in FILE (default: $PYDR_PASSPHRASE_FILE, "
                            "$PYDR_PASSPHRASE, else asked at a terminal)")
    if new:
        p.add_argument("--new-passphrase-file", metavar="FILE",
                       help="the new passphrase is in FILE (default: $PYDR_NEW_PASSPHRASE_FILE, "
                            "$PYDR_NEW_PASSPHRASE, else asked twice at a terminal)")
    if recovery:
        p.add_argument("--recovery-passphrase-file", metavar="FILE",
                       help="the recovery private key's passphrase is in FILE (default: "
                            "$PYDR_RECOVERY_PASSPHRASE_FILE, $PYDR_RECOVERY_PASSPHRASE, else "
                            "asked at a terminal)")
    add_vault_dir(p)
    add_json(p, "print one JSON object")


def _command(ksub, name, help, description, examples, func):
    return command(ksub, name, help=help, description=description + "\n\n" + PASSPHRASES,
                   examples=examples, func=func)


def register(sub):
    p = command(
        sub, "key", help="the keys of an encrypted object store",
        description=("An encrypted object store (s3://BUCKET/PREFIX) has one random master key,\n"
                     "kept in the bucket only sealed: under each passphrase key (argon2id), and\n"
                     "under each recovery key (an X25519 public key whose private key is kept\n"
                     "offline). Any one passphrase opens the store; the recovery private key\n"
                     "adds a passphrase when all are lost. Key files: PREFIX/keys/ID\n"
                     "(docs/FORMAT.md, \"Store config and key files\")."),
        examples=["pydr key list s3://dr-bucket/site-b",
                  "pydr key add web --passphrase-file ~/.pydr-pass --new-passphrase-file new",
                  "pydr key create-recovery s3://dr-bucket/site-b --private-key recovery.pem "
                  "--public-key recovery.pub"],
        func=None)
    ksub = p.add_subparsers(dest="key_command",
                            metavar="list|add|remove|passwd|recover|create-recovery")
    ksub.required = True

    q = _command(ksub, "list", "list a store's keys (no passphrase needed)",
                 "List the key files of STORE: id, kind (passphrase or recovery), when and on\n"
                 "which host each was made, its label. Nothing sealed is opened: no passphrase\n"
                 "is needed. A damaged or foreign file is listed with its problem.",
                 ["pydr key list s3://dr-bucket/site-b", "pydr key list web --json"], cmd_list)
    _common(q, passphrase=False)

    q = _command(ksub, "add", "add a passphrase that opens the store",
                 "Open STORE with its passphrase, then add a key sealing its master key under\n"
                 "a new passphrase. Either passphrase opens the store afterwards. When a key\n"
                 "for the new passphrase is there already (a rerun), nothing is added: it\n"
                 "says \"already there\" and exits 0.",
                 ["pydr key add s3://dr-bucket/site-b --label ops",
                  "PYDR_NEW_PASSPHRASE_FILE=/root/second pydr key add web"], cmd_add)
    _common(q, new=True)
    q.add_argument("--label", metavar="TEXT", help="a label for the new key (who holds it)")

    q = _command(ksub, "remove", "remove a key",
                 "Open STORE with its passphrase, then remove key KEY_ID (the full id or a\n"
                 "unique prefix of 4 digits or more, as 'pydr key list' shows). The store's\n"
                 "last passphrase key is never removed (exit 15).",
                 ["pydr key remove s3://dr-bucket/site-b 3f2a9c01"], cmd_remove)
    _common(q)
    q.add_argument("key_id", metavar="KEY_ID", help="the key to remove")

    q = _command(ksub, "passwd", "change the store's passphrase",
                 "Add a key for the new passphrase, then remove the keys the old one opens.\n"
                 "Interrupted, the store opens with the old or the new passphrase; the same\n"
                 "command again finishes the change. Then only the new one opens the store:\n"
                 "update the passphrase file 'pydr run' (read each round) and scripts use.",
                 ["pydr key passwd s3://dr-bucket/site-b --passphrase-file old "
                  "--new-passphrase-file new"], cmd_passwd)
    _common(q, new=True)

    q = _command(ksub, "create-recovery", "add a recovery key (making its key pair)",
                 "Open STORE with its passphrase, then seal its master key to a recovery\n"
                 "public key. With --private-key, a new X25519 key pair is made first: the\n"
                 "private key (PEM PKCS#8, encrypted with the recovery passphrase, mode 0600)\n"
                 "and the public key are written to files that must not exist. Keep the\n"
                 "private key and its passphrase offline: with them 'pydr key recover' opens\n"
                 "the store when every passphrase is lost. Without --private-key, an existing\n"
                 "public key is used (one recovery key for many stores). The same command\n"
                 "again (the files a matching pair) finishes, and adds no second recovery key\n"
                 "that the private key opens (\"already there\", exit 0). (Without\n"
                 "--private-key, one there already cannot be told from a forged one: another\n"
                 "is added.)",
                 ["pydr key create-recovery s3://dr-bucket/site-b --private-key /media/usb/"
                  "dr.pem --public-key dr.pub",
                  "pydr key create-recovery web --public-key dr.pub"], cmd_create_recovery)
    _common(q, recovery=True)
    q.add_argument("--public-key", metavar="FILE", required=True,
                   help="the recovery public key (PEM); made when --private-key is given")
    q.add_argument("--private-key", metavar="FILE",
                   help="make a new key pair, writing the private key to FILE")
    q.add_argument("--label", metavar="TEXT", help="a label for the recovery key")

    q = _command(ksub, "recover", "open a store with its recovery key and set a passphrase",
                 "Open STORE with a recovery private key (and its passphrase), then add a\n"
                 "key for a new passphrase. For when every passphrase of the store is lost.",
                 ["pydr key recover s3://dr-bucket/site-b --private-key /media/usb/dr.pem"],
                 cmd_recover)
    _common(q, passphrase=False, new=True, recovery=True)
    q.add_argument("--private-key", metavar="FILE", required=True,
                   help="the recovery private key (PEM)")

"""The options that set protection policy fields, shared by `pydr policy`
and `pydr protect` (pydr.cli.policy, pydr.cli.vault), and the policy fields
they give. The values are checked by pydr.dr.policy, which refuses a bad one
before anything is recorded."""

KEEP_PERIODS = ("hourly", "daily", "weekly", "monthly")


def add_policy_options(p, *, protect=False):
    """The options that set policy fields (`pydr protect` takes the first
    ones: a target, retention tiers and a priority). Their values are read
    by pydr.dr.policy, which refuses a bad one before anything is recorded."""
    p.add_argument("--rpo", metavar="DUR",
                   help="target RPO: the newest point's data should stay younger than DUR "
                        "(30s, 5m, 2h, 1d); 'pydr run' schedules the item to keep it")
    p.add_argument("--rpo-critical", metavar="DUR",
                   help="the RPO at which health turns critical (default: twice --rpo; not "
                        "less than the target)")
    p.add_argument("--priority", metavar="N",
                   help="-1000 to 1000 (default 0): higher runs first when more items are due "
                        "than 'pydr run --jobs' runs at once")
    p.add_argument("--keep-within", metavar="DUR",
                   help="retention tiers: keep every point of the last DUR (replaces "
                        "--retention/--retention-age for this item)")
    for period in KEEP_PERIODS:
        unit = {"hourly": "hour", "daily": "day", "weekly": "ISO week",
                "monthly": "month"}[period]
        p.add_argument(f"--keep-{period}", metavar="N",
                       help=f"retention tiers: keep the newest point of each of the last N "
                            f"{unit}s (UTC) that have one")
    p.add_argument("--lock", metavar="DAYS",
                   help="S3 Object Lock: each new point's objects in the object store stay "
                        "locked DAYS days (and a slack: 10%%, at least a day); the bucket "
                        "needs Object Lock enabled")
    p.add_argument("--lock-mode", metavar="MODE", choices=("compliance", "governance"),
                   help="compliance (the default: nobody can shorten or lift the lock) or "
                        "governance (who may bypass governance retention can)")
    if protect:
        return
    p.add_argument("--app-consistent-every", metavar="DUR",
                   help="a cycle runs the quiesce hooks when the newest app-consistent point "
                        "is older than DUR (items with hooks)")
    p.add_argument("--bwlimit", metavar="RATE",
                   help="upload limit in bytes a second (512K, 10M, 1G: powers of 1024) "
                        "outside every --bwlimit-window")
    p.add_argument("--bwlimit-window", action="append", metavar="HH:MM-HH:MM=RATE",
                   help="the upload limit between two local times (22:00-06:00 wraps "
                        "midnight); repeat for several; replaces the windows set before")
    p.add_argument("--alert-command", action="append", metavar="CMD",
                   help="a shell command run on each change of RPO health, with the event as "
                        "JSON on stdin (docs/JSON.md); repeat for several; replaces the "
                        "commands set before; hidden in the vault's lock line")


def whole_number(text, option):
    """`text` as an int, or InvalidArgument naming `option`."""
    from ..errors import InvalidArgument

    try:
        return int(text, 10)
    except ValueError:
        raise InvalidArgument(f"{option} must be a whole number, not {text!r}") from None


def policy_fields(args, current_keep=None):
    """The policy fields the options of `args` set ({} when none), as
    pydr.dr.policy.set_policy takes them; --keep-* options change only their
    own tier of `current_keep` (a Tiers, or None)."""
    from ..dr.policy import parse_duration
    from ..errors import InvalidArgument

    given = {"target_rpo": args.rpo, "rpo_critical": args.rpo_critical,
             "priority": args.priority, "lock_days": getattr(args, "lock", None),
             "lock_mode": getattr(args, "lock_mode", None)}
    for field in ("app_consistent_every", "bwlimit"):
        given[field] = getattr(args, field, None)
    windows = getattr(args, "bwlimit_window", None)
    commands = getattr(args, "alert_command", None)
    fields = {k: v for k, v in given.items() if v is not None}
    if windows is not None:
        fields["bwlimit_windows"] = windows
    if commands is not None:
        fields["alert_commands"] = commands
    keep = {f"keep_{p}": getattr(args, f"keep_{p}") for p in ("within",) + KEEP_PERIODS}
    if any(v is not None for v in keep.values()):
        tiers = dict(current_keep.to_dict()) if current_keep is not None else {}
        if keep["keep_within"] is not None:
            try:
                tiers["within"] = parse_duration(keep["keep_within"])
            except InvalidArgument as exc:
                raise InvalidArgument(f"--keep-within: {exc}") from None
        for period in KEEP_PERIODS:
            if keep[f"keep_{period}"] is not None:
                tiers[period] = whole_number(keep[f"keep_{period}"], f"--keep-{period}")
        fields["keep"] = tiers
    return fields

"""The policy commands: `pydr policy` (show or change the protection policy
of an item or a group: what `pydr run` keeps it at) and `pydr alerts` (the
changes of RPO health `pydr run` recorded). Each opens the vault
(pydr.dr.vault.Vault), makes its API calls and presents the result."""

import re
import time

from .common import add_vault_options, command, human_bytes, print_json, timestamp
from .policy_options import add_policy_options, policy_fields, whole_number

#: --clear's names (the options' own) for the policy's fields
CLEARABLE = {"rpo": "target_rpo", "rpo-critical": "rpo_critical",
             "app-consistent-every": "app_consistent_every", "keep": "keep",
             "bwlimit": "bwlimit", "bwlimit-window": "bwlimit_windows",
             "priority": "priority", "alert-command": "alert_commands", "lock": "lock_days",
             "lock-mode": "lock_mode", "all": "all"}
_LABELS = {"target_rpo": "target RPO", "rpo_critical": "critical RPO",
           "app_consistent_every": "app-consistent every", "keep": "keep",
           "bwlimit": "bandwidth limit", "bwlimit_windows": "bandwidth windows",
           "priority": "priority", "alert_commands": "alert commands",
           "lock_days": "Object Lock", "lock_mode": "Object Lock mode"}


def _cleared(names):
    """--clear's names as policy fields ("all" for all); InvalidArgument
    for a name that is no field."""
    from ..errors import InvalidArgument

    fields = []
    for name in names or ():
        key = name.strip().lower().replace("_", "-").removesuffix("s")
        key = {"target-rpo": "rpo", "alert-commands": "alert-command", "lock-day": "lock",
               "bwlimit-windows": "bwlimit-window"}.get(key, key)
        if key not in CLEARABLE:
            raise InvalidArgument(f"--clear {name!r}: not a policy field (fields: "
                                  f"{', '.join(CLEARABLE)})")
        fields.append(CLEARABLE[key])
    return fields


def cmd_policy(args):
    from .vault import open_vault

    cleared = _cleared(args.clear)
    scope = "group" if args.group else "item"
    probe = policy_fields(args)  # options given at all? (values are checked by set_policy)
    with open_vault(args, writer=bool(probe or cleared)) as v:
        if probe or cleared:
            from ..dr.policy import FIELDS

            keep = None
            if "keep" in probe and "keep" not in cleared and "all" not in cleared:
                own, sources = v.policy_sources(args.name, group=args.group)
                keep = own.keep if sources["keep"] == scope else None
            fields = policy_fields(args, keep)
            gone = FIELDS if "all" in cleared else cleared
            # one call, one transaction: None clears a field
            v.set_policy(args.name, group=args.group,
                         **{**{f: None for f in gone}, **fields})
        policy, sources = v.policy_sources(args.name, group=args.group)
    if args.json:
        print_json({"type": "policy", "version": 1, "name": args.name, "scope": scope,
                    "policy": policy.to_dict(), "sources": sources})
        return 0
    title = f"group {args.name}" if args.group else args.name
    print(f"{title}: protection policy" + ("" if args.group else
                                           " (item, else its group, else the default)"))
    for field, value in _shown(policy):
        source = sources[field]
        if field == "rpo_critical" and policy.rpo_critical is None and policy.target_rpo:
            source = "default: twice the target"
        print(f"  {_LABELS[field]:<22} {value}  ({source})")
    return 0


def _seconds(value):
    return "not set" if value is None else f"{value:g} s"


def _rate(value):
    return f"{human_bytes(value)}/s"


def _shown(policy):
    """(field, text) of each field of `policy`, for a person."""
    yield "target_rpo", ("not set (pydr run does not schedule it)" if policy.target_rpo is None
                         else _seconds(policy.target_rpo))
    yield "rpo_critical", _seconds(policy.critical_after())
    yield "app_consistent_every", ("never" if policy.app_consistent_every is None
                                   else _seconds(policy.app_consistent_every))
    yield "keep", ("the item's --retention" if policy.keep is None
                   else policy.keep.describe())
    yield "bwlimit", "none" if policy.bwlimit is None else _rate(policy.bwlimit)
    yield "bwlimit_windows", (", ".join(f"{s}-{e}={_rate(r)}"
                                        for s, e, r in policy.bwlimit_windows) or "none")
    yield "priority", str(policy.priority)
    yield "alert_commands", ("; ".join(repr(c) for c in policy.alert_commands) or "none")
    yield "lock_days", "none" if policy.lock_days is None else f"{policy.lock_days:g} days"
    yield "lock_mode", policy.to_dict()["lock_mode"] or "none"


def parse_when(text, now=None):
    """--since: epoch seconds, a duration ago (90s, 15m, 2h, 7d: a unit is
    needed) or an ISO 8601 time (2026-12-07T05:00:00Z; no zone: local time)."""
    import datetime
    import math

    from ..dr.policy import parse_duration
    from ..errors import InvalidArgument

    try:
        epoch = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(epoch):
            return epoch
    if text[-1:].lower() in ("s", "m", "h", "d", "w"):
        try:
            return (time.time() if now is None else now) - parse_duration(text)
        except InvalidArgument as exc:
            raise InvalidArgument(f"--since: {exc}") from None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(f"--since {text!r}: not a time (expected epoch seconds, an ISO "
                              "8601 time such as 2026-12-07T05:00:00Z, or a duration ago "
                              "such as 2h)") from None
    return when.timestamp()


def _secs(value):
    """Seconds for a person: one decimal below 10 s ("5.2 s"), whole above."""
    return f"{round(value, 1):g} s" if value < 10 else f"{value:.0f} s"


# what check_transitions says when it says no more than the RPO and the target
_PLAIN = re.compile(r"RPO [\d.]+ s (>|<=) target [\d.]+ s")


def alert_line(a):
    """One alert as one line: id, time, item, old -> new, RPO and target,
    and its message only where it says more (a threshold, "no point ...")."""
    rpo = "no point" if a.rpo_seconds is None else f"RPO {_secs(a.rpo_seconds)}"
    target = "" if a.target_rpo is None else f", target {_secs(a.target_rpo)}"
    why = a.message or ""
    prefix = f"{a.old or 'none'} -> {a.new}: "
    why = why[len(prefix):] if why.startswith(prefix) else why
    more = "" if not why or _PLAIN.fullmatch(why) else f": {why}"
    return (f"{a.id:>5}  {timestamp(a.at.timestamp())}  {a.item:<16} "
            f"{a.old or '-'} -> {a.new}  {rpo}{target}{more}")


def cmd_alerts(args):
    from .vault import open_vault

    since = None if args.since is None else parse_when(args.since)
    limit = None if args.limit is None else whole_number(args.limit, "--limit")
    with open_vault(args) as v:
        alerts = v.alerts(args.item, since=since, limit=limit)
    if args.json:
        print_json([a.to_dict() for a in alerts])
        return 0
    for a in alerts:  # oldest first, the newest last, above the prompt
        print(alert_line(a))
    return 0


def register(sub):
    p = command(
        sub, "policy", help="show or set the protection policy of an item or group",
        description=(
            "Show or change the protection policy of item NAME (or, with --group, of group\n"
            "NAME: it applies to each member). 'pydr run' keeps every item with a target RPO\n"
            "inside it: it runs a cycle when the newest point's data is half the target old,\n"
            "turns the item's RPO health 'warning' past the target and 'critical' past\n"
            "--rpo-critical, runs the --alert-command(s) on each change, and thins old\n"
            "points by the --keep-* tiers.\n\n"
            "An item's effective policy takes each field from its own policy where it sets\n"
            "it, else from its group's, else the default. With no option the effective\n"
            "policy is shown, with where each field comes from. Options change only the\n"
            "fields they name; --clear FIELD removes one (it is then inherited), --clear all\n"
            "the whole policy. Every value is checked before anything is recorded: a bad one\n"
            "exits 2 and changes nothing. DUR: 30, 30s, 5m, 2h, 1d. RATE: bytes a second,\n"
            "512K, 10M, 1G (powers of 1024). Windows are local time.\n\n"
            "A running 'pydr run' applies a changed policy at its next round, or at once on\n"
            "SIGHUP."),
        examples=["pydr policy web",
                  "pydr policy web --rpo 30s --rpo-critical 2m --priority 10",
                  "pydr policy shop --group --rpo 5m --keep-within 1h --keep-hourly 24 "
                  "--keep-daily 30",
                  "pydr policy db --bwlimit 100M --bwlimit-window 08:00-18:00=10M",
                  "pydr policy db --alert-command 'logger -t pydr' "
                  "--alert-command '/usr/local/bin/page-oncall'",
                  "pydr policy web --clear rpo-critical --clear keep",
                  "pydr policy web --lock 30 --lock-mode governance",
                  "pydr policy web --json | jq .policy.target_rpo"],
        func=cmd_policy)
    p.add_argument("name", metavar="NAME", help="the item (with --group: the group)")
    p.add_argument("--group", action="store_true", help="NAME is a group")
    add_policy_options(p)
    p.add_argument("--clear", action="append", metavar="FIELD",
                   help="remove a field of this policy (then inherited): "
                        + ", ".join(CLEARABLE) + "; repeat for several")
    add_vault_options(p)

    p = command(
        sub, "alerts", help="list the changes of RPO health pydr run recorded",
        description=(
            "List the alerts log: each change of an item's RPO health that 'pydr run'\n"
            "found into, out of or between warning and critical (a recovery to ok too;\n"
            "never into paused), oldest first, with the RPO and the target at that\n"
            "moment. The same events went to the policy's --alert-command(s) and to the\n"
            "event log."),
        examples=["pydr alerts", "pydr alerts web --since 2h",
                  "pydr alerts --since 2026-12-07T05:00:00Z --limit 20 --json"],
        func=cmd_alerts)
    p.add_argument("item", metavar="ITEM", nargs="?", help="only this item's alerts")
    p.add_argument("--since", metavar="WHEN",
                   help="only alerts at or after WHEN: an ISO 8601 time "
                        "(2026-12-07T05:00:00Z), epoch seconds, or a duration ago (2h, 7d)")
    p.add_argument("--limit", metavar="N", help="only the newest N")
    add_vault_options(p, writer=False)

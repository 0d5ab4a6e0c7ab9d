"""The ``pydr`` command: a thin shell over the Python API.

One module per command family (engine, vault, dr and plans, serve, demo)
registers its subcommands; each command turns its arguments into API calls
and presents the result. Errors become one line on stderr and a stable exit
status (pydr.cli.common.report_error), never a traceback (PYDR_DEBUG=1
shows one). Nothing here is imported by the layers below.
"""

import argparse
import os
import sys

from .._version import __version__
from . import demo, dr, engine, fleet, keys, objects, policy, run, serve, vault
from .common import EXIT_STATUS, HelpFormatter, guarded_stdout, report_error

DESCRIPTION = (
    "pydr keeps a copy of raw disk images and block devices at a second site by\n"
    "moving only the blocks that differ, and lets an operator fail over to it and\n"
    "back: block signatures (XXH3, hole- and zero-aware), deltas applied crash-safely\n"
    "under an undo journal, resync (also with [user@]host:PATH over ssh), replication\n"
    "with recovery points kept as reverse deltas, test failover, failover, commit,\n"
    "reprotect, failback and recovery plans. Replication state lives in a vault\n"
    "(--vault DIR or $PYDR_VAULT).")

EXAMPLES = (
    "examples:\n"
    "  pydr demo                            disaster recovery of a two-disk ext4 machine\n"
    "  pydr signature disk.img -o disk.sig  hash disk.img in 64 KiB blocks\n"
    "  pydr info disk.sig --json            describe and verify a pydr file\n"
    "  pydr diff old.sig new.sig            list the byte ranges that differ\n"
    "  pydr resync disk.img replica.img     copy only the blocks that differ\n"
    "  pydr resync disk.img dr:/srv/disk.img   the same to another host, over ssh\n"
    "  pydr delta disk.img --against replica.sig -o d.delta; pydr apply d.delta replica.img\n"
    "  pydr protect vm --disk a.img=/dr/a.img && pydr replicate vm && pydr points vm\n"
    "  pydr failover vm --planned; pydr commit vm; pydr reprotect vm; pydr failback vm\n\n"
    "Run 'pydr COMMAND --help' for the options of a command.\n\n")


class _Unbuilt:
    """Stands in for the parser of a command that is not being run: its
    options are not built (building all ~30 costs ~10 ms of every start)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: self


class _OnlyCommand:
    """The top-level subparsers, building only the command named `wanted`."""

    def __init__(self, sub, wanted):
        self.sub, self.wanted, self.found = sub, wanted, False

    def add_parser(self, name, **kwargs):
        if name != self.wanted:
            return _Unbuilt()
        self.found = True
        return self.sub.add_parser(name, **kwargs)


class _Parser(argparse.ArgumentParser):
    """No abbreviated options: "--quiesce" must not be taken for
    "--quiesce-hook" (its command line is hidden by its full name only), and
    an option added later must not change what an old script meant.
    Subparsers take the parser's class, so every command has the rule."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser(command=None):
    """The parser of every command, or with `command` of that one only (None
    when no command has that name; "" builds none, for --version)."""
    parser = _Parser(prog="pydr", formatter_class=HelpFormatter,
                                     description=DESCRIPTION, epilog=EXAMPLES + EXIT_STATUS)
    parser.add_argument("--version", action="version", version=f"pydr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    only = _OnlyCommand(sub, command) if command is not None else sub
    for family in (engine, vault, policy, dr, objects, keys, fleet, run, serve, demo):
        family.register(only)
    if command and not only.found:
        return None
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    words = [a for a in argv if not a.startswith("-")]
    if words:
        parser = build_parser(words[0]) or build_parser()
    else:  # --version needs no command; --help and a bare `pydr` list them all
        parser = build_parser("" if argv == ["--version"] else None)
    args = parser.parse_args(argv)
    if getattr(args, "json", False) and getattr(args, "output", None) == "-":
        parser.error("--json cannot be combined with -o - (both use standard output)")
    try:
        with guarded_stdout():
            return args.func(args)
    except BaseException as exc:  # the one place errors meet the user
        if os.environ.get("PYDR_DEBUG"):
            raise
        return report_error(exc)


if __name__ == "__main__":
    sys.exit(main())

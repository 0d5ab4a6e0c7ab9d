"""Operator hooks (quiesce, thaw, shutdown, a plan group's pre and post):
shell commands whose failure stops what they guard.

A hook's command line may carry credentials (a database password, a
token): messages, job errors, status and the vault's lock file name the
hook ("quiesce hook of 'vm'") and its exit status, never its command line
(redact_argv)."""

import subprocess

from ..errors import HookFailed

# the options whose value is a hook's command line
HOOK_OPTIONS = ("--quiesce-hook", "--thaw-hook", "--shutdown-hook", "--pre-hook", "--post-hook")
HIDDEN = "<hook set>"


def run_hook(command, what):
    """Run `command` with the shell; HookFailed naming `what` ("shutdown
    hook"), its exit status and the last line it printed if it exits
    non-zero (not the command). No command: nothing to do."""
    if not command:
        return
    r = subprocess.run(command, shell=True, capture_output=True, text=True)
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        raise HookFailed(f"{what} failed (exit {r.returncode})"
                         + (f": {detail[0]}" if detail[0] else ""))


def redact_argv(argv):
    """`argv` with the command line of every hook option replaced by
    HIDDEN ("--quiesce-hook CMD" and "--quiesce-hook=CMD")."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append(HIDDEN)
            hide_next = False
        elif arg in HOOK_OPTIONS:
            out.append(arg)
            hide_next = True
        elif arg.split("=", 1)[0] in HOOK_OPTIONS and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=" + HIDDEN)
        else:
            out.append(arg)
    return out

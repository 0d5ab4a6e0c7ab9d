"""Operator hooks (quiesce, thaw, shutdown, a plan group's pre and post):
shell commands whose failure stops what they guard.

A hook's command line may carry credentials (a database password, a
token): messages, job errors, status and the vault's lock file name the
hook ("quiesce hook of 'vm'") and its exit status, never its command line
(the lock file's command line too: pydr.dr.store_lock.redact_argv)."""

import subprocess

from ..errors import HookFailed


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


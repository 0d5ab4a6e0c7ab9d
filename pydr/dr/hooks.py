"""Operator hooks (quiesce, thaw, shutdown, a plan group's pre and post):
shell commands whose failure stops what they guard."""

import subprocess

from ..errors import HookFailed


def run_hook(command, what):
    """Run `command` with the shell; HookFailed naming `what` ("shutdown
    hook") and the last line it printed if it exits non-zero. No command:
    nothing to do."""
    if not command:
        return
    r = subprocess.run(command, shell=True, capture_output=True, text=True)
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        raise HookFailed(f"{what} failed (exit {r.returncode}): {detail[0]}", path=command)

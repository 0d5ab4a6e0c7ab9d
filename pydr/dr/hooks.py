"""Operator hooks (quiesce, thaw, shutdown, a plan group's pre and post):
shell commands whose failure stops what they guard.

A hook's command line may carry credentials (a database password, a
token): messages, job errors, status and the vault's lock file name the
hook ("quiesce hook of 'vm'") and its exit status, never its command line
(the lock file's command line too: pydr.dr.store_lock.redact_argv).

Every hook runs in a session (process group) of its own and has
:func:`hook_timeout` seconds to finish (``PYDR_HOOK_TIMEOUT``, default
300): then its whole group is killed and it fails (:class:`HookTimedOut`),
so a hook that never returns cannot stop the cycle, or a ``pydr run``'s
other items, for good.

A hook never sees a store's passphrase: the PYDR_*PASSPHRASE* variables
(PYDR_PASSPHRASE, PYDR_NEW_PASSPHRASE_FILE, ...) are left out of its
environment (:func:`hook_environment`)."""

import math
import os
import signal
import subprocess
import tempfile

from ..errors import HookFailed, InvalidArgument

DEFAULT_TIMEOUT = 300.0
TIMEOUT_VARIABLE = "PYDR_HOOK_TIMEOUT"
_TAIL = 4096  # the bytes of a hook's output read back for its last line


class HookTimedOut(HookFailed):
    """A hook did not finish within its timeout and was killed with its
    process group (it may have done part of its work: a quiesce hook that
    timed out is still thawed)."""


def hook_timeout():
    """Seconds a hook may run: $PYDR_HOOK_TIMEOUT (a positive number) or
    300; InvalidArgument (exit 2) naming the variable for anything else."""
    text = os.environ.get(TIMEOUT_VARIABLE)
    if text is None or not text.strip():
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise InvalidArgument(f"{TIMEOUT_VARIABLE}={text!r}: expected a positive number of "
                              f"seconds (default {DEFAULT_TIMEOUT:g})")
    return value


def hook_environment(environ=None):
    """The environment a hook runs with: `environ` (default os.environ)
    without the variables that hold or name a passphrase (PYDR_ and
    PASSPHRASE in the name): a hook may be someone else's script."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items()
            if not (k.upper().startswith("PYDR_") and "PASSPHRASE" in k.upper())}


def _tail(f):
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _TAIL))
    return f.read().decode("utf-8", "replace")


def run_command(command, what, timeout=None, stdin=None):
    """Run `command` with the shell in its own session, up to `timeout`
    seconds (default :func:`hook_timeout`), `stdin` (bytes) on its standard
    input (None: nothing); (exit status, the last line it printed, stderr
    first). At the timeout its process group is killed and HookTimedOut
    names `what` (never the command)."""
    timeout = hook_timeout() if timeout is None else timeout
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryFile() as given:
        given.write(stdin or b"")
        given.seek(0)
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=given,
                                stdout=out, stderr=err, close_fds=True, start_new_session=True,
                                env=hook_environment())
        try:
            status = proc.wait(timeout=timeout)
        except BaseException as exc:  # the timeout, or an interrupt: leave nothing behind
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise HookTimedOut(f"{what} did not finish within {timeout:g} s "
                                   f"and was killed") from None
            raise
        detail = (_tail(err).strip() or _tail(out).strip()).splitlines()[-1:] or [""]
    return status, detail[0]


def run_hook(command, what, timeout=None):
    """Run `command` with the shell; HookFailed naming `what` ("shutdown
    hook"), its exit status and the last line it printed if it exits
    non-zero (not the command), HookTimedOut if it runs past `timeout`
    (:func:`run_command`). No command: nothing to do."""
    if not command:
        return
    status, detail = run_command(command, what, timeout)
    if status != 0:
        raise HookFailed(f"{what} failed (exit {status})" + (f": {detail}" if detail else ""))

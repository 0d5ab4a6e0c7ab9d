"""Alert commands: what ``pydr run`` runs when an item's RPO health changes
(a pydr.dr.health.Transition).

Each command line of the item's policy (``alert_commands``) runs with
``/bin/sh -c``, all of them at the same time (independent deliveries: a
slow webhook does not delay the mail), with:

* on stdin, the alert as one JSON object (:func:`alert_event`; the format
  is in docs/JSON.md, "Alerts (pydr run)");
* in the environment, besides pydr run's own: ``PYDR_ALERT_ITEM`` (the
  item), ``PYDR_ALERT_HEALTH`` (the new health), ``PYDR_ALERT_VAULT`` (the
  vault's directory) -- values are never put into the command line, so an
  item's name cannot inject shell syntax;
* stdout and stderr together in a temporary file, logged (logger
  "pydr.alerts") and, when the command fails, the end of it reported.

stdin is a file, not a pipe: a command that never reads it cannot block
the service, nor make it fail with EPIPE. The command runs in its own
process group; at the timeout the whole group is killed (SIGKILL), so a
hung command and what it started end. One call lasts at most about the
timeout, however many commands there are (pydr run's watchdog must not
starve). A command that exits leaving a
background child behind is done (the child is not waited for).

An alert command may carry credentials (a webhook token), like hooks: a
report names the command by its number ("alert command 2 of 3"), never its
text.

A failing, hanging or unstartable command is reported in the returned list
and logged; :func:`run_alert_commands` never raises for it: an alert that
cannot be delivered must not stop the protection it reports on.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .events import iso_utc

__all__ = ["run_alert_commands", "alert_event"]

_log = logging.getLogger("pydr.alerts")

#: how much of a failed command's output a report quotes (its end)
_QUOTE = 400
#: how much of a command's output is read back for the log
_READ = 64 * 1024


def alert_event(transition: Any, vault: str) -> Dict[str, Any]:
    """The alert JSON of a pydr.dr.health.Transition, as alert commands get it.

    transition: the change (item, old, new, rpo_seconds, target_rpo, at
        (epoch seconds), message).
    vault: the vault's directory.

    Returns {"type": "alert", "version": 1, "item", "old", "new",
    "rpo_seconds", "target_rpo", "at" (ISO 8601 UTC, "...Z"), "message",
    "vault"}.
    """
    at = datetime.datetime.fromtimestamp(transition.at, datetime.timezone.utc)
    return {"type": "alert", "version": 1, "item": transition.item, "old": transition.old,
            "new": transition.new, "rpo_seconds": transition.rpo_seconds,
            "target_rpo": transition.target_rpo, "at": iso_utc(at),
            "message": transition.message, "vault": os.fspath(vault)}


def _env_text(value: Any) -> str:
    return "" if value is None else str(value)


def _output_tail(out: Any) -> str:
    """The end of what a command printed, on one line."""
    try:
        out.seek(0, os.SEEK_END)
        size = out.tell()
        out.seek(max(0, size - _READ))
        text = out.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(its output could not be read: {exc})"
    return " ".join(text.split())


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's process group (it leads it: start_new_session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    proc.wait()


def _start(command: str, payload: bytes, env: Dict[str, str],
           files: contextlib.ExitStack) -> Tuple[subprocess.Popen[bytes], Any]:
    """Start one alert command, stdin a file holding `payload`; (the
    process, the file its output goes to). The files close with `files`."""
    stdin = files.enter_context(tempfile.TemporaryFile())
    out = files.enter_context(tempfile.TemporaryFile())
    stdin.write(payload)
    stdin.flush()
    stdin.seek(0)
    proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=stdin, stdout=out,
                            stderr=subprocess.STDOUT, env=env, close_fds=True,
                            start_new_session=True)
    return proc, out


def _finish(proc: subprocess.Popen[bytes], out: Any, deadline: float, timeout: float,
            what: str) -> Optional[str]:
    """Wait for a started command until `deadline` (time.monotonic());
    None when it succeeded, else the problem."""
    try:
        status = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        tail = _output_tail(out)
        return (f"{what} did not finish within {timeout:g} s and was killed"
                + (f"; it printed: {tail[-_QUOTE:]}" if tail else ""))
    tail = _output_tail(out)
    if status == 0:
        if tail:
            _log.info("%s printed: %s", what, tail[-_QUOTE:])
        return None
    how = (f"was killed by signal {-status}" if status < 0 else f"exited with status {status}")
    return f"{what} {how}" + (f": {tail[-_QUOTE:]}" if tail else "")


def run_alert_commands(commands: Sequence[str], event: Dict[str, Any],
                       timeout: float = 30) -> List[str]:
    """Run each alert command with `event` on stdin (see the module's docstring).

    commands: shell command lines, each run with /bin/sh -c, all at once.
    event: the alert (:func:`alert_event`); sent as one JSON object and a
        newline. Its "item", "new" and "vault" are also given as
        PYDR_ALERT_ITEM, PYDR_ALERT_HEALTH and PYDR_ALERT_VAULT.
    timeout: seconds the commands may run (counted from when they all
        started); then the process group of each still running is killed.

    Returns the problems, one line each, naming the item and the command by
    its number (never its text): a non-zero exit status or a signal (with
    the end of what it printed), a timeout, a failure to start. An empty
    list: every command succeeded. Each problem is also logged as a warning
    (logger "pydr.alerts").

    Never raises for a command's failure (an event that is not JSON-ready
    is reported too); KeyboardInterrupt still propagates, after the running
    commands' groups are killed.
    """
    commands = list(commands or ())
    item = event.get("item") if isinstance(event, dict) else None
    problems: List[str] = []
    try:
        if not isinstance(event, dict):
            raise TypeError(f"an alert is a dict, not {type(event).__name__}")
        payload = (json.dumps(event, sort_keys=True) + "\n").encode()
    except (TypeError, ValueError) as exc:
        bad = f"the alert of item {item!r} could not be made JSON: {exc}"
        _log.warning("%s", bad)
        return [bad] if commands else []
    env = dict(os.environ, PYDR_ALERT_ITEM=_env_text(item),
               PYDR_ALERT_HEALTH=_env_text(event.get("new")),
               PYDR_ALERT_VAULT=_env_text(event.get("vault")))
    started: List[Tuple[str, Any, Any]] = []  # (what, process or None, output file or problem)
    with contextlib.ExitStack() as files:
        for number, command in enumerate(commands, 1):
            what = f"alert command {number} of {len(commands)} of item {item!r}"
            try:
                started.append((what, *_start(command, payload, env, files)))
            except Exception as exc:  # never let an alert stop the service
                started.append((what, None, f"{what} could not start: {exc}"))
        deadline = time.monotonic() + timeout  # they run at the same time: one timeout for all
        try:
            for what, proc, out in started:
                problem: Optional[str] = out if proc is None else None
                if proc is not None:
                    try:
                        problem = _finish(proc, out, deadline, timeout, what)
                    except Exception as exc:
                        problem = f"{what} failed: {exc}"
                if problem is not None:
                    _log.warning("%s", problem)
                    problems.append(problem)
                else:
                    _log.info("%s succeeded", what)
        except BaseException:  # Ctrl-C or a stop while waiting: leave nothing running
            for _, proc, _ in started:
                if proc is not None and proc.poll() is None:
                    _kill_group(proc)
            raise
    return problems

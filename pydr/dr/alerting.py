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
* stdout and stderr together in a pipe, of which only the last 4 KiB
  (:data:`KEEP`) are kept: logged (logger "pydr.alerts", control
  characters escaped) and, when the command fails, the end of it reported.
  A command that prints without end fills neither the disk nor the memory.

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
import selectors
import signal
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .events import iso_utc

__all__ = ["run_alert_commands", "alert_event"]

_log = logging.getLogger("pydr.alerts")

#: seconds the alert commands of one transition may run (then they are killed)
TIMEOUT = 30.0
#: how much of a failed command's output a report quotes (its end)
_QUOTE = 400
#: how much of the end of a command's output is kept (the rest is read and dropped)
KEEP = 4096
#: when the processes cannot be waited on with a pidfd: how often they are polled
_POLL = 0.05


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


class _Tail:
    """The read end of a command's output pipe (non-blocking), keeping the
    last KEEP bytes read from it."""

    def __init__(self, fd: int) -> None:
        self.fd, self.data, self.open = fd, bytearray(), True
        os.set_blocking(fd, False)

    def read(self) -> None:
        """Read what the pipe holds now; at its end, note it closed."""
        while self.open:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.open = False
                return
            self.data += chunk
            if len(self.data) > KEEP:
                del self.data[:-KEEP]

    def text(self) -> str:
        """The end of what the command printed, on one line, control
        characters escaped (a log line it cannot forge nor colour)."""
        self.read()
        words = " ".join(self.data.decode("utf-8", "replace").split())
        return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                       for c in words)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's process group (it leads it: start_new_session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    proc.wait()


def _start(command: str, payload: bytes, env: Dict[str, str],
           files: contextlib.ExitStack) -> Tuple[subprocess.Popen[bytes], _Tail]:
    """Start one alert command, stdin a file holding `payload`; (the
    process, the tail of its output pipe). The files close with `files`."""
    stdin = files.enter_context(tempfile.TemporaryFile())
    stdin.write(payload)
    stdin.flush()
    stdin.seek(0)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    files.callback(os.close, read_end)
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=stdin, stdout=write_end,
                                stderr=subprocess.STDOUT, env=env, close_fds=True,
                                start_new_session=True)
    finally:
        os.close(write_end)
    return proc, _Tail(read_end)


def _pidfd(proc: subprocess.Popen[bytes]) -> Optional[int]:
    try:
        return os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return None


def _wait_all(started: List[Tuple[str, Any, Any]], deadline: float) -> None:
    """Read the started commands' output (keeping its end) until each has
    exited or `deadline` (time.monotonic()) has passed. A command that
    exited is done, even if a background child still holds its pipe."""
    running = [(proc, tail) for _, proc, tail in started if proc is not None]
    with selectors.DefaultSelector() as sel:
        pidfds: List[int] = []
        try:
            for proc, tail in running:
                sel.register(tail.fd, selectors.EVENT_READ, tail)
                fd = _pidfd(proc)
                if fd is not None:
                    pidfds.append(fd)
                    sel.register(fd, selectors.EVENT_READ, None)
            polled = len(pidfds) < len(running)
            while running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                for key, _ in sel.select(min(left, _POLL) if polled else left):
                    if key.data is not None:
                        key.data.read()
                        if not key.data.open:
                            sel.unregister(key.fd)
                    else:
                        sel.unregister(key.fd)  # its process ended
                for proc, tail in list(running):
                    if proc.poll() is not None:
                        tail.read()
                        running.remove((proc, tail))
                        if tail.open:
                            sel.unregister(tail.fd)
                            tail.open = False  # a background child may keep it open
        finally:
            for fd in pidfds:
                os.close(fd)


def _finish(proc: subprocess.Popen[bytes], tail: _Tail, timeout: float,
            what: str) -> Optional[str]:
    """After _wait_all: None when the command succeeded, else the problem
    (a command still running is killed)."""
    status = proc.poll()
    if status is None:
        _kill_group(proc)
        text = tail.text()
        return (f"{what} did not finish within {timeout:g} s and was killed"
                + (f"; it printed: {text[-_QUOTE:]}" if text else ""))
    text = tail.text()
    if status == 0:
        if text:
            _log.info("%s printed: %s", what, text[-_QUOTE:])
        return None
    how = (f"was killed by signal {-status}" if status < 0 else f"exited with status {status}")
    return f"{what} {how}" + (f": {text[-_QUOTE:]}" if text else "")


def run_alert_commands(commands: Sequence[str], event: Dict[str, Any],
                       timeout: float = TIMEOUT) -> List[str]:
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
            try:
                _wait_all(started, deadline)
            except Exception as exc:  # reported per command below (still running: killed)
                _log.warning("waiting for the alert commands of item %r failed: %s", item, exc)
            for what, proc, out in started:
                problem: Optional[str] = out if proc is None else None
                if proc is not None:
                    try:
                        problem = _finish(proc, out, timeout, what)
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

"""sd_notify without a dependency: one datagram to the AF_UNIX socket
systemd names in $NOTIFY_SOCKET (a path, or an abstract name written with
a leading "@"). pydr run sends READY=1 after its first round, STATUS=...,
WATCHDOG=1 each loop and STOPPING=1 (docs/SERVICE.md)."""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping, Optional

_log = logging.getLogger("pydr.service")


def socket_address(value: str) -> str:
    """The address to send to for $NOTIFY_SOCKET `value`: a path as is, an
    abstract name ("@name") with its leading NUL."""
    return "\0" + value[1:] if value.startswith("@") else value


def notify(state: str, environ: Optional[Mapping[str, str]] = None) -> bool:
    """Send `state` (e.g. "READY=1", "STATUS=3 items, worst ok",
    "WATCHDOG=1"; several as lines) to systemd's notify socket.

    Args:
        state: the assignment(s) to send.
        environ: where $NOTIFY_SOCKET is read from (default: os.environ).

    Returns:
        True when a datagram was sent; False when $NOTIFY_SOCKET is unset
        (not under systemd) or the socket refused it (logged at debug
        level: a service never fails because its supervisor is gone).
    """
    env = os.environ if environ is None else environ
    where = env.get("NOTIFY_SOCKET")
    if not where:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode("utf-8", "replace"), socket_address(where))
    except OSError as exc:
        _log.debug("sd_notify to %s failed: %s", where, exc)
        return False
    return True


def watchdog_interval(environ: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, or None
    when systemd asked for none (unset, not a number, or $WATCHDOG_PID names
    another process)."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6

"""Verification of a recovered machine: probes run against the machine
bring-up started, with one deadline for all of them, and the result
recorded on the point (the verifications table).

Probes, in this order (each must pass before the next starts):

- "userspace": the guest reached userspace. With ``--verify-console TEXT``:
  TEXT appears in the console log pydr gave the domain (a line the guest's
  own init or a service prints: it proves the kernel booted, mounted what it
  needed to print it and ran that program). Otherwise the guest agent
  answers guest-ping (it proves qemu-guest-agent runs in the guest; it does
  not prove that any application is up). One of the two is needed.
- "tcp" (``--verify-tcp HOST:PORT``): a TCP connection to HOST:PORT is
  accepted (something listens; what it says is not checked).
- "script" (``--verify-script CMD``): the guest agent runs ``/bin/sh -c
  CMD`` in the guest; exit status 0 passes. Its output (at most 4 KiB of
  each stream) is shown when it fails. It proves what the script checks.

A probe that fails before the deadline (a script that exits non-zero, a
domain that stopped) fails at once; a probe that has not passed by the
deadline fails then. Polling is inherent: a real machine boots in wall-clock
time; pydr asks every :data:`POLL` seconds.

The RTO is the seconds from the command's start to the last probe
passing; its parts are "materialise" (the disks), "define+start", "boot"
(to the userspace probe passing) and "probes" (the rest).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
from typing import Any, Dict, List, Optional

from ..endpoints import domains as lv
from ..errors import InvalidArgument, MachineError, VerificationFailed
from .policy import parse_duration

#: seconds between two looks at the guest
POLL = 0.2
#: the default deadline of a verification (seconds)
DEFAULT_TIMEOUT = 600.0
#: the most bytes of the console log the console probe reads
CONSOLE_LIMIT = 16 << 20


@dataclasses.dataclass(frozen=True)
class Probes:
    """What a verification checks: ``console`` (a marker text in the
    console log) or, without one, a guest-agent ping; ``tcp`` ("HOST:PORT")
    and ``script`` (a shell command run by the guest agent) when given;
    ``timeout``: seconds for all of them."""

    console: Optional[str] = None
    tcp: Optional[str] = None
    script: Optional[str] = None
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def make(cls, *, console: Optional[str] = None, tcp: Optional[str] = None,
             script: Optional[str] = None, timeout: Any = None) -> "Probes":
        """Probes checked: `timeout` a number of seconds or a duration text
        ("90s", "10m"; None: 10 minutes), `tcp` HOST:PORT.

        Raises:
            InvalidArgument: a bad duration, HOST:PORT, or an empty text.
        """
        if timeout is None:
            seconds = DEFAULT_TIMEOUT
        elif isinstance(timeout, str):
            seconds = parse_duration(timeout)
        elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
            seconds = float(timeout)
        else:
            raise InvalidArgument(f"--verify-timeout must be a positive duration, not {timeout!r}")
        if tcp is not None:
            split_hostport(tcp)
        for what, value in (("--verify-console", console), ("--verify-script", script)):
            if value is not None and not str(value).strip():
                raise InvalidArgument(f"{what} must not be empty")
        return cls(console=console, tcp=tcp, script=script, timeout=seconds)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: {"console", "tcp", "script", "timeout"}."""
        return dataclasses.asdict(self)


def split_hostport(text: str):
    """(host, port) of "HOST:PORT" ("[::1]:80" for IPv6); InvalidArgument otherwise."""
    host, sep, port = str(text).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"--verify-tcp {text!r}: expected HOST:PORT")
    return host, int(port)


def check_probes(probes: Probes, *, agent: bool, item: Optional[str] = None) -> None:
    """Refuse probes this machine cannot run, before anything is done:
    a userspace probe needs a console marker or a guest agent; a script
    needs the agent.

    Raises:
        InvalidArgument: naming what is missing.
    """
    if probes.console is None and not agent:
        raise InvalidArgument("--verify needs --verify-console TEXT: the domain has no guest "
                              "agent to ping", item=item)
    if probes.script is not None and not agent:
        raise InvalidArgument("--verify-script needs the guest agent: the domain has no "
                              "org.qemu.guest_agent.0 channel", item=item)


class _Failed(Exception):
    def __init__(self, detail):
        super().__init__(detail)
        self.detail = detail


#: a console line the kernel printed (its printk timestamp), or its echo of its command line
_KERNEL_LINE = re.compile(rb"\s*\[\s*\d+\.\d+\]|\s*(Kernel )?[Cc]ommand line:")


def _console_seen(path: str, marker: str) -> bool:
    """Whether a line of the console log at `path` that the kernel did not
    print holds `marker` (as far as can be told: lines with a printk
    timestamp and the kernel's echo of its command line are skipped; the
    marker itself is refused when it is on the kernel command line)."""
    try:
        with open(path, "rb") as f:
            data = f.read(CONSOLE_LIMIT)
    except FileNotFoundError:
        return False
    wanted = marker.encode()
    return any(wanted in line and not _KERNEL_LINE.match(line)
               for line in data.replace(b"\r", b"\n").split(b"\n"))


def _wait(check, deadline: float, what: str, dom=None):
    """Call check() until it is true; _Failed at the deadline, or at once
    when the domain stopped."""
    while True:
        if check():
            return
        if dom is not None and not lv.is_running(dom):
            raise _Failed(f"{what}: the domain stopped")
        if time.monotonic() >= deadline:
            raise _Failed(f"{what}: not within the deadline")
        time.sleep(POLL)


def _ping(dom, uri=None) -> bool:
    try:
        lv.agent_command(dom, "guest-ping", timeout=5, uri=uri)
        return True
    except MachineError:
        return False


def _tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _script(dom, command: str, deadline: float, uri=None) -> str:
    pid = lv.guest_exec(dom, command, uri=uri)
    while True:
        status = lv.guest_exec_status(dom, pid, uri=uri)
        if status["exited"]:
            if status["exitcode"] == 0:
                return ""
            out = (status["err"].strip() + "\n" + status["out"].strip()).strip()
            why = f"exit {status['exitcode']}" if status["exitcode"] is not None \
                else f"signal {status['signal']}"
            raise _Failed(f"the script failed ({why})" + (f": {out[-1000:]}" if out else ""))
        if time.monotonic() >= deadline:
            raise _Failed("the script did not finish within the deadline")
        time.sleep(POLL)


def verify(vault, name: str, point_id: int, *, kind: str, started: float,
           machine: Dict[str, Any], probes: Probes, parts: Dict[str, float],
           measured: bool = True) -> Dict[str, Any]:
    """Run `probes` against the machine bring-up started, record the
    verification on point `point_id` of item `name`, and return it.

    Args:
        vault: the store.
        name: the item.
        point_id: the point the machine was made from.
        kind: "drill" or "failover".
        started: time.time() when the command began (the RTO's start).
        machine: what bring_up returned ({"uri", "uuid", "console", ...}).
        probes: what to check.
        parts: seconds so far ({"materialise", "define+start"}); "boot"
            and "probes" are added.
        measured: whether this command started the machine: without it
            no RTO is recorded (a rerun finds the machine up already).

    Returns:
        {"passed", "rto", "parts", "probes": [{"probe", "passed",
        "seconds", "detail"}], "error", "id"}.

    Raises:
        VerificationFailed: a probe failed (recorded first); ``.probe``
            names it (exit 23).
        MachineError: libvirt could not be reached.
    """
    if machine.get("kind") != "libvirt":
        raise InvalidArgument(f"--verify needs a libvirt machine; {name!r} is brought up by a "
                              f"hook", item=name)
    check_probes(probes, agent=machine.get("agent", False), item=name)
    deadline = time.monotonic() + probes.timeout
    results: List[Dict[str, Any]] = []
    uri = machine["uri"]
    conn = lv.connect(uri, item=name)
    error = failed = None
    t0 = time.monotonic()
    boot = None
    try:
        dom = lv.find_domain_by_uuid(conn, machine["uuid"], uri=machine["uri"], item=name)
        if dom is None:
            raise MachineError(f"the recovered domain {machine['domain']!r} is gone", item=name)
        plan = [("userspace", (lambda: _wait(lambda: _console_seen(machine["console"],
                                                                   probes.console),
                                             deadline, f"console marker {probes.console!r}",
                                             dom))
                 if probes.console is not None else
                 (lambda: _wait(lambda: _ping(dom, uri), deadline, "guest-agent ping", dom)))]
        if probes.tcp is not None:
            host, port = split_hostport(probes.tcp)
            plan.append(("tcp", lambda: _wait(lambda: _tcp(host, port), deadline,
                                              f"TCP {probes.tcp}", dom)))
        if probes.script is not None:
            plan.append(("script", lambda: (_wait(lambda: _ping(dom, uri), deadline,
                                                  "guest-agent ping", dom),
                                            _script(dom, probes.script, deadline, uri))))
        for probe, run in plan:
            begun = time.monotonic()
            try:
                run()
                results.append({"probe": probe, "passed": True,
                                "seconds": round(time.monotonic() - begun, 3), "detail": None})
            except (_Failed, MachineError) as exc:
                # the guest died or its agent went away mid-probe: that probe failed
                detail = exc.detail if isinstance(exc, _Failed) else str(exc)
                results.append({"probe": probe, "passed": False,
                                "seconds": round(time.monotonic() - begun, 3),
                                "detail": detail})
                failed, error = probe, f"probe {probe} failed: {detail}"
                break
            if probe == "userspace":
                boot = time.monotonic() - t0
    finally:
        conn.close()
    ended = time.time()
    passed = failed is None
    rto = round(ended - started, 3) if passed and measured else None
    parts = dict(parts)
    if boot is not None:
        parts["boot"] = round(boot, 3)
        parts["probes"] = round(time.monotonic() - t0 - boot, 3)
    vid = vault.add_verification(name, point_id, kind, started=started, ended=ended,
                                 passed=passed, rto=rto, probes=json.dumps(results), error=error)
    record = {"id": vid, "passed": passed, "rto": rto, "parts": parts, "probes": results,
              "error": error, "failed_probe": failed}
    if not passed:
        shown = f"; its console log is {machine['console']}" if machine.get("console") and \
            os.path.exists(machine["console"]) else ""
        exc = VerificationFailed(f"the recovered machine of {name!r} (point {point_id}) failed "
                                 f"verification: {error}", probe=failed, item=name,
                                 hint=f"the machine stays up for inspection{shown}")
        exc.verification = record  # type: ignore[attr-defined]
        raise exc
    return record


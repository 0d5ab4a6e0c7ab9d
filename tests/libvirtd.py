"""A private libvirtd for the tests of libvirt domains: started as root in
a mount and PID namespace of its own, so it reads and writes nothing of the
system's libvirt, and several test runs (parallel worktrees) never collide.

    from libvirtd import libvirtd  # noqa: F401 (the fixture)

    def test_x(libvirtd):
        libvirtd.uri                      # qemu:///system?socket=DIR/s/libvirt-sock
        libvirtd.conn()                   # a libvirt.virConnect (libvirt-python)
        libvirtd.virsh("list", "--all")   # `virsh -c URI ...`'s stdout; raises on failure
        with libvirtd.domain(xml) as dom: # defined and started; destroyed and undefined after
            libvirtd.agent(name, "guest-ping")                  # the agent's "return" value
            libvirtd.agent_exec(name, "/bin/pydr-verify-records")  # (exit code, stdout, stderr)
            libvirtd.crash(name)          # SIGKILL to its QEMU (virsh destroy is SIGTERM first)
        libvirtd.destroy_undefine(name)   # with checkpoint and snapshot metadata; idempotent

libvirtd writes its PID file inside the namespace: the number in it is not
a host PID (never kill by it); `qemu_pid(name)` finds a domain's host PID.

How: `unshare --mount --propagation private --pid --fork --kill-child
--mount-proc` runs a small init (NS_INIT below) that bind-mounts private
directories of DIR over /etc/libvirt, /var/lib/libvirt, /run/libvirt,
/var/cache/libvirt and /var/log/libvirt, and, where the system lacks the
`libvirt-qemu` user and group libvirtd looks up before it reads qemu.conf,
private copies of /etc/passwd and /etc/group that have them. It then runs
`libvirtd -f DIR/etc/libvirt/libvirtd.conf` and reaps every orphan (QEMU is
reparented to it). qemu.conf runs QEMU as root with no security driver, no
cgroups, no private /dev and its stdio logged to files, so QEMU reads any
disk, kernel or initramfs under pytest's tmp dirs and writes serial logs and
unix sockets there. The sockets libvirtd listens on are in DIR/s, reachable
from outside the namespace by `virsh -c` and libvirt.open().

Nothing outlives the session: the finalizer destroys the domains left and
stops libvirtd; if pytest is killed, the kernel kills unshare (a parent-death
signal), then the namespace's init (--kill-child), and with it every process
of the namespace, QEMU included. The only trace on the host is the empty
mount-point directories created where the system had none (/var/lib/libvirt
and friends): a bind mount needs a directory to cover.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Iterator

import pytest

LIBVIRTD = "/usr/sbin/libvirtd"
QEMU_DRIVER = "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so"
# the system directories libvirtd writes, each covered by a private one
PRIVATE_DIRS = {"/etc/libvirt": "etc/libvirt", "/var/lib/libvirt": "lib",
                "/run/libvirt": "run", "/var/cache/libvirt": "cache",
                "/var/log/libvirt": "log"}
INSTALL_HINT = ("run scripts/bootstrap, or apt-get install libvirt-daemon "
                "libvirt-daemon-driver-qemu libvirt-clients libvirt-dev qemu-system-x86 "
                "and pip install libvirt-python (the machines extra)")

QEMU_CONF = """\
# a private libvirtd of pydr's tests: QEMU runs as root, untouched by any
# security driver, so it reads and writes files anywhere under the tests' tmp dirs
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
"""

LIBVIRTD_CONF = """\
unix_sock_dir = "{sock}"
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:{log}"
"""

# The namespace's PID 1: mounts, then libvirtd, reaping every orphan (a
# zombie QEMU would make libvirt wait ~15 s for it on destroy), and passing
# SIGTERM/SIGINT on to libvirtd. Its exit takes every process of the namespace.
NS_INIT = r"""
import os, signal, subprocess, sys
d, binds = sys.argv[1], sys.argv[2:]
for src, dst in zip(binds[::2], binds[1::2]):
    subprocess.run(["mount", "--bind", src, dst], check=True)
child = subprocess.Popen(["/usr/sbin/libvirtd", "-f", d + "/etc/libvirt/libvirtd.conf",
                          "-p", d + "/libvirtd.pid"])
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda n, f: child.send_signal(n))
while True:
    pid, status = os.wait()
    if pid == child.pid:
        sys.exit(os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode")
                 else 1)
"""


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent (pytest) dies."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def missing_requirements() -> list:
    """What this machine lacks for a private libvirtd: [] when nothing."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (libvirtd's system instance and the mount namespace need it)")
    for path in (LIBVIRTD, QEMU_DRIVER):
        if not os.path.exists(path):
            missing.append(path)
    for tool in ("virsh", "qemu-system-x86_64", "qemu-img", "unshare", "mount"):
        if shutil.which(tool) is None:
            missing.append(tool)
    try:
        import libvirt  # noqa: F401
    except ImportError:
        missing.append("libvirt-python (pip install libvirt-python)")
    return missing


class Libvirtd:
    """A private libvirtd (see the module's docstring) in `directory`."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        self.sock_dir = os.path.join(self.dir, "s")
        self.uri = f"qemu:///system?socket={self.sock_dir}/libvirt-sock"
        self.log = os.path.join(self.dir, "libvirtd.log")
        self.proc: subprocess.Popen | None = None
        self._conn = None

    def _prepare(self) -> list:
        """The private directories and configuration; returns the bind
        mounts [src, dst, ...] for NS_INIT."""
        binds = []
        for target, mine in PRIVATE_DIRS.items():
            src = os.path.join(self.dir, mine)
            os.makedirs(src, exist_ok=True)
            os.makedirs(target, exist_ok=True)  # the mount point; empty and unused on the host
            binds += [src, target]
        etc = os.path.join(self.dir, "etc/libvirt")
        # the system's top-level configuration (libvirt.conf, ...), never its
        # domains, networks or secrets (the subdirectories)
        if os.path.isdir("/etc/libvirt"):
            for name in os.listdir("/etc/libvirt"):
                path = os.path.join("/etc/libvirt", name)
                if os.path.isfile(path) and name not in ("libvirtd.conf", "qemu.conf"):
                    shutil.copy(path, etc)
        os.makedirs(self.sock_dir, exist_ok=True)
        with open(os.path.join(etc, "qemu.conf"), "w") as f:
            f.write(QEMU_CONF)
        with open(os.path.join(etc, "libvirtd.conf"), "w") as f:
            f.write(LIBVIRTD_CONF.format(sock=self.sock_dir, log=self.log))
        binds += self._qemu_user()
        return binds

    def _qemu_user(self) -> list:
        """Private /etc/passwd and /etc/group with the libvirt-qemu user and
        group when the system lacks them (binds for NS_INIT), else []."""
        import grp
        import pwd
        try:
            pwd.getpwnam("libvirt-qemu")
            grp.getgrnam("libvirt-qemu")
            return []
        except KeyError:
            pass
        binds = []
        for name, line in (("passwd", "libvirt-qemu:x:64055:64055:Libvirt Qemu:/nonexistent:"
                                      "/usr/sbin/nologin\n"),
                           ("group", "libvirt-qemu:x:64055:\n")):
            with open(f"/etc/{name}") as f:
                text = f.read()
            mine = os.path.join(self.dir, name)
            with open(mine, "w") as f:
                f.write(text if text.endswith("\n") or not text else text + "\n")
                if not any(ln.startswith("libvirt-qemu:") for ln in text.splitlines()):
                    f.write(line)
            binds += [mine, f"/etc/{name}"]
        return binds

    def start(self) -> "Libvirtd":
        """Starts libvirtd and returns when `virsh list` answers; raises
        RuntimeError with its log when it does not within a minute."""
        binds = self._prepare()
        args = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                "--kill-child", "--mount-proc", sys.executable, "-c", NS_INIT, self.dir] + binds
        out = open(os.path.join(self.dir, "unshare.log"), "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        out.close()
        deadline = time.monotonic() + 60  # a bound on start-up, not a measurement
        while True:
            r = subprocess.run(["virsh", "-c", self.uri, "list"], capture_output=True)
            if r.returncode == 0:
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"libvirtd did not start (see {self.dir}):\n"
                                   f"{r.stderr.decode(errors='replace')}\n{self._logs()}")
            time.sleep(0.1)

    def _logs(self) -> str:
        text = ""
        for name in ("unshare.log", "libvirtd.log"):
            try:
                with open(os.path.join(self.dir, name), "rb") as f:
                    text += f"--- {name}\n" + f.read()[-3000:].decode(errors="replace")
            except OSError:
                pass
        return text

    def conn(self):
        """A libvirt.virConnect to this libvirtd (one, kept open)."""
        import libvirt
        # errors are raised as libvirtError; libvirt's default handler also prints them
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        if self._conn is None or not self._conn.isAlive():
            self._conn = libvirt.open(self.uri)
        return self._conn

    def virsh(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        """Runs `virsh -c URI ARGS...`; returns its stdout. Raises
        AssertionError with its output when it fails (and `check`)."""
        r = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} failed ({r.returncode}):\n"
                                 f"{r.stdout}{r.stderr}")
        return r.stdout

    def destroy_undefine(self, name: str) -> None:
        """Destroys domain `name` if it runs and undefines it with its
        checkpoint and snapshot metadata; nothing when there is no such domain."""
        import libvirt
        try:
            dom = self.conn().lookupByName(name)
        except libvirt.libvirtError:
            return
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                          | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                          | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)

    def agent(self, name: str, execute: str, timeout: int = 30, **arguments) -> object:
        """Runs the guest-agent command `execute` with `arguments` in domain
        `name` (libvirt_qemu.qemuAgentCommand); returns its "return" value.
        Raises libvirt.libvirtError when the agent does not answer."""
        import libvirt_qemu
        command = {"execute": execute}
        if arguments:
            command["arguments"] = arguments
        dom = self.conn().lookupByName(name)
        return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(command), timeout, 0))[
            "return"]

    def agent_exec(self, name: str, path: str, *args: str, timeout: float = 60) -> tuple:
        """Runs `path ARGS...` in domain `name` through the guest agent
        (guest-exec, then guest-exec-status until it exits, up to `timeout`
        seconds: a bound, not a measurement); returns (exit code, stdout,
        stderr) as (int, str, str). Raises AssertionError on timeout."""
        pid = self.agent(name, "guest-exec", path=path, arg=list(args),
                         **{"capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.agent(name, "guest-exec-status", pid=pid)
            if status["exited"]:
                out, err = (base64.b64decode(status.get(k, "")).decode(errors="replace")
                            for k in ("out-data", "err-data"))
                return status.get("exitcode", -1), out, err
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} did not exit within {timeout} s in {name}")
            time.sleep(0.1)

    def qemu_pid(self, name: str) -> int:
        """The host PID of domain `name`'s QEMU (libvirt reports the one
        inside the namespace). Raises LookupError when it runs no QEMU."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            init = int(f.read().split()[0])
        namespace = os.readlink(f"/proc/{init}/ns/pid")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"-name" in argv and argv.index(b"-name") + 1 < len(argv) and \
                    argv[argv.index(b"-name") + 1].startswith(f"guest={name},".encode()):
                return int(entry)
        raise LookupError(f"no QEMU of domain {name} in {self.dir}")

    def crash(self, name: str) -> None:
        """Kills domain `name`'s QEMU with SIGKILL: a host crash for the
        disk (no flush, no dirty bitmap stored), unlike `virsh destroy`,
        which first sends SIGTERM and lets QEMU close its images cleanly.
        Returns once libvirt sees the domain stopped (up to 60 s)."""
        os.kill(self.qemu_pid(name), signal.SIGKILL)
        dom = self.conn().lookupByName(name)
        deadline = time.monotonic() + 60
        while dom.isActive():
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} still runs 60 s after its QEMU was killed")
            time.sleep(0.1)

    @contextlib.contextmanager
    def domain(self, xml: str, *, start: bool = True) -> Iterator:
        """Defines (and starts, if `start`) the domain of `xml`; yields its
        libvirt.virDomain; destroys and undefines it afterwards, whatever happened."""
        dom = self.conn().defineXML(xml)
        name = dom.name()
        try:
            if start:
                dom.create()
            yield dom
        finally:
            self.destroy_undefine(name)

    def stop(self) -> None:
        """Destroys every domain left, then stops libvirtd (SIGTERM, SIGKILL
        after 10 s); the namespace's end kills any QEMU left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                for dom in self.conn().listAllDomains():
                    self.destroy_undefine(dom.name())
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()
        self._conn = None
        if self.proc.poll() is None:
            # unshare ignores SIGTERM; the namespace's init forwards it to libvirtd
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # its child, the namespace's init, follows (--kill-child)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "Libvirtd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory):
    """A private libvirtd for the session (import this fixture); fails,
    never skips, when the machine lacks what it needs."""
    missing = missing_requirements()
    if missing:
        pytest.fail(f"a private libvirtd needs {', '.join(missing)}: {INSTALL_HINT}")
    with Libvirtd(tmp_path_factory.mktemp("libvirtd")) as daemon:
        yield daemon

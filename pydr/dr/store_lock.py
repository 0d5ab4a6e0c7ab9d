"""The vault's lock: ``vault.lock``, flock()ed by the one command that
changes the vault (readers never take it and never wait). The holder
writes its pid and command line into it, hooks' command lines hidden, so
that a refused command can name it."""

import fcntl
import os

from ..engine.oserrors import naming
from ..errors import VaultError

LOCK_NAME = "vault.lock"

# the options whose value is a hook's command line (which may hold a password)
HOOK_OPTIONS = ("--quiesce-hook", "--thaw-hook", "--shutdown-hook", "--pre-hook", "--post-hook")
HIDDEN = "<hook set>"


def take(directory):
    """Take the lock of the vault in `directory` (non-blocking) and record
    this process in it; the lock's file descriptor (close it to release).
    VaultError naming the holder when another process has it."""
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        raise VaultError("the vault is locked by another pydr process"
                         + (f" (pid {holder})" if holder else "")
                         + ": wait for it to end, then run the command again",
                         path=directory) from None
    try:
        with naming(path):  # a full disk names the vault
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}: {command_line()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def held_by_another(directory):
    """Whether a process holds the lock of the vault in `directory` now
    (ask only when this process does not hold it)."""
    try:
        fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def redact_argv(argv):
    """`argv` with the command line of every hook option replaced by
    HIDDEN ("--quiesce-hook CMD" and "--quiesce-hook=CMD")."""
    out, hide_next = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if len(name) > 3 and name.startswith("--"):  # an abbreviation names its option
            name = next((o for o in HOOK_OPTIONS if o.startswith(name)), name)
            arg = name if "=" not in arg else f"{name}={arg.split('=', 1)[1]}"
        if hide_next:
            out.append(HIDDEN)
            hide_next = False
        elif arg in HOOK_OPTIONS:
            out.append(arg)
            hide_next = True
        elif name in HOOK_OPTIONS:
            out.append(f"{name}={HIDDEN}")
        else:
            out.append(arg)
    return out


def command_line():
    """This process's command line as the lock file shows it."""
    import sys

    argv = redact_argv(sys.argv)  # the lock file is shown to a refused command
    if argv and os.path.basename(argv[0]) == "pydr":
        argv[0] = "pydr"
    return " ".join(argv)

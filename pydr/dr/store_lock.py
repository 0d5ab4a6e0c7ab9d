"""The vault's lock: ``vault.lock``, flock()ed by the one command that
changes the vault (readers never take it and never wait). The holder
writes its pid and command line into it, hooks' command lines hidden, so
that a refused command can name it.

flock() locks belong to an open file, not to a process: a second writer
in the same process (another Vault object on the same directory) is
refused like another process, and told that it is this process.

Waiter priority (pydr run): a writer that finds the lock busy and waits
for it holds a shared flock on ``vault.lock.wait`` while it waits; the
service takes that file exclusively (:func:`take_after_waiters`) before
each round's lock, so an operator's command that waits always gets the
lock before the service's next round."""

import errno
import fcntl
import os
import stat
import threading
import time

from ..engine.oserrors import naming
from ..errors import InvalidArgument, VaultError

LOCK_NAME = "vault.lock"
WAIT_NAME = "vault.lock.wait"  # shared-locked by the writers waiting for vault.lock
RUN_LOCK = "run.lock"  # flock()ed by the vault's pydr run (pydr.dr.service) for its life

# the options whose value is a hook's command line (which may hold a password)
HOOK_OPTIONS = ("--quiesce-hook", "--thaw-hook", "--shutdown-hook", "--pre-hook", "--post-hook",
                "--alert-command", "--bring-up-hook", "--verify-script")
HIDDEN = "<hook set>"


# the lock files this process holds, {(st_dev, st_ino): pid}: a refused
# second writer of this process is told so (the pid tells a forked child
# from its parent, which shares the lock with it)
_held = {}
_held_guard = threading.Lock()

# polling the lock while waiting for it: from the first delay, doubling up
# to the last (flock has no timeout, and a blocking flock cannot be interrupted
# at a deadline without a signal)
_FIRST_POLL, _LAST_POLL = 0.005, 0.1
_pause = time.sleep  # (a test pauses otherwise)


class VaultLocked(VaultError):
    """Another process (or another Vault of this one) holds the vault's lock."""


def check_timeout(timeout):
    """`timeout` (seconds to wait for the lock, or None) if it is one;
    InvalidArgument otherwise."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            0 <= timeout < float("inf")):
        raise InvalidArgument(f"lock_timeout must be None or a number of seconds >= 0, "
                              f"not {timeout!r}")
    return timeout


def take(directory, timeout=None):
    """Take the lock of the vault in `directory` and record this process in
    it; the lock's file descriptor (give it to :func:`release`).
    ``timeout``: None or 0 fails at once when another holds it; a number of
    seconds waits up to that long (polling, with a growing pause). Then
    VaultError naming the holder: its pid and command line, or "this
    process" when it is another Vault object of this process."""
    check_timeout(timeout)
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _wait_for(fd, timeout, directory)
    except BlockingIOError:
        message, hint = _holder(fd)
        os.close(fd)
        if timeout:
            message += f"; waited {timeout:g} s"
        raise VaultLocked(message, path=directory, hint=hint) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        with naming(path):  # a full disk names the vault
            os.ftruncate(fd, 0)
            # an argument of bytes that are not UTF-8 (os.fsdecode's escapes) shown escaped
            os.pwrite(fd, f"{os.getpid()}: {command_line()}\n".encode("utf-8", "backslashreplace"),
                      0)
    except BaseException:
        os.close(fd)
        raise
    st = os.fstat(fd)
    with _held_guard:
        _held[st.st_dev, st.st_ino] = os.getpid()
    return fd


def release(fd):
    """Release the lock `fd` (from :func:`take`) and close it."""
    st = os.fstat(fd)
    with _held_guard:
        if _held.get((st.st_dev, st.st_ino)) == os.getpid():
            del _held[st.st_dev, st.st_ino]
    os.close(fd)


def _wait_for(fd, timeout, directory=None):
    """flock `fd` exclusively, waiting up to `timeout` seconds;
    BlockingIOError when it is still held then. While it waits it holds a
    shared flock on the vault's WAIT_NAME (`directory`): the service lets
    it go first."""
    deadline = time.monotonic() + (timeout or 0)
    pause = _FIRST_POLL
    waiting = None
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
            if waiting is None and directory is not None:
                waiting = _announce_waiter(directory)
            _pause(min(pause, left))
            pause = min(pause * 2, _LAST_POLL)
    finally:
        if waiting is not None:
            os.close(waiting)


def _open_wait_file(directory):
    # never a symlink: the file is created in the vault, never followed out of it
    return os.open(os.path.join(directory, WAIT_NAME),
                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def _announce_waiter(directory):
    """A shared flock on the vault's WAIT_NAME (its fd), or None when it
    cannot be had now (the service holds it for an instant: asked again at
    the next pause) or at all (a read-only vault: priority is a courtesy)."""
    try:
        fd = _open_wait_file(directory)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def take_after_waiters(directory, open_writer, *, cancel=None, pause=0.05):
    """Open the vault in `directory` as a writer once no other writer
    waits for it: the lowest-priority way in, pydr run's each round.

    Args:
        directory: the vault's directory.
        open_writer: a callable that opens the vault as a writer without
            waiting (e.g. ``lambda: Vault(directory, writer=True)``); it
            raises VaultLocked while another process holds the lock.
        cancel: a threading.Event; once set, the wait ends (None returned).
        pause: seconds between attempts (a cancel ends a pause at once).

    Returns:
        What `open_writer` returned, or None when `cancel` was set first.

    Raises:
        Whatever `open_writer` raises other than VaultLocked; OSError when
        the wait file cannot be made (the path named).
    """
    with naming(os.path.join(directory, WAIT_NAME)):
        wait_fd = _open_wait_file(directory)
    try:
        while cancel is None or not cancel.is_set():
            try:
                fcntl.flock(wait_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a writer waits: it goes first
                pass
            else:
                try:
                    return open_writer()
                except VaultLocked:
                    pass
                finally:
                    fcntl.flock(wait_fd, fcntl.LOCK_UN)
            if cancel is not None:
                cancel.wait(pause)
            else:
                _pause(pause)
        return None
    finally:
        os.close(wait_fd)


def _holder(fd):
    """(message, hint) of a refusal, naming the lock's holder (`fd`: the lock file)."""
    st = os.fstat(fd)
    with _held_guard:
        ours = _held.get((st.st_dev, st.st_ino)) == os.getpid()
    if ours:
        return ("this process already has the vault open as a writer (another Vault "
                f"object, pid {os.getpid()})",
                "close that Vault first, or open this one with writer=False")
    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    return ("the vault is locked by another pydr process" + (f" (pid {holder})" if holder else ""),
            "wait for it to end, then run the command again")


def _locked_by_another(path, absent):
    """Whether another process holds a flock on `path` now; False when
    opening it fails with one of `absent` (exception classes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except absent:
        return False
    try:
        return _flocked(fd)
    finally:
        os.close(fd)


def _flocked(fd):
    """Whether another open file holds a flock on the file `fd` is open on."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True


def held_by_another(directory):
    """Whether a process holds the lock of the vault in `directory` now
    (ask only when this process does not hold it)."""
    return _locked_by_another(os.path.join(directory, LOCK_NAME), FileNotFoundError)


def service_running(directory):
    """Whether a pydr run serves the vault in `directory` now (another
    process holds its RUN_LOCK). False when there is no RUN_LOCK.

    VaultError naming it when RUN_LOCK is no regular file (a FIFO, a
    device, a directory, a symlink) or cannot be opened: it is opened
    without blocking and without following a symlink, so a FIFO put there
    never makes a writer command hang."""
    path = os.path.join(directory, RUN_LOCK)
    hint = f"pydr run creates {RUN_LOCK} as a regular file: remove what is there"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError as exc:
        what = ("is a symbolic link" if exc.errno == errno.ELOOP
                else f"cannot be opened: {exc.strerror}")
        raise VaultError(f"{RUN_LOCK} {what}", path=path, hint=hint) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise VaultError(f"{RUN_LOCK} is not a regular file", path=path, hint=hint)
        return _flocked(fd)
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

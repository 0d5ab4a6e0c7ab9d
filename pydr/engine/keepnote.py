"""Keep notes: where a committed undo journal is to be kept.

An apply that keeps its journal as a recovery-point step writes the note
(``.NAME.pydr-undo.keep``, beside the journal) before it commits; a crash
between the COMMIT and the move leaves a committed journal that recovery
moves where the note says (pydr.engine.journal.pending_journal).

A note names the step relative to the replica's directory when the step
lives beside it (".REPLICA.pydr-steps/NAME.undo", the only relative form
honoured); a step kept elsewhere (a local replica's steps are in the
vault) is an absolute path, honoured only where the caller offers that
very path (choose_undo_path). Anything else is not followed: the note may
have been written by whoever can write to the replica's directory.
"""

import contextlib
import errno
import os
import stat

from . import beneath
from . import names
from .atomic import atomic_write, fsync_dir
from ..errors import FormatError, InvalidState

KEEP_NOTE_MAX = 4096


def _replica_dir(target_name):
    return os.path.dirname(os.path.abspath(target_name))


def _steps_dir_name(target_name):
    return f".{os.path.basename(target_name)}{names.STEPS}"


def write(note, target_name, dest):
    """Write the note of the target `target_name`: its step goes to `dest`."""
    dest = os.path.abspath(os.fspath(dest))
    rel = os.path.relpath(dest, _replica_dir(target_name))
    beside = rel.split("/")[0] == _steps_dir_name(target_name) and ".." not in rel.split("/")
    with atomic_write(note, through=False) as f:  # never into a FIFO or device a link names
        f.write((rel if beside else dest).encode())


def remove(note):
    if os.path.lexists(note):  # checked first: most targets have none (or are read-only)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(note)
            fsync_dir(note)


def _read(note):
    """The text of a keep note, or None; a note that is not a small regular
    file with one link is refused, never read through."""
    try:
        fd = os.open(note, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidState("this keep note is a symlink: not followed", path=note) from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > KEEP_NOTE_MAX:
            raise InvalidState("this keep note is not a small regular file with one link: "
                               "not followed", path=note)
        raw = f.read(KEEP_NOTE_MAX)
    try:
        return raw.decode() or None
    except UnicodeDecodeError:
        raise InvalidState("this keep note is not text: not followed", path=note) from None


def destination(note, target_name, allowed=(), holds_step=None):
    """(directory fd, name) where the committed journal of the target
    `target_name` is to be kept, as its note says, or None without a note.
    The note must name a step in the replica's own ".REPLICA.pydr-steps"
    (opened without following links, made if missing) or one of the
    `allowed` paths; anything else raises InvalidState naming the note.
    When the caller offers steps (`allowed`, in order) the note must name
    the first, or the second only where the first holds a committed step
    (`holds_step(path)`: a kill after that step was kept, before the vault
    recorded it); any other step is damage: FormatError naming the note."""
    text = _read(note)
    if text is None:
        return None
    base, steps = _replica_dir(target_name), _steps_dir_name(target_name)
    rel = os.path.relpath(text, base) if os.path.isabs(text) else text
    parts = rel.split("/")
    if len(parts) == 2 and parts[0] == steps and parts[1].endswith(".undo") \
            and parts[1] != ".undo" and "\n" not in rel and "\x00" not in rel:
        if allowed and holds_step is not None:
            _check_order(note, text, [_is_beside(a, steps, parts[1]) for a in allowed],
                         allowed, holds_step)

        base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return beneath.open_dir(base_fd, steps, create=True), parts[1]
        finally:
            os.close(base_fd)
    offered = [os.path.normpath(os.path.abspath(os.fspath(a))) for a in allowed]
    if os.path.isabs(text) and os.path.normpath(text) in offered:
        dest = os.path.normpath(text)
        if holds_step is not None:
            _check_order(note, text, [dest == a for a in offered], allowed, holds_step)
        os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
        return os.open(os.path.dirname(dest), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), \
            os.path.basename(dest)
    raise InvalidState(f"this keep note names {text[:200]!r}, which is not a step beside the "
                       f"replica ({steps}/NAME.undo) nor one offered now: not followed. If "
                       "it is pydr's, the replica's next replication cycle keeps the journal "
                       "as its step; if not, remove the note and the journal", path=note)


def _is_beside(offered, steps, name):
    """Whether the offered step path is STEPS/NAME (the note's relative form;
    a confined server offers it under another spelling of the directory)."""
    offered = os.fspath(offered)
    return os.path.basename(offered) == name and \
        os.path.basename(os.path.dirname(offered)) == steps


def _check_order(note, text, matches, allowed, holds_step):
    """The note names allowed[i] (matches[i]): i == 0, or i > 0 with every
    earlier offered step committed. Anything else is a note that lies."""
    if True in matches:
        i = matches.index(True)
        if all(holds_step(os.fspath(a)) for a in allowed[:i]):
            return
        why = (f"it names the offered step {i + 1} ({os.path.basename(text)}) while step "
               f"{i} ({os.path.basename(os.fspath(allowed[i - 1]))}) holds no committed step")
    else:
        why = f"it names {os.path.basename(text)!r}, not the step offered now " \
              f"({os.path.basename(os.fspath(allowed[0]))})"
    raise FormatError(f"this keep note is damaged: {why}; nothing was moved. If the committed "
                      f"journal beside it is this replica's last cycle, write "
                      f"{os.fspath(allowed[0])} into the note and run the same command again",
                      path=note)

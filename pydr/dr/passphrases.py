"""Where the passphrase of an encrypted object store comes from (restic's
conventions), never the command line and never the vault:

    --passphrase-file FILE       the file's contents, one trailing newline
    PYDR_PASSPHRASE_FILE=FILE    stripped
    PYDR_PASSPHRASE=TEXT         the variable's bytes
    a terminal prompt            when standard input is a terminal and none
                                 of the above is given (the CLI asks)

in that order. A new passphrase (``pydr key add|passwd|recover``) comes from
--new-passphrase-file, PYDR_NEW_PASSPHRASE_FILE or PYDR_NEW_PASSPHRASE,
else a prompt asked twice. The passphrase of a recovery private key
(``pydr key create-recovery|recover``) comes from --recovery-passphrase-file,
PYDR_RECOVERY_PASSPHRASE_FILE or PYDR_RECOVERY_PASSPHRASE. An empty passphrase is refused wherever it comes
from.
"""

from __future__ import annotations

import os

from ..errors import InvalidArgument

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Mapping, Optional, Tuple

#: the largest passphrase file read (a passphrase, not a disk image)
MAX_FILE = 64 << 10

CURRENT = ("PYDR_PASSPHRASE_FILE", "PYDR_PASSPHRASE")
NEW = ("PYDR_NEW_PASSPHRASE_FILE", "PYDR_NEW_PASSPHRASE")
RECOVERY = ("PYDR_RECOVERY_PASSPHRASE_FILE", "PYDR_RECOVERY_PASSPHRASE")


def read_passphrase_file(path: str | os.PathLike[str]) -> bytes:
    """The passphrase in file `path`: its bytes without one trailing newline
    ("\\n" or "\\r\\n").

    Raises:
        FileNotFoundError, PermissionError: the file cannot be read (the
            error names it).
        InvalidArgument: the passphrase is empty, or the file is larger than
            MAX_FILE (not a passphrase).
    """
    with open(path, "rb") as f:
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise InvalidArgument(f"larger than {MAX_FILE} bytes: not a passphrase file",
                              path=os.fspath(path))
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    return _not_empty(data, os.fspath(path))


def passphrase_from(file: str | os.PathLike[str] | None = None,
                    env: Mapping[str, str] = os.environ) -> Optional[bytes]:
    """The passphrase given to this process, or None when none is.

    Args:
        file: a --passphrase-file; read first when given.
        env: the environment: PYDR_PASSPHRASE_FILE, then PYDR_PASSPHRASE.

    Returns:
        The passphrase's bytes (a file's trailing newline stripped; a
        variable's text encoded as the file system encodes names), or None.

    Raises:
        FileNotFoundError, PermissionError: the file named cannot be read.
        InvalidArgument: the passphrase given is empty.
    """
    return _given(file, env, CURRENT)


def new_passphrase_from(file: str | os.PathLike[str] | None = None,
                        env: Mapping[str, str] = os.environ) -> Optional[bytes]:
    """The new passphrase given to this process (``--new-passphrase-file``,
    PYDR_NEW_PASSPHRASE_FILE, PYDR_NEW_PASSPHRASE), or None; as
    :func:`passphrase_from`."""
    return _given(file, env, NEW)


def recovery_passphrase_from(file: str | os.PathLike[str] | None = None,
                             env: Mapping[str, str] = os.environ) -> Optional[bytes]:
    """The passphrase of a recovery private key given to this process
    (``--recovery-passphrase-file``, PYDR_RECOVERY_PASSPHRASE_FILE,
    PYDR_RECOVERY_PASSPHRASE), or None; as :func:`passphrase_from`."""
    return _given(file, env, RECOVERY)


def ask_passphrase(prompt: str = "passphrase: ", *, twice: bool = False) -> Optional[bytes]:
    """A passphrase typed at the terminal (not echoed), or None when
    standard input is not a terminal. With `twice`, asked again and
    compared (a new passphrase).

    Raises:
        InvalidArgument: it is empty, or the two differ.
    """
    import getpass
    import sys

    if sys.stdin is None or not sys.stdin.isatty():
        return None
    first = getpass.getpass(prompt)
    if twice and getpass.getpass("again: ") != first:
        raise InvalidArgument("the two passphrases typed differ")
    return _not_empty(os.fsencode(first), "the terminal")


def _given(file: str | os.PathLike[str] | None, env: Mapping[str, str],
           names: Tuple[str, str]) -> Optional[bytes]:
    file_var, text_var = names
    if file is not None:
        return read_passphrase_file(file)
    if env.get(file_var):
        return read_passphrase_file(env[file_var])
    if text_var in env:
        return _not_empty(os.fsencode(env[text_var]), text_var)
    return None


def _not_empty(passphrase: bytes, where: str) -> bytes:
    if not passphrase:
        raise InvalidArgument("the passphrase is empty", path=where)
    return passphrase

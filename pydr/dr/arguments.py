"""Arguments checked at the door: what a caller of the vault API gives is
checked before anything is read or written, and refused with
:class:`pydr.errors.InvalidArgument` naming what was given and what was
expected -- never a TypeError or KeyError from deep inside."""

import os

from ..errors import InvalidArgument


def directory(value, what="directory"):
    """`value` as a str path: a non-empty str or os.PathLike naming a str.
    `what` names the argument in the refusal ("the vault's directory")."""
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if isinstance(path, str) and path:
            return path
    raise InvalidArgument(f"{what} must be a path (a non-empty str or os.PathLike), "
                          f"not {value!r}")

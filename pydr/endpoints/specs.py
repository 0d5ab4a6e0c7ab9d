"""What a spec names: a disk on another host (``[user@]host:PATH``) or one
here. Below every endpoint module, so that any of them may ask it
(pydr.endpoints re-exports parse_remote).
"""

import os


def parse_remote(spec):
    """(host, path) for "[user@]host:PATH", else None (a local path, or None).
    A path with a "/" before its first ":" is local ("./a:b", "dir/a:b")."""
    if spec is None or hasattr(spec, "read"):
        return None
    spec = os.fspath(spec)
    if spec.startswith(("/", "./", "../")) or ":" not in spec:
        return None
    host, path = spec.split(":", 1)
    if not host or "/" in host or not path:
        return None
    return host, path

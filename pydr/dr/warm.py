"""What a long-running service (pydr run) keeps between the cycles of its
tracked disks, so that a cycle costs what changed and not a one-shot
process's set-up: :class:`WarmState`, given to pydr.dr.cycle.replicate as
``warm=``.

Per tracked disk (:class:`DiskWarm`) it keeps:

  * a live disk (qmp:SOCKET:NODE): one QMP connection for all of a cycle's
    commands (its checks, the size, the cut's transaction, the fleece and
    the dropped bitmap) instead of one per command, and an empty qcow2
    image of the disk's size that each fleece's scratch overlay is copied
    from instead of a `qemu-img create`. The connection is released at the
    end of each cycle: QEMU serves one QMP client at a time, and holding it
    between cycles would lock out every other (an operator's tools,
    libvirt-less management);
  * a qcow2 image: its `qemu-img info` (size and bitmaps) read once per
    cycle and reused while the file's identity (device, inode, size, mtime,
    ctime) is unchanged; any qemu-img bitmap change forgets it.

Nothing here is trusted over what it describes: an entry is dropped (the
disk's next cycle is a cold one) when the vault's record of the disk's
bitmap is not the one the entry's last cycle left (another process cycled
it, a failover or resync happened in between), when its last cycle failed,
and a QMP connection is replaced when its socket file is not the one it
connected through (QEMU restarted) or QEMU closed it. A warm cycle runs the
same code on the same data as a cold one: its result is byte for byte the
same.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

#: identifies a disk in a WarmState: (vault directory, item, disk index)
DiskKey = Tuple[str, str, int]
#: a file's (device, inode, size, mtime ns, ctime ns)
FileIdentity = Tuple[int, int, int, int, int]


def file_identity(path: str) -> Optional[FileIdentity]:
    """(device, inode, size, mtime ns, ctime ns) of `path`, or None when it
    cannot be stat()ed. Any write, truncation, rename over it or metadata
    change gives another identity (within the file system's timestamp
    granularity: a cached value is never kept past one cycle)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class DiskWarm:
    """What a WarmState keeps for one tracked disk (see the module
    docstring). Its methods are called by the endpoints of pydr.endpoints.qemu
    when a cycle gives them this entry (``endpoint.warm``)."""

    def __init__(self, key: DiskKey) -> None:
        """An empty entry for the disk `key` (vault directory, item, disk
        index); everything is made when first needed."""
        self.key = key
        #: (bitmap, generation) the vault recorded for the disk after this
        #: entry's last cycle; None before its first
        self.expected: Optional[Tuple[Optional[str], int]] = None
        self._qmp: Any = None  # a QMP client, held during one cycle
        self._dir: Optional[str] = None  # private: the overlay templates
        self._templates: Dict[int, str] = {}
        self._info: Optional[Tuple[FileIdentity, Dict[str, Any]]] = None
        self._lock = threading.Lock()

    # -- live disks ------------------------------------------------------------

    def qmp(self, socket_path: str) -> Any:
        """The QMP connection to `socket_path` for this cycle: the one held
        when it is still alive and to the same socket file, else a new one.

        Args:
            socket_path: the QMP unix socket of the disk's QEMU.

        Returns:
            A connected QMP client (pydr.endpoints.qemu.qmp_connection;
            owned by this entry: the caller does not close it).

        Raises:
            ConnectionRefusedError: QEMU does not answer on `socket_path`.
        """
        from ..endpoints.qemu import qmp_connection

        with self._lock:
            q = self._qmp
            if q is not None and (q.path != socket_path or not q.alive()):
                self._release_locked()
                q = None
            if q is None:
                q = self._qmp = qmp_connection(socket_path)
            return q

    def broken(self) -> None:
        """The held QMP connection failed mid-command (its stream may be out
        of step): it is closed, the next use connects again."""
        self.release()

    def release(self) -> None:
        """Close the held QMP connection, if any (end of a cycle: QEMU serves
        one QMP client at a time)."""
        with self._lock:
            self._release_locked()

    def _release_locked(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def template(self, size: int) -> str:
        """An empty qcow2 image of virtual `size` bytes, made once by
        `qemu-img create` in a private directory; a fleece copies it as its
        scratch overlay (a fresh copy is exactly what create would make).

        Args:
            size: the disk's virtual size in bytes.

        Returns:
            The template's path (never written: copies are).

        Raises:
            QemuError: qemu-img could not create it.
        """
        from ..endpoints.qemu import create_image

        with self._lock:
            path = self._templates.get(size)
            if path is not None and os.path.isfile(path):
                return path
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="pydr-warm-")
            path = os.path.join(self._dir, f"empty-{size}.qcow2")
            tmp = path + ".new"
            with contextlib.suppress(FileNotFoundError):  # a failed create's (made private)
                os.unlink(tmp)
            create_image(tmp, size)
            os.replace(tmp, path)  # whole or absent: a killed create leaves no template
            self._templates[size] = path
            return path

    # -- qcow2 images -----------------------------------------------------------

    def image_info(self, path: str, read: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        """The `qemu-img info` of the image `path`: the one read last while
        the file's identity is unchanged, else ``read()`` (kept with the
        identity taken before it: a change while it runs gives another
        identity, so it is read again next time).

        Args:
            path: the image file.
            read: runs qemu-img info on it and returns the parsed JSON.

        Returns:
            The info dict (shared: not to be changed by the caller).

        Raises:
            What ``read`` raises.
        """
        before = file_identity(path)
        with self._lock:
            if before is not None and self._info is not None and self._info[0] == before:
                return self._info[1]
        info = read()
        with self._lock:
            self._info = (before, info) if before is not None else None
        return info

    def forget_info(self) -> None:
        """Forget the image's info (after a qemu-img bitmap change, and at
        the start of each cycle: it is never carried from one to the next)."""
        with self._lock:
            self._info = None

    def close(self) -> None:
        """Release the connection and remove the templates (idempotent)."""
        with self._lock:
            self._release_locked()
            self._info = None
            self._templates.clear()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None


class WarmState:
    """What one service process keeps between the cycles of its tracked
    disks (see the module docstring). Thread-safe: a service runs several
    items' cycles at once (each disk's entry is used by its own item's
    cycle only). Use as a context manager, or call :meth:`close`."""

    def __init__(self) -> None:
        """An empty state; entries are made by the cycles that use it."""
        self._disks: Dict[DiskKey, DiskWarm] = {}
        self._lock = threading.Lock()
        self.closed = False

    def disk(self, vault_dir: str, item: str, idx: int) -> DiskWarm:
        """The entry of disk `idx` of `item` in the vault at `vault_dir`,
        made empty when there is none.

        Raises:
            ValueError: the state was closed.
        """
        key = (os.path.abspath(vault_dir), item, int(idx))
        with self._lock:
            if self.closed:
                raise ValueError("this WarmState was closed")
            entry = self._disks.get(key)
            if entry is None:
                entry = self._disks[key] = DiskWarm(key)
            return entry

    def begin(self, vault: Any, name: str) -> None:
        """Before a cycle of item `name` (its vault store `vault`): each of
        its disks' entries is checked against the vault -- an entry whose
        last cycle left another bitmap than the vault records now (someone
        else cycled, resynced or failed the item over) is dropped -- and
        nothing read in an earlier cycle is kept (held connections released,
        image info forgotten)."""
        recorded = {d["idx"]: (d["bitmap"], d["generation"] or 0) for d in vault.disks(name)}
        with self._lock:
            keys = [k for k in self._disks if k[0] == os.path.abspath(vault.dir) and k[1] == name]
        for key in keys:
            entry = self._disks.get(key)
            if entry is None:
                continue
            if entry.expected is not None and recorded.get(key[2]) != entry.expected:
                self._drop(key)
                continue
            entry.release()
            entry.forget_info()

    def cycle_ended(self, vault: Any, name: str) -> None:
        """After a cycle of `name` recorded its point: each disk's entry
        remembers the bitmap the vault now records, and releases its
        connection."""
        for d in vault.disks(name):
            key = (os.path.abspath(vault.dir), name, d["idx"])
            with self._lock:
                entry = self._disks.get(key)
            if entry is not None:
                entry.expected = (d["bitmap"], d["generation"] or 0)
                entry.release()

    def drop(self, item: str, vault_dir: Optional[str] = None) -> None:
        """Forget every entry of `item` (of the vault at `vault_dir`, or of
        any): its next cycle is a cold one. Called when a cycle of it fails."""
        with self._lock:
            keys = [k for k in self._disks if k[1] == item
                    and (vault_dir is None or k[0] == os.path.abspath(vault_dir))]
        for key in keys:
            self._drop(key)

    def keep_only(self, items: Iterable[str]) -> None:
        """Forget the entries of every item not in `items` and release the
        others' connections (a service calls it after a round with the items
        it replicated: one it did not -- a failover, a pause -- starts cold
        when it comes back)."""
        wanted = set(items)
        with self._lock:
            keys = [k for k in self._disks if k[1] not in wanted]
            kept = [e for k, e in self._disks.items() if k[1] in wanted]
        for key in keys:
            self._drop(key)
        for entry in kept:
            entry.release()

    def _drop(self, key: DiskKey) -> None:
        with self._lock:
            entry = self._disks.pop(key, None)
        if entry is not None:
            entry.close()

    def __len__(self) -> int:
        return len(self._disks)

    def close(self) -> None:
        """Release everything: every QMP connection, every template file.
        Idempotent; the state cannot be used after it (ValueError)."""
        with self._lock:
            self.closed = True
            entries, self._disks = list(self._disks.values()), {}
        for entry in entries:
            with contextlib.suppress(Exception):
                entry.close()

    def __enter__(self) -> "WarmState":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

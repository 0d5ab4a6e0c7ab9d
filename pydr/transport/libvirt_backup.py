"""libvirt's changed-block tracking, as pydr drives it: checkpoints (a
persistent dirty bitmap per qcow2 disk, made by libvirt as part of a backup
job), the pull-mode backup job (an NBD export of every disk as of one
instant, on a unix socket in a private directory of pydr's), and the guest
agent's file-system freeze around it (docs/MACHINES.md, "Checkpoints and
backup jobs").

Checkpoints and jobs carry the vault's id: a checkpoint of vault V is
``pydr-V-N`` (V: the id's first 16 hex digits; :func:`checkpoint_prefix`), a job's private directory
``pydr-libvirt-V-*`` (:func:`scratch_prefix`, in whatever temporary
directory the cycle had), holding a lock file the cycle keeps locked
(flock) while it runs. A job is a killed pydr's of this vault only when
its socket is in such a directory and no process holds that lock; any
other job (another tool's, another vault's, a running cycle's) is never
aborted (:func:`stale_job` raises MachineError), and :func:`end_job`
aborts only the job whose socket it is given.

Every libvirt error becomes pydr's (pydr.transport.libvirt.libvirt_errors).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Dict, Iterator, List, Optional
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

from ..engine import crashpoints
from ..errors import MachineError
from .libvirt import libvirt_errors, libvirt_module, parse_xml

#: the names of pydr's checkpoints start so (then the vault's id: checkpoint_prefix)
PREFIX = "pydr-"
#: the private directories of pydr's backup jobs (socket and scratch files)
SCRATCH_PREFIX = "pydr-libvirt-"
#: how long the guest's file systems may stay frozen (seconds) unless the caller says
FREEZE_BOUND = 10.0
#: libvirt's job operation code of a backup job (VIR_DOMAIN_JOB_OPERATION_BACKUP)
_OPERATION_BACKUP = 9


def _parse(text: str, what: str) -> ElementTree.Element:
    """XML text libvirt gave, parsed (pydr.transport.libvirt.parse_xml)."""
    return parse_xml(text, what, MachineError)


def checkpoints(dom, *, where: Optional[str] = None) -> Dict[str, Dict[str, str]]:
    """The domain's checkpoints: {name: {disk target: "bitmap" | "no"}}.

    Args:
        dom: a libvirt.virDomain.
        where: named by an error (the connection URI).

    Returns:
        Every checkpoint libvirt knows of the domain, with what each records
        of each disk.

    Raises:
        MachineError: libvirt failed.
    """
    found = {}
    with libvirt_errors(f"listing the checkpoints of domain {dom.name()!r}", path=where):
        for cp in dom.listAllCheckpoints(0):
            root = _parse(cp.getXMLDesc(0), f"checkpoint {cp.getName()!r}")
            found[cp.getName()] = {d.get("name"): d.get("checkpoint", "bitmap")
                                   for d in root.iter("disk")}
    return found


def checkpoint_identity(dom, name: str, *, where: Optional[str] = None) -> Optional[str]:
    """Who checkpoint `name` is: "CREATIONTIME/DESCRIPTION" (libvirt's
    creation time, in seconds, and the description pydr gave it: a nonce
    of the cycle that made it; a checkpoint deleted and made again under
    the name has another), or None when there is no such checkpoint.

    Raises:
        MachineError: libvirt failed.
    """
    cp = _lookup_checkpoint(dom, name, where)
    if cp is None:
        return None
    with libvirt_errors(f"reading checkpoint {name!r} of domain {dom.name()!r}", path=where):
        text = cp.getXMLDesc(0)
    root = _parse(text, f"checkpoint {name!r}")
    return f"{(root.findtext('creationTime') or '').strip()}/" \
           f"{(root.findtext('description') or '').strip()}"


def _lookup_checkpoint(dom, name: str, where: Optional[str]):
    """Checkpoint `name` of the domain, or None when there is none; any other
    libvirt error is a MachineError naming it."""
    libvirt = libvirt_module()
    with libvirt_errors(f"looking up checkpoint {name!r} of domain {dom.name()!r}", path=where):
        try:
            return dom.checkpointLookupByName(name, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                return None
            raise


def delete_checkpoint(dom, name: str, *, where: Optional[str] = None) -> bool:
    """Delete checkpoint `name` of the domain (libvirt merges its bitmap into
    its parent's, so that no change recorded is lost). Returns False when
    there is no such checkpoint.

    Raises:
        MachineError: libvirt refused (a running job uses it, ...).
    """
    libvirt = libvirt_module()
    cp = _lookup_checkpoint(dom, name, where)
    if cp is None:
        return False
    with libvirt_errors(f"deleting checkpoint {name!r} of domain {dom.name()!r}", path=where):
        try:
            cp.delete(0)
        except libvirt.libvirtError as exc:
            words = exc.get_error_message() or ""
            if "bitmap" not in words or "not found" not in words:
                raise
            # its bitmap is gone (QEMU was killed): only libvirt's record of it is left
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    return True


def job_xml(dom) -> Optional[str]:
    """The XML of the domain's backup job, or None when it has none."""
    libvirt = libvirt_module()
    try:
        return dom.backupGetXMLDesc(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_BACKUP,
                                    libvirt.VIR_ERR_OPERATION_INVALID):
            return None
        raise


#: how many hex digits of the vault's id name its checkpoints and job
#: directories (64 bits; a unix socket's path must stay under 108 bytes)
ID_DIGITS = 16


def checkpoint_prefix(vault_id: str) -> str:
    """How the names of vault `vault_id`'s checkpoints start (then the generation)."""
    return f"{PREFIX}{vault_id[:ID_DIGITS]}-"


def scratch_prefix(vault_id: str) -> str:
    """How the private directories of vault `vault_id`'s backup jobs are named."""
    return f"{SCRATCH_PREFIX}{vault_id[:ID_DIGITS]}-"


def _is_pydr_socket(path: Optional[str], vault_id: str) -> bool:
    """Whether `path` is the socket of a job a cycle of vault `vault_id`
    began (in one of its scratch directories, under any temporary directory)."""
    if not path or os.path.basename(path) != "nbd.sock":
        return False
    return os.path.basename(os.path.dirname(path)).startswith(scratch_prefix(vault_id))


def _held(directory: str) -> bool:
    """Whether a live process holds the lock of job directory `directory`
    (a running cycle's job); a directory gone is nobody's."""
    import fcntl

    try:
        fd = os.open(os.path.join(directory, "lock"), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def stale_job(dom, vault_id: str, *, where: Optional[str] = None) -> Optional[str]:
    """End a backup job a killed cycle of vault `vault_id` left on the domain.

    Returns:
        The socket of the job aborted, or None when the domain had no
        backup job.

    Raises:
        MachineError: the domain runs a backup job that is not pydr's
            (another tool's: it is never aborted; the message names its
            socket or target), or libvirt failed.
    """
    with libvirt_errors(f"looking for a backup job of domain {dom.name()!r}", path=where):
        text = job_xml(dom)
    if text is None:
        return None
    root = _parse(text, f"the backup job of domain {dom.name()!r}")
    server = root.find("server")
    socket_path = server.get("socket") if server is not None else None
    if root.get("mode") != "pull" or not _is_pydr_socket(socket_path, vault_id):
        raise MachineError(f"domain {dom.name()!r} runs a backup job that is not this vault's "
                           f"(mode {root.get('mode')!r}, server "
                           f"{socket_path or (server.attrib if server is not None else None)!r})",
                           path=where, hint="wait for it to end, or end it (virsh domjobabort)")
    if _held(os.path.dirname(socket_path)):
        raise MachineError(f"domain {dom.name()!r} runs a backup job of a running cycle "
                           f"(socket {socket_path})", path=where,
                           hint="wait for that cycle to end")
    end_job(dom, socket=socket_path, where=where)
    with contextlib.suppress(OSError):
        shutil.rmtree(os.path.dirname(socket_path))
    return socket_path


def end_job(dom, *, socket: str, where: Optional[str] = None) -> None:
    """End the domain's backup job (abortJob: a pull-mode job is ended so)
    if it is the one serving `socket`; nothing when it has none. Another
    job (the domain's job ended and another began): MachineError, never
    aborted."""
    libvirt = libvirt_module()
    text = job_xml(dom)
    if text is None:
        return
    server = _parse(text, f"the backup job of domain {dom.name()!r}").find("server")
    if server is None or server.get("socket") != socket:
        raise MachineError(f"domain {dom.name()!r} runs a backup job that is not the one "
                           f"pydr began (socket {socket}): left alone", path=where)
    try:
        dom.abortJob()
    except libvirt.libvirtError as exc:
        if job_xml(dom) is None:  # ended already (the domain stopped, another abort)
            return
        raise MachineError(f"ending the backup job of domain {dom.name()!r}: "
                           f"{exc.get_error_message()}", path=where) from None


class BackupJob:
    """A pull-mode backup job pydr began: ``socket`` (the NBD server's unix
    socket), ``dir`` (its private 0700 directory, with the scratch files),
    ``checkpoint`` (the checkpoint it made), ``incremental`` (the one it
    exports changes since, or None), ``frozen`` (the guest's file systems
    were frozen at its start and thawed in time).
    :meth:`uri` gives a disk's export; :meth:`bitmap` the dirty bitmap to
    read its changes with."""

    def __init__(self, dom, directory: str, checkpoint: str, incremental: Optional[str],
                 where: Optional[str]):
        self.dom, self.dir, self.checkpoint, self.incremental = dom, directory, checkpoint, \
            incremental
        self.socket = os.path.join(directory, "nbd.sock")
        self.where = where
        self.frozen = False

    def uri(self, target: str) -> str:
        """The NBD URI of disk `target`'s export (libvirt names it by the target)."""
        return f"nbd+unix:///{target}?socket={self.socket}"

    def bitmap(self, target: str) -> Optional[str]:
        """The dirty bitmap exported with disk `target`: the changes since
        the incremental checkpoint (meta context
        ``qemu:dirty-bitmap:backup-TARGET``), or None for a full job."""
        return None if self.incremental is None else f"backup-{target}"

    def end(self) -> None:
        """End the job (abortJob) and remove its directory."""
        try:
            end_job(self.dom, socket=self.socket, where=self.where)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def backup_xml(job: BackupJob, tracked: List[str], full_only: List[str]) -> str:
    """The <domainbackup> of `job`: pull mode, its unix socket, a scratch
    file per disk; `tracked` disks since the incremental checkpoint (if
    any), `full_only` disks (no checkpoint bitmap: raw) whole."""
    disks = []
    for target in tracked + full_only:
        mode = " backupmode='full'" if target in full_only and job.incremental else ""
        scratch = os.path.join(job.dir, f"scratch-{target}.qcow2")
        disks.append(f"<disk name={quoteattr(target)} backup='yes' type='file'{mode}>"
                     f"<scratch file={quoteattr(scratch)}/></disk>")
    incremental = (f"<incremental>{escape(job.incremental)}</incremental>"
                   if job.incremental else "")
    return (f"<domainbackup mode='pull'>{incremental}"
            f"<server transport='unix' socket={quoteattr(job.socket)}/>"
            f"<disks>{''.join(disks)}</disks></domainbackup>")


def checkpoint_xml(name: str, tracked: List[str], untracked: List[str],
                   nonce: str = "") -> str:
    """The <domaincheckpoint> `name`: a bitmap for each `tracked` disk, none
    for the `untracked` ones, `nonce` as its description (the vault
    records it: a checkpoint made again under the name has another)."""
    disks = [f"<disk name={quoteattr(t)} checkpoint='bitmap'/>" for t in tracked]
    disks += [f"<disk name={quoteattr(t)} checkpoint='no'/>" for t in untracked]
    description = f"<description>{escape(nonce)}</description>" if nonce else ""
    return (f"<domaincheckpoint><name>{escape(name)}</name>{description}"
            f"<disks>{''.join(disks)}</disks></domaincheckpoint>")


#: the watchdog of a freeze, a child process of its own: it thaws the guest
#: when pydr tells it nothing within the bound, or dies (its stdin closes);
#: it ignores SIGTERM, SIGHUP and SIGINT (a service stop or a cgroup kill
#: signals pydr and it together: it outlives pydr to thaw). After SIGKILL
#: of both, the next cycle thaws (thaw_left).
_WATCHDOG = r"""
import signal
for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, signal.SIG_IGN)
import select, sys
import libvirt
uri, uuid, bound = sys.argv[1], sys.argv[2], float(sys.argv[3])
ready, _, _ = select.select([sys.stdin], [], [], bound)
if ready and sys.stdin.readline().strip() == "thawed":
    sys.exit(0)
libvirt.registerErrorHandler(lambda ctx, err: None, None)
libvirt.open(uri or None).lookupByUUIDString(uuid).fsThaw(None, 0)
"""


class _Freeze:
    """The guest's file systems frozen by its agent, thawed by :meth:`thaw`
    or, at the latest, by a watchdog process `bound` seconds after the
    freeze, or as soon as pydr dies (kill -9 included): a guest is never
    left frozen."""

    def __init__(self, dom, bound: float, where: Optional[str]):
        import subprocess
        import sys

        self.dom, self.bound, self.where = dom, bound, where
        with libvirt_errors(f"freezing the file systems of domain {dom.name()!r}", path=where):
            uri = dom.connect().getURI()
            # started first: from the freeze on, something always thaws
            self.watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, uri, dom.UUIDString(), str(bound)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, text=True)
            self.started = time.monotonic()
            try:
                dom.fsFreeze(None, 0)
            except BaseException:
                self._release()
                raise

    def _release(self) -> None:
        """Tell the watchdog the guest is thawed, and reap it."""
        with contextlib.suppress(OSError, ValueError):
            self.watchdog.stdin.write("thawed\n")
            self.watchdog.stdin.close()
        self.watchdog.wait()

    def thaw(self) -> bool:
        """Thaw now. Returns True when the thaw came in time (before the
        bound, the watchdog not having thawed first)."""
        in_time = self.watchdog.poll() is None \
            and time.monotonic() - self.started < self.bound
        try:
            with libvirt_errors(f"thawing the file systems of domain {self.dom.name()!r}",
                                path=self.where):
                self.dom.fsThaw(None, 0)
        finally:
            self._release()
        return in_time


def thaw_left(dom, *, where: Optional[str] = None) -> bool:
    """Thaw the guest's file systems if a killed pydr left them frozen
    (its watchdog thaws them too; this makes a rerun sure). Returns True
    when they were frozen. A guest agent that does not answer: False."""
    from .libvirt import agent_command

    try:
        status = agent_command(dom, "guest-fsfreeze-status", timeout=5, uri=where)
    except MachineError:
        return False
    if status != "frozen":
        return False
    with libvirt_errors(f"thawing the file systems of domain {dom.name()!r}", path=where):
        dom.fsThaw(None, 0)
    return True


@contextlib.contextmanager
def begin(dom, checkpoint: str, *, incremental: Optional[str], tracked: List[str],
          full_only: List[str] = (), freeze: bool = False, freeze_bound: float = FREEZE_BOUND,
          vault_id: str, nonce: str = "", where: Optional[str] = None) -> Iterator[BackupJob]:
    """Begin a pull-mode backup job of the domain's disks, making checkpoint
    `checkpoint` at the same instant, and end it when the block ends.

    Args:
        dom: the running libvirt.virDomain.
        checkpoint: the new checkpoint's name.
        incremental: the checkpoint whose changes the job exports (a dirty
            bitmap per tracked disk), or None: a full job.
        tracked: the targets of the disks with checkpoint bitmaps (qcow2).
        full_only: the targets of disks read whole every time (raw: no
            bitmap can be kept in them).
        freeze: freeze the guest's file systems through its agent around
            the job's start, for at most `freeze_bound` seconds (a watchdog
            thaws then); ``job.frozen`` is True only when the thaw came
            after the job began and before the bound.
        vault_id: the vault's id: the job's directory is named for it, and
            locked while the job runs (a rerun knows a killed cycle's job).
        nonce: the new checkpoint's description (pydr.dr.checkpoints
            records it to know the checkpoint again).
        where: named by errors (the connection URI).

    Yields:
        The :class:`BackupJob`.

    Raises:
        MachineError: libvirt refused the job or the freeze; the guest is
            thawed and the job ended on every path.
    """
    import fcntl

    directory = tempfile.mkdtemp(prefix=scratch_prefix(vault_id))  # 0700
    lock = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held until the job ends: it is a running cycle's
    job = BackupJob(dom, directory, checkpoint, incremental, where)
    began = False
    try:
        frozen = _Freeze(dom, freeze_bound, where) if freeze else None
        try:
            if frozen is not None:
                crashpoints.reached("libvirt.frozen")
            with libvirt_errors(f"beginning a backup job of domain {dom.name()!r}", path=where):
                dom.backupBegin(backup_xml(job, list(tracked), list(full_only)),
                                checkpoint_xml(checkpoint, list(tracked), list(full_only), nonce), 0)
            began = True
        finally:
            if frozen is not None:
                in_time = frozen.thaw()
                job.frozen = began and in_time
        crashpoints.reached("libvirt.backup-begun")
        _wait_listening(job)
        yield job
    finally:
        try:
            if began:
                job.end()
            else:
                shutil.rmtree(directory, ignore_errors=True)
        finally:
            os.close(lock)


def _wait_listening(job: BackupJob, timeout: float = 20.0) -> None:
    """Return when the job's NBD socket exists (QEMU makes it as the job
    starts; libvirt returns after)."""
    deadline = time.monotonic() + timeout
    tries = 0
    while not os.path.exists(job.socket):
        tries += 1
        if tries % 200 == 0 or time.monotonic() > deadline:  # about every second
            with libvirt_errors(f"looking for the backup job of domain {job.dom.name()!r}",
                                path=job.where):
                gone = job_xml(job.dom) is None
            if gone:
                raise MachineError(f"the backup job of domain {job.dom.name()!r} ended before "
                                   f"its NBD server listened on {job.socket} (aborted by "
                                   f"someone else, or QEMU stopped)", path=job.where,
                                   hint="run the same command again")
        if time.monotonic() > deadline:
            raise MachineError(f"the backup job of domain {job.dom.name()!r} did not listen on "
                               f"{job.socket} within {timeout:.0f} s", path=job.where)
        time.sleep(0.005)

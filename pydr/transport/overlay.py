"""Recovery points as qcow2 overlays: a qcow2 file whose backing file is
the replica (or its failover baseline) and which holds only the blocks that
differ at the point. It costs what changed since the point, on any file
system, and a VM run on it writes into the overlay: the backing file never
changes. (docs/FAILOVER.md)"""

import contextlib
import os

from ..engine import crashpoints, names
from ..engine import journal as J
from ..engine.atomic import copy_mode, create_file, fsync_dir
from ..engine.devices import NbdDevice
from ..engine.restore import check_steps, install, remove_leftovers
from ..errors import InvalidState, UnsupportedFile
from .qemu import QemuError, QemuNbd, detect_format, image_info, qemu_img, tool

# 64 KiB clusters of 32 subclusters (extended L2): a 4 KiB change allocates
# 4 KiB, not a whole cluster copied from the backing file
CREATE_OPTIONS = "cluster_size=64k,extended_l2=on"


def materialize_overlay(backing, steps, dest):
    """Make `dest` a qcow2 overlay of `backing` (a raw file) that shows it
    with the undo journals `steps` rolled back, newest first; the steps are
    written into the overlay through qemu-nbd. Made beside `dest`
    (.NAME.pydr-new) and renamed over it when whole. Returns "qcow2"."""
    tool("qemu-img")
    tool("qemu-nbd")
    backing = os.path.abspath(backing)
    if os.path.exists(dest) and os.path.samefile(dest, backing):
        raise InvalidState("refusing to materialise over the replicated state itself", path=dest)
    check_steps(steps)
    size = os.path.getsize(backing)
    for path in steps:
        header, _ = J.read_journal(path)
        if header["old_size"] != size:
            raise UnsupportedFile(f"the disk was {header['old_size']} bytes before this step and "
                                  f"is {size} now: a qcow2 overlay cannot show a disk of another "
                                  "size", path=path, hint="leave out --as qcow2 to copy instead")
    tmp = names.beside(dest, names.NEW)
    remove_leftovers(tmp)  # of a run that was killed
    try:
        # made here first, with the backing file's bits (qemu-img keeps them,
        # and would otherwise create it by the umask)
        create_file(tmp, copy_mode(os.stat(backing).st_mode))
        qemu_img("create", "-q", "-f", "qcow2", "-o", CREATE_OPTIONS, "-b", backing, "-F", "raw",
                 tmp, str(size), path=tmp)
        crashpoints.reached("restore.copied")
        if steps:
            with QemuNbd(tmp, "qcow2", read_only=False) as server:
                with server.connect(lambda uri: NbdDevice(uri, name=tmp, write=True)) as dev:
                    for path in steps:  # newest first: each takes the disk one cycle back
                        J.rollback(dev, path, step=True)
                        crashpoints.reached("restore.step")
        install(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            remove_leftovers(tmp)
        raise
    return "qcow2"


def backing_of(path):
    """The absolute backing file of a qcow2 image, or None (not a qcow2
    image, or none)."""
    if detect_format(path) != "qcow2":
        return None
    info = image_info(path, "qcow2")
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if not backing:
        return None
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), backing))


def flatten(overlay, backing):
    """Write the overlay's blocks into its backing file (qemu-img commit;
    the overlay is left as it was, so that this may run again after a kill)
    and make the backing file the disk at the overlay's path: one raw disk
    again. Returns the path."""
    try:
        qemu_img("commit", "-q", "-d", "-f", "qcow2", overlay, path=overlay)
    except QemuError as exc:
        raise QemuError(f"{exc.message}; if a VM runs on it, stop the VM and run the same "
                        "command again", path=overlay) from None
    crashpoints.reached("commit.flattened")
    os.replace(backing, overlay)
    fsync_dir(overlay)
    return overlay

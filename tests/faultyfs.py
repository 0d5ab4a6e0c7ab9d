"""FUSE file systems for the tests: real I/O errors, and power cuts.

    python faultyfs.py BACKING_FILE MOUNTPOINT BAD_START BAD_END [read|write]

serves one real file as MOUNTPOINT/disk.img; any read (default) or any write
that touches [BAD_START, BAD_END) fails with EIO, both through read() and
through mmap page faults (which the kernel turns into SIGBUS). In write mode
the file is writable. In hold mode a read there waits until the file
BACKING_FILE.release exists (BACKING_FILE.held says one waits): a process
stopped in the middle of its reads, at a known place.

    python faultyfs.py lazy BACKING_DIR MOUNTPOINT

serves a directory as a disk with a volatile cache does (the technique of
LazyFS): file data is held in this process until the file is fsynced (or
fdatasynced), and only then written to BACKING_DIR; metadata (create,
rename, unlink, truncate, mkdir) goes through at once. SIGKILL of this
process is a power cut: BACKING_DIR then holds exactly what was made
durable. Writing "sync" to MOUNTPOINT/.lazyfs-sync makes everything durable
(as sync(1) would), to set a state up. Both run in the foreground until
unmounted.
"""

import errno
import os
import stat
import sys

from fuse import FUSE, FuseOSError, Operations


class FaultyFile(Operations):
    def __init__(self, backing, bad_start, bad_end, mode="read"):
        self.backing = backing
        self.bad = (bad_start, bad_end)
        self.mode = mode
        self.fd = os.open(backing, os.O_RDWR if mode == "write" else os.O_RDONLY)

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path != "/disk.img":
            raise FuseOSError(errno.ENOENT)
        st = os.fstat(self.fd)
        perm = 0o644 if self.mode == "write" else 0o444
        return {"st_mode": stat.S_IFREG | perm, "st_nlink": 1, "st_size": st.st_size,
                "st_mtime": st.st_mtime, "st_ctime": st.st_ctime, "st_atime": st.st_atime}

    def readdir(self, path, fh):
        return [".", "..", "disk.img"]

    def open(self, path, flags):
        if path != "/disk.img":
            raise FuseOSError(errno.ENOENT)
        return 0

    def _hits(self, offset, size):
        lo, hi = self.bad
        return offset < hi and offset + size > lo

    def read(self, path, size, offset, fh):
        if self.mode == "read" and self._hits(offset, size):
            raise FuseOSError(errno.EIO)
        if self.mode == "hold" and self._hits(offset, size):
            self._hold()
        return os.pread(self.fd, size, offset)

    def _hold(self):
        """Block the read (and the reader) until BACKING.release exists;
        BACKING.held says that a reader is waiting."""
        import time

        open(self.backing + ".held", "w").close()
        while not os.path.exists(self.backing + ".release"):
            time.sleep(0.01)

    def write(self, path, data, offset, fh):
        if self.mode != "write":
            raise FuseOSError(errno.EROFS)
        if self._hits(offset, len(data)):
            raise FuseOSError(errno.EIO)
        return os.pwrite(self.fd, data, offset)

    def truncate(self, path, length, fh=None):
        if self.mode != "write":
            raise FuseOSError(errno.EROFS)
        os.ftruncate(self.fd, length)

    def fsync(self, path, datasync, fh):
        os.fsync(self.fd)
        return 0

    def flush(self, path, fh):
        return 0


PAGE = 4096
SYNC_FILE = "/.lazyfs-sync"


class LazyFS(Operations):
    """A passthrough of a directory that loses the data not fsynced yet."""

    use_ns = True

    def __init__(self, root):
        self.root = os.path.realpath(root)
        self.dirty = {}   # inode -> {"pages": {index: bytearray(PAGE)}, "size": volatile size}
        self.files = {}   # fh -> (fd in the backing dir, inode)
        self.held = {}    # inode -> fd kept open after release, while its data is not durable
        self.next_fh = 1

    def _full(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    # -- metadata: straight through ------------------------------------------------
    def getattr(self, path, fh=None):
        if path == SYNC_FILE:
            return {"st_mode": stat.S_IFREG | 0o200, "st_nlink": 1, "st_size": 0}
        try:
            st = os.lstat(self._full(path))
        except OSError as exc:
            raise FuseOSError(exc.errno)
        out = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_ino",
                                           "st_atime_ns", "st_mtime_ns", "st_ctime_ns")}
        out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        out["st_size"] = self.dirty[st.st_ino]["size"] if st.st_ino in self.dirty else st.st_size
        return out

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._full(path))

    def _passthrough(self, fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            raise FuseOSError(exc.errno)

    def mkdir(self, path, mode):
        return self._passthrough(os.mkdir, self._full(path), mode)

    def rmdir(self, path):
        return self._passthrough(os.rmdir, self._full(path))

    def _forget(self, full):
        """A file that loses its last name loses its pending data (and its
        inode number may be given to a new file)."""
        try:
            st = os.lstat(full)
        except OSError:
            return
        if st.st_nlink <= 1:
            self.dirty.pop(st.st_ino, None)
            fd = self.held.pop(st.st_ino, None)
            if fd is not None:
                os.close(fd)

    def unlink(self, path):
        self._forget(self._full(path))
        return self._passthrough(os.unlink, self._full(path))

    def rename(self, old, new):
        if os.path.lexists(self._full(new)):
            self._forget(self._full(new))
        return self._passthrough(os.rename, self._full(old), self._full(new))

    def chmod(self, path, mode):
        return self._passthrough(os.chmod, self._full(path), mode)

    def chown(self, path, uid, gid):
        return self._passthrough(os.chown, self._full(path), uid, gid)

    def utimens(self, path, times=None):
        if times is None:
            return self._passthrough(os.utime, self._full(path))
        return self._passthrough(lambda p: os.utime(p, ns=times), self._full(path))

    def statfs(self, path):
        st = os.statvfs(self.root)
        return {k: getattr(st, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree",
                                            "f_bavail", "f_files", "f_ffree", "f_favail",
                                            "f_flag", "f_namemax")}

    def truncate(self, path, length, fh=None):
        if path == SYNC_FILE:
            return
        full = self._full(path)
        ino = os.lstat(full).st_ino
        self._passthrough(os.truncate, full, length)
        if ino in self.dirty:
            d = self.dirty[ino]
            d["size"] = length
            for index in [i for i in d["pages"] if i * PAGE >= length]:
                del d["pages"][index]
            if length % PAGE and length // PAGE in d["pages"]:
                page = d["pages"][length // PAGE]
                page[length % PAGE:] = bytes(PAGE - length % PAGE)

    # -- files ---------------------------------------------------------------------
    def _register(self, fd):
        fh = self.next_fh
        self.next_fh += 1
        self.files[fh] = (fd, os.fstat(fd).st_ino)
        return fh

    def open(self, path, flags):
        if path == SYNC_FILE:
            return 0
        # read-write whatever was asked: a partial page is read before it is held
        fd = self._passthrough(os.open, self._full(path),
                               (flags & ~(os.O_APPEND | os.O_ACCMODE)) | os.O_RDWR | os.O_CLOEXEC)
        if flags & os.O_TRUNC:
            self.dirty.pop(os.fstat(fd).st_ino, None)
        return self._register(fd)

    def create(self, path, mode, fi=None):
        fd = self._passthrough(os.open, self._full(path),
                               os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        self.dirty.pop(os.fstat(fd).st_ino, None)
        return self._register(fd)

    def release(self, path, fh):
        if fh in self.files:
            fd, ino = self.files.pop(fh)
            if ino in self.dirty and ino not in self.held:
                self.held[ino] = fd  # so that sync_all can still write it
            else:
                os.close(fd)
        return 0

    def flush(self, path, fh):
        return 0  # close() makes nothing durable

    def read(self, path, size, offset, fh):
        fd, ino = self.files[fh]
        d = self.dirty.get(ino)
        end = min(offset + size, d["size"] if d else os.fstat(fd).st_size)
        if end <= offset:
            return b""
        out = bytearray(os.pread(fd, end - offset, offset))
        out += bytes(end - offset - len(out))  # past the durable end: what is cached, or zeros
        if d:
            for index in range(offset // PAGE, (end - 1) // PAGE + 1):
                page = d["pages"].get(index)
                if page is not None:
                    lo, hi = max(offset, index * PAGE), min(end, (index + 1) * PAGE)
                    out[lo - offset:hi - offset] = page[lo - index * PAGE:hi - index * PAGE]
        return bytes(out)

    def write(self, path, data, offset, fh):
        if path == SYNC_FILE:
            self.sync_all()
            return len(data)
        fd, ino = self.files[fh]
        d = self.dirty.setdefault(ino, {"pages": {}, "size": os.fstat(fd).st_size})
        pos, view = offset, memoryview(data)
        while view:
            index, at = divmod(pos, PAGE)
            page = d["pages"].get(index)
            if page is None:  # the page as it is now: durable bytes (or zeros past the end)
                page = bytearray(os.pread(fd, PAGE, index * PAGE))
                page += bytes(PAGE - len(page))
                if index * PAGE >= d["size"]:
                    page[:] = bytes(PAGE)
                d["pages"][index] = page
            n = min(PAGE - at, len(view))
            page[at:at + n] = view[:n]
            view, pos = view[n:], pos + n
        d["size"] = max(d["size"], offset + len(data))
        return len(data)

    def _make_durable(self, fd, ino):
        d = self.dirty.pop(ino, None)
        held = self.held.pop(ino, None)
        if held is not None and held != fd:
            os.close(held)
        if d is not None:
            for index, page in sorted(d["pages"].items()):
                n = min(PAGE, d["size"] - index * PAGE)
                if n > 0:
                    os.pwrite(fd, bytes(page[:n]), index * PAGE)
            if os.fstat(fd).st_size != d["size"]:
                os.ftruncate(fd, d["size"])
        os.fsync(fd)

    def fsync(self, path, datasync, fh):
        fd, ino = self.files[fh]
        self._make_durable(fd, ino)
        return 0

    def fsyncdir(self, path, datasync, fh):
        return 0  # metadata is durable at once here

    def sync_all(self):
        open_fds = {ino: fd for fd, ino in self.files.values()}
        for ino in list(self.dirty):
            if ino in open_fds:
                self._make_durable(open_fds[ino], ino)
            else:  # released: only the fd kept for this is left
                fd = self.held[ino]
                self._make_durable(fd, ino)
                os.close(fd)


if __name__ == "__main__" and sys.argv[1] == "lazy":
    FUSE(LazyFS(sys.argv[2]), sys.argv[3], foreground=True, nothreads=True, big_writes=True,
         max_read=1 << 20)
elif __name__ == "__main__":
    backing, mountpoint, lo, hi = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) > 5 else "read"
    FUSE(FaultyFile(backing, lo, hi, mode), mountpoint, foreground=True,
         ro=(mode in ("read", "hold")),
         nothreads=True)

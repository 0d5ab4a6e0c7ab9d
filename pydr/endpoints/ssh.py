"""A disk on another host, ``[user@]host:PATH``, reached over ssh: ``pydr
serve --stdio`` there does the work next to the data (pydr.transport)."""

import contextlib
import errno
import os
import shutil
import tempfile
import time

from ..engine import bindings as B
from ..engine import names
from ..engine.signatures import Signature
from ..errors import Cancelled, UnsupportedFile
from .base import Endpoint, SignResult, StepChainPlace
from .specs import parse_remote


class SshEndpoint(StepChainPlace, Endpoint):
    def __init__(self, host, path, *, rsh=None, remote_pydr=None):
        from ..transport.client import Host

        self.host = host if isinstance(host, Host) else Host(host, rsh=rsh,
                                                             remote_pydr=remote_pydr)
        self._path = path
        super().__init__(self.host.spec(path))
        self.place = self.host.host

    @property
    def path(self):
        return self._path

    def _at(self, path):
        return SshEndpoint(self.host, path)

    # -- the disk ---------------------------------------------------------------
    def exists(self):
        return bool(self.host.stat(self._path).get("exists"))

    def size(self):
        st = self.host.stat(self._path, source=True)
        if not st.get("exists"):
            raise FileNotFoundError(errno.ENOENT, f"not found (on {self.place})", self.spec)
        return st["size"]

    def file_identity(self):
        st = self.host.stat(self._path)
        if not st.get("exists"):
            return "missing"
        ident = st.get("identity")  # a server older than the question sends none
        if isinstance(ident, list) and len(ident) == 5 and all(type(v) is int for v in ident):
            return tuple(ident)
        return None

    def open_source(self, *, block_size, threads, progress=None, window=None, group=None,
                    bwlimit=None, compress=False):
        from ..transport import exchange as X
        from ..transport.client import RemoteSource

        return RemoteSource(self.host, self._path, block_size=block_size,
                            window=window or X.WINDOW, group=group or X.GROUP, bwlimit=bwlimit,
                            compress=compress)

    def open_target(self, *, block_size, result_size, threads, keep_undo=None, progress=None,
                    streams=0, bwlimit=None, compress=False, mode=None):
        from ..transport.client import RemoteTarget

        keep = None
        if keep_undo:
            keep = [self._here(k) for k in keep_undo]
        return RemoteTarget(self.host, self._path, block_size=block_size,
                            result_size=result_size, keep_undo=keep, streams=streams, mode=mode,
                            bwlimit=bwlimit, compress=compress)

    def _here(self, spec):
        """The path on this host of an endpoint or spec naming a file here."""
        if isinstance(spec, Endpoint):
            place, path = spec.place, spec.path
        else:
            place, path = parse_remote(spec) or (None, spec)
        if place != self.place:
            raise ValueError(f"{spec} is not on {self.place}")
        return path

    # -- files beside it ----------------------------------------------------------
    def step_spec(self, item, idx, number, vault_dir):
        return self.host.spec(names.step(self._path, item, idx, number))

    def rename(self, dest):
        self.host.rename(self._path, self._here(dest))

    def remove_many(self, endpoints):
        self.host.remove([self._here(e) for e in endpoints])

    def remove_drill(self, disks):
        self.host.remove([self._here(d) for d in disks], drill=self._path)

    def materialize(self, steps, dest, *, drill=False, threads=None, method="auto",
                    progress=None, cancel=None):
        self.check_same_place(dest)
        if method == "qcow2":
            raise UnsupportedFile("qcow2 overlays of a replica on another host are not made "
                                  "yet", path=self.spec, hint="leave out --as qcow2 there")
        if cancel is not None and cancel.is_set():  # the work there is not stopped half-way
            raise Cancelled("cancelled", path=dest.spec)
        return self.host.materialize(self._path, [self._here(s) for s in steps],
                                     self._here(dest), drill=drill, method=method)

    # -- files as streams; engine work there -----------------------------------------
    def open_read(self):
        return self.host.reader(self._path)

    def open_write(self):
        return self.host.writer(self._path)

    def _signature_into(self, path, block_size):
        """Stream this disk's signature into the local file `path` (bounded
        memory); returns (size, blocks, zero blocks, bytes received, bytes read)."""
        from ..engine.sigstream import SignatureWriter

        size = self.size()
        writer = SignatureWriter(path, block_size, size)
        try:
            received, read = self.host.signature_to(self._path, writer, block_size=block_size)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        return size, writer.n, writer.zeros, received, read

    def signature(self, *, block_size, threads=None):
        with tempfile.TemporaryDirectory(prefix="pydr-") as d:
            self._signature_into(os.path.join(d, "base.sig"), block_size)
            return Signature.load(os.path.join(d, "base.sig"))

    def write_signature(self, out, *, block_size, algorithm, threads=None, progress=None,
                        cancel=None, use_mmap=True):
        if algorithm != "xxh3-128":
            raise ValueError("a remote signature is always xxh3-128")
        B.check_block_size(block_size)
        start = time.monotonic()
        target = getattr(out, "local_path", None)
        with contextlib.ExitStack() as stack:
            if not target:  # signed into a temp file first, then copied out
                target = os.path.join(stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="pydr-")), "sig")
            size, blocks, zeros, received, read = self._signature_into(target, block_size)
            if target != getattr(out, "local_path", None):
                with open(target, "rb") as f, (out.open_write() if isinstance(out, Endpoint)
                                               else contextlib.nullcontext(out)) as dest:
                    shutil.copyfileobj(f, dest, 4 << 20)
                    dest.flush()
        return SignResult(self.spec, str(out) if isinstance(out, Endpoint) else "-", size,
                          block_size, algorithm, blocks, zeros, read, size - read, received,
                          time.monotonic() - start, None, None)

    def make_delta(self, out, *, base, threads=None, progress=None, cancel=None):
        from ..engine.delta import DeltaStats

        res = self.host.delta(self._path, out, base=base)
        return DeltaStats(*(res[k] for k in DeltaStats._fields))

    def apply_delta(self, stream, *, name, verify=False, progress=None, cancel=None):
        from ..engine.apply import ApplyStats

        res = self.host.apply(self._path, stream, name=name, verify=verify)
        return ApplyStats(*(res[k] for k in ApplyStats._fields))


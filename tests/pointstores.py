"""The point stores of the conformance suite (tests/dr/test_conformance.py),
one class per kind, in the manner of restic's internal/backend/test: the
cases are written once against the public surface (the `pydr` command) and
each store only says where things are and how a disk is read.

A store holds one item, "vm", of two small random disks at site A
(tmp/site-a), replicated to site B: tmp/site-b on this machine, the same
directory through an ssh host, or a bucket. Its *footprint* is every name
the DR copy consists of: the files under the vault and site B, and the keys
in the bucket. A case compares footprints by name (what a cycle added,
what retention or commit must have removed), not by pydr's file names,
so the suite holds while the layer underneath is restructured (the one
exception: an object store's chunks, shared by points and removed only by
`pydr gc`, are told by their documented prefix).

Adding a point store: one class here (the hooks below), one line in
STORES, and the suite's cases all pass.
"""

import json
import os
import random
import re
import subprocess

from conftest import PYDR, run_cli, sha
from disks import scribble

SIZES = (1 << 20, 768 << 10)  # two disks, each within one 4 MiB chunk
DISKS = ("a.img", "c.img")
QCOW2_MAGIC = b"QFI\xfb"


class PointStore:
    """The hooks a kind of point store gives the cases."""

    name = None
    method = ()          # the CLI options that materialise its points its way
    methods = ()         # the method names the JSON results may report
    chain = True         # a step chain: a point needs the replica plus the later cycles' steps
    overlays = False     # points (and failed-over disks) are qcow2 overlays
    collects_garbage = False

    def __init__(self, tmp):
        self.tmp = tmp
        self.site_a, self.site_b, self.vault = tmp / "site-a", tmp / "site-b", tmp / "vault"
        self.site_a.mkdir()
        self.site_b.mkdir()
        self.env = dict(os.environ)

    # -- where things are -------------------------------------------------------
    def replica(self, disk):
        """The replica spec of source disk file name `disk`."""
        return str(self.site_b / disk)

    def protect_options(self):
        return []

    def place(self, directory):
        """The spec of a directory where this store's points are made."""
        return str(directory)

    def failover_options(self, directory):
        """Options a failover needs (a directory for the disks, if any)."""
        return []

    def refused_failover(self, directory):
        """(options, what the refusal says) of a failover this store cannot
        do: the disks somewhere else than where its failover puts them."""
        return ["--to", str(directory)], (b"a failover directory is for items replicated to an "
                                          b"object store")

    def local(self, spec):
        """The path on this machine of a disk spec the vault reports."""
        return spec

    def footprint(self):
        """Every name the DR copy consists of: files under the vault and
        site B (relative), and the store's objects."""
        out = set()
        for root in (self.vault, self.site_b):
            for dirpath, _, files in os.walk(root):
                out |= {os.path.relpath(os.path.join(dirpath, f), self.tmp) for f in files}
        return out

    def garbage_options(self):
        """The `pydr gc` target of this store's objects."""
        return None

    def garbage(self):
        """The part of the footprint that points share and only `pydr gc`
        removes (a cycle never does)."""
        return set()

    def needed(self, oldest, last):
        """The cycles whose additions to the footprint the points `oldest`
        to `last` need (point n is made by cycle n; cycle 0 is protect). A
        step chain: the replicas (cycle 1) and the undo steps of the later
        cycles. A chunk index: what each point's own cycle stored (every
        disk is within one chunk and every cycle writes to each)."""
        if self.chain:
            return {0, 1} | set(range(oldest + 1, last + 1))
        return {0} | set(range(oldest, last + 1))

    def close(self):
        """Stop what the store started."""

    # -- disks ------------------------------------------------------------------
    def read(self, path):
        """sha256 of a disk as a machine reads it (an overlay through its
        backing file)."""
        if open(path, "rb").read(4) != QCOW2_MAGIC:
            return sha(path)
        raw = self.tmp / "as-raw.img"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)], check=True)
        try:
            return sha(raw)
        finally:
            raw.unlink()

    def machine_writes(self, path, seed):
        """The failed-over machine writes into its disk at site B."""
        if open(path, "rb").read(4) == QCOW2_MAGIC:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {seed % 250 + 1} 64k 128k",
                            str(path)], check=True, capture_output=True)
            return
        scribble(path, seed)

    # -- the command line -------------------------------------------------------
    def cli(self, *args, env=None):
        return run_cli(*args, "--vault", self.vault, env={**self.env, **(env or {})})

    def ok(self, *args, env=None):
        """A command that must succeed; its --json answer."""
        r = self.cli(*args, "--json", env=env)
        assert r.returncode == 0, (args, r.returncode, r.stderr.decode())
        assert b"Traceback" not in r.stderr
        return json.loads(r.stdout) if r.stdout.strip() else None


class FileStore(PointStore):
    """A step chain on this machine: replicas in a local directory, undo
    steps in the vault; points copied (or cloned) out."""

    name = "file"
    methods = ("copy", "reflink")


class SshStore(PointStore):
    """A step chain on an ssh host (127.0.0.1 through the sshd fixture): the
    replicas and their steps there; points made there."""

    name = "ssh"
    methods = ("copy", "reflink")
    host = "127.0.0.1:"

    def __init__(self, tmp, sshd):
        import shlex

        super().__init__(tmp)
        # one ssh connection, shared by the many sessions of each command (a handshake
        # costs most of a second on a loaded machine), as an operator's ~/.ssh/config would
        mux = ["-o", f"ControlPath={tmp / 'ssh-mux'}"]
        self.ssh = shlex.split(sshd["rsh"]) + mux
        # until it is up, a command connects on its own (ControlMaster=no): no wait needed
        self.master = subprocess.Popen(self.ssh + ["-M", "-N", "127.0.0.1"],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        self.rsh = shlex.join(self.ssh + ["-o", "ControlMaster=no"])

    def close(self):
        subprocess.run(self.ssh + ["-O", "exit", "127.0.0.1"], capture_output=True, timeout=60)
        try:
            self.master.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.master.kill()
            self.master.wait()

    def replica(self, disk):
        return self.host + str(self.site_b / disk)

    def protect_options(self):
        return ["--rsh", self.rsh, "--remote-pydr", PYDR]

    def place(self, directory):
        return self.host + str(directory)

    def local(self, spec):
        assert spec.startswith(self.host), spec
        return spec[len(self.host):]


class Qcow2Store(FileStore):
    """A step chain whose points are qcow2 overlays backed by the replicas
    (--as qcow2): drills, failovers and change-points make overlays."""

    name = "qcow2"
    method = ("--as", "qcow2")
    methods = ("qcow2",)
    overlays = True


class S3Store(PointStore):
    """A chunk index in an S3 bucket (OpenStack Swift on 127.0.0.1): points
    are downloaded; a failover brings them up in a local directory."""

    name = "s3"
    methods = ("download",)
    chain = False
    collects_garbage = True

    def __init__(self, tmp, swift, bucket):
        import boto3

        super().__init__(tmp)
        # encrypted, pydr's default: the suite holds for sealed chunks and indexes
        self.env.update(swift.env(), PYDR_S3_ADDRESSING="path",
                        PYDR_PASSPHRASE="conformance passphrase")
        self.client = boto3.client("s3", endpoint_url=swift.endpoint, region_name="us-east-1",
                                   aws_access_key_id=swift.access_key,
                                   aws_secret_access_key=swift.secret_key)
        self.bucket = bucket
        self.client.create_bucket(Bucket=bucket)
        self.url = f"s3://{bucket}/dr"

    def replica(self, disk):
        return self.url

    def failover_options(self, directory):
        return ["--to", str(directory)]

    def refused_failover(self, directory):
        return [], b"give --to DIR"

    def footprint(self):
        out, token = set(), None
        while True:
            kw = {"Bucket": self.bucket, **({"ContinuationToken": token} if token else {})}
            page = self.client.list_objects_v2(**kw)
            out |= {o["Key"] for o in page.get("Contents", ())}
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def garbage_options(self):
        return [self.url]

    def garbage(self):
        return {k for k in self.footprint() if k.startswith("dr/chunks/")}  # docs/FORMAT.md


STORES = ("file", "ssh", "qcow2", "s3")


# -- the item, its known writes and its history ----------------------------------------


class Item:
    """Item "vm" of a store: its sources, the cycles run, and the sources'
    sha256 at each recovery point (`history`)."""

    def __init__(self, store, retention=24):
        self.store = store
        self.sources = []
        for n, (disk, size) in enumerate(zip(DISKS, SIZES)):
            src = store.site_a / disk
            src.write_bytes(random.Random(f"{store.name}-{n}").randbytes(size))
            self.sources.append(src)
        assert run_cli("vault", "init", store.vault).returncode == 0
        args = sum((["--disk", f"{s}={store.replica(s.name)}"] for s in self.sources), [])
        store.ok("protect", "vm", *args, "--retention", str(retention), *store.protect_options())
        self.history = {}
        self.cycles = 0
        self.born = {0: store.footprint()}  # cycle -> the names it added to the footprint

    def now(self):
        return [sha(s) for s in self.sources]

    def change(self):
        """Known writes into both disks before the next cycle."""
        for n, src in enumerate(self.sources):
            scribble(src, 1000 * self.cycles + n)

    def cycle(self):
        """Change the sources (but before the first cycle) and replicate;
        returns the new point's id."""
        if self.cycles:
            self.change()
        self.cycles += 1
        before = self.store.footprint()
        res = self.store.ok("replicate", "vm")
        assert res["point_id"] == self.cycles  # a fresh vault: point n is cycle n
        self.history[res["point_id"]] = self.now()
        self.born[self.cycles] = self.store.footprint() - before
        return res["point_id"]

    def without_points(self):
        """What the footprint may still hold once no point is left (after
        commit): the vault and, for a step chain, the replicas."""
        return set().union(*(self.born[c] for c in self.store.needed(1, 0)))

    def points(self):
        return [p["id"] for p in self.store.ok("points", "vm")]

    def status(self):
        return self.store.ok("status", "vm")

    def materialized(self, point, directory):
        """Materialise `point` into `directory`; the sha of each disk as a
        machine reads it, and the method reported."""
        res = self.store.ok("materialize", "vm", "--point", str(point), "--to",
                            self.store.place(directory), *self.store.method)
        assert [os.path.basename(self.store.local(p)) for p in res["paths"]] == list(DISKS)
        return [self.store.read(self.store.local(p)) for p in res["paths"]], res["method"]

    def check_points(self, directory, points=None):
        """Every recorded point (or those given) materialises to the sources
        at its cycle."""
        points = self.points() if points is None else points
        for p in points:
            got, method = self.materialized(p, directory / f"point-{p}")
            assert got == self.history[p], (self.store.name, p)
            assert method in self.store.methods, (self.store.name, method)
        return points


def shape(names):
    """The footprint with numbers and ids written as N: what a cycle leaves
    whatever its point's number (a count per kind of file or object)."""
    import collections

    return collections.Counter(re.sub(r"\d+", "N", re.sub(r"[0-9a-f]{16,}", "X", n))
                               for n in names)

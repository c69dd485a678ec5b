"""s3:// objects through fsspec/s3fs, with every request bounded in time.

Writes are whole-object PUTs (S3 makes an object visible only once complete); exclusive creation and
compare-and-swap are conditional PUTs (If-None-Match: *, If-Match: ETag). There are no folders, renames,
appends or temp files here.

Bounds (a stalled or black-holed endpoint must fail, never hang):
- connect: CONNECT_TIMEOUT (5 s) per attempt; read: READ_TIMEOUT (8 s) of silence while awaiting or
  reading an answer; ATTEMPTS (3) attempts per request, with botocore's backoff (settings.py).
- every request as a whole (all its attempts, its body sent and, for a GET, its body read):
  REQUEST_BASE_S + bytes / MIN_RATE, i.e. 60 s plus 4 s per MiB; a 20 MiB upload gets 140 s, a 50 MiB part
  of a multipart upload 260 s. This is what ends an upload to an endpoint that stops reading: aiohttp's
  body write has no timeout of its own (and the read timeout is not armed until the body is sent).
  Then the operation fails with a StorageError naming the URI; nothing partial becomes visible.
TileDB's own S3 requests are bounded by its settings (tiledb.tiledb_vfs_config).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from soma_manifest.errors import StorageError
from soma_manifest.storage import listing
from soma_manifest.storage.location import S3, Location
from soma_manifest.storage.protocol import Stat
from soma_manifest.storage.settings import ATTEMPTS, CONNECT_TIMEOUT, READ_TIMEOUT, StoreSettings
from soma_manifest.storage.translate import Translates, os_cause

#: Every request's fixed allowance: enough for botocore's own attempts to fail first against an endpoint
#: that never accepts or never answers (3 x (5 + 8) s plus backoff), so that those keep their clearer error.
REQUEST_BASE_S = ATTEMPTS * (CONNECT_TIMEOUT + READ_TIMEOUT) + 21
#: The slowest transfer still taken for progress, in bytes per second of a request's body (each of a multipart
#: upload's concurrent parts counts alone).
MIN_RATE = 256 * 1024


def deadline(size: int) -> float:
    """Seconds a request moving `size` bytes may take in all."""
    return REQUEST_BASE_S + size / MIN_RATE


class DeadlineExceeded(OSError):
    """An S3 request did not finish within its deadline (and was cancelled)."""

    def __init__(self, method: str, seconds: float) -> None:
        super().__init__(f"{method} did not finish within {seconds:.0f} s")
        self.method, self.seconds = method, seconds


_fs_cache: dict[tuple[str | None, str | None], Any] = {}
_fs_class: type | None = None
_lock = threading.Lock()


def _bounded_fs_class() -> type:
    """s3fs' filesystem with every request under `deadline` (built on first use: s3fs is a heavy import)."""
    global _fs_class
    if _fs_class is not None:
        return _fs_class
    import s3fs
    from fsspec.asyn import sync_wrapper

    class BoundedS3FileSystem(s3fs.S3FileSystem):
        async def _call_s3(self, method: str, *akwarglist: Any, **kwargs: Any) -> Any:
            body = kwargs.get("Body")
            limit = deadline(len(body) if isinstance(body, (bytes, bytearray, memoryview)) else 0)
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                async with asyncio.timeout(limit) as bound:
                    out = await super()._call_s3(method, *akwarglist, **kwargs)
            except TimeoutError:
                if bound.expired():
                    raise DeadlineExceeded(method, limit) from None
                raise
            if isinstance(out, dict) and "Body" in out:  # a GET: reading its body ends by the same kind of bound
                seconds = deadline(int(out.get("ContentLength") or 0))
                out["Body"] = _BoundedBody(out["Body"], started + seconds, method, seconds)
            return out

        # s3fs binds its sync call_s3 to its own _call_s3; this one must go through the bound above.
        call_s3 = sync_wrapper(_call_s3)

    _fs_class = BoundedS3FileSystem
    return _fs_class


class _BoundedBody:
    """A GET's streaming body whose reads all end by the request's deadline."""

    def __init__(self, body: Any, until: float, method: str, seconds: float) -> None:
        self._body, self._until, self._method, self._seconds = body, until, method, seconds

    async def read(self, *args: Any, **kwargs: Any) -> bytes:
        try:
            async with asyncio.timeout_at(self._until) as bound:
                return await self._body.read(*args, **kwargs)
        except TimeoutError:
            if bound.expired():
                raise DeadlineExceeded(self._method, self._seconds) from None
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._body, name)


def _no_expect_continue(request: Any, **_: Any) -> None:
    """Drop botocore's `Expect: 100-continue` from PUTs: aiohttp waits for the 100 without any timeout, so a
    PUT to an endpoint that accepts connections and never answers would hang for good."""
    request.headers.pop("Expect", None)


def _key(loc: Location) -> str:
    return loc.uri[len(S3):]


def _bucket(loc: Location) -> str:
    return _key(loc).split("/", 1)[0]


def _no_bucket(text: str) -> bool:
    return "NoSuchBucket" in text or "bucket does not exist" in text


def _missing(exc: BaseException) -> bool:
    """A missing object (not a missing bucket: that is an error). Matched on the service's wording: the message
    may hold the path, and a bucket may well be named my-bucket."""
    return isinstance(exc, FileNotFoundError) and not _no_bucket(str(exc))


def _precondition_failed(exc: BaseException) -> bool:
    import botocore.exceptions as bx

    if isinstance(exc, FileExistsError):
        return True
    text = str(exc)
    if isinstance(exc, bx.ClientError):
        text = exc.response.get("Error", {}).get("Code", "")
    return any(k in text for k in ("PreconditionFailed", "pre-conditions you specified", "ConditionalRequestConflict"))


def _stat(info: dict) -> Stat:
    modified = info.get("LastModified")
    mtime = int(modified.timestamp() * 1e9) if modified is not None else 0
    return Stat(int(info.get("size", 0)), mtime, str(info.get("ETag", "")).strip('"'))


class S3Store(Translates):
    """Objects in S3 (or an S3-compatible service) reached with `settings`; credentials from the AWS chain."""

    local_paths = False
    renames_atomically = False
    sees_dead_holders = False
    appends = False
    networked = True

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings

    def fs(self) -> Any:
        """The s3fs filesystem for these settings (one per endpoint and region and process; the environment
        they may defer to can change in a long-lived process)."""
        with _lock:
            key = (self.settings.endpoint(), self.settings.region_name())
            fs = _fs_cache.get(key)
            if fs is None:
                client: dict[str, Any] = {"region_name": key[1]} if key[1] else {}
                fs = _bounded_fs_class()(
                    endpoint_url=key[0], client_kwargs=client, skip_instance_cache=True, use_listings_cache=False,
                    config_kwargs={"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT,
                                   "retries": {"total_max_attempts": ATTEMPTS, "mode": "standard"}})
                fs.retries = 1  # s3fs' own retry loop would multiply botocore's attempts (and their timeouts)
                fs.connect()
                fs.s3.meta.events.register("before-send.s3", _no_expect_continue)
                _fs_cache[key] = fs
            return fs

    # ------------------------------------------------------------ errors

    def failures(self) -> tuple[type[BaseException], ...]:
        import botocore.exceptions as bx

        return (OSError, bx.BotoCoreError, bx.ClientError)

    def cause(self, exc: BaseException, loc: Location) -> tuple[str, str]:
        import botocore.exceptions as bx

        endpoint = self.settings.endpoint() or "the AWS S3 endpoint"
        if isinstance(exc, DeadlineExceeded):
            return (f"the S3 endpoint {endpoint} did not finish the request ({exc.method}) within {exc.seconds:.0f} s",
                    "it stalled or is far too slow; check the endpoint and the network, then run it again")
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                            bx.ConnectionClosedError)) or "Could not connect" in str(exc):
            return (f"cannot reach the S3 endpoint {endpoint}",
                    "check object_store.endpoint_url (or AWS_ENDPOINT_URL) and that the service is up")
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return ("no AWS credentials found", "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE in the "
                                                "environment (never in the manifest)")
        text = str(exc)
        if isinstance(exc, bx.ClientError):
            text = f"{exc.response.get('Error', {}).get('Code', '')} {exc.response.get('Error', {}).get('Message', '')}"
        if _no_bucket(text):
            return f"the bucket {_bucket(loc)} does not exist", "create the bucket, or fix the s3:// URI"
        if isinstance(exc, PermissionError) or any(
                k in text for k in ("AccessDenied", "Access Denied", "Forbidden", "InvalidAccessKeyId",
                                    "SignatureDoesNotMatch")):
            return "access denied", "grant the credentials in the environment access to this bucket and prefix"
        return os_cause(exc, text)

    # ------------------------------------------------------------ reading

    def stat(self, loc: Location) -> Stat:
        cached = listing.lookup(loc)
        if cached is not None:
            if isinstance(cached, Stat):
                return cached
            raise StorageError("cannot stat: it is a folder", where=loc.uri)
        with self.guard("stat", loc):
            return _stat(self.fs().info(_key(loc)))

    def exists(self, loc: Location) -> bool:
        if listing.lookup(loc) is not None:
            return True
        if listing.covers(loc):
            return False
        with self.guard("look up", loc):
            return bool(self.fs().exists(_key(loc)))

    def is_dir(self, loc: Location) -> bool:
        cached = listing.lookup(loc)
        if cached is not None or listing.covers(loc):
            return isinstance(cached, dict)
        with self.guard("look up", loc):
            return bool(self.fs().isdir(_key(loc)))

    def is_file(self, loc: Location) -> bool:
        cached = listing.lookup(loc)
        if cached is not None or listing.covers(loc):
            return isinstance(cached, Stat)
        with self.guard("look up", loc):
            return bool(self.fs().isfile(_key(loc)))

    def listdir(self, loc: Location) -> dict[str, bool] | None:
        cached = listing.lookup(loc)
        if cached is not None or listing.covers(loc):
            if isinstance(cached, Stat):
                raise NotADirectoryError(loc.uri)
            return None if cached is None else {name: isinstance(v, dict) for name, v in cached.items()}
        with self.guard("list", loc):
            try:
                entries = self.fs().ls(_key(loc), detail=True)
            except FileNotFoundError as exc:
                if not _missing(exc):
                    raise
                return None
        if not entries:
            return None
        if len(entries) == 1 and entries[0]["name"].rstrip("/") == _key(loc) and entries[0]["type"] == "file":
            raise NotADirectoryError(loc.uri)
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["type"] == "directory" for e in entries}

    def read_bytes(self, loc: Location, *, missing_ok: bool = False) -> bytes | None:
        try:
            return self.fs().cat_file(_key(loc))
        except Exception as exc:
            if missing_ok and _missing(exc):
                return None
            if isinstance(exc, self.failures()):
                raise self.error("read", loc, exc) from None
            raise

    def read_versioned(self, loc: Location) -> tuple[bytes, str] | None:
        """The object and its ETag. The ETag is read first: if the object changes in between, replace_if with
        it fails (safe)."""
        with self.guard("read", loc):
            try:
                etag = str(self.fs().info(_key(loc))["ETag"])
            except FileNotFoundError as exc:
                if _missing(exc):
                    return None
                raise
        data = self.read_bytes(loc, missing_ok=True)
        return None if data is None else (data, etag)

    def open_read(self, loc: Location) -> IO[bytes]:
        with self.guard("read", loc):
            return self.fs().open(_key(loc), "rb")

    def download(self, loc: Location, target: str) -> None:
        with self.guard("download", loc):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.fs().get_file(_key(loc), target)

    def download_tree(self, loc: Location, target: str) -> bool:
        with self.guard("download", loc):
            fs = self.fs()
            found = fs.find(_key(loc), detail=False)
            if not found:
                return False
            base = _key(loc) + "/"
            for key in found:
                if key.startswith(base):
                    dest = os.path.join(target, key[len(base):])
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    fs.get_file(key, dest)
            return True

    def prefetch(self, loc: Location) -> None:
        """List the prefix once (sizes, ETags, last-modified) into the open snapshot."""
        if not listing.active() or listing.covers(loc):
            return
        with self.guard("list", loc):
            found = self.fs().find(_key(loc), detail=True)
        base = _key(loc) + "/"
        listing.record(loc, {key[len(base):]: _stat(info) for key, info in found.items()
                             if key.startswith(base) and info.get("type") != "directory"})

    # ------------------------------------------------------------ writing

    def mkdir(self, loc: Location) -> None:
        """Nothing: prefixes need no creating."""

    def check_writable(self, loc: Location) -> None:
        """Nothing: the service answers per request (a denied write fails naming its URI)."""

    def _put(self, loc: Location, data: bytes, **condition: str) -> str:
        """One whole-object PUT (atomic on S3); returns the new ETag."""
        bucket, _, key = _key(loc).partition("/")
        return self.fs().call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition).get("ETag", "")

    def write_atomic(self, loc: Location, data: bytes, *, backup: Location | None = None) -> None:
        """One whole-object PUT; with `backup`, a server-side copy of the previous version first."""
        with self.guard("write", loc):
            if backup is not None:
                try:
                    self.fs().copy(_key(loc), _key(backup))
                except FileNotFoundError as exc:
                    if not _missing(exc):
                        raise
            self._put(loc, data)

    def put_file(self, local_path: str, loc: Location) -> None:
        """One PUT, or a multipart upload that S3 makes visible only once complete."""
        with self.guard("write", loc):
            self.fs().put_file(local_path, _key(loc))

    @contextmanager
    def staging(self, loc: Location) -> Iterator[str]:
        scratch = tempfile.mkdtemp(prefix="soma-manifest-")
        try:
            yield os.path.join(scratch, loc.name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def create_exclusive(self, loc: Location, data: bytes) -> bool:
        """PutObject with If-None-Match: *."""
        try:
            self._put(loc, data, IfNoneMatch="*")
            return True
        except Exception as exc:
            if _precondition_failed(exc):
                return False
            raise self.error("create", loc, exc) from None

    def replace_if(self, loc: Location, data: bytes, version: str) -> str | None:
        """PutObject with If-Match: the ETag from read_versioned."""
        try:
            return self._put(loc, data, IfMatch=version)
        except Exception as exc:
            if _precondition_failed(exc) or _missing(exc):
                return None
            raise self.error("replace", loc, exc) from None

    def delete(self, loc: Location) -> None:
        with self.guard("delete", loc):
            try:
                self.fs().rm_file(_key(loc))
            except FileNotFoundError as exc:
                if not _missing(exc):
                    raise

    def delete_tree(self, loc: Location) -> None:
        with self.guard("delete", loc):
            keys = self.fs().find(_key(loc))
            if keys:
                self.fs().rm(keys)

"""Where the tool's files live: local paths and s3:// URIs behind one small interface.

The only module that knows which store it talks to. Local paths use the OS directly (as fast
as before); s3:// URIs go through fsspec/s3fs, with the settings of the manifest's
`object_store` block (endpoint, region; credentials only from the standard AWS chain).
TileDB reaches the atlas through its own S3 support, configured from the same settings
(`tiledb_context`).

Every OS or S3 failure on the tool's own files becomes one `StorageError` that names the
path or URI and the cause (disk full, permission denied, bucket missing, endpoint unreachable).
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlparse

from soma_manifest.errors import StorageError

_S3 = "s3://"
#: Seconds to wait for an S3 endpoint to accept a connection and to answer, and attempts per request
#: (botocore's own retries, with backoff; throttling included). An endpoint that refuses, never accepts
#: or never answers fails within about 30 s instead of hanging (tests/test_s3.py, black holes).
CONNECT_TIMEOUT = 5
READ_TIMEOUT = 8
ATTEMPTS = 3


@dataclass(frozen=True)
class StoreSettings:
    """Object-store settings a worker needs to reach the same store (small, picklable; never credentials)."""

    endpoint_url: str | None = None
    region: str | None = None

    def endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def region_name(self) -> str | None:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


_settings = StoreSettings()
# Keyed by what they were built from: settings that leave the endpoint or region to the environment
# (AWS_ENDPOINT_URL, AWS_REGION) resolve at use, and the environment may change in a long-lived process.
_fs_cache: dict[tuple[str | None, str | None], Any] = {}
_ctx_cache: dict[tuple[tuple[str, str], ...], Any] = {}
_lock = threading.Lock()


def configure(settings: StoreSettings | None) -> None:
    """Use these settings for s3:// in this process (the manifest's object_store block; workers get it passed)."""
    global _settings
    _settings = settings or StoreSettings()


def settings() -> StoreSettings:
    return _settings


# ---------------------------------------------------------------- locations


class Location:
    """A local path or an s3:// URI, path-like: `/`, `.name`, `.parent`, `.suffix`, `with_name`, `str()`, `==`.

    A local Location is also `os.PathLike`, so code that opens local files keeps working unchanged.
    """

    __slots__ = ("uri", "is_remote")

    def __init__(self, uri: str | os.PathLike[str] | Location) -> None:
        text = uri.uri if isinstance(uri, Location) else os.fspath(uri)
        if text.startswith(_S3):
            bucket_key = text[len(_S3):].strip("/")
            text = _S3 + "/".join(p for p in bucket_key.split("/") if p)
        elif len(text) > 1:
            text = text.rstrip("/")
        self.uri = text
        self.is_remote = text.startswith(_S3)

    def __truediv__(self, part: str) -> Location:
        return Location(f"{self.uri}/{part}")

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        head = self.uri.rsplit("/", 1)[0]
        return Location(head if head and head + "/" != _S3 else self.uri)

    @property
    def suffix(self) -> str:
        name = self.name
        dot = name.rfind(".")
        return name[dot:] if dot > 0 else ""

    def with_name(self, name: str) -> Location:
        return self.parent / name

    def relative_to(self, root: Location) -> str:
        prefix = root.uri + "/"
        if not self.uri.startswith(prefix):
            raise ValueError(f"{self} is not under {root}")
        return self.uri[len(prefix):]

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Location):
            return self.uri == other.uri
        if isinstance(other, (str, os.PathLike)):
            return self.uri == Location(other).uri
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.uri)

    def __fspath__(self) -> str:
        if self.is_remote:
            raise TypeError(f"{self.uri} is not a local path (read it through soma_manifest.storage)")
        return self.uri

    def __reduce__(self) -> tuple:
        return (Location, (self.uri,))


def _as_location(value: Location | str | os.PathLike[str]) -> Location:
    return value if type(value) is Location else Location(value)


def resolve(value: str, base: str | Location) -> Location:
    """A path as a manifest or schema writes it: s3:// URIs as they are, absolute local paths normalized, and
    relative ones against the folder `base` (a local folder, or an s3:// prefix for a file kept on S3)."""
    if value.startswith(_S3):
        return Location(value)
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        return Location(os.path.normpath(path))
    base = str(base)
    if base.startswith(_S3):
        return Location(_S3 + posixpath.normpath(f"{base[len(_S3):]}/{path}"))
    return Location(os.path.realpath(os.path.join(base, path)))


# ---------------------------------------------------------------- errors


def _bucket_of(loc: Location) -> str:
    return loc.uri[len(_S3):].split("/", 1)[0]


def _cause(exc: BaseException, loc: Location) -> tuple[str, str]:
    """(what happened, what to do) for an OS, s3fs or botocore error; never includes credentials."""
    import botocore.exceptions as bx

    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                        bx.ConnectionClosedError)) or "Could not connect" in str(exc):
        endpoint = _settings.endpoint() or "the AWS S3 endpoint"
        return (f"cannot reach the S3 endpoint {endpoint}",
                "check object_store.endpoint_url (or AWS_ENDPOINT_URL) and that the service is up")
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return ("no AWS credentials found",
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE in the environment (never in the manifest)")
    text = str(exc)
    if isinstance(exc, bx.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        text = f"{code} {exc.response.get('Error', {}).get('Message', '')}"
    if loc.is_remote and _no_bucket(text):
        return f"the bucket {_bucket_of(loc)} does not exist", "create the bucket, or fix the s3:// URI"
    if loc.is_remote and any(k in text for k in ("AccessDenied", "Access Denied", "Forbidden", "InvalidAccessKeyId",
                                                  "SignatureDoesNotMatch")) \
            or isinstance(exc, PermissionError):
        if loc.is_remote:
            return "access denied", "grant the credentials in the environment access to this bucket and prefix"
        return getattr(exc, "strerror", None) or "Permission denied", "check the file's permissions"
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC:
        return "disk full (No space left on device)", "free space on that filesystem"
    if code == errno.EROFS:
        return "read-only filesystem", "point the manifest at a writable location"
    if code == errno.EDQUOT:
        return "disk quota exceeded", "free space or raise the quota"
    if isinstance(exc, FileNotFoundError):
        return "not found", "check the path in the manifest"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror, "check the path"
    return f"{type(exc).__name__}: {text}".strip(), "check the path"


def _error(action: str, loc: Location, exc: BaseException) -> StorageError:
    what, hint = _cause(exc, loc)
    return StorageError(f"cannot {action}: {what}", where=loc.uri, hint=hint)


def _failures() -> tuple[type[BaseException], ...]:
    import botocore.exceptions as bx

    return (OSError, bx.BotoCoreError, bx.ClientError)


@contextmanager
def guard(action: str, loc: Location) -> Iterator[None]:
    """Turn an OS or S3 failure inside the block into one StorageError naming `loc`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        if isinstance(exc, _failures()):
            raise _error(action, loc, exc) from None
        raise


def _missing(exc: BaseException) -> bool:
    """A missing object or file (not a missing bucket: that is an error).

    Matched on the service's wording, as `_cause` does: the message may hold the path, and a bucket may well
    be named my-bucket.
    """
    return isinstance(exc, FileNotFoundError) and not _no_bucket(str(exc))


def _no_bucket(text: str) -> bool:
    return "NoSuchBucket" in text or "bucket does not exist" in text


# ---------------------------------------------------------------- S3 plumbing


def _fs():
    """The s3fs filesystem for the current settings (one per settings and process)."""
    with _lock:
        key = (_settings.endpoint(), _settings.region_name())
        fs = _fs_cache.get(key)
        if fs is None:
            import s3fs

            client: dict[str, Any] = {}
            if _settings.region_name():
                client["region_name"] = _settings.region_name()
            fs = s3fs.S3FileSystem(
                endpoint_url=_settings.endpoint(), client_kwargs=client, skip_instance_cache=True,
                use_listings_cache=False,
                config_kwargs={"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT,
                               "retries": {"total_max_attempts": ATTEMPTS, "mode": "standard"}})
            fs.retries = 1  # s3fs' own retry loop would multiply botocore's attempts (and their timeouts)
            fs.connect()
            fs.s3.meta.events.register("before-send.s3", _no_expect_continue)
            _fs_cache[key] = fs
        return fs


def _no_expect_continue(request: Any, **_: Any) -> None:
    """Drop botocore's `Expect: 100-continue` from PUTs: aiohttp waits for the 100 without any timeout, so a
    PUT to an endpoint that accepts connections and never answers would hang for good."""
    request.headers.pop("Expect", None)


def _key(loc: Location) -> str:
    return loc.uri[len(_S3):]


def _split(loc: Location) -> tuple[str, str]:
    bucket, _, key = _key(loc).partition("/")
    return bucket, key


def _put(loc: Location, data: bytes, **condition: str) -> str:
    """One whole-object PUT (atomic on S3); returns the new ETag."""
    bucket, key = _split(loc)
    out = _fs().call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    return out.get("ETag", "")


def _precondition_failed(exc: BaseException) -> bool:
    import botocore.exceptions as bx

    if isinstance(exc, FileExistsError):
        return True
    text = str(exc)
    if isinstance(exc, bx.ClientError):
        text = exc.response.get("Error", {}).get("Code", "")
    return any(k in text for k in ("PreconditionFailed", "pre-conditions you specified", "ConditionalRequestConflict"))


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class Stat:
    """What identifies a file's version cheaply: size plus mtime (local) or ETag and last-modified (S3)."""

    size: int
    mtime_ns: int
    etag: str = ""


def stat(loc: Location) -> Stat:
    loc = _as_location(loc)
    if not loc.is_remote:  # the plan's hot path: no context manager, no snapshot lookup
        try:
            st = os.stat(loc.uri)
        except OSError as exc:
            raise _error("stat", loc, exc) from None
        return Stat(st.st_size, st.st_mtime_ns)
    cached = _snapshot_lookup(loc)
    if cached is not None:
        if isinstance(cached, Stat):
            return cached
        raise StorageError("cannot stat: it is a folder", where=loc.uri)
    with guard("stat", loc):
        return _s3_stat(_fs().info(_key(loc)))


def _s3_stat(info: dict) -> Stat:
    modified = info.get("LastModified")
    mtime = int(modified.timestamp() * 1e9) if modified is not None else 0
    return Stat(int(info.get("size", 0)), mtime, str(info.get("ETag", "")).strip('"'))


def exists(loc: Location) -> bool:
    """Whether a file or folder (prefix) exists at `loc`."""
    loc = _as_location(loc)
    cached = _snapshot_lookup(loc)
    if cached is not None:
        return True
    if _snapshot_covers(loc):
        return False
    with guard("look up", loc):
        if not loc.is_remote:
            return os.path.exists(loc.uri)
        return bool(_fs().exists(_key(loc)))


def is_dir(loc: Location) -> bool:
    loc = _as_location(loc)
    cached = _snapshot_lookup(loc)
    if cached is not None or _snapshot_covers(loc):
        return isinstance(cached, dict)
    with guard("look up", loc):
        if not loc.is_remote:
            return os.path.isdir(loc.uri)
        return bool(_fs().isdir(_key(loc)))


def is_file(loc: Location) -> bool:
    loc = _as_location(loc)
    cached = _snapshot_lookup(loc)
    if cached is not None or _snapshot_covers(loc):
        return isinstance(cached, Stat)
    with guard("look up", loc):
        if not loc.is_remote:
            return os.path.isfile(loc.uri)
        return bool(_fs().isfile(_key(loc)))


def listdir(loc: Location) -> dict[str, bool] | None:
    """Names directly in a folder (prefix) -> whether each is a folder; None when there is no such folder.

    Raises NotADirectoryError when `loc` is a file.
    """
    loc = _as_location(loc)
    cached = _snapshot_lookup(loc)
    if cached is not None or _snapshot_covers(loc):
        if isinstance(cached, Stat):
            raise NotADirectoryError(loc.uri)
        return None if cached is None else {name: isinstance(v, dict) for name, v in cached.items()}
    if not loc.is_remote:
        try:
            with os.scandir(loc.uri) as found:
                return {e.name: e.is_dir() for e in found}
        except (FileNotFoundError, NotADirectoryError) as exc:
            if isinstance(exc, NotADirectoryError):
                raise
            return None
        except OSError as exc:
            raise _error("list", loc, exc) from None
    with guard("list", loc):
        try:
            entries = _fs().ls(_key(loc), detail=True)
        except FileNotFoundError as exc:
            if not _missing(exc):
                raise
            return None
    if not entries:
        return None
    if len(entries) == 1 and entries[0]["name"].rstrip("/") == _key(loc) and entries[0]["type"] == "file":
        raise NotADirectoryError(loc.uri)
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["type"] == "directory" for e in entries}


def read_bytes(loc: Location, *, missing_ok: bool = False) -> bytes | None:
    """The whole file; None when it does not exist and `missing_ok`."""
    loc = _as_location(loc)
    try:
        if not loc.is_remote:
            with open(loc.uri, "rb") as fh:
                return fh.read()
        return _fs().cat_file(_key(loc))
    except Exception as exc:
        if missing_ok and _missing(exc):
            return None
        if isinstance(exc, _failures()):
            raise _error("read", loc, exc) from None
        raise


def read_versioned(loc: Location) -> tuple[bytes, str] | None:
    """The file and a version token (ETag on S3, a content hash locally) for `replace_if`; None if missing."""
    loc = _as_location(loc)
    if not loc.is_remote:
        data = read_bytes(loc, missing_ok=True)
        return None if data is None else (data, hashlib.blake2b(data, digest_size=16).hexdigest())
    # The ETag is read first: if the object changes in between, replace_if with it fails (safe).
    with guard("read", loc):
        try:
            etag = str(_fs().info(_key(loc))["ETag"])
        except FileNotFoundError as exc:
            if _missing(exc):
                return None
            raise
    data = read_bytes(loc, missing_ok=True)
    return None if data is None else (data, etag)


def open_read(loc: Location) -> IO[bytes]:
    """A binary file object for reading (seekable)."""
    loc = _as_location(loc)
    with guard("read", loc):
        if not loc.is_remote:
            return open(loc.uri, "rb")
        return _fs().open(_key(loc), "rb")


@contextmanager
def local_file(loc: Location | str) -> Iterator[str]:
    """A local path holding the file: the path itself, or a temporary copy of an s3:// object."""
    loc = Location(loc)
    if not loc.is_remote:
        yield loc.uri
        return
    folder = tempfile.mkdtemp(prefix="soma-manifest-")
    try:
        target = os.path.join(folder, loc.name)
        download(loc, target)
        yield target
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def download(loc: Location, target: str) -> None:
    """Copy one s3:// object (or local file) to the local path `target`."""
    loc = _as_location(loc)
    with guard("download", loc):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if loc.is_remote:
            _fs().get_file(_key(loc), target)
        else:
            shutil.copyfile(loc.uri, target)


def download_tree(loc: Location, target: str) -> bool:
    """Copy every object under an s3:// prefix (or a local folder) into the local folder `target`.

    Returns False when there is nothing at `loc`.
    """
    loc = _as_location(loc)
    with guard("download", loc):
        if not loc.is_remote:
            if not os.path.isdir(loc.uri):
                return False
            shutil.copytree(loc.uri, target, dirs_exist_ok=True)
            return True
        fs = _fs()
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


# ---------------------------------------------------------------- writing


def mkdir(loc: Location) -> None:
    """Create a local folder (and its parents); object stores need none."""
    loc = _as_location(loc)
    if not loc.is_remote:
        with guard("create the folder", loc):
            os.makedirs(loc.uri, exist_ok=True)


def check_writable(loc: Location) -> None:
    """Fail now, naming the folder, if files cannot be created in this local folder (a read-only mount,
    a full disk); object stores answer per request."""
    loc = _as_location(loc)
    if loc.is_remote:
        return
    with guard("write in the folder", loc):
        folder = loc.uri
        while not os.path.isdir(folder):  # its nearest existing ancestor: nothing is created before it is needed
            folder = os.path.dirname(folder)
        fd, probe = tempfile.mkstemp(prefix=".soma-manifest-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)


def write_atomic(loc: Location, data: bytes, *, backup: Location | None = None) -> None:
    """Replace the file in one step: local temp + fsync + rename; on S3 one whole-object PUT.

    With `backup`, the previous version is kept there; the file itself never goes missing.
    """
    loc = _as_location(loc)
    if loc.is_remote:
        with guard("write", loc):
            if backup is not None:
                try:
                    _fs().copy(_key(loc), _key(backup))
                except FileNotFoundError as exc:
                    if not _missing(exc):
                        raise
            _put(loc, data)
        return
    folder = os.path.dirname(loc.uri)
    with guard("write", loc):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{loc.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if backup is not None and os.path.exists(loc.uri):
                # A hard link keeps the file in place the whole time, so a crash never leaves none.
                link = f"{tmp}.prev"
                os.link(loc.uri, link)
                os.replace(link, backup.uri)
            os.replace(tmp, loc.uri)
        except BaseException:
            for leftover in (tmp, f"{tmp}.prev"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
            raise
        _fsync_dir(folder)


def put_file(local_path: str, loc: Location) -> None:
    """Store a finished local file at `loc` atomically (local: fsync + rename; S3: one PUT or multipart upload,
    which S3 makes visible only once complete)."""
    loc = _as_location(loc)
    with guard("write", loc):
        if loc.is_remote:
            _fs().put_file(local_path, _key(loc))
            return
        os.makedirs(os.path.dirname(loc.uri), exist_ok=True)
        with open(local_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(local_path, loc.uri)


@contextmanager
def staged_file(loc: Location) -> Iterator[str]:
    """A local path to write the file to; on success it is stored at `loc` atomically, else removed."""
    loc = _as_location(loc)
    folder = os.path.dirname(loc.uri) if not loc.is_remote else None
    if folder is not None:
        mkdir(Location(folder))
        tmp = os.path.join(folder, f".{loc.name}.{os.getpid()}.tmp")
        scratch = None
    else:
        scratch = tempfile.mkdtemp(prefix="soma-manifest-")
        tmp = os.path.join(scratch, loc.name)
    try:
        with guard("write", loc):
            yield tmp
        put_file(tmp, loc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def create_exclusive(loc: Location, data: bytes) -> bool:
    """Create the file only if it does not exist (local: written in full, then hard-linked into place;
    S3: PutObject with If-None-Match: *). False when it already exists."""
    loc = _as_location(loc)
    if loc.is_remote:
        try:
            _put(loc, data, IfNoneMatch="*")
            return True
        except Exception as exc:
            if _precondition_failed(exc):
                return False
            raise _error("create", loc, exc) from None
    folder = os.path.dirname(loc.uri)
    tmp = os.path.join(folder, f".{loc.name}.{uuid.uuid4().hex}.tmp")
    with guard("create", loc):
        os.makedirs(folder, exist_ok=True)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, loc.uri)
            except FileExistsError:
                return False
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def replace_if(loc: Location, data: bytes, version: str) -> str | None:
    """Replace the file only if it is still at `version` (from read_versioned); the new version, or None.

    S3: PutObject with If-Match. Local: the file is moved aside atomically, checked, and the new one
    linked into place; if it changed hands meanwhile it is put back.
    """
    loc = _as_location(loc)
    if loc.is_remote:
        try:
            return _put(loc, data, IfMatch=version)
        except Exception as exc:
            if _precondition_failed(exc) or _missing(exc):
                return None
            raise _error("replace", loc, exc) from None
    aside = f"{loc.uri}.stale-{uuid.uuid4().hex}"
    with guard("replace", loc):
        try:
            os.replace(loc.uri, aside)
        except FileNotFoundError:
            return None
        try:
            with open(aside, "rb") as fh:
                current = hashlib.blake2b(fh.read(), digest_size=16).hexdigest()
            if current != version:
                try:
                    os.link(aside, loc.uri)
                except FileExistsError:
                    pass
                return None
        finally:
            os.unlink(aside)
        if not create_exclusive(loc, data):
            return None
        return hashlib.blake2b(data, digest_size=16).hexdigest()


def delete(loc: Location) -> None:
    """Remove a file if it exists."""
    loc = _as_location(loc)
    with guard("delete", loc):
        if not loc.is_remote:
            try:
                os.unlink(loc.uri)
            except FileNotFoundError:
                pass
            return
        try:
            _fs().rm_file(_key(loc))
        except FileNotFoundError as exc:
            if not _missing(exc):
                raise


def delete_tree(loc: Location) -> None:
    """Remove a folder (prefix) and everything under it, if it exists."""
    loc = _as_location(loc)
    with guard("delete", loc):
        if not loc.is_remote:
            shutil.rmtree(loc.uri, ignore_errors=True)
            return
        keys = _fs().find(_key(loc))
        if keys:
            _fs().rm(keys)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_object_store(loc: Location) -> bool:
    """Whether a holder's death can go unseen here (no shared process table): leases need an expiry."""
    return loc.is_remote


# ---------------------------------------------------------------- listing snapshots


#: Within `snapshot()`: every prefetched prefix, folder and object URI -> its listing (name -> subtree) or Stat.
_snapshot: dict[str, dict | Stat] | None = None
_roots: list[str] = []


@contextmanager
def snapshot() -> Iterator[None]:
    """Within the block, `prefetch`ed s3:// prefixes answer listings and stats from one listing each."""
    global _snapshot, _roots
    outer = (_snapshot, _roots)
    if _snapshot is None:
        _snapshot, _roots = {}, []
    try:
        yield
    finally:
        _snapshot, _roots = outer


def prefetch(loc: Location) -> None:
    """List an s3:// prefix once (sizes, ETags, last-modified) for the current snapshot; no-op locally."""
    loc = _as_location(loc)
    if _snapshot is None or not loc.is_remote or _snapshot_covers(loc):
        return
    with guard("list", loc):
        found = _fs().find(_key(loc), detail=True)
    _roots.append(loc.uri)
    base = _key(loc) + "/"
    for key, info in found.items():
        if not key.startswith(base) or info.get("type") == "directory":
            continue
        folder, name = loc.uri, key[len(base):]
        for part in name.split("/")[:-1]:
            listing = _snapshot.setdefault(folder, {})
            folder = f"{folder}/{part}"
            if isinstance(listing, dict):
                listing.setdefault(part, {})
        listing = _snapshot.setdefault(folder, {})
        if isinstance(listing, dict):
            listing[name.rsplit("/", 1)[-1]] = True
        _snapshot[f"{loc.uri}/{name}"] = _s3_stat(info)


def _snapshot_covers(loc: Location) -> bool:
    return bool(_roots) and loc.is_remote and any(loc.uri == r or loc.uri.startswith(r + "/") for r in _roots)


def _snapshot_lookup(loc: Location) -> dict | Stat | None:
    """What the snapshot knows at `loc`: a folder's listing, an object's Stat, or None."""
    if not _snapshot or not loc.is_remote:
        return None
    found = _snapshot.get(loc.uri)
    if isinstance(found, dict):
        return {name: _snapshot.get(f"{loc.uri}/{name}", {}) for name in found}
    return found


# ---------------------------------------------------------------- TileDB


#: TileDB 2.30 (in tiledbsoma 2.3.0) crashed with SIGSEGV in the sparse global-order reader's tile-merge
#: preprocessing (ParallelMerge, in ~MergeUnit, on a thread of its pool): a core dump of a `verify --deep`
#: process, counting X entries right after an apply with deletes and a compaction. Unordered reads of
#: arrays without duplicates (all of ours) use that reader. 0 turns the preprocessing off; it only
#: reorders how tiles are loaded, never what a read returns.
READER_SETTINGS = {"sm.query.sparse_global_order.preprocess_tile_merge": "0"}

#: For global-order writes whose chunks the writer has checked itself (atlas._read_chunk: column bounds, and
#: scipy's canonical-format test: columns strictly ascending within each row, so ordered and without
#: duplicates; atlas._check_room bounds both dimensions first). TileDB's own checks of the same are passes
#: over every entry: 0.5 s of a 1.3 s, 8.7M-entry X write (bench/write_checks.py; bench/README.md, "Stop 17").
TRUSTED_ORDER = {"sm.check_global_order": "false", "sm.check_coord_dups": "false", "sm.check_coord_oob": "false"}


def tiledb_config(store: StoreSettings | None = None) -> dict[str, str]:
    """TileDB settings for the same store (and READER_SETTINGS); credentials come from the AWS chain TileDB
    reads itself."""
    store = store or _settings
    config: dict[str, str] = {}
    endpoint = store.endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        config["vfs.s3.endpoint_override"] = parsed.netloc or parsed.path
        config["vfs.s3.scheme"] = parsed.scheme or "https"
        config["vfs.s3.use_virtual_addressing"] = "false"
    if store.region_name():
        config["vfs.s3.region"] = store.region_name()
    if config:
        # Fail fast on an unreachable endpoint instead of TileDB's long default backoff.
        config.update({"vfs.s3.connect_timeout_ms": str(CONNECT_TIMEOUT * 1000), "vfs.s3.connect_max_tries": "2",
                       "vfs.s3.request_timeout_ms": str(READ_TIMEOUT * 1000)})
    return {**READER_SETTINGS, **config}


def tiledb_context(settings: Mapping[str, str] | None = None) -> Any:
    """The SOMATileDBContext for the configured store (plus `settings`), one per process and settings."""
    config = {**tiledb_config(), **(settings or {})}
    with _lock:
        key = tuple(sorted(config.items()))
        ctx = _ctx_cache.get(key)
        if ctx is None:
            import tiledbsoma

            ctx = tiledbsoma.SOMATileDBContext(tiledb_config=config)
            _ctx_cache[key] = ctx
        return ctx

"""Where the tool's files live: local paths and s3:// URIs behind one small interface.

Each function here hands its Location to the backend that holds it (`store_for`): `local.py` (the OS
directly, as fast as a plain path) or `s3.py` (fsspec/s3fs with the settings of the manifest's
`object_store` block; credentials only from the standard AWS chain). storage/ is the only code that knows
which backend it talks to: callers that must behave differently ask a named capability of the store
(`store_for(loc).renames_atomically`, `.sees_dead_holders`, ...; protocol.py lists them), never its kind.
TileDB reaches the atlas through its own S3 support, configured from the same settings (tiledb.py's
`tiledb_vfs_config`; the engine's contexts are atlas/engine.py's).

Every OS or S3 failure on the tool's own files becomes one `StorageError` that names the path or URI and
the cause (disk full, permission denied, bucket missing, endpoint unreachable, a stalled request).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import IO

from soma_manifest.storage.listing import snapshot
from soma_manifest.storage.local import LocalStore
from soma_manifest.storage.location import Location, as_location, resolve
from soma_manifest.storage.protocol import Stat, Store
from soma_manifest.storage.settings import ATTEMPTS, CONNECT_TIMEOUT, READ_TIMEOUT, StoreSettings, configure, settings
from soma_manifest.storage.tiledb import tiledb_vfs_config

__all__ = [
    "ATTEMPTS", "CONNECT_TIMEOUT", "READ_TIMEOUT", "Location", "Stat", "Store",
    "StoreSettings", "check_writable", "configure", "create_exclusive", "delete", "delete_tree", "download",
    "download_tree", "exists", "guard", "is_dir", "is_file", "listdir", "local_file", "mkdir",
    "open_read", "prefetch", "put_file", "read_bytes", "read_versioned", "replace_if", "resolve", "settings",
    "snapshot", "staged_file", "stat", "store_for", "tiledb_vfs_config", "write_atomic",
]

_LOCAL = LocalStore()
_s3_stores: dict[StoreSettings, Store] = {}


def store_for(loc: Location | str | os.PathLike[str]) -> Store:
    """The backend holding `loc`; s3:// ones with this process' settings (`configure`)."""
    return _store(as_location(loc))


def _store(loc: Location) -> Store:
    if not loc.is_remote:
        return _LOCAL
    current = settings()
    store = _s3_stores.get(current)
    if store is None:
        from soma_manifest.storage.s3 import S3Store  # a run that never touches S3 never loads it (nor s3fs)

        store = _s3_stores.setdefault(current, S3Store(current))
    return store


def guard(action: str, loc: Location) -> AbstractContextManager[None]:
    """Turn an OS or S3 failure inside the block into one StorageError naming `loc`."""
    loc = as_location(loc)
    return _store(loc).guard(action, loc)


def stat(loc: Location) -> Stat:
    loc = as_location(loc)
    return _store(loc).stat(loc)


def exists(loc: Location) -> bool:
    """Whether a file or folder (prefix) exists at `loc`."""
    loc = as_location(loc)
    return _store(loc).exists(loc)


def is_dir(loc: Location) -> bool:
    loc = as_location(loc)
    return _store(loc).is_dir(loc)


def is_file(loc: Location) -> bool:
    loc = as_location(loc)
    return _store(loc).is_file(loc)


def listdir(loc: Location) -> dict[str, bool] | None:
    """Names directly in a folder (prefix) -> whether each is a folder; None when there is no such folder.

    Raises NotADirectoryError when `loc` is a file.
    """
    loc = as_location(loc)
    return _store(loc).listdir(loc)


def read_bytes(loc: Location, *, missing_ok: bool = False) -> bytes | None:
    """The whole file; None when it does not exist and `missing_ok`."""
    loc = as_location(loc)
    return _store(loc).read_bytes(loc, missing_ok=missing_ok)


def read_versioned(loc: Location) -> tuple[bytes, str] | None:
    """The file and a version token (ETag on S3, a content hash locally) for `replace_if`; None if missing."""
    loc = as_location(loc)
    return _store(loc).read_versioned(loc)


def open_read(loc: Location) -> IO[bytes]:
    """A binary file object for reading (seekable)."""
    loc = as_location(loc)
    return _store(loc).open_read(loc)


@contextmanager
def local_file(loc: Location | str) -> Iterator[str]:
    """A local path holding the file: the path itself, or a temporary copy (of an s3:// object)."""
    loc = Location(loc)
    store = _store(loc)
    if store.local_paths:
        yield loc.uri
        return
    folder = tempfile.mkdtemp(prefix="soma-manifest-")
    try:
        target = os.path.join(folder, loc.name)
        store.download(loc, target)
        yield target
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def download(loc: Location, target: str) -> None:
    """Copy one s3:// object (or local file) to the local path `target`."""
    loc = as_location(loc)
    _store(loc).download(loc, target)


def download_tree(loc: Location, target: str) -> bool:
    """Copy every object under an s3:// prefix (or a local folder) into the local folder `target`.

    Returns False when there is nothing at `loc`.
    """
    loc = as_location(loc)
    return _store(loc).download_tree(loc, target)


def prefetch(loc: Location) -> None:
    """List an s3:// prefix once (sizes, ETags, last-modified) for the current `snapshot()`; no-op locally."""
    loc = as_location(loc)
    _store(loc).prefetch(loc)


# ---------------------------------------------------------------- writing


def mkdir(loc: Location) -> None:
    """Create a local folder (and its parents); object stores need none."""
    loc = as_location(loc)
    _store(loc).mkdir(loc)


def check_writable(loc: Location) -> None:
    """Fail now, naming the folder, if files cannot be created in this local folder (a read-only mount,
    a full disk); object stores answer per request."""
    loc = as_location(loc)
    _store(loc).check_writable(loc)


def write_atomic(loc: Location, data: bytes, *, backup: Location | None = None) -> None:
    """Replace the file in one step: local temp + fsync + rename; on S3 one whole-object PUT.

    With `backup`, the previous version is kept there; the file itself never goes missing.
    """
    loc = as_location(loc)
    _store(loc).write_atomic(loc, data, backup=None if backup is None else as_location(backup))


def put_file(local_path: str, loc: Location) -> None:
    """Store a finished local file at `loc` atomically (local: fsync + rename; S3: one PUT or multipart upload,
    which S3 makes visible only once complete)."""
    loc = as_location(loc)
    _store(loc).put_file(local_path, loc)


@contextmanager
def staged_file(loc: Location) -> Iterator[str]:
    """A local path to write the file to; on success it is stored at `loc` atomically, else removed."""
    loc = as_location(loc)
    store = _store(loc)
    with store.staging(loc) as tmp:
        with store.guard("write", loc):
            yield tmp
        store.put_file(tmp, loc)


def create_exclusive(loc: Location, data: bytes) -> bool:
    """Create the file only if it does not exist (local: written in full, then hard-linked into place;
    S3: PutObject with If-None-Match: *). False when it already exists."""
    loc = as_location(loc)
    return _store(loc).create_exclusive(loc, data)


def replace_if(loc: Location, data: bytes, version: str) -> str | None:
    """Replace the file only if it is still at `version` (from read_versioned); the new version, or None.

    S3: PutObject with If-Match. Local: the file is moved aside atomically, checked, and the new one
    linked into place; if it changed hands meanwhile it is put back.
    """
    loc = as_location(loc)
    return _store(loc).replace_if(loc, data, version)


def delete(loc: Location) -> None:
    """Remove a file if it exists."""
    loc = as_location(loc)
    _store(loc).delete(loc)


def delete_tree(loc: Location) -> None:
    """Remove a folder (prefix) and everything under it, if it exists."""
    loc = as_location(loc)
    _store(loc).delete_tree(loc)

"""What every backend offers: the `Store` protocol, its named capabilities, and `Stat`.

Callers outside storage/ ask a capability (`store_for(loc).renames_atomically`), never which backend it is.
A new backend implements this protocol, joins `store_for`, and runs tests/test_storage.py.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO, Protocol, runtime_checkable

from soma_manifest.errors import StorageError
from soma_manifest.storage.location import Location


@dataclass(frozen=True)
class Stat:
    """What identifies a file's version cheaply: size plus mtime (local) or ETag and last-modified (S3)."""

    size: int
    mtime_ns: int
    etag: str = ""


@runtime_checkable
class Store(Protocol):
    """One kind of storage. Every failure is one StorageError naming the path or URI."""

    #: Files are on this machine and open by path (os.open, h5py, a rename next to them).
    local_paths: bool
    #: A file or folder can be renamed into place in one step (so a tree can be built aside, then moved).
    renames_atomically: bool
    #: A dead lock holder can be seen (a shared process table); without it, leases need an expiry.
    sees_dead_holders: bool
    #: A file can be appended to in place (a log can grow line by line).
    appends: bool
    #: The store is reached over a network: it may be unreachable, and each call waits on latency, so threads
    #: and one listing per prefix (prefetch) pay off.
    networked: bool

    def guard(self, action: str, loc: Location) -> AbstractContextManager[None]:
        """Turn this store's failures inside the block into one StorageError naming `loc`."""
        ...

    def error(self, action: str, loc: Location, exc: BaseException) -> StorageError: ...

    # ------------------------------------------------------------ reading

    def stat(self, loc: Location) -> Stat: ...

    def exists(self, loc: Location) -> bool:
        """A file or a folder (prefix) is there."""
        ...

    def is_dir(self, loc: Location) -> bool: ...

    def is_file(self, loc: Location) -> bool: ...

    def listdir(self, loc: Location) -> dict[str, bool] | None:
        """Names directly in a folder -> whether each is a folder; None if no such folder; NotADirectoryError
        if `loc` is a file."""
        ...

    def read_bytes(self, loc: Location, *, missing_ok: bool = False) -> bytes | None: ...

    def read_versioned(self, loc: Location) -> tuple[bytes, str] | None:
        """The file and a version token for `replace_if`; None if missing."""
        ...

    def open_read(self, loc: Location) -> IO[bytes]: ...

    def download(self, loc: Location, target: str) -> None: ...

    def download_tree(self, loc: Location, target: str) -> bool: ...

    def prefetch(self, loc: Location) -> None:
        """Inside `storage.snapshot()`, answer later lookups under `loc` from one listing (if that pays)."""
        ...

    # ------------------------------------------------------------ writing

    def mkdir(self, loc: Location) -> None: ...

    def check_writable(self, loc: Location) -> None: ...

    def write_atomic(self, loc: Location, data: bytes, *, backup: Location | None = None) -> None:
        """Replace the file whole: a reader sees the old or the new version, never a part or none."""
        ...

    def put_file(self, local_path: str, loc: Location) -> None:
        """Store a finished local file at `loc` whole (the local file may be consumed)."""
        ...

    def staging(self, loc: Location) -> AbstractContextManager[str]:
        """A local path to write `loc`'s content to before `put_file` (removed again afterwards)."""
        ...

    def create_exclusive(self, loc: Location, data: bytes) -> bool:
        """Create the file only if there is none: of two racers, exactly one gets True."""
        ...

    def replace_if(self, loc: Location, data: bytes, version: str) -> str | None:
        """Compare and swap: replace the file only if it is still at `version`; the new version, or None."""
        ...

    def delete(self, loc: Location) -> None: ...

    def delete_tree(self, loc: Location) -> None: ...


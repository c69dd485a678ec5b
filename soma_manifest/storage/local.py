"""The local disk: the OS directly (no snapshot, no threads), atomic by temp file, fsync and rename or link."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from soma_manifest.storage.location import Location
from soma_manifest.storage.protocol import Stat
from soma_manifest.storage.translate import Translates


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class LocalStore(Translates):
    """Files on this machine's filesystems."""

    local_paths = True
    renames_atomically = True
    sees_dead_holders = True
    appends = True
    networked = False

    # ------------------------------------------------------------ reading

    def stat(self, loc: Location) -> Stat:
        try:  # the plan's hot path: no context manager
            st = os.stat(loc.uri)
        except OSError as exc:
            raise self.error("stat", loc, exc) from None
        return Stat(st.st_size, st.st_mtime_ns)

    def exists(self, loc: Location) -> bool:
        with self.guard("look up", loc):
            return os.path.exists(loc.uri)

    def is_dir(self, loc: Location) -> bool:
        with self.guard("look up", loc):
            return os.path.isdir(loc.uri)

    def is_file(self, loc: Location) -> bool:
        with self.guard("look up", loc):
            return os.path.isfile(loc.uri)

    def listdir(self, loc: Location) -> dict[str, bool] | None:
        try:
            with os.scandir(loc.uri) as found:
                return {e.name: e.is_dir() for e in found}
        except NotADirectoryError:
            raise
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self.error("list", loc, exc) from None

    def read_bytes(self, loc: Location, *, missing_ok: bool = False) -> bytes | None:
        try:
            with open(loc.uri, "rb") as fh:
                return fh.read()
        except OSError as exc:
            if missing_ok and isinstance(exc, FileNotFoundError):
                return None
            raise self.error("read", loc, exc) from None

    def read_versioned(self, loc: Location) -> tuple[bytes, str] | None:
        """The file and a hash of its content (what `replace_if` compares)."""
        data = self.read_bytes(loc, missing_ok=True)
        return None if data is None else (data, _digest(data))

    def open_read(self, loc: Location) -> IO[bytes]:
        with self.guard("read", loc):
            return open(loc.uri, "rb")

    def download(self, loc: Location, target: str) -> None:
        with self.guard("download", loc):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(loc.uri, target)

    def download_tree(self, loc: Location, target: str) -> bool:
        with self.guard("download", loc):
            if not os.path.isdir(loc.uri):
                return False
            shutil.copytree(loc.uri, target, dirs_exist_ok=True)
            return True

    def prefetch(self, loc: Location) -> None:
        """Nothing: a local stat is cheaper than keeping a listing."""

    # ------------------------------------------------------------ writing

    def mkdir(self, loc: Location) -> None:
        with self.guard("create the folder", loc):
            os.makedirs(loc.uri, exist_ok=True)

    def check_writable(self, loc: Location) -> None:
        """Fail now, naming the folder, if files cannot be created in it (a read-only mount, a full disk)."""
        with self.guard("write in the folder", loc):
            folder = loc.uri
            while not os.path.isdir(folder):  # its nearest existing ancestor: nothing is created before it is needed
                folder = os.path.dirname(folder)
            fd, probe = tempfile.mkstemp(prefix=".soma-manifest-probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)

    def write_atomic(self, loc: Location, data: bytes, *, backup: Location | None = None) -> None:
        """A temp file beside it, fsynced, renamed over it; the previous version hard-linked to `backup` first."""
        folder = os.path.dirname(loc.uri)
        with self.guard("write", loc):
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

    def put_file(self, local_path: str, loc: Location) -> None:
        """fsync and rename into place (so `local_path` must be on the same filesystem: see `staging`)."""
        with self.guard("write", loc):
            os.makedirs(os.path.dirname(loc.uri), exist_ok=True)
            with open(local_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(local_path, loc.uri)

    @contextmanager
    def staging(self, loc: Location) -> Iterator[str]:
        """A temp name beside the file, so that `put_file` is a rename (sweep.py knows the name)."""
        folder = os.path.dirname(loc.uri)
        self.mkdir(Location(folder))
        tmp = os.path.join(folder, f".{loc.name}.{os.getpid()}.tmp")
        try:
            yield tmp
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def create_exclusive(self, loc: Location, data: bytes) -> bool:
        """Written in full to a temp file, then hard-linked into place: link refuses an existing name."""
        folder = os.path.dirname(loc.uri)
        tmp = os.path.join(folder, f".{loc.name}.{uuid.uuid4().hex}.tmp")
        with self.guard("create", loc):
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

    def replace_if(self, loc: Location, data: bytes, version: str) -> str | None:
        """The file is moved aside atomically, checked, and the new one linked into place; if it changed
        hands meanwhile it is put back."""
        aside = f"{loc.uri}.stale-{uuid.uuid4().hex}"
        with self.guard("replace", loc):
            try:
                os.replace(loc.uri, aside)
            except FileNotFoundError:
                return None
            try:
                with open(aside, "rb") as fh:
                    current = _digest(fh.read())
                if current != version:
                    try:
                        os.link(aside, loc.uri)
                    except FileExistsError:
                        pass
                    return None
            finally:
                os.unlink(aside)
            if not self.create_exclusive(loc, data):
                return None
            return _digest(data)

    def delete(self, loc: Location) -> None:
        with self.guard("delete", loc):
            try:
                os.unlink(loc.uri)
            except FileNotFoundError:
                pass

    def delete_tree(self, loc: Location) -> None:
        with self.guard("delete", loc):
            shutil.rmtree(loc.uri, ignore_errors=True)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

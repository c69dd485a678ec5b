"""One apply at a time per atlas: an exclusive lock file (or object) that names its holder.

The lock is a lease. It is created with a conditional write (storage.create_exclusive). On the
local disk a dead holder on this host is seen by its pid and taken over at once. On an object
store a holder's death cannot be seen, so the lock carries an expiry that the running apply
renews from a background thread; another apply takes it over only once it has expired (or at
once when the holder was on this host and its process is gone). `unlock` removes it deliberately.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import psutil

from soma_manifest import storage
from soma_manifest.errors import LockError
from soma_manifest.state import now
from soma_manifest.storage import Location, StoreSettings

#: How long a lease on an object store lasts without renewal; the holder renews it every third of that.
LEASE_SECONDS = 60.0
P = TypeVar("P", Path, Location)


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str
    command: str
    process_created: float  # guards against a recycled pid
    # A fresh id per acquisition: the lease identity that steps check before writing (see Lease.is_current).
    epoch: str = ""
    expires: float = 0.0  # unix time the lease ends unless renewed; 0: no expiry (local disk)

    def describe(self) -> str:
        until = (f", lease until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.expires))}"
                 if self.expires else "")
        return f"pid {self.pid} on {self.host}, since {self.started}{until}: {self.command}"

    def payload(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def lock_path(state_path: P) -> P:
    return state_path.with_name(state_path.name + ".lock")


def _me(path: Location) -> Holder:
    # Where a dead holder cannot be seen, only an expiry ends its hold.
    expires = 0.0 if storage.store_for(path).sees_dead_holders else time.time() + LEASE_SECONDS
    return Holder(os.getpid(), socket.gethostname(), now(), " ".join(sys.argv) or "python",
                  psutil.Process().create_time(), uuid.uuid4().hex, expires)


def _read(path: Location) -> tuple[Holder, str] | None:
    got = storage.read_versioned(path)
    if got is None:
        return None
    data, version = got
    try:
        return Holder(**json.loads(data)), version
    except (ValueError, TypeError):
        # Locks are never half-written (conditional whole writes): this one is damaged. Its holder is gone.
        return Holder(0, socket.gethostname(), "?", "unknown (unreadable lock file)", 0.0), version


def read_holder(path: Path | Location) -> Holder | None:
    got = _read(Location(path))
    return got[0] if got else None


def _is_alive(holder: Holder) -> bool:
    if holder.host == socket.gethostname():
        try:
            proc = psutil.Process(holder.pid)
            return abs(proc.create_time() - holder.process_created) < 1.0
        except (psutil.NoSuchProcess, ValueError):
            return False
    if holder.expires:
        return holder.expires > time.time()
    return True  # another host, no lease: cannot tell from here; only `unlock` may remove it


class AtlasLock:
    """`with AtlasLock(path):` holds the lock; a dead holder (or an expired lease) is taken over."""

    def __init__(self, path: Path | Location) -> None:
        self.path = Location(path)
        self.epoch = ""  # set once held
        self._created: list[Path] = []  # folders made for the lock, removed again if the run left them empty
        self._version = ""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def lease(self) -> "Lease":
        """What a step needs to check that this apply still holds the atlas (small and picklable)."""
        return Lease(str(self.path), self.epoch, storage.settings())

    def __enter__(self) -> "AtlasLock":
        if storage.store_for(self.path).local_paths:
            folder = Path(self.path.uri).parent
            self._created = [p for p in (folder, *folder.parents) if not p.exists()]
        for _ in range(3):
            me = _me(self.path)
            if storage.create_exclusive(self.path, me.payload()):
                return self._held(me, storage.read_versioned(self.path))
            found = _read(self.path)
            if found is None:
                continue
            holder, version = found
            if _is_alive(holder):
                raise LockError(f"the atlas is locked by {holder.describe()}", where=self.path,
                                hint="wait for that apply to finish; if it is gone, run `soma-manifest unlock`")
            # Conditional on the version read: of two applies taking over at once, one wins.
            new_version = storage.replace_if(self.path, me.payload(), version)
            if new_version is not None:
                return self._held(me, (me.payload(), new_version))
        raise LockError("could not take the lock (it changed hands repeatedly)", where=self.path)

    def _held(self, me: Holder, current: tuple[bytes, str] | None) -> "AtlasLock":
        self.epoch = me.epoch
        self._version = current[1] if current else ""
        if me.expires:
            self._renewer = threading.Thread(target=self._renew, args=(me,), name="soma-manifest-lease", daemon=True)
            self._renewer.start()
        return self

    def _renew(self, me: Holder) -> None:
        """Push the lease's expiry forward while the apply runs; stop if it was taken over or unlocked."""
        while not self._stop.wait(LEASE_SECONDS / 3):
            renewed = replace(me, expires=time.time() + LEASE_SECONDS)
            try:
                version = storage.replace_if(self.path, renewed.payload(), self._version)
            except Exception:  # noqa: BLE001 - a failed renewal is retried; the lease shows the outcome
                continue
            if version is None:
                return  # lost: Lease.is_current() now says so to every step
            self._version = version

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        holder = read_holder(self.path)
        if holder is not None and holder.epoch == self.epoch:
            storage.delete(self.path)
        # A refused apply leaves no empty folder behind (rmdir refuses a folder that holds anything).
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break


@dataclass(frozen=True)
class Lease:
    """An apply's hold on the atlas, as steps see it: the lock's location and the holder's epoch
    (plus the object-store settings needed to read the lock; never credentials)."""

    lock: str
    epoch: str
    store: StoreSettings | None = None

    def is_current(self) -> bool:
        """Whether the lock still names this epoch: false once the apply ended, was unlocked or taken over.
        One small read of the lock file or object."""
        if self.store is not None:
            storage.configure(self.store)
        holder = read_holder(Location(self.lock))
        return holder is not None and holder.epoch == self.epoch


def force_unlock(path: Path | Location) -> Holder | None:
    """Remove the lock whoever holds it; returns who held it."""
    holder = read_holder(path)
    storage.delete(Location(path))
    return holder

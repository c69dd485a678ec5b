"""One apply at a time per atlas: an exclusive lock file that names its holder."""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from soma_manifest.errors import LockError
from soma_manifest.state import now


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str
    command: str
    process_created: float  # guards against a recycled pid
    # A fresh id per acquisition: the lease identity that steps check before writing (see lease_is_current).
    epoch: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started}: {self.command}"


def lock_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + ".lock")


def _me() -> Holder:
    return Holder(os.getpid(), socket.gethostname(), now(), " ".join(sys.argv) or "python",
                  psutil.Process().create_time(), uuid.uuid4().hex)


def read_holder(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # Locks are never half-written (see _try_create): this one is damaged. Treat its holder as gone.
        return Holder(0, socket.gethostname(), "?", "unknown (unreadable lock file)", 0.0)


def _is_alive(holder: Holder) -> bool:
    if holder.host != socket.gethostname():
        return True  # cannot tell from here; only `unlock` may remove it
    try:
        proc = psutil.Process(holder.pid)
        return abs(proc.create_time() - holder.process_created) < 1.0
    except (psutil.NoSuchProcess, ValueError):
        return False


class AtlasLock:
    """`with AtlasLock(path):` holds the lock; a dead holder on this host is taken over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.epoch = ""  # set once held
        self._created: list[Path] = []  # folders made for the lock, removed again if the run left them empty

    @property
    def lease(self) -> "Lease":
        """What a step needs to check that this apply still holds the atlas (small and picklable)."""
        return Lease(str(self.path), self.epoch)

    def __enter__(self) -> "AtlasLock":
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._created = missing
        for _ in range(3):
            if self._try_create():
                return self
            holder = read_holder(self.path)
            if holder is None:
                continue
            if _is_alive(holder):
                raise LockError(f"the atlas is locked by {holder.describe()}", where=self.path,
                                hint="wait for that apply to finish; if it is gone, run `soma-manifest unlock`")
            self._take_over(holder)
        raise LockError("could not take the lock (it changed hands repeatedly)", where=self.path)

    def _try_create(self) -> bool:
        # Written in full under a temporary name, then hard-linked into place (which fails if the lock
        # exists): another apply never reads a half-written lock and mistakes its live holder for dead.
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "w") as fh:
                json.dump(asdict(_me()), fh)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            self.epoch = json.loads(tmp.read_text())["epoch"]
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, dead: Holder) -> None:
        # Rename is atomic, but another process may have taken over and locked in between:
        # if what we moved aside is not the dead holder's file, put it back.
        stale = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.replace(self.path, stale)
        except FileNotFoundError:
            return
        if read_holder(stale) != dead:
            try:
                os.link(stale, self.path)
            except FileExistsError:
                pass
        os.unlink(stale)

    def __exit__(self, *exc: object) -> None:
        holder = read_holder(self.path)
        if holder is not None and holder.pid == os.getpid():
            self.path.unlink(missing_ok=True)
        # A refused apply leaves no empty folder behind (rmdir refuses a folder that holds anything).
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break


@dataclass(frozen=True)
class Lease:
    """An apply's hold on the atlas, as steps see it: the lock's location and the holder's epoch."""

    lock: str
    epoch: str

    def is_current(self) -> bool:
        """Whether the lock still names this epoch: false once the apply ended, was unlocked or taken over."""
        holder = read_holder(Path(self.lock))
        return holder is not None and holder.epoch == self.epoch


def force_unlock(path: Path) -> Holder | None:
    """Remove the lock whoever holds it; returns who held it."""
    holder = read_holder(path)
    path.unlink(missing_ok=True)
    return holder

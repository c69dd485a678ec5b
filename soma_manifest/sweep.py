"""Leftovers of killed runs: the temp files and scratch folders that soma-manifest itself writes.

The next apply sweeps them once it holds the lock, so no other apply of this atlas is writing them. Only our
own names are matched, only in the folders we write to: the state's (state and lock temps), the atlas
storage (`.<atlas>.creating-*` scratch folders) and the h5ad folder's study folders (h5ad temps). A saved
plan's temp file is not swept: the next `plan --out` of that file reuses its name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from soma_manifest import storage
from soma_manifest.manifest import LoadedManifest

log = logging.getLogger("soma_manifest")
#: Another apply may be between writing its lock temp file and linking it in; older ones are leftovers.
LOCK_TEMP_AGE_SECONDS = 60.0


def leftovers(manifest: LoadedManifest, lock: Path) -> list[Path]:
    """Our temp files and scratch folders left by killed runs (see the module docstring)."""
    state = manifest.state_path
    patterns = [
        (state.parent, re.compile(rf"\.{re.escape(state.name)}\.[^.]+\.tmp(\.prev)?"), 0.0),  # save_state
        (lock.parent, re.compile(rf"\.{re.escape(lock.name)}\.[0-9a-f]{{32}}\.tmp"), LOCK_TEMP_AGE_SECONDS),
        (lock.parent, re.compile(rf"{re.escape(lock.name)}\.stale-[0-9a-f]{{32}}"), LOCK_TEMP_AGE_SECONDS),
        (manifest.atlas_uri.parent, re.compile(rf"\.{re.escape(manifest.name)}\.creating-.+"), 0.0),  # create_atlas
    ]
    h5ad_temp = re.compile(r"\..+\.h5ad\.\d+\.tmp")  # convert's atomic write
    patterns += [(folder, h5ad_temp, 0.0) for folder in _subfolders(manifest.h5ad)]
    now = time.time()
    found = []
    for folder, pattern, min_age in patterns:
        for entry in _entries(folder):
            if pattern.fullmatch(entry.name) and now - entry.stat(follow_symlinks=False).st_mtime >= min_age:
                found.append(Path(entry.path))
    return sorted(set(found))


def sweep_leftovers(manifest: LoadedManifest, lock: Path) -> list[Path]:
    """Remove the leftovers of killed runs; call it only while holding `lock`. Returns what was removed."""
    removed = []
    for path in leftovers(manifest, lock):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:  # a leftover we cannot remove stays; it harms nothing
            log.warning("could not remove the leftover %s: %s", path, exc.strerror)
            continue
        log.info("removed %s, left by an interrupted run", path)
        removed.append(path)
    return removed


def _entries(folder: Path) -> list[os.DirEntry]:
    if not storage.store_for(folder).local_paths:
        return []  # an object store has no temp files of ours: its writes are whole-object PUTs
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:  # absent or unreadable: nothing of ours to sweep there
        return []


def _subfolders(folder: Path) -> list[Path]:
    return [Path(e.path) for e in _entries(folder) if e.is_dir(follow_symlinks=False)]

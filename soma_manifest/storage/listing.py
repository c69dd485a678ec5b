"""Listing snapshots: inside `snapshot()`, a prefetched prefix answers lookups from one listing.

A networked store records each prefetched prefix here (every object under it with its Stat) and looks here
before asking the service; a plan then costs one listing per study instead of a request per file.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from soma_manifest.storage.location import Location
from soma_manifest.storage.protocol import Stat

#: Within `snapshot()`: every prefetched prefix, folder and object URI -> its listing (name -> subtree) or Stat.
_snapshot: dict[str, dict | Stat] | None = None
_roots: list[str] = []


@contextmanager
def snapshot() -> Iterator[None]:
    """Within the block, prefetched prefixes answer listings and stats from one listing each."""
    global _snapshot, _roots
    outer = (_snapshot, _roots)
    if _snapshot is None:
        _snapshot, _roots = {}, []
    try:
        yield
    finally:
        _snapshot, _roots = outer


def active() -> bool:
    """Whether a snapshot is open and would keep a prefetched listing."""
    return _snapshot is not None


def record(root: Location, found: Mapping[str, Stat]) -> None:
    """Keep the listing of `root`: every object under it (by its path relative to `root`) and its Stat."""
    if _snapshot is None:
        return
    _roots.append(root.uri)
    for name, stat in found.items():
        folder = root.uri
        for part in name.split("/")[:-1]:
            listing = _snapshot.setdefault(folder, {})
            folder = f"{folder}/{part}"
            if isinstance(listing, dict):
                listing.setdefault(part, {})
        listing = _snapshot.setdefault(folder, {})
        if isinstance(listing, dict):
            listing[name.rsplit("/", 1)[-1]] = True
        _snapshot[f"{root.uri}/{name}"] = stat


def covers(loc: Location) -> bool:
    """Whether `loc` lies under a prefetched prefix: then what the snapshot lacks is not there."""
    return bool(_roots) and any(loc.uri == r or loc.uri.startswith(r + "/") for r in _roots)


def lookup(loc: Location) -> dict | Stat | None:
    """What the snapshot knows at `loc`: a folder's listing (name -> subtree or Stat), an object's Stat, or None."""
    if not _snapshot:
        return None
    found = _snapshot.get(loc.uri)
    if isinstance(found, dict):
        return {name: _snapshot.get(f"{loc.uri}/{name}", {}) for name in found}
    return found

"""The arrays' fragments, for compaction (see docs/operations.md): finding every array, counting its
fragments and deletes from TileDB's folders, consolidating it."""

from __future__ import annotations

import tiledbsoma as soma

from soma_manifest import storage
from soma_manifest.atlas import engine
from soma_manifest.atlas.layout import open_experiment
from soma_manifest.errors import AtlasError

_ARRAY_TYPES = (soma.DataFrame, soma.SparseNDArray, soma.DenseNDArray)


def array_uris(uri: str) -> dict[str, str]:
    """Every array of the experiment, found by walking it: its path inside the experiment -> its URI."""
    found: dict[str, str] = {}

    def walk(collection: soma.Collection, prefix: str) -> None:
        for key, member in collection.items():
            if isinstance(member, _ARRAY_TYPES):
                found[prefix + key] = member.uri
            else:
                walk(member, f"{prefix}{key}/")

    with open_experiment(uri) as exp:
        walk(exp, "")
    return found


def _array_listing(array_uri: str, sub: str) -> dict[str, bool]:
    """Names in one of TileDB's folders of the array (__fragments: a folder per fragment; __commits: a file per
    write or delete) -> whether each is a folder; local or s3:// alike."""
    if array_uri.startswith("file://"):
        array_uri = array_uri[len("file://"):]
    return storage.listdir(storage.Location(array_uri) / sub) or {}


def fragment_count(array_uri: str) -> int:
    """Fragment folders of the array, including consolidated ones a killed vacuum left behind."""
    return sum(1 for is_dir in _array_listing(array_uri, "__fragments").values() if is_dir)


def delete_timestamps(array_uri: str) -> list[int]:
    """The timestamps (ms) of the array's deletes, from their commit files `__<t1>_<t2>_<uuid>_<v>.del`."""
    names = [name for name in _array_listing(array_uri, "__commits") if name.endswith(".del")]
    return sorted(int(name.lstrip("_").split("_")[1]) for name in names)


def columns_dropped_since(array_uri: str, timestamp: int) -> list[str]:
    """The columns a DataFrame had at `timestamp` (ms) and no longer has (schema evolution); [] for other arrays
    or one created after it."""
    try:
        with soma.open(array_uri, tiledb_timestamp=timestamp, context=engine.ctx()) as then:
            if not isinstance(then, soma.DataFrame):
                return []
            before = set(then.schema.names)
        with soma.open(array_uri, context=engine.ctx()) as now:
            return sorted(before - set(now.schema.names))
    except soma.SOMAError:
        return []


def consolidate_array(array_uri: str, *, purge: bool) -> None:
    """Consolidate all fragments of one array into one, then vacuum the merged ones.

    The consolidated fragment keeps every cell's timestamp, so the array still reads exactly at any
    earlier timestamp, except that `purge` drops the cells of every delete (see docs/operations.md).
    """
    try:
        engine.consolidate_and_vacuum(array_uri, purge=purge)
    except soma.SOMAError as exc:
        raise AtlasError(f"consolidation failed: {exc}", where=array_uri, hint="run compact again") from None

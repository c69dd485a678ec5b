"""The storage engine: every use of tiledbsoma's private API, and the TileDB settings the atlas is made
and written with. Moving the pinned tiledbsoma (pyproject.toml) means reviewing this module.

The other modules of the package use tiledbsoma's public API only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

import pyarrow as pa
import tiledbsoma as soma
import tiledbsoma.pytiledbsoma as clib
from tiledbsoma._read_iters import ArrowTableRead

from soma_manifest import storage
from soma_manifest.errors import AtlasError

#: soma_dim_1 tile extent of cell-optimized X layers. With the whole gene axis in one tile,
#: TileDB's global order is simply (row, column), so CSR chunks can be written without a sort.
VAR_TILE = 1 << 20
#: Gene-optimized layers: one gene per tile, tiles and cells in column-major order, so the
#: global order is (column, row) and CSC chunks are written without a sort. One gene's cells
#: are then contiguous on disk; the smaller data tiles (capacity) cut what a one-gene read
#: decodes (see bench/README.md, "X layouts").
_GENE_TILE_CAPACITY = 25_000
#: The platform_config an X layer is created with, by its `optimize`.
X_CREATE: dict[str, dict] = {
    "cells": {"tiledb": {"create": {"dims": {"soma_dim_1": {"tile": VAR_TILE}}}}},
    "genes": {"tiledb": {"create": {"capacity": _GENE_TILE_CAPACITY, "dims": {"soma_dim_1": {"tile": 1}},
                                    "tile_order": "col-major", "cell_order": "col-major"}}},
}
#: The platform_config of an X chunk write: chunks come in global order, which skips TileDB's sort (4-5x faster).
GLOBAL_ORDER = {"tiledb": {"write": {"sort_coords": False}}}


#: TileDB 2.30 (in tiledbsoma 2.3.0) crashed with SIGSEGV in the sparse global-order reader's tile-merge
#: preprocessing (ParallelMerge, in ~MergeUnit, on a thread of its pool): a core dump of a `verify --deep`
#: process, counting X entries right after an apply with deletes and a compaction. Unordered reads of
#: arrays without duplicates (all of ours) use that reader. 0 turns the preprocessing off; it only
#: reorders how tiles are loaded, never what a read returns.
READER_SETTINGS = {"sm.query.sparse_global_order.preprocess_tile_merge": "0"}

#: For global-order writes whose chunks the writer has checked itself (chunks.read_chunk: column bounds, and
#: scipy's canonical-format test: columns strictly ascending within each row, so ordered and without
#: duplicates; domains.check_room bounds both dimensions first). TileDB's own checks of the same are passes
#: over every entry: 0.5 s of a 1.3 s, 8.7M-entry X write (bench/write_checks.py; bench/README.md, "Stop 17").
TRUSTED_ORDER = {"sm.check_global_order": "false", "sm.check_coord_dups": "false", "sm.check_coord_oob": "false"}

_contexts: dict[tuple[tuple[str, str], ...], soma.SOMATileDBContext] = {}
_contexts_lock = threading.Lock()


def tiledb_config() -> dict[str, str]:
    """The TileDB settings every context of the tool has: READER_SETTINGS and the configured store's VFS
    settings (storage.tiledb_vfs_config)."""
    return {**READER_SETTINGS, **storage.tiledb_vfs_config()}


def context(settings: Mapping[str, str] | None = None) -> soma.SOMATileDBContext:
    """The SOMATileDBContext for the configured store (plus `settings`), one per process and settings; passed to
    every open."""
    config = {**tiledb_config(), **(settings or {})}
    key = tuple(sorted(config.items()))
    with _contexts_lock:
        found = _contexts.get(key)
        if found is None:
            found = _contexts[key] = soma.SOMATileDBContext(tiledb_config=config)
        return found


def ctx() -> soma.SOMATileDBContext:
    """The context of every open but X writes (`context()`)."""
    return context()


def x_writer_ctx() -> soma.SOMATileDBContext:
    """The context the X layers are opened with for ingest's global-order chunks: without TileDB's write-time
    checks (TRUSTED_ORDER), which the ingest's chunk builder (chunks.read_chunk) and domains.check_room make
    instead."""
    return context(TRUSTED_ORDER)


def fragment_cells(array_uri: str, end: int) -> int:
    """Cells of the array's fragments written up to timestamp `end` (ms), from their fragment metadata (which
    every open loads anyway): tiledbsoma's native array handle, as its Python classes do not expose the count."""
    handle = clib.SOMAArray.open(array_uri, clib.OpenMode.soma_read, ctx().native_context, timestamp=(0, end))
    try:
        return handle.fragment_cell_count()
    finally:
        handle.close()


def dim0_tables(x: soma.SparseNDArray, rows: slice) -> Iterator[pa.Table]:
    """The soma_dim_0 column of these rows' entries, in no order. SparseNDArray.read has no column selection;
    its reader class (private) has, and soma_dim_0 alone is 40% of the bytes to decode."""
    return iter(ArrowTableRead(x, (rows,), ["soma_dim_0"], clib.ResultOrder.unordered, None, None))


def consolidate_and_vacuum(array_uri: str, *, purge: bool) -> None:
    """Consolidate all fragments of one array into one, then vacuum the merged ones; `purge` drops the cells of
    every delete. Uses tiledbsoma's own (private) array handle: the same TileDB core that reads and writes the
    atlas. Raises soma.SOMAError when TileDB fails."""
    config = {**tiledb_config(), "sm.consolidation.mode": "fragments", "sm.vacuum.mode": "fragments",
              "sm.consolidation.purge_deleted_cells": "true" if purge else "false"}
    with soma.open(array_uri, context=soma.SOMATileDBContext(tiledb_config=config)) as array:
        consolidate = getattr(getattr(array, "_handle", None), "consolidate_and_vacuum", None)
        if consolidate is None:
            raise AtlasError(f"tiledbsoma {soma.__version__} cannot consolidate arrays (its array handle has no "
                             "consolidate_and_vacuum)", where=array_uri,
                             hint="use the tiledbsoma version soma-manifest is tested with (pyproject.toml)")
        consolidate(["fragments"])


#: Arrow format strings of the column types the schema allows, as TileDB-SOMA's schema evolution takes them.
_ARROW_FORMAT = {"string": "U", "bool": "b", "int32": "i", "int64": "l", "float32": "f", "float64": "g"}


def evolve_dataframe(df_uri: str, *, add: Mapping[str, str], drop: list[str]) -> None:
    """Add columns (name -> schema column type) to a DataFrame and drop others, in place (TileDB schema
    evolution). The public `tiledbsoma.io.update_obs`/`update_var` do the same through this private handle
    method but also rewrite the whole DataFrame and require its joinids to be exactly [0, n), which an atlas
    with deleted samples never has. TileDB stamps the new schema with the wall clock (not the open's
    timestamp); an open at an earlier timestamp reads with the schema of that time (see README, "Changing
    the schema of an existing atlas")."""
    with soma.DataFrame.open(df_uri, "w", context=ctx()) as df:
        df._handle._update_dataframe_schema(list(drop), {name: _ARROW_FORMAT[t] for name, t in add.items()}, {})

"""The atlas: one TileDB-SOMA Experiment. The only module that imports tiledbsoma.

Layout: `obs` (index soma_joinid; `obs_id` + the schema's obs columns), `ms/<measurement>/var`
(`var_id` + the schema's var columns) and `ms/<measurement>/X/<layer>` SparseNDArrays.
The caller allocates joinids: each sample owns a contiguous obs range `[start, start+n)` and
domains are resized once, serially, before parallel ingests write disjoint ranges.

Timestamps: TileDB stamps a write with its array's open time in milliseconds. A delete at
T also hides writes stamped T (even ones made after it), and two overwrites of one row
stamped with the same T are resolved arbitrarily. Every mutation therefore runs inside
`_mutation()`, which returns only once the clock has passed its timestamp: a mutation that
starts after another one finished always gets a later timestamp.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata
import anndata.io
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
import tiledbsoma as soma
import tiledbsoma.pytiledbsoma as clib
from tiledbsoma._read_iters import ArrowTableRead

from soma_manifest import storage
from soma_manifest.errors import AtlasError, SourceError
from soma_manifest.faults import crash_point
from soma_manifest.schema import AtlasSchema, Layer

STRUCTURE_KEY = "soma_manifest.structure"
LINEAGE_KEY = "soma_manifest.lineage"
#: Set once the samples table and the feature presence matrix hold a row for every ingested sample.
PRESENCE_KEY = "soma_manifest.feature_presence"
SAMPLES = "samples"  # top-level DataFrame: one row per sample joinid
PRESENCE = "feature_presence_matrix"  # in ms/<measurement>: bool, sample joinid x var joinid

#: soma_dim_1 tile extent of cell-optimized X layers. With the whole gene axis in one tile,
#: TileDB's global order is simply (row, column), so CSR chunks can be written without a sort.
VAR_TILE = 1 << 20
#: Gene-optimized layers: one gene per tile, tiles and cells in column-major order, so the
#: global order is (column, row) and CSC chunks are written without a sort. One gene's cells
#: are then contiguous on disk; the smaller data tiles (capacity) cut what a one-gene read
#: decodes (see bench/README.md, "X layouts").
_GENE_TILE_CAPACITY = 25_000
_X_CREATE: dict[str, dict] = {
    "cells": {"tiledb": {"create": {"dims": {"soma_dim_1": {"tile": VAR_TILE}}}}},
    "genes": {"tiledb": {"create": {"capacity": _GENE_TILE_CAPACITY, "dims": {"soma_dim_1": {"tile": 1}},
                                    "tile_order": "col-major", "cell_order": "col-major"}}},
}
# Chunks are written in global order: skips TileDB's sort (4-5x faster).
_GLOBAL_ORDER = {"tiledb": {"write": {"sort_coords": False}}}

_ARROW = {
    "string": pa.large_string(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
}


@dataclass(frozen=True)
class IngestStats:
    cells: int
    nnz: int
    stamp: int  # the TileDB timestamp its obs and X fragments were written at


@dataclass(frozen=True)
class RangeStats:
    start: int
    stop: int
    cells: int
    obs_ids: int  # distinct obs_ids in the range
    nnz: int  # entries of the counts layer


@dataclass(frozen=True)
class Overview:
    cells: int
    genes: int
    layers: tuple[str, ...]
    samples: dict[tuple[str, str], int]  # (study_name, sample_name) -> cells


@dataclass(frozen=True)
class _Members:
    """URIs of the arrays of one atlas."""

    obs: str
    var: str
    layers: dict[str, str]


# ---------------------------------------------------------------- create and inspect


def _ctx() -> soma.SOMATileDBContext:
    """The TileDB context of the configured store (S3 endpoint and region, storage.READER_SETTINGS); passed to
    every open."""
    return storage.tiledb_context()


def _x_writer_ctx() -> soma.SOMATileDBContext:
    """The context the X layers are opened with for ingest's global-order chunks: without TileDB's write-time
    checks (storage.TRUSTED_ORDER), which _read_chunk and _check_room make instead."""
    return storage.tiledb_context(storage.TRUSTED_ORDER)


@contextmanager
def _h5(path: str) -> Iterator[h5py.File]:
    """An intermediate h5ad for reading; one on S3 is read from a local copy.

    Not through an s3fs file object: h5py reading through one deadlocked (the garbage collector, run in
    fsspec's IO thread, freed an h5py object and waited for h5py's lock, held by the read that waited
    for that thread).
    """
    with storage.local_file(path) as local, h5py.File(local, "r") as f:
        yield f


def atlas_exists(uri: str) -> bool:
    """Whether a complete atlas is at `uri`: creation writes its lineage last, so one without is partial.

    On an object store the prefix is looked up first: tiledbsoma's `exists` answers False when it cannot
    reach the store, and an unreachable store must be one error naming it, not an atlas to create.
    """
    loc = storage.Location(uri)
    if loc.is_remote and not storage.exists(loc):
        return False
    return soma.Experiment.exists(uri, context=_ctx()) and read_lineage(uri) is not None


def create_atlas(uri: str, schema: AtlasSchema, lineage: str) -> None:
    """Create the empty atlas, tied to the state's lineage; all or nothing for a reader and the next apply.

    Locally it is built in a hidden sibling, then renamed. Object stores have no rename: it is built in
    place and its metadata (structure, lineage) is written last; until then `atlas_exists` and the plan
    see no atlas, and the next apply removes the partial one and builds again.
    """
    if atlas_exists(uri):
        raise AtlasError("an atlas already exists here", where=uri, hint="point the manifest at another path")
    if storage.is_object_store(storage.Location(uri)):
        storage.delete_tree(storage.Location(uri))
        _build_experiment(uri, schema, lineage)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.creating-"))
    try:
        built = scratch / "atlas"
        _build_experiment(str(built), schema, lineage)
        # Members are stored with relative URIs, so the renamed experiment opens in place.
        os.replace(built, target)
    except OSError as exc:
        raise AtlasError(f"cannot create the atlas: {exc.strerror}", where=uri,
                         hint="the path must not exist or be an empty folder") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build_experiment(uri: str, schema: AtlasSchema, lineage: str) -> None:
    """Every array exists before any ingest: a writer that created one would race the others."""
    with soma.Experiment.create(uri, context=_ctx()) as exp:
        exp.add_new_dataframe("obs", schema=_obs_schema(schema), domain=((0, 0),))
        ms = exp.add_new_collection("ms")
        rna = ms.add_new_collection(schema.measurement, soma.Measurement)
        rna.add_new_dataframe("var", schema=_var_schema(schema), domain=((0, 0),))
        x = rna.add_new_collection("X")
        for layer in schema.layers:
            # Shapes start at 1 (the minimum); resize_obs and extend_var grow them.
            x.add_new_sparse_ndarray(layer.name, type=_ARROW[layer.type], shape=(1, 1),
                                     platform_config=_X_CREATE[layer.optimize])
        _add_sample_arrays(exp, rna)
    with soma.Experiment.open(uri, "w", context=_ctx()) as exp:  # last: marks the atlas complete
        exp.metadata[STRUCTURE_KEY] = schema.structure
        exp.metadata[LINEAGE_KEY] = lineage
        exp.metadata[PRESENCE_KEY] = "1"


def _add_sample_arrays(exp: soma.Experiment, ms: soma.Measurement) -> None:
    """The samples table and the feature presence matrix, where missing (atlases made before them lack them)."""
    if SAMPLES not in exp:
        exp.add_new_dataframe(SAMPLES, schema=_SAMPLES_SCHEMA, domain=((0, 0),))
    if PRESENCE not in ms:
        ms.add_new_sparse_ndarray(PRESENCE, type=pa.bool_(), shape=(1, 1))


_SAMPLES_SCHEMA = pa.schema([
    ("soma_joinid", pa.int64()), ("sample_id", pa.large_string()), ("study", pa.large_string()),
    ("sample", pa.large_string()), ("cells", pa.int64()), ("obs_joinid_start", pa.int64()),
    ("obs_joinid_stop", pa.int64()), ("n_measured_genes", pa.int64()),
])


def _obs_schema(schema: AtlasSchema) -> pa.Schema:
    return pa.schema([("soma_joinid", pa.int64()), ("obs_id", pa.large_string()),
                      *((c.name, _ARROW[c.type]) for c in schema.obs)])


def _var_schema(schema: AtlasSchema) -> pa.Schema:
    return pa.schema([("soma_joinid", pa.int64()), ("var_id", pa.large_string()),
                      *((c.name, _ARROW[c.type]) for c in schema.var)])


def read_structure(uri: str) -> str | None:
    with open_experiment(uri) as exp:
        return exp.metadata.get(STRUCTURE_KEY)


def read_lineage(uri: str) -> str | None:
    """The lineage of the state file the atlas was created with."""
    with open_experiment(uri) as exp:
        return exp.metadata.get(LINEAGE_KEY)


def column_names(uri: str, schema: AtlasSchema) -> tuple[list[str], list[str], list[str]]:
    """obs column names, var column names and X layer names as they are on disk."""
    with open_experiment(uri) as exp:
        ms = exp.ms[schema.measurement] if schema.measurement in exp.ms else None
        var = list(ms.var.schema.names) if ms is not None else []
        layers = list(ms.X.keys()) if ms is not None and "X" in ms else []
        return list(exp.obs.schema.names), var, layers


def read_h5ad_var(path: str, schema: AtlasSchema) -> pd.DataFrame:
    """The genes of an intermediate h5ad (index var_id, the schema's var columns), without X."""
    try:
        with _h5(path) as f:
            var = anndata.io.read_elem(f["var"])
    except (OSError, KeyError) as exc:
        raise SourceError(f"unreadable intermediate h5ad: {exc}", where=path, hint="re-run the convert step") from None
    return var_rows(var, schema)


def var_rows(var: pd.DataFrame, schema: AtlasSchema) -> pd.DataFrame:
    """A sample's var as the atlas' var rows: index var_id, the schema's var columns."""
    var = var[[c.name for c in schema.var]].astype(object)
    var.index.name = "var_id"
    return var


def open_experiment(uri: str, timestamp: int | None = None) -> soma.Experiment:
    """The experiment, read-only; with `timestamp` (ms), as it was at that moment (TileDB time travel)."""
    try:
        return soma.Experiment.open(uri, tiledb_timestamp=timestamp, context=_ctx())
    except soma.DoesNotExistError:
        raise AtlasError("no atlas here", where=uri, hint="run apply to create it") from None


def _members(uri: str, schema: AtlasSchema) -> _Members:
    return _members_of(uri, schema.measurement, tuple(layer.name for layer in schema.layers))


@functools.lru_cache(maxsize=64)
def _members_of(uri: str, measurement: str, layers: tuple[str, ...]) -> _Members:
    # Cached: opening the experiment took 10-40 ms, several times per ingest. Member URIs never change
    # for an atlas URI (an atlas rebuilt there names its members the same way); a failure is not cached.
    with open_experiment(uri) as exp:
        try:
            ms = exp.ms[measurement]
            return _Members(obs=exp.obs.uri, var=ms.var.uri, layers={name: ms.X[name].uri for name in layers})
        except KeyError as exc:
            raise AtlasError(f"the atlas has no {exc}", where=uri,
                             hint="it was created with another schema structure") from None


# ---------------------------------------------------------------- timestamps


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@contextmanager
def _mutation() -> Iterator[int]:
    """The timestamp to open arrays at for one mutation; on exit, wait until the clock passes it."""
    stamp = _now_ms()
    yield stamp
    while _now_ms() <= stamp:
        time.sleep(0.0005)


def settled_timestamp() -> int:
    """A timestamp after every mutation finished so far and before any started from now on: opening the
    atlas at it reads exactly what has been written up to now (the apply history records it)."""
    with _mutation() as stamp:
        pass
    return stamp


# ---------------------------------------------------------------- var and domains


@dataclass
class Room:
    """What the atlas' domains hold now. apply allocates within it while ingests run: growing a domain
    writes a new array schema, which a worker opening that array at the same moment may read empty."""

    cells: int  # obs and every X layer's dim 0
    samples: int  # the samples table and the presence matrix's dim 0
    genes: set[str]  # var ids in var


def room(uri: str, schema: AtlasSchema) -> Room:
    members = _members(uri, schema)
    samples_uri, presence_uri = _sample_members(uri, schema)
    with soma.DataFrame.open(members.obs, context=_ctx()) as obs, \
            soma.DataFrame.open(members.var, context=_ctx()) as var, \
            soma.DataFrame.open(samples_uri, context=_ctx()) as table, \
            soma.SparseNDArray.open(presence_uri, context=_ctx()) as presence:
        cells = [_df_size(obs)]
        for layer_uri in members.layers.values():
            with soma.SparseNDArray.open(layer_uri, context=_ctx()) as x:
                cells.append(x.shape[0])
        return Room(cells=min(cells), samples=min(_df_size(table), presence.shape[0]),
                    genes=set(_var_ids(var).index))


def read_var_ids(uri: str, schema: AtlasSchema) -> pd.Series:
    """var_id -> soma_joinid (int64)."""
    with soma.DataFrame.open(_members(uri, schema).var, context=_ctx()) as var:
        return _var_ids(var)


def _var_ids(var: soma.DataFrame) -> pd.Series:
    table = var.read(column_names=["soma_joinid", "var_id"]).concat()
    return pd.Series(table["soma_joinid"].to_numpy(), index=pd.Index(table["var_id"].to_numpy(), name="var_id"),
                     name="soma_joinid", dtype="int64")


def extend_var(uri: str, schema: AtlasSchema, genes: pd.DataFrame) -> int:
    """Append the genes not yet in var (in the given order); grow var and X to fit. Returns the var count."""
    if genes.index.has_duplicates:
        raise AtlasError("duplicate gene ids in the genes to add", where=uri)
    members = _members(uri, schema)
    with soma.DataFrame.open(members.var, context=_ctx()) as var:
        known = _var_ids(var)
    new = genes.loc[~genes.index.isin(known.index), [c.name for c in schema.var]]
    first = int(known.max()) + 1 if len(known) else 0
    total = first + len(new)
    if total > VAR_TILE:
        raise AtlasError(f"{total} genes exceed the atlas' limit of {VAR_TILE}", where=uri,
                         hint="restrict genes.feature_types in the schema")
    with _mutation() as stamp:
        # Grow first: a crash then leaves room but no rows, and the re-run appends the same genes.
        _grow(members, stamp, n_obs=0, n_var=total)
        if len(new):
            table = pa.Table.from_pandas(
                new.assign(soma_joinid=np.arange(first, total, dtype=np.int64), var_id=new.index.astype(str)),
                schema=_var_schema(schema), preserve_index=False)
            with soma.DataFrame.open(members.var, "w", tiledb_timestamp=stamp, context=_ctx()) as var:
                var.write(table)
    return total


def resize_obs(uri: str, schema: AtlasSchema, n_obs: int) -> None:
    """Grow obs and every X layer's dim 0 to hold at least n_obs cells (never shrinks)."""
    with _mutation() as stamp:
        _grow(_members(uri, schema), stamp, n_obs=n_obs, n_var=0)


def _grow(members: _Members, stamp: int, *, n_obs: int, n_var: int) -> None:
    """Grow domains that are smaller than asked; the other axis is left as it is."""
    for uri, n in ((members.obs, n_obs), (members.var, n_var)):
        with soma.DataFrame.open(uri, "w", tiledb_timestamp=stamp, context=_ctx()) as df:
            if _df_size(df) < n:
                df.tiledbsoma_resize_soma_joinid_shape(n)
    for uri in members.layers.values():
        with soma.SparseNDArray.open(uri, "w", tiledb_timestamp=stamp, context=_ctx()) as x:
            shape = (max(x.shape[0], n_obs), max(x.shape[1], n_var))
            if shape != x.shape:
                x.resize(shape)


def _df_size(df: soma.DataFrame) -> int:
    """Rows the soma_joinid domain can hold."""
    return df.domain[0][1] + 1


# ---------------------------------------------------------------- ingest


@dataclass(frozen=True)
class _Sample:
    """A converted sample: obs and var in memory; X's data and indices (sliced per chunk) in memory, or
    still in its h5ad while that is open."""

    path: str  # its h5ad, for messages
    obs: pd.DataFrame
    var: pd.DataFrame
    indptr: np.ndarray
    x: Mapping[str, Any]  # "data" and "indices": numpy arrays or h5py datasets
    measured: np.ndarray | None  # positions in var of the genes it measured (None: all of them)

    @property
    def measured_genes(self) -> pd.Index:
        return self.var.index if self.measured is None else self.var.index[self.measured]


def _read_sample(f: h5py.File, path: str, schema: AtlasSchema) -> _Sample:
    """The sample of an open intermediate h5ad (X stays in the file)."""
    try:
        obs = anndata.io.read_elem(f["obs"])
        var = anndata.io.read_elem(f["var"])
        x = f["X"]
        if x.attrs.get("encoding-type") != "csr_matrix" or tuple(x.attrs["shape"]) != (len(obs), len(var)):
            raise SourceError("X is not a CSR matrix of obs x var", where=path, hint="re-run the convert step")
        indptr = x["indptr"][:]
        measured = f.get("uns/soma_manifest/measured")
        measured = measured[:] if measured is not None else None
    except (OSError, KeyError) as exc:
        raise SourceError(f"unreadable intermediate h5ad: {exc}", where=path, hint="re-run the convert step") from None
    return _checked(_Sample(path, obs, var, indptr, x, measured), schema)


def _sample_in_memory(path: str, adata: anndata.AnnData, schema: AtlasSchema) -> _Sample:
    """The sample as the worker that converted it still holds it (what it wrote to `path`)."""
    x = adata.X
    measured = adata.uns.get("soma_manifest", {}).get("measured")
    return _checked(_Sample(path, adata.obs, adata.var, x.indptr, {"data": x.data, "indices": x.indices},
                            None if measured is None else np.asarray(measured)), schema)


def _checked(sample: _Sample, schema: AtlasSchema) -> _Sample:
    expected = [c.name for c in schema.obs]
    if list(sample.obs.columns) != expected:
        raise SourceError(f"obs columns {list(sample.obs.columns)} differ from the schema's {expected}",
                          where=sample.path, hint="re-run the convert step")
    return sample


def _obs_table(sample: _Sample, schema: AtlasSchema, start: int) -> pa.Table:
    obs = sample.obs
    # anndata stores string columns as categoricals; the atlas holds them as plain strings.
    columns = {c.name: pa.array(obs[c.name].to_numpy(dtype=object if c.type == "string" else None),
                                type=_ARROW[c.type]) for c in schema.obs}
    joinids = pa.array(np.arange(start, start + len(obs), dtype=np.int64))
    return pa.table({"soma_joinid": joinids, "obs_id": pa.array(obs.index.astype(str), pa.large_string()), **columns},
                    schema=_obs_schema(schema))


def _no_fence() -> None: ...


def ingest_h5ad(uri: str, schema: AtlasSchema, h5ad: str, start: int, *, chunk_nnz: int = 5_000_000,
                fence: Callable[[], None] = _no_fence, var_ids: pd.Series | None = None) -> IngestStats:
    """Write the h5ad's cells at soma_joinids [start, start+n): obs, then every X layer (see _ingest)."""
    with _h5(h5ad) as f:
        return _ingest(uri, schema, _read_sample(f, h5ad, schema), start, chunk_nnz=chunk_nnz, fence=fence,
                       var_ids=var_ids)


def _ingest(uri: str, schema: AtlasSchema, sample: _Sample, start: int, *, chunk_nnz: int,
            fence: Callable[[], None], var_ids: pd.Series | None) -> IngestStats:
    """Write the sample's cells at soma_joinids [start, start+n): obs, then every X layer.

    Cell-optimized layers are written from row chunks, gene-optimized ones from column chunks
    of the same counts, each in its layer's global order without a sort. Derived layers are
    computed from the counts in memory, once per chunk. Safe to run concurrently on disjoint
    ranges once the caller has grown the domains.

    `fence` raises when the apply that runs this step lost the atlas; it is called once the write
    timestamp is fixed and before every X chunk. Why a write that passed it just before a takeover is still safe: every write of
    this ingest is stamped with the time taken *before* the check passed, and the apply that took over
    deletes this range (it is still "allocated" in the state) at a later time, which hides the stamped
    writes however late they land. See README, "Running on a cluster".
    """
    members = _members(uri, schema)
    columns = _column_map(uri, read_var_ids(uri, schema) if var_ids is None else var_ids, sample)
    n_var = int(columns.max()) + 1 if len(columns) else 0
    n_obs = len(sample.obs)
    stop = start + n_obs
    _check_room(uri, members, stop, n_var)
    by_cells = [layer for layer in schema.layers if layer.optimize == "cells"]
    by_genes = [layer for layer in schema.layers if layer.optimize == "genes"]
    derived = any(layer.source != "counts" for layer in schema.layers)  # needs each cell's total counts
    with _mutation() as stamp, ExitStack() as stack:
        fence()  # after the stamp is fixed: a takeover after this check deletes at a later time
        arrays = {layer.name: stack.enter_context(soma.SparseNDArray.open(members.layers[layer.name], "w",
                                                                            tiledb_timestamp=stamp,
                                                                            context=_x_writer_ctx()))
                  for layer in schema.layers}
        with soma.DataFrame.open(members.obs, "w", tiledb_timestamp=stamp, context=_ctx()) as obs:
            obs.write(_obs_table(sample, schema, start))
        crash_point("worker_ingest_after_obs")
        # Gene-optimized layers need whole genes, i.e. the whole sample: read it once for all layers.
        whole = _read_chunk(sample.x, sample.indptr, 0, n_obs, columns, n_var, sample.path) if by_genes else None
        increasing = bool(np.all(columns[1:] > columns[:-1]))
        for lo, hi in _row_chunks(sample.indptr, chunk_nnz) if by_cells else ():
            fence()
            chunk = _as_chunk(whole[lo:hi]) if whole is not None else _cells_chunk(sample, lo, hi, columns, n_var,
                                                                                   increasing)
            rows = _major_index(chunk.indptr)
            totals = _row_totals(rows, chunk.data, hi - lo)[rows] if derived else None
            rows += start + lo  # in place, as below: each copy of a 5M-entry chunk's coordinates is 40 MB
            _write_chunk(arrays, by_cells, rows, chunk.indices, chunk.data, totals)
        if whole is not None:
            totals = _row_totals(_major_index(whole.indptr), whole.data, n_obs) if derived else None
            by_column = whole.tocsc()  # of a canonical CSR: rows strictly ascending in each column, (gene, cell)
            del whole
            for lo, hi in _row_chunks(by_column.indptr, chunk_nnz):
                fence()
                a, b = int(by_column.indptr[lo]), int(by_column.indptr[hi])
                rows = by_column.indices[a:b]
                genes = _major_index(by_column.indptr[lo:hi + 1] - a)
                genes += lo
                cells = rows.astype(np.int64)
                cells += start
                _write_chunk(arrays, by_genes, cells, genes, by_column.data[a:b], totals[rows] if derived else None)
    return IngestStats(cells=n_obs, nnz=int(sample.indptr[-1]), stamp=stamp)


def _major_index(indptr: np.ndarray) -> np.ndarray:
    """The 0-based major index (row of a CSR, column of a CSC) of every stored entry."""
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))


def _row_totals(rows: np.ndarray, counts: np.ndarray, n_rows: int) -> np.ndarray:
    """Each row's sum of counts, at least 1 (only rows of explicit zeros sum to 0). Summed in
    CSR order, so every layout derives bit-identical normalized values."""
    return np.maximum(np.bincount(rows, weights=counts, minlength=n_rows), 1)


def _write_chunk(arrays: dict[str, soma.SparseNDArray], layers: list[Layer], dim0: np.ndarray, dim1: np.ndarray,
                 counts: np.ndarray, row_totals: np.ndarray | None) -> None:
    """Write one chunk (already in these layers' global order) to each layer; counts per 10k
    are computed once for all derived layers of the chunk."""
    coords = {"soma_dim_0": dim0, "soma_dim_1": dim1}
    normalized = None
    for layer in layers:
        if layer.source == "counts":
            values = counts
        else:
            if normalized is None:
                normalized = counts / row_totals * 1e4
            values = normalized if layer.source == "normalized" else np.log1p(normalized)
        arrays[layer.name].write(pa.table({**coords, "soma_data": values.astype(layer.type, copy=False)}),
                                 platform_config=_GLOBAL_ORDER)


def _column_map(uri: str, var_ids: pd.Series, sample: _Sample) -> np.ndarray:
    """The atlas var joinid of each of the sample's genes, in the sample's order."""
    joinids = var_ids.reindex(sample.var.index.astype(str))
    missing = joinids.index[joinids.isna()]
    if len(missing):
        raise AtlasError(f"{len(missing)} genes of {sample.path} are not in the atlas' var (e.g. {missing[0]})",
                         where=uri, hint="extend_var must run before ingest")
    return joinids.to_numpy(dtype=np.int64)


def _check_room(uri: str, members: _Members, stop: int, n_var: int) -> None:
    """Refuse, before writing anything, an ingest the domains cannot hold."""
    with soma.DataFrame.open(members.obs, context=_ctx()) as obs:
        small = [f"obs holds {_df_size(obs)}"] if _df_size(obs) < stop else []
    for name, layer_uri in members.layers.items():
        with soma.SparseNDArray.open(layer_uri, context=_ctx()) as x:
            if x.shape[0] < stop or x.shape[1] < n_var:
                small.append(f"X[{name}] is {x.shape[0]}x{x.shape[1]}")
    if small:
        raise AtlasError(f"the atlas is too small for cells up to {stop} and {n_var} genes: {'; '.join(small)}",
                         where=uri, hint="resize_obs and extend_var must run before ingest")


def _row_chunks(indptr: np.ndarray, chunk_nnz: int) -> Iterator[tuple[int, int]]:
    """Row ranges of at most chunk_nnz entries (a larger single row gets a chunk of its own)."""
    n_rows = len(indptr) - 1
    lo = 0
    while lo < n_rows:
        hi = int(np.searchsorted(indptr, indptr[lo] + chunk_nnz, side="right")) - 1
        hi = min(max(hi, lo + 1), n_rows)
        yield lo, hi
        lo = hi


@dataclass(frozen=True)
class _Chunk:
    """Rows of a sample in CSR form, with atlas columns as int64 (what the write takes)."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray


def _as_chunk(csr: sp.csr_matrix) -> _Chunk:
    return _Chunk(csr.indptr, csr.indices.astype(np.int64, copy=False), csr.data)


def _cells_chunk(sample: _Sample, lo: int, hi: int, columns: np.ndarray, n_var: int, increasing: bool) -> _Chunk:
    """Rows [lo, hi) with atlas columns, in TileDB's global order (see _read_chunk).

    With an `increasing` gene mapping, atlas columns are in order when the sample's own are: that is checked on
    the sample's columns, and the atlas ones are gathered straight into int64 (27-36 ms against 50 ms for
    _read_chunk and the cast, for a 6.6M-entry sample). Otherwise _read_chunk sorts them or refuses them."""
    if increasing:
        a, b, indices = _chunk_indices(sample.x, sample.indptr, lo, hi, len(columns), sample.path)
        indptr, data = sample.indptr[lo:hi + 1] - a, sample.x["data"][a:b]
        if sp.csr_matrix((data, indices, indptr), shape=(hi - lo, len(columns))).has_canonical_format:
            return _Chunk(indptr, columns[indices], data)
    return _as_chunk(_read_chunk(sample.x, sample.indptr, lo, hi, columns, n_var, sample.path))


def _chunk_indices(x: Mapping[str, Any], indptr: np.ndarray, lo: int, hi: int, n_columns: int,
                   path: str) -> tuple[int, int, np.ndarray]:
    """The entry range [a, b) of rows [lo, hi) and their column indices, refused when one is outside the sample."""
    a, b = int(indptr[lo]), int(indptr[hi])
    indices = x["indices"][a:b]
    # (numpy would take a negative index from the end of `columns`)
    if len(indices) and (indices.min() < 0 or indices.max() >= n_columns):
        raise SourceError(f"X has column indices outside its {n_columns} genes", where=path,
                          hint="re-run the convert step")
    return a, b, indices


def _read_chunk(x: Mapping[str, Any], indptr: np.ndarray, lo: int, hi: int, columns: np.ndarray,
                n_var: int, path: str) -> sp.csr_matrix:
    """Rows [lo, hi) with atlas columns, in TileDB's global order: rows, then columns, strictly ascending.
    X is written without TileDB's checks (storage.TRUSTED_ORDER), so a chunk that is not so is refused here."""
    a, b, indices = _chunk_indices(x, indptr, lo, hi, len(columns), path)
    chunk = sp.csr_matrix((x["data"][a:b], columns[indices], indptr[lo:hi + 1] - a), shape=(hi - lo, n_var))
    # A non-monotonic gene mapping unsorts the rows; for a monotonic one this is only a check.
    chunk.sort_indices()
    if not chunk.has_canonical_format:
        raise SourceError(f"X has duplicate entries (the same gene twice in a cell) in cells {lo}..{hi - 1}",
                          where=path, hint="re-run the convert step")
    return chunk


# ---------------------------------------------------------------- delete and update


def delete_obs_range(uri: str, schema: AtlasSchema, start: int, stop: int) -> None:
    """Delete rows [start, stop) from obs and every X layer; the next write is visible."""
    if stop <= start:
        return
    members = _members(uri, schema)
    # Per-array slices (not obs_axis_delete, which looks up obs first) also remove X
    # entries whose obs rows are missing, e.g. after a crashed ingest.
    with _mutation() as stamp:
        with soma.DataFrame.open(members.obs, "d", tiledb_timestamp=stamp, context=_ctx()) as obs:
            if start < _df_size(obs):
                obs.delete_cells((slice(start, min(stop, _df_size(obs)) - 1),))
        for layer_uri in members.layers.values():
            with soma.SparseNDArray.open(layer_uri, "d", tiledb_timestamp=stamp, context=_ctx()) as x:
                if start < x.shape[0]:
                    x.delete_cells((slice(start, min(stop, x.shape[0]) - 1),))


def update_obs(uri: str, schema: AtlasSchema, h5ad: str, start: int, *,
               fence: Callable[[], None] = _no_fence) -> int:
    """Overwrite obs rows [start, start+n) with the h5ad's obs (same obs_ids); X is untouched. Returns n.
    `fence` as for ingest_h5ad."""
    with _h5(h5ad) as f:
        table = _obs_table(_read_sample(f, h5ad, schema), schema, start)
    n = len(table)
    members = _members(uri, schema)
    with soma.DataFrame.open(members.obs, context=_ctx()) as obs:
        current = _read_slices(obs, [(start, start + n)], ["obs_id"])["obs_id"]
    if not current.equals(table["obs_id"]):
        raise AtlasError(f"rows {start}..{start + n} do not hold the cells of {h5ad}", where=uri,
                         hint="re-ingest the sample instead of updating its obs")
    with _mutation() as stamp, soma.DataFrame.open(members.obs, "w", tiledb_timestamp=stamp, context=_ctx()) as obs:
        fence()
        obs.write(table)
    return n


# ---------------------------------------------------------------- verify

#: Rows per read when counting X entries. TileDB sizes its read buffers by the query: two
#: 5,000-cell samples (14.5M entries) read at once raised the reader's peak RSS by 525 MB; reading
#: soma_dim_0 alone, 1,000-row reads add ~50 MB and count 30.8M entries in 0.82 s (all three
#: columns in 500-row reads: 1.30 s). An ingest that must count its own sample reads more at a time
#: (see ingest_sample).
_COUNT_ROWS = 1000


def range_stats(uri: str, schema: AtlasSchema, ranges: list[tuple[int, int]], *,
                rows_per_read: int = _COUNT_ROWS, nnz: list[int] | None = None) -> list[RangeStats]:
    """Per [start, stop): cells in obs, distinct obs_ids, entries of the counts layer (counted `rows_per_read`
    cells at a time, unless the caller knows them: `nnz`, one per range)."""
    members = _members(uri, schema)
    with soma.DataFrame.open(members.obs, context=_ctx()) as obs:
        cells = [_cells_and_ids(_read_slices(obs, [(start, stop)], ["obs_id"])["obs_id"]) for start, stop in ranges]
    if nnz is None:
        with soma.SparseNDArray.open(members.layers[schema.counts_layer.name], context=_ctx()) as counts:
            nnz = [_count_entries(counts, [(start, stop)], rows_per_read) for start, stop in ranges]
    return [RangeStats(start, stop, cells=n_cells, obs_ids=n_ids, nnz=n)
            for (start, stop), (n_cells, n_ids), n in zip(ranges, cells, nnz)]


def _cells_and_ids(obs_ids: pa.ChunkedArray) -> tuple[int, int]:
    return len(obs_ids), pc.count_distinct(obs_ids).as_py()


def obs_joinids_outside(uri: str, ranges: list[tuple[int, int]]) -> list[int]:
    """Up to 100 obs soma_joinids outside all the ranges (orphans), lowest first."""
    with open_experiment(uri) as exp:
        obs = exp.obs
        gaps = _gaps(ranges, _df_size(obs))
        ids: list[int] = []
        for gap in gaps:
            ids += _read_slices(obs, [gap], ["soma_joinid"])["soma_joinid"].slice(0, 100 - len(ids)).to_pylist()
            if len(ids) == 100:
                break
        return ids


def count_x_outside(uri: str, schema: AtlasSchema, ranges: list[tuple[int, int]]) -> int:
    """X entries, summed over all layers, whose cell lies outside all the ranges."""
    total = 0
    for layer_uri in _members(uri, schema).layers.values():
        with soma.SparseNDArray.open(layer_uri, context=_ctx()) as x:
            total += _count_entries(x, _gaps(ranges, x.shape[0]))
    return total


def _gaps(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The parts of [0, size) outside all ranges; touching ranges merge, so there are few."""
    gaps, at = [], 0
    for start, stop in sorted(ranges):
        if start > at:
            gaps.append((at, min(start, size)))
        at = max(at, stop)
    gaps.append((at, size))
    return [(a, b) for a, b in gaps if a < b]


def _clip(ranges: list[tuple[int, int]], size: int) -> list[slice]:
    """Inclusive SOMA slices for the non-empty parts of half-open ranges inside [0, size)."""
    return [slice(a, min(b, size) - 1) for a, b in ranges if a < min(b, size)]


def _read_slices(df: soma.DataFrame, ranges: list[tuple[int, int]], columns: list[str]) -> pa.Table:
    tables = [df.read((s,), column_names=columns).concat() for s in _clip(ranges, _df_size(df))]
    return pa.concat_tables(tables) if tables else df.schema.empty_table().select(columns)


def _count_entries(x: soma.SparseNDArray, ranges: list[tuple[int, int]], rows_per_read: int = _COUNT_ROWS) -> int:
    # SparseNDArray.read has no column selection; its reader class (private) has, and soma_dim_0 alone
    # is 40% of the bytes to decode.
    return sum(len(t) for s in _clip(ranges, x.shape[0])
               for lo in range(s.start, s.stop + 1, rows_per_read)
               for t in ArrowTableRead(x, (slice(lo, min(lo + rows_per_read - 1, s.stop)),), ["soma_dim_0"],
                                       clib.ResultOrder.unordered, None, None))


# ---------------------------------------------------------------- read


def read_sample(uri: str, schema: AtlasSchema, start: int, stop: int) -> anndata.AnnData:
    """Cells [start, stop) with all genes, as a user reads them: X = counts, other layers in .layers."""
    others = [layer.name for layer in schema.layers if layer.name != schema.counts_layer.name]
    with open_experiment(uri) as exp:
        query = exp.axis_query(schema.measurement, obs_query=soma.AxisQuery(coords=(slice(start, stop - 1),)))
        return query.to_anndata(X_name=schema.counts_layer.name, X_layers=others,
                                obs_id_name="obs_id", var_id_name="var_id")


def overview(uri: str, timestamp: int | None = None) -> Overview:
    """Sizes of the atlas (as it was at `timestamp`, by default now) and its cells per (study, sample),
    parsed from obs_id."""
    with open_experiment(uri, timestamp) as exp:
        obs_ids = exp.obs.read(column_names=["obs_id"]).concat()["obs_id"]
        (ms,) = exp.ms.values()
        genes = ms.var.count
        layers = tuple(ms.X.keys())
    # obs_id = "<study>/<sample>/<barcode>": strip the barcode, count, split the rest.
    per_sample = pc.value_counts(pc.replace_substring_regex(obs_ids, pattern="/[^/]*$", replacement=""))
    samples = {tuple(key.split("/", 1)): n for key, n in zip(per_sample.field("values").to_pylist(),
                                                             per_sample.field("counts").to_pylist())}
    return Overview(cells=len(obs_ids), genes=genes, layers=layers, samples=samples)


# ---------------------------------------------------------------- samples table and feature presence
# A sample gets a fresh sample joinid with every obs range. Its row of the samples table and of the
# presence matrix are written by its ingest step, before its cells; the rows of a replaced, removed or
# interrupted version are deleted with its obs range (see State.retire_sample).


def presence_complete(uri: str) -> bool:
    """Whether the atlas has the samples table and presence matrix, filled for every ingested sample."""
    with open_experiment(uri) as exp:
        return exp.metadata.get(PRESENCE_KEY) == "1"


def add_sample_arrays(uri: str, schema: AtlasSchema) -> None:
    """Create the samples table and presence matrix in an atlas made before them (idempotent)."""
    with soma.Experiment.open(uri, "w", context=_ctx()) as exp:
        _add_sample_arrays(exp, exp.ms[schema.measurement])


def mark_presence_complete(uri: str) -> None:
    with soma.Experiment.open(uri, "w", context=_ctx()) as exp:
        exp.metadata[PRESENCE_KEY] = "1"


def _sample_members(uri: str, schema: AtlasSchema) -> tuple[str, str]:
    """URIs of the samples table and the presence matrix."""
    return _sample_members_of(uri, schema.measurement)


@functools.lru_cache(maxsize=64)
def _sample_members_of(uri: str, measurement: str) -> tuple[str, str]:
    # Cached as _members_of is (14 ms an ingest); an atlas without them yet raises, which is not cached.
    with open_experiment(uri) as exp:
        ms = exp.ms[measurement]
        if SAMPLES not in exp or PRESENCE not in ms:
            raise AtlasError("the atlas has no samples table or feature presence matrix", where=uri,
                             hint="run apply: it adds them to atlases made before them")
        return exp[SAMPLES].uri, ms[PRESENCE].uri


def measured_genes(h5ad: str) -> pd.Index:
    """The var ids a sample measured: its h5ad's var, less the genes a fixed universe only padded in."""
    try:
        with _h5(h5ad) as f:
            ids = anndata.io.read_elem(f["var"]).index
            measured = f.get("uns/soma_manifest/measured")
            return ids[measured[:]] if measured is not None else ids
    except (OSError, KeyError) as exc:
        raise SourceError(f"unreadable intermediate h5ad: {exc}", where=h5ad, hint="re-run the convert step") from None


def _presence_columns(var_ids: pd.Series, genes: pd.Index, where: str) -> np.ndarray:
    joinids = var_ids.reindex(genes.astype(str))
    if joinids.isna().any():
        raise AtlasError(f"genes of {where} are not in the atlas' var (e.g. {joinids.index[joinids.isna()][0]})",
                         where=where, hint="extend_var must run before ingest")
    return np.sort(joinids.to_numpy(dtype=np.int64))


def ingest_sample(uri: str, schema: AtlasSchema, key: str, sample_joinid: int, h5ad: str, start: int, *,
                  chunk_nnz: int, fence: Callable[[], None], converted: anndata.AnnData | None = None) -> RangeStats:
    """apply's ingest of one sample: its samples-table and presence rows first (so a range whose cells
    were written always has them, to be deleted with it), then its cells; returns its range for the quick
    verify: cells and distinct obs ids read back, X entries as committed (_entries_committed_at).
    `converted`: the sample as this worker converted it, when it still holds it (its h5ad is not read); it is
    used up (a gene mapping out of order sorts its arrays in place)."""
    var_ids = read_var_ids(uri, schema)
    if converted is not None:
        written = _ingest_with_rows(uri, schema, key, sample_joinid, _sample_in_memory(h5ad, converted, schema),
                                    start, chunk_nnz, fence, var_ids)
    else:
        with storage.local_file(h5ad) as local:  # one copy of an h5ad on S3
            try:
                with _h5(local) as f:
                    written = _ingest_with_rows(uri, schema, key, sample_joinid, _read_sample(f, local, schema),
                                                start, chunk_nnz, fence, var_ids)
            except SourceError as exc:
                if local == h5ad:
                    raise
                raise SourceError(exc.message.replace(local, h5ad), where=h5ad, hint=exc.hint) from None
    stop = start + written.cells
    counts_uri = _members(uri, schema).layers[schema.counts_layer.name]
    if _entries_committed_at(counts_uri, written.stamp) == written.nnz:
        return range_stats(uri, schema, [(start, stop)], nnz=[written.nnz])[0]
    # Another ingest wrote at the same millisecond (or this one lost entries): count by reading the range,
    # in reads of up to 2 x chunk_nnz entries (bench/README.md, "Stop 19").
    rows_per_read = max(1, written.cells * 2 * chunk_nnz // max(written.nnz, 1))
    return range_stats(uri, schema, [(start, stop)], rows_per_read=rows_per_read)[0]


def _entries_committed_at(array_uri: str, stamp: int) -> int:
    """Cells of the array's fragments committed at exactly `stamp` (ms), from their fragment metadata.

    Reading a 6.6M-entry sample's range back to count it took 0.16 s; this took 10-25 ms with 50-144
    fragments (each open loads every fragment's metadata, as any open does). Two opens, as the array opened
    at [stamp, stamp] alone lacks the metadata written when it was created. A fragment of another timestamp
    that lands between the opens only makes the difference wrong, and the caller counts.
    """
    cells = []
    for end in (stamp - 1, stamp):
        handle = clib.SOMAArray.open(array_uri, clib.OpenMode.soma_read, _ctx().native_context, timestamp=(0, end))
        try:
            cells.append(handle.fragment_cell_count())
        finally:
            handle.close()
    return cells[1] - cells[0]


def _ingest_with_rows(uri: str, schema: AtlasSchema, key: str, sample_joinid: int, sample: _Sample, start: int,
                      chunk_nnz: int, fence: Callable[[], None], var_ids: pd.Series) -> IngestStats:
    _write_sample_rows(uri, schema, sample_joinid, key, sample, start, var_ids)
    return _ingest(uri, schema, sample, start, chunk_nnz=chunk_nnz, fence=fence, var_ids=var_ids)


def write_sample(uri: str, schema: AtlasSchema, sample_joinid: int, key: str, h5ad: str, start: int) -> int:
    """Write the sample's row of the samples table and its presence row (true for every measured gene).
    Runs before its cells are written. Returns the number of measured genes."""
    with _h5(h5ad) as f:
        return _write_sample_rows(uri, schema, sample_joinid, key, _read_sample(f, h5ad, schema), start,
                                  read_var_ids(uri, schema))


def _write_sample_rows(uri: str, schema: AtlasSchema, sample_joinid: int, key: str, sample: _Sample, start: int,
                       var_ids: pd.Series) -> int:
    samples_uri, presence_uri = _sample_members(uri, schema)
    cells = len(sample.obs)
    columns = _presence_columns(var_ids, sample.measured_genes, sample.path)
    study, name = key.split("/", 1)
    row = pa.table({"soma_joinid": [sample_joinid], "sample_id": [key], "study": [study], "sample": [name],
                    "cells": [cells], "obs_joinid_start": [start], "obs_joinid_stop": [start + cells],
                    "n_measured_genes": [len(columns)]}, schema=_SAMPLES_SCHEMA)
    with _mutation() as stamp:
        with soma.DataFrame.open(samples_uri, "w", tiledb_timestamp=stamp, context=_ctx()) as table:
            table.write(row)
        with soma.SparseNDArray.open(presence_uri, "w", tiledb_timestamp=stamp, context=_ctx()) as presence:
            presence.write(pa.table({"soma_dim_0": np.full(len(columns), sample_joinid, dtype=np.int64),
                                     "soma_dim_1": columns, "soma_data": np.ones(len(columns), dtype=bool)}))
    return len(columns)


def resize_samples(uri: str, schema: AtlasSchema, n_samples: int) -> None:
    """Grow the samples table to n_samples rows and the presence matrix to n_samples x the var domain."""
    samples_uri, presence_uri = _sample_members(uri, schema)
    with soma.DataFrame.open(_members(uri, schema).var, context=_ctx()) as var:
        n_var = _df_size(var)
    with _mutation() as stamp:
        with soma.DataFrame.open(samples_uri, "w", tiledb_timestamp=stamp, context=_ctx()) as table:
            if _df_size(table) < n_samples:
                table.tiledbsoma_resize_soma_joinid_shape(n_samples)
        with soma.SparseNDArray.open(presence_uri, "w", tiledb_timestamp=stamp, context=_ctx()) as presence:
            shape = (max(presence.shape[0], n_samples), max(presence.shape[1], n_var))
            if shape != presence.shape:
                presence.resize(shape)


def delete_samples(uri: str, schema: AtlasSchema, sample_joinids: list[int]) -> None:
    """Delete these rows of the samples table and of the presence matrix (absent ones are no error)."""
    samples_uri, presence_uri = _sample_members(uri, schema)
    with _mutation() as stamp:
        with soma.DataFrame.open(samples_uri, "d", tiledb_timestamp=stamp, context=_ctx()) as table:
            inside = [j for j in sample_joinids if j < _df_size(table)]
            if inside:
                table.delete_cells((inside,))
        with soma.SparseNDArray.open(presence_uri, "d", tiledb_timestamp=stamp, context=_ctx()) as presence:
            inside = [j for j in sample_joinids if j < presence.shape[0]]
            if inside:
                presence.delete_cells((inside,))


def read_samples_table(uri: str, schema: AtlasSchema) -> pd.DataFrame:
    """The samples table, indexed by sample joinid."""
    samples_uri, _ = _sample_members(uri, schema)
    with soma.DataFrame.open(samples_uri, context=_ctx()) as table:
        return table.read().concat().to_pandas().set_index("soma_joinid")


def read_presence_rows(uri: str, schema: AtlasSchema) -> dict[int, np.ndarray]:
    """Every presence row: sample joinid -> sorted var joinids."""
    _, presence_uri = _sample_members(uri, schema)
    with soma.SparseNDArray.open(presence_uri, context=_ctx()) as presence:
        table = presence.read().tables().concat()
    rows, cols = table["soma_dim_0"].to_numpy(), table["soma_dim_1"].to_numpy()
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    bounds = np.flatnonzero(np.diff(rows)) + 1
    return {int(r[0]): c for r, c in zip(np.split(rows, bounds), np.split(cols, bounds)) if len(r)}


def x_columns(uri: str, schema: AtlasSchema, start: int, stop: int) -> np.ndarray:
    """The var joinids that have an entry in any X layer for cells [start, stop)."""
    found = [np.zeros(0, dtype=np.int64)]
    for layer_uri in _members(uri, schema).layers.values():
        with soma.SparseNDArray.open(layer_uri, context=_ctx()) as x:
            for s in _clip([(start, stop)], x.shape[0]):
                found += [t["soma_dim_1"].to_numpy() for t in x.read((s,)).tables()]
    return np.unique(np.concatenate(found))


def var_joinids(exp: soma.Experiment, schema: AtlasSchema, genes: list[str]) -> np.ndarray:
    """The var joinids of genes given by id or symbol (a symbol: every row carrying it), sorted."""
    symbol = next((c.name for c in schema.var if c.source == "feature_name"), None)
    var = exp.ms[schema.measurement].var
    table = var.read(column_names=["soma_joinid", "var_id", *([symbol] if symbol else [])]).concat().to_pandas()
    wanted = pd.Series(genes, dtype=object)
    hit = table["var_id"].isin(wanted) | (table[symbol].isin(wanted) if symbol else False)
    found = set(table["var_id"]) | (set(table[symbol]) if symbol else set())
    unknown = [g for g in genes if g not in found]
    if unknown:
        raise AtlasError(f"{len(unknown)} gene(s) not in the atlas: {', '.join(unknown[:5])}", where=exp.uri,
                         hint="give var ids (var_id) or symbols" + (f" ({symbol})" if symbol else ""))
    return np.sort(table.loc[hit, "soma_joinid"].to_numpy(dtype=np.int64))


def read_presence(exp: soma.Experiment, schema: AtlasSchema, samples: dict[int, str]) -> anndata.AnnData:
    """The presence matrix of these samples (sample joinid -> key) as AnnData: obs = the samples table
    indexed by sample key, var indexed by var_id, X bool CSR."""
    ms = exp.ms[schema.measurement]
    if SAMPLES not in exp or PRESENCE not in ms:
        raise AtlasError("the atlas has no samples table or feature presence matrix", where=exp.uri,
                         hint="run apply: it adds them to atlases made before them")
    joinids = np.array(sorted(samples), dtype=np.int64)
    var = ms.var.read().concat().to_pandas().sort_values("soma_joinid").set_index("var_id")
    if len(joinids):  # empty coordinates would read every row
        obs = exp[SAMPLES].read((joinids,)).concat().to_pandas()
        entries = ms[PRESENCE].read((joinids,)).tables().concat()
        rows = pd.Index(joinids).get_indexer(entries["soma_dim_0"].to_numpy())
        cols = pd.Index(var["soma_joinid"]).get_indexer(entries["soma_dim_1"].to_numpy())
    else:
        obs, rows, cols = _SAMPLES_SCHEMA.empty_table().to_pandas(), np.zeros(0, int), np.zeros(0, int)
    obs = obs.set_index("soma_joinid").reindex(joinids)
    obs.index = pd.Index([samples[j] for j in joinids], name="sample_key")
    x = sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=(len(joinids), len(var)))
    return anndata.AnnData(X=x, obs=obs, var=var.drop(columns="soma_joinid"))


# ---------------------------------------------------------------- compaction (see docs/operations.md)

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


def consolidate_array(array_uri: str, *, purge: bool) -> None:
    """Consolidate all fragments of one array into one, then vacuum the merged ones.

    The consolidated fragment keeps every cell's timestamp, so the array still reads exactly at any
    earlier timestamp, except that `purge` drops the cells of every delete (see docs/operations.md).
    Uses tiledbsoma's own handle: the same TileDB core that reads and writes the atlas.
    """
    config = {**storage.tiledb_config(), "sm.consolidation.mode": "fragments", "sm.vacuum.mode": "fragments",
              "sm.consolidation.purge_deleted_cells": "true" if purge else "false"}
    try:
        with soma.open(array_uri, context=soma.SOMATileDBContext(tiledb_config=config)) as array:
            consolidate = getattr(getattr(array, "_handle", None), "consolidate_and_vacuum", None)
            if consolidate is None:
                raise AtlasError(f"tiledbsoma {soma.__version__} cannot consolidate arrays (its array handle has no "
                                 "consolidate_and_vacuum)", where=array_uri,
                                 hint="use the tiledbsoma version soma-manifest is tested with (pyproject.toml)")
            consolidate(["fragments"])
    except soma.SOMAError as exc:
        raise AtlasError(f"consolidation failed: {exc}", where=array_uri, hint="run compact again") from None

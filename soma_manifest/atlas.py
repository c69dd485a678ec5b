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

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import anndata
import anndata.io
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
import tiledbsoma as soma

from soma_manifest import storage
from soma_manifest.errors import AtlasError, SourceError
from soma_manifest.faults import crash_point
from soma_manifest.schema import AtlasSchema, Layer

STRUCTURE_KEY = "soma_manifest.structure"
LINEAGE_KEY = "soma_manifest.lineage"

#: soma_dim_1 tile extent of the X layers. With the whole gene axis in one tile, TileDB's
#: global order is simply (row, column), so CSR chunks can be written without a sort.
VAR_TILE = 1 << 20
_X_CREATE = {"tiledb": {"create": {"dims": {"soma_dim_1": {"tile": VAR_TILE}}}}}
# Chunks are written in global order: skips TileDB's sort (4-5x faster); an unsorted chunk fails.
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


def _ctx() -> soma.SOMATileDBContext | None:
    """The TileDB context of the configured store (S3 endpoint and region); passed to every open."""
    return storage.tiledb_context()


def _h5(path: str) -> h5py.File:
    """An intermediate h5ad for reading, local or s3:// (read in place, in large blocks)."""
    loc = storage.Location(path)
    return h5py.File(storage.open_read(loc) if loc.is_remote else path, "r")


def atlas_exists(uri: str) -> bool:
    """Whether a complete atlas is at `uri`: creation writes its lineage last, so one without is partial."""
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
                                     platform_config=_X_CREATE if layer.optimize == "cells" else None)
    with soma.Experiment.open(uri, "w", context=_ctx()) as exp:  # last: marks the atlas complete
        exp.metadata[STRUCTURE_KEY] = schema.structure
        exp.metadata[LINEAGE_KEY] = lineage


def _obs_schema(schema: AtlasSchema) -> pa.Schema:
    return pa.schema([("soma_joinid", pa.int64()), ("obs_id", pa.large_string()),
                      *((c.name, _ARROW[c.type]) for c in schema.obs)])


def _var_schema(schema: AtlasSchema) -> pa.Schema:
    return pa.schema([("soma_joinid", pa.int64()), ("var_id", pa.large_string()),
                      *((c.name, _ARROW[c.type]) for c in schema.var)])


def read_structure(uri: str) -> str | None:
    with _open_experiment(uri) as exp:
        return exp.metadata.get(STRUCTURE_KEY)


def read_lineage(uri: str) -> str | None:
    """The lineage of the state file the atlas was created with."""
    with _open_experiment(uri) as exp:
        return exp.metadata.get(LINEAGE_KEY)


def column_names(uri: str, schema: AtlasSchema) -> tuple[list[str], list[str], list[str]]:
    """obs column names, var column names and X layer names as they are on disk."""
    with _open_experiment(uri) as exp:
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
    var.index.name = "var_id"
    return var[[c.name for c in schema.var]].astype(object)


def _open_experiment(uri: str) -> soma.Experiment:
    try:
        return soma.Experiment.open(uri, context=_ctx())
    except soma.DoesNotExistError:
        raise AtlasError("no atlas here", where=uri, hint="run apply to create it") from None


def _members(uri: str, schema: AtlasSchema) -> _Members:
    with _open_experiment(uri) as exp:
        try:
            ms = exp.ms[schema.measurement]
            return _Members(obs=exp.obs.uri, var=ms.var.uri,
                            layers={layer.name: ms.X[layer.name].uri for layer in schema.layers})
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


# ---------------------------------------------------------------- var and domains


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
    """An intermediate h5ad: obs and var in memory; X stays on disk."""

    path: str
    obs: pd.DataFrame
    var: pd.DataFrame
    indptr: np.ndarray


def _read_sample_frames(path: str, schema: AtlasSchema) -> _Sample:
    try:
        with _h5(path) as f:
            obs = anndata.io.read_elem(f["obs"])
            var = anndata.io.read_elem(f["var"])
            x = f["X"]
            if x.attrs.get("encoding-type") != "csr_matrix" or tuple(x.attrs["shape"]) != (len(obs), len(var)):
                raise SourceError("X is not a CSR matrix of obs x var", where=path, hint="re-run the convert step")
            indptr = x["indptr"][:]
    except (OSError, KeyError) as exc:
        raise SourceError(f"unreadable intermediate h5ad: {exc}", where=path, hint="re-run the convert step") from None
    expected = [c.name for c in schema.obs]
    if list(obs.columns) != expected:
        raise SourceError(f"obs columns {list(obs.columns)} differ from the schema's {expected}", where=path,
                          hint="re-run the convert step")
    return _Sample(path, obs, var, indptr)


def _obs_table(sample: _Sample, schema: AtlasSchema, start: int) -> pa.Table:
    obs = sample.obs
    # anndata stores string columns as categoricals; the atlas holds them as plain strings.
    columns = {c.name: pa.array(obs[c.name].to_numpy(dtype=object if c.type == "string" else None),
                                type=_ARROW[c.type]) for c in schema.obs}
    joinids = pa.array(np.arange(start, start + len(obs), dtype=np.int64))
    return pa.table({"soma_joinid": joinids, "obs_id": pa.array(obs.index.astype(str), pa.large_string()), **columns},
                    schema=_obs_schema(schema))


def ingest_h5ad(uri: str, schema: AtlasSchema, h5ad: str, start: int, *, chunk_nnz: int = 5_000_000) -> IngestStats:
    """Write the h5ad's cells at soma_joinids [start, start+n): obs, then every X layer.

    Safe to run concurrently on disjoint ranges once the caller has grown the domains.
    """
    parent = os.getppid()
    sample = _read_sample_frames(h5ad, schema)
    members = _members(uri, schema)
    columns = _column_map(uri, members, sample)
    n_var = int(columns.max()) + 1 if len(columns) else 0
    stop = start + len(sample.obs)
    _check_room(uri, members, stop, n_var)
    nnz = 0
    with _mutation() as stamp, ExitStack() as stack, _h5(h5ad) as f:
        layers = {layer: stack.enter_context(soma.SparseNDArray.open(members.layers[layer.name], "w",
                                                                       tiledb_timestamp=stamp, context=_ctx()))
                  for layer in schema.layers}
        with soma.DataFrame.open(members.obs, "w", tiledb_timestamp=stamp, context=_ctx()) as obs:
            obs.write(_obs_table(sample, schema, start))
        crash_point("worker_ingest_after_obs")
        for lo, hi in _row_chunks(sample.indptr, chunk_nnz):
            if os.getppid() != parent:
                os._exit(1)  # orphaned worker: the coordinator is gone, stop writing at once
            chunk = _read_chunk(f["X"], sample.indptr, lo, hi, columns, n_var)
            local_rows = np.repeat(np.arange(hi - lo, dtype=np.int64), np.diff(chunk.indptr))
            coords = {"soma_dim_0": local_rows + (start + lo), "soma_dim_1": chunk.indices.astype(np.int64)}
            for layer, array in layers.items():
                array.write(pa.table({**coords, "soma_data": _layer_values(layer, local_rows, chunk.data)}),
                            platform_config=_GLOBAL_ORDER if layer.optimize == "cells" else None)
            nnz += chunk.nnz
    return IngestStats(cells=len(sample.obs), nnz=nnz)


def _column_map(uri: str, members: _Members, sample: _Sample) -> np.ndarray:
    """The atlas var joinid of each of the sample's genes, in the sample's order."""
    with soma.DataFrame.open(members.var, context=_ctx()) as var:
        joinids = _var_ids(var).reindex(sample.var.index.astype(str))
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


def _read_chunk(x: h5py.Group, indptr: np.ndarray, lo: int, hi: int, columns: np.ndarray,
                n_var: int) -> sp.csr_matrix:
    """Rows [lo, hi) with atlas columns, in TileDB's global order: rows, then columns, ascending."""
    a, b = int(indptr[lo]), int(indptr[hi])
    chunk = sp.csr_matrix((x["data"][a:b], columns[x["indices"][a:b]], indptr[lo:hi + 1] - a),
                          shape=(hi - lo, n_var))
    # A non-monotonic gene mapping unsorts the rows; for a monotonic one this is only a check.
    chunk.sort_indices()
    return chunk


def _layer_values(layer: Layer, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """A layer's values from the raw counts of whole rows (rows: 0-based row of each count)."""
    dtype = np.dtype(layer.type)
    if layer.source == "counts":
        return counts.astype(dtype)
    # Chunks hold whole rows, so these are totals over all of the sample's genes;
    # the floor of 1 only matters for rows of explicit zeros.
    totals = np.maximum(np.bincount(rows, weights=counts), 1)
    normalized = counts / totals[rows] * 1e4
    return (normalized if layer.source == "normalized" else np.log1p(normalized)).astype(dtype)


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


def update_obs(uri: str, schema: AtlasSchema, h5ad: str, start: int) -> int:
    """Overwrite obs rows [start, start+n) with the h5ad's obs (same obs_ids); X is untouched. Returns n."""
    sample = _read_sample_frames(h5ad, schema)
    table = _obs_table(sample, schema, start)
    n = len(table)
    members = _members(uri, schema)
    with soma.DataFrame.open(members.obs, context=_ctx()) as obs:
        current = _read_slices(obs, [(start, start + n)], ["obs_id"])["obs_id"]
    if not current.equals(table["obs_id"]):
        raise AtlasError(f"rows {start}..{start + n} do not hold the cells of {h5ad}", where=uri,
                         hint="re-ingest the sample instead of updating its obs")
    with _mutation() as stamp, soma.DataFrame.open(members.obs, "w", tiledb_timestamp=stamp, context=_ctx()) as obs:
        obs.write(table)
    return n


# ---------------------------------------------------------------- verify


def range_stats(uri: str, schema: AtlasSchema, ranges: list[tuple[int, int]]) -> list[RangeStats]:
    """Per [start, stop): cells in obs, distinct obs_ids, entries of the counts layer."""
    members = _members(uri, schema)
    stats = []
    with soma.DataFrame.open(members.obs, context=_ctx()) as obs, \
            soma.SparseNDArray.open(members.layers[schema.counts_layer.name], context=_ctx()) as counts:
        for start, stop in ranges:
            ids = _read_slices(obs, [(start, stop)], ["obs_id"])["obs_id"]
            stats.append(RangeStats(start, stop, cells=len(ids), obs_ids=pc.count_distinct(ids).as_py(),
                                    nnz=_count_entries(counts, [(start, stop)])))
    return stats


def obs_joinids_outside(uri: str, ranges: list[tuple[int, int]]) -> list[int]:
    """Up to 100 obs soma_joinids outside all the ranges (orphans), lowest first."""
    with _open_experiment(uri) as exp:
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


def _count_entries(x: soma.SparseNDArray, ranges: list[tuple[int, int]]) -> int:
    return sum(len(t) for s in _clip(ranges, x.shape[0]) for t in x.read((s,)).tables())


# ---------------------------------------------------------------- read


def read_sample(uri: str, schema: AtlasSchema, start: int, stop: int) -> anndata.AnnData:
    """Cells [start, stop) with all genes, as a user reads them: X = counts, other layers in .layers."""
    others = [layer.name for layer in schema.layers if layer.name != schema.counts_layer.name]
    with _open_experiment(uri) as exp:
        query = exp.axis_query(schema.measurement, obs_query=soma.AxisQuery(coords=(slice(start, stop - 1),)))
        return query.to_anndata(X_name=schema.counts_layer.name, X_layers=others,
                                obs_id_name="obs_id", var_id_name="var_id")


def overview(uri: str) -> Overview:
    """Sizes of the atlas and its cells per (study, sample), parsed from obs_id."""
    with _open_experiment(uri) as exp:
        obs_ids = exp.obs.read(column_names=["obs_id"]).concat()["obs_id"]
        (ms,) = exp.ms.values()
        genes = ms.var.count
        layers = tuple(ms.X.keys())
    # obs_id = "<study>/<sample>/<barcode>": strip the barcode, count, split the rest.
    per_sample = pc.value_counts(pc.replace_substring_regex(obs_ids, pattern="/[^/]*$", replacement=""))
    samples = {tuple(key.split("/", 1)): n for key, n in zip(per_sample.field("values").to_pylist(),
                                                             per_sample.field("counts").to_pylist())}
    return Overview(cells=len(obs_ids), genes=genes, layers=layers, samples=samples)

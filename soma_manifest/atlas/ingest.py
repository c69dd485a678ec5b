"""Ingest: a converted sample's cells (obs and every X layer) written at its allocated obs range."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma as soma

from soma_manifest.atlas import checks, clock, engine, layout
from soma_manifest.atlas.chunks import as_chunk, cells_chunk, major_index, read_chunk, row_chunks, row_totals
from soma_manifest.atlas.domains import check_room, read_var_ids
from soma_manifest.atlas.samples import sample_row, write_sample_rows, write_samples_rows
from soma_manifest.errors import AtlasError
from soma_manifest.faults import crash_point, fail_point
from soma_manifest.h5ad import Sample, open_sample, sample_in_memory
from soma_manifest.schema import AtlasSchema, Layer


@dataclass(frozen=True)
class IngestStats:
    cells: int
    nnz: int
    stamp: int  # the TileDB timestamp its obs and X fragments were written at


def ingest_sample(uri: str, schema: AtlasSchema, key: str, sample_joinid: int, h5ad: str, start: int, *,
                  chunk_nnz: int, fence: Callable[[], None],
                  converted: anndata.AnnData | None = None) -> checks.RangeStats:
    """apply's ingest of one sample: its samples-table and presence rows first (so a range whose cells
    were written always has them, to be deleted with it), then its cells; returns its range for the quick
    verify: cells and distinct obs ids read back, X entries as committed (checks.entries_committed_at).
    `converted`: the sample as this worker converted it, when it still holds it (its h5ad is not read); it is
    used up (a gene mapping out of order sorts its arrays in place)."""
    var_ids = read_var_ids(uri, schema)
    if converted is not None:
        written = _ingest_with_rows(uri, schema, key, sample_joinid, sample_in_memory(h5ad, converted, schema),
                                    start, chunk_nnz, fence, var_ids)
    else:
        with open_sample(h5ad, schema) as sample:
            written = _ingest_with_rows(uri, schema, key, sample_joinid, sample, start, chunk_nnz, fence, var_ids)
    stop = start + written.cells
    counts_uri = layout.members(uri, schema).layers[schema.counts_layer.name]
    if checks.entries_committed_at(counts_uri, written.stamp) == written.nnz:
        return checks.range_stats(uri, schema, [(start, stop)], nnz=[written.nnz])[0]
    # Another ingest wrote at the same millisecond (or this one lost entries): count by reading the range,
    # in reads of up to 2 x chunk_nnz entries (bench/README.md, "Stop 19").
    rows_per_read = max(1, written.cells * 2 * chunk_nnz // max(written.nnz, 1))
    return checks.range_stats(uri, schema, [(start, stop)], rows_per_read=rows_per_read)[0]


def _ingest_with_rows(uri: str, schema: AtlasSchema, key: str, sample_joinid: int, sample: Sample, start: int,
                      chunk_nnz: int, fence: Callable[[], None], var_ids: pd.Series) -> IngestStats:
    write_sample_rows(uri, schema, sample_joinid, key, sample, start, var_ids)
    return _ingest(uri, schema, sample, start, chunk_nnz=chunk_nnz, fence=fence, var_ids=var_ids)


@dataclass(frozen=True)
class Member:
    """One sample of a grouped ingest: its key, sample joinid, h5ad and the start of its obs range."""

    key: str
    sample_joinid: int
    h5ad: str
    start: int


def ingest_group(uri: str, schema: AtlasSchema, members: list[Member], *, chunk_nnz: int,
                 fence: Callable[[], None]) -> list[checks.RangeStats]:
    """apply's ingest of several small samples whose ranges follow each other: their samples-table and presence
    rows in one mutation, then all their cells in one (one fragment per array for the group, where a step per
    sample made one per sample: fragments and the per-step cost grow with the data, not with the samples).
    Returns each member's range as ingest_sample does. Either every member is written or the step fails: the
    caller retries the members alone, in fresh ranges (the group's ranges are deleted first)."""
    var_ids = read_var_ids(uri, schema)
    rows, obs, parts = [], [], []
    for i, member in enumerate(members):
        if i and member.start != rows[-1].start + rows[-1].cells:
            raise AtlasError(f"the ranges of {members[i - 1].key} and {member.key} do not follow each other",
                             where=uri, hint="a grouped ingest takes consecutive ranges (a bug)")
        # Each member's file is closed once its rows are read: a group's memory follows its entries, not its
        # members (every member's file and var frame held open made 827 MB at 189 members of 10 cells).
        with open_sample(member.h5ad, schema) as sample:
            rows.append(sample_row(member.sample_joinid, member.key, sample, member.start, var_ids))
            columns = _column_map(uri, var_ids, sample)
            n_var = int(columns.max()) + 1 if len(columns) else 0
            # in atlas columns, checked and in global order, as read_chunk makes them
            parts.append(read_chunk(sample.x, sample.indptr, 0, len(sample.obs), columns, n_var, sample.path))
            obs.append(sample.obs)
    write_samples_rows(uri, schema, rows)
    crash_point("worker_group_after_rows")
    fail_point("worker_group_after_rows")
    nnz = [int(p.nnz) for p in parts]
    width = max((p.shape[1] for p in parts), default=0)
    whole = Sample(path=", ".join(m.h5ad for m in members[:3]) + (" ..." if len(members) > 3 else ""),
                   obs=pd.concat(obs), var=pd.DataFrame(index=pd.RangeIndex(width)), measured=None,
                   **_stacked(parts))
    del obs
    written = _ingest(uri, schema, whole, members[0].start, chunk_nnz=chunk_nnz, fence=fence, var_ids=var_ids,
                      columns=np.arange(width, dtype=np.int64))
    ranges = [(r.start, r.start + r.cells) for r in rows]
    counts_uri = layout.members(uri, schema).layers[schema.counts_layer.name]
    if checks.entries_committed_at(counts_uri, written.stamp) == written.nnz:
        return checks.range_stats(uri, schema, ranges, nnz=nnz)
    return checks.range_stats(uri, schema, ranges)  # see ingest_sample


def _stacked(parts: list[sp.csr_matrix | None]) -> dict:
    """The parts' rows one under the other, as a Sample's indptr and x; each part is dropped (from `parts`) once
    copied, so that the group's entries are held about once, not twice as by sp.vstack."""
    held = [p for p in parts if p is not None]
    data = np.empty(sum(p.nnz for p in held), dtype=held[0].data.dtype if held else np.float32)
    indices = np.empty(len(data), dtype=np.int64)
    indptr = np.zeros(sum(p.shape[0] for p in held) + 1, dtype=np.int64)
    del held
    at = row = 0
    for i, part in enumerate(parts):
        assert part is not None
        n, rows = int(part.nnz), part.shape[0]
        data[at:at + n] = part.data
        indices[at:at + n] = part.indices
        indptr[row + 1:row + rows + 1] = part.indptr[1:] + at
        at, row = at + n, row + rows
        parts[i] = None  # np.empty's pages are touched only as they are filled: RSS grows as the parts go
    return {"indptr": indptr, "x": {"data": data, "indices": indices}}


def ingest_h5ad(uri: str, schema: AtlasSchema, h5ad: str, start: int, *, chunk_nnz: int = 5_000_000,
                fence: Callable[[], None] = clock.no_fence, var_ids: pd.Series | None = None) -> IngestStats:
    """Write the h5ad's cells at soma_joinids [start, start+n): obs, then every X layer (see _ingest)."""
    with open_sample(h5ad, schema) as sample:
        return _ingest(uri, schema, sample, start, chunk_nnz=chunk_nnz, fence=fence, var_ids=var_ids)


def _ingest(uri: str, schema: AtlasSchema, sample: Sample, start: int, *, chunk_nnz: int,
            fence: Callable[[], None], var_ids: pd.Series | None, columns: np.ndarray | None = None) -> IngestStats:
    """Write the sample's cells at soma_joinids [start, start+n): obs, then every X layer.

    Cell-optimized layers are written from row chunks, gene-optimized ones from column chunks
    of the same counts, each in its layer's global order without a sort. Derived layers are
    computed from the counts in memory, once per chunk. Safe to run concurrently on disjoint
    ranges once the caller has grown the domains.

    `fence` raises when the apply that runs this step lost the atlas; it is called once the write
    timestamp is fixed and before every X chunk. Why a write that passed it just before a takeover is
    still safe: every write of this ingest is stamped with the time taken *before* the check passed, and
    the apply that took over deletes this range (it is still "allocated" in the state) at a later time,
    which hides the stamped writes however late they land. See README, "Running on a cluster".
    """
    members = layout.members(uri, schema)
    if columns is None:  # else given: a grouped ingest's stacked rows are in atlas columns already
        columns = _column_map(uri, read_var_ids(uri, schema) if var_ids is None else var_ids, sample)
    n_var = int(columns.max()) + 1 if len(columns) else 0
    n_obs = len(sample.obs)
    stop = start + n_obs
    check_room(uri, members, stop, n_var)
    by_cells = [layer for layer in schema.layers if layer.optimize == "cells"]
    by_genes = [layer for layer in schema.layers if layer.optimize == "genes"]
    derived = any(layer.source != "counts" for layer in schema.layers)  # needs each cell's total counts
    with clock.mutation() as stamp, ExitStack() as stack:
        fence()  # after the stamp is fixed: a takeover after this check deletes at a later time
        arrays = {layer.name: stack.enter_context(soma.SparseNDArray.open(members.layers[layer.name], "w",
                                                                            tiledb_timestamp=stamp,
                                                                            context=engine.x_writer_ctx()))
                  for layer in schema.layers}
        with soma.DataFrame.open(members.obs, "w", tiledb_timestamp=stamp, context=engine.ctx()) as obs:
            obs.write(layout.obs_table(sample.obs, schema, start))
        crash_point("worker_ingest_after_obs")
        # Gene-optimized layers need whole genes, i.e. the whole sample: read it once for all layers.
        whole = read_chunk(sample.x, sample.indptr, 0, n_obs, columns, n_var, sample.path) if by_genes else None
        increasing = bool(np.all(columns[1:] > columns[:-1]))
        for lo, hi in row_chunks(sample.indptr, chunk_nnz) if by_cells else ():
            fence()
            chunk = as_chunk(whole[lo:hi]) if whole is not None else cells_chunk(sample, lo, hi, columns, n_var,
                                                                                 increasing)
            rows = major_index(chunk.indptr)
            totals = row_totals(rows, chunk.data, hi - lo)[rows] if derived else None
            rows += start + lo  # in place, as below: each copy of a 5M-entry chunk's coordinates is 40 MB
            _write_chunk(arrays, by_cells, rows, chunk.indices, chunk.data, totals)
        if whole is not None:
            totals = row_totals(major_index(whole.indptr), whole.data, n_obs) if derived else None
            by_column = whole.tocsc()  # of a canonical CSR: rows strictly ascending in each column, (gene, cell)
            del whole
            for lo, hi in row_chunks(by_column.indptr, chunk_nnz):
                fence()
                a, b = int(by_column.indptr[lo]), int(by_column.indptr[hi])
                rows = by_column.indices[a:b]
                genes = major_index(by_column.indptr[lo:hi + 1] - a)
                genes += lo
                cells = rows.astype(np.int64)
                cells += start
                _write_chunk(arrays, by_genes, cells, genes, by_column.data[a:b], totals[rows] if derived else None)
    return IngestStats(cells=n_obs, nnz=int(sample.indptr[-1]), stamp=stamp)


def _write_chunk(arrays: dict[str, soma.SparseNDArray], layers: list[Layer], dim0: np.ndarray, dim1: np.ndarray,
                 counts: np.ndarray, totals: np.ndarray | None) -> None:
    """Write one chunk (already in these layers' global order) to each layer; counts per 10k
    are computed once for all derived layers of the chunk."""
    coords = {"soma_dim_0": dim0, "soma_dim_1": dim1}
    normalized = None
    for layer in layers:
        if layer.source == "counts":
            values = counts
        else:
            if normalized is None:
                normalized = counts / totals * 1e4
            values = normalized if layer.source == "normalized" else np.log1p(normalized)
        arrays[layer.name].write(pa.table({**coords, "soma_data": values.astype(layer.type, copy=False)}),
                                 platform_config=engine.GLOBAL_ORDER)


def _column_map(uri: str, var_ids: pd.Series, sample: Sample) -> np.ndarray:
    """The atlas var joinid of each of the sample's genes, in the sample's order."""
    joinids = var_ids.reindex(sample.var.index.astype(str))
    missing = joinids.index[joinids.isna()]
    if len(missing):
        raise AtlasError(f"{len(missing)} genes of {sample.path} are not in the atlas' var (e.g. {missing[0]})",
                         where=uri, hint="extend_var must run before ingest")
    return joinids.to_numpy(dtype=np.int64)

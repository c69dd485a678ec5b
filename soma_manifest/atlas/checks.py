"""What verify and apply's quick verify read back: cells, obs ids and X entries per obs range, and what lies
outside the ranges."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tiledbsoma as soma

from soma_manifest.atlas import engine, layout
from soma_manifest.atlas.domains import df_size
from soma_manifest.errors import AtlasError
from soma_manifest.schema import AtlasSchema

#: Rows per read when counting X entries. TileDB sizes its read buffers by the query: two
#: 5,000-cell samples (14.5M entries) read at once raised the reader's peak RSS by 525 MB; reading
#: soma_dim_0 alone, 1,000-row reads add ~50 MB and count 30.8M entries in 0.82 s (all three
#: columns in 500-row reads: 1.30 s). An ingest that must count its own sample reads more at a time
#: (see ingest_sample).
_COUNT_ROWS = 1000


@dataclass(frozen=True)
class RangeStats:
    start: int
    stop: int
    cells: int
    obs_ids: int  # distinct obs_ids in the range
    nnz: int | None  # entries of the counts layer; None: not read (an obs-only update, which writes no X)


def range_stats(uri: str, schema: AtlasSchema, ranges: list[tuple[int, int]], *,
                rows_per_read: int = _COUNT_ROWS, nnz: list[int] | None = None) -> list[RangeStats]:
    """Per [start, stop) (disjoint ranges): cells in obs, distinct obs_ids, entries of the counts layer (counted
    `rows_per_read` cells at a time, unless the caller knows them: `nnz`, one per range).

    Read by spans of touching ranges, not range by range: a read per sample's range cost verify 4.3 s of 10 s
    at 400 samples of 50 cells (the reads' fixed cost, not their size)."""
    members = layout.members(uri, schema)
    spans = _spans(ranges)
    with soma.DataFrame.open(members.obs, context=engine.ctx()) as obs:
        table = read_slices(obs, spans, ["soma_joinid", "obs_id"])
    joinids = table["soma_joinid"].to_numpy()
    order = np.argsort(joinids, kind="stable")
    joinids, obs_ids = joinids[order], table["obs_id"].take(pa.array(order))
    cells = []
    for start, stop in ranges:
        a, b = (int(i) for i in np.searchsorted(joinids, [start, stop]))
        cells.append(_cells_and_ids(obs_ids.slice(a, b - a)))
    if nnz is None:
        with soma.SparseNDArray.open(members.layers[schema.counts_layer.name], context=engine.ctx()) as counts:
            nnz = _entries_per_range(counts, ranges, spans, rows_per_read)
    return [RangeStats(start, stop, cells=n_cells, obs_ids=n_ids, nnz=n)
            for (start, stop), (n_cells, n_ids), n in zip(ranges, cells, nnz)]


def obs_rows_as_written(obs: soma.DataFrame, written: pa.Table, start: int) -> RangeStats:
    """The check after an obs-only update: the obs rows of [start, start + rows written) read back (cells, distinct
    obs ids) and compared, joinids and every value, with the rows `written`. X is not read (nnz None): the update wrote none, and reading
    the range's X back to count it was half of an update's time (0.3-0.7 s a sample). Raises AtlasError when a value
    differs."""
    stop = start + len(written)
    got = read_slices(obs, [(start, stop)], written.column_names).sort_by("soma_joinid")
    # pandas' equality: nulls and NaNs in the same places are equal (arrow's is not for NaN).
    if len(got) == len(written) and not got.to_pandas().equals(written.to_pandas()):
        differ = [c for c in written.column_names if not got[c].to_pandas().equals(written[c].to_pandas())]
        raise AtlasError(f"obs rows {start}..{stop} read back differ from those written (columns {', '.join(differ)})",
                         where=obs.uri, hint="run apply again: the sample's obs rows are written again")
    return RangeStats(start, stop, cells=len(got), obs_ids=pc.count_distinct(got["obs_id"]).as_py(), nnz=None)


def _spans(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges merged where they touch or overlap, sorted."""
    spans: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], stop))
        else:
            spans.append((start, stop))
    return spans


def _entries_per_range(x: soma.SparseNDArray, ranges: list[tuple[int, int]], spans: list[tuple[int, int]],
                       rows_per_read: int) -> list[int]:
    """Entries of the array in each of the disjoint half-open row ranges, read by spans, `rows_per_read` rows at
    a time (as count_entries)."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    starts = np.array([ranges[i][0] for i in order], dtype=np.int64)
    stops = np.array([ranges[i][1] for i in order], dtype=np.int64)
    counts = np.zeros(len(ranges), dtype=np.int64)
    for s in _clip(spans, x.shape[0]):
        for lo in range(s.start, s.stop + 1, rows_per_read):
            for t in engine.dim0_tables(x, slice(lo, min(lo + rows_per_read - 1, s.stop))):
                rows = t["soma_dim_0"].to_numpy()
                at = np.searchsorted(starts, rows, side="right") - 1
                inside = (at >= 0) & (rows < stops[np.maximum(at, 0)])
                counts += np.bincount(at[inside], minlength=len(ranges))
    out = [0] * len(ranges)
    for position, i in enumerate(order):
        out[i] = int(counts[position])
    return out


def _cells_and_ids(obs_ids: pa.ChunkedArray) -> tuple[int, int]:
    return len(obs_ids), pc.count_distinct(obs_ids).as_py()


def entries_committed_at(array_uri: str, stamp: int) -> int:
    """Cells of the array's fragments committed at exactly `stamp` (ms), from their fragment metadata.

    Reading a 6.6M-entry sample's range back to count it took 0.16 s; this took 10-25 ms with 50-144
    fragments (each open loads every fragment's metadata, as any open does). Two opens, as the array opened
    at [stamp, stamp] alone lacks the metadata written when it was created. A fragment of another timestamp
    that lands between the opens only makes the difference wrong, and the caller counts.
    """
    before = engine.fragment_cells(array_uri, stamp - 1)
    return engine.fragment_cells(array_uri, stamp) - before


def obs_joinids_outside(uri: str, ranges: list[tuple[int, int]]) -> list[int]:
    """Up to 100 obs soma_joinids outside all the ranges (orphans), lowest first."""
    with layout.open_experiment(uri) as exp:
        obs = exp.obs
        gaps = _gaps(ranges, df_size(obs))
        ids: list[int] = []
        for gap in gaps:
            ids += read_slices(obs, [gap], ["soma_joinid"])["soma_joinid"].slice(0, 100 - len(ids)).to_pylist()
            if len(ids) == 100:
                break
        return ids


def count_x_outside(uri: str, schema: AtlasSchema, ranges: list[tuple[int, int]]) -> int:
    """X entries, summed over all layers, whose cell lies outside all the ranges."""
    total = 0
    for layer_uri in layout.members(uri, schema).layers.values():
        with soma.SparseNDArray.open(layer_uri, context=engine.ctx()) as x:
            total += count_entries(x, _gaps(ranges, x.shape[0]))
    return total


def x_columns(uri: str, schema: AtlasSchema, start: int, stop: int) -> np.ndarray:
    """The var joinids that have an entry in any X layer for cells [start, stop)."""
    found = [np.zeros(0, dtype=np.int64)]
    for layer_uri in layout.members(uri, schema).layers.values():
        with soma.SparseNDArray.open(layer_uri, context=engine.ctx()) as x:
            for s in _clip([(start, stop)], x.shape[0]):
                found += [t["soma_dim_1"].to_numpy() for t in x.read((s,)).tables()]
    return np.unique(np.concatenate(found))


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


def read_slices(df: soma.DataFrame, ranges: list[tuple[int, int]], columns: list[str]) -> pa.Table:
    """These columns of the rows in the half-open ranges."""
    tables = [df.read((s,), column_names=columns).concat() for s in _clip(ranges, df_size(df))]
    return pa.concat_tables(tables) if tables else df.schema.empty_table().select(columns)


def count_entries(x: soma.SparseNDArray, ranges: list[tuple[int, int]], rows_per_read: int = _COUNT_ROWS) -> int:
    """Entries of the array in the half-open row ranges, read `rows_per_read` rows at a time."""
    return sum(len(t) for s in _clip(ranges, x.shape[0])
               for lo in range(s.start, s.stop + 1, rows_per_read)
               for t in engine.dim0_tables(x, slice(lo, min(lo + rows_per_read - 1, s.stop))))

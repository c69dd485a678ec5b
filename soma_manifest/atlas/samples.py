"""The samples table and the feature presence matrix.

A sample gets a fresh sample joinid with every obs range. Its row of the samples table and of the presence
matrix are written by its ingest step, before its cells; the rows of a replaced, removed or interrupted
version are deleted with its obs range (see State.retire_sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma as soma

from soma_manifest.atlas import clock, engine, layout
from soma_manifest.atlas.domains import df_size, read_var_ids
from soma_manifest.errors import AtlasError
from soma_manifest.h5ad import Sample, open_sample
from soma_manifest.schema import AtlasSchema


def write_sample(uri: str, schema: AtlasSchema, sample_joinid: int, key: str, h5ad: str, start: int) -> int:
    """Write the sample's row of the samples table and its presence row (true for every measured gene).
    Runs before its cells are written. Returns the number of measured genes."""
    with open_sample(h5ad, schema) as sample:
        return write_sample_rows(uri, schema, sample_joinid, key, sample, start, read_var_ids(uri, schema))


def write_sample_rows(uri: str, schema: AtlasSchema, sample_joinid: int, key: str, sample: Sample, start: int,
                      var_ids: pd.Series) -> int:
    """write_sample, for a sample already read; `var_ids` as read_var_ids returns them."""
    return write_samples_rows(uri, schema, [sample_row(sample_joinid, key, sample, start, var_ids)])[0]


@dataclass(frozen=True)
class SampleRow:
    """A sample's row of the samples table and its presence columns, made while its h5ad is open: a grouped
    ingest closes each member's file before the rows of all are written."""

    sample_joinid: int
    key: str
    cells: int
    start: int
    columns: np.ndarray  # atlas var joinids of its measured genes, sorted


def sample_row(sample_joinid: int, key: str, sample: Sample, start: int, var_ids: pd.Series) -> SampleRow:
    return SampleRow(sample_joinid, key, len(sample.obs), start,
                     _presence_columns(var_ids, sample.measured_genes, sample.path))


def write_samples_rows(uri: str, schema: AtlasSchema, rows: list[SampleRow]) -> list[int]:
    """The rows of several samples in one mutation: one fragment per array for all of them (a grouped
    ingest). Returns each sample's number of measured genes."""
    samples_uri, presence_uri = layout.sample_members(uri, schema)
    table_rows: dict[str, list] = {name: [] for name in layout.SAMPLES_SCHEMA.names}
    for row in rows:
        study, name = row.key.split("/", 1)
        for field, value in (("soma_joinid", row.sample_joinid), ("sample_id", row.key), ("study", study),
                             ("sample", name), ("cells", row.cells), ("obs_joinid_start", row.start),
                             ("obs_joinid_stop", row.start + row.cells), ("n_measured_genes", len(row.columns))):
            table_rows[field].append(value)
    # the presence matrix is written sorted (rows, then columns), as one sample's rows always were
    ordered = sorted(rows, key=lambda r: r.sample_joinid)
    dim0 = (np.concatenate([np.full(len(r.columns), r.sample_joinid, dtype=np.int64) for r in ordered])
            if rows else np.zeros(0, np.int64))
    dim1 = np.concatenate([r.columns for r in ordered]) if rows else np.zeros(0, np.int64)
    with clock.mutation() as stamp:
        with soma.DataFrame.open(samples_uri, "w", tiledb_timestamp=stamp, context=engine.ctx()) as table:
            table.write(pa.table(table_rows, schema=layout.SAMPLES_SCHEMA))
        with soma.SparseNDArray.open(presence_uri, "w", tiledb_timestamp=stamp, context=engine.ctx()) as presence:
            presence.write(pa.table({"soma_dim_0": dim0, "soma_dim_1": dim1,
                                     "soma_data": np.ones(len(dim0), dtype=bool)}))
    return [len(r.columns) for r in rows]


def _presence_columns(var_ids: pd.Series, genes: pd.Index, where: str) -> np.ndarray:
    joinids = var_ids.reindex(genes.astype(str))
    if joinids.isna().any():
        raise AtlasError(f"genes of {where} are not in the atlas' var (e.g. {joinids.index[joinids.isna()][0]})",
                         where=where, hint="extend_var must run before ingest")
    return np.sort(joinids.to_numpy(dtype=np.int64))


def delete_samples(uri: str, schema: AtlasSchema, sample_joinids: list[int]) -> None:
    """Delete these rows of the samples table and of the presence matrix (absent ones are no error)."""
    samples_uri, presence_uri = layout.sample_members(uri, schema)
    with clock.mutation() as stamp:
        with soma.DataFrame.open(samples_uri, "d", tiledb_timestamp=stamp, context=engine.ctx()) as table:
            inside = [j for j in sample_joinids if j < df_size(table)]
            if inside:
                table.delete_cells((inside,))
        with soma.SparseNDArray.open(presence_uri, "d", tiledb_timestamp=stamp, context=engine.ctx()) as presence:
            inside = [j for j in sample_joinids if j < presence.shape[0]]
            if inside:
                presence.delete_cells((inside,))


def read_samples_table(uri: str, schema: AtlasSchema) -> pd.DataFrame:
    """The samples table, indexed by sample joinid."""
    samples_uri, _ = layout.sample_members(uri, schema)
    with soma.DataFrame.open(samples_uri, context=engine.ctx()) as table:
        return table.read().concat().to_pandas().set_index("soma_joinid")


def read_presence_rows(uri: str, schema: AtlasSchema) -> dict[int, np.ndarray]:
    """Every presence row: sample joinid -> sorted var joinids."""
    _, presence_uri = layout.sample_members(uri, schema)
    with soma.SparseNDArray.open(presence_uri, context=engine.ctx()) as presence:
        table = presence.read().tables().concat()
    rows, cols = table["soma_dim_0"].to_numpy(), table["soma_dim_1"].to_numpy()
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    bounds = np.flatnonzero(np.diff(rows)) + 1
    return {int(r[0]): c for r, c in zip(np.split(rows, bounds), np.split(cols, bounds)) if len(r)}


def read_presence(exp: soma.Experiment, schema: AtlasSchema, samples: dict[int, str]) -> anndata.AnnData:
    """The presence matrix of these samples (sample joinid -> key) as AnnData: obs = the samples table
    indexed by sample key, var indexed by var_id, X bool CSR."""
    table, presence = layout.sample_arrays(exp, schema.measurement, where=exp.uri)
    joinids = np.array(sorted(samples), dtype=np.int64)
    var = exp.ms[schema.measurement].var.read().concat().to_pandas().sort_values("soma_joinid").set_index("var_id")
    if len(joinids):  # empty coordinates would read every row
        obs = table.read((joinids,)).concat().to_pandas()
        entries = presence.read((joinids,)).tables().concat()
        rows = pd.Index(joinids).get_indexer(entries["soma_dim_0"].to_numpy())
        cols = pd.Index(var["soma_joinid"]).get_indexer(entries["soma_dim_1"].to_numpy())
    else:
        obs, rows, cols = layout.SAMPLES_SCHEMA.empty_table().to_pandas(), np.zeros(0, int), np.zeros(0, int)
    obs = obs.set_index("soma_joinid").reindex(joinids)
    obs.index = pd.Index([samples[j] for j in joinids], name="sample_key")
    x = sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=(len(joinids), len(var)))
    return anndata.AnnData(X=x, obs=obs, var=var.drop(columns="soma_joinid"))

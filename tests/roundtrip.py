"""Independent oracles: read the atlas the way a user would and compare with the raw input."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import tiledbsoma

from soma_manifest import atlas


def read_sample_as_user(uri, study: str, sample: str, layer: str = "raw"):
    """The sample's cells via tiledbsoma's query API, as a user reads them."""
    with tiledbsoma.Experiment.open(str(uri), context=atlas.context()) as exp:
        query = exp.axis_query(
            "RNA", obs_query=tiledbsoma.AxisQuery(value_filter=f"study_name == '{study}' and sample_name == '{sample}'"))
        return query.to_anndata(X_name=layer)


def assert_counts_equal(adata, study: str, sample: str, counts: sp.spmatrix, barcodes, gene_ids) -> None:
    """Cell by cell (obs_id) and gene by gene (var_id), the atlas equals `counts` (cells x genes)."""
    expected_ids = [f"{study}/{sample}/{b}" for b in barcodes]
    got_ids = adata.obs_names.astype(str).tolist()  # to_anndata indexes obs by obs_id
    assert sorted(got_ids) == sorted(expected_ids), "the atlas holds other cells than the input"
    assert len(set(got_ids)) == len(got_ids)
    row_of = {obs_id: i for i, obs_id in enumerate(got_ids)}
    rows = np.array([row_of[i] for i in expected_ids])
    col_of = {v: j for j, v in enumerate(adata.var_names.astype(str))}
    cols = np.array([col_of.get(g, -1) for g in gene_ids])
    got = sp.csr_matrix(adata.X)[rows]
    expected = sp.csr_matrix(counts)
    present = cols >= 0
    # Genes with counts must all be in the atlas; absent ones must be all-zero in the input.
    assert expected[:, np.flatnonzero(~present)].nnz == 0, "genes with counts are missing from the atlas"
    aligned = sp.csr_matrix(got[:, cols[present]])
    assert (aligned != expected[:, np.flatnonzero(present)]).nnz == 0, "counts differ"
    assert got.sum() == expected.sum(), "the atlas holds counts for genes the sample does not have"

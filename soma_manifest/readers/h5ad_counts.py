"""AnnData h5ad inputs: raw counts from raw.X or X, features by the common var column conventions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from soma_manifest.errors import SourceError
from soma_manifest.readers.common import (GENE_EXPRESSION, RawCounts, canonical, check_barcodes, check_lengths,
                                          open_hdf5, sparse_place, validated_counts)

_H5AD_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id")
_H5AD_SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "feature_name")
_H5AD_TYPE_COLUMNS = ("feature_types", "feature_type")


def read_h5ad(path: Path) -> RawCounts:
    """Read raw counts from raw.X (when integer) or X, with obs as the cell annotations."""
    from anndata.io import read_elem  # anndata is slow to import; keep it off plan's path

    path = Path(path)
    with open_hdf5(path) as h5:
        if not ("obs" in h5 and "var" in h5):
            raise SourceError(f"not an AnnData file: no obs/var; top-level entries: {', '.join(sorted(h5))}",
                              where=path, hint="expected an .h5ad file written by anndata >= 0.7")
        obs = read_elem(h5["obs"])
        barcodes = obs.index.astype(str).to_numpy(dtype=object)
        check_barcodes(barcodes, f"{path}:obs", unit="row")
        counts, var = _h5ad_counts(h5, path, barcodes, read_elem)
    ids, names, types = _h5ad_features(var, path)
    check_lengths(str(path), {"cells": (len(barcodes), counts.shape[0]),
                               "features": (len(ids), counts.shape[1])})
    obs.index = pd.Index(barcodes, name=obs.index.name)
    return RawCounts(counts, barcodes, ids, names, types, obs)


def _h5ad_counts(h5: h5py.File, path: Path, barcodes: np.ndarray,
                 read_elem: Callable) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """The first of raw.X, X that holds raw counts, with its var; else one error about both."""
    candidates = [("raw.X", "raw/X", "raw/var"), ("X", "X", "var")]
    problems = []
    for label, x_key, var_key in candidates:
        if x_key not in h5:
            problems.append(f"{label} is absent")
            continue
        var = read_elem(h5[var_key])
        matrix = sp.csr_matrix(read_elem(h5[x_key]))
        gene_names = var.index.astype(str).to_numpy(dtype=object)
        try:
            counts = validated_counts(matrix.data, lambda k: (str(path), sparse_place(
                matrix.indptr, matrix.indices, k, rows=barcodes, cols=gene_names,
                row_kind="cell", col_kind="gene")))
        except SourceError as exc:
            problems.append(f"{label}: {exc.message}")
            continue
        return canonical(sp.csr_matrix((counts, matrix.indices, matrix.indptr), shape=matrix.shape)), var
    layers = sorted(h5["layers"]) if isinstance(h5.get("layers"), h5py.Group) else []
    raise SourceError(
        "no raw integer counts in raw.X or X; " + "; ".join(problems), where=path,
        hint="store the unnormalised UMI counts in X or raw.X"
        + (f" (the file has layers: {', '.join(layers)})" if layers else ""))


def _h5ad_features(var: pd.DataFrame, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, symbols, types) from var, following the common column conventions."""
    index = var.index.astype(str).to_numpy(dtype=object)
    id_column = _first_column(var, _H5AD_ID_COLUMNS)
    if id_column:
        ids, names = _var_column(var, id_column, path), index
    else:
        symbol_column = _first_column(var, _H5AD_SYMBOL_COLUMNS)
        ids = index
        names = _var_column(var, symbol_column, path) if symbol_column else index.copy()
    type_column = _first_column(var, _H5AD_TYPE_COLUMNS)
    types = (_var_column(var, type_column, path) if type_column
             else np.full(len(ids), GENE_EXPRESSION, dtype=object))
    return ids, names, types


def _first_column(frame: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in frame.columns), None)


def _var_column(var: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    values = var[column]
    missing = np.flatnonzero(values.isna().to_numpy())
    if len(missing):
        raise SourceError(f"var column {column!r} has {len(missing)} missing values, first at row {missing[0]}"
                          f" ({var.index[missing[0]]!r})", where=path, hint="fill in every feature's value")
    return values.astype(str).to_numpy(dtype=object)

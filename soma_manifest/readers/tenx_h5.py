"""Cell Ranger HDF5 matrices: v3+ ("matrix" group) or v2 (one genome-named group)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from soma_manifest.errors import SourceError
from soma_manifest.readers.common import (GENE_EXPRESSION, RawCounts, canonical, check_barcodes, check_compressed,
                                          check_lengths, open_hdf5, sparse_place, validated_counts)


def read_10x_h5(path: Path) -> RawCounts:
    """Read a Cell Ranger HDF5 matrix: v3+ ("matrix" group) or v2 (one genome-named group)."""
    path = Path(path)
    with open_hdf5(path) as h5:
        group = _cellranger_group(h5, path)
        if "features" in group:
            ids = _h5_strings(group, "features/id", path)
            names = _h5_strings(group, "features/name", path)
            types = (_h5_strings(group, "features/feature_type", path) if "features/feature_type" in group
                     else np.full(len(ids), GENE_EXPRESSION, dtype=object))
        else:
            ids = _h5_strings(group, "genes", path)
            names = _h5_strings(group, "gene_names", path)
            types = np.full(len(ids), GENE_EXPRESSION, dtype=object)
        barcodes = _h5_strings(group, "barcodes", path)
        check_barcodes(barcodes, f"{path}:{group.name}/barcodes", unit="row")
        data, indices, indptr, shape = (_h5_array(group, name, path)
                                        for name in ("data", "indices", "indptr", "shape"))
        where = f"{path}:{group.name}"
    if shape.shape != (2,):
        raise SourceError(f"dataset shape holds {shape.shape} values, expected 2", where=where,
                          hint="the file is corrupt; regenerate it")
    n_features, n_cells = (int(n) for n in shape)
    check_lengths(where, {"barcodes": (len(barcodes), n_cells), "features": (len(ids), n_features)})
    check_compressed(where, data, indices, indptr, n_major=n_cells, n_minor=n_features)
    counts = validated_counts(data, lambda k: (where, sparse_place(
        indptr, indices, k, rows=barcodes, cols=ids, row_kind="barcode", col_kind="feature")))
    matrix = canonical(sp.csr_matrix((counts, indices, indptr), shape=(n_cells, n_features)))
    return RawCounts(matrix, barcodes, ids, names, types, None)


def _cellranger_group(h5: h5py.File, path: Path) -> h5py.Group:
    if isinstance(h5.get("matrix"), h5py.Group):
        return h5["matrix"]
    genomes = [name for name, item in h5.items()
               if isinstance(item, h5py.Group) and "genes" in item and "gene_names" in item]
    if len(genomes) == 1:
        return h5[genomes[0]]
    if genomes:
        raise SourceError(f"Cell Ranger 2 file with {len(genomes)} genomes ({', '.join(genomes)})",
                          where=path, hint="split it into one file per genome, or use the MTX folders")
    looks_like_h5ad = "obs" in h5 and "var" in h5
    raise SourceError(
        f"not a Cell Ranger matrix file: no 'matrix' group; top-level entries: {', '.join(sorted(h5)) or 'none'}",
        where=path, hint="this looks like an AnnData file; declare it with format h5ad" if looks_like_h5ad
        else "expected Cell Ranger's filtered_feature_bc_matrix.h5")


def _h5_array(group: h5py.Group, name: str, path: Path) -> np.ndarray:
    item = group.get(name)
    if not isinstance(item, h5py.Dataset):
        raise SourceError(f"missing dataset {group.name}/{name}", where=path,
                          hint="the Cell Ranger file is incomplete; regenerate it")
    return item[()]


def _h5_strings(group: h5py.Group, name: str, path: Path) -> np.ndarray:
    values = _h5_array(group, name, path)
    if values.dtype.kind not in "SUO":
        raise SourceError(f"dataset {group.name}/{name} holds {values.dtype} values, expected strings",
                          where=path, hint="the Cell Ranger file is corrupt; regenerate it")
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8").astype(object)
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=object)

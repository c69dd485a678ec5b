"""Readers for raw single-cell counts: Cell Ranger MTX folders, Cell Ranger HDF5, AnnData h5ad.

Every reader returns `RawCounts` (cells x features, canonical CSR of int32 counts) or raises
one `SourceError` that names the file (and line or row) and says what to fix.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fast_matrix_market as fmm
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from isal import igzip, isal_zlib

from soma_manifest.errors import SourceError
from soma_manifest.sources import mtx_files

FORMATS = ("mtx", "10x_h5", "h5ad")
GENE_EXPRESSION = "Gene Expression"
COUNT_DTYPE = np.int32
_MAX_COUNT = np.iinfo(COUNT_DTYPE).max
_GZIP_MAGIC = b"\x1f\x8b"

_MTX_FIELDS = {b"integer", b"unsigned-integer", b"real", b"double"}
_H5AD_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id")
_H5AD_SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "feature_name")
_H5AD_TYPE_COLUMNS = ("feature_types", "feature_type")


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make == and hash meaningless
class RawCounts:
    """One sample's raw UMI counts with its cell and feature labels."""

    counts: sp.csr_matrix  # cells x features, int32, canonical, no explicit zeros
    barcodes: np.ndarray  # str (object), unique
    feature_ids: np.ndarray  # str: Ensembl id when the input has one, else the symbol
    feature_names: np.ndarray  # str: gene symbols (== feature_ids when the input has none)
    feature_types: np.ndarray  # str, e.g. "Gene Expression", "Antibody Capture"
    cell_annotations: pd.DataFrame | None  # h5ad only: the input's obs, indexed by barcode


# --- dispatch ----------------------------------------------------------------------------------

def read_sample(fmt: str, path: Path) -> RawCounts:
    """Read one sample of format "mtx" (a folder), "10x_h5" or "h5ad" (a file)."""
    readers: dict[str, Callable[[Path], RawCounts]] = {
        "mtx": read_mtx_dir, "10x_h5": read_10x_h5, "h5ad": read_h5ad}
    _check_format(fmt, path)
    return readers[fmt](Path(path))


def _check_format(fmt: str, path: Path) -> None:
    if fmt not in FORMATS:
        raise SourceError(f"unknown sample format {fmt!r}", where=path,
                          hint=f"use one of {', '.join(FORMATS)}")


# --- Cell Ranger MTX folder ----------------------------------------------------------------------

def read_mtx_dir(folder: Path) -> RawCounts:
    """Read a Cell Ranger v2 (genes.tsv) or v3 (features.tsv) MTX folder, .gz or plain files."""
    files = mtx_files(Path(folder))
    barcodes = _read_barcodes(files["barcodes"])
    feature_ids, feature_names, feature_types = _read_features(files["features"])
    counts = _read_mtx_matrix(files, n_cells=len(barcodes), n_features=len(feature_ids),
                              label=lambda row, col: f"feature {feature_ids[row]!r}, barcode {barcodes[col]!r}")
    return RawCounts(counts, barcodes, feature_ids, feature_names, feature_types, None)


def _read_barcodes(path: Path) -> np.ndarray:
    text = _read_text(path)
    lines = text.splitlines()
    # Raw (unfiltered) matrices have millions of barcodes: split per line only when needed.
    if "\t" in text:
        lines = [line.split("\t", 1)[0] for line in lines]
    barcodes = np.array(lines, dtype=object)
    _check_barcodes(barcodes, path, unit="line")
    return barcodes


def _read_features(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, names, types) from features.tsv (id, name, type, ...) or genes.tsv (id, name)."""
    lines = _read_text(path).splitlines()
    table = _same_width_table(lines)
    if table is None or not all(table[:, 0]) or (table.shape[1] > 1 and not all(table[:, 1])):
        table = _checked_feature_rows(lines, path)  # names the first bad line
    ids = table[:, 0].copy()
    names = table[:, 1].copy() if table.shape[1] > 1 else ids.copy()
    types = table[:, 2].copy() if table.shape[1] > 2 else np.full(len(ids), GENE_EXPRESSION, dtype=object)
    return ids, names, types


def _same_width_table(lines: list[str]) -> np.ndarray | None:
    """The lines' tab-separated fields (up to 3) as an object array, split in one call, when every line
    has as many fields; else None. One split per line took ~5x longer on 20,000 features."""
    tabs = lines[0].count("\t") if lines else -1
    if tabs < 0 or not all(line.count("\t") == tabs for line in lines):
        return None
    return np.array("\t".join(lines).split("\t"), dtype=object).reshape(len(lines), tabs + 1)[:, :3]


def _checked_feature_rows(lines: list[str], path: Path) -> np.ndarray:
    """The features' first (up to 3) columns, or a SourceError naming the first line that lacks one."""
    rows = [line.split("\t") for line in lines]
    if not rows:
        raise SourceError("the features file is empty", where=path,
                          hint="a sample needs at least one feature")
    width = min(len(rows[0]), 3)
    for number, row in enumerate(rows, start=1):
        if len(row) < width or not row[0] or (width > 1 and not row[1]):
            columns = ", ".join(("id", "name", "type")[:width])
            raise SourceError(f"expected {width} tab-separated columns ({columns}), found {row!r}",
                              where=f"{path}:{number}", hint="fix or regenerate the features file")
    table = np.empty((len(rows), width), dtype=object)
    table[:] = [row[:width] for row in rows]
    return table


def _read_text(path: Path) -> str:
    with _open_bytes(path) as stream:
        raw = stream.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"not UTF-8 text (byte {exc.start})", where=path,
                          hint="expected a tab-separated text file") from None


def _read_mtx_matrix(files: dict[str, Path], n_cells: int, n_features: int,
                     label: Callable[[int, int], str]) -> sp.csr_matrix:
    """Parse the features x cells Matrix Market file into a cells x features CSR matrix."""
    path = files["matrix"]
    with _open_bytes(path) as stream:
        header, size_line, (n_rows, n_cols, nnz) = _read_mtx_header(stream, path)
        _check_mtx_shape(files, size_line, (n_rows, n_cols), n_features=n_features, n_cells=n_cells)
        # fmm truncates "0.5" to 0 in an "integer" file; parsing every file as real keeps the
        # fraction so that validation can refuse it. Header lines are kept for fmm's line numbers.
        source = io.BufferedReader(_Prefixed(header, stream), buffer_size=1 << 20)
        try:
            (values, (rows, cols)), _ = fmm.read_coo(source)
        except (ValueError, OverflowError) as exc:
            raise _fmm_error(path, exc, nnz) from exc
    first_entry_line = size_line + 1  # Cell Ranger writes one entry per line after the size line
    counts = _validated_counts(values, lambda k: (
        f"{path}:{first_entry_line + k}",
        f"row {rows[k] + 1}, column {cols[k] + 1} ({label(int(rows[k]), int(cols[k]))})"))
    return _cells_by_features(counts, rows, cols, n_cells, n_features)


def _cells_by_features(counts: np.ndarray, features: np.ndarray, cells: np.ndarray, n_cells: int,
                       n_features: int) -> sp.csr_matrix:
    """The canonical cells x features CSR matrix of a features x cells COO one.

    Cell Ranger writes its entries cell by cell, features ascending within each: that order already is
    the CSR layout, which one vectorized check confirms (~35 ms with the index arrays on 8.7M entries,
    against ~65 ms for scipy's COO to CSR conversion). Any other order goes through scipy.
    """
    if not np.all((cells[1:] > cells[:-1]) | ((cells[1:] == cells[:-1]) & (features[1:] > features[:-1]))):
        return _canonical(sp.csr_matrix((counts, (cells, features)), shape=(n_cells, n_features)))
    # the needles in the haystack's dtype (int32 from fmm): mixed dtypes take a ~70x slower path
    indptr = np.searchsorted(cells, np.arange(n_cells + 1, dtype=cells.dtype))
    index_type = np.int32 if max(n_features, len(counts)) < np.iinfo(np.int32).max else np.int64
    matrix = sp.csr_matrix((counts, features.astype(index_type, copy=False), indptr.astype(index_type, copy=False)),
                           shape=(n_cells, n_features))
    matrix.has_sorted_indices = True  # strictly ascending features within each cell: no duplicates either
    matrix.has_canonical_format = True
    matrix.eliminate_zeros()
    return matrix


class _Prefixed(io.RawIOBase):
    """A stream that yields `prefix` and then the rest of `stream`."""

    def __init__(self, prefix: bytes, stream: BinaryIO) -> None:
        super().__init__()
        self._prefix = memoryview(prefix)
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._stream.readinto(buffer)  # type: ignore[attr-defined]


def _read_mtx_header(stream: BinaryIO, path: Path) -> tuple[bytes, int, tuple[int, int, int]]:
    """Read up to the size line: (header with the field set to real, size line number, (rows, cols, nnz))."""
    banner = stream.readline(4096)
    tokens = banner.lower().split()
    if len(tokens) != 5 or tokens[:2] != [b"%%matrixmarket", b"matrix"]:
        first = banner[:60].decode("utf-8", "replace").strip() or "(empty)"
        raise SourceError(f"not a Matrix Market file; the first line is {first!r}", where=f"{path}:1",
                          hint="expected '%%MatrixMarket matrix coordinate integer general' as Cell Ranger writes")
    _, _, layout, field, symmetry = tokens
    if layout != b"coordinate" or field not in _MTX_FIELDS or symmetry != b"general":
        raise SourceError(f"unsupported Matrix Market header {banner.decode('utf-8', 'replace').strip()!r}",
                          where=f"{path}:1", hint="counts must be 'coordinate integer general' (or real)")
    lines = [b"%%MatrixMarket matrix coordinate real general\n"]
    while line := stream.readline(1 << 20):
        lines.append(line)
        if line.strip() and not line.startswith(b"%"):
            return b"".join(lines), len(lines), _parse_size_line(line, path, len(lines))
    raise SourceError("the file ends before the size line (rows, columns, entries)",
                      where=path, hint="the file is truncated; copy or regenerate it")


def _parse_size_line(line: bytes, path: Path, number: int) -> tuple[int, int, int]:
    try:
        n_rows, n_cols, nnz = (int(token) for token in line.split())
    except ValueError:
        raise SourceError(f"expected 'rows columns entries', found {line[:60].decode('utf-8', 'replace').strip()!r}",
                          where=f"{path}:{number}", hint="the Matrix Market header is corrupt") from None
    if min(n_rows, n_cols, nnz) < 0 or nnz > n_rows * n_cols:
        raise SourceError(f"impossible size line: {n_rows} rows, {n_cols} columns, {nnz} entries",
                          where=f"{path}:{number}", hint="the Matrix Market header is corrupt")
    return n_rows, n_cols, nnz


def _check_mtx_shape(files: dict[str, Path], size_line: int, shape: tuple[int, int], *,
                     n_features: int, n_cells: int) -> None:
    """Cell Ranger matrices are features x barcodes; both must match the label files."""
    n_rows, n_cols = shape
    if (n_rows, n_cols) == (n_features, n_cells):
        return
    problems = []
    if n_rows != n_features:
        problems.append(f"{n_rows} rows but {files['features'].name} lists {n_features} features")
    if n_cols != n_cells:
        problems.append(f"{n_cols} columns but {files['barcodes'].name} lists {n_cells} barcodes")
    transposed = (n_rows, n_cols) == (n_cells, n_features)
    raise SourceError(
        f"{files['matrix'].name} has {' and '.join(problems)}", where=f"{files['matrix']}:{size_line}",
        hint="the matrix looks transposed: rows must be features, columns barcodes" if transposed
        else "the matrix, barcodes and features files must come from the same Cell Ranger run")


_FMM_LINE = re.compile(r"^Line (\d+): (.*)$", re.DOTALL)


def _fmm_error(path: Path, exc: Exception, nnz: int) -> SourceError:
    text = str(exc)
    match = _FMM_LINE.match(text)
    where = f"{path}:{match.group(1)}" if match else path
    detail = match.group(2) if match else text
    return SourceError(f"invalid Matrix Market data: {detail} (the header announces {nnz} entries)",
                       where=where, hint="the file is truncated or corrupt; copy or regenerate it")


# --- Cell Ranger HDF5 --------------------------------------------------------------------------

def read_10x_h5(path: Path) -> RawCounts:
    """Read a Cell Ranger HDF5 matrix: v3+ ("matrix" group) or v2 (one genome-named group)."""
    path = Path(path)
    with _open_hdf5(path) as h5:
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
        _check_barcodes(barcodes, f"{path}:{group.name}/barcodes", unit="row")
        data, indices, indptr, shape = (_h5_array(group, name, path)
                                        for name in ("data", "indices", "indptr", "shape"))
        where = f"{path}:{group.name}"
    if shape.shape != (2,):
        raise SourceError(f"dataset shape holds {shape.shape} values, expected 2", where=where,
                          hint="the file is corrupt; regenerate it")
    n_features, n_cells = (int(n) for n in shape)
    _check_lengths(where, {"barcodes": (len(barcodes), n_cells), "features": (len(ids), n_features)})
    _check_compressed(where, data, indices, indptr, n_major=n_cells, n_minor=n_features)
    counts = _validated_counts(data, lambda k: (where, _sparse_place(
        indptr, indices, k, rows=barcodes, cols=ids, row_kind="barcode", col_kind="feature")))
    matrix = _canonical(sp.csr_matrix((counts, indices, indptr), shape=(n_cells, n_features)))
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


def _check_lengths(where: str, lengths: dict[str, tuple[int, int]]) -> None:
    for what, (found, expected) in lengths.items():
        if found != expected:
            raise SourceError(f"the matrix has {expected} {what} but {found} are listed", where=where,
                              hint="the file is corrupt; regenerate it")


def _check_compressed(where: str, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, *,
                      n_major: int, n_minor: int) -> None:
    """Check a compressed sparse layout before scipy trusts it."""
    ok = (len(indptr) == n_major + 1 and len(indices) == len(data) and indptr[0] == 0
          and indptr[-1] == len(data) and bool(np.all(np.diff(indptr) >= 0))
          and (len(indices) == 0 or (indices.min() >= 0 and indices.max() < n_minor)))
    if not ok:
        raise SourceError("the sparse matrix structure (data/indices/indptr/shape) is inconsistent",
                          where=where, hint="the file is corrupt; regenerate it")


# --- AnnData h5ad ------------------------------------------------------------------------------

def read_h5ad(path: Path) -> RawCounts:
    """Read raw counts from raw.X (when integer) or X, with obs as the cell annotations."""
    from anndata.io import read_elem  # anndata is slow to import; keep it off plan's path

    path = Path(path)
    with _open_hdf5(path) as h5:
        if not ("obs" in h5 and "var" in h5):
            raise SourceError(f"not an AnnData file: no obs/var; top-level entries: {', '.join(sorted(h5))}",
                              where=path, hint="expected an .h5ad file written by anndata >= 0.7")
        obs = read_elem(h5["obs"])
        barcodes = obs.index.astype(str).to_numpy(dtype=object)
        _check_barcodes(barcodes, f"{path}:obs", unit="row")
        counts, var = _h5ad_counts(h5, path, barcodes, read_elem)
    ids, names, types = _h5ad_features(var, path)
    _check_lengths(str(path), {"cells": (len(barcodes), counts.shape[0]),
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
            counts = _validated_counts(matrix.data, lambda k: (str(path), _sparse_place(
                matrix.indptr, matrix.indices, k, rows=barcodes, cols=gene_names,
                row_kind="cell", col_kind="gene")))
        except SourceError as exc:
            problems.append(f"{label}: {exc.message}")
            continue
        return _canonical(sp.csr_matrix((counts, matrix.indices, matrix.indptr), shape=matrix.shape)), var
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


# --- shared checks -----------------------------------------------------------------------------

def _check_barcodes(barcodes: np.ndarray, where: str | Path, unit: str) -> None:
    """A sample needs cells, and a barcode names one cell. `unit` is "line" or "row" (1-based)."""
    if len(barcodes) == 0:
        raise SourceError("the sample has no cells (no barcodes)", where=where,
                          hint="remove the sample from the manifest or supply its cells")
    empty = np.flatnonzero(barcodes == "")
    if len(empty):
        raise SourceError(f"empty barcode on {unit} {empty[0] + 1}", where=where,
                          hint="every cell needs a barcode")
    duplicated = pd.Index(barcodes).duplicated(keep=False)
    if duplicated.any():
        barcode = barcodes[duplicated][0]
        places = np.flatnonzero(barcodes == barcode) + 1
        n_dup = len(set(barcodes[duplicated]))
        raise SourceError(
            f"duplicate barcode {barcode!r} on {unit}s {', '.join(map(str, places))}"
            + (f" ({n_dup} barcodes are duplicated)" if n_dup > 1 else ""),
            where=where, hint="barcodes must be unique within a sample; was a file concatenated twice?")


def _validated_counts(values: np.ndarray, place: Callable[[int], tuple[str, str]]) -> np.ndarray:
    """`values` as int32 raw counts, or a SourceError at the first value that is not one.

    `place(k)` returns (where, description) for the k-th value.
    """
    if values.dtype.kind not in "iuf":
        raise SourceError(f"counts have dtype {values.dtype}; expected integers",
                          where=place(0)[0] if len(values) else None, hint="store raw integer UMI counts")
    # Fast path, two passes: every value survives the cast to int32 unchanged and none is negative.
    with np.errstate(invalid="ignore"):
        counts = values.astype(COUNT_DTYPE)
    if np.array_equal(counts, values) and (len(counts) == 0 or counts.min() >= 0):
        return counts
    checks = [("negative", "counts must be non-negative raw UMI counts", values < 0)]
    if values.dtype.kind == "f":
        checks.append(("non-integer", "counts must be raw integer UMI counts",
                       ~np.isfinite(values) | (values != np.round(values))))
    checks.append(("too large", f"counts above {_MAX_COUNT} are not UMI counts", values > _MAX_COUNT))
    for what, message, bad in checks:
        hits = np.flatnonzero(bad)
        if len(hits):
            where, description = place(int(hits[0]))
            more = f" ({len(hits) - 1} more {what} values)" if len(hits) > 1 else ""
            raise SourceError(f"{message}; found {values[hits[0]]:g} at {description}{more}", where=where,
                              hint="supply the unnormalised count matrix, not normalised or log values")
    return values.astype(COUNT_DTYPE, copy=False)


def _sparse_place(indptr: np.ndarray, indices: np.ndarray, k: int, *, rows: np.ndarray,
                  cols: np.ndarray, row_kind: str, col_kind: str) -> str:
    """Describe where the k-th stored value of a compressed sparse matrix (rows = major axis) is."""
    row = int(np.searchsorted(indptr, k, side="right")) - 1
    col = int(indices[k])
    return f"{row_kind} {rows[row]!r} (row {row + 1}), {col_kind} {cols[col]!r} (column {col + 1})"


def _canonical(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Sorted indices, duplicates summed, explicit zeros dropped."""
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    matrix.sort_indices()
    return matrix


# --- file access -------------------------------------------------------------------------------

@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn OS and gzip failures while reading `path` into one SourceError."""
    try:
        yield
    except EOFError as exc:
        raise SourceError("the gzip stream ends early: the file is truncated", where=path,
                          hint="copy or download the file again") from exc
    except (igzip.BadGzipFile, isal_zlib.error) as exc:
        raise SourceError(f"corrupt gzip data ({exc})", where=path,
                          hint="copy or download the file again") from exc
    except OSError as exc:
        raise SourceError(f"cannot read the file: {exc.strerror or exc}", where=path,
                          hint="check that the path is a readable file") from exc


@contextlib.contextmanager
def _open_bytes(path: Path) -> Iterator[BinaryIO]:
    """Open a text or Matrix Market file, decompressing when it is gzip; the suffix must agree."""
    with _reading(path), open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        gz_suffix = path.name.endswith(".gz")
        if gz_suffix and not magic:
            raise SourceError("the file is empty (0 bytes)", where=path, hint="copy or regenerate the file")
        if gz_suffix != (magic == _GZIP_MAGIC):
            state = "is not gzip-compressed despite its .gz suffix" if gz_suffix \
                else "is gzip-compressed but lacks the .gz suffix"
            raise SourceError(f"the file {state}", where=path,
                              hint="compress it with gzip" if gz_suffix else "rename it to end in .gz")
        # python-isal's igzip inflates about 2x faster than zlib, with the same errors.
        with igzip.IGzipFile(fileobj=raw, mode="rb") if gz_suffix else contextlib.nullcontext(raw) as stream:
            yield stream


@contextlib.contextmanager
def _open_hdf5(path: Path) -> Iterator[h5py.File]:
    with _reading(path):
        with open(path, "rb"):  # surfaces missing files and permissions as plain OS errors
            pass
        if not h5py.is_hdf5(path):
            raise SourceError("not an HDF5 file", where=path,
                              hint="expected a Cell Ranger .h5 or AnnData .h5ad file")
        # No HDF5 file locking: raw inputs are read-only and often on mounts where locks fail.
        with h5py.File(path, "r", locking=False) as h5:
            yield h5

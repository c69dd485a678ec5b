"""What every reader shares: the RawCounts they return, the checks of barcodes, counts and sparse layouts,
and file access that turns OS and gzip failures into one located SourceError."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from isal import igzip, isal_zlib

from soma_manifest.errors import SourceError

GENE_EXPRESSION = "Gene Expression"
COUNT_DTYPE = np.int32
MAX_COUNT = np.iinfo(COUNT_DTYPE).max
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make == and hash meaningless
class RawCounts:
    """One sample's raw UMI counts with its cell and feature labels."""

    counts: sp.csr_matrix  # cells x features, int32, canonical, no explicit zeros
    barcodes: np.ndarray  # str (object), unique
    feature_ids: np.ndarray  # str: Ensembl id when the input has one, else the symbol
    feature_names: np.ndarray  # str: gene symbols (== feature_ids when the input has none)
    feature_types: np.ndarray  # str, e.g. "Gene Expression", "Antibody Capture"
    cell_annotations: pd.DataFrame | None  # h5ad only: the input's obs, indexed by barcode


def check_lengths(where: str, lengths: dict[str, tuple[int, int]]) -> None:
    for what, (found, expected) in lengths.items():
        if found != expected:
            raise SourceError(f"the matrix has {expected} {what} but {found} are listed", where=where,
                              hint="the file is corrupt; regenerate it")


def check_compressed(where: str, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, *,
                      n_major: int, n_minor: int) -> None:
    """Check a compressed sparse layout before scipy trusts it."""
    ok = (len(indptr) == n_major + 1 and len(indices) == len(data) and indptr[0] == 0
          and indptr[-1] == len(data) and bool(np.all(np.diff(indptr) >= 0))
          and (len(indices) == 0 or (indices.min() >= 0 and indices.max() < n_minor)))
    if not ok:
        raise SourceError("the sparse matrix structure (data/indices/indptr/shape) is inconsistent",
                          where=where, hint="the file is corrupt; regenerate it")


def check_barcodes(barcodes: np.ndarray, where: str | Path, unit: str) -> None:
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


def validated_counts(values: np.ndarray, place: Callable[[int], tuple[str, str]]) -> np.ndarray:
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
    checks.append(("too large", f"counts above {MAX_COUNT} are not UMI counts", values > MAX_COUNT))
    for what, message, bad in checks:
        hits = np.flatnonzero(bad)
        if len(hits):
            where, description = place(int(hits[0]))
            more = f" ({len(hits) - 1} more {what} values)" if len(hits) > 1 else ""
            raise SourceError(f"{message}; found {values[hits[0]]:g} at {description}{more}", where=where,
                              hint="supply the unnormalised count matrix, not normalised or log values")
    return values.astype(COUNT_DTYPE, copy=False)


def sparse_place(indptr: np.ndarray, indices: np.ndarray, k: int, *, rows: np.ndarray,
                  cols: np.ndarray, row_kind: str, col_kind: str) -> str:
    """Describe where the k-th stored value of a compressed sparse matrix (rows = major axis) is."""
    row = int(np.searchsorted(indptr, k, side="right")) - 1
    col = int(indices[k])
    return f"{row_kind} {rows[row]!r} (row {row + 1}), {col_kind} {cols[col]!r} (column {col + 1})"


def canonical(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Sorted indices, duplicates summed, explicit zeros dropped."""
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    matrix.sort_indices()
    return matrix


def read_text(path: Path) -> str:
    with open_bytes(path) as stream:
        raw = stream.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"not UTF-8 text (byte {exc.start})", where=path,
                          hint="expected a tab-separated text file") from None


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
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
def open_bytes(path: Path) -> Iterator[BinaryIO]:
    """Open a text or Matrix Market file, decompressing when it is gzip; the suffix must agree."""
    with reading(path), open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        gz_suffix = path.name.endswith(".gz")
        if gz_suffix and not magic:
            raise SourceError("the file is empty (0 bytes)", where=path, hint="copy or regenerate the file")
        if gz_suffix != (magic == GZIP_MAGIC):
            state = "is not gzip-compressed despite its .gz suffix" if gz_suffix \
                else "is gzip-compressed but lacks the .gz suffix"
            raise SourceError(f"the file {state}", where=path,
                              hint="compress it with gzip" if gz_suffix else "rename it to end in .gz")
        # python-isal's igzip inflates about 2x faster than zlib, with the same errors.
        with igzip.IGzipFile(fileobj=raw, mode="rb") if gz_suffix else contextlib.nullcontext(raw) as stream:
            yield stream


@contextlib.contextmanager
def open_hdf5(path: Path) -> Iterator[h5py.File]:
    with reading(path):
        with open(path, "rb"):  # surfaces missing files and permissions as plain OS errors
            pass
        if not h5py.is_hdf5(path):
            raise SourceError("not an HDF5 file", where=path,
                              hint="expected a Cell Ranger .h5 or AnnData .h5ad file")
        # No HDF5 file locking: raw inputs are read-only and often on mounts where locks fail.
        with h5py.File(path, "r", locking=False) as h5:
            yield h5

"""Readers for raw single-cell counts: Cell Ranger MTX folders, Cell Ranger HDF5, AnnData h5ad.

Every reader returns `RawCounts` (cells x features, canonical CSR of int32 counts) or raises
one `SourceError` that names the file (and line or row) and says what to fix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from soma_manifest.errors import SourceError
from soma_manifest.readers.common import COUNT_DTYPE, GENE_EXPRESSION, RawCounts
from soma_manifest.readers.h5ad_counts import read_h5ad
from soma_manifest.readers.mtx import read_mtx_dir
from soma_manifest.readers.tenx_h5 import read_10x_h5

__all__ = ["FORMATS", "COUNT_DTYPE", "GENE_EXPRESSION", "RawCounts", "read_sample", "read_mtx_dir", "read_10x_h5",
           "read_h5ad"]

FORMATS = ("mtx", "10x_h5", "h5ad")


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

"""The intermediate h5ad: what the convert step writes and the ingest reads, in one place.

One sample, following the atlas schema: obs holds exactly the schema's obs columns (index `obs_id` =
`<study>/<sample>/<barcode>`), var is indexed by gene id (`var_id`) with the schema's var columns, X is a
canonical CSR of int32 raw counts (obs x var), and `uns/soma_manifest` records the sample's key, the
conversion it was made with and, for a fixed gene universe, the positions in var of the genes it measured.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anndata
import anndata.io
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from soma_manifest import storage
from soma_manifest.errors import SourceError
from soma_manifest.schema import AtlasSchema

_UNS = "soma_manifest"  # uns group of what soma-manifest records about the sample
_MEASURED = "measured"  # in it: positions in var of the genes the sample measured (absent: all of them)


def annotate(adata: anndata.AnnData, *, key: str, conversion: str, measured: np.ndarray | None) -> None:
    """Record the sample's key, its conversion and (when a fixed universe padded var) its measured genes."""
    adata.uns[_UNS] = {"key": key, "conversion": conversion}
    if measured is not None:
        adata.uns[_UNS][_MEASURED] = measured


def write_h5ad(adata: anndata.AnnData, path: str) -> None:
    """Write the intermediate h5ad to a local path. Uncompressed: the ingest reads it right back, and
    compression costs more than the disk saves. Strings stay strings: anndata's conversion to categoricals
    natsorts every column (most of the write's time), and the atlas stores plain strings anyway.

    X's arrays are contiguous: anndata writes a sparse X's arrays chunked and resizable, for appending, which
    an intermediate never needs; that took 130-160 ms for a 6.6M-entry sample, against 58-73 ms for anndata
    writing everything else around an empty X whose three arrays are then replaced.
    """
    x = adata.X
    adata.X = sp.csr_matrix(x.shape, dtype=x.dtype)
    try:
        adata.write_h5ad(path, convert_strings_to_categoricals=False)
    finally:
        adata.X = x
    with h5py.File(path, "r+") as f:
        for name in ("data", "indices", "indptr"):
            del f["X"][name]
            f["X"].create_dataset(name, data=getattr(x, name))


@dataclass(frozen=True)
class Shape:
    """A converted sample's size, from its h5ad's metadata (X is not read)."""

    cells: int
    nnz: int
    genes: int


def read_obs(path: str) -> tuple[pd.DataFrame, Shape]:
    """A converted sample's obs and its size, without reading X (a local path)."""
    with h5py.File(path, "r") as f:
        obs = anndata.io.read_elem(f["obs"])
        shape = tuple(f["X"].attrs["shape"])
        return obs, Shape(int(shape[0]), int(f["X"]["indptr"][-1]), int(shape[1]))


def read_sample_obs(path: str, schema: AtlasSchema) -> pd.DataFrame:
    """An intermediate h5ad's obs alone, checked as open_sample checks it (an obs update needs neither var nor X:
    reading var too took about a third of its h5ad read)."""
    with _reading(path), _h5(path) as f:
        obs = anndata.io.read_elem(f["obs"])
    expected = [c.name for c in schema.obs]
    if list(obs.columns) != expected:
        raise SourceError(f"obs columns {list(obs.columns)} differ from the schema's {expected}", where=path,
                          hint="re-run the convert step")
    return obs


def copy_with_obs(source: str, target: str, obs: pd.DataFrame) -> None:
    """Write `target` as a copy of the h5ad `source` whose obs is replaced by `obs` (same cells, same order):
    a file copy and one small group, where reading and writing the whole sample rewrote X too."""
    shutil.copyfile(source, target)
    with h5py.File(target, "r+") as f:
        del f["obs"]
        anndata.io.write_elem(f, "obs", obs)


@dataclass(frozen=True)
class Sample:
    """A converted sample: obs and var in memory; X's data and indices (sliced per chunk) in memory, or
    still in its h5ad while that is open."""

    path: str  # its h5ad, for messages
    obs: pd.DataFrame
    var: pd.DataFrame  # its genes; read from the h5ad, the index only (no var columns)
    indptr: np.ndarray
    x: Mapping[str, Any]  # "data" and "indices": numpy arrays or h5py datasets
    measured: np.ndarray | None  # positions in var of the genes it measured (None: all of them)

    @property
    def measured_genes(self) -> pd.Index:
        return self.var.index if self.measured is None else self.var.index[self.measured]


@contextmanager
def open_sample(path: str, schema: AtlasSchema) -> Iterator[Sample]:
    """The sample of an intermediate h5ad, its X left in the file while this is open.

    An h5ad on S3 is read from one local copy; a SourceError raised while it is open names the s3://
    original, not the copy.
    """
    with storage.local_file(path) as local:
        try:
            with _h5(local) as f:
                yield _read_sample(f, path, schema)
        except SourceError as exc:
            if local == path:
                raise
            raise SourceError(exc.message.replace(local, path), where=path, hint=exc.hint) from None


def sample_in_memory(path: str, adata: anndata.AnnData, schema: AtlasSchema) -> Sample:
    """The sample as the worker that converted it still holds it (what it wrote to `path`)."""
    x = adata.X
    measured = adata.uns.get(_UNS, {}).get(_MEASURED)
    return _checked(Sample(path, adata.obs, adata.var, x.indptr, {"data": x.data, "indices": x.indices},
                           None if measured is None else np.asarray(measured)), schema)


def read_var(path: str, schema: AtlasSchema) -> pd.DataFrame:
    """The sample's genes as the atlas' var rows (see var_rows), without reading X."""
    with _reading(path), _h5(path) as f:
        var = anndata.io.read_elem(f["var"])
    return var_rows(var, schema)


def var_rows(var: pd.DataFrame, schema: AtlasSchema) -> pd.DataFrame:
    """A sample's var as the atlas' var rows: index var_id, the schema's var columns."""
    var = var[[c.name for c in schema.var]].astype(object)
    var.index.name = "var_id"
    return var


def measured_genes(path: str) -> pd.Index:
    """The var ids a sample measured: its var, less the genes a fixed universe only padded in."""
    with _reading(path), _h5(path) as f:
        # Only var's index: reading the whole var (every column) was 13 ms of verify per sample.
        ids = pd.Index(anndata.io.read_elem(f["var"][f["var"].attrs["_index"]]))
        measured = f.get(f"uns/{_UNS}/{_MEASURED}")
        return ids[measured[:]] if measured is not None else ids


@contextmanager
def _h5(path: str) -> Iterator[h5py.File]:
    """An intermediate h5ad for reading; one on S3 is read from a local copy.

    Not through an s3fs file object: h5py reading through one deadlocked (the garbage collector, run in
    fsspec's IO thread, freed an h5py object and waited for h5py's lock, held by the read that waited
    for that thread).
    """
    with storage.local_file(path) as local, h5py.File(local, "r") as f:
        yield f


@contextmanager
def _reading(path: str) -> Iterator[None]:
    """h5py's and anndata's errors about the file as one SourceError naming it."""
    try:
        yield
    except (OSError, KeyError) as exc:
        raise SourceError(f"unreadable intermediate h5ad: {exc}", where=path, hint="re-run the convert step") from None


def _read_sample(f: h5py.File, path: str, schema: AtlasSchema) -> Sample:
    """The sample of an open intermediate h5ad (X stays in the file)."""
    with _reading(path):
        obs = anndata.io.read_elem(f["obs"])
        # Only var's index: the atlas maps genes by id, and reading every var column of 5,000 genes was most of
        # a grouped ingest's time per member (31 of its 68 ms).
        var = pd.DataFrame(index=pd.Index(anndata.io.read_elem(f["var"][f["var"].attrs["_index"]])))
        x = f["X"]
        if x.attrs.get("encoding-type") != "csr_matrix" or tuple(x.attrs["shape"]) != (len(obs), len(var)):
            raise SourceError("X is not a CSR matrix of obs x var", where=path, hint="re-run the convert step")
        indptr = x["indptr"][:]
        measured = f.get(f"uns/{_UNS}/{_MEASURED}")
        measured = measured[:] if measured is not None else None
    return _checked(Sample(path, obs, var, indptr, x, measured), schema)


def _checked(sample: Sample, schema: AtlasSchema) -> Sample:
    expected = [c.name for c in schema.obs]
    if list(sample.obs.columns) != expected:
        raise SourceError(f"obs columns {list(sample.obs.columns)} differ from the schema's {expected}",
                          where=sample.path, hint="re-run the convert step")
    return sample

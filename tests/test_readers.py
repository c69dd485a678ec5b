"""Readers against real Cell Ranger outputs (tests/data, see its README) and generated bad inputs."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from soma_manifest.errors import SourceError
from soma_manifest.readers import (
    FORMATS,
    RawCounts,
    read_10x_h5,
    read_h5ad,
    read_mtx_dir,
    read_sample,
)
from soma_manifest.sources import SampleSource, mtx_files, sample_files

DATA = Path(__file__).parent / "data"
CHR21_MTX = DATA / "10x-v3-chr21" / "filtered_feature_bc_matrix"
CHR21_H5 = DATA / "10x-v3-chr21" / "filtered_feature_bc_matrix.h5"
SEURAT_V2 = DATA / "10x-v2-seurat"
PBMC_PROTEIN = DATA / "10x-v3-pbmc-protein" / "filtered_feature_bc_matrix"

TINY_MTX = "%%MatrixMarket matrix coordinate integer general\n3 2 2\n1 1 5\n3 2 7\n"
TINY_BARCODES = ["AAAC-1", "AAAG-1"]
TINY_FEATURES = [("ENSG01", "A", "Gene Expression"), ("ENSG02", "B", "Gene Expression"),
                 ("ENSG03", "C", "Antibody Capture")]


# --- helpers -----------------------------------------------------------------------------------

def mmread_cells_by_features(path: Path) -> sp.csr_matrix:
    """An independent parse of a Cell Ranger matrix.mtx[.gz] (features x cells), transposed."""
    with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as fh:
        return sp.csr_matrix(scipy.io.mmread(fh)).T.tocsr()


def write_tiny_mtx(folder: Path, matrix: str = TINY_MTX, barcodes: list[str] = TINY_BARCODES,
                   features: list[tuple[str, ...]] = TINY_FEATURES) -> Path:
    """A plain-text v3 MTX folder: 3 features x 2 cells by default."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "matrix.mtx").write_text(matrix)
    (folder / "barcodes.tsv").write_text("".join(f"{b}\n" for b in barcodes))
    (folder / "features.tsv").write_text("".join("\t".join(f) + "\n" for f in features))
    return folder


def read_error(fmt: str, path: Path) -> SourceError:
    with pytest.raises(SourceError) as info:
        read_sample(fmt, path)
    return info.value


def assert_same(a: RawCounts, b: RawCounts) -> None:
    assert a.counts.shape == b.counts.shape and a.counts.dtype == b.counts.dtype
    assert np.array_equal(a.counts.indptr, b.counts.indptr)
    assert np.array_equal(a.counts.indices, b.counts.indices)
    assert np.array_equal(a.counts.data, b.counts.data)
    for field in ("barcodes", "feature_ids", "feature_names", "feature_types"):
        assert list(getattr(a, field)) == list(getattr(b, field)), field


def assert_canonical(raw: RawCounts) -> None:
    assert isinstance(raw.counts, sp.csr_matrix)
    assert raw.counts.dtype in (np.int32, np.int64)
    assert raw.counts.has_canonical_format and raw.counts.has_sorted_indices
    n_cells, n_features = raw.counts.shape
    assert len(raw.barcodes) == n_cells and len(set(raw.barcodes)) == n_cells
    for labels in (raw.feature_ids, raw.feature_names, raw.feature_types):
        assert len(labels) == n_features and all(isinstance(v, str) for v in labels)


@pytest.fixture(scope="module")
def chr21() -> RawCounts:
    return read_mtx_dir(CHR21_MTX)


def h5ad_from(raw: RawCounts, path: Path, **kwargs) -> Path:
    """Write `raw` as an h5ad with Ensembl ids as var_names and symbols in a column."""
    adata = ad.AnnData(
        X=raw.counts,
        obs=pd.DataFrame({"donor": ["d1"] * raw.counts.shape[0]}, index=raw.barcodes),
        var=pd.DataFrame({"gene_symbols": raw.feature_names}, index=raw.feature_ids), **kwargs)
    adata.write_h5ad(path)
    return path


# --- real data ---------------------------------------------------------------------------------

def test_chr21_mtx_matches_an_independent_parse(chr21: RawCounts) -> None:
    assert_canonical(chr21)
    assert chr21.counts.shape == (1107, 507)
    expected = mmread_cells_by_features(CHR21_MTX / "matrix.mtx.gz")
    assert (chr21.counts != expected).nnz == 0
    assert chr21.counts.sum() == expected.sum() == 41549
    assert chr21.counts[0, 457] == 3  # the file's first entry "458 1 3"
    assert chr21.barcodes[0] == "AAACCCAAGGAGAGTA-1"
    assert (chr21.feature_ids[0], chr21.feature_names[0], chr21.feature_types[0]) == (
        "ENSG00000279493", "CH507-9B2.2", "Gene Expression")
    assert chr21.cell_annotations is None


def test_mtx_entries_in_any_order_read_the_same(tmp_path: Path, chr21: RawCounts) -> None:
    """Cell Ranger's order (cell by cell, features ascending) is read without scipy's conversion; any
    other order, split duplicates and explicit zeros give the same canonical matrix."""
    lines = gzip.open(CHR21_MTX / "matrix.mtx.gz", "rt").read().splitlines()
    size = next(i for i, line in enumerate(lines) if not line.startswith("%"))
    entries = lines[size + 1:]
    gene, cell, value = entries[0].split()
    extra = [f"{gene} {cell} 1", f"{gene} {cell} {int(value) - 1}", "1 1 0"]  # split first entry, a zero
    shuffled = [e for e in np.random.default_rng(0).permutation(entries[1:])] + extra
    folder = tmp_path / "shuffled"
    shutil.copytree(CHR21_MTX, folder)
    with gzip.open(folder / "matrix.mtx.gz", "wt") as fh:
        fh.write("\n".join([*lines[:size], f"507 1107 {len(shuffled)}", *shuffled]) + "\n")
    shuffled_read = read_mtx_dir(folder)
    assert_canonical(shuffled_read)
    assert_same(shuffled_read, chr21)


def test_chr21_h5_equals_mtx_element_for_element(chr21: RawCounts) -> None:
    from_h5 = read_10x_h5(CHR21_H5)
    assert_canonical(from_h5)
    assert_same(from_h5, chr21)


def test_cellranger2_h5_layout(tmp_path: Path, chr21: RawCounts) -> None:
    path = tmp_path / "v2.h5"
    with h5py.File(CHR21_H5, "r") as src, h5py.File(path, "w") as dst:
        genome = dst.create_group("GRCh38")
        for name in ("data", "indices", "indptr", "shape", "barcodes"):
            genome[name] = src["matrix"][name][()]
        genome["genes"] = src["matrix/features/id"][()]
        genome["gene_names"] = src["matrix/features/name"][()]
    assert_same(read_10x_h5(path), chr21)


def test_seurat_cellranger2_folder_with_mixed_compression() -> None:
    raw = read_mtx_dir(SEURAT_V2)
    assert_canonical(raw)
    assert raw.counts.shape == (80, 240)
    assert (raw.counts != mmread_cells_by_features(SEURAT_V2 / "matrix.mtx.gz")).nnz == 0
    assert raw.counts[0, 1] == 1 and raw.counts[0, 5] == 1  # entries "2 1 1" and "6 1 1"
    assert raw.barcodes[0] == "ATGCCAGAACGACT-1"
    assert set(raw.feature_ids) == {"ENSGXXXXXX"}  # placeholder ids, as published
    assert list(raw.feature_names[:3]) == ["MS4A1", "CD79B", "CD79A"]
    assert set(raw.feature_types) == {"Gene Expression"}
    assert list(mtx_files(SEURAT_V2).values()) == [
        SEURAT_V2 / "matrix.mtx.gz", SEURAT_V2 / "barcodes.tsv", SEURAT_V2 / "genes.tsv.gz"]


def test_pbmc_protein_antibody_features_and_junk_files() -> None:
    assert {".DS_Store", "._.DS_Store", "._features.tsv.gz"} <= {p.name for p in PBMC_PROTEIN.iterdir()}
    raw = read_mtx_dir(PBMC_PROTEIN)
    assert_canonical(raw)
    assert raw.counts.shape == (1024, 117)
    expected = mmread_cells_by_features(PBMC_PROTEIN / "matrix.mtx.gz")
    assert (raw.counts != expected).nnz == 0 and raw.counts.sum() == expected.sum()
    assert raw.counts[459, 1] == 1  # the file's first entry "2 460 1"
    antibodies = raw.feature_types == "Antibody Capture"
    assert antibodies.sum() == 17 and (raw.feature_types[:100] == "Gene Expression").all()
    assert list(raw.feature_ids[-3:]) == ["IgG2a", "IgG1", "IgG2b"]
    assert raw.feature_names[-1] == "IgG2b_control_TotalSeqB"
    assert list(mtx_files(PBMC_PROTEIN).values()) == [
        PBMC_PROTEIN / name for name in ("matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz")]


def test_read_sample_dispatch_and_sample_files(tmp_path: Path, chr21: RawCounts) -> None:
    assert_same(read_sample("mtx", CHR21_MTX), chr21)
    assert_same(read_sample("10x_h5", CHR21_H5), chr21)
    assert sample_files(SampleSource("s", "x", "10x_h5", CHR21_H5)) == [CHR21_H5]
    with pytest.raises(SourceError, match="unknown sample format 'loom'"):
        read_sample("loom", CHR21_H5)
    with pytest.raises(SourceError, match="sample file not found"):
        sample_files(SampleSource("s", "x", "h5ad", tmp_path / "absent.h5ad"))


# --- h5ad --------------------------------------------------------------------------------------

def test_h5ad_integer_x_round_trip(tmp_path: Path, chr21: RawCounts) -> None:
    raw = read_h5ad(h5ad_from(chr21, tmp_path / "s.h5ad"))
    assert_canonical(raw)
    assert_same(raw, chr21)  # ids from var_names, symbols from the gene_symbols column
    assert list(raw.cell_annotations.columns) == ["donor"]
    assert list(raw.cell_annotations.index) == list(chr21.barcodes)


def test_h5ad_float_x_with_integer_raw_x_reads_raw(tmp_path: Path, chr21: RawCounts) -> None:
    full = ad.AnnData(
        X=chr21.counts.astype(np.float32),
        obs=pd.DataFrame(index=chr21.barcodes),
        var=pd.DataFrame({"gene_ids": chr21.feature_ids, "feature_types": chr21.feature_types},
                         index=pd.Index(chr21.feature_names).astype(str)))
    full.var_names_make_unique()
    full.raw = full
    keep = np.arange(0, full.n_vars, 2)  # X keeps half the genes, normalised: raw.var must win
    adata = full[:, keep].copy()
    adata.X = adata.X.multiply(0.5).tocsr()
    adata.write_h5ad(tmp_path / "s.h5ad")

    raw = read_h5ad(tmp_path / "s.h5ad")
    assert raw.counts.shape == (1107, 507) and raw.counts.dtype == np.int32
    assert (raw.counts != chr21.counts).nnz == 0
    assert list(raw.feature_ids) == list(chr21.feature_ids)
    assert list(raw.feature_types) == list(chr21.feature_types)


def test_h5ad_symbols_as_var_names_and_ids_in_a_column(tmp_path: Path) -> None:
    adata = ad.AnnData(
        X=np.array([[1, 0], [0, 2]], dtype=np.int64),
        obs=pd.DataFrame(index=["c1", "c2"]),
        var=pd.DataFrame({"gene_ids": ["ENSG1", "ENSG2"], "feature_type": ["Gene Expression", "Peaks"]},
                         index=["SYM1", "SYM2"]))
    adata.write_h5ad(tmp_path / "s.h5ad")
    raw = read_h5ad(tmp_path / "s.h5ad")
    assert list(raw.feature_ids) == ["ENSG1", "ENSG2"]
    assert list(raw.feature_names) == ["SYM1", "SYM2"]
    assert list(raw.feature_types) == ["Gene Expression", "Peaks"]
    assert raw.counts.toarray().tolist() == [[1, 0], [0, 2]]


def test_h5ad_without_integer_counts_is_refused(tmp_path: Path, chr21: RawCounts) -> None:
    adata = ad.AnnData(X=chr21.counts.astype(np.float32) * 0.5,
                       obs=pd.DataFrame(index=chr21.barcodes), var=pd.DataFrame(index=chr21.feature_ids))
    adata.layers["counts"] = chr21.counts
    adata.write_h5ad(tmp_path / "s.h5ad")
    err = read_error("h5ad", tmp_path / "s.h5ad")
    assert err.where == str(tmp_path / "s.h5ad")
    assert "raw.X is absent" in err.message
    assert "counts must be raw integer UMI counts; found 0.5 at cell 'AAACCCAAGGAGAGTA-1'" in err.message
    assert "layers: counts" in err.hint


# --- bad inputs: Matrix Market -----------------------------------------------------------------

@pytest.fixture
def chr21_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(CHR21_MTX, tmp_path / "sample"))


def test_truncated_gzip_matrix(chr21_copy: Path) -> None:
    matrix = chr21_copy / "matrix.mtx.gz"
    matrix.write_bytes(matrix.read_bytes()[:40_000])
    err = read_error("mtx", chr21_copy)
    assert err.where == str(matrix) and "truncated" in err.message


def test_corrupt_gzip_data_and_checksum(chr21_copy: Path) -> None:
    """python-isal's inflate errors become the same SourceError as zlib's did."""
    matrix = chr21_copy / "matrix.mtx.gz"
    good = matrix.read_bytes()
    for name, bad in (("deflate", good[:20] + b"\xff" * 64 + good[84:]), ("checksum", good[:-8] + bytes(4) + good[-4:])):
        matrix.write_bytes(bad)
        err = read_error("mtx", chr21_copy)
        assert err.where == str(matrix) and "corrupt gzip data" in err.message, name


def test_matrix_with_fewer_entries_than_its_header(tmp_path: Path) -> None:
    folder = write_tiny_mtx(tmp_path / "s", matrix=TINY_MTX.replace("3 2 2", "3 2 3"))
    err = read_error("mtx", folder)
    assert err.where.startswith(str(folder / "matrix.mtx"))
    assert "Truncated" in err.message and "announces 3 entries" in err.message


def test_matrix_that_is_not_matrix_market(tmp_path: Path) -> None:
    folder = write_tiny_mtx(tmp_path / "s", matrix="gene\tcell\tcount\nA\tAAAC-1\t5\n")
    err = read_error("mtx", folder)
    assert err.where == f"{folder / 'matrix.mtx'}:1" and "not a Matrix Market file" in err.message


def test_matrix_not_gzip_despite_its_suffix(chr21_copy: Path) -> None:
    matrix = chr21_copy / "matrix.mtx.gz"
    matrix.write_bytes(gzip.decompress(matrix.read_bytes()))
    err = read_error("mtx", chr21_copy)
    assert err.where == str(matrix) and "not gzip-compressed despite its .gz suffix" in err.message


@pytest.mark.parametrize(("barcodes", "features", "expected"), [
    (TINY_BARCODES + ["AACC-1"], TINY_FEATURES, "2 columns but barcodes.tsv lists 3 barcodes"),
    (TINY_BARCODES, TINY_FEATURES[:2], "3 rows but features.tsv lists 2 features"),
], ids=["barcodes", "features"])
def test_matrix_dimensions_disagree_with_labels(tmp_path: Path, barcodes: list[str],
                                                 features: list[tuple[str, ...]], expected: str) -> None:
    folder = write_tiny_mtx(tmp_path / "s", barcodes=barcodes, features=features)
    err = read_error("mtx", folder)
    assert err.where == f"{folder / 'matrix.mtx'}:2"
    assert err.message == f"matrix.mtx has {expected}"


def test_transposed_matrix_gets_a_hint(tmp_path: Path) -> None:
    transposed = "%%MatrixMarket matrix coordinate integer general\n2 3 1\n1 1 5\n"
    err = read_error("mtx", write_tiny_mtx(tmp_path / "s", matrix=transposed))
    assert "transposed" in err.hint


def test_negative_counts(tmp_path: Path) -> None:
    folder = write_tiny_mtx(tmp_path / "s", matrix=TINY_MTX.replace("3 2 7", "3 2 -7"))
    err = read_error("mtx", folder)
    assert err.where == f"{folder / 'matrix.mtx'}:4"
    assert err.message.startswith("counts must be non-negative raw UMI counts; found -7 at row 3, column 2")
    assert "'ENSG03'" in err.message and "'AAAG-1'" in err.message


@pytest.mark.parametrize("field", ["real", "integer"])
def test_non_integer_counts(tmp_path: Path, field: str) -> None:
    # In an "integer" file fast_matrix_market alone would silently read 0.5 as 0.
    matrix = TINY_MTX.replace("integer", field).replace("1 1 5", "1 1 0.5")
    folder = write_tiny_mtx(tmp_path / "s", matrix=matrix)
    err = read_error("mtx", folder)
    assert err.where == f"{folder / 'matrix.mtx'}:3"
    assert err.message.startswith("counts must be raw integer UMI counts; found 0.5 at row 1, column 1")


def test_non_integer_counts_in_a_10x_h5(tmp_path: Path) -> None:
    path = Path(shutil.copy(CHR21_H5, tmp_path / "s.h5"))
    with h5py.File(path, "r+") as h5:
        data = h5["matrix/data"][()].astype(np.float64)
        data[0] = 2.5
        del h5["matrix/data"]
        h5["matrix/data"] = data
    err = read_error("10x_h5", path)
    assert err.where == f"{path}:/matrix"
    assert err.message.startswith("counts must be raw integer UMI counts; found 2.5 at barcode 'AAACCCAAGGAGAGTA-1'")


def test_malformed_features_line(tmp_path: Path) -> None:
    features = [TINY_FEATURES[0], ("ENSG02",), TINY_FEATURES[2]]
    err = read_error("mtx", write_tiny_mtx(tmp_path / "s", features=features))
    assert err.where == f"{tmp_path / 's' / 'features.tsv'}:2"
    assert err.message == "expected 3 tab-separated columns (id, name, type), found ['ENSG02']"


def test_features_lines_of_unequal_widths_are_refused_even_when_the_fields_add_up(tmp_path: Path) -> None:
    """2 + 4 fields make as many as two lines of 3: each line is checked, not only the total."""
    features = [TINY_FEATURES[0], ("ENSG02", "B2M"), (*TINY_FEATURES[2], "extra")]
    err = read_error("mtx", write_tiny_mtx(tmp_path / "s", features=features))
    assert err.where == f"{tmp_path / 's' / 'features.tsv'}:2"
    assert err.message == "expected 3 tab-separated columns (id, name, type), found ['ENSG02', 'B2M']"


def test_duplicate_barcodes(tmp_path: Path) -> None:
    folder = write_tiny_mtx(tmp_path / "s", barcodes=["AAAC-1", "AAAG-1", "AAAC-1"],
                            matrix=TINY_MTX.replace("3 2 2", "3 3 2"))
    err = read_error("mtx", folder)
    assert err.where == str(folder / "barcodes.tsv")
    assert err.message == "duplicate barcode 'AAAC-1' on lines 1, 3"


def test_empty_sample(tmp_path: Path) -> None:
    folder = write_tiny_mtx(tmp_path / "s", barcodes=[],
                            matrix="%%MatrixMarket matrix coordinate integer general\n3 0 0\n")
    err = read_error("mtx", folder)
    assert err.where == str(folder / "barcodes.tsv") and "no cells" in err.message


def test_empty_h5ad_sample(tmp_path: Path) -> None:
    ad.AnnData(X=np.zeros((0, 2), dtype=np.int32), var=pd.DataFrame(index=["A", "B"])).write_h5ad(
        tmp_path / "s.h5ad")
    assert "no cells" in read_error("h5ad", tmp_path / "s.h5ad").message


# --- bad inputs: folders and files --------------------------------------------------------------

def test_missing_file_in_mtx_folder_lists_the_folder(tmp_path: Path) -> None:
    folder = Path(shutil.copytree(PBMC_PROTEIN, tmp_path / "s"))
    (folder / "barcodes.tsv.gz").unlink()
    err = read_error("mtx", folder)
    assert err.where == str(folder)
    assert err.message == ("no barcodes file (barcodes.tsv.gz or barcodes.tsv); "
                           "the folder contains: features.tsv.gz, matrix.mtx.gz")
    with pytest.raises(SourceError, match="no barcodes file"):
        list(mtx_files(folder).values())


def test_ambiguous_gz_and_plain_files(chr21_copy: Path) -> None:
    (chr21_copy / "barcodes.tsv").write_bytes(gzip.decompress((chr21_copy / "barcodes.tsv.gz").read_bytes()))
    err = read_error("mtx", chr21_copy)
    assert "barcodes.tsv.gz and barcodes.tsv both exist" in err.message


def test_mtx_folder_that_is_missing_or_a_file(tmp_path: Path) -> None:
    assert "sample folder not found" in read_error("mtx", tmp_path / "absent").message
    assert "found a file" in read_error("mtx", CHR21_H5).message


def test_h5_that_is_not_cellranger(tmp_path: Path, chr21: RawCounts) -> None:
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5.create_group("expression")["values"] = np.arange(3)
    err = read_error("10x_h5", tmp_path / "other.h5")
    assert err.where == str(tmp_path / "other.h5")
    assert err.message == "not a Cell Ranger matrix file: no 'matrix' group; top-level entries: expression"
    err = read_error("10x_h5", h5ad_from(chr21, tmp_path / "s.h5ad"))
    assert "format h5ad" in err.hint


def test_files_that_are_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    path.write_text("barcode,gene,count\n")
    for fmt in ("10x_h5", "h5ad"):
        err = read_error(fmt, path)
        assert (err.where, err.message) == (str(path), "not an HDF5 file")


def test_h5_whose_barcodes_disagree_with_its_shape(tmp_path: Path) -> None:
    path = Path(shutil.copy(CHR21_H5, tmp_path / "s.h5"))
    with h5py.File(path, "r+") as h5:
        barcodes = h5["matrix/barcodes"][:-1]
        del h5["matrix/barcodes"]
        h5["matrix/barcodes"] = barcodes
    err = read_error("10x_h5", path)
    assert err.where == f"{path}:/matrix" and err.message == "the matrix has 1107 barcodes but 1106 are listed"


@pytest.mark.parametrize("fmt", FORMATS)
def test_unreadable_file(tmp_path: Path, fmt: str, chr21: RawCounts) -> None:
    if fmt == "mtx":
        sample = Path(shutil.copytree(CHR21_MTX, tmp_path / "s"))
        target = sample / "barcodes.tsv.gz"
    elif fmt == "10x_h5":
        sample = target = Path(shutil.copy(CHR21_H5, tmp_path / "s.h5"))
    else:
        sample = target = h5ad_from(chr21, tmp_path / "s.h5ad")
    if os.geteuid() == 0:
        # root reads through chmod 000; a directory in the file's place fails to open instead
        target.unlink()
        target.mkdir()
    else:
        target.chmod(0)
    try:
        err = read_error(fmt, sample)
    finally:
        if target.is_file():
            target.chmod(0o644)
    assert err.where == str(target) and err.message.startswith("cannot read the file: ")


def test_qc_percentages_are_the_sums_over_mito_and_ribosomal_genes() -> None:
    """convert's pct_mito / pct_ribo / umi_counts against dense sums, on generated counts with an empty cell
    and both cases of the prefixes (the real test data have no MT- gene)."""
    from conftest import DEFAULT_SCHEMA
    from soma_manifest import convert
    from soma_manifest.schema import load_schema

    rng = np.random.default_rng(3)
    counts = sp.random(300, 60, density=0.2, format="lil", random_state=3,
                       data_rvs=lambda k: rng.integers(1, 50, k)).astype(np.int32)
    counts[7, :] = 0
    counts = counts.tocsr()
    counts.eliminate_zeros()
    symbols = np.array(["MT-CO1", "mt-Nd1", "RPS3", "Rpl7", "RPLP0", "MTOR"] + [f"G{i}" for i in range(54)])
    qc = convert._qc(counts, symbols, load_schema(DEFAULT_SCHEMA))
    dense = counts.toarray().astype(np.int64)
    umi = dense.sum(axis=1)
    np.testing.assert_array_equal(qc["umi_counts"], umi)
    for column, genes in (("pct_mito", [0, 1]), ("pct_ribo", [2, 3, 4])):
        want = np.where(umi > 0, 100.0 * dense[:, genes].sum(axis=1) / np.maximum(umi, 1), 0.0)
        np.testing.assert_array_equal(qc[column], want, err_msg=column)
    assert qc["pct_mito"][7] == 0 and qc["umi_counts"][7] == 0
    # A cell whose mito sum alone overflows int32: summed in int64, still exact.
    big = sp.csr_matrix(np.array([[2_000_000_000, 2_000_000_000, 0, 0, 0, 7] + [0] * 54, [0] * 59 + [1]],
                                 dtype=np.int32))
    qc = convert._qc(big, symbols, load_schema(DEFAULT_SCHEMA))
    assert list(qc["umi_counts"]) == [4_000_000_007, 1]
    assert list(qc["pct_mito"]) == [100.0 * 4_000_000_000 / 4_000_000_007, 0.0]


def test_a_metadata_table_is_parsed_once_while_unchanged(tmp_path: Path) -> None:
    """convert keeps a worker's last parsed metadata tables (a study's samples reuse them), and reads an edited
    file again, also when the edit keeps its size."""
    from soma_manifest import convert

    path = tmp_path / "cells.tsv"
    path.write_text("barcode\tcell_type\nAAAC-1\tT cell\nAAAG-1\tB cell\n")
    first = convert._read_table(path)
    assert convert._read_table(path) is first
    assert list(first["cell_type"]) == ["T cell", "B cell"]
    before = os.stat(path)
    path.write_text("barcode\tcell_type\nAAAC-1\tNK cel\nAAAG-1\tB cell\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1))  # the same size; a clock tick later
    assert os.stat(path).st_size == before.st_size
    assert list(convert._read_table(path)["cell_type"]) == ["NK cel", "B cell"]
    path.unlink()
    with pytest.raises(SourceError, match="cannot parse metadata table"):
        convert._read_table(path)

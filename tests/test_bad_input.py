"""Bad input: one clear line naming the file (and line, row or sample) and what to fix. A bad sample is
marked failed while the others proceed; the atlas and the other samples' state stay as they were."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import (
    DEFAULT_SCHEMA,
    Project,
    SampleData,
    apply_ok,
    assert_atlas_holds,
    invoke_cli,
    make_sample,
    read_state,
    write_mtx,
)

BAD = "study_a/bad"


def bad_mtx(project: Project, data: SampleData | None = None) -> Path:
    """A sample folder `bad` in study_a (not in project.samples: it must never reach the atlas)."""
    folder = project.raw / "study_a" / "mtx" / "bad"
    write_mtx(folder, data or make_sample(20, 30, seed=9))
    return folder


def gz_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt") as fh:
        return fh.read().splitlines()


def write_gz(path: Path, text: str) -> None:
    with gzip.open(path, "wt") as fh:
        fh.write(text)


def failure_line(result: subprocess.CompletedProcess, key: str) -> str:
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip().startswith(f"failed {key}: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def assert_sample_fails(project: Project, key: str, *expected: str,
                        run=invoke_cli) -> str:
    """apply fails only `key`, with one line holding every `expected` part; nothing else changes."""
    before = read_state(project)
    result = run("apply", project.manifest)
    assert result.returncode == 1, result.stderr
    line = failure_line(result, key)
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"
    after = read_state(project)
    assert after.samples[key].failed_step and after.samples[key].ingest == "none"
    assert {k: after.samples[k] for k in before.samples} == before.samples
    assert_atlas_holds(project.atlas_uri, project.samples)
    return line


def assert_refused(project: Project, *expected: str) -> None:
    """plan and apply refuse with a message holding every `expected` part; state and atlas untouched."""
    state = project.state_path.read_bytes()
    for command in ("plan", "apply"):
        result = invoke_cli(command, project.manifest)
        assert result.returncode == 1
        for part in expected:
            assert part in result.stderr, f"{part!r} not in {result.stderr!r}"
    assert project.state_path.read_bytes() == state
    assert_atlas_holds(project.atlas_uri, project.samples)


# --- the manifest ------------------------------------------------------------------------------

def test_malformed_yaml(applied: Project) -> None:
    text = applied.manifest.read_text().replace("studies:\n", "studies: [\n")
    applied.manifest.write_text(text)
    assert_refused(applied, f"{applied.manifest}:", "YAML syntax error", "fix the YAML syntax")


@pytest.mark.parametrize(("old", "new", "line", "message"), [
    ("storage:\n", "proceses: 2\nstorage:\n", 6, "proceses: unknown key (check its spelling"),
    ("  - name: study_b\n", "  - name: study_b\n    fromat: mtx\n", 13, "studies.1.fromat: unknown key"),
    ("storage:\n", "processes: two\nstorage:\n", 6, "processes: Input should be a valid integer"),
    ("  - name: study_b\n", "  - name: study_b\n    format: mtxx\n", 13, "studies.1.format: Input should be 'mtx'"),
], ids=["unknown key", "unknown study key", "mistyped value", "mistyped format"])
def test_unknown_or_mistyped_manifest_key(applied: Project, old: str, new: str, line: int, message: str) -> None:
    applied.manifest.write_text(applied.manifest.read_text().replace(old, new))
    assert_refused(applied, f"{applied.manifest}:{line}: {message}")


def test_missing_raw_folder(applied: Project) -> None:
    applied.manifest.write_text(applied.manifest.read_text().replace("raw: raw", "raw: raw_gone"))
    assert_refused(applied, f"{applied.manifest}:11: studies.0.name: study folder {applied.root / 'raw_gone'}"
                            "/study_a not found (create it, or fix the study name or storage.raw)")


def test_missing_study_folder(applied: Project) -> None:
    applied.write_manifest(studies="  - name: study_a\n  - name: study_b\n  - name: study_c\n")
    assert_refused(applied, f"{applied.manifest}:13: studies.2.name: study folder {applied.raw / 'study_c'} not found")


def test_missing_sample_folder(applied: Project) -> None:
    applied.write_manifest(studies="  - name: study_a\n    samples: [s1, s2, s9]\n  - name: study_b\n")
    assert_refused(applied, f"{applied.manifest}:12: studies.0.samples.2: 's9' matches no sample in "
                            f"{applied.raw / 'study_a' / 'mtx'} (available: s1, s2)")


# --- the matrix --------------------------------------------------------------------------------

def test_truncated_matrix(applied: Project) -> None:
    matrix = bad_mtx(applied, make_sample(200, 100, seed=9)) / "matrix.mtx.gz"
    data = matrix.read_bytes()
    matrix.write_bytes(data[: len(data) // 2])
    assert_sample_fails(applied, BAD, f"convert: {matrix}", "truncated", "copy or download the file again")


def test_matrix_that_is_not_matrix_market(applied: Project) -> None:
    matrix = bad_mtx(applied) / "matrix.mtx.gz"
    write_gz(matrix, "gene\tcell\tcount\nG1\tC1\t3\n")
    assert_sample_fails(applied, BAD, f"{matrix}:1: not a Matrix Market file", "'gene\\tcell\\tcount'",
                        "expected '%%MatrixMarket matrix coordinate integer general'")


def test_matrix_not_gzip_despite_its_name(applied: Project) -> None:
    matrix = bad_mtx(applied) / "matrix.mtx.gz"
    matrix.write_bytes(gzip.decompress(matrix.read_bytes()))
    assert_sample_fails(applied, BAD, f"{matrix}: the file is not gzip-compressed despite its .gz suffix",
                        "compress it with gzip")


@pytest.mark.parametrize(("name", "problem"), [
    ("barcodes.tsv.gz", "has 20 columns but barcodes.tsv.gz lists 19 barcodes"),
    ("features.tsv.gz", "has 30 rows but features.tsv.gz lists 29 features"),
], ids=["barcodes", "features"])
def test_matrix_dimensions_disagree_with_labels(applied: Project, name: str, problem: str) -> None:
    folder = bad_mtx(applied)
    write_gz(folder / name, "\n".join(gz_lines(folder / name)[:-1]) + "\n")
    assert_sample_fails(applied, BAD, f"{folder / 'matrix.mtx.gz'}:", problem, "same Cell Ranger run")


@pytest.mark.parametrize(("value", "problem"), [
    ("-3", "counts must be non-negative raw UMI counts; found -3 at row"),
    ("2.5", "counts must be raw integer UMI counts; found 2.5 at row"),
], ids=["negative", "non-integer"])
def test_counts_that_are_not_raw_counts(applied: Project, value: str, problem: str) -> None:
    matrix = bad_mtx(applied) / "matrix.mtx.gz"
    lines = gz_lines(matrix)
    header = next(i for i, line in enumerate(lines) if not line.startswith("%"))
    row, col, _ = lines[header + 4].split()
    lines[header + 4] = f"{row} {col} {value}"
    if "." in value:
        lines[0] = lines[0].replace("integer", "real")
    write_gz(matrix, "\n".join(lines) + "\n")
    assert_sample_fails(applied, BAD, f"{matrix}:{header + 5}: {problem} {row}, column {col}",
                        "supply the unnormalised count matrix")


def test_duplicate_barcodes(applied: Project) -> None:
    folder = bad_mtx(applied)
    barcodes = gz_lines(folder / "barcodes.tsv.gz")
    barcodes[7] = barcodes[2]
    write_gz(folder / "barcodes.tsv.gz", "\n".join(barcodes) + "\n")
    assert_sample_fails(applied, BAD, f"{folder / 'barcodes.tsv.gz'}: duplicate barcode {barcodes[2]!r} on lines 3, 8",
                        "barcodes must be unique within a sample")


def test_empty_sample(applied: Project) -> None:
    folder = bad_mtx(applied)
    write_gz(folder / "barcodes.tsv.gz", "")
    write_gz(folder / "matrix.mtx.gz", "%%MatrixMarket matrix coordinate integer general\n30 0 0\n")
    assert_sample_fails(applied, BAD, f"{folder / 'barcodes.tsv.gz'}: the sample has no cells",
                        "remove the sample from the manifest or supply its cells")


def test_unreadable_file(applied: Project) -> None:
    """Permission denied. Root reads anything, so as root apply runs without the capabilities that allow it."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: permissions cannot be denied")
        caps = "-dac_override,-dac_read_search"
        prefix = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, sys.executable, "-m", "soma_manifest", *map(str, args)],
                              env={**os.environ, "NO_COLOR": "1"}, capture_output=True, text=True, timeout=300)

    matrix = bad_mtx(applied) / "matrix.mtx.gz"
    matrix.chmod(0)
    try:
        assert_sample_fails(applied, BAD, f"{matrix}: cannot read: Permission denied", "check the file's permissions",
                            run=run)
    finally:
        matrix.chmod(0o644)


# --- other formats -----------------------------------------------------------------------------

def other_format_study(project: Project, study: str, fmt: str, filename: str) -> Path:
    project.write_manifest(studies=f"  - name: study_a\n  - name: study_b\n  - name: {study}\n    format: {fmt}\n")
    folder = project.raw / study / fmt
    folder.mkdir(parents=True)
    return folder / filename


def test_h5ad_without_integer_counts(applied: Project) -> None:
    path = other_format_study(applied, "study_h", "h5ad", "norm.h5ad")
    data = make_sample(20, 30, seed=5)
    normalized = sp.csr_matrix(np.log1p(data.counts.toarray() / 3.0))
    ad.AnnData(X=normalized, obs=pd.DataFrame(index=data.barcodes), var=pd.DataFrame(index=data.gene_ids),
               layers={"counts": data.counts}).write_h5ad(path)
    assert_sample_fails(applied, "study_h/norm", f"{path}: no raw integer counts in raw.X or X",
                        "raw.X is absent", "X: counts must be raw integer UMI counts", "store the unnormalised UMI "
                        "counts in X or raw.X (the file has layers: counts)")


def test_10x_h5_that_is_not_cell_ranger(applied: Project) -> None:
    path = other_format_study(applied, "study_x", "10x_h5", "odd.h5")
    with h5py.File(path, "w") as f:
        f["counts"] = np.arange(6).reshape(2, 3)
    assert_sample_fails(applied, "study_x/odd", f"{path}: not a Cell Ranger matrix file: no 'matrix' group",
                        "top-level entries: counts", "expected Cell Ranger's filtered_feature_bc_matrix.h5")


# --- metadata ------------------------------------------------------------------------------------

def metadata_study(project: Project, kind: str, text: str) -> Path:
    """A new study `study_m` with one good sample `x` and this cell or sample metadata table."""
    write_mtx(project.raw / "study_m" / "mtx" / "x", make_sample(20, 30, seed=8))
    project.write_manifest(studies="  - name: study_a\n  - name: study_b\n  - name: study_m\n")
    path = project.raw / "study_m" / kind / "study_m.tsv"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_metadata_without_its_join_column(applied: Project) -> None:
    path = metadata_study(applied, "cell_metadata", "cell\tsample_name\tcell_type\nAAAC-1\tx\tT cell\n")
    assert_sample_fails(applied, "study_m/x", f"{path}: no 'barcode' column (columns: cell, sample_name, cell_type)",
                        "cell metadata is joined on a column named barcode")


def test_sample_metadata_without_its_join_column(applied: Project) -> None:
    path = metadata_study(applied, "sample_metadata", "sample\tscrnaseq_protocol\nx\t10x\n")
    assert_sample_fails(applied, "study_m/x", f"{path}: no 'sample_name' column (columns: sample, scrnaseq_protocol)",
                        "sample metadata is joined on a column named sample_name")


def test_metadata_with_duplicate_join_keys(applied: Project) -> None:
    barcode = make_sample(20, 30, seed=8).barcodes[3]
    path = metadata_study(applied, "cell_metadata", "barcode\tsample_name\tcell_type\n"
                          f"{barcode}\tx\tT cell\nOTHER-1\tx\tB cell\n{barcode}\tx\tNK cell\n")
    assert_sample_fails(applied, "study_m/x", f"{path}: duplicate barcode '{barcode}' (lines 2, 4)",
                        "each barcode may appear once per sample")


def test_metadata_value_that_does_not_fit_the_schema(project: Project) -> None:
    schema = project.root / "schema.yaml"
    schema.write_text(DEFAULT_SCHEMA.read_text().replace(
        "  - {name: cell_type,", "  - {name: donor_age, type: int64, source: sample_metadata, default: 0}\n"
                                "  - {name: cell_type,"))
    project.write_manifest(schema=schema)
    path = project.raw / "study_a" / "sample_metadata" / "study_a.tsv"
    path.write_text("sample_name\tscrnaseq_protocol\tdonor_age\ns1\t10x\t40\ns2\t10x\tforty\n")
    result = invoke_cli("apply", project.manifest)
    assert result.returncode == 1
    line = failure_line(result, "study_a/s2")
    assert f"{path}:3: column 'donor_age': value 'forty' is not int64" in line
    assert "fix the value, or change the type of obs column 'donor_age' in the schema" in line
    del project.samples["study_a/s2"]
    state = read_state(project)
    assert state.samples["study_a/s2"].failed_step == "convert"
    assert all(state.samples[k].ingest == "done" for k in project.samples)
    assert_atlas_holds(project.atlas_uri, project.samples)


# --- the state ---------------------------------------------------------------------------------

def test_state_file_of_another_atlas(applied: Project) -> None:
    other = Project(applied.root / "other")
    other.add_mtx("study_o", "o1", make_sample(10, 10, seed=4))
    other.write_manifest()
    apply_ok(other)
    theirs = read_state(other)
    shutil.copy(other.state_path, applied.state_path)
    refused = invoke_cli("apply", applied.manifest)
    assert refused.returncode == 1
    assert (f"{applied.state_path}: this state file belongs to another atlas (lineage {theirs.lineage}"
            in refused.stderr)
    assert "point storage.state at the state file of this atlas" in refused.stderr
    assert applied.state_path.read_bytes() == other.state_path.read_bytes(), "the state file was overwritten"
    drift = invoke_cli("verify", applied.manifest)
    assert drift.returncode == 1 and "do not belong together" in drift.stdout
    assert_atlas_holds(applied.atlas_uri, applied.samples)

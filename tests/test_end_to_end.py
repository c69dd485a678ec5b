"""Issue 2: manifest -> plan -> apply into one atlas, checked against the raw input (real tiledbsoma)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import tiledbsoma

from conftest import DATA, DEFAULT_SCHEMA, REPO, Project, make_sample, run_cli
from roundtrip import assert_counts_equal, read_sample_as_user


def _load_demo_builder():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "manifests" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return [line.rstrip("\n") for line in fh if line.strip()]


def _mtx_oracle(folder: Path, feature_file: str):
    """Parse a Cell Ranger folder with scipy and pandas alone: cells x genes, barcodes, gene ids, gene mask."""
    matrix = sp.csr_matrix(scipy.io.mmread(str(folder / "matrix.mtx.gz")).T)
    features = pd.read_csv(folder / feature_file, sep="\t", header=None, dtype=str)
    barcodes = _lines(next(folder.glob("barcodes.tsv*")))
    gex = (features[2] == "Gene Expression").to_numpy() if features.shape[1] > 2 else np.ones(len(features), bool)
    return matrix, barcodes, features, gex


def test_real_cellranger_data_round_trip(tmp_path: Path) -> None:
    """MTX v3 (in an outs/ folder), antibody features, v2 layout and HDF5: every cell equals its raw counts."""
    raw = _load_demo_builder().build(tmp_path)
    manifest = tmp_path / "atlas.yaml"
    manifest.write_text(f"""version: 1
atlas: {{name: real, storage: atlases}}
schema: {DEFAULT_SCHEMA}
storage: {{raw: {raw}, h5ad: h5ads, logs: logs}}
studies:
  - name: pbmc
  - name: seurat
  - name: chr21_h5
    format: 10x_h5
""")
    result = run_cli("apply", manifest, "--processes", "2")
    assert result.returncode == 0, result.stderr
    uri = tmp_path / "atlases" / "real"

    chr21, chr21_barcodes, chr21_features, _ = _mtx_oracle(DATA / "10x-v3-chr21" / "filtered_feature_bc_matrix",
                                                            "features.tsv.gz")
    got = read_sample_as_user(uri, "pbmc", "chr21")
    assert_counts_equal(got, "pbmc", "chr21", chr21, chr21_barcodes, chr21_features[0])
    assert got.n_obs == 1107
    # Cell metadata joined on barcode and sample, sample metadata on sample_name.
    assert got.obs.loc[f"pbmc/chr21/{chr21_barcodes[1]}", "cell_type"] == "B cell"
    assert set(got.obs["scrnaseq_protocol"]) == {"10x 3' v3"}
    # Computed QC columns agree with the raw counts.
    rows = [chr21_barcodes.index(i.split("/", 2)[2]) for i in got.obs_names]
    np.testing.assert_array_equal(got.obs["umi_counts"].to_numpy(), np.asarray(chr21.sum(axis=1)).ravel()[rows])
    np.testing.assert_array_equal(got.obs["nnz"].to_numpy(), np.diff(chr21.indptr)[rows])

    # The same cells from the HDF5 file: colliding barcodes, distinct cells.
    with h5py.File(DATA / "10x-v3-chr21" / "filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        h5 = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=m["shape"][:]).T.tocsr()
        h5_barcodes = [b.decode() for b in m["barcodes"][:]]
        h5_ids = [g.decode() for g in m["features"]["id"][:]]
    got_h5 = read_sample_as_user(uri, "chr21_h5", "chr21_again")
    assert_counts_equal(got_h5, "chr21_h5", "chr21_again", h5, h5_barcodes, h5_ids)
    assert set(got_h5.obs["barcode"]) == set(got.obs["barcode"])
    assert not set(got_h5.obs_names) & set(got.obs_names)
    assert set(got_h5.obs["scrnaseq_protocol"]) == {"unknown"}  # no sample metadata: the schema default

    # Antibody capture features stay out of the RNA measurement.
    protein_dir = DATA / "10x-v3-pbmc-protein" / "filtered_feature_bc_matrix"
    protein, protein_barcodes, protein_features, gex = _mtx_oracle(protein_dir, "features.tsv.gz")
    got_protein = read_sample_as_user(uri, "pbmc", "protein")
    assert_counts_equal(got_protein, "pbmc", "protein", protein[:, np.flatnonzero(gex)], protein_barcodes,
                        protein_features[0][gex])
    # (Antibody ids such as CD14 are also gene symbols of the v2 sample, so compare their symbols.)
    antibody_symbols = set(protein_features[1][~gex])
    assert all(s.endswith("TotalSeqB") for s in antibody_symbols)
    with tiledbsoma.Experiment.open(str(uri)) as exp:
        symbols = set(exp.ms["RNA"].var.read(column_names=["gene_symbol"]).concat()["gene_symbol"].to_pylist())
        assert not antibody_symbols & symbols
        assert len(exp.obs.read(column_names=["soma_joinid"]).concat()) == 1107 * 2 + 1024 + 80

    # Cell Ranger 2: placeholder ids (ENSGXXXXXX), so genes are identified by unique-made symbols.
    v2, v2_barcodes, v2_genes, _ = _mtx_oracle(DATA / "10x-v2-seurat", "genes.tsv.gz")
    import anndata

    v2_ids = anndata.utils.make_index_unique(pd.Index(v2_genes[1]))
    got_v2 = read_sample_as_user(uri, "seurat", "v2_sample")
    assert_counts_equal(got_v2, "seurat", "v2_sample", v2, v2_barcodes, v2_ids)
    # QC percentages against the raw counts (this sample has one ribosomal gene and no MT- gene).
    upper = v2_genes[1].str.upper()
    rows = [v2_barcodes.index(i.split("/", 2)[2]) for i in got_v2.obs_names]
    for column, prefixes in (("pct_mito", ("MT-",)), ("pct_ribo", ("RPS", "RPL"))):
        part = np.asarray(v2[:, np.flatnonzero(upper.str.startswith(prefixes))].sum(axis=1)).ravel()
        umi = np.asarray(v2.sum(axis=1)).ravel()
        np.testing.assert_allclose(got_v2.obs[column].to_numpy(), (100.0 * part / np.maximum(umi, 1))[rows],
                                   rtol=1e-6, err_msg=column)
    assert got_v2.obs["pct_ribo"].max() > 0

    verify = run_cli("verify", manifest, "--deep")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_generated_studies_with_colliding_barcodes(project: Project) -> None:
    result = run_cli("apply", project.manifest, "--processes", "2")
    assert result.returncode == 0, result.stderr
    shared = set(project.samples["study_a/s1"].barcodes) & set(project.samples["study_b/s1"].barcodes)
    assert shared, "the fixture must produce colliding barcodes"
    total = 0
    for key, data in project.samples.items():
        study, sample = key.split("/")
        got = read_sample_as_user(project.atlas_uri, study, sample)
        assert_counts_equal(got, study, sample, data.counts, data.barcodes, data.gene_ids)
        total += got.n_obs
    with tiledbsoma.Experiment.open(str(project.atlas_uri)) as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "obs_id"]).concat().to_pandas()
    assert len(obs) == total == sum(d.counts.shape[0] for d in project.samples.values())
    assert obs["obs_id"].is_unique and obs["soma_joinid"].is_unique


def test_noop_reapply_does_nothing(project: Project) -> None:
    assert run_cli("apply", project.manifest).returncode == 0
    state_before = project.state_path.read_text()
    fragments_before = sorted(p.name for p in project.atlas_uri.rglob("__fragments/*"))
    plan = run_cli("plan", project.manifest, "--detailed-exitcode")
    assert plan.returncode == 0, plan.stdout
    assert "No changes" in plan.stdout
    again = run_cli("apply", project.manifest)
    assert again.returncode == 0
    assert "Nothing to do" in again.stderr
    assert project.state_path.read_text() == state_before
    assert sorted(p.name for p in project.atlas_uri.rglob("__fragments/*")) == fragments_before


def _joinids(uri: Path) -> dict[str, int]:
    with tiledbsoma.Experiment.open(str(uri)) as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "obs_id"]).concat().to_pandas()
    return dict(zip(obs["obs_id"], obs["soma_joinid"]))


def test_adding_a_sample_costs_only_that_sample(project: Project) -> None:
    assert run_cli("apply", project.manifest).returncode == 0
    before = _joinids(project.atlas_uri)
    h5ads = {p: p.stat().st_mtime_ns for p in (project.root / "h5ads").rglob("*.h5ad")}
    new = make_sample(25, 20, seed=9, gene_offset=40)  # also brings genes the atlas does not have yet
    project.add_mtx("study_b", "s2", new)

    plan = json.loads(run_cli("plan", project.manifest, "--json").stdout)
    assert [(a["key"], a["kind"]) for a in plan["actions"]] == [("study_b/s2", "add")]
    result = run_cli("apply", project.manifest)
    assert result.returncode == 0, result.stderr
    after = _joinids(project.atlas_uri)
    assert {k: after[k] for k in before} == before, "existing cells kept their joinids"
    assert len(after) == len(before) + 25
    assert {p: p.stat().st_mtime_ns for p in h5ads} == h5ads, "other samples were not re-converted"
    got = read_sample_as_user(project.atlas_uri, "study_b", "s2")
    assert_counts_equal(got, "study_b", "s2", new.counts, new.barcodes, new.gene_ids)


def test_a_failing_sample_is_isolated_and_retried(project: Project) -> None:
    bad = project.raw / "study_a" / "mtx" / "s2" / "matrix.mtx.gz"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated gzip stream
    result = run_cli("apply", project.manifest, "--processes", "2")
    assert result.returncode == 1
    assert "study_a/s2" in result.stderr and "matrix.mtx.gz" in result.stderr
    assert "2 succeeded, 1 failed" in result.stderr
    state = json.loads(project.state_path.read_text())
    assert state["samples"]["study_a/s2"]["failed_step"] == "convert"
    for key in ("study_a/s1", "study_b/s1"):
        assert state["samples"][key]["ingest"] == "done"
        study, sample = key.split("/")
        data = project.samples[key]
        assert_counts_equal(read_sample_as_user(project.atlas_uri, study, sample), study, sample,
                            data.counts, data.barcodes, data.gene_ids)

    plan = run_cli("plan", project.manifest)
    assert "retry" in plan.stdout and "study_a/s2" in plan.stdout
    bad.write_bytes(good_bytes)
    fixed = run_cli("apply", project.manifest)
    assert fixed.returncode == 0, fixed.stderr
    data = project.samples["study_a/s2"]
    assert_counts_equal(read_sample_as_user(project.atlas_uri, "study_a", "s2"), "study_a", "s2",
                        data.counts, data.barcodes, data.gene_ids)
    assert run_cli("verify", project.manifest, "--deep").returncode == 0


def test_h5ad_study_fixed_gene_universe_and_extra_layers(tmp_path: Path) -> None:
    """h5ad inputs with their own annotations; a fixed gene list; a normalized float layer."""
    import anndata

    data = make_sample(30, 20, seed=4)
    folder = tmp_path / "raw" / "lung" / "h5ad"
    folder.mkdir(parents=True)
    obs = pd.DataFrame({"cell_type": ["AT2"] * 30}, index=data.barcodes)
    var = pd.DataFrame({"gene_symbols": data.symbols}, index=data.gene_ids)
    anndata.AnnData(X=data.counts.astype(np.float32), obs=obs, var=var).write_h5ad(folder / "donor1.h5ad")
    universe = data.gene_ids[:15] + ["ENSG99999999999"]  # drops 5 genes, adds one the sample lacks
    (tmp_path / "genes.tsv").write_text("".join(f"{g}\tSYM{i}\n" for i, g in enumerate(universe)))
    schema = tmp_path / "schema.yaml"
    schema.write_text(DEFAULT_SCHEMA.read_text()
                      .replace("universe: union", "universe: fixed\n  file: genes.tsv")
                      .replace("  - {name: raw, type: int32, source: counts}",
                               "  - {name: raw, type: int32, source: counts}\n"
                               "  - {name: normalized, type: float32, source: normalized}\n"
                               "  - {name: raw_by_gene, type: int32, source: counts, optimize: genes}"))
    project = Project(tmp_path)
    project.write_manifest("  - name: lung\n    format: h5ad\n", schema=schema)
    result = run_cli("apply", project.manifest)
    assert result.returncode == 0, result.stderr
    got = read_sample_as_user(project.atlas_uri, "lung", "donor1")
    assert list(got.var_names) == universe
    assert_counts_equal(got, "lung", "donor1", data.counts[:, :15], data.barcodes, data.gene_ids[:15])
    assert set(got.obs["cell_type"]) == {"AT2"}, "an h5ad's own annotations fill cell_metadata columns"
    norm = read_sample_as_user(project.atlas_uri, "lung", "donor1", layer="normalized")
    rows = sp.csr_matrix(norm.X)
    counts = sp.csr_matrix(got.X).astype(np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    expected = sp.diags(np.where(totals > 0, 1e4 / np.maximum(totals, 1), 0)) @ counts
    np.testing.assert_allclose(rows.toarray(), expected.toarray(), rtol=1e-5)
    by_gene = read_sample_as_user(project.atlas_uri, "lung", "donor1", layer="raw_by_gene")
    assert (sp.csr_matrix(by_gene.X) != sp.csr_matrix(got.X)).nnz == 0, "the gene-optimized copy equals raw"


def test_each_ingest_uses_the_sample_its_worker_just_converted(project: Project) -> None:
    """The ingest takes the converted counts from the converting worker's memory (no h5ad read); with one
    worker, every sample's ingest runs where its conversion did. Small samples ingested in one step (a group)
    are read from their h5ad files. The cells equal the raw counts all the same."""
    import re

    from soma_manifest import api

    report = api.load(project.manifest).apply(processes=1)
    assert report.ok, report.failed
    log = Path(report.log_file).read_text()
    grouped = sum(int(n) + 1 for n in re.findall(r" and (\d+) more: ingested in one step", log))
    assert log.count("ingest done") == 3 and log.count("from memory") == 3 - grouped >= 1, log
    for key, data in project.samples.items():
        study, sample = key.split("/")
        assert_counts_equal(read_sample_as_user(project.atlas_uri, study, sample), study, sample, data.counts,
                            data.barcodes, data.gene_ids)


def test_a_kept_sample_is_not_used_once_its_h5ad_changed(tmp_path: Path) -> None:
    import anndata as ad

    from soma_manifest import handoff

    h5ad = tmp_path / "s.h5ad"
    adata = ad.AnnData(X=sp.csr_matrix(np.eye(3, dtype=np.int32)))
    adata.write_h5ad(h5ad)
    handoff.keep(str(h5ad), adata)
    assert handoff.take(str(tmp_path / "other.h5ad")) is None
    assert handoff.take(str(h5ad)) is adata
    assert handoff.take(str(h5ad)) is None, "taken once"

    handoff.keep(str(h5ad), adata)
    ad.AnnData(X=sp.csr_matrix(np.eye(4, dtype=np.int32))).write_h5ad(h5ad)  # rewritten since
    assert handoff.take(str(h5ad)) is None
    handoff.keep(str(h5ad), adata)
    h5ad.unlink()
    assert handoff.take(str(h5ad)) is None
    handoff.keep(str(h5ad), adata)  # a file that cannot be stat'ed is not kept, and is no error
    assert handoff.take(str(h5ad)) is None


@pytest.mark.parametrize("kind", ["loky", "dask"])
def test_the_command_leaves_no_worker_behind(project: Project, kind: str) -> None:
    """The CLI exits without the interpreter's teardown; it stops its loky workers, or its Dask LocalCluster,
    first."""
    if kind == "dask":
        project.write_manifest(extra="executor: {kind: dask}\n")
    mark = uuid.uuid4().hex
    log = project.root / "cli.err"
    with log.open("w") as err:  # a file, not a pipe: a worker left behind would hold a pipe open
        result = subprocess.run([sys.executable, "-m", "soma_manifest", "apply", str(project.manifest),
                                 "--processes", "2"], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "NO_COLOR": "1", "SOMA_MANIFEST_TEST_MARK": mark})
    assert result.returncode == 0, log.read_text()
    assert "Apply finished: 3 succeeded" in log.read_text()
    assert f"executor {kind}" in max((project.root / "logs").glob("apply-*.log")).read_text()

    def marked() -> list[int]:
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if f"SOMA_MANIFEST_TEST_MARK={mark}".encode() in environ:
                pids.append(int(pid))
        return pids

    deadline = time.monotonic() + 5  # loky's resource tracker leaves once the workers are gone
    while marked() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marked() == []

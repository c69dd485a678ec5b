"""Schema evolution in place (issue #24): obs/var columns and X layers added or dropped on an existing atlas,
planned as their own actions and applied without re-ingesting X; reads at an earlier serial see the old
structure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tiledbsoma as soma

from conftest import (
    DEFAULT_SCHEMA,
    Project,
    apply_ok,
    assert_converged,
    edit,
    invoke_cli,
    read_state,
)
from soma_manifest import atlas
from test_dask import store_project  # noqa: F401 - a fixture: the project, or the same in a bucket

RAW_LAYER = "  - {name: raw, type: int32, source: counts}\n"
PCT_RIBO = "  - {name: pct_ribo, type: float32, source: computed}\n"
CELL_TYPE = "  - {name: cell_type, type: string, source: cell_metadata, default: unknown}\n"


def plan_doc(project: Project) -> dict:
    result = invoke_cli("plan", "--json", project.manifest)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def fragments(project: Project, layer: str = "raw") -> list[str]:
    return sorted(p.name for p in (project.atlas_uri / "ms" / "RNA" / "X" / layer / "__fragments").iterdir())


def obs_frame(project: Project, timestamp: int | None = None):
    with soma.Experiment.open(str(project.atlas_uri), tiledb_timestamp=timestamp, context=atlas.context()) as exp:
        return exp.obs.read().concat().to_pandas().set_index("obs_id").sort_index()


def layers(project: Project, timestamp: int | None = None) -> list[str]:
    with soma.Experiment.open(str(project.atlas_uri), tiledb_timestamp=timestamp, context=atlas.context()) as exp:
        return sorted(exp.ms["RNA"].X.keys())


def layer_matrix(project: Project, key: str, layer: str, timestamp: int | None = None) -> sp.csr_matrix:
    """The sample's cells (in its barcodes' order) x its genes (in its gene ids' order) of one X layer."""
    data = project.samples[key]
    with soma.Experiment.open(str(project.atlas_uri), tiledb_timestamp=timestamp, context=atlas.context()) as exp:
        study, sample = key.split("/")
        query = exp.axis_query("RNA", obs_query=soma.AxisQuery(
            value_filter=f"sample_name == '{sample}' and study_name == '{study}'"))
        got = query.to_anndata(X_name=layer, obs_id_name="obs_id", var_id_name="var_id")
    got = got[[f"{key}/{b}" for b in data.barcodes]]
    return sp.csr_matrix(got.X)[:, got.var_names.get_indexer(data.gene_ids)]


def expected_layer(counts: sp.csr_matrix, source: str) -> sp.csr_matrix:
    """What an ingest writes for a derived layer: counts per 10k of the cell's total (and their log1p)."""
    totals = np.maximum(np.asarray(counts.sum(axis=1)).ravel(), 1)
    out = sp.csr_matrix(counts, dtype=np.float64)
    out.data = out.data / np.repeat(totals, np.diff(out.indptr)) * 1e4
    if source == "log1p":
        out.data = np.log1p(out.data)
    return sp.csr_matrix(out, dtype=np.float32)


DONOR = "  - {name: donor, type: string, source: sample_metadata, from: scrnaseq_protocol, default: unknown}\n"
OBS_ADDED = (DONOR + "  - {name: cell_type2, type: string, source: cell_metadata, from: cell_type, default: none}\n"
             "  - {name: barcode2, type: string, source: barcode}\n"
             "  - {name: n_genes, type: int64, source: computed}\n")


def test_obs_columns_added_from_every_source_and_dropped_in_place(project: Project, own_schema: Path) -> None:
    """Through the CLI: four columns (sample metadata, cell metadata, barcode, computed) added and one
    dropped are planned as schema changes beside per-sample obs rewrites, applied without touching X, and
    read back with their values; a drop alone writes nothing per sample."""
    before = obs_frame(project)
    x_before = fragments(project)
    edit(own_schema, CELL_TYPE, CELL_TYPE + OBS_ADDED)
    edit(own_schema, PCT_RIBO, "")
    doc = plan_doc(project)
    assert [(c["kind"], c["what"], c["name"]) for c in doc["schema_changes"]] == [
        ("add", "obs", "donor"), ("add", "obs", "cell_type2"), ("add", "obs", "barcode2"),
        ("add", "obs", "n_genes"), ("drop", "obs", "pct_ribo")]
    # n_genes is computed: the raw data is read again, X is not written.
    assert {(a["kind"], tuple(a["steps"])) for a in doc["actions"]} == {("update", ("convert", "write_obs"))}
    text = invoke_cli("plan", project.manifest).stdout
    assert ("+ obs column donor (string, from sample_metadata column scrnaseq_protocol; default unknown): "
            "filled for 3 samples") in text
    assert "- obs column pct_ribo" in text and "4 schema changes" not in text and "5 schema changes" in text
    markdown = invoke_cli("plan", "--format", "markdown", project.manifest).stdout
    assert "schema changes (in place)" in markdown and "+ obs column n_genes" in markdown

    apply_ok(project)
    assert fragments(project) == x_before, "X was rewritten"
    diff = invoke_cli("diff", project.manifest)
    assert "schema changed in place: +obs donor, +obs cell_type2, +obs barcode2, +obs n_genes, -obs pct_ribo" \
        in diff.stdout, diff.stdout + diff.stderr
    after = obs_frame(project)
    assert "pct_ribo" not in after.columns
    assert (after["donor"] == before["scrnaseq_protocol"]).all()
    assert (after["cell_type2"] == before["cell_type"]).all()
    assert (after["barcode2"] == before["barcode"]).all()
    for key, data in project.samples.items():
        ids = [f"{key}/{b}" for b in data.barcodes]
        assert after.loc[ids, "n_genes"].tolist() == np.diff(data.counts.indptr).tolist()
    assert_converged(project)
    state = read_state(project)
    assert "n_genes:int64" in state.structure_summary["obs"] and state.layer_fills == {}

    # A drop alone: no sample is rewritten, the column leaves obs.
    edit(own_schema, DONOR, "")
    doc = plan_doc(project)
    assert [(c["kind"], c["name"]) for c in doc["schema_changes"]] == [("drop", "donor")]
    assert doc["actions"] == []
    obs_fragments = sorted(p.name for p in (project.atlas_uri / "obs" / "__fragments").iterdir())
    apply_ok(project)
    assert "donor" not in obs_frame(project).columns
    assert sorted(p.name for p in (project.atlas_uri / "obs" / "__fragments").iterdir()) == obs_fragments
    assert_converged(project)


def test_layers_added_and_dropped_through_the_api(project: Project, own_schema: Path) -> None:
    """Through the API: a cells layer and a genes layer added to an existing atlas are computed from its counts,
    equal to what an ingest writes; a sample added in the same apply gets them directly; reads at the serial
    before the change see the atlas as it was; a dropped layer leaves the measurement."""
    from conftest import make_sample
    from soma_manifest.api import load

    first = read_state(project).serial
    raw_fragments = fragments(project)
    edit(own_schema, RAW_LAYER, RAW_LAYER + "  - {name: norm, type: float32, source: normalized}\n"
         "  - {name: log_by_gene, type: float32, source: log1p, optimize: genes}\n")
    project.add_mtx("study_b", "s2", make_sample(25, 20, seed=12, gene_offset=40))
    handle = load(project.manifest)
    plan = handle.plan()
    assert [c.short for c in plan.schema_changes] == ["+layer norm", "+layer log_by_gene"]
    nnz = sum(d.counts.nnz for k, d in project.samples.items() if k != "study_b/s2")
    assert {(c.samples, c.entries) for c in plan.schema_changes} == {(3, nnz)}
    assert [(a.key, a.kind) for a in plan.actions] == [("study_b/s2", "add")]
    report = handle.apply(plan=plan)
    assert not report.failed, report.failed
    assert sorted(raw_fragments) == sorted(set(fragments(project)) & set(raw_fragments)), "old X fragments lost"
    for key, data in project.samples.items():
        for layer, source in (("norm", "normalized"), ("log_by_gene", "log1p")):
            got, want = layer_matrix(project, key, layer), expected_layer(data.counts, source)
            assert got.nnz == want.nnz and abs(got - want).max() == 0, f"{key}: {layer} differs"
    assert_converged(project)
    history = handle.history()
    assert history[-1]["changes"]["schema changed"] == ["+layer norm", "+layer log_by_gene"]
    assert history[-1]["changes"]["added"] == ["study_b/s2"]

    # As the first apply left it: no new layer, no new sample, same counts.
    with handle.open(serial=first) as exp:
        assert sorted(exp.ms["RNA"].X.keys()) == ["raw"]
        assert exp.obs.count == sum(d.counts.shape[0] for k, d in project.samples.items() if k != "study_b/s2")
    assert handle.summary(first).layers == ("raw",)

    edit(own_schema, "  - {name: norm, type: float32, source: normalized}\n", "")
    handle = load(project.manifest)
    plan = handle.plan()
    assert [c.short for c in plan.schema_changes] == ["-layer norm"] and not plan.actions
    handle.apply(plan=plan)
    assert layers(project) == ["log_by_gene", "raw"]
    assert_converged(project)
    # The apply that added it still reads it.
    with handle.open(serial=history[-1]["serial"]) as exp:
        assert sorted(exp.ms["RNA"].X.keys()) == ["log_by_gene", "norm", "raw"]


def test_reads_at_an_earlier_serial_see_the_columns_of_that_serial(project: Project, own_schema: Path) -> None:
    """TileDB keeps each schema version with its timestamp: obs read as the first apply left it has the dropped
    column (with its values) and not the added one."""
    from soma_manifest.api import load

    handle = load(project.manifest)
    first = handle.history()[-1]["serial"]
    before = obs_frame(project)
    edit(own_schema, CELL_TYPE, CELL_TYPE + DONOR)
    edit(own_schema, PCT_RIBO, "")
    apply_ok(project)
    with handle.open(serial=first) as exp:
        old = exp.obs.read().concat().to_pandas().set_index("obs_id").sort_index()
    assert old.columns.tolist() == before.columns.tolist()
    assert old.equals(before)
    now = obs_frame(project)
    assert "donor" in now.columns and "pct_ribo" not in now.columns
    # Consolidation would write the old fragments with the new schema, losing pct_ribo's values: compaction
    # leaves obs as it is while an apply before its schema change is kept, and compacts the rest.
    obs_fragments = sorted((project.atlas_uri / "obs" / "__fragments").iterdir())
    result = invoke_cli("compact", project.manifest)
    assert result.returncode == 0, result.stderr
    assert sorted((project.atlas_uri / "obs" / "__fragments").iterdir()) == obs_fragments
    assert len(fragments(project)) == 1, "X was not compacted"
    with handle.open(serial=first) as exp:
        assert exp.obs.read().concat().to_pandas().set_index("obs_id").sort_index().equals(before)
    assert obs_frame(project).equals(now)


def test_var_column_dropped_in_place(project: Project, own_schema: Path) -> None:
    edit(own_schema, "var:\n  - {name: gene_symbol, type: string, source: feature_name}\n", "var: []\n")
    doc = plan_doc(project)
    assert [(c["kind"], c["what"], c["name"]) for c in doc["schema_changes"]] == [("drop", "var", "gene_symbol")]
    assert doc["actions"] == []
    apply_ok(project)
    with soma.Experiment.open(str(project.atlas_uri), context=atlas.context()) as exp:
        assert exp.ms["RNA"].var.schema.names == ["soma_joinid", "var_id"]
    assert_converged(project)


def test_saved_plan_made_before_a_schema_change_is_stale(project: Project, own_schema: Path) -> None:
    saved = project.root / "plan.json"
    assert invoke_cli("plan", "--out", saved, project.manifest).returncode in (0, 2)
    edit(own_schema, CELL_TYPE, CELL_TYPE + DONOR)
    result = invoke_cli("apply", saved)
    assert result.returncode == 1 and "stale" in result.stderr and "schema" in result.stderr


@pytest.mark.parametrize("point", ["after_evolve", "mid_layer_fill"])
def test_kill_during_a_layer_build_converges_exactly(project: Project, own_schema: Path, point: str) -> None:
    """kill -9 of apply once the layer exists, or after one sample was computed: the next plan lists
    what is left, the next apply computes it, and the layer holds exactly what an ingest writes."""
    from conftest import run_cli
    from soma_manifest.faults import ENV as CRASH_AT

    edit(own_schema, RAW_LAYER, RAW_LAYER + "  - {name: norm, type: float32, source: normalized}\n")
    edit(own_schema, CELL_TYPE, CELL_TYPE + DONOR)
    killed = run_cli("apply", str(project.manifest), env={CRASH_AT: point})
    assert killed.returncode == -9, killed.stderr
    left = {"after_evolve": 3, "mid_layer_fill": 2}[point]
    changes = {c["name"]: c for c in plan_doc(project)["schema_changes"]}
    assert changes["norm"]["samples"] == left
    # The layer exists, but the state records the old structure until every sample has it.
    assert "norm" in layers(project) and "norm:float32" not in read_state(project).structure_summary["layers"]
    apply_ok(project)
    state = read_state(project)
    assert state.layer_fills == {} and "norm:float32" in state.structure_summary["layers"]
    for key, data in project.samples.items():
        got, want = layer_matrix(project, key, "norm"), expected_layer(data.counts, "normalized")
        assert got.nnz == want.nnz and abs(got - want).max() == 0, key
    assert_converged(project)


def test_verify_deep_compares_a_layer_added_in_place_with_its_counts(project: Project, own_schema: Path) -> None:
    """A wrong value in a layer added in place is found by `verify --deep` (and only there)."""
    from conftest import run_cli

    edit(own_schema, RAW_LAYER, RAW_LAYER + "  - {name: lognorm, type: float32, source: log1p}\n")
    apply_ok(project)
    assert run_cli("verify", "--deep", str(project.manifest)).returncode == 0
    with soma.Experiment.open(str(project.atlas_uri), context=atlas.context()) as exp:
        entry = exp.ms["RNA"].X["lognorm"].read((slice(0, 0),)).tables().concat().slice(0, 1)
    with soma.SparseNDArray.open(str(project.atlas_uri / "ms" / "RNA" / "X" / "lognorm"), "w",
                                 context=atlas.context()) as x:
        x.write(entry.set_column(2, "soma_data", pa.array([123.0], pa.float32())))
    assert run_cli("verify", str(project.manifest)).returncode == 0
    deep = run_cli("verify", "--deep", str(project.manifest))
    assert deep.returncode == 1 and "X layer 'lognorm' differs from its counts (log1p)" in deep.stdout + deep.stderr


def test_layer_dropped_then_added_again_under_its_name_is_refused(project: Project, own_schema: Path) -> None:
    """The dropped layer's array stays for reads at earlier serials, under its name: re-adding the name is
    refused, located, changing nothing."""
    norm = "  - {name: norm, type: float32, source: normalized}\n"
    edit(own_schema, RAW_LAYER, RAW_LAYER + norm)
    apply_ok(project)
    with_norm = read_state(project).serial
    edit(own_schema, norm, "")
    apply_ok(project)
    edit(own_schema, RAW_LAYER, RAW_LAYER + norm.replace("normalized", "log1p"))
    state_bytes = project.state_path.read_bytes()
    refused = invoke_cli("apply", project.manifest)
    assert refused.returncode == 1 and str(own_schema) in refused.stderr
    assert "X layer norm added under the name of a layer dropped earlier" in refused.stderr
    assert "Traceback" not in refused.stderr and project.state_path.read_bytes() == state_bytes
    from soma_manifest.api import load
    with load(project.manifest).open(serial=with_norm) as exp:
        old = exp.ms["RNA"].X["norm"].read().tables().concat()
    assert len(old) == sum(d.counts.nnz for d in project.samples.values())
    edit(own_schema, "name: norm", "name: norm2")
    apply_ok(project)
    for key, data in project.samples.items():
        assert abs(layer_matrix(project, key, "norm2") - expected_layer(data.counts, "log1p")).max() == 0
    assert_converged(project)


@pytest.mark.parametrize("store_project", ["s3"], indirect=True)
def test_columns_and_a_layer_added_on_s3_through_a_dask_cluster(store_project: Project, dask_cluster) -> None:
    """On an S3 atlas, with the Dask executor: an obs column and a layer are added in place (the layer computed
    on the cluster's workers), equal to what the counts give; X's counts are not rewritten."""
    from soma_manifest.api import load
    from test_dask import read_log, read_text

    project = store_project
    schema = project.root / "schema.yaml"
    shutil.copy(DEFAULT_SCHEMA, schema)
    project.write_manifest(schema=schema, extra=f"executor:\n  kind: dask\n  address: {dask_cluster.address}\n")
    apply_ok(project)
    first = read_state_of(project).serial
    edit(schema, CELL_TYPE, CELL_TYPE + DONOR)
    edit(schema, RAW_LAYER, RAW_LAYER + "  - {name: norm, type: float32, source: normalized, optimize: genes}\n")
    counts_objects = {k for k in project.objects() if "/X/raw/__fragments/" in k}
    apply_ok(project)
    assert "executor dask at " + dask_cluster.address in read_text(project, read_log(project))
    assert {k for k in project.objects() if "/X/raw/__fragments/" in k} == counts_objects
    handle = load(project.manifest)
    with handle.open() as exp:
        obs = exp.obs.read(column_names=["obs_id", "donor", "scrnaseq_protocol"]).concat().to_pandas()
        assert (obs["donor"] == obs["scrnaseq_protocol"]).all()
        norm = exp.ms["RNA"].X["norm"].read().tables().concat()
        raw = exp.ms["RNA"].X["raw"].read().tables().concat()
    assert len(norm) == len(raw) == sum(d.counts.nnz for d in project.samples.values())
    with handle.open(serial=first) as exp:
        assert "donor" not in exp.obs.schema.names and sorted(exp.ms["RNA"].X.keys()) == ["raw"]
    result = invoke_cli("verify", "--deep", project.manifest)
    assert result.returncode == 0, result.stdout + result.stderr
    assert plan_doc(project)["schema_changes"] == []


def read_state_of(project: Project):
    from soma_manifest.api import load

    return load(project.manifest).state


def test_a_held_layer_write_of_a_dead_apply_cannot_outlast_the_next(project: Project, own_schema: Path,
                                                                    dask_cluster) -> None:
    """Fencing: a dead apply's layer writes, held after their lease check, land only after the next apply
    removed their samples: stamped before it, they stay hidden under its deletes (the layer holds exactly the
    remaining samples' entries). Two of the three samples are held; two are removed, so one held is."""
    import signal

    from test_dask import _apply_held_at, _release_held

    edit(own_schema, RAW_LAYER, RAW_LAYER + "  - {name: norm, type: float32, source: normalized}\n")
    run = _apply_held_at("write_layer_fenced", project, dask_cluster, "loky")
    try:
        assert len(dask_cluster.paused_pids(at_least=2)) == 2
        run.proc.send_signal(signal.SIGKILL)
        assert run.wait().returncode == -signal.SIGKILL
        (dask_cluster.pause / "armed").unlink()
        for study, sample in (("study_a", "s2"), ("study_b", "s1")):
            shutil.rmtree(project.raw / study / "mtx" / sample)
            del project.samples[f"{study}/{sample}"]
        project.write_study_metadata("study_a")
        project.write_manifest(schema=own_schema)  # study_b has no sample left: out of the manifest
        apply_ok(project, "--allow-delete", "--executor", "loky")
        _release_held(dask_cluster, "loky")
        with soma.Experiment.open(str(project.atlas_uri), context=atlas.context()) as exp:
            assert len(exp.ms["RNA"].X["norm"].read().tables().concat()) == project.samples["study_a/s1"].counts.nnz
        got = layer_matrix(project, "study_a/s1", "norm")
        assert abs(got - expected_layer(project.samples["study_a/s1"].counts, "normalized")).max() == 0
        assert_converged(project)
    finally:
        run.kill_session()


def test_a_layer_left_half_built_then_taken_out_of_the_schema_is_dropped(project: Project, own_schema: Path) -> None:
    from conftest import run_cli
    from soma_manifest.faults import ENV as CRASH_AT

    norm = "  - {name: norm, type: float32, source: normalized}\n"
    edit(own_schema, RAW_LAYER, RAW_LAYER + norm)
    assert run_cli("apply", str(project.manifest), env={CRASH_AT: "mid_layer_fill"}).returncode == -9
    edit(own_schema, norm, "")
    apply_ok(project)
    state = read_state(project)
    assert layers(project) == ["raw"] and state.layer_fills == {} and state.dropped_layers == ["norm"]
    assert_converged(project)

"""Every kind of change the plan understands (replace, update, remove, schema), planned and applied for real."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tiledbsoma as soma

from conftest import (
    DEFAULT_SCHEMA,
    Project,
    SampleData,
    apply_ok,
    assert_atlas_holds,
    assert_converged,
    edit,
    invoke_cli,
    plan_actions,
    read_state,
    set_cell_type,
    write_mtx,
)

RAW_LAYER = "  - {name: raw, type: int32, source: counts}\n"
NORM_LAYER = "  - {name: norm, type: float32, source: normalized}\n"


def rewrite_file(project: Project, key: str, data: SampleData, name: str) -> None:
    """Replace one raw file of a sample (only that one, so the plan can name it)."""
    study, sample = key.split("/")
    scratch = project.root / "scratch" / key
    write_mtx(scratch, data)
    shutil.copy(scratch / name, project.raw / study / "mtx" / sample / name)
    project.samples[key] = data


def changed_matrix(data: SampleData) -> SampleData:
    """Some entries become zero, others change: a replace must leave none of the old values."""
    counts = data.counts.copy().tolil()
    rows, cols = data.counts.nonzero()
    for r, c in list(zip(rows, cols))[::3]:
        counts[r, c] = 0
    counts[0, 0] = 99
    return SampleData(counts.tocsr(), data.barcodes, data.gene_ids, data.symbols)


def changed_barcodes(data: SampleData) -> SampleData:
    return SampleData(data.counts, [b.replace("-1", "-2") for b in data.barcodes], data.gene_ids, data.symbols)


def changed_features(data: SampleData) -> SampleData:
    return SampleData(data.counts, data.barcodes, [g.replace("ENSG", "ENSMUSG") for g in data.gene_ids], data.symbols)


def x_fragments(project: Project) -> list[str]:
    return sorted(p.name for p in (project.atlas_uri / "ms" / "RNA" / "X" / "raw" / "__fragments").iterdir())


def obs_column(project: Project, key: str, column: str) -> list:
    study, sample = key.split("/")
    with soma.Experiment.open(str(project.atlas_uri)) as exp:
        table = exp.obs.read(value_filter=f"sample_name == '{sample}' and study_name == '{study}'",
                             column_names=[column]).concat()
    return table[column].to_pylist()


@pytest.mark.parametrize(("name", "change", "cell_type"), [
    ("matrix.mtx.gz", changed_matrix, None),
    # The cell metadata still lists the old barcodes: the new cells get the column default.
    ("barcodes.tsv.gz", changed_barcodes, "unknown"),
    ("features.tsv.gz", changed_features, None),
], ids=["matrix", "barcodes", "features"])
def test_raw_change_replaces_the_sample(applied: Project, name: str, change, cell_type: str | None) -> None:
    key = "study_a/s1"
    before = read_state(applied)
    rewrite_file(applied, key, change(applied.samples[key]), name)

    action = plan_actions(applied)[key]
    assert (action["kind"], action["reason"]) == ("replace", f"raw data changed: {name}")
    assert action["steps"] == ["convert", "ingest"]
    assert action["delete_range"] == list(before.samples[key].joinids)
    text = invoke_cli("plan", applied.manifest).stdout
    assert f"-/+ {key}" in text and set(plan_actions(applied)) == {key}

    apply_ok(applied)
    after = read_state(applied)
    # A fresh range: the old cells (obs and X) were deleted, nothing of them can survive.
    assert after.samples[key].joinids[0] >= before.next_joinid
    assert after.orphans == []
    assert {k: s.joinids for k, s in after.samples.items() if k != key} == \
        {k: s.joinids for k, s in before.samples.items() if k != key}
    assert_converged(applied, {key: cell_type} if cell_type else None)


def test_replace_clears_every_x_layer(project: Project) -> None:
    """With derived layers too, the old version leaves no entry behind in any of them."""
    schema = project.root / "schema.yaml"
    schema.write_text(DEFAULT_SCHEMA.read_text().replace(RAW_LAYER, RAW_LAYER + NORM_LAYER))
    project.write_manifest(schema=schema)
    apply_ok(project)
    key = "study_a/s1"
    rewrite_file(project, key, changed_matrix(project.samples[key]), "matrix.mtx.gz")
    apply_ok(project)
    assert_converged(project)
    nnz = sum(d.counts.nnz for d in project.samples.values())
    with soma.Experiment.open(str(project.atlas_uri)) as exp:
        cells = exp.obs.read(column_names=["soma_joinid"]).concat()["soma_joinid"].to_numpy()
        for name in ("raw", "norm"):
            rows = exp.ms["RNA"].X[name].read().tables().concat()["soma_dim_0"].to_numpy()
            assert len(rows) == nnz and np.isin(rows, cells).all(), name


@pytest.mark.parametrize("kind", ["cell_metadata", "sample_metadata"])
def test_metadata_change_updates_obs_in_place(applied: Project, kind: str) -> None:
    key = "study_a/s2"
    before = read_state(applied)
    fragments = x_fragments(applied)
    if kind == "cell_metadata":
        set_cell_type(applied, key, "NK cell")
        column, expected = "cell_type", "NK cell"
    else:
        path = applied.raw / "study_a" / "sample_metadata" / "study_a.tsv"
        path.write_text(path.read_text().replace("s2\t10x 3' v3", "s2\t10x 5' v2"))
        column, expected = "scrnaseq_protocol", "10x 5' v2"

    actions = plan_actions(applied)
    assert set(actions) == {key}, "only the sample whose rows changed"
    action = actions[key]
    assert (action["kind"], action["reason"]) == ("update", "cell or sample metadata changed")
    assert action["steps"] == ["convert_metadata", "write_obs"] and action["delete_range"] is None
    assert f"~ {key}" in invoke_cli("plan", applied.manifest).stdout

    apply_ok(applied)
    after = read_state(applied)
    assert after.samples[key].joinids == before.samples[key].joinids
    assert x_fragments(applied) == fragments, "X was rewritten"
    assert set(obs_column(applied, key, column)) == {expected}
    assert set(obs_column(applied, "study_a/s1", column)) != {expected}
    assert_converged(applied, {key: "NK cell"} if kind == "cell_metadata" else None)


@pytest.mark.parametrize(("how", "reason"), [
    ("excluded", "no longer selected by the manifest (samples/exclude)"),
    ("raw folder deleted", "its raw data is gone ({raw}/study_a/mtx/s2 not found)"),
], ids=["excluded", "raw folder deleted"])
def test_removal_needs_allow_delete(applied: Project, how: str, reason: str) -> None:
    key = "study_a/s2"
    if how == "excluded":
        applied.write_manifest(studies="  - name: study_a\n    exclude: [s2]\n  - name: study_b\n")
    else:
        shutil.rmtree(applied.raw / "study_a" / "mtx" / "s2")
    action = plan_actions(applied)[key]
    assert (action["kind"], action["cells"], action["steps"]) == ("remove", 35, ["delete"])
    assert action["reason"] == reason.format(raw=applied.raw)
    text = invoke_cli("plan", applied.manifest).stdout
    assert f"- {key}" in text and "35 cells" in text and "--allow-delete" in text

    state_bytes = applied.state_path.read_bytes()
    refused = invoke_cli("apply", applied.manifest)
    assert refused.returncode == 1
    assert f"{key} (35 cells)" in refused.stderr and "--allow-delete" in refused.stderr
    assert "nothing was changed" in refused.stderr
    assert applied.state_path.read_bytes() == state_bytes
    assert_atlas_holds(applied.atlas_uri, applied.samples)

    apply_ok(applied, "--allow-delete")
    state = read_state(applied)
    assert key not in state.samples and state.orphans == []
    del applied.samples[key]
    assert_converged(applied)


@pytest.mark.parametrize(("old", "new", "column", "changes", "steps"), [
    # A computed column counts other genes: the raw data is read again for it, X is not rewritten.
    ('mito_prefixes: ["MT-", "mt-"]', 'mito_prefixes: ["GENE1"]', "pct_mito", "values", ("convert", "write_obs")),
    # A metadata column is mapped from another metadata field: re-joined onto the h5ad.
    ("{name: cell_type, type: string, source: cell_metadata,", "{name: cell_type, type: string, "
     "source: cell_metadata, from: sample_name,", "cell_type", "sample names", ("convert_metadata", "write_obs")),
], ids=["computed column", "metadata mapping"])
def test_obs_conversion_change_rewrites_obs_in_place(project: Project, own_schema: Path, old: str, new: str,
                                                     column: str, changes: str, steps: tuple[str, ...]) -> None:
    """A conversion change that leaves the counts as they are (QC settings, a column's source) rewrites every
    sample's obs rows in place: X's fragments stay those of the first apply (issue #24)."""
    before = {key: obs_column(project, key, column) for key in project.samples}
    fragments = x_fragments(project)
    edit(own_schema, old, new)
    actions = plan_actions(project)
    assert set(actions) == set(project.samples)
    assert {(a["kind"], tuple(a["steps"]), a["delete_range"]) for a in actions.values()} == {("update", steps, None)}
    assert all(f"obs column {column} added or redefined" in a["reason"] for a in actions.values())

    apply_ok(project)
    assert x_fragments(project) == fragments, "X was rewritten"
    for key in project.samples:
        after = obs_column(project, key, column)
        assert after != before[key]
        if changes == "sample names":
            assert set(after) == {key.split("/")[1]}
    cell_types = {k: k.split("/")[1] for k in project.samples} if changes == "sample names" else None
    assert_converged(project, cell_types)


def test_counts_conversion_change_reconverts_and_replaces(project: Project, own_schema: Path) -> None:
    """A conversion change that may alter the counts (which features enter the measurement) replaces X."""
    edit(own_schema, 'feature_types: ["Gene Expression"]', 'feature_types: ["Gene Expression", "Peaks"]')
    actions = plan_actions(project)
    assert {(a["kind"], a["reason"], tuple(a["steps"])) for a in actions.values()} == \
        {("replace", "schema conversion changed", ("convert", "ingest"))}
    apply_ok(project)
    assert_converged(project)


@pytest.mark.parametrize(("old", "new", "named"), [
    ("{name: nnz, type: int64", "{name: nnz, type: int32", "obs column nnz retyped from int64 to int32"),
    ("measurement: RNA", "measurement: RNA2", "measurement RNA -> RNA2"),
    ("{name: gene_symbol, type: string, source: feature_name}\n",
     "{name: gene_symbol, type: string, source: feature_name}\n  - {name: ftype, source: feature_type}\n",
     "var column ftype added"),
], ids=["retyped column", "renamed measurement", "new var column"])
def test_structure_change_is_refused(project: Project, own_schema: Path, old: str, new: str, named: str) -> None:
    state_bytes = project.state_path.read_bytes()
    edit(own_schema, old, new)
    for command in ("plan", "apply"):
        result = invoke_cli(command, project.manifest)
        assert result.returncode == 1
        message = result.stderr
        assert "cannot be made in place" in message and named in message, message
        assert "new atlas" in message and "atlas.name" in message
    assert project.state_path.read_bytes() == state_bytes
    assert_atlas_holds(project.atlas_uri, project.samples)

"""Issue 10: the Python API drives a whole cycle; the samples table and feature presence matrix follow add,
replace, remove and kill -9; the README's examples run."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import soma_manifest as sm
from conftest import (
    DEFAULT_SCHEMA,
    REPO,
    Project,
    SampleData,
    apply_ok,
    assert_converged,
    make_sample,
    read_state,
    start_cli,
)
from soma_manifest.faults import ENV as CRASH_AT


def assert_presence(project: Project, atlas: sm.Atlas, measured: dict[str, list[str]] | None = None) -> None:
    """The presence matrix, read with plain tiledbsoma, holds one row per sample of the project: exactly its
    genes (or the `measured` ones), and nothing else; the samples table matches; atlas.presence() agrees."""
    import tiledbsoma as soma

    measured = measured or {key: data.gene_ids for key, data in project.samples.items()}
    state = read_state(project)
    with soma.Experiment.open(str(project.atlas_uri)) as exp:
        table = exp["samples"].read().concat().to_pandas().set_index("soma_joinid")
        entries = exp.ms["RNA"]["feature_presence_matrix"].read().tables().concat().to_pandas()
        var = exp.ms["RNA"].var.read(column_names=["soma_joinid", "var_id"]).concat().to_pandas()
    var_id = dict(zip(var["soma_joinid"], var["var_id"]))
    assert sorted(table["sample_id"]) == sorted(project.samples), "rows of other samples in the samples table"
    assert set(entries["soma_dim_0"]) <= set(table.index), "presence rows without a samples table row"
    for key, data in project.samples.items():
        entry = state.samples[key]
        row = table.loc[entry.sample_joinid]
        assert (row["sample_id"], row["cells"], row["obs_joinid_start"], row["obs_joinid_stop"]) == \
            (key, data.counts.shape[0], *entry.joinids)
        genes = entries.loc[entries["soma_dim_0"] == entry.sample_joinid, "soma_dim_1"].map(var_id)
        assert sorted(genes) == sorted(measured[key]), f"{key}: presence row differs from its features"
        assert row["n_measured_genes"] == len(measured[key])
    presence = atlas.presence()
    assert sorted(presence.obs_names) == sorted(project.samples)
    assert presence.X.dtype == bool and sp.issparse(presence.X)
    for key in project.samples:
        row = presence.X[presence.obs_names.get_loc(key)]
        assert sorted(presence.var_names[row.indices]) == sorted(measured[key])


def test_import_and_plan_stay_light(project: Project) -> None:
    code = ("import sys, soma_manifest as sm; sm.load(sys.argv[1]).plan(); "
            "print([m for m in ('tiledbsoma', 'anndata', 'scipy', 'h5py') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code, str(project.manifest)], capture_output=True, text=True,
                            timeout=120)
    assert (result.returncode, result.stdout) == (0, "[]\n"), result.stderr


def test_bad_manifest_raises_manifest_error_with_problems(project: Project) -> None:
    project.manifest.write_text(project.manifest.read_text() + "procesess: 2\n")
    with pytest.raises(sm.ManifestError) as caught:
        sm.load(project.manifest)
    assert any("procesess" in p and f"{project.manifest}:" in p for p in caught.value.problems)


def test_the_api_drives_a_full_cycle(project: Project) -> None:
    atlas = sm.load(project.manifest)
    assert atlas.samples().empty
    plan = atlas.plan()
    assert plan.create_atlas and {a.key: a.kind for a in plan.actions} == {k: "add" for k in project.samples}
    assert json.loads(plan.to_json())["kind"] == "soma-manifest-plan"

    report = atlas.apply(processes=2)
    assert report.ok and sorted(report.succeeded) == sorted(project.samples) and not report.failed
    assert not atlas.plan().has_changes
    assert atlas.verify() == [] and atlas.verify(deep=True) == []

    samples = atlas.samples()
    assert sorted(samples.index) == sorted(project.samples)
    for key, data in project.samples.items():
        row = samples.loc[key]
        assert (row["study"], row["sample"]) == tuple(key.split("/"))
        assert (row["status"], row["cells"], row["nnz"]) == ("done", data.counts.shape[0], data.counts.nnz)
        assert row["joinid_stop"] - row["joinid_start"] == data.counts.shape[0]

    with atlas.open() as exp:
        assert exp.obs.count == sum(d.counts.shape[0] for d in project.samples.values())
        with pytest.raises(Exception):  # read-only
            exp.obs.write(exp.obs.read().concat())

    # One sample, two genes: one by id, one by a symbol that one var row carries.
    key, data = "study_a/s2", project.samples["study_a/s2"]
    by_id, by_symbol = data.gene_ids[3], data.symbols[5]
    assert data.symbols.count(by_symbol) == 1 and by_symbol.startswith("GENE")
    got = atlas.to_anndata(samples=[key], genes=[by_id, by_symbol], layer="raw")
    ids = [f"{key}/{b}" for b in data.barcodes]
    assert sorted(got.obs_names) == sorted(ids) and sorted(got.var_names) == sorted([by_id, data.gene_ids[5]])
    got = got[ids, [by_id, data.gene_ids[5]]]
    assert (sp.csr_matrix(got.X) != data.counts[:, [3, 5]]).nnz == 0
    assert list(got.obs.columns) == [c for c in got.obs.columns if c != "obs_id"]  # obs_id is the index
    assert got.var["gene_symbol"].tolist() == [data.symbols[3], by_symbol]

    # A filter and a column subset; a symbol carried by several var rows selects them all.
    t_cells = atlas.to_anndata(samples=[key], genes=["MT-CO1"], obs_columns=["cell_type"],
                               obs_filter="cell_type == 'T cell'")
    assert list(t_cells.obs.columns) == ["cell_type"] and set(t_cells.obs["cell_type"]) == {"T cell"}
    assert t_cells.n_obs == len(ids[::3])
    assert set(t_cells.var_names) == {g for d in project.samples.values()
                                      for g, s in zip(d.gene_ids, d.symbols) if s == "MT-CO1"}
    for bad in ({"samples": ["study_a/nope"]}, {"genes": ["NOPE1"]}, {"layer": "counts"},
                {"obs_columns": ["nope"]}):
        with pytest.raises(sm.AtlasError):
            atlas.to_anndata(**bad)
    assert_presence(project, atlas)


def test_presence_follows_add_replace_and_remove(applied: Project) -> None:
    before = read_state(applied).samples["study_a/s1"].sample_joinid
    # replace study_a/s1 with other genes, add study_b/s2, remove study_a/s2
    applied.add_mtx("study_a", "s1", make_sample(30, 12, seed=21, gene_offset=50))
    applied.add_mtx("study_b", "s2", make_sample(20, 8, seed=22, gene_offset=3))
    shutil.rmtree(applied.raw / "study_a" / "mtx" / "s2")
    del applied.samples["study_a/s2"]
    atlas = sm.load(applied.manifest)
    assert {a.key: a.kind for a in atlas.plan().actions} == \
        {"study_a/s1": "replace", "study_b/s2": "add", "study_a/s2": "remove"}
    with pytest.raises(sm.PlanError):
        atlas.apply(processes=1)  # deletes cells: refused, nothing changed
    report = atlas.apply(processes=2, allow_delete=True)
    assert report.ok, report.failed
    state = read_state(applied)
    assert state.samples["study_a/s1"].sample_joinid > before and state.orphan_samples == []
    assert atlas.verify(deep=True) == []
    assert_presence(applied, atlas)
    assert_converged(applied)


def test_reads_as_of_an_earlier_apply_through_the_api(applied: Project) -> None:
    """open(serial=)/to_anndata(serial=) read the atlas as an apply left it, after a later replace and remove."""
    atlas = sm.load(applied.manifest)
    first = atlas.history()[-1]["serial"]
    old = {key: data for key, data in applied.samples.items()}
    applied.add_mtx("study_a", "s1", make_sample(25, 12, seed=31, gene_offset=40))  # replace
    shutil.rmtree(applied.raw / "study_a" / "mtx" / "s2")  # remove
    del applied.samples["study_a/s2"]
    assert atlas.apply(processes=2, allow_delete=True).ok
    for key in ("study_a/s1", "study_a/s2"):
        then = atlas.to_anndata(samples=[key], serial=first)
        data = old[key]
        then = then[[f"{key}/{b}" for b in data.barcodes]]
        x = sp.csr_matrix(then.X)[:, then.var_names.get_indexer(data.gene_ids)]
        assert (x != data.counts).nnz == 0, f"{key} at serial {first} differs from what that apply wrote"
    now = atlas.to_anndata(samples=["study_a/s1"])
    data = applied.samples["study_a/s1"]
    assert sorted(now.obs_names) == sorted(f"study_a/s1/{b}" for b in data.barcodes)
    with atlas.open(serial=first) as exp:
        assert exp.obs.count == sum(d.counts.shape[0] for d in old.values())
    with pytest.raises(sm.AtlasError):
        atlas.to_anndata(samples=["study_a/s2"])  # removed now
    with pytest.raises(sm.StateError):
        atlas.open(serial=10_000)


def test_presence_of_a_fixed_universe_is_what_the_sample_has(project: Project) -> None:
    universe = project.root / "genes.tsv"
    ids = project.samples["study_a/s1"].gene_ids[:20] + ["ENSG99999999999"]
    universe.write_text("".join(f"{g}\tSYM{i}\n" for i, g in enumerate(ids)))
    schema = project.root / "fixed.yaml"
    text = DEFAULT_SCHEMA.read_text().replace("universe: union", f"universe: fixed\n  file: {universe}")
    column = "  - {name: n_measured_genes, type: int64, source: computed}\n"
    schema.write_text(text.replace("var:\n", column + "var:\n"))
    project.write_manifest(schema=schema)
    atlas = sm.load(project.manifest)
    assert atlas.apply(processes=2).ok
    measured = {key: [g for g in ids if g in data.gene_ids] for key, data in project.samples.items()}
    assert atlas.verify(deep=True) == []
    assert_presence(project, atlas, measured)
    obs = atlas.to_anndata(obs_columns=["study_name", "sample_name", "n_measured_genes"]).obs
    per_sample = obs.groupby(["study_name", "sample_name"], observed=True)["n_measured_genes"].unique()
    assert {f"{s}/{n}": list(v) for (s, n), v in per_sample.items()} == {k: [len(g)] for k, g in measured.items()}


def test_an_atlas_made_before_the_presence_matrix_gets_it_on_the_next_apply(applied: Project) -> None:
    import tiledbsoma as soma

    # Make it as an older soma-manifest left it: no samples table, no presence matrix, no sample joinids.
    with soma.Experiment.open(str(applied.atlas_uri), "d") as exp:
        del exp["samples"]
        del exp.ms["RNA"]["feature_presence_matrix"]
    with soma.Experiment.open(str(applied.atlas_uri), "w") as exp:
        del exp.metadata["soma_manifest.feature_presence"]
    shutil.rmtree(applied.atlas_uri / "samples")
    shutil.rmtree(applied.atlas_uri / "ms" / "RNA" / "feature_presence_matrix")
    text = json.loads(applied.state_path.read_text())
    for entry in text["samples"].values():
        del entry["sample_joinid"]
    del text["next_sample_joinid"], text["orphan_samples"]
    applied.state_path.write_text(json.dumps(text))
    atlas = sm.load(applied.manifest)
    assert any("no samples table" in p for p in atlas.verify())
    report = atlas.apply(processes=1)  # nothing to do but the upgrade
    assert report.ok and not report.succeeded
    assert atlas.verify(deep=True) == []
    assert_presence(applied, atlas)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_allocate", "after_delete", "mid_ingest", "worker_ingest_after_obs"])
def test_kill_during_add_and_remove_converges_with_presence(applied: Project, point: str) -> None:
    shutil.rmtree(applied.raw / "study_b" / "mtx" / "s1")
    del applied.samples["study_b/s1"]
    applied.add_mtx("study_a", "s2", make_sample(33, 30, seed=31, gene_offset=20))  # replace
    applied.add_mtx("study_c", "s9", make_sample(25, 14, seed=32, gene_offset=7))  # add
    applied.write_manifest()
    run = start_cli("apply", applied.manifest, "--allow-delete", env={CRASH_AT: point})
    try:
        crashed = run.wait()
        assert crashed.returncode in (-signal.SIGKILL, 1), crashed.stderr
    finally:
        run.kill_session()
    apply_ok(applied, "--allow-delete")
    assert read_state(applied).orphan_samples == []
    assert_converged(applied)
    assert_presence(applied, sm.load(applied.manifest))


def _python_blocks(readme: str, section: str) -> list[str]:
    start = readme.index(f"## {section}\n")
    end = readme.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", readme[start:end if end > 0 else None], re.DOTALL)


def test_readme_python_api_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = Project(tmp_path)
    data = make_sample(40, 30, seed=5)
    data = SampleData(data.counts, data.barcodes, data.gene_ids[:29] + ["ENSG00000075624"],
                      ["CD3E"] + data.symbols[1:])
    project.add_mtx("study_1", "S1", data)
    project.add_mtx("study_1", "S2", make_sample(20, 30, seed=6, gene_offset=4))
    project.write_manifest()
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks((REPO / "README.md").read_text(), "Python API")
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own examples
    adata = namespace["adata"]
    t_cells = [i for i, b in enumerate(data.barcodes) if i % 3 == 0]
    assert adata.n_obs == len(t_cells) and sorted(adata.var_names) == ["ENSG00000000000", "ENSG00000075624"]
    adata = adata[[f"study_1/S1/{data.barcodes[i]}" for i in t_cells], ["ENSG00000000000", "ENSG00000075624"]]
    assert (sp.csr_matrix(adata.X) != data.counts[t_cells][:, [0, 29]]).nnz == 0
    assert np.asarray(namespace["n_measured_samples"]).ravel().max() == 2


def test_a_no_op_apply_stays_light_and_still_refuses_a_state_of_another_atlas(applied: Project) -> None:
    import tiledbsoma as soma

    from soma_manifest.storage import Location
    from soma_manifest.storage.tiledb_meta import group_metadata

    code = ("import sys, soma_manifest as sm; r = sm.load(sys.argv[1]).apply(processes=1); "
            "print(r.unchanged, [m for m in ('tiledbsoma', 'anndata', 'loky') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code, str(applied.manifest)], capture_output=True, text=True,
                            timeout=120)
    assert (result.returncode, result.stdout) == (0, f"{len(applied.samples)} []\n"), result.stderr
    # The metadata files read without the engine say what the engine reads (a deleted key included).
    with soma.Experiment.open(str(applied.atlas_uri), "w") as exp:
        del exp.metadata["soma_manifest.structure"]
        exp.metadata["soma_manifest.extra"] = "x"
    with soma.Experiment.open(str(applied.atlas_uri)) as exp:
        expected = {k: v for k, v in exp.metadata.items() if isinstance(v, str)}
    assert group_metadata(Location(str(applied.atlas_uri))) == expected
    text = json.loads(applied.state_path.read_text())
    text["lineage"] = "00000000-0000-4000-8000-000000000000"
    applied.state_path.write_text(json.dumps(text))
    with pytest.raises(sm.StateError, match="this state file belongs to another atlas"):
        sm.load(applied.manifest).apply(processes=1)

"""The plan is pure: no writes, no storage-engine import, and one Plan for both plan and apply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import Project, run_cli
from soma_manifest.manifest import load_manifest
from soma_manifest.plan import atlas_present, make_plan, observe
from soma_manifest.schema import load_schema
from soma_manifest.state import load_state, save_state


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def _plan(project: Project):
    manifest = load_manifest(project.manifest)
    schema = load_schema(manifest.schema_path)
    state = load_state(manifest.state_path)
    return make_plan(manifest, schema, observe(manifest, state), state, atlas_present(manifest.atlas_uri))


def test_plan_imports_no_storage_engine_and_writes_nothing(project: Project) -> None:
    assert run_cli("apply", project.manifest).returncode == 0
    (project.raw / "study_a" / "mtx" / "s1" / "barcodes.tsv.gz").touch()  # stat changed: digests recomputed
    before = _snapshot(project.root)
    # -X importtime lists every module the command imports (it exits without the interpreter's teardown,
    # so nothing can run after it in its process)
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "soma_manifest", "plan", str(project.manifest)],
                         capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    assert out.returncode == 0, out.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert {"soma_manifest.plan", "soma_manifest.evolution"} <= imported
    assert [m for m in ("tiledbsoma", "anndata", "tiledb", "scipy") if m in imported] == []
    assert "No changes" in out.stdout  # a touched file with the same content is not a change
    assert _snapshot(project.root) == before


def test_plan_reasons_follow_the_state(project: Project) -> None:
    assert run_cli("apply", project.manifest).returncode == 0
    state = load_state(project.state_path)
    state.samples["study_a/s1"].ingest = "allocated"  # a run died mid-ingest
    state.samples["study_a/s2"].ingest = "none"  # converted, not ingested
    state.samples["study_b/s1"].failed_step, state.samples["study_b/s1"].error = "ingest", "boom"
    save_state(state, project.state_path)
    plan = _plan(project)
    got = {a.key: (a.kind, a.reason, a.steps) for a in plan.actions}
    assert got["study_a/s1"] == ("resume", "interrupted during ingest", ("ingest",))
    assert got["study_a/s2"] == ("ingest", "converted but not ingested", ("ingest",))
    assert got["study_b/s1"] == ("retry", "failed last run (ingest): boom", ("ingest",))
    old = state.samples["study_a/s1"].joinids
    assert next(a for a in plan.actions if a.key == "study_a/s1").delete_range == tuple(old)


def test_plan_json_is_what_apply_executes(project: Project) -> None:
    saved = project.root / "plan.json"
    result = run_cli("plan", project.manifest, "--out", saved)
    assert result.returncode == 0
    plan = json.loads(saved.read_text())
    assert plan["format_version"] == 2 and plan["create_atlas"] is True
    assert [a["key"] for a in plan["actions"]] == sorted(project.samples)
    applied = run_cli("apply", saved)
    assert applied.returncode == 0, applied.stderr
    for key in project.samples:
        assert key in applied.stderr


def test_text_plan_names_every_sample_and_summarizes(project: Project) -> None:
    out = run_cli("plan", project.manifest).stdout
    for key in project.samples:
        assert f"+ {key}" in out
    assert "Plan: create the atlas; 3 to add; 0 unchanged; 6 steps." in out


def test_atlas_with_the_old_gene_optimized_layout_is_refused(tmp_path: Path) -> None:
    """`optimize: genes` layers were TileDB's default tiles with sorted writes; they are now gene-major.
    A state recorded with the old layout's fingerprint is refused, naming the layer, never written in
    the new order."""
    import pytest

    from soma_manifest.errors import SchemaError
    from soma_manifest.evolution import check_structure
    from soma_manifest.schema import AtlasSchema, _digest
    from soma_manifest.state import State

    schema = AtlasSchema.model_validate({
        "version": 1, "obs": [{"name": "barcode", "source": "barcode"}],
        "layers": [{"name": "raw"}, {"name": "raw_by_gene", "optimize": "genes"}]})
    old = _digest({"measurement": "RNA", "obs": [("barcode", "string")], "var": [("gene_symbol", "string")],
                   "layers": [("raw", "int32", "cells"), ("raw_by_gene", "int32", "genes")], "genes": "union"})
    state = State(atlas="a", structure=old, structure_summary={**schema.structure_summary(),
                                                               "layers": ["raw:int32", "raw_by_gene:int32"]})
    with pytest.raises(SchemaError) as err:
        check_structure(schema, state, tmp_path / "schema.yaml")
    assert "X layer raw_by_gene retyped from int32 to int32 (gene-major)" in err.value.render()
    # Cell-optimized layers kept their fingerprint: atlases of the default schema are unaffected.
    cells_only = AtlasSchema.model_validate({"version": 1, "obs": [{"name": "barcode", "source": "barcode"}]})
    assert cells_only.structure == _digest({
        "measurement": "RNA", "obs": [("barcode", "string")], "var": [("gene_symbol", "string")],
        "layers": [("raw", "int32", "cells")], "genes": "union"})


def test_digests_computed_on_threads_are_each_samples_own(project: Project, monkeypatch) -> None:
    from soma_manifest import plan as plan_module

    manifest = load_manifest(project.manifest)

    def digests() -> list[tuple[str, str]]:
        return [(key, seen.raw_digest) for key, seen in observe(manifest, None).samples.items()]

    serial = digests()  # a few KB: one thread
    monkeypatch.setattr(plan_module, "_DIGEST_THREADED_BYTES", 0)
    assert digests() == serial
    assert [key for key, _ in serial] == sorted(project.samples) and len({d for _, d in serial}) == 3

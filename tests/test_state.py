"""The state file (atomic saves with a backup; damaged or foreign files refused, never overwritten) and
`verify`, which checks the atlas against it and reports drift made behind its back."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import tiledbsoma as soma

from conftest import DEFAULT_SCHEMA, Project, assert_atlas_holds, assert_converged, invoke_cli, read_state
from soma_manifest.state import backup_path, load_state


def test_saves_are_atomic_and_keep_the_previous_version(applied: Project) -> None:
    state = read_state(applied)
    backup = load_state(backup_path(applied.state_path))
    assert backup.lineage == state.lineage and backup.serial == state.serial - 1
    leftovers = [p.name for p in applied.state_path.parent.iterdir() if p.name.endswith((".tmp", ".prev"))]
    assert leftovers == []


def test_the_backup_restores_a_converging_state(applied: Project) -> None:
    """The backup is one save behind: every ingest is recorded, the apply's history entry is not yet.
    (Resuming from a state behind an ingest: test_crash.py.)"""
    shutil.copy(backup_path(applied.state_path), applied.state_path)
    assert read_state(applied).history == []
    assert json.loads(invoke_cli("plan", "--json", applied.manifest).stdout)["actions"] == []
    assert_converged(applied)


def test_a_state_of_format_2_loads_and_is_written_as_3(applied: Project) -> None:
    """Format 3 added the schema-evolution fields; a state of format 2 (as a tool before them wrote it) loads with
    them empty, plans no change, and the next save writes version 3 (which a format-2 tool refuses as newer)."""
    raw = json.loads(applied.state_path.read_text())
    assert raw["format_version"] == 3
    for field in ("conversions", "layer_fills", "dropped_layers"):
        del raw[field]
    applied.state_path.write_text(json.dumps({**raw, "format_version": 2}))
    state = read_state(applied)
    assert (state.format_version, state.conversions, state.layer_fills, state.dropped_layers) == (3, {}, {}, [])
    assert json.loads(invoke_cli("plan", "--json", applied.manifest).stdout)["actions"] == []
    assert invoke_cli("tag", applied.manifest, "v1").returncode == 0  # a save
    written = json.loads(applied.state_path.read_text())
    assert written["format_version"] == 3 and written["conversions"] == {} and list(written["tags"]) == ["v1"]


def _newer(text: str) -> str:
    data = json.loads(text)
    data["format_version"] = 99
    return json.dumps(data)


def _invalid(text: str) -> str:
    data = json.loads(text)
    data["next_joinid"] = "many"
    return json.dumps(data)


@pytest.mark.parametrize(("damage", "message", "hint"), [
    (lambda t: t[: len(t) // 2], "state file is corrupt or truncated (line", "the previous version is at"),
    (lambda t: "\x00\x13garbage" + t, "state file is corrupt or truncated (line 1", "the previous version is at"),
    (lambda t: "[]", "not a soma-manifest state file (no format_version)", "the previous version is at"),
    (_invalid, "state file is invalid at next_joinid: Input should be a valid integer", "the previous version is at"),
    (_newer, "state format version 99 is newer than this soma-manifest understands (3)",
     "upgrade soma-manifest; the file was left as it is"),
], ids=["truncated", "corrupt", "not a state file", "invalid field", "newer version"])
def test_damaged_state_is_refused_and_left_as_it_is(applied: Project, damage, message: str, hint: str) -> None:
    damaged = damage(applied.state_path.read_text())
    applied.state_path.write_text(damaged)
    backup = backup_path(applied.state_path).read_bytes()
    for command in ("plan", "apply", "verify", "show"):
        result = invoke_cli(command, applied.manifest)
        assert result.returncode == 1, command
        assert f"error: {applied.state_path}: {message}" in result.stderr, result.stderr
        assert hint in result.stderr
    assert applied.state_path.read_text() == damaged, "the state file was overwritten"
    assert backup_path(applied.state_path).read_bytes() == backup
    assert_atlas_holds(applied.atlas_uri, applied.samples)


def test_missing_state_of_an_existing_atlas_is_refused(applied: Project) -> None:
    applied.state_path.unlink()
    result = invoke_cli("apply", applied.manifest)
    assert result.returncode == 1
    assert f"{applied.state_path}: the atlas {applied.atlas_uri} exists but its state file does not" in result.stderr
    assert f"restore the state file (or {applied.state_path.name}.backup)" in result.stderr
    assert not applied.state_path.exists(), "a fresh state was written over the atlas' history"
    assert_atlas_holds(applied.atlas_uri, applied.samples)


# --- verify: drift made behind the state's back ------------------------------------------------

def _obs_uri(project: Project) -> str:
    return str(project.atlas_uri / "obs")


def _x_uri(project: Project) -> str:
    return str(project.atlas_uri / "ms" / "RNA" / "X" / "raw")


def delete_cells(project: Project, start: int, stop: int) -> None:
    with soma.DataFrame.open(_obs_uri(project), "d") as obs:
        obs.delete_cells((slice(start, stop - 1),))


def delete_x_rows(project: Project, start: int, stop: int) -> None:
    with soma.SparseNDArray.open(_x_uri(project), "d") as x:
        x.delete_cells((slice(start, stop - 1),))


def rewrite_obs(project: Project, joinid: int, **values: object) -> None:
    with soma.DataFrame.open(_obs_uri(project)) as obs:
        row = obs.read((slice(joinid, joinid),)).concat()
    for name, value in values.items():
        row = row.set_column(row.schema.get_field_index(name), name, pa.array([value], row.schema.field(name).type))
    with soma.DataFrame.open(_obs_uri(project), "w") as obs:
        obs.write(row)


def bump_x_row(project: Project, joinid: int) -> None:
    with soma.SparseNDArray.open(_x_uri(project)) as x:
        entries = x.read((slice(joinid, joinid),)).tables().concat()
    bumped = entries.set_column(2, "soma_data", pc.add(entries["soma_data"], pa.scalar(1, pa.int32())))
    with soma.SparseNDArray.open(_x_uri(project), "w") as x:
        x.write(bumped)


def forget_sample(project: Project, key: str) -> None:
    data = json.loads(project.state_path.read_text())
    del data["samples"][key]
    project.state_path.write_text(json.dumps(data))


def ranges(project: Project) -> dict[str, tuple[int, int]]:
    return {k: s.joinids for k, s in read_state(project).samples.items()}


def _span(r: dict[str, tuple[int, int]], key: str) -> str:
    return "{}-{}".format(*r[key])


# Joinid ranges follow the order in which conversions finished, so the expected lines are built from them.
DRIFT = {
    "cells deleted": (lambda p, r: delete_cells(p, r["study_a/s2"][0], r["study_a/s2"][0] + 5),
                      lambda r: [f"study_a/s2: 30 cells (30 distinct obs ids) in joinids {_span(r, 'study_a/s2')}, "
                                 "the state expects 35"]),
    "counts deleted": (lambda p, r: delete_x_rows(p, *r["study_b/s1"]),
                       lambda r: ["study_b/s1: 0 nonzero counts, the state expects 205"]),
    "state lost a sample": (lambda p, r: forget_sample(p, "study_a/s1"),
                            lambda r: ["cells outside every range the state knows (orphans), e.g. joinids "
                                       f"{list(range(r['study_a/s1'][0], r['study_a/s1'][0] + 5))}",
                                       "302 X entries outside every range the state knows",
                                       "study_a/s1: 40 cell(s) carry obs ids of a sample the state does not know"]),
    "obs id repeated in a sample": (lambda p, r: rewrite_obs(p, r["study_a/s1"][0] + 1,
                                                             obs_id=_obs_id(p, r["study_a/s1"][0])),
                                    lambda r: [f"study_a/s1: 40 cells (39 distinct obs ids) in joinids "
                                               f"{_span(r, 'study_a/s1')}, the state expects 40"]),
    "obs id of another sample": (lambda p, r: rewrite_obs(p, r["study_a/s1"][0] + 1,
                                                          obs_id=_obs_id(p, r["study_b/s1"][0])),
                                 lambda r: ["study_a/s1: 1 cell(s) in its joinids carry obs ids of other samples",
                                            f"study_b/s1: 1 cell(s) outside joinids {_span(r, 'study_b/s1')} carry "
                                            "its obs ids"]),
}


def _obs_id(project: Project, joinid: int) -> str:
    with soma.DataFrame.open(_obs_uri(project)) as obs:
        return obs.read((slice(joinid, joinid),), column_names=["obs_id"]).concat()["obs_id"][0].as_py()


@pytest.mark.parametrize("drift", list(DRIFT))
def test_verify_reports_drift(applied: Project, drift: str) -> None:
    make, expected = DRIFT[drift]
    joinids = ranges(applied)
    make(applied, joinids)
    result = invoke_cli("verify", applied.manifest)
    assert result.returncode == 1
    assert f"Drift found in {applied.atlas_uri}:" in result.stdout
    for line in expected(joinids):
        assert f"  - {line}" in result.stdout, result.stdout


@pytest.mark.parametrize(("make", "expected"), [
    (lambda p, r: rewrite_obs(p, r["study_b/s1"][0] + 2, cell_type="astrocyte"),
     "study_b/s1: obs column 'cell_type' differs from its h5ad"),
    (lambda p, r: bump_x_row(p, r["study_a/s2"][0] + 3), "study_a/s2: X counts in the atlas differ from its h5ad"),
], ids=["obs value", "count value"])
def test_verify_deep_compares_values_with_the_h5ad(applied: Project, make, expected: str) -> None:
    make(applied, ranges(applied))
    assert invoke_cli("verify", applied.manifest).returncode == 0, "cells, ids and nnz are unchanged"
    result = invoke_cli("verify", "--deep", applied.manifest)
    assert result.returncode == 1
    assert f"  - {expected}" in result.stdout, result.stdout


def test_verify_reports_schema_columns_missing_from_the_atlas(applied: Project) -> None:
    schema = applied.root / "schema.yaml"
    ribo = "  - {name: pct_ribo, type: float32, source: computed}\n"
    n_genes = "  - {name: n_genes, type: int64, source: computed}\n"
    schema.write_text(DEFAULT_SCHEMA.read_text().replace(ribo, ribo + n_genes))
    applied.write_manifest(schema=schema)
    result = invoke_cli("verify", applied.manifest)
    assert result.returncode == 1
    assert "  - the atlas structure does not match the schema" in result.stdout
    assert "  - obs column 'n_genes' is missing from the atlas" in result.stdout

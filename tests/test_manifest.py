"""Manifest and schema parsing: located errors, all at once; selection of samples from the raw tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import DEFAULT_SCHEMA, Project
from soma_manifest.errors import ManifestError
from soma_manifest.manifest import load_manifest
from soma_manifest.schema import load_schema
from soma_manifest.sources import discover


def _problems(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    return err.value.problems


def test_every_problem_is_reported_at_once_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "atlas.yaml"
    path.write_text("""version: 1
atlas:
  name: my_atlas
  storage: atlases
schema: schema.yaml
storage:
  raw: raw
  h5ad: h5ads
  logs: logs
  bogus: 1
processes: 0
studies:
  - name: study_1
  - name: study_2
    samples: ["GSM41*"]
    formt: h5ad
  - name: lung
    format: loom
""")
    assert _problems(path) == [
        f"{path}:10: storage.bogus: unknown key (check its spelling; README.md lists the allowed keys)",
        f"{path}:11: processes: Input should be greater than 0",
        f"{path}:16: studies.1.formt: unknown key (check its spelling; README.md lists the allowed keys)",
        f"{path}:18: studies.2.format: Input should be 'mtx', 'h5ad' or '10x_h5'",
    ]


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "atlas.yaml"
    path.write_text("version: 1\natlas:\n  name: [unclosed\n  storage: x\n")
    (problem,) = _problems(path)
    assert problem.startswith(f"{path}:") and "YAML syntax error" in problem


def test_missing_keys_and_duplicate_studies(tmp_path: Path) -> None:
    path = tmp_path / "atlas.yaml"
    path.write_text("version: 1\natlas: {name: a, storage: s}\nstudies:\n  - name: x\n  - name: x\n")
    problems = _problems(path)
    assert any(p.endswith("schema: required key is missing") for p in problems)
    assert any(p.endswith("storage: required key is missing") for p in problems)
    assert any("study listed twice: x" in p for p in problems)


def test_paths_resolve_against_the_manifest_folder(project: Project) -> None:
    m = load_manifest(project.manifest)
    assert m.raw == project.raw
    assert m.atlas_uri == project.atlas_uri
    assert m.state_path == project.state_path  # default: <atlas.storage>/<atlas.name>.state.json
    assert m.schema_path == DEFAULT_SCHEMA


def test_include_exclude_globs_and_junk(project: Project) -> None:
    (project.raw / "study_a" / "mtx" / ".DS_Store").write_text("junk")
    (project.raw / "study_a" / "mtx" / "._s1").mkdir()
    project.write_manifest("  - name: study_a\n    samples: ['s*']\n    exclude: [s2]\n  - name: study_b\n")
    keys = [s.key for s in discover(load_manifest(project.manifest))]
    assert keys == ["study_a/s1", "study_b/s1"]  # the same sample name in two studies is fine


def test_selections_that_match_nothing_are_located_errors(project: Project) -> None:
    project.write_manifest("  - name: study_a\n    samples: [GSM9*, s1]\n    exclude: [nope]\n"
                           "  - name: missing_study\n")
    with pytest.raises(ManifestError) as err:
        discover(load_manifest(project.manifest))
    text = "\n".join(err.value.problems)
    assert f"{project.manifest}:12: studies.0.samples.0: 'GSM9*' matches no sample" in text
    assert "available: s1, s2" in text
    assert f"{project.manifest}:13: studies.0.exclude.0: 'nope' matches no sample" in text
    assert f"{project.manifest}:14: studies.1.name: study folder" in text and "missing_study" in text


def test_schema_errors_are_located(tmp_path: Path) -> None:
    path = tmp_path / "schema.yaml"
    path.write_text(DEFAULT_SCHEMA.read_text().replace("type: int64, source: computed}",
                                                       "type: int65, source: computed}", 1)
                    + "extra_key: 1\n")
    with pytest.raises(ManifestError) as err:
        load_schema(path)
    text = "\n".join(err.value.problems)
    assert f"{path}:12: obs.5.type:" in text
    assert "extra_key: unknown key" in text


def test_schema_fingerprints_split_structure_from_conversion(tmp_path: Path) -> None:
    base = load_schema(DEFAULT_SCHEMA)
    changed = tmp_path / "s.yaml"
    changed.write_text(DEFAULT_SCHEMA.read_text().replace('mito_prefixes: ["MT-", "mt-"]', 'mito_prefixes: ["MT-"]'))
    conversion_only = load_schema(changed)
    assert conversion_only.structure == base.structure and conversion_only.conversion != base.conversion
    changed.write_text(DEFAULT_SCHEMA.read_text().replace("{name: nnz, type: int64", "{name: nnz, type: int32"))
    assert load_schema(changed).structure != base.structure

"""Operator errors: a command refused for bad input writes nothing at all (no folder, lock, log, state or h5ad)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import DEFAULT_SCHEMA, Project, invoke_cli

COMMANDS = ["validate", "plan", "apply", "verify", "show"]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its content digest (folders too, so that an empty new folder shows)."""
    return {str(p.relative_to(root)): hashlib.blake2b(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def break_manifest(project: Project, how: str) -> None:
    if how == "invalid manifest":
        project.manifest.write_text(project.manifest.read_text().replace("storage:\n", "proceses: 2\nstorage:\n"))
    else:  # a study folder that is not there
        project.write_manifest(studies="  - name: study_a\n  - name: study_gone\n")


@pytest.mark.parametrize("how", ["invalid manifest", "missing raw study"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_refused_command_writes_nothing(project: Project, command: str, how: str) -> None:
    break_manifest(project, how)
    before = snapshot(project.root)
    result = invoke_cli(command, project.manifest)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error" in result.stderr or "invalid" in result.stderr
    assert snapshot(project.root) == before


def test_an_apply_refused_for_deletions_writes_nothing(applied: Project) -> None:
    applied.write_manifest(studies="  - name: study_a\n")
    before = snapshot(applied.root)
    result = invoke_cli("apply", applied.manifest)
    assert result.returncode == 1 and "re-run with --allow-delete" in result.stderr
    assert snapshot(applied.root) == before


@pytest.mark.parametrize(("content", "problem"), [
    (None, "schema.yaml: file not found"),
    ("version: 1\nobs: [\n", "schema.yaml:3: YAML syntax error"),
    ("version: 1\nobs:\n  - {name: barcode, source: barcode, colour: red}\n",
     "schema.yaml:3: obs.0.colour: unknown key"),
], ids=["missing", "invalid YAML", "invalid key"])
@pytest.mark.parametrize("command", COMMANDS)
def test_an_error_in_the_schema_names_the_manifest_line(project: Project, command: str, content: str | None,
                                                       problem: str) -> None:
    schema = project.root / "schema.yaml"
    if content is not None:
        schema.write_text(content)
    project.write_manifest(schema=schema)
    before = snapshot(project.root)
    result = invoke_cli(command, project.manifest)
    assert result.returncode == 1
    # the manifest line that references the schema (line 5 of conftest's manifest), then the schema's own
    assert f"{project.manifest}:5: schema: {project.root / problem}" in result.stderr, result.stderr
    assert snapshot(project.root) == before


def test_an_unreadable_gene_list_names_the_schema_and_the_manifest_line(project: Project) -> None:
    schema = project.root / "schema.yaml"
    schema.write_text(DEFAULT_SCHEMA.read_text().replace("universe: union", "universe: fixed\n  file: genes.tsv"))
    project.write_manifest(schema=schema)
    result = invoke_cli("plan", project.manifest)
    assert result.returncode == 1
    assert (f"{project.manifest}:5: schema: {project.root / 'genes.tsv'}: cannot read the fixed gene list: not found "
            f"(fix genes.file in {schema})") in result.stderr

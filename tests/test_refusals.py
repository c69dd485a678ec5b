"""Operator errors: a command refused for bad input writes nothing at all (no folder, lock, log, state or h5ad)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import Project, invoke_cli

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

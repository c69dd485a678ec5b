"""Issue 4: the committed JSON Schemas are exactly what the models generate, and say what the loaders say."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from ruamel.yaml import YAML

from conftest import REPO, Project, run_cli
from soma_manifest.errors import ManifestError
from soma_manifest.manifest import load_manifest

SCHEMAS = REPO / "schemas"


@pytest.mark.parametrize("which", ["manifest", "plan"])
def test_committed_schema_is_what_the_models_generate(which: str) -> None:
    result = run_cli("schema", which)
    assert result.returncode == 0, result.stderr
    committed = SCHEMAS / f"{which}.schema.json"
    assert result.stdout == committed.read_text(), (
        f"{committed} is out of date: regenerate it with `soma-manifest schema {which} > {committed.relative_to(REPO)}`")
    jsonschema.Draft202012Validator.check_schema(json.loads(result.stdout))


def test_schema_prints_the_manifest_schema_by_default() -> None:
    assert run_cli("schema").stdout == (SCHEMAS / "manifest.schema.json").read_text()


def _manifest_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / "manifest.schema.json").read_text()))


def test_editors_validate_real_manifests_with_it(project: Project) -> None:
    demo = REPO / "manifests" / "demo.yaml"
    # The YAML language server finds the schema through this comment.
    assert "# yaml-language-server: $schema=../schemas/manifest.schema.json" in demo.read_text().splitlines()[:3]
    for path in (demo, project.manifest):
        _manifest_validator().validate(YAML(typ="safe").load(path.read_text()))


@pytest.mark.parametrize("mistake", [
    "procesess: 2\n",  # misspelt key
    "processes: 0\n",
    "studies: []\n",
    "studies:\n  - name: lung\n    format: csv\n",
    "studies:\n  - name: my study\n",
])
def test_what_the_schema_rejects_the_loader_rejects(project: Project, mistake: str) -> None:
    text = project.manifest.read_text()
    if mistake.startswith("studies:"):
        text = text[: text.index("studies:")]
    path = project.root / "bad.yaml"
    path.write_text(text + mistake)
    with pytest.raises(jsonschema.ValidationError):
        _manifest_validator().validate(YAML(typ="safe").load(path.read_text()))
    with pytest.raises(ManifestError):
        load_manifest(Path(path))

"""`diff` between applies: exact counts after an add, a replace, a metadata update, a removal and a schema change,
with markdown and JSON golden files (tests/data/golden/; SOMA_MANIFEST_UPDATE_GOLDEN=1 rewrites them)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import DATA, DEFAULT_SCHEMA, Project, apply_ok, invoke_cli, read_state
from soma_manifest import api
from test_compact import change_everything
from test_report import applied_once

GOLDEN = DATA / "golden"


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, list[int]]:
    """Three applies, tagged v1, v2, v3: three samples; then one added, one replaced, one updated and one
    removed; then a schema conversion change (a new obs default) that rewrites every sample's obs rows in place
    (its counts stand: #24)."""
    p = applied_once(tmp_path_factory.mktemp("diff"))
    change_everything(p)  # study_a/s1 replaced, study_a/s2 removed, study_b/s1 re-annotated, study_b/s2 added
    apply_ok(p, "--allow-delete")
    schema = p.root / "schema.yaml"
    schema.write_text(DEFAULT_SCHEMA.read_text().replace(
        "{name: scrnaseq_protocol, type: string, source: sample_metadata, default: unknown}",
        "{name: scrnaseq_protocol, type: string, source: sample_metadata, default: not recorded}"))
    assert schema.read_text() != DEFAULT_SCHEMA.read_text()
    p.write_manifest(schema=schema)
    apply_ok(p)
    serials = [e.serial for e in read_state(p).history]
    assert len(serials) == 3
    for name, serial in zip(("v1", "v2", "v3"), serials):
        assert invoke_cli("tag", p.manifest, name, "--serial", str(serial)).returncode == 0
    return p, serials


def _diff(p: Project, *args: str) -> dict:
    result = invoke_cli("diff", p.manifest, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _changes(d: dict) -> dict[str, str]:
    return {s["key"]: s["change"] for s in d["samples"]}


def test_add_replace_update_remove(history: tuple[Project, list[int]]) -> None:
    p, (first, second, _) = history
    d = _diff(p, "--from", "v1", "--to", "v2")
    assert (d["before"]["serial"], d["after"]["serial"]) == (first, second)
    assert _changes(d) == {"study_b/s2": "added", "study_a/s2": "removed", "study_a/s1": "replaced",
                           "study_b/s1": "updated"}
    assert [(s["key"], s["cells_before"], s["cells_after"]) for s in d["samples"]] == [
        ("study_b/s2", None, 25), ("study_a/s2", 35, None), ("study_a/s1", 40, 45), ("study_b/s1", 30, 30)]
    assert [(s["study"], s["cells_before"], s["cells_after"]) for s in d["studies"]] == [
        ("study_a", 75, 45), ("study_b", 30, 55)]
    assert d["summary"] == {"added": 1, "removed": 1, "replaced": 1, "updated": 1, "cells_before": 105,
                            "cells_after": 100, "genes_before": 40, "genes_after": 60, "genes_added": 20}
    assert d["genes_added"] == [f"ENSG{40 + i:011d}" for i in range(20)]
    assert d["schema"] == []
    assert _diff(p, "--from", str(first), "--to", str(second)) == d


def test_schema_change_updates_every_sample_in_place(history: tuple[Project, list[int]]) -> None:
    p, (first, second, third) = history
    d = _diff(p)  # default: the last two applies
    assert (d["before"]["serial"], d["after"]["serial"]) == (second, third)
    assert _changes(d) == {"study_a/s1": "updated", "study_b/s1": "updated", "study_b/s2": "updated"}
    assert d["summary"]["cells_before"] == d["summary"]["cells_after"] == 100 and d["genes_added"] == []
    assert [c["serial"] for c in d["schema"]] == [third] and "conversion changed" in d["schema"][0]["text"]
    across = _diff(p, "--from", "v1")  # to the last apply: v2 replaced study_a/s1; v2 and v3 updated study_b/s1
    assert _changes(across) == {"study_b/s2": "added", "study_a/s2": "removed", "study_a/s1": "replaced",
                                "study_b/s1": "updated"}
    assert [c["serial"] for c in across["schema"]] == [third]
    backwards = _diff(p, "--from", "v2", "--to", "v1")
    assert _changes(backwards) == {"study_a/s2": "added", "study_b/s2": "removed", "study_a/s1": "replaced",
                                   "study_b/s1": "updated"}


def test_first_apply_against_the_empty_atlas_and_refusals(history: tuple[Project, list[int]]) -> None:
    p, (first, _, _) = history
    d = api.load(p.manifest).diff(None, "v1")
    assert d.before.serial is None and d.before.label() == "the empty atlas"
    assert [(s.key, s.change) for s in d.samples] == [("study_a/s1", "added"), ("study_a/s2", "added"),
                                                     ("study_b/s1", "added")]
    assert len(d.genes_added) == d.after.genes == 40
    for args, needle in ((("--from", "999"), "no apply with serial 999"), (("--to", "nope"), "no tag 'nope'")):
        result = invoke_cli("diff", p.manifest, *args)
        assert result.returncode == 1 and needle in result.stderr


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("SOMA_MANIFEST_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from its golden file (SOMA_MANIFEST_UPDATE_GOLDEN=1 rewrites)"


def _numbered(text: str, serials: list[int]) -> str:
    """Serials as A1, A2, A3: they count the state's saves, which the golden files should not pin."""
    for i, serial in sorted(enumerate(serials, 1), key=lambda x: -x[1]):
        text = text.replace(f"apply {serial}", f"apply A{i}").replace(f'"serial": {serial}', f'"serial": "A{i}"')
    return text


def test_golden_markdown_and_json(history: tuple[Project, list[int]]) -> None:
    p, serials = history
    for name, args in (("diff-changes", ("--from", "v1", "--to", "v2")), ("diff-schema", ("--from", "v2"))):
        result = invoke_cli("diff", p.manifest, "--format", "markdown", *args)
        assert result.returncode == 0, result.stderr
        _golden(f"{name}.md", _numbered(result.stdout, serials))
        data = _diff(p, *args)
        for side in ("before", "after"):
            assert data[side]["finished_at"]
            data[side]["finished_at"] = "<time>"
        _golden(f"{name}.json", _numbered(json.dumps(data, indent=1) + "\n", serials))

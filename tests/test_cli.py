"""Issue 4: the CLI as CI runs it: exit codes, the JSON and markdown plans, saved plans, streams, colours."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from conftest import DEFAULT_SCHEMA, REPO, Project, make_sample, run_cli, write_mtx
from soma_manifest import render
from soma_manifest.plan import Plan

PLAN_SCHEMA = json.loads((REPO / "schemas" / "plan.schema.json").read_text())


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_exit_codes_through_a_lifecycle(project: Project) -> None:
    m = project.manifest
    assert run_cli("plan", m, "--detailed-exitcode").returncode == 2
    assert run_cli("plan", m).returncode == 0  # changes, but no --detailed-exitcode
    applied = run_cli("apply", m)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout == ""  # apply reports progress and logs on stderr only
    unchanged = run_cli("plan", m, "--detailed-exitcode")
    assert unchanged.returncode == 0 and "No changes." in unchanged.stdout
    assert run_cli("verify", m).returncode == 0
    ledger = run_cli("show", m, "--json")
    assert ledger.returncode == 0
    rows = {r["key"]: r for r in json.loads(ledger.stdout)["samples"]}
    assert {k: rows[k]["cells"] for k in rows} == {k: d.counts.shape[0] for k, d in project.samples.items()}
    assert all(rows[k]["ingest"] == "done" and rows[k]["nnz"] == d.counts.nnz for k, d in project.samples.items())
    table = run_cli("show", m).stdout
    assert all(key in table for key in project.samples) and "105 cells in the atlas" in table


@pytest.mark.parametrize("case", ["unknown manifest key", "missing manifest", "missing study", "unknown option",
                                  "--json with --format markdown"])
def test_errors_exit_1_even_with_detailed_exitcode(project: Project, case: str) -> None:
    args = [project.manifest]
    if case == "unknown manifest key":
        project.manifest.write_text(project.manifest.read_text() + "procesess: 2\n")
    elif case == "missing manifest":
        args = [project.root / "nope.yaml"]
    elif case == "missing study":
        project.write_manifest(studies="  - name: study_a\n  - name: study_x\n")
    elif case == "unknown option":
        args.append("--detailed-exit-code")
    else:
        args += ["--json", "--format", "markdown"]
    result = run_cli("plan", *args, "--detailed-exitcode")
    assert result.returncode == 1, result.stderr
    assert result.stdout == "" and result.stderr.strip()
    if case == "unknown manifest key":
        assert f"{project.manifest}:" in result.stderr and "procesess" in result.stderr  # file:line located
    if case == "missing study":
        assert "study_x" in result.stderr


def test_json_plan_validates_against_the_documented_schema(project: Project) -> None:
    assert run_cli("apply", project.manifest).returncode == 0
    project.add_mtx("study_b", "s2", make_sample(20, 15, seed=7))  # add
    write_mtx(project.raw / "study_a" / "mtx" / "s2", make_sample(20, 15, seed=8))  # replace
    project.write_manifest(studies="  - name: study_a\n    exclude: [s1]\n  - name: study_b\n")  # remove
    saved = project.root / "plan.json"
    result = run_cli("plan", project.manifest, "--json", "--out", saved, "--detailed-exitcode")
    assert result.returncode == 2, result.stderr
    assert result.stdout == saved.read_text()  # the saved plan is the JSON plan, and stdout holds nothing else
    assert "Saved the plan" in result.stderr
    doc = json.loads(result.stdout)
    jsonschema.Draft202012Validator(PLAN_SCHEMA).validate(doc)
    assert doc["format_version"] == 2 and doc["kind"] == "soma-manifest-plan"
    assert [(a["key"], a["kind"]) for a in doc["actions"]] == [
        ("study_a/s1", "remove"), ("study_a/s2", "replace"), ("study_b/s2", "add")]  # sorted by key
    assert all(a["reason"] for a in doc["actions"]) and "matrix.mtx.gz" in doc["actions"][1]["reason"]
    removed = doc["actions"][0]
    s1 = project.samples["study_a/s1"]
    assert (removed["cells"], removed["nnz"], removed["steps"]) == (s1.counts.shape[0], s1.counts.nnz, ["delete"])
    assert doc["actions"][2]["cells"] is None  # not known before conversion
    assert doc["unchanged"] == ["study_b/s1"]
    assert doc["summary"] == {"samples": 3, "unchanged": 1, "actions": {"add": 1, "replace": 1, "remove": 1},
                              "steps": 5, "cells_added_known": 0, "cells_deleted": 40, "failed_expected": 0}
    again = json.loads(run_cli("plan", project.manifest, "--json").stdout)
    assert {**again, "created_at": None} == {**doc, "created_at": None}  # stable: diffs show only real changes
    with pytest.raises(jsonschema.ValidationError):  # the schema is strict: a v3 or unknown field is rejected
        jsonschema.Draft202012Validator(PLAN_SCHEMA).validate({**doc, "format_version": 3})


@pytest.mark.parametrize("change", ["manifest", "schema", "raw data", "another apply"])
def test_a_stale_saved_plan_is_refused_and_changes_nothing(project: Project, change: str) -> None:
    schema = project.root / "schema.yaml"
    schema.write_text(DEFAULT_SCHEMA.read_text())
    project.write_manifest(schema=schema)
    saved = project.root / "plan.json"
    assert run_cli("plan", project.manifest, "--out", saved).returncode == 0
    if change == "manifest":
        project.write_manifest(schema=schema, extra="processes: 1\n")
    elif change == "schema":
        schema.write_text(schema.read_text().replace("default: unknown", "default: n/a"))
    elif change == "raw data":
        write_mtx(project.raw / "study_a" / "mtx" / "s2", make_sample(20, 15, seed=9))
    else:
        assert run_cli("apply", project.manifest).returncode == 0
    before = _files(project.root)
    result = run_cli("apply", saved)
    assert result.returncode == 1
    expected = {"manifest": "the manifest changed", "schema": "the schema changed",
                "raw data": "raw data of study_a/s2 changed", "another apply": "the state file was created"}[change]
    assert "the plan is stale" in result.stderr and expected in result.stderr, result.stderr
    assert _files(project.root) == before


@pytest.mark.parametrize(("version", "message"), [
    (1, "plan format version 1 is older than the one this soma-manifest applies (2): the plan was made by an older "
        "soma-manifest and is stale"),
    (3, "plan format version 3 is not the one this soma-manifest applies (2)"),
], ids=["older", "newer"])
def test_a_saved_plan_of_another_format_version_is_refused(project: Project, version: int, message: str) -> None:
    saved = project.root / "plan.json"
    assert run_cli("plan", project.manifest, "--out", saved).returncode == 0
    doc = json.loads(saved.read_text())
    if version == 1:  # as a version-1 tool saved it: no schema_changes
        del doc["schema_changes"]
    saved.write_text(json.dumps({**doc, "format_version": version}))
    before = _files(project.root)
    result = run_cli("apply", saved)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert str(saved) in result.stderr and "soma-manifest plan --out" in result.stderr  # located, says what to do
    assert _files(project.root) == before


def test_apply_finds_the_plans_manifest_only_where_plan_ran(project: Project, tmp_path: Path) -> None:
    saved = tmp_path / "plan.json"
    assert run_cli("plan", "atlas.yaml", "--out", saved, cwd=project.root).returncode == 0
    assert json.loads(saved.read_text())["manifest"] == "atlas.yaml"  # relative: portable across checkouts
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli("apply", saved, cwd=elsewhere)
    assert result.returncode == 1 and "the plan's manifest atlas.yaml is not found here" in result.stderr


def test_validate_several_manifests_writes_nothing(project: Project) -> None:
    other = project.root / "other.yaml"
    other.write_text(project.manifest.read_text().replace("name: atlas", "name: other"))
    broken = project.root / "broken.yaml"
    broken.write_text(project.manifest.read_text().replace("  - name: study_b\n", "  - name: study_b\n    format: csv\n"))
    before = _files(project.root)
    ok = run_cli("validate", project.manifest, other)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [f"valid: {project.manifest} (3 samples in 2 studies)",
                                      f"valid: {other} (3 samples in 2 studies)"]
    mixed = run_cli("validate", project.manifest, broken, other)
    assert mixed.returncode == 1
    assert mixed.stdout.count("valid: ") == 2  # every manifest is checked, not only up to the first failure
    assert f"invalid: {broken}" in mixed.stderr and f"{broken}:13: studies.1.format" in mixed.stderr
    assert _files(project.root) == before


def test_colours_only_on_a_terminal_and_never_with_no_color(project: Project) -> None:
    m = str(project.manifest)
    forced = {"NO_COLOR": "", "FORCE_COLOR": "1"}
    assert "\x1b[" in run_cli("plan", m, env=forced).stdout  # the control: colours do get drawn when wanted
    cases = [(("--no-color", "plan", m), forced), (("plan", m, "--no-color"), forced),
             (("plan", m), {"NO_COLOR": "1", "FORCE_COLOR": "1"}),
             (("plan", m), {"NO_COLOR": "", "FORCE_COLOR": "", "TTY_COMPATIBLE": ""}),  # a pipe, not a terminal
             (("plan", m + ".missing", "--no-color"), forced)]
    for args, env in cases:
        result = run_cli(*args, env=env)
        assert result.stdout or result.stderr
        assert "\x1b" not in result.stdout + result.stderr, args
    assert "\x1b[" in _on_a_terminal("plan", m)
    assert "\x1b" not in _on_a_terminal("plan", m, "--no-color")


def _on_a_terminal(*args: str) -> str:
    """stdout of the CLI run on a pseudo-terminal."""
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE")}
    proc = subprocess.run([sys.executable, "-m", "soma_manifest", *args], stdout=follower, stderr=subprocess.PIPE,
                          env={**env, "TERM": "xterm-256color"}, timeout=60)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal is drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.returncode == 0, proc.stderr
    return b"".join(chunks).decode()


def _plan(**counts: int) -> Plan:
    actions = []
    for kind, n in counts.items():
        actions += [{"key": f"{kind}/s{i:03d}", "kind": kind, "reason": "why | not", "cells": 1500,
                     "steps": ["delete"] if kind == "remove" else ["convert", "ingest"]} for i in range(n)]
    summary = {"samples": len(actions), "unchanged": 0, "actions": counts, "steps": 0, "cells_added_known": 0,
               "cells_deleted": 1500 * counts.get("remove", 0), "failed_expected": 0}
    return Plan.model_validate({
        "created_at": "2025-01-01T00:00:00+00:00", "manifest": "manifests/atlas.yaml", "manifest_digest": "m",
        "schema_path": "schema.yaml", "schema_structure": "s", "schema_conversion": "c", "atlas": "/data/atlas",
        "state": "/data/atlas.state.json", "lineage": "l", "serial": 7, "create_atlas": False,
        "actions": actions, "unchanged": [], "summary": summary})


def test_markdown_plan_summary_first_groups_folded_and_cut() -> None:
    many = render.MAX_ROWS + 5
    text = render.plan_markdown(_plan(add=many, remove=2))
    lines = text.splitlines()
    assert lines[0] == "### soma-manifest plan for `manifests/atlas.yaml`"
    assert lines[2] == f"**Plan: {many} to add, 2 to remove; 0 unchanged; 0 steps; 3,000 cells deleted.**"
    assert "deletes 3,000 cells of 2 removed sample(s)" in text and "--allow-delete" in text
    assert text.index("deletes 3,000") < text.index("+ add") < text.index("- remove")  # warning, then kinds
    assert f"<details><summary><b>+ add: {many}</b></summary>" in text  # long group folded
    assert "#### - remove: 2" in text  # short group open
    assert text.count("| `add/") == render.MAX_ROWS and "| … | 5 more: see the JSON plan | | |" in text
    assert "| `remove/s000` | why \\| not | 1,500 | delete |" in text  # pipes escaped, cells formatted

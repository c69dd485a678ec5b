"""Issue 4: the GitOps flow for real: a git repository, pull requests planned and reviewed, plans applied on merge.

The soma-manifest commands are read from the example workflow (manifests/ci/github-actions.yml) and
run as its steps run them; git, the artifact store and the pull-request labels are simulated.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from ruamel.yaml import YAML

from conftest import DEFAULT_SCHEMA, REPO, make_sample, run_cli, write_metadata, write_mtx
from roundtrip import assert_counts_equal, read_sample_as_user

WORKFLOW = REPO / "manifests" / "ci" / "github-actions.yml"
GIT_ENV = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "curator", "GIT_AUTHOR_EMAIL": "curator@example.org",
           "GIT_COMMITTER_NAME": "curator", "GIT_COMMITTER_EMAIL": "curator@example.org"}
SAMPLES = {f"s{i}": make_sample(20, 15, seed=i) for i in range(1, 5)}


def _workflow() -> dict:
    return YAML(typ="safe").load(WORKFLOW.read_text())


def step(name: str, allow_delete: bool = False) -> list[str]:
    """The soma-manifest arguments of the workflow step `name`, its variables filled in as the runner would."""
    doc = _workflow()
    env = {**doc["env"], "ALLOW_DELETE": "--allow-delete" if allow_delete else ""}
    run = next(s["run"] for job in doc["jobs"].values() for s in job["steps"] if s.get("name") == name)
    line = next(line.strip() for line in run.splitlines() if line.strip().startswith("soma-manifest "))
    words = shlex.split(re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), line))
    # The command itself; what follows (`> plan.md`) is the runner's handling of its stdout.
    end = next((i for i, w in enumerate(words) if w in (">", ">>", "|", "||", "&&", ";")), len(words))
    return words[1:end]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=GIT_ENV, check=True, capture_output=True, text=True).stdout


def write_study(checkout: Path, names: list[str]) -> None:
    raw = checkout / "raw"
    for name in names:
        write_mtx(raw / "lung" / "mtx" / name, SAMPLES[name])
    write_metadata(raw, "lung", {n: SAMPLES[n] for n in names})


def write_manifest(checkout: Path, store: Path, exclude: tuple[str, ...] = ()) -> None:
    # Raw data and schema are in the repository (relative paths); the atlas, its state, h5ads and logs are on
    # storage every runner shares (absolute paths), as in CI.
    study = "  - name: lung\n" + (f"    exclude: [{', '.join(exclude)}]\n" if exclude else "")
    (checkout / "manifests").mkdir(exist_ok=True)
    (checkout / "manifests" / "atlas.yaml").write_text(
        "# yaml-language-server: $schema=../schemas/manifest.schema.json\n"
        "version: 1\n"
        f"atlas: {{name: lung_atlas, storage: {store / 'atlases'}}}\n"
        "schema: ../schemas/atlas.yaml\n"
        f"storage: {{raw: ../raw, h5ad: {store / 'h5ads'}, logs: {store / 'logs'}}}\n"
        f"studies:\n{study}")


def commit(checkout: Path, message: str) -> str:
    git(checkout, "add", "-A")
    git(checkout, "commit", "-q", "-m", message)
    return git(checkout, "rev-parse", "HEAD").strip()


def review(checkout: Path, artifacts: Path, head: str) -> str:
    """The pull-request job: validate, plan (changes: exit 2), keep the plan as an artifact; the comment is returned."""
    validated = run_cli(*step("Validate"), cwd=checkout)
    assert validated.returncode == 0, validated.stderr
    planned = run_cli(*step("Plan"), cwd=checkout)
    assert planned.returncode == 2, planned.stderr
    (artifacts / head).mkdir(parents=True)
    shutil.move(checkout / "plan.json", artifacts / head / "plan.json")  # actions/upload-artifact
    return planned.stdout


def apply_reviewed(main: Path, artifacts: Path, head: str, *, allow_delete: bool = False
                   ) -> subprocess.CompletedProcess:
    """The merge job: fetch the pull request's plan and apply it in the checkout of main."""
    shutil.rmtree(main / "reviewed", ignore_errors=True)
    shutil.copytree(artifacts / head, main / "reviewed")  # gh run download --dir reviewed
    return run_cli(*step("Apply the reviewed plan", allow_delete), cwd=main)


def converged(main: Path) -> bool:
    return run_cli(*step("Check that the atlas matches the manifest"), cwd=main).returncode == 0


def test_pull_requests_are_planned_reviewed_and_applied_on_merge(tmp_path: Path) -> None:
    store, main, pr, artifacts = (tmp_path / n for n in ("store", "main", "pr", "artifacts"))
    main.mkdir()
    git(main, "init", "-q", "-b", "main")
    (main / "schemas").mkdir()
    shutil.copy(DEFAULT_SCHEMA, main / "schemas" / "atlas.yaml")
    commit(main, "atlas schema")

    # 1. Add a study, on a branch of the very checkout that applies after the merge.
    git(main, "checkout", "-q", "-b", "add-study")
    write_study(main, ["s1", "s2"])
    write_manifest(main, store)
    head1 = commit(main, "add study lung")
    comment = review(main, artifacts, head1)
    assert "**Plan: create the atlas; 2 to add; 0 unchanged; 4 steps.**" in comment and "| `lung/s1` |" in comment
    git(main, "checkout", "-q", "main")  # the merge rewrites the raw files: new mtimes, same content
    git(main, "merge", "-q", "--ff-only", "add-study")
    applied = apply_reviewed(main, artifacts, head1)
    assert applied.returncode == 0, applied.stderr
    assert converged(main)

    # 2 and 3. Two pull requests, planned in another checkout against the same state.
    git(tmp_path, "clone", "-q", str(main), "pr")
    git(pr, "checkout", "-q", "-b", "add-samples")
    write_study(pr, ["s1", "s2", "s3", "s4"])
    head2 = commit(pr, "add samples s3 and s4")
    assert "+ add: 2" in review(pr, artifacts, head2)
    git(pr, "checkout", "-q", "-b", "remove-sample", "origin/main")
    write_manifest(pr, store, exclude=("s1",))
    head3 = commit(pr, "remove sample s1")
    comment = review(pr, artifacts, head3)
    assert "- remove: 1" in comment and "deletes 20 cells of 1 removed sample(s)" in comment

    git(main, "pull", "-q", "--ff-only", str(pr), "add-samples")
    applied = apply_reviewed(main, artifacts, head2)
    assert applied.returncode == 0, applied.stderr
    assert converged(main)

    # The removal merges next, but its plan predates the apply that just landed: refused, nothing changed.
    git(main, "pull", "-q", "--no-rebase", "--no-edit", str(pr), "remove-sample")
    state = store / "atlases" / "lung_atlas.state.json"
    before = state.read_bytes()
    stale = apply_reviewed(main, artifacts, head3, allow_delete=True)
    assert stale.returncode == 1
    assert "the plan is stale" in stale.stderr and "another apply has run since" in stale.stderr, stale.stderr
    assert state.read_bytes() == before

    # A fresh plan of the merge is reviewed; it deletes cells, so it applies only with --allow-delete.
    head3b = git(main, "rev-parse", "HEAD").strip()
    assert "deletes 20 cells" in review(main, artifacts, head3b)
    refused = apply_reviewed(main, artifacts, head3b)
    assert refused.returncode == 1 and "--allow-delete" in refused.stderr and state.read_bytes() == before
    applied = apply_reviewed(main, artifacts, head3b, allow_delete=True)
    assert applied.returncode == 0, applied.stderr
    assert converged(main)
    ledger = run_cli(*step("Ledger"), cwd=main)
    assert ledger.returncode == 0 and "3 samples, 60 cells in the atlas" in ledger.stdout

    # The atlas is what the last manifest says: s2, s3 and s4, cell for cell, and nothing else.
    uri = store / "atlases" / "lung_atlas"
    for name in ("s2", "s3", "s4"):
        data = SAMPLES[name]
        assert_counts_equal(read_sample_as_user(uri, "lung", name), "lung", name, data.counts, data.barcodes,
                            data.gene_ids)
    assert read_sample_as_user(uri, "lung", "s1").n_obs == 0
    everything = _all_cells(uri)
    assert everything.n_obs == 60 and everything.X.nnz == sum(SAMPLES[n].counts.nnz for n in ("s2", "s3", "s4"))


def _all_cells(uri: Path):
    import tiledbsoma

    with tiledbsoma.Experiment.open(str(uri)) as exp:
        return exp.axis_query("RNA").to_anndata(X_name="raw")


def test_the_workflow_plans_pull_requests_and_applies_on_merge() -> None:
    doc = _workflow()
    assert set(doc["on"]) == {"pull_request", "push"} and doc["on"]["push"]["branches"] == ["main"]
    plan_job, apply_job = doc["jobs"]["plan"], doc["jobs"]["apply"]
    upload = next(s for s in plan_job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["name"] == "atlas-plan-${{ github.event.pull_request.head.sha }}"
    fetch = next(s for s in apply_job["steps"] if s.get("name") == "Fetch the reviewed plan")["run"]
    assert 'gh run download --name "atlas-plan-$head" --dir reviewed' in fetch
    assert step("Apply the reviewed plan") == ["apply", "reviewed/plan.json"]
    assert step("Plan") == ["plan", "manifests/atlas.yaml", "--detailed-exitcode", "--format", "markdown",
                            "--out", "plan.json"]

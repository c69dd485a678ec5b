"""Many small samples (issue 23): grouped ingests round-trip exactly, a failure inside a group fails none of its
members (they are retried alone), and fragments grow with the groups, not with the samples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import Project, apply_ok, assert_converged, make_sample, read_state, run_cli
from soma_manifest import atlas
from soma_manifest.faults import ENV as CRASH_AT
from soma_manifest.faults import FAIL_ENV as FAIL_AT

SAMPLES = 60


@pytest.fixture
def many(tmp_path: Path) -> Project:
    """Sixty tiny samples in two studies, partly disjoint genes."""
    p = Project(tmp_path)
    for i in range(SAMPLES):
        p.add_mtx("study_a" if i % 2 else "study_b", f"s{i:02d}",
                  make_sample(8 + i % 5, 20, seed=300 + i, gene_offset=3 * (i % 4)))
    p.write_manifest()
    return p


def _log(project: Project) -> str:
    return "\n".join(path.read_text() for path in sorted((project.root / "logs").glob("apply-*.log")))


def _grouped(log: str) -> int:
    """Samples the apply ingested in groups, from its log lines."""
    return sum(int(n) + 1 for n in re.findall(r" and (\d+) more: ingested in one step", log))


def test_grouped_ingests_round_trip_and_bound_fragments(many: Project) -> None:
    apply_ok(many, "--processes", "2")
    log = _log(many)
    grouped = _grouped(log)
    assert grouped > SAMPLES // 2, f"only {grouped} of {SAMPLES} samples were ingested in groups"
    state = read_state(many)
    assert {s.ingest for s in state.samples.values()} == {"done"}
    assert_converged(many)
    # One fragment per group and array, not one per sample (before any compaction of the apply's own).
    steps = len(re.findall(r": ingest done \(", log)) - grouped + log.count("ingested in one step")
    x = atlas.array_uris(str(many.atlas_uri))["ms/RNA/X/raw"]
    assert atlas.fragment_count(x) <= max(steps, 1) < SAMPLES


def test_a_failed_group_fails_none_of_its_members(many: Project) -> None:
    # Every grouped ingest fails half-way (its samples-table rows written, no cell yet): each group's members
    # are retried alone, in fresh ranges, once the group's ranges and rows are deleted.
    result = run_cli("apply", many.manifest, "--processes", "2", env={FAIL_AT: "worker_group_after_rows"})
    log = _log(many)
    assert "the grouped ingest failed" in log, log[-3000:]
    assert result.returncode == 0, result.stdout + result.stderr
    state = read_state(many)
    assert {k: (s.ingest, s.failed_step) for k, s in state.samples.items()} == \
        {k: ("done", None) for k in many.samples}
    assert state.orphans == [] and state.orphan_samples == []
    assert_converged(many)


def test_a_kill_inside_a_group_then_apply_converges(many: Project) -> None:
    # The apply itself dies right after the first grouped ingest is recorded: the next one finishes the rest.
    result = run_cli("apply", many.manifest, "--processes", "2", env={CRASH_AT: "after_group"})
    assert result.returncode == -9, result.stdout + result.stderr
    assert _grouped(_log(many)) > 1
    apply_ok(many, "--processes", "2")
    assert_converged(many)

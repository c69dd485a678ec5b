"""Compaction, apply history and reads as of an apply, through the CLI: fragments go down, every kept
apply still reads exactly (cell by cell) after later replaces, removals and compactions, and a kill -9
at any point of a compaction leaves an atlas that verifies and that the next compact or apply finishes."""

from __future__ import annotations

import json
import shutil
import signal

import pandas as pd
import pytest

from conftest import (
    Project,
    apply_ok,
    assert_converged,
    invoke_cli,
    make_sample,
    read_state,
    set_cell_type,
    start_cli,
)
from soma_manifest import atlas
from soma_manifest.faults import ENV as CRASH_AT
from soma_manifest.history import timestamp_of
from soma_manifest.state import load_state


def fragments(project: Project) -> dict[str, int]:
    return {name: atlas.fragment_count(uri) for name, uri in atlas.array_uris(str(project.atlas_uri)).items()}


def snapshot(project: Project, timestamp: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The whole atlas at a timestamp, cell by cell: obs rows by obs_id, and every X entry of every layer
    as (layer, obs_id, var_id, value)."""
    with atlas.open_experiment(str(project.atlas_uri), timestamp) as exp:
        obs = exp.obs.read().concat().to_pandas()
        ms = exp.ms["RNA"]
        var = ms.var.read(column_names=["soma_joinid", "var_id"]).concat().to_pandas()
        entries = []
        for layer in ms.X.keys():
            x = ms.X[layer].read().tables().concat().to_pandas()
            entries.append(x.assign(layer=layer))
    x = pd.concat(entries)
    x["obs_id"] = x["soma_dim_0"].map(obs.set_index("soma_joinid")["obs_id"])
    x["var_id"] = x["soma_dim_1"].map(var.set_index("soma_joinid")["var_id"])
    x = x[["layer", "obs_id", "var_id", "soma_data"]].sort_values(["layer", "obs_id", "var_id"])
    return obs.sort_values("obs_id").reset_index(drop=True), x.reset_index(drop=True)


def assert_same(a: tuple[pd.DataFrame, pd.DataFrame], b: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])


def change_everything(project: Project) -> None:
    """Replace one sample, remove one, re-annotate one, add one."""
    project.add_mtx("study_a", "s1", make_sample(45, 30, seed=11))
    shutil.rmtree(project.raw / "study_a" / "mtx" / "s2")
    del project.samples["study_a/s2"]
    project.write_study_metadata("study_a")
    project.add_mtx("study_b", "s2", make_sample(25, 20, seed=12, gene_offset=40))
    set_cell_type(project, "study_b/s1", "NK cell")  # after add_mtx, which rewrites the study's metadata


def test_reads_as_of_an_apply_survive_changes_and_compaction(applied: Project) -> None:
    first = read_state(applied).history
    assert [e.changes for e in first] == [{"added": ["study_a/s1", "study_a/s2", "study_b/s1"]}]
    serial = first[0].serial
    then = snapshot(applied, timestamp_of(read_state(applied), serial))
    assert_same(then, snapshot(applied, None))

    change_everything(applied)
    apply_ok(applied, "--allow-delete")
    state = read_state(applied)
    latest = state.history[-1]
    assert latest.changes == {"replaced": ["study_a/s1"], "removed": ["study_a/s2"], "added": ["study_b/s2"],
                              "updated": ["study_b/s1"]}
    assert (latest.cells_added, latest.cells_deleted, latest.cells_total) == (70, 75, 100)
    now = snapshot(applied, None)
    assert_same(snapshot(applied, timestamp_of(state, serial)), then)
    assert_same(snapshot(applied, latest.timestamp_ms), now)

    shown = invoke_cli("show", applied.manifest, "--summary", "--serial", str(serial))
    assert shown.returncode == 0, shown.stderr
    assert f"as apply {serial} left it: 105 cells" in shown.stdout and "study_a/s2: 35 cells" in shown.stdout

    # The default retention keeps both applies: compaction merges fragments but purges nothing.
    assert max(fragments(applied).values()) > 1
    result = invoke_cli("compact", applied.manifest)
    assert result.returncode == 0, result.stderr
    assert "ms/RNA/X/raw:" in result.stdout
    assert set(fragments(applied).values()) == {1}
    assert_same(snapshot(applied, timestamp_of(read_state(applied), serial)), then)
    assert_same(snapshot(applied, None), now)
    assert_converged(applied, {"study_b/s1": "NK cell"})

    # Keeping only the last apply lets compaction purge the deleted cells: the first apply is gone.
    applied.write_manifest(extra="compaction:\n  keep_history: {applies: 1}\n")
    result = invoke_cli("compact", applied.manifest)
    assert result.returncode == 0, result.stderr
    assert "deleted cells purged" in result.stdout
    listing = json.loads(invoke_cli("history", applied.manifest, "--json").stdout)["history"]
    assert [(e["serial"], e["readable"], e["kept"]) for e in listing] == [(serial, False, False),
                                                                            (latest.serial, True, True)]
    refused = invoke_cli("show", applied.manifest, "--summary", "--serial", str(serial))
    assert refused.returncode == 1 and "no longer readable" in refused.stderr
    assert_same(snapshot(applied, latest.timestamp_ms), now)
    assert_converged(applied, {"study_b/s1": "NK cell"})


def test_apply_compacts_past_the_threshold_and_not_when_off(project: Project) -> None:
    project.write_manifest(extra="compaction:\n  after_fragments: false\n")
    apply_ok(project)
    assert 1 <= fragments(project)["obs"] <= 3  # one per ingest step (small samples may share one)
    assert read_state(project).compaction.last_at is None
    project.write_manifest(extra="compaction:\n  after_fragments: 1\n")
    project.add_mtx("study_b", "s2", make_sample(25, 20, seed=12, gene_offset=40))
    apply_ok(project)
    assert set(fragments(project).values()) == {1}
    assert read_state(project).compaction.last_at is not None
    assert_converged(project)


def test_compaction_block_is_validated(project: Project) -> None:
    project.write_manifest(extra="compaction:\n  after_fragments: true\n  keep_history: {apply: 3}\n")
    result = invoke_cli("validate", project.manifest)
    assert result.returncode == 1
    assert "after_fragments" in result.stderr and "false to turn automatic compaction off" in result.stderr
    assert "keep_history.apply" in result.stderr


def test_a_state_without_history_loads_and_gains_it(applied: Project) -> None:
    raw = json.loads(applied.state_path.read_text())
    del raw["history"], raw["compaction"]
    applied.state_path.write_text(json.dumps(raw))
    assert load_state(applied.state_path).history == []
    assert "No applies recorded yet." in invoke_cli("history", applied.manifest).stdout
    applied.add_mtx("study_b", "s2", make_sample(25, 20, seed=12, gene_offset=40))
    apply_ok(applied)
    listing = invoke_cli("history", applied.manifest)
    assert "added 1; 130 cells" in listing.stdout and "kept readable" in listing.stdout


# (command killed, crash point, what finishes): before any array, between arrays, inside apply's own compaction.
KILLS = [("compact", "compact_started", "compact"), ("compact", "compact_after_array:2", "apply with no changes"),
         ("apply", "compact_after_array", "apply with changes")]


@pytest.mark.parametrize(("command", "point", "finisher"), KILLS, ids=[f"{c}-{p}" for c, p, _ in KILLS])
def test_kill_during_compaction_leaves_a_verified_atlas_that_the_next_run_finishes(
        applied: Project, command: str, point: str, finisher: str) -> None:
    change_everything(applied)
    if command == "compact":
        apply_ok(applied, "--allow-delete")
        run = start_cli("compact", applied.manifest, env={CRASH_AT: point})
    else:
        applied.write_manifest(extra="compaction:\n  after_fragments: 2\n")
        run = start_cli("apply", applied.manifest, "--allow-delete", env={CRASH_AT: point})
    try:
        assert run.wait().returncode == -signal.SIGKILL
    finally:
        run.kill_session()
    assert read_state(applied).compaction.pending
    result = invoke_cli("verify", "--deep", applied.manifest)
    assert result.returncode == 0, result.stdout
    serial = read_state(applied).history[0].serial
    assert invoke_cli("show", applied.manifest, "--summary", "--serial", str(serial)).returncode == 0
    if finisher == "compact":
        result = invoke_cli("compact", applied.manifest)
        assert result.returncode == 0, result.stderr
        assert "Finished the work of an interrupted compaction." in result.stdout
    elif finisher == "apply with no changes":
        assert "No changes" in apply_ok(applied).stderr
    else:
        applied.add_mtx("study_c", "s1", make_sample(20, 20, seed=13))
        applied.write_manifest(extra="compaction:\n  after_fragments: 2\n")
        apply_ok(applied)
    assert not read_state(applied).compaction.pending
    assert set(fragments(applied).values()) == {1}
    assert_converged(applied, {"study_b/s1": "NK cell"})

"""kill -9 of apply, or of one of its workers, at every crash point and at random moments: the next
apply converges to the right atlas (every cell once, every count right, no orphans) and `verify --deep`
is clean."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from conftest import (
    Background,
    Project,
    SampleData,
    apply_ok,
    assert_converged,
    make_sample,
    plan_actions,
    read_state,
    set_cell_type,
    start_cli,
    write_mtx,
)
from soma_manifest.faults import ENV as CRASH_AT
from soma_manifest.lock import lock_path


def make_changes(project: Project) -> dict[str, str]:
    """After a first apply: remove one sample, replace one, add one, re-annotate one. Returns the cell types."""
    shutil.rmtree(project.raw / "study_a" / "mtx" / "s2")
    del project.samples["study_a/s2"]
    project.add_mtx("study_a", "s1", make_sample(45, 30, seed=11))
    project.add_mtx("study_b", "s2", make_sample(25, 20, seed=12, gene_offset=40))
    set_cell_type(project, "study_b/s1", "NK cell")
    return {"study_b/s1": "NK cell"}


def assert_apply_converges(project: Project, cell_types: dict[str, str]) -> None:
    apply_ok(project, "--allow-delete")
    assert not lock_path(project.state_path).exists()
    state = read_state(project)
    assert state.orphans == []
    assert {k: (s.ingest, s.failed_step) for k, s in state.samples.items()} == \
        {k: ("done", None) for k in project.samples}
    assert_converged(project, cell_types)


# (scenario, crash point, what `plan` may show after the crash: the kinds, and one kind that must be there).
# Conversions and ingests overlap (no barrier), so which samples had got how far when the kill came depends on
# the order in which workers finish; the kinds say how far each may have got. "changes" = a first apply, then
# make_changes: the run removes one sample, replaces one, adds one and updates one; its first save forgets the
# removed sample, the next deletes its cells (while the others convert).
_FRESH = {"add", "ingest", "resume"}
_CHANGES = {"cleanup", "replace", "add", "ingest", "resume", "update"}
POINTS = [
    ("fresh", "before_state_replace", ({"add"}, "add")),  # the first save, before the atlas is created
    ("fresh", "after_create", ({"add"}, "add")),
    ("fresh", "after_convert:2", (_FRESH, "ingest")),
    ("fresh", "after_allocate", (_FRESH, "resume")),
    ("fresh", "overlap_allocate", (_FRESH, "resume")),  # ranges allocated while others still convert
    ("fresh", "mid_ingest", (_FRESH, None)),
    ("fresh", "worker_ingest_after_obs", ({"retry"}, "retry")),
    ("changes", "before_state_replace", ({"remove", "replace", "add", "update"}, "remove")),
    ("changes", "mid_delete", (_CHANGES, "cleanup")),
    ("changes", "after_convert", (_CHANGES, None)),
    ("changes", "after_allocate", (_CHANGES, "resume")),
    ("changes", "after_delete:2", (_CHANGES, "resume")),
    ("changes", "before_state_replace:8", (_CHANGES, None)),
    ("changes", "mid_ingest", (_CHANGES, None)),
    ("changes", "worker_ingest_after_obs", ({"retry"}, "retry")),
]


@pytest.mark.slow
@pytest.mark.parametrize(("scenario", "point", "then"), POINTS, ids=[f"{s}-{p}" for s, p, _ in POINTS])
def test_kill_at_crash_point_then_apply_converges(project: Project, scenario: str, point: str,
                                                   then: tuple[set[str], str | None]) -> None:
    cell_types: dict[str, str] = {}
    if scenario == "changes":
        apply_ok(project)
        cell_types = make_changes(project)
    run = start_cli("apply", project.manifest, "--allow-delete", env={CRASH_AT: point})
    try:
        crashed = run.wait()
        if point.startswith("worker_"):
            # A worker died, not apply: its samples are failed, the lock released.
            assert crashed.returncode == 1, crashed.stderr
            assert "worker process died" in crashed.stderr
            assert not lock_path(project.state_path).exists()
        else:
            assert crashed.returncode == -signal.SIGKILL, crashed.stderr
            assert lock_path(project.state_path).exists(), "the dead apply's lock is left for the next one"
        kinds = Counter(a["kind"] for a in plan_actions(project).values())
        allowed, needed = then
        assert kinds and set(kinds) <= allowed, kinds
        assert needed is None or needed in kinds, kinds
        # The next apply takes over the dead process' lock, finishes the work, and verifies it.
        assert_apply_converges(project, cell_types)
    finally:
        run.kill_session()


@pytest.fixture(scope="module")
def busy_raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SampleData]]:
    """Enough work for apply to take several seconds: three larger samples and twenty small ones.
    Written once per module (writing Matrix Market is slow), copied into each test's project."""
    staging = Project(tmp_path_factory.mktemp("busy"))
    for i in range(3):
        staging.add_mtx("big", f"s{i}", make_sample(1200, 2000, seed=100 + i, gene_offset=300 * i, density=0.2))
    for i in range(20):
        staging.add_mtx("many", f"m{i:02d}", make_sample(150, 200, seed=200 + i, gene_offset=7 * i))
    return staging.raw, staging.samples


def progress_lines(run: Background) -> int:
    """How many samples apply has reported converted or ingested so far."""
    return len(re.findall(r"^  (?:convert|ingest) \d+/", run.err.read_text(), re.MULTILINE))


def loky_workers(apply_pid: int) -> list[psutil.Process]:
    workers = []
    for child in psutil.Process(apply_pid).children(recursive=True):
        try:
            if "loky.backend.popen_loky_posix" in child.cmdline():
                workers.append(child)
        except psutil.Error:
            pass
    return workers


@pytest.mark.parametrize(("coordinator", "runs"), [("parent", True), ("another process", False)])
def test_a_job_left_by_a_dead_apply_never_starts(coordinator: str, runs: bool) -> None:
    """loky workers keep taking queued jobs after a kill -9 of apply; such a job must not start writing (its
    writes would be stamped after the next apply's deletes). Seen as orphan cells in random-kill runs."""
    pid = os.getpid() if coordinator == "parent" else 1
    code = f"from soma_manifest.executors.workers import while_coordinator_lives; while_coordinator_lives({pid}, print, 'ran')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == ((0, "ran\n") if runs else (1, ""))


# (what is killed, seed): the seeds start the timer after 3, 39 and 20 steps (apply), 8 and 36 (a worker).
TIMED = [("apply", 2), ("apply", 5), ("apply", 7), ("worker", 1), ("worker", 6)]


@pytest.mark.slow
@pytest.mark.parametrize(("victim", "seed"), TIMED, ids=[f"{v}-{s}" for v, s in TIMED])
def test_kill_at_a_random_moment_then_apply_converges(project: Project, busy_raw, victim: str, seed: int) -> None:
    """SIGKILL apply, or one of its workers, at a random moment while it converts or ingests (the larger
    samples in many X fragments). The timer starts after a random number of finished steps, so that the
    kill lands before apply ends however fast the machine is."""
    raw, samples = busy_raw
    for study in ("big", "many"):
        shutil.copytree(raw / study, project.raw / study)
    project.samples.update(samples)
    project.write_manifest()
    rng = random.Random(seed)
    steps, delay = rng.randrange(40), rng.uniform(0.0, 0.3)  # of 2 x 26 steps
    run = start_cli("apply", project.manifest, "--processes", "2", "--chunk-nnz", "20000")
    try:
        while progress_lines(run) < steps and run.proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        if victim == "apply":
            run.proc.send_signal(signal.SIGKILL)
        else:
            rng.choice(loky_workers(run.proc.pid)).send_signal(signal.SIGKILL)
        killed = run.wait()
        if victim == "apply":
            assert killed.returncode == -signal.SIGKILL, f"apply finished before the kill: {killed.stderr}"
        else:
            # The steps running on the dead worker fail their samples (exit 1), except a grouped ingest: its
            # members are retried alone in the same apply, which then may succeed.
            log = "".join(p.read_text() for p in (project.root / "logs").glob("apply-*.log"))
            assert (killed.returncode == 1 and "worker process died" in killed.stderr) or (
                killed.returncode == 0 and "the grouped ingest failed (worker process died" in log), killed.stderr
        assert_apply_converges(project, {})
    finally:
        run.kill_session()


@pytest.mark.slow
def test_kill_inside_the_convert_ingest_overlap_then_apply_converges(project: Project, busy_raw) -> None:
    """Killed when the first ingest has finished while other samples are still converting: some samples may be
    in the atlas, some allocated, some converted, some not yet; the next apply sorts each out. (The third, as
    this was: the small samples now wait to be ingested in groups, so three ingests rarely end while conversions
    run; and outcomes are saved at most once a second, so the state may not show the first one done.)"""
    raw, samples = busy_raw
    for study in ("big", "many"):
        shutil.copytree(raw / study, project.raw / study)
    project.samples.update(samples)
    project.write_manifest()
    run = start_cli("apply", project.manifest, "--processes", "2", env={CRASH_AT: "overlap_ingest"})
    try:
        assert run.wait().returncode == -signal.SIGKILL
        actions = plan_actions(project)
        assert {a["kind"] for a in actions.values()} <= _FRESH
        assert any(a["reason"].startswith("not converted yet") for a in actions.values()), actions
        assert_apply_converges(project, {})
    finally:
        run.kill_session()


@pytest.mark.slow
@pytest.mark.parametrize("edit_metadata", [False, True], ids=["as it was", "metadata edited"])
def test_crash_then_reverted_change(applied: Project, edit_metadata: bool) -> None:
    """A run re-converts a changed sample and dies; the change is reverted. The h5ad left behind is not
    what the atlas holds: apply re-converts it, and never updates obs from it."""
    key, folder = "study_a/s1", applied.raw / "study_a" / "mtx" / "s1"
    original = {path.name: path.read_bytes() for path in folder.iterdir()}
    data = applied.samples[key]
    write_mtx(folder, SampleData(data.counts * 2, data.barcodes, data.gene_ids, data.symbols))
    run = start_cli("apply", applied.manifest, env={CRASH_AT: "after_convert"})
    try:
        assert run.wait().returncode == -signal.SIGKILL
    finally:
        run.kill_session()
    for name, content in original.items():
        (folder / name).write_bytes(content)
    if edit_metadata:
        set_cell_type(applied, key, "NK cell")
    action = plan_actions(applied)[key]
    assert (action["kind"], action["steps"]) == ("update", ["convert", "write_obs"]), action
    assert_apply_converges(applied, {key: "NK cell"} if edit_metadata else {})

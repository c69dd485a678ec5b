"""Issue 26: applies on two loky workers end without loky's resource tracker warning on stderr ("There appear
to be 3 leaked semlock objects to clean up at shutdown"): the pool is shut down so that its call queue's
semaphores are released before the command line exits (executors.loky_pool._settle).

The leak was a race (the queue's feeder thread ending after os._exit), seen in about one 16-sample apply in
three; each test below gives it several chances."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import pytest

from conftest import Project, assert_converged, make_sample, run_cli
from soma_manifest import executors
from soma_manifest.executors import ExecutorConfig, start_executor

WARNINGS = ("leaked", "resource_tracker")


def loky_semaphores() -> list[object]:
    """The named semaphores of loky pools still alive in this process (each is unlinked when collected)."""
    from loky.backend.synchronize import SemLock

    return [o for o in gc.get_objects() if isinstance(o, SemLock)]


def feeder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "QueueFeederThread"]


@pytest.mark.slow
def test_applies_on_two_workers_end_without_a_leak_warning(tmp_path: Path) -> None:
    """Three applies through the real command line (16 samples, then 8 more twice), as a user runs them."""
    project = Project(tmp_path)
    batches = [range(16), range(16, 24), range(24, 32)]
    for batch in batches:
        for i in batch:
            project.add_mtx(f"study_{'ab'[i % 2]}", f"s{i}", make_sample(30, 20, seed=i, gene_offset=i % 7))
        project.write_manifest()
        done = run_cli("apply", project.manifest, "--processes", "2")
        assert done.returncode == 0, done.stderr
        assert f"Apply finished: {len(batch)} succeeded, 0 failed" in done.stderr
        for word in WARNINGS:
            assert word not in done.stderr, done.stderr
    assert_converged(project)


@pytest.mark.parametrize("how", ["finished", "abandoned"])
def test_stopping_the_workers_releases_every_semaphore(how: str) -> None:
    """In this process: after a pool ran steps to the end (or abandoned a running one, as a signal's grace
    period ending does), stop_local_workers leaves no semaphore and no queue thread of loky behind."""
    executors.stop_local_workers()
    assert not loky_semaphores()
    for _ in range(4):
        steps = start_executor(ExecutorConfig("loky", None, 2))
        if how == "finished":
            for k in range(4):
                steps.submit(f"k{k}", "noop", os.getpid)
            while steps.busy:
                steps.wait(1.0)
        else:
            steps.submit("k", "sleep", time.sleep, 60)
            deadline = time.monotonic() + 60
            while not any(f.running() for f in steps.running):
                assert time.monotonic() < deadline, "the step never started"
                time.sleep(0.01)
            assert steps.abandon() == [("sleep", "k")]
        steps.shutdown()
        executors.stop_local_workers()
        assert not feeder_threads()
        assert not loky_semaphores()

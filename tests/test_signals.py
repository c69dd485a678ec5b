"""Issue 12 part 4: SIGINT (Ctrl-C, sent to the whole process group as a terminal does) and SIGTERM (to apply
alone, as CI and Kubernetes do) stop apply cleanly: exit 130/143, a message, the lock released, and the next
apply converges. A second SIGINT stops at once and still leaves a state that converges. The same first and second
SIGINT with `--executor dask`, whose LocalCluster leaves no process behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import Project, apply_ok, assert_converged, read_state, start_cli
from soma_manifest.faults import PAUSE_ENV
from soma_manifest.lock import lock_path


def wait_for(path_glob: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list(path_glob.parent.glob(path_glob.name)):
        assert time.monotonic() < deadline, f"nothing matched {path_glob}"
        time.sleep(0.05)


def session_processes(sid: int) -> list[int]:
    """The pids still alive in a session (apply's, started with start_cli: every worker it started is in it)."""
    import psutil

    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return alive


def wait_session_gone(sid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while session_processes(sid):
        assert time.monotonic() < deadline, f"left behind: {session_processes(sid)}"
        time.sleep(0.2)


@pytest.mark.parametrize(("sig", "code", "group", "executor"),
                         [(signal.SIGINT, 130, True, "loky"), (signal.SIGTERM, 143, False, "loky"),
                          (signal.SIGINT, 130, True, "dask")], ids=["SIGINT", "SIGTERM", "SIGINT-dask"])
def test_first_signal_finishes_running_steps_and_exits_cleanly(project: Project, tmp_path: Path, sig: int,
                                                               code: int, group: bool, executor: str) -> None:
    """With dask: a LocalCluster of one worker, spawned by apply (it gets the pause from apply's environment)."""
    pause = tmp_path / "pause"
    pause.mkdir()
    (pause / "armed").touch()
    run = start_cli("apply", project.manifest, "--processes", "1", "--executor", executor,
                    env={PAUSE_ENV: f"ingest_start:{pause}"})
    try:
        wait_for(pause / "paused-*")  # one ingest is running (held); the others wait in the queue
        (os.killpg if group else os.kill)(run.proc.pid, sig)
        time.sleep(0.5)  # the held step is still running when the signal arrives
        (pause / "armed").unlink()
        (pause / "release").touch()
        done = run.wait()
        assert done.returncode == code, done.stderr
        name = signal.Signals(sig).name
        assert f"Interrupted by {name}" in done.stderr and "run `soma-manifest apply` again to resume" in done.stderr
        assert "Traceback" not in done.stderr
        assert not lock_path(project.state_path).exists()
        state = read_state(project)
        done_samples = [k for k, s in state.samples.items() if s.ingest == "done"]
        assert len(done_samples) == 1, "the running step finished, and no other started"
        if executor == "dask":
            wait_session_gone(run.proc.pid, 30)
        apply_ok(project)
        assert_converged(project)
    finally:
        run.kill_session()


@pytest.mark.parametrize("executor", ["loky", "dask"])
def test_second_sigint_stops_at_once(project: Project, tmp_path: Path, executor: str) -> None:
    """The held step's worker goes with apply (loky's are killed; a LocalCluster's watch apply): nothing of the
    session is left, and once the last process is gone no resource tracker has warned of a leaked semaphore
    (apply unlinks them before it exits)."""
    pause = tmp_path / "pause"
    pause.mkdir()
    (pause / "armed").touch()
    run = start_cli("apply", project.manifest, "--processes", "1", "--executor", executor,
                    env={PAUSE_ENV: f"ingest_start:{pause}"})
    try:
        wait_for(pause / "paused-*")
        os.killpg(run.proc.pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(run.proc.pid, signal.SIGINT)
        assert run.proc.wait(120) == 130
        assert not lock_path(project.state_path).exists()
        (pause / "armed").unlink()
        (pause / "release").touch()  # a worker still alive would go on now
        wait_session_gone(run.proc.pid, 60)
        stderr = run.err.read_text()  # now complete: the resource trackers were in the session too
        assert "Stopped at once" in stderr
        for unwanted in ("Traceback", "leaked", "resource_tracker"):
            assert unwanted not in stderr, stderr
        assert not list(pause.glob("resumed-*")), "the held step's worker outlived a second SIGINT"
        apply_ok(project)
        assert_converged(project)
    finally:
        run.kill_session()

"""Issue 11, small applies (the GitOps case: one sample added on a merge). An apply whose only sample is small
runs its steps inline, in apply's own process, instead of starting a worker that would import the storage
engine again; a larger one, or two samples, still go to loky's workers. Inline steps keep apply's guarantees:
the same round trip, a signal lets the running step finish and then stops, a crash inside a step leaves a
state the next apply converges from. And the command's processes leave out Dask, zarr, charset_normalizer and
shapely."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Project, apply_ok, assert_converged, make_sample, read_state, run_cli, start_cli
from soma_manifest import api, executors
from soma_manifest.faults import ENV as CRASH_AT
from soma_manifest.faults import PAUSE_ENV
from soma_manifest.lock import lock_path


def last_apply_log(project: Project) -> str:
    return Path(json.loads((project.root / "logs" / "last-apply.json").read_text())["log_file"]).read_text()


def executor_of_last_apply(project: Project) -> str:
    line = next(t for t in last_apply_log(project).splitlines() if " actions, " in t)
    return line.split("executor ")[1].split(",")[0]


def one_sample(tmp_path: Path) -> Project:
    project = Project(tmp_path)
    project.add_mtx("study_a", "s1", make_sample(60, 40, seed=11))
    project.write_manifest()
    return project


def test_one_small_sample_added_runs_inline_and_round_trips(applied: Project) -> None:
    applied.add_mtx("study_b", "s2", make_sample(45, 25, seed=12, gene_offset=20))
    result = run_cli("apply", str(applied.manifest))  # the real command, in its own process
    assert result.returncode == 0, result.stderr
    assert executor_of_last_apply(applied) == "inline"
    assert "study_b/s2: ingest done" in last_apply_log(applied)
    assert_converged(applied)


def test_two_samples_or_a_larger_one_run_on_workers(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    apply_ok(project)
    assert executor_of_last_apply(project) == "loky"  # three samples
    project.add_mtx("study_b", "s2", make_sample(45, 25, seed=12, gene_offset=20))
    monkeypatch.setattr(executors, "INLINE_MAX_BYTES", 100)  # the new sample's files are larger than this
    report = api.load(project.manifest).apply()
    assert report.ok, report.failed
    assert executor_of_last_apply(project) == "loky"
    assert_converged(project)


def test_a_signal_during_an_inline_step_lets_it_finish_then_stops(tmp_path: Path) -> None:
    project = one_sample(tmp_path / "p")
    pause = tmp_path / "pause"
    pause.mkdir()
    (pause / "armed").touch()
    run = start_cli("apply", project.manifest, env={PAUSE_ENV: f"convert_start:{pause}"})
    try:
        deadline = time.monotonic() + 120
        while not list(pause.glob("paused-*")):
            assert time.monotonic() < deadline, run.err.read_text()
            time.sleep(0.05)
        assert list(pause.glob("paused-*"))[0].name == f"paused-{run.proc.pid}", "the step runs in apply itself"
        run.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)  # the held step is still running when the signal arrives
        (pause / "armed").unlink()
        (pause / "release").touch()
        done = run.wait()
        assert done.returncode == 130, done.stderr
        assert "Interrupted by SIGINT" in done.stderr and "Traceback" not in done.stderr
        assert not lock_path(project.state_path).exists()
        entry = read_state(project).samples["study_a/s1"]
        assert (entry.converted, entry.ingest) == (True, "none"), "the convert finished; the ingest never started"
        apply_ok(project)
        assert_converged(project)
    finally:
        run.kill_session()


def test_a_crash_inside_an_inline_ingest_then_apply_converges(tmp_path: Path) -> None:
    project = one_sample(tmp_path)
    run = start_cli("apply", project.manifest, env={CRASH_AT: "worker_ingest_after_obs"})
    try:
        crashed = run.wait()
        assert crashed.returncode == -signal.SIGKILL, "the step ran in apply: apply itself died"
        assert lock_path(project.state_path).exists(), "the dead apply's lock is left for the next one"
        assert read_state(project).samples["study_a/s1"].ingest == "allocated"
        apply_ok(project)
        assert_converged(project)
    finally:
        run.kill_session()


def test_the_command_line_leaves_out_four_packages_and_still_reads_and_writes_h5ad_and_soma(tmp_path: Path) -> None:
    """What executors.workers.lean_imports leaves out of the command's process (Dask, zarr, charset_normalizer,
    shapely): anndata's h5ad I/O, and the storage engine's experiment write, query and read, work without."""
    code = f"""
import sys
from soma_manifest import executors
executors.workers.lean_imports()
import anndata, numpy as np, pandas as pd, scipy.sparse as sp, tiledbsoma, tiledbsoma.io
import soma_manifest.apply, soma_manifest.convert
assert sys.modules["dask"] is None and sys.modules["charset_normalizer"] is None, "a real package was loaded"
assert not hasattr(sys.modules["zarr"], "open"), "the real zarr was loaded"
assert not hasattr(sys.modules["shapely"], "box"), "the real shapely was loaded"
X = sp.random(20, 10, density=0.3, format="csr", dtype=np.float32, random_state=0)
a = anndata.AnnData(X, obs=pd.DataFrame({{"c": list("ab") * 10}}, index=[str(i) for i in range(20)]))
a.write_h5ad({str(tmp_path / "x.h5ad")!r})
b = anndata.read_h5ad({str(tmp_path / "x.h5ad")!r})
assert (b.X != X).nnz == 0 and list(b.obs["c"]) == list(a.obs["c"])
uri = tiledbsoma.io.from_anndata({str(tmp_path / "exp")!r}, b, "RNA")
with tiledbsoma.Experiment.open(uri) as exp:
    c = exp.axis_query("RNA", obs_query=tiledbsoma.AxisQuery(coords=(slice(2, 5),))).to_anndata("data")
assert (c.X != X[2:6]).nnz == 0 and list(c.obs["c"]) == list(a.obs["c"][2:6])
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr

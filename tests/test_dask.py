"""Issue 9: the same manifest applied by Dask (a real scheduler and workers on 127.0.0.1, and a LocalCluster),
on local paths and on S3 (moto), gives the loky result cell by cell; kills of apply or of a worker converge; a
dead apply's step is fenced out."""

from __future__ import annotations

import gzip
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import tiledbsoma

from conftest import (
    DATA,
    Background,
    Project,
    SampleData,
    apply_ok,
    assert_converged,
    invoke_cli,
    make_sample,
    plan_actions,
    read_state,
    run_cli,
    set_cell_type,
    start_cli,
)
from daskcluster import DaskCluster, free_port
from roundtrip import assert_counts_equal, read_sample_as_user
from s3server import CREDENTIALS, S3Server
from soma_manifest import atlas
from soma_manifest.faults import ENV as CRASH_AT
from soma_manifest.faults import PAUSE_ENV
from soma_manifest.lock import lock_path
from test_s3 import S3Project
from test_s3 import _project as s3_project_in


def on_s3(root: Path, server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Project:
    """The `project`'s three samples, raw files, h5ads, logs, atlas and state in a bucket. Its manifest names no
    object_store: apply (and its loky workers) find the endpoint in AWS_ENDPOINT_URL, and the cluster's workers
    theirs, with their credentials, in their own environment (daskcluster.py)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    p = s3_project_in(root, server)
    p.manifest.write_text(re.sub(r"object_store:\n(?:  .*\n)+", "", p.manifest.read_text()))
    assert "object_store" not in p.manifest.read_text()
    return p


@pytest.fixture
def store_project(request: pytest.FixtureRequest, tmp_path: Path, s3_server: S3Server,
                  monkeypatch: pytest.MonkeyPatch) -> Project:
    """Parametrized indirectly: "local", the `project`; "s3", the same project in a bucket (`on_s3`)."""
    if request.param == "s3":
        return on_s3(tmp_path, s3_server, monkeypatch)
    return request.getfixturevalue("project")


def lock_left(project: Project) -> bool:
    if isinstance(project, S3Project):
        return "atlases/atlas.state.json.lock" in project.objects()
    return lock_path(project.state_path).exists()


def add_h5ad_and_10x_h5(project: Project) -> SampleData:
    """An h5ad study and a Cell Ranger HDF5 study next to the project's MTX studies; the h5ad sample's data."""
    import anndata

    data = make_sample(30, 20, seed=4, gene_offset=3)
    folder = project.raw / "lung" / "h5ad"
    folder.mkdir(parents=True)
    anndata.AnnData(X=data.counts.astype(np.float32), obs=pd.DataFrame(index=data.barcodes),
                    var=pd.DataFrame({"gene_symbols": data.symbols}, index=data.gene_ids)
                    ).write_h5ad(folder / "donor1.h5ad")
    h5 = project.raw / "chr21" / "10x_h5"
    h5.mkdir(parents=True)
    shutil.copy(DATA / "10x-v3-chr21" / "filtered_feature_bc_matrix.h5", h5 / "chr21.h5")
    project.write_manifest("  - name: study_a\n  - name: study_b\n  - name: lung\n    format: h5ad\n"
                           "  - name: chr21\n    format: 10x_h5\n")
    return data


def atlas_by_obs_id(uri: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """obs (indexed by obs_id) and the counts as (obs_id, var_id, value), independent of joinid order."""
    with tiledbsoma.Experiment.open(str(uri), context=atlas.context()) as exp:
        obs = exp.obs.read().concat().to_pandas()
        var = exp.ms["RNA"].var.read(column_names=["soma_joinid", "var_id"]).concat().to_pandas()
        x = exp.ms["RNA"].X["raw"].read().tables().concat().to_pandas()
    x["obs_id"] = x["soma_dim_0"].map(obs.set_index("soma_joinid")["obs_id"])
    x["var_id"] = x["soma_dim_1"].map(var.set_index("soma_joinid")["var_id"])
    cells = x[["obs_id", "var_id", "soma_data"]].sort_values(["obs_id", "var_id"]).reset_index(drop=True)
    return obs.drop(columns="soma_joinid").set_index("obs_id").sort_index(), cells


def test_round_trip_on_a_cluster_equals_loky(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    """MTX, h5ad and 10x HDF5 inputs: the atlas Dask builds equals loky's, cell by cell and gene by gene."""
    results = {}
    for executor in ("loky", "dask"):
        project = Project(tmp_path / executor)
        project.add_mtx("study_a", "s1", make_sample(40, 30, seed=1))
        project.add_mtx("study_a", "s2", make_sample(35, 30, seed=2, gene_offset=10))
        project.add_mtx("study_b", "s1", make_sample(30, 25, seed=3, gene_offset=5))
        add_h5ad_and_10x_h5(project)
        extra = ("--scheduler", dask_cluster.address) if executor == "dask" else ()
        result = apply_ok(project, *extra)
        assert "Apply finished: 5 succeeded, 0 failed" in result.stderr
        assert invoke_cli("verify", "--deep", project.manifest).returncode == 0
        results[executor] = atlas_by_obs_id(project.atlas_uri)
    (loky_obs, loky_x), (dask_obs, dask_x) = results["loky"], results["dask"]
    pd.testing.assert_frame_equal(loky_obs, dask_obs)
    pd.testing.assert_frame_equal(loky_x, dask_x)
    assert len(loky_obs) > 1000  # the chr21 sample is in both


def test_round_trip_and_an_add_on_s3_equal_loky(project: Project, tmp_path: Path, s3_server: S3Server,
                                                 monkeypatch: pytest.MonkeyPatch, dask_cluster: DaskCluster) -> None:
    """The cluster's workers read the raw files from the bucket and write the atlas there; it equals the atlas
    loky builds on local paths cell by cell, after the first apply and after an incremental add."""
    s3 = on_s3(tmp_path / "s3", s3_server, monkeypatch)
    cluster = ("--scheduler", dask_cluster.address)
    for step in ("first", "add"):
        if step == "add":
            for p in (project, s3):
                p.add_mtx("study_b", "s2", make_sample(25, 20, seed=12, gene_offset=40))
            s3.upload()
        apply_ok(project, "--executor", "loky")
        done = apply_ok(s3, *cluster)
        assert f"Apply finished: {3 if step == 'first' else 1} succeeded, 0 failed" in done.stderr
        (loky_obs, loky_x), (dask_obs, dask_x) = atlas_by_obs_id(project.atlas_uri), atlas_by_obs_id(s3.atlas_uri)
        pd.testing.assert_frame_equal(loky_obs, dask_obs)
        pd.testing.assert_frame_equal(loky_x, dask_x)
    assert "No changes" in apply_ok(s3, *cluster).stderr
    assert_converged(s3)


def test_h5ad_and_10x_h5_inputs_on_s3_through_the_cluster(tmp_path: Path, s3_server: S3Server,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           dask_cluster: DaskCluster) -> None:
    """The cluster's workers read an h5ad and a Cell Ranger .h5 (real, 1107 cells) from the bucket and write the
    atlas there: each sample equals its input cell by cell and gene by gene. The expected counts are read
    without our readers: the h5ad's from the data written, the .h5's from the MTX folder Cell Ranger wrote
    beside it (the same matrix, tests/data/README.md), and the MTX samples' from the data generated."""
    project = on_s3(tmp_path, s3_server, monkeypatch)
    h5ad = add_h5ad_and_10x_h5(project)
    project.manifest.write_text(re.sub(r"object_store:\n(?:  .*\n)+", "", project.manifest.read_text()))
    project.upload()
    assert {"raw/lung/h5ad/donor1.h5ad", "raw/chr21/10x_h5/chr21.h5"} <= set(project.objects())
    done = apply_ok(project, "--scheduler", dask_cluster.address)
    assert "Apply finished: 5 succeeded, 0 failed" in done.stderr
    assert "executor dask at " + dask_cluster.address in read_text(project, read_log(project))

    mtx = DATA / "10x-v3-chr21" / "filtered_feature_bc_matrix"
    with gzip.open(mtx / "matrix.mtx.gz") as fh:
        chr21 = scipy.io.mmread(fh).T.tocsr()
    with gzip.open(mtx / "barcodes.tsv.gz", "rt") as fh:
        chr21_barcodes = fh.read().split()
    with gzip.open(mtx / "features.tsv.gz", "rt") as fh:
        chr21_genes = [line.split("\t")[0] for line in fh.read().splitlines()]
    expected = {("lung", "donor1"): (h5ad.counts, h5ad.barcodes, h5ad.gene_ids),
                ("chr21", "chr21"): (chr21, chr21_barcodes, chr21_genes)}
    for key, data in project.samples.items():
        expected[tuple(key.split("/"))] = (data.counts, data.barcodes, data.gene_ids)
    for (study, sample), (counts, barcodes, gene_ids) in expected.items():
        adata = read_sample_as_user(project.atlas_uri, study, sample)
        assert_counts_equal(adata, study, sample, counts, barcodes, gene_ids)
    assert chr21.shape == (1107, 507) and chr21.nnz > 0
    assert "No changes" in apply_ok(project, "--scheduler", dask_cluster.address).stderr
    result = run_cli("verify", "--deep", project.manifest)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("store_project", ["local", "s3"], indirect=True)
def test_changes_on_a_cluster(store_project: Project, dask_cluster: DaskCluster) -> None:
    """No-op, add, replace, update, removal and a saved plan, all through the executor block of the manifest;
    on local paths and with everything in a bucket."""
    project = store_project
    project.write_manifest(extra=f"executor:\n  kind: dask\n  address: {dask_cluster.address}\n")
    apply_ok(project)
    assert_converged(project)
    assert "No changes" in apply_ok(project).stderr
    project.add_mtx("study_b", "s2", make_sample(25, 20, seed=12, gene_offset=40))  # add
    project.add_mtx("study_a", "s1", make_sample(45, 30, seed=11))  # replace
    set_cell_type(project, "study_b/s1", "NK cell")  # update
    remove_raw_sample(project, "study_a", "s2")  # remove
    saved = project.root / "plan.json"
    assert invoke_cli("plan", project.manifest, "--out", saved).returncode == 0
    result = invoke_cli("apply", saved, "--allow-delete")
    assert result.returncode == 0, result.stderr
    assert "executor dask at " + dask_cluster.address in read_text(project, read_log(project))
    assert_converged(project, {"study_b/s1": "NK cell"})


def remove_raw_sample(project: Project, study: str, sample: str) -> None:
    """Delete a sample's raw folder (and its objects, for a project in a bucket); upload the other changes."""
    shutil.rmtree(project.raw / study / "mtx" / sample)
    del project.samples[f"{study}/{sample}"]
    if isinstance(project, S3Project):
        client = project.server.client()
        for key in project.server.keys(project.bucket, f"raw/{study}/mtx/{sample}/"):
            client.delete_object(Bucket=project.bucket, Key=key)
        project.upload()


def read_text(project: Project, path: str) -> str:
    """A file of the project, local or in its bucket."""
    if path.startswith("s3://"):
        bucket, key = path.removeprefix("s3://").split("/", 1)
        return project.server.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return Path(path).read_text()


def read_log(project: Project) -> str:
    import json

    logs = f"s3://{project.bucket}/logs" if isinstance(project, S3Project) else str(project.root / "logs")
    return json.loads(read_text(project, f"{logs}/last-apply.json"))["log_file"]


def test_local_cluster_when_no_address_is_given(project: Project) -> None:
    """executor.kind dask without an address: a LocalCluster of `processes` spawned single-threaded workers."""
    project.write_manifest(extra="processes: 2\nexecutor: {kind: dask}\n")
    apply_ok(project)
    assert "executor dask, 2 processes" in Path(read_log(project)).read_text()
    assert_converged(project)


@pytest.mark.parametrize("store_project", ["local", "s3"], indirect=True)
def test_kill_apply_during_ingest_while_the_workers_live_on(store_project: Project, dask_cluster: DaskCluster) -> None:
    project = store_project
    run = start_cli("apply", project.manifest, "--scheduler", dask_cluster.address, env={CRASH_AT: "mid_ingest"})
    try:
        assert run.wait().returncode == -signal.SIGKILL
        assert lock_left(project)
        dask_cluster.wait_idle()
        apply_ok(project, "--scheduler", dask_cluster.address)
        assert read_state(project).orphans == []
        assert_converged(project)
    finally:
        run.kill_session()


def test_a_killed_worker_fails_or_retries_its_sample(project: Project, dask_cluster: DaskCluster) -> None:
    """SIGKILL of a worker process inside an ingest: the scheduler retries the step elsewhere or the sample
    fails (recorded); the next apply converges either way, and no cell is there twice."""
    dask_cluster.arm()
    run = start_cli("apply", project.manifest, "--scheduler", dask_cluster.address)
    try:
        victim = dask_cluster.paused_pids()[0]
        (dask_cluster.pause / "armed").unlink()
        subprocess.run(["kill", "-9", str(victim)], check=True)
        dask_cluster.release()
        done = run.wait()
        assert done.returncode in (0, 1), done.stderr
        if done.returncode == 1:
            assert "worker process died" in done.stderr
        dask_cluster.wait_idle()
        apply_ok(project, "--scheduler", dask_cluster.address)
        assert_converged(project)
    finally:
        run.kill_session()


@pytest.mark.parametrize(("executor", "store_project"), [("loky", "local"), ("dask", "local"), ("dask", "s3")],
                         indirect=["store_project"])
def test_a_dead_applys_step_cannot_write_after_a_new_apply_started(store_project: Project, dask_cluster: DaskCluster,
                                                                   s3_server: S3Server, executor: str) -> None:
    """A step of a killed apply, held before it writes, goes on only after a new apply took the atlas over,
    deleted the dead apply's ranges and re-ingested everything. Without the lease check (the lock file, or on
    S3 the lock object) it would write its cells with a later timestamp than that delete: they would stay, as
    orphans. With it, nothing lands."""
    project = store_project
    run = _apply_held_at("ingest_start", project, dask_cluster, executor)
    try:
        # A worker holds an ingest. While one is in flight the coordinator resizes nothing (apply.allocation),
        # so the kill cannot land inside a resize.
        dask_cluster.paused_pids(at_least=1)
        if executor == "dask":
            # The worker holds a task of that apply: its arguments name the sample, never a credential or the
            # endpoint (the workers have both in their environment).
            specs = dask_cluster.task_arguments()
            assert any(b"study_" in spec for spec in specs)
            secrets = (CREDENTIALS["AWS_SECRET_ACCESS_KEY"], CREDENTIALS["AWS_ACCESS_KEY_ID"], s3_server.endpoint)
            assert not any(secret.encode() in spec for spec in specs for secret in secrets)
        run.proc.send_signal(signal.SIGKILL)
        assert run.wait().returncode == -signal.SIGKILL
        (dask_cluster.pause / "armed").unlink()
        assert {a["kind"] for a in plan_actions(project).values()} <= {"resume", "ingest", "add"}
        apply_ok(project, "--executor", "loky")  # the held step(s) keep a Dask worker busy: use loky
        assert_converged(project)
        _release_held(dask_cluster, executor)
        assert_converged(project)  # exactly the samples, no orphan cell, no stale X entry
    finally:
        run.kill_session()


def _apply_held_at(point: str, project: Project, dask_cluster: DaskCluster, executor: str) -> Background:
    """An apply on the Dask cluster or on loky whose workers stop at the pause `point` (faults.py)."""
    dask_cluster.arm(point)
    if executor == "dask":
        return start_cli("apply", project.manifest, "--scheduler", dask_cluster.address)
    return start_cli("apply", project.manifest, "--processes", "2", env={PAUSE_ENV: f"{point}:{dask_cluster.pause}"})


def _release_held(dask_cluster: DaskCluster, executor: str) -> None:
    """Let the held steps go on, and wait until they have returned."""
    dask_cluster.release()
    if executor == "dask":
        dask_cluster.wait_idle()
    else:
        for pid in dask_cluster.paused_pids():
            _wait_settled(dask_cluster.pause, pid)


def _wait_settled(pause: Path, pid: int, timeout: float = 60) -> None:
    """Until the held loky step has returned: its worker has left the pause and uses no more CPU (it then
    waits for work that never comes, until loky's idle timeout)."""
    import psutil

    deadline = time.monotonic() + timeout
    try:
        proc = psutil.Process(pid)
        while not ((pause / f"resumed-{pid}").exists() and _cpu_still(proc)):
            assert time.monotonic() < deadline, "the held step did not finish"
    except psutil.NoSuchProcess:
        return


def _wait_pending(project: Project, keys: set[str], timeout: float = 120) -> None:
    """Until the state records an obs update under way for each of `keys`."""
    deadline = time.monotonic() + timeout
    while (pending := {k for k, s in read_state(project).samples.items() if s.obs_pending}) != keys:
        assert pending <= keys, pending
        assert time.monotonic() < deadline, f"obs updates on record: {sorted(pending)}, expected {sorted(keys)}"
        time.sleep(0.1)


def _cpu_still(proc) -> bool:
    before = sum(proc.cpu_times()[:2])
    time.sleep(0.5)
    return sum(proc.cpu_times()[:2]) == before


@pytest.mark.parametrize("case", ["unreachable scheduler", "workers too small"])
def test_a_cluster_that_cannot_run_is_one_clear_error_and_writes_nothing(project: Project, case: str) -> None:
    """A scheduler nobody listens at; a LocalCluster whose workers' equal shares of the memory could not hold
    one step (10,000 processes)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    if case == "unreachable scheduler":
        args, expected = ("--scheduler", address), f"cannot reach the Dask scheduler at {address}"
    else:
        args, expected = ("--executor", "dask", "--processes", "10000"), "10000 Dask workers would get"
    result = invoke_cli("apply", project.manifest, *args)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project.root / "atlases").exists() or not any((project.root / "atlases").iterdir())
    assert not (project.root / "logs").exists() and not (project.root / "h5ads").exists()


@pytest.mark.parametrize(("executor", "store_project"), [("loky", "local"), ("dask", "s3")],
                         indirect=["store_project"])
def test_a_dead_applys_obs_update_cannot_outlast_a_new_apply(store_project: Project, dask_cluster: DaskCluster,
                                                            executor: str) -> None:
    """Issue 26: an obs update of a killed apply, held after its lease check and before its write, writes only
    after a new apply took the atlas over. An update is not deleted first, as an ingest's range is: the dead
    apply recorded (and saved) that the update was under way before submitting it, so the new apply writes
    those obs rows again, with a later timestamp, even though the metadata went back to what the atlas held:
    the held write lands under it and reads see the new apply's rows."""
    project = store_project
    apply_ok(project)
    original = {s: (project.raw / s / "cell_metadata" / f"{s}.tsv.gz").read_bytes() for s in ("study_a", "study_b")}
    for key in ("study_a/s1", "study_b/s1"):  # two samples: an update of one small sample runs inline
        set_cell_type(project, key, "zombie")
    if isinstance(project, S3Project):
        project.upload()
    run = _apply_held_at("write_obs_fenced", project, dask_cluster, executor)
    try:
        dask_cluster.paused_pids(at_least=1)
        # Each update is on record before it is submitted: once one is held, the other converts, is put on record
        # and submitted (killing earlier would leave it unconverted and so, once reverted, rightly unchanged).
        _wait_pending(project, {"study_a/s1", "study_b/s1"})
        run.proc.send_signal(signal.SIGKILL)
        assert run.wait().returncode == -signal.SIGKILL
        (dask_cluster.pause / "armed").unlink()
        for study, data in original.items():  # the metadata goes back to what the atlas held
            (project.raw / study / "cell_metadata" / f"{study}.tsv.gz").write_bytes(data)
        if isinstance(project, S3Project):
            project.upload()
        actions = plan_actions(project)
        assert {k: a["kind"] for k, a in actions.items()} == {"study_a/s1": "update", "study_b/s1": "update"}
        apply_ok(project, "--executor", "loky")  # a held step keeps a Dask worker busy: use loky
        assert_converged(project)
        _release_held(dask_cluster, executor)
        assert_converged(project)  # the held writes landed under the new apply's: no "zombie" cell type
        assert not any(s.obs_pending for s in read_state(project).samples.values())
    finally:
        run.kill_session()

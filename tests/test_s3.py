"""Every path of a manifest may be s3://: the same round trips, changes, crash safety, lock and errors
against a real S3 service (moto's server on loopback, tests/s3server.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from conftest import (
    DEFAULT_SCHEMA,
    Project,
    assert_converged,
    genes,
    invoke_cli,
    make_sample,
    run_cli,
    set_cell_type,
    start_cli,
)
from roundtrip import assert_counts_equal, read_sample_as_user
from test_refusals import snapshot
from s3server import CREDENTIALS, S3Server, black_hole
from soma_manifest.faults import ENV as CRASH_AT
from soma_manifest.faults import PAUSE_ENV
from soma_manifest.lock import Holder


class S3Project(Project):
    """A Project whose raw tree, h5ads, logs, atlas and state live in a bucket (or only some of them)."""

    def __init__(self, root: Path, server: S3Server, *, local: tuple[str, ...] = ()) -> None:
        super().__init__(root)
        self.server = server
        self.bucket = server.new_bucket()
        self.local = local  # which of raw/h5ad/logs/atlas stay on local disk

    def where(self, part: str) -> str:
        return str(self.root / part) if part in self.local else f"s3://{self.bucket}/{part}"

    @property
    def atlas_uri(self) -> str:  # type: ignore[override]
        return f"{self.where('atlases')}/atlas"

    @property
    def state_path(self) -> str:  # type: ignore[override]
        return f"{self.where('atlases')}/atlas.state.json"

    def write_manifest(self, studies: str | None = None, schema: Path | str = DEFAULT_SCHEMA,
                       extra: str = "") -> Path:
        names = sorted({k.split("/")[0] for k in self.samples})
        studies = studies or "".join(f"  - name: {n}\n" for n in names)
        self.manifest.write_text(
            "version: 1\n"
            f"atlas:\n  name: atlas\n  storage: {self.where('atlases')}\n"
            f"schema: {schema}\n"
            f"storage:\n  raw: {self.where('raw')}\n  h5ad: {self.where('h5ads')}\n  logs: {self.where('logs')}\n"
            f"object_store:\n  endpoint_url: {self.server.endpoint}\n  region: us-east-1\n"
            f"{extra}studies:\n{studies}")
        return self.manifest

    def upload(self) -> None:
        """Mirror the local raw tree into the bucket (when raw is on S3)."""
        if "raw" not in self.local:
            self.server.upload_tree(self.raw, self.bucket, "raw")

    def objects(self) -> dict[str, str]:
        return self.server.keys(self.bucket)


def _project(tmp_path: Path, server: S3Server, local: tuple[str, ...] = ()) -> S3Project:
    p = S3Project(tmp_path, server, local=local)
    p.add_mtx("study_a", "s1", make_sample(40, 30, seed=1))
    p.add_mtx("study_a", "s2", make_sample(35, 30, seed=2, gene_offset=10))
    p.add_mtx("study_b", "s1", make_sample(30, 25, seed=3, gene_offset=5))
    p.write_manifest()
    p.upload()
    return p


@pytest.fixture
def s3_project(tmp_path: Path, s3_server: S3Server) -> S3Project:
    return _project(tmp_path, s3_server)


def _apply(project: Project, *extra: str) -> None:
    result = invoke_cli("apply", project.manifest, *extra)
    assert result.returncode == 0, result.stderr


def test_lifecycle_on_s3(s3_project: S3Project) -> None:
    """Add, no-op, incremental add, metadata update, replace, saved and stale plans, guarded removal."""
    p = s3_project
    _apply(p)
    assert_converged(p)
    state = json.loads(p.server.client().get_object(Bucket=p.bucket, Key="atlases/atlas.state.json")["Body"].read())
    assert all(f["etag"] for s in state["samples"].values() for f in s["raw_files"]), "S3 stats carry ETags"

    before = p.objects()
    result = invoke_cli("apply", p.manifest)
    assert result.returncode == 0 and "No changes" in result.stderr
    assert p.objects() == before, "a no-op apply wrote an object"

    p.add_mtx("study_b", "s2", make_sample(20, 25, seed=7, gene_offset=40))  # new genes too
    set_cell_type(p, "study_a/s1", "neuron")
    p.add_mtx("study_a", "s2", make_sample(35, 30, seed=22, gene_offset=10))
    set_cell_type(p, "study_a/s1", "neuron")
    p.upload()
    plan = invoke_cli("plan", "--json", p.manifest, "--out", p.root / "plan.json")
    assert plan.returncode == 0, plan.stderr
    kinds = {a["key"]: a["kind"] for a in json.loads(plan.stdout)["actions"]}
    assert kinds == {"study_b/s2": "add", "study_a/s1": "update", "study_a/s2": "replace"}
    _apply_saved = invoke_cli("apply", p.root / "plan.json")
    assert _apply_saved.returncode == 0, _apply_saved.stderr
    assert_converged(p, cell_types={"study_a/s1": "neuron"})
    stale = invoke_cli("apply", p.root / "plan.json")
    assert stale.returncode == 1 and "stale" in stale.stderr

    p.write_manifest("  - name: study_a\n")
    refused = invoke_cli("apply", p.manifest)
    assert refused.returncode == 1 and "--allow-delete" in refused.stderr
    _apply(p, "--allow-delete")
    del p.samples["study_b/s1"], p.samples["study_b/s2"]
    assert_converged(p, cell_types={"study_a/s1": "neuron"})


def test_a_plan_saved_to_s3_is_applied_from_there(s3_project: S3Project) -> None:
    """`plan --out s3://...` stores the plan in the bucket and `apply s3://...` runs it from there, once: the
    same plan is stale afterwards. (The plan is read with the environment's endpoint: the manifest that
    names it is known only from the plan.)"""
    p = s3_project
    uri = f"s3://{p.bucket}/plans/atlas.plan.json"
    saved = run_cli("plan", "atlas.yaml", "--json", "--out", uri, cwd=p.root)
    assert saved.returncode == 0, saved.stderr
    stored = p.server.client().get_object(Bucket=p.bucket, Key="plans/atlas.plan.json")["Body"].read().decode()
    assert stored == saved.stdout and json.loads(stored)["manifest"] == "atlas.yaml"
    assert sorted(path.name for path in p.root.iterdir()) == ["atlas.yaml", "raw"], "the plan went to a local path"

    env = {"AWS_ENDPOINT_URL": p.server.endpoint}
    applied = run_cli("apply", uri, cwd=p.root, env=env)
    assert applied.returncode == 0, applied.stderr
    assert f"Applying the plan saved at {json.loads(stored)['created_at']} ({uri})" in applied.stderr
    assert_converged(p)
    stale = run_cli("apply", uri, cwd=p.root, env=env)
    assert stale.returncode == 1 and "the plan is stale" in stale.stderr, stale.stderr
    missing = run_cli("apply", uri.replace("atlas.plan", "other.plan"), cwd=p.root, env=env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr
    assert f"no saved plan at {uri.replace('atlas.plan', 'other.plan')}" in missing.stderr, missing.stderr


def test_real_data_round_trip_on_s3(tmp_path: Path, s3_server: S3Server) -> None:
    """MTX (Cell Ranger outs/ folder), 10x HDF5 and h5ad inputs read from S3 into an atlas on S3,
    compared cell by cell with the raw files."""
    import anndata
    import h5py
    import pandas as pd
    import scipy.io

    from conftest import DATA

    p = S3Project(tmp_path, s3_server)
    chr21 = DATA / "10x-v3-chr21"
    folder = p.raw / "pbmc" / "mtx" / "chr21" / "outs" / "filtered_feature_bc_matrix"
    folder.mkdir(parents=True)
    for name in ("matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz"):
        (folder / name).write_bytes((chr21 / "filtered_feature_bc_matrix" / name).read_bytes())
    (p.raw / "chr21_h5" / "10x_h5").mkdir(parents=True)
    (p.raw / "chr21_h5" / "10x_h5" / "again.h5").write_bytes((chr21 / "filtered_feature_bc_matrix.h5").read_bytes())
    data = make_sample(30, 20, seed=4)
    (p.raw / "lung" / "h5ad").mkdir(parents=True)
    anndata.AnnData(X=data.counts.astype(np.float32), obs=pd.DataFrame(index=data.barcodes),
                    var=pd.DataFrame(index=data.gene_ids)).write_h5ad(p.raw / "lung" / "h5ad" / "donor1.h5ad")
    p.write_manifest("  - name: pbmc\n  - name: chr21_h5\n    format: 10x_h5\n  - name: lung\n    format: h5ad\n")
    p.upload()
    result = run_cli("apply", p.manifest, "--processes", "2")
    assert result.returncode == 0, result.stderr
    invoke_cli("validate", p.manifest)  # configures this process for the bucket, as any command does

    matrix = sp.csr_matrix(scipy.io.mmread(str(folder / "matrix.mtx.gz")).T)
    features = pd.read_csv(folder / "features.tsv.gz", sep="\t", header=None, dtype=str)
    import gzip

    barcodes = gzip.decompress((folder / "barcodes.tsv.gz").read_bytes()).decode().split()
    got = read_sample_as_user(p.atlas_uri, "pbmc", "chr21")
    assert_counts_equal(got, "pbmc", "chr21", matrix, barcodes, features[0])
    with h5py.File(chr21 / "filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        h5 = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=m["shape"][:]).T.tocsr()
        h5_barcodes = [b.decode() for b in m["barcodes"][:]]
        h5_ids = [g.decode() for g in m["features"]["id"][:]]
    assert_counts_equal(read_sample_as_user(p.atlas_uri, "chr21_h5", "again"), "chr21_h5", "again", h5,
                        h5_barcodes, h5_ids)
    assert_counts_equal(read_sample_as_user(p.atlas_uri, "lung", "donor1"), "lung", "donor1", data.counts,
                        data.barcodes, data.gene_ids)
    verify = run_cli("verify", p.manifest, "--deep")
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize("local", [("atlases",), ("raw", "h5ads", "logs")], ids=["raw-on-s3", "atlas-on-s3"])
def test_mixed_local_and_s3(tmp_path: Path, s3_server: S3Server, local: tuple[str, ...]) -> None:
    p = _project(tmp_path, s3_server, local)
    _apply(p)
    assert_converged(p)
    if "atlases" in local:
        assert (tmp_path / "atlases" / "atlas.state.json").exists()
    else:
        assert "atlases/atlas.state.json" in p.objects()


@pytest.mark.parametrize("point", ["after_create", "mid_ingest"])
def test_kill_on_s3_converges(s3_project: S3Project, point: str) -> None:
    run = start_cli("apply", s3_project.manifest, env={CRASH_AT: point})
    try:
        assert run.wait().returncode == -signal.SIGKILL
    finally:
        run.kill_session()
    _apply(s3_project)  # the dead holder was on this host: its lease is taken over at once
    assert_converged(s3_project)


def _put(p: S3Project, key: str, body: str) -> None:
    p.server.client().put_object(Bucket=p.bucket, Key=key, Body=body.encode())


def test_schema_and_gene_reference_on_s3(s3_project: S3Project) -> None:
    """A schema kept on S3, with a gene reference next to it named relative to it: plan, apply, round trip;
    a saved plan goes stale when the schema or the reference on S3 changes."""
    p = s3_project
    ids, symbols = genes(60)
    reference = "id\tsymbol\n" + "".join(f"{i}\t{s}\n" for i, s in zip(ids, symbols))
    text = DEFAULT_SCHEMA.read_text().replace("universe: union", "universe: union\n  reference: ../refs/genes.tsv")
    _put(p, "config/refs/genes.tsv", reference)
    _put(p, "config/schemas/atlas.yaml", text)
    p.write_manifest(schema=f"s3://{p.bucket}/config/schemas/atlas.yaml")
    _apply(p)
    assert_converged(p)
    state = json.loads(p.server.client().get_object(Bucket=p.bucket, Key="atlases/atlas.state.json")["Body"].read())
    assert all(s["gene_mapping"] for s in state["samples"].values()), "the reference on S3 was not used"

    p.add_mtx("study_b", "s2", make_sample(20, 25, seed=7, gene_offset=30))
    p.upload()
    saved = invoke_cli("plan", p.manifest, "--out", p.root / "plan.json")
    assert saved.returncode == 0, saved.stderr
    for key, changed in (("config/refs/genes.tsv", reference + "ENSG99999999999\tEXTRA\n"),
                         ("config/schemas/atlas.yaml", text.replace('"MT-"', '"MT-", "MTRNR"'))):
        original = reference if key.endswith(".tsv") else text
        _put(p, key, changed)
        stale = invoke_cli("apply", p.root / "plan.json")
        assert stale.returncode == 1 and "stale: the schema changed" in stale.stderr, stale.stderr
        assert f"s3://{p.bucket}/config/schemas/atlas.yaml" in stale.stderr
        _put(p, key, original)
    _apply_saved = invoke_cli("apply", p.root / "plan.json")
    assert _apply_saved.returncode == 0, _apply_saved.stderr
    assert_converged(p)


def test_a_broken_schema_on_s3_is_one_error_naming_its_uri_and_line(s3_project: S3Project) -> None:
    p = s3_project
    uri = f"s3://{p.bucket}/schemas/atlas.yaml"
    text = DEFAULT_SCHEMA.read_text()
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "source: barcode" in row)
    _put(p, "schemas/atlas.yaml", text.replace("source: barcode", "source: barcodes"))
    p.write_manifest(schema=uri)
    _assert_one_clean_error(invoke_cli("plan", p.manifest), f"{p.manifest}:5: schema: {uri}:{line}: obs.")

    p.write_manifest(schema=f"s3://{p.bucket}/schemas/missing.yaml")
    _assert_one_clean_error(invoke_cli("apply", p.manifest), f"s3://{p.bucket}/schemas/missing.yaml: file not found")
    assert not any(k.startswith(("atlases/", "h5ads/", "logs/")) for k in p.objects()), "a failed command wrote"


def _run_logs(p: S3Project) -> dict[str, str]:
    client = p.server.client()
    return {k: client.get_object(Bucket=p.bucket, Key=k)["Body"].read().decode()
            for k in p.objects() if k.startswith("logs/apply-")}


def test_a_killed_apply_leaves_its_run_log_on_s3(s3_project: S3Project, tmp_path: Path) -> None:
    """The run log on S3 is stored while apply runs, not only at its end: an apply held at its first ingest
    stores the log of its conversions, and once killed with -9 (at mid_ingest) that log stays."""
    p = s3_project
    pause = tmp_path / "pause"
    pause.mkdir()
    (pause / "armed").touch()
    run = start_cli("apply", p.manifest, "--processes", "1",
                    env={CRASH_AT: "mid_ingest", PAUSE_ENV: f"ingest_start:{pause}"})
    try:
        deadline = time.monotonic() + 120
        while not any(pause.glob("paused-*")):
            assert run.proc.poll() is None and time.monotonic() < deadline, "the apply never reached an ingest"
            time.sleep(0.1)
        state = json.loads(p.server.client().get_object(Bucket=p.bucket, Key="atlases/atlas.state.json")["Body"]
                           .read())
        converted = [k for k, s in state["samples"].items() if s["h5ad"]]
        assert converted, "no sample was converted before the first ingest"
        logs: dict[str, str] = {}
        while not (logs and all(f"{k}: converted" in text for k in converted for text in logs.values())):
            assert time.monotonic() < deadline, f"the run log on S3 never named {converted}: {logs}"
            time.sleep(0.2)
            logs = _run_logs(p)
        (pause / "armed").unlink()
        (pause / "release").touch()
        assert run.wait().returncode == -signal.SIGKILL
    finally:
        run.kill_session()
    [(key, text)] = _run_logs(p).items()
    assert f"apply {p.manifest}" in text and all(f"{k}: converted" in text for k in converted), text

    state = json.loads(p.server.client().get_object(Bucket=p.bucket, Key="atlases/atlas.state.json")["Body"].read())
    left = [k for k, s in state["samples"].items() if s["ingest"] != "done"]
    _apply(p)  # its log is stored in full when it ends
    [finished] = [text for k, text in _run_logs(p).items() if k != key]
    assert left and all(f"{k}: ingest done" in finished for k in left), finished


def _lock_object(p: S3Project, *, expires: float, host: str = "build-7.example") -> Holder:
    holder = Holder(4242, host, "2026-01-02T03:04:05+00:00", "soma-manifest apply elsewhere.yaml", 1.0,
                    "e" * 32, expires)
    p.server.client().put_object(Bucket=p.bucket, Key="atlases/atlas.state.json.lock",
                                 Body=json.dumps(asdict(holder)).encode())
    return holder


def test_lease_refused_taken_over_after_expiry_and_unlocked(s3_project: S3Project) -> None:
    p = s3_project
    live = _lock_object(p, expires=time.time() + 600)
    refused = invoke_cli("apply", p.manifest)
    assert refused.returncode == 1
    assert "locked by pid 4242 on build-7.example" in refused.stderr and "unlock" in refused.stderr
    assert "atlases/atlas.state.json" not in p.objects(), "a refused apply wrote something"

    unlocked = invoke_cli("unlock", p.manifest)
    assert unlocked.returncode == 0 and live.host in unlocked.stderr
    assert "atlases/atlas.state.json.lock" not in p.objects()

    _lock_object(p, expires=time.time() - 1)  # a holder on another host that stopped renewing
    _apply(p)
    assert "atlases/atlas.state.json.lock" not in p.objects()
    assert_converged(p)


def test_second_apply_on_s3_names_the_running_one(s3_project: S3Project) -> None:
    first = start_cli("apply", s3_project.manifest)
    try:
        deadline = time.monotonic() + 120
        while "atlases/atlas.state.json.lock" not in s3_project.objects() and first.proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = invoke_cli("apply", s3_project.manifest)
        if first.proc.poll() is None:
            assert second.returncode == 1, second.stderr
            assert f"pid {first.proc.pid} on {socket.gethostname()}" in second.stderr
            assert "lease until" in second.stderr
        assert first.wait(300).returncode == 0
    finally:
        first.kill_session()


def _assert_one_clean_error(result, *needles: str) -> None:
    text = result.stdout + result.stderr
    assert result.returncode == 1, text
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    for secret in (CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "hunter2-secret-value"):
        assert secret not in text


def test_bad_s3_inputs_fail_clearly_and_write_nothing(s3_project: S3Project, s3_server: S3Server) -> None:
    p = s3_project
    text = p.manifest.read_text()

    p.manifest.write_text(text.replace(f"s3://{p.bucket}/atlases", "s3://no-such-bucket-x/atlases"))
    _assert_one_clean_error(run_cli("apply", p.manifest), "s3://no-such-bucket-x",
                            "bucket no-such-bucket-x does not exist")

    p.manifest.write_text(text.replace(f"s3://{p.bucket}/raw", f"s3://{p.bucket}/nothing-here"))
    _assert_one_clean_error(invoke_cli("plan", p.manifest), f"s3://{p.bucket}/nothing-here/study_a", "not found")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    p.manifest.write_text(text.replace(s3_server.endpoint, f"http://127.0.0.1:{dead}"))
    started = time.monotonic()
    _assert_one_clean_error(run_cli("plan", p.manifest), f"cannot reach the S3 endpoint http://127.0.0.1:{dead}")
    assert time.monotonic() - started < 60  # generous: the machine is shared; the bound is ~30 s

    p.manifest.write_text(text.replace("  region: us-east-1\n",
                                       "  region: us-east-1\n  aws_secret_access_key: hunter2-secret-value\n"))
    _assert_one_clean_error(invoke_cli("plan", p.manifest), f"{p.manifest}:", "looks like a credential")

    p.manifest.write_text(text)
    s3_server.enforce_auth(True)
    try:
        _assert_one_clean_error(invoke_cli("plan", p.manifest), "access denied", f"s3://{p.bucket}")
    finally:
        s3_server.enforce_auth(False)
    assert not any(k.startswith(("atlases/", "h5ads/", "logs/")) for k in p.objects()), "a failed command wrote"


def _open_atlas_via_tiledb(p: S3Project, endpoints: tuple[str, ...], outcome: dict) -> None:
    """TileDB's own timeouts (storage.tiledb_vfs_config, in every atlas.context()): opening the atlas fails, per
    endpoint its seconds."""
    import tiledbsoma

    from soma_manifest import atlas, storage

    for endpoint in endpoints:
        storage.configure(storage.StoreSettings(endpoint, "us-east-1"))
        started = time.monotonic()
        try:
            tiledbsoma.Experiment.open(f"s3://{p.bucket}/atlases/atlas", context=atlas.context())
            outcome[endpoint] = AssertionError("TileDB opened an atlas at a black hole")
        except tiledbsoma.SOMAError as exc:
            outcome[endpoint] = time.monotonic() - started if "Timeout was reached" in str(exc) else exc


def test_a_black_holed_endpoint_fails_in_time_naming_it(tmp_path: Path, s3_server: S3Server) -> None:
    """plan and apply against an endpoint that accepts connections and never answers, and against one that
    never accepts them: one error naming the endpoint, well before any hang, nothing written. With everything
    on S3 the first request is s3fs'; with only the atlas there (state, lock, logs local) it is the atlas'
    lookup, which must not take an unreachable store for a missing atlas. TileDB's own timeouts too."""
    everything = _project(tmp_path / "all", s3_server)
    atlas_only = _project(tmp_path / "atlas", s3_server, local=("raw", "h5ads", "logs"))
    atlas_only.manifest.write_text(atlas_only.manifest.read_text().replace(
        "  logs:", f"  state: {atlas_only.root / 'atlas.state.json'}\n  logs:"))
    texts = {p.root.name: p.manifest.read_text() for p in (everything, atlas_only)}
    before = snapshot(atlas_only.root)
    with black_hole(accepts=True) as answers_never, black_hole(accepts=False) as accepts_never:
        runs = {}
        for endpoint in (answers_never, accepts_never):
            port = endpoint.rsplit(":", 1)[1]
            for p in (everything, atlas_only):
                manifest = p.root / f"{port}.yaml"
                manifest.write_text(texts[p.root.name].replace(s3_server.endpoint, endpoint)
                                    .replace("atlas.state.json", f"{port}.state.json"))
                for command in ("plan", "apply"):
                    runs[(command, p.root.name, endpoint)] = start_cli(command, manifest)
        tiledb: dict[str, float | BaseException] = {}
        probe = threading.Thread(target=_open_atlas_via_tiledb, args=(everything, (answers_never, accepts_never),
                                                                     tiledb))
        started = time.monotonic()
        probe.start()
        took = {}
        try:
            while len(took) < len(runs):
                assert time.monotonic() - started < 90, f"still running: {set(runs) - set(took)}"  # bound ~30 s
                took.update({k: time.monotonic() - started for k, run in runs.items()
                             if k not in took and run.proc.poll() is not None})
                time.sleep(0.1)
            for key, run in runs.items():
                print(f"{' '.join(key)}: {took[key]:.1f} s")
                _assert_one_clean_error(run.wait(), f"cannot reach the S3 endpoint {key[2]}")
        finally:
            for run in runs.values():
                run.kill_session()
            probe.join()
        for endpoint, outcome in tiledb.items():
            print(f"TileDB open {endpoint}: {outcome}")
            assert isinstance(outcome, float) and outcome < 90, outcome
    for p in (everything, atlas_only):
        for name in p.root.glob("*.yaml"):
            if name != p.manifest:
                name.unlink()
    assert snapshot(atlas_only.root) == before, "a failed command wrote a local file"
    assert not any(k.startswith(("atlases/", "h5ads/", "logs/")) for p in (everything, atlas_only)
                   for k in p.objects()), "a failed command wrote"


@contextmanager
def _tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `mount` (root ignores file modes, not a mount's limits); skips where
    mounting is not permitted."""
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A tiny tmpfs, filled up: every write to it fails with ENOSPC."""
    with _tmpfs(tmp_path / "full", "64k") as mount:
        (mount / "atlases").mkdir()
        try:
            with open(mount / "filler", "wb", buffering=0) as fh:
                while True:
                    fh.write(b"x" * 4096)
        except OSError:
            pass
        yield mount


def test_disk_full_is_one_clear_error(project: Project, full_disk: Path) -> None:
    """The state, the lock and the logs on a full filesystem: one error naming the path and the cause."""
    text = project.manifest.read_text().replace("storage: atlases", f"storage: {full_disk / 'atlases'}")
    project.manifest.write_text(text)
    result = invoke_cli("apply", project.manifest)
    _assert_one_clean_error(result, str(full_disk / "atlases" / "atlas.state.json.lock"), "disk full")


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs holding empty atlas, state, h5ad and logs folders, remounted read-only: every write fails
    with EROFS."""
    with _tmpfs(tmp_path / "ro", "1m") as mount:
        for name in ("storage", "state", "h5ad", "logs"):
            (mount / name).mkdir()
        if subprocess.run(["mount", "-o", "remount,ro", str(mount)]).returncode != 0:
            pytest.skip("cannot remount a tmpfs read-only here")
        yield mount


@pytest.mark.parametrize("key", ["atlas.storage", "storage.state", "storage.h5ad", "storage.logs"])
def test_a_read_only_filesystem_is_one_clear_error(project: Project, read_only_mount: Path, key: str) -> None:
    """A folder of the manifest on a read-only mount: one error naming the path; nothing else changed."""
    where = read_only_mount / key.split(".")[1]
    text = project.manifest.read_text()
    if key == "storage.state":
        text = text.replace("  logs: logs\n", f"  logs: logs\n  state: {where / 'atlas.state.json'}\n")
    else:
        old = {"atlas.storage": "storage: atlases", "storage.h5ad": "h5ad: h5ads", "storage.logs": "logs: logs"}[key]
        text = text.replace(old, f"{old.split(':')[0]}: {where}")
    project.manifest.write_text(text)
    before = snapshot(project.root)
    _assert_one_clean_error(invoke_cli("apply", project.manifest), str(where), "read-only filesystem")
    assert snapshot(project.root) == before


def test_running_apply_renews_its_lease(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder pushes its expiry forward while it runs; its epoch stays current until it lets go."""
    from soma_manifest import lock, storage
    from soma_manifest.errors import LockError

    storage.configure(storage.StoreSettings(s3_server.endpoint, "us-east-1"))
    monkeypatch.setattr(lock, "LEASE_SECONDS", 0.6)
    path = storage.Location(f"s3://{s3_server.new_bucket()}/atlas.state.json.lock")
    with lock.AtlasLock(path) as held:
        first = lock.read_holder(path)
        deadline = time.monotonic() + 30
        while lock.read_holder(path).expires == first.expires:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)
        assert lock.read_holder(path).epoch == held.epoch and held.lease.is_current()
        monkeypatch.setattr(lock, "_is_alive", lambda holder: holder.expires > time.time())  # as from another host
        with pytest.raises(LockError, match="locked by"):
            with lock.AtlasLock(path):
                pass
    assert lock.read_holder(path) is None and not held.lease.is_current()

"""Shared fixtures: synthetic Cell Ranger trees with colliding barcodes, manifests, a CLI runner."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from soma_manifest import atlas
from soma_manifest.state import State, load_state

# the moto S3 server fixture; the `dask_cluster` fixture: a real scheduler and two workers on 127.0.0.1
pytest_plugins = ("s3server", "daskcluster")

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
DEFAULT_SCHEMA = REPO / "schemas" / "default.yaml"
CELL_TYPES = ("T cell", "B cell", "monocyte")


@dataclass
class SampleData:
    counts: sp.csr_matrix  # cells x genes
    barcodes: list[str]
    gene_ids: list[str]
    symbols: list[str]


def barcodes(n: int, seed: int = 0) -> list[str]:
    """10x-style barcodes from one small whitelist, so different samples share barcodes."""
    rng = np.random.default_rng(seed)
    whitelist = ["".join(rng.choice(list("ACGT"), 16)) + "-1" for _ in range(max(2 * n, 64))]
    # The first half of every sample comes from the same fixed whitelist: collisions by construction.
    shared = ["".join(np.random.default_rng(12345 + i).choice(list("ACGT"), 16)) + "-1" for i in range(n // 2)]
    own = [b for b in whitelist if b not in shared][: n - len(shared)]
    return shared + own


def genes(n: int, offset: int = 0) -> tuple[list[str], list[str]]:
    ids = [f"ENSG{offset + i:011d}" for i in range(n)]
    names = []
    for i in range(n):
        k = offset + i
        names.append("MT-CO1" if k % 17 == 0 else "RPL3" if k % 13 == 0 else f"GENE{k}")
    return ids, names


def make_sample(n_cells: int = 40, n_genes: int = 30, seed: int = 0, gene_offset: int = 0,
                density: float = 0.3) -> SampleData:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(2.0, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < density)
    ids, names = genes(n_genes, gene_offset)
    return SampleData(sp.csr_matrix(dense.astype(np.int64)), barcodes(n_cells, seed), ids, names)


def write_mtx(folder: Path, data: SampleData, *, v2: bool = False) -> None:
    """A Cell Ranger v3 (or v2) folder: features x cells matrix, gzipped."""
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(data.counts.T), field="integer")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(data.barcodes) + "\n")
    name = "genes.tsv.gz" if v2 else "features.tsv.gz"
    with gzip.open(folder / name, "wt") as fh:
        for gid, sym in zip(data.gene_ids, data.symbols):
            fh.write(f"{gid}\t{sym}" + ("" if v2 else "\tGene Expression") + "\n")


def write_metadata(raw: Path, study: str, samples: dict[str, SampleData], *, protocol: str = "10x 3' v3") -> None:
    cell = raw / study / "cell_metadata"
    cell.mkdir(parents=True, exist_ok=True)
    lines = ["barcode\tsample_name\tcell_type"]
    for name, data in samples.items():
        lines += [f"{b}\t{name}\t{CELL_TYPES[i % 3]}" for i, b in enumerate(data.barcodes)]
    with gzip.open(cell / f"{study}.tsv.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    smeta = raw / study / "sample_metadata"
    smeta.mkdir(parents=True, exist_ok=True)
    rows = ["sample_name\tscrnaseq_protocol"] + [f"{s}\t{protocol}" for s in samples]
    (smeta / f"{study}.tsv").write_text("\n".join(rows) + "\n")


@dataclass
class Project:
    """A tmp project: raw tree, manifest, and the data each sample was generated from."""

    root: Path
    samples: dict[str, SampleData] = field(default_factory=dict)  # key "<study>/<sample>"

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def manifest(self) -> Path:
        return self.root / "atlas.yaml"

    @property
    def atlas_uri(self) -> Path:
        return self.root / "atlases" / "atlas"

    @property
    def state_path(self) -> Path:
        return self.root / "atlases" / "atlas.state.json"

    def add_mtx(self, study: str, sample: str, data: SampleData, *, v2: bool = False) -> None:
        write_mtx(self.raw / study / "mtx" / sample, data, v2=v2)
        self.samples[f"{study}/{sample}"] = data
        self.write_study_metadata(study)

    def write_study_metadata(self, study: str, **kwargs) -> None:
        mine = {k.split("/", 1)[1]: v for k, v in self.samples.items() if k.startswith(study + "/")}
        write_metadata(self.raw, study, mine, **kwargs)

    def write_manifest(self, studies: str | None = None, schema: Path = DEFAULT_SCHEMA, extra: str = "") -> Path:
        if studies is None:
            names = sorted({k.split("/")[0] for k in self.samples})
            studies = "".join(f"  - name: {n}\n" for n in names)
        self.manifest.write_text(
            "version: 1\n"
            "atlas:\n  name: atlas\n  storage: atlases\n"
            f"schema: {schema}\n"
            "storage:\n  raw: raw\n  h5ad: h5ads\n  logs: logs\n"
            f"{extra}"
            f"studies:\n{studies}"
        )
        return self.manifest


def three_samples(root: Path) -> Project:
    """Two studies, three samples, colliding barcodes, partly disjoint genes (also for module-scoped fixtures)."""
    p = Project(root)
    p.add_mtx("study_a", "s1", make_sample(40, 30, seed=1))
    p.add_mtx("study_a", "s2", make_sample(35, 30, seed=2, gene_offset=10))
    p.add_mtx("study_b", "s1", make_sample(30, 25, seed=3, gene_offset=5))
    p.write_manifest()
    return p


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """Two studies, three samples, colliding barcodes, partly disjoint genes."""
    return three_samples(tmp_path)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    """The real entry point, in a subprocess, as a user or CI runs it."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "soma_manifest", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# --- change, crash, lock, bad-input and state tests ----------------------------------------------

def invoke_cli(*args: str | Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI inside the test process: the same code as `run_cli` without the interpreter start-up,
    and the loky workers stay warm between calls. Never with SOMA_MANIFEST_CRASH_AT (it would kill pytest)."""
    from typer.testing import CliRunner

    from soma_manifest.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], env={"NO_COLOR": "1", **(env or {})})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess([str(a) for a in args], result.exit_code, result.stdout, result.stderr)


def apply_ok(project: Project, *extra: str) -> subprocess.CompletedProcess:
    """`apply` that must succeed."""
    result = invoke_cli("apply", project.manifest, *extra)
    assert result.returncode == 0, result.stderr
    return result


def plan_actions(project: Project) -> dict[str, dict]:
    """`plan --json` as {sample key: action}."""
    result = invoke_cli("plan", "--json", project.manifest)
    assert result.returncode == 0, result.stderr
    return {a["key"]: a for a in json.loads(result.stdout)["actions"]}


def read_state(project: Project) -> State | None:
    return load_state(project.state_path)


@pytest.fixture
def applied(project: Project) -> Project:
    """The `project`, applied once."""
    apply_ok(project)
    return project


def set_cell_type(project: Project, key: str, cell_type: str) -> None:
    """Give every cell of one sample another cell type in its study's cell metadata."""
    study, sample = key.split("/")
    path = project.raw / study / "cell_metadata" / f"{study}.tsv.gz"
    with gzip.open(path, "rt") as fh:
        header, *rows = fh.read().splitlines()
    fields = (row.split("\t") for row in rows)
    rows = [f"{b}\t{s}\t{cell_type if s == sample else t}" for b, s, t in fields]
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join([header, *rows]) + "\n")


def assert_atlas_holds(uri: Path, samples: dict[str, SampleData], cell_types: dict[str, str] | None = None) -> None:
    """Read the atlas with tiledbsoma alone, as a user would: it holds exactly these samples' counts
    (cells by obs_id, genes by var_id), every cell once, no X entry outside them, and the cell types
    of `write_metadata` (or the one given per sample)."""
    import tiledbsoma as soma

    cell_types = cell_types or {}
    with soma.Experiment.open(str(uri), context=atlas.context()) as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "obs_id"]).concat().to_pandas()
        assert obs["obs_id"].is_unique, "an obs id appears twice"
        assert len(obs) == sum(d.counts.shape[0] for d in samples.values()), "cells missing or extra"
        for key, data in samples.items():
            study, sample = key.split("/")
            query = exp.axis_query("RNA", obs_query=soma.AxisQuery(
                value_filter=f"sample_name == '{sample}' and study_name == '{study}'"))
            got = query.to_anndata(X_name="raw", obs_id_name="obs_id", var_id_name="var_id")
            ids = [f"{key}/{b}" for b in data.barcodes]
            assert sorted(got.obs_names) == sorted(ids), f"{key}: cells differ"
            got = got[ids]
            columns = got.var_names.get_indexer(data.gene_ids)
            assert (columns >= 0).all(), f"{key}: genes missing from var"
            x = sp.csr_matrix(got.X)
            assert x.nnz == data.counts.nnz, f"{key}: {x.nnz} entries, expected {data.counts.nnz}"
            assert (x[:, columns] != data.counts).nnz == 0, f"{key}: counts differ"
            expected = [cell_types.get(key, CELL_TYPES[i % 3]) for i in range(len(ids))]
            assert got.obs["cell_type"].astype(str).tolist() == expected, f"{key}: cell types differ"
        entries = exp.ms["RNA"].X["raw"].read().tables().concat()
    assert len(entries) == sum(d.counts.nnz for d in samples.values()), "stale or orphan X entries"
    assert np.isin(entries["soma_dim_0"].to_numpy(), obs["soma_joinid"].to_numpy()).all(), "X entries without a cell"


def assert_converged(project: Project, cell_types: dict[str, str] | None = None) -> None:
    """Nothing left to do, `verify --deep` is clean and the atlas holds exactly `project.samples`."""
    result = invoke_cli("plan", "--detailed-exitcode", project.manifest)
    assert result.returncode == 0, result.stdout + result.stderr
    # The real entry point, in a process of its own, as users and CI run it. (It was moved here when
    # in-process verifies crashed the test process; the cause was TileDB's, see atlas.READER_SETTINGS.)
    result = run_cli("verify", "--deep", project.manifest)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_atlas_holds(project.atlas_uri, project.samples, cell_types)


@dataclass
class Background:
    """A CLI run in the background, in a session of its own. Output goes to files, not pipes: the loky
    workers of an apply killed with -9 keep running a while, and would hold pipes open."""

    proc: subprocess.Popen
    out: Path
    err: Path

    def wait(self, timeout: float = 120) -> subprocess.CompletedProcess:
        code = self.proc.wait(timeout)
        return subprocess.CompletedProcess(self.proc.args, code, self.out.read_text(), self.err.read_text())

    def kill_session(self) -> None:
        """SIGKILL whatever is left of the session (orphaned workers); remove the output files."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        shutil.rmtree(self.out.parent, ignore_errors=True)


def start_cli(*args: str | Path, env: dict | None = None) -> Background:
    """The real entry point, started in the background; end it with `kill_session`."""
    folder = Path(tempfile.mkdtemp(prefix="cli-"))
    out, err = folder / "stdout", folder / "stderr"
    with open(out, "a") as out_fh, open(err, "a") as err_fh:
        proc = subprocess.Popen([sys.executable, "-m", "soma_manifest", *map(str, args)],
                                env={**os.environ, "NO_COLOR": "1", **(env or {})}, stdout=out_fh, stderr=err_fh,
                                text=True, start_new_session=True)
    return Background(proc, out, err)


@pytest.fixture
def own_schema(project: Project) -> Path:
    """A copy of the default schema the project's manifest points at, applied once."""
    path = project.root / "schema.yaml"
    shutil.copy(DEFAULT_SCHEMA, path)
    project.write_manifest(schema=path)
    apply_ok(project)
    return path


def edit(path: Path, old: str, new: str) -> None:
    """Replace `old` (which must be there) with `new` in the text file at `path`."""
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))

"""Shared fixtures: synthetic Cell Ranger trees with colliding barcodes, manifests, a CLI runner."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

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


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """Two studies, three samples, colliding barcodes, partly disjoint genes."""
    p = Project(tmp_path)
    p.add_mtx("study_a", "s1", make_sample(40, 30, seed=1))
    p.add_mtx("study_a", "s2", make_sample(35, 30, seed=2, gene_offset=10))
    p.add_mtx("study_b", "s1", make_sample(30, 25, seed=3, gene_offset=5))
    p.write_manifest()
    return p


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    """The real entry point, in a subprocess, as a user or CI runs it."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "soma_manifest", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)

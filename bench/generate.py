"""Seeded generator of benchmark data: the reference raw layout (MTX) and h5ad copies.

    python bench/generate.py OUT --preset small|full [--samples N --cells N --genes N
                                                     --nnz-per-cell N --seed S --processes P]

Writes, for every sample ``S`` of study ``T`` (samples are split between ``study_a`` and
``study_b``):

    OUT/raw/T/mtx/S/{matrix.mtx.gz, barcodes.tsv.gz, features.tsv.gz}   Cell Ranger layout
    OUT/raw/T/cell_metadata/T.tsv.gz      barcode, sample_name, cell_type
    OUT/raw/T/sample_metadata/T.tsv.gz    sample_name, scrnaseq_protocol
    OUT/h5ad_input/T__S.h5ad              CSR int32 X, obs id "T/S/barcode", var id = gene id
    OUT/generated.json                    what was generated (the cache key for run.py)

Counts are multinomial draws from per-cell-type gene profiles (a few genes, MT- and
ribosomal ones, dominate), with a per-cell number of detected genes that varies around
the preset's mean. Barcodes are drawn from one shared whitelist, so they collide across
samples as real 10x barcodes do; gene symbols repeat a few times with distinct ids, as in
real Cell Ranger feature files. The same seed gives the same data.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import process_pool  # noqa: E402

GENERATED_JSON = "generated.json"
STUDIES = ("study_a", "study_b")
PROTOCOLS = ("10x 3' v3", "10x 5' v2")
CELL_TYPES = {  # name -> mean fraction of cells
    "T cell": 0.42,
    "monocyte": 0.20,
    "B cell": 0.12,
    "NK cell": 0.10,
    "dendritic cell": 0.05,
    "platelet": 0.04,
    "erythrocyte": 0.07,
}
WHITELIST_SIZE = 737_280  # as 10x v2; samples of thousands of cells share some barcodes
CELLS_PER_BLOCK = 1_000  # bounds a worker's memory while drawing counts
MTX_COMMENT = 'metadata_json: {"software_version": "cellranger-7.1.0", "format_version": 2}'

MT_GENES = (
    "MT-ND1 MT-ND2 MT-CO1 MT-CO2 MT-ATP8 MT-ATP6 MT-CO3 MT-ND3 MT-ND4L MT-ND4 MT-ND5 MT-ND6 MT-CYB"
).split()
RIBO_GENES = tuple(
    [f"RPL{n}" for n in (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 18, 19, 21, 22, 23, 24)]
    + [f"RPL{n}" for n in (26, 27, 29, 30, 31, 32, 34, 35, 36, 37, 38, 39, 41)]
    + ["RPL7A", "RPL10A", "RPL13A", "RPL18A", "RPL23A", "RPL27A", "RPL35A", "RPL36A", "RPLP0"]
    + ["RPLP1", "RPLP2", "RPSA", "RPS2", "RPS3", "RPS3A", "RPS4X", "RPS4Y1", "RPS5", "RPS6"]
    + [f"RPS{n}" for n in (7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24)]
    + ["RPS15A", "RPS25", "RPS26", "RPS27", "RPS27A", "RPS28", "RPS29"]
)
KNOWN_GENES = (
    "ACTB GAPDH B2M MALAT1 TMSB4X FTL FTH1 EEF1A1 TPT1 CD3E CD3D CD3G CD4 CD8A CD8B IL7R CCR7 "
    "LEF1 TCF7 SELL GZMA GZMB GZMK GNLY NKG7 PRF1 KLRD1 KLRB1 NCAM1 FCGR3A CD14 LYZ S100A8 "
    "S100A9 CST3 FCER1A CLEC10A CD1C ITGAX MS4A1 CD79A CD79B CD19 IGHM IGKC JCHAIN PPBP PF4 "
    "HBB HBA1 HBA2 MKI67 TOP2A FOXP3 IL2RA CTLA4 PTPRC HLA-DRA HLA-DRB1 HLA-A HLA-B HLA-C"
).split()
SYNTHETIC_FAMILIES = (  # template, range of each number
    ("ZNF{}", (1, 900)), ("SLC{}A{}", (1, 60), (1, 20)), ("TMEM{}", (1, 270)),
    ("FAM{}A", (1, 230)), ("CCDC{}", (1, 190)), ("KIAA{:04d}", (100, 2100)),
    ("LINC{:05d}", (1, 3000)), ("C{}orf{}", (1, 23), (1, 200)), ("ANKRD{}", (1, 66)),
    ("AC{:06d}.{}", (1, 300_000), (1, 5)), ("AL{:06d}.{}", (1, 300_000), (1, 5)),
    ("SNORA{}", (1, 81)), ("MIR{}HG", (1, 900)),
)
MT_FRACTION, RIBO_FRACTION = 0.05, 0.25  # of all UMIs, on average


@dataclass(frozen=True)
class Preset:
    """Data shape: samples x cells per sample x genes, mean detected genes per cell."""

    name: str
    samples: int
    cells: int
    genes: int
    nnz_per_cell: int


PRESETS = {
    "full": Preset("full", samples=16, cells=5_000, genes=20_000, nnz_per_cell=1_450),
    "small": Preset("small", samples=4, cells=1_000, genes=5_000, nnz_per_cell=500),
}


@dataclass(frozen=True)
class SampleInfo:
    """One generated sample and where its files are."""

    study: str
    sample: str
    n_cells: int
    nnz: int
    total_counts: int
    mtx_dir: str
    h5ad: str


@dataclass(frozen=True)
class GeneratedData:
    """What ``generate`` wrote; saved as OUT/generated.json."""

    out_dir: str
    preset: Preset
    seed: int
    n_genes: int
    samples: tuple[SampleInfo, ...]
    colliding_barcodes: int
    seconds: float

    @property
    def total_cells(self) -> int:
        return sum(s.n_cells for s in self.samples)

    @property
    def total_nnz(self) -> int:
        return sum(s.nnz for s in self.samples)

    @property
    def h5ads(self) -> list[str]:
        return [s.h5ad for s in self.samples]

    def save(self) -> None:
        doc = asdict(self) | {"total_cells": self.total_cells, "total_nnz": self.total_nnz}
        (Path(self.out_dir) / GENERATED_JSON).write_text(json.dumps(doc, indent=2))

    @classmethod
    def load(cls, out_dir: Path) -> GeneratedData:
        doc = json.loads((out_dir / GENERATED_JSON).read_text())
        return cls(
            out_dir=doc["out_dir"],
            preset=Preset(**doc["preset"]),
            seed=doc["seed"],
            n_genes=doc["n_genes"],
            samples=tuple(SampleInfo(**s) for s in doc["samples"]),
            colliding_barcodes=doc["colliding_barcodes"],
            seconds=doc["seconds"],
        )


@dataclass(frozen=True)
class SampleTask:
    """Everything a worker needs to draw and write one sample (picklable, a few MB)."""

    study: str
    sample: str
    seed: np.random.SeedSequence
    barcodes: np.ndarray  # str, sorted
    cell_type_codes: np.ndarray  # int8 index into CELL_TYPES
    gene_ids: np.ndarray
    gene_symbols: np.ndarray
    type_cdfs: np.ndarray  # (n_types, genes) cumulative gene probabilities
    type_curves: np.ndarray  # (n_types, 2, k): library size -> expected detected genes
    nnz_per_cell: float  # mean for this sample (preset mean x sample depth)
    out_dir: Path


# ---------------------------------------------------------------- genes


def _synthetic_symbol(rng: np.random.Generator) -> str:
    template, *ranges = SYNTHETIC_FAMILIES[rng.integers(len(SYNTHETIC_FAMILIES))]
    return template.format(*(int(rng.integers(lo, hi)) for lo, hi in ranges))


def make_genes(rng: np.random.Generator, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """Ensembl-style ids and symbols; MT- genes in one block near the end, as in GRCh38
    feature files; about 24 repeated symbols per 33,539 genes (as in a real file)."""
    curated = list(dict.fromkeys((*RIBO_GENES, *KNOWN_GENES)))[: max(0, n_genes - len(MT_GENES))]
    symbols: list[str] = list(curated)
    seen = set(symbols) | set(MT_GENES)
    while len(symbols) < n_genes - len(MT_GENES):
        name = _synthetic_symbol(rng)
        if name not in seen:
            seen.add(name)
            symbols.append(name)
    order = rng.permutation(len(symbols))
    others = np.asarray(symbols, dtype=object)[order]
    n_dups = max(3, round(24 * n_genes / 33_539))
    synthetic_positions = np.flatnonzero(order >= len(curated))
    picks = rng.choice(synthetic_positions, size=2 * n_dups, replace=False)
    others[picks[:n_dups]] = others[picks[n_dups:]]  # same symbol, distinct ids
    cut = int(len(others) * 0.985)
    ordered = np.concatenate([others[:cut], np.asarray(MT_GENES, dtype=object), others[cut:]])
    numbers = rng.choice(np.arange(3_000, 300_000), size=n_genes, replace=False)
    ids = np.asarray([f"ENSG{n:011d}" for n in numbers], dtype=object)
    return ids, ordered[:n_genes]


def make_profiles(
    rng: np.random.Generator, symbols: np.ndarray, n_types: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell-type gene CDFs and library-size -> detected-genes curves.

    The curve uses the Poisson approximation E[detected] = sum_j 1 - exp(-L p_j) and lets a
    worker pick each cell's library size L for the number of genes it should detect.
    """
    base = np.exp(rng.normal(0.0, 1.8, symbols.size))
    for group, fraction in ((np.isin(symbols, MT_GENES), MT_FRACTION),
                            (np.isin(symbols, RIBO_GENES), RIBO_FRACTION)):
        if group.any():
            base[group] *= fraction / base[group].sum() * base[~group].sum() / (1 - fraction)
    sizes = np.geomspace(1.0, 2e6, 400)
    cdfs, curves = [], []
    for _ in range(n_types):
        weights = base * np.exp(rng.normal(0.0, 0.6, symbols.size))
        p = weights / weights.sum()
        cdf = np.cumsum(p)
        cdfs.append(cdf / cdf[-1])
        detected = np.array([(-np.expm1(-size * p)).sum() for size in sizes])
        curves.append(np.stack([detected, sizes]))
    return np.stack(cdfs), np.stack(curves)


# ---------------------------------------------------------------- barcodes and cells


def make_barcodes(rng: np.random.Generator, n_samples: int, n_cells: int) -> list[np.ndarray]:
    """Sorted 10x-style barcodes per sample, drawn from one shared whitelist."""
    size = max(WHITELIST_SIZE, n_cells)
    letters = np.frombuffer(b"ACGT", dtype="S1")
    kmers = letters[rng.integers(0, 4, size=(int(size * 1.01) + 16, 16))].view("S16").ravel()
    whitelist = np.unique(kmers)[:size]
    rng.shuffle(whitelist)
    picked = [np.sort(rng.choice(whitelist, size=n_cells, replace=False)) for _ in range(n_samples)]
    if n_samples > 1 and count_collisions(picked) == 0:  # tiny custom shapes: force one
        picked[1][0] = picked[0][0]
        picked[1].sort()
    return [np.char.add(p.astype(str), "-1") for p in picked]


def count_collisions(barcodes: list[np.ndarray]) -> int:
    """Number of distinct barcodes used by more than one sample."""
    values, counts = np.unique(np.concatenate(barcodes), return_counts=True)
    return int((counts > 1).sum())


def draw_cell_types(rng: np.random.Generator, n_cells: int) -> np.ndarray:
    """Cell-type codes with sample-to-sample variation in composition."""
    fractions = rng.dirichlet(np.asarray(list(CELL_TYPES.values())) * 50.0)
    return rng.choice(len(CELL_TYPES), size=n_cells, p=fractions).astype(np.int8)


# ---------------------------------------------------------------- counts


def draw_counts(task: SampleTask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (data int32, indices int32, indptr int64) cells x genes, columns sorted per row."""
    rng = np.random.default_rng(task.seed)
    n_cells, n_genes = task.barcodes.size, task.type_cdfs.shape[1]
    sigma = 0.4
    target = rng.lognormal(np.log(task.nnz_per_cell) - sigma**2 / 2, sigma, n_cells)
    target = np.clip(target, 0.15 * task.nnz_per_cell, 0.8 * n_genes)
    library = np.empty(n_cells, dtype=np.int64)
    for t, (detected, sizes) in enumerate(task.type_curves):
        mask = task.cell_type_codes == t
        library[mask] = np.interp(target[mask], detected, sizes).round().astype(np.int64) + 1
    data, indices, row_nnz = [], [], []
    for start in range(0, n_cells, CELLS_PER_BLOCK):
        stop = min(start + CELLS_PER_BLOCK, n_cells)
        keys = [
            _draw_block_keys(rng, task, library, start, stop, t) for t in range(len(task.type_cdfs))
        ]
        uniq, counts = np.unique(np.concatenate(keys), return_counts=True)
        indices.append((uniq % n_genes).astype(np.int32))
        data.append(counts.astype(np.int32))
        row_nnz.append(np.bincount(uniq // n_genes, minlength=stop - start))
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(row_nnz))]).astype(np.int64)
    return np.concatenate(data), np.concatenate(indices), indptr


def _draw_block_keys(
    rng: np.random.Generator, task: SampleTask, library: np.ndarray, start: int, stop: int, t: int
) -> np.ndarray:
    """Keys ``local_cell * genes + gene`` of all UMIs drawn for type-``t`` cells in a block."""
    cells = np.flatnonzero(task.cell_type_codes[start:stop] == t)
    sizes = library[start:stop][cells]
    genes = np.searchsorted(task.type_cdfs[t], rng.random(int(sizes.sum())), side="right")
    genes = np.minimum(genes, task.type_cdfs.shape[1] - 1)
    return np.repeat(cells.astype(np.int64), sizes) * task.type_cdfs.shape[1] + genes


# ---------------------------------------------------------------- writers


def _write_lines(path: Path, lines: list[str] | np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path, "wb", compresslevel=6, mtime=0) as out:
        out.write(("\n".join(lines) + "\n").encode())


def write_mtx_sample(task: SampleTask, csr: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Path:
    """Cell Ranger layout: matrix.mtx.gz is features x cells, one column per barcode."""
    import fast_matrix_market as fmm
    import scipy.sparse as sp

    data, indices, indptr = csr
    shape = (task.gene_ids.size, task.barcodes.size)
    by_cell = sp.csc_matrix((data, indices, indptr), shape=shape)  # = CSR cells x genes, .T
    mtx_dir = task.out_dir / "raw" / task.study / "mtx" / task.sample
    mtx_dir.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(mtx_dir / "matrix.mtx.gz", "wb", compresslevel=1, mtime=0) as out:
        fmm.mmwrite(out, by_cell, comment=MTX_COMMENT, symmetry="general")
    _write_lines(mtx_dir / "barcodes.tsv.gz", task.barcodes)
    features = [f"{i}\t{s}\tGene Expression" for i, s in zip(task.gene_ids, task.gene_symbols)]
    _write_lines(mtx_dir / "features.tsv.gz", features)
    return mtx_dir


def write_h5ad_sample(task: SampleTask, csr: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Path:
    """CSR int32 cells x genes; obs id ``study/sample/barcode``; all obs columns strings."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    data, indices, indptr = csr
    n = task.barcodes.size
    obs = pd.DataFrame(
        {
            "barcode": task.barcodes.astype(object),
            "sample_name": [task.sample] * n,
            "study_name": [task.study] * n,
            "cell_type": np.asarray(list(CELL_TYPES), dtype=object)[task.cell_type_codes],
        },
        index=pd.Index([f"{task.study}/{task.sample}/{b}" for b in task.barcodes]),
    )
    var = pd.DataFrame({"gene_symbol": task.gene_symbols}, index=pd.Index(task.gene_ids))
    X = sp.csr_matrix((data, indices, indptr), shape=(n, task.gene_ids.size))
    path = task.out_dir / "h5ad_input" / f"{task.study}__{task.sample}.h5ad"
    path.parent.mkdir(parents=True, exist_ok=True)
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(path, convert_strings_to_categoricals=False)
    return path


def build_sample(task: SampleTask) -> SampleInfo:
    """Worker: draw one sample's counts and write its MTX directory and its h5ad."""
    csr = draw_counts(task)
    mtx_dir = write_mtx_sample(task, csr)
    h5ad = write_h5ad_sample(task, csr)
    return SampleInfo(
        study=task.study,
        sample=task.sample,
        n_cells=int(task.barcodes.size),
        nnz=int(csr[0].size),
        total_counts=int(csr[0].sum(dtype=np.int64)),
        mtx_dir=str(mtx_dir),
        h5ad=str(h5ad),
    )


def write_study_metadata(out_dir: Path, tasks: list[SampleTask]) -> None:
    """cell_metadata (barcode, sample_name, cell_type) and sample_metadata per study."""
    types = np.asarray(list(CELL_TYPES), dtype=object)
    for study in sorted({t.study for t in tasks}):
        mine = [t for t in tasks if t.study == study]
        cells = ["barcode\tsample_name\tcell_type"] + [
            f"{b}\t{t.sample}\t{c}" for t in mine for b, c in zip(t.barcodes, types[t.cell_type_codes])
        ]
        _write_lines(out_dir / "raw" / study / "cell_metadata" / f"{study}.tsv.gz", cells)
        samples = ["sample_name\tscrnaseq_protocol"] + [
            f"{t.sample}\t{PROTOCOLS[i % len(PROTOCOLS)]}" for i, t in enumerate(mine)
        ]
        _write_lines(out_dir / "raw" / study / "sample_metadata" / f"{study}.tsv.gz", samples)


# ---------------------------------------------------------------- entry points


def plan_samples(out_dir: Path, preset: Preset, seed: int) -> tuple[list[SampleTask], int]:
    """Draw everything shared between samples; return one task per sample and the number
    of barcodes that occur in more than one sample."""
    seeds = np.random.SeedSequence(seed).spawn(preset.samples + 1)
    rng = np.random.default_rng(seeds[0])
    gene_ids, gene_symbols = make_genes(rng, preset.genes)
    cdfs, curves = make_profiles(rng, gene_symbols, len(CELL_TYPES))
    barcodes = make_barcodes(rng, preset.samples, preset.cells)
    collisions = count_collisions(barcodes)
    if preset.samples > 1 and collisions == 0:
        raise AssertionError("generator bug: no barcode collides across samples")
    depths = rng.lognormal(0.0, 0.15, preset.samples)  # sequencing depth varies by sample
    depths /= depths.mean()
    per_study = -(-preset.samples // len(STUDIES))
    tasks = [
        SampleTask(
            study=STUDIES[i // per_study],
            sample=f"S{i + 1:02d}",
            seed=seeds[i + 1],
            barcodes=barcodes[i],
            cell_type_codes=draw_cell_types(rng, preset.cells),
            gene_ids=gene_ids,
            gene_symbols=gene_symbols,
            type_cdfs=cdfs,
            type_curves=curves,
            nnz_per_cell=preset.nnz_per_cell * depths[i],
            out_dir=out_dir,
        )
        for i in range(preset.samples)
    ]
    return tasks, collisions


def generate(out_dir: Path, preset: Preset, seed: int = 0, processes: int = 2) -> GeneratedData:
    """Generate ``preset`` under ``out_dir`` (raw/ and h5ad_input/) and save generated.json."""
    start = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    tasks, collisions = plan_samples(out_dir, preset, seed)
    write_study_metadata(out_dir, tasks)
    with process_pool(processes) as pool:
        samples = tuple(pool.map(build_sample, tasks))
    result = GeneratedData(
        out_dir=str(out_dir),
        preset=preset,
        seed=seed,
        n_genes=preset.genes,
        samples=samples,
        colliding_barcodes=collisions,
        seconds=round(time.perf_counter() - start, 2),
    )
    result.save()
    return result


def preset_from_args(args: argparse.Namespace) -> Preset:
    """The named preset with any of --samples/--cells/--genes/--nnz-per-cell applied."""
    preset = PRESETS[args.preset]
    overrides = {
        k: v
        for k in ("samples", "cells", "genes", "nnz_per_cell")
        if (v := getattr(args, k, None)) is not None
    }
    return replace(preset, name="custom", **overrides) if overrides else preset


def add_preset_args(parser: argparse.ArgumentParser) -> None:
    """The shape options shared by generate.py and run.py."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--samples", type=int)
    parser.add_argument("--cells", type=int, help="cells per sample")
    parser.add_argument("--genes", type=int)
    parser.add_argument("--nnz-per-cell", type=int)
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    add_preset_args(parser)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    data = generate(args.out, preset_from_args(args), seed=args.seed, processes=args.processes)
    print(
        f"{len(data.samples)} samples, {data.total_cells:,} cells, {data.n_genes:,} genes, "
        f"{data.total_nnz:,} nnz ({data.total_nnz / data.total_cells:.0f}/cell), "
        f"{data.colliding_barcodes:,} barcodes shared between samples, {data.seconds:.1f} s "
        f"-> {data.out_dir}"
    )


if __name__ == "__main__":
    main()

"""Lay out the demo raw tree from the real Cell Ranger outputs shipped in tests/data.

    python manifests/make_demo_data.py demo_work

Builds demo_work/raw (read by manifests/demo.yaml): three studies in two formats, metadata
tables, a Cell Ranger `outs/` folder, antibody features, and colliding barcodes (the same
chr21 cells appear as an MTX sample and as an HDF5 sample).
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
CELL_TYPES = ("T cell", "B cell", "monocyte", "NK cell")


def build(root: Path) -> Path:
    raw = root / "raw"
    if raw.exists():
        shutil.rmtree(raw)
    chr21 = DATA / "10x-v3-chr21"
    pbmc = DATA / "10x-v3-pbmc-protein" / "filtered_feature_bc_matrix"
    seurat = DATA / "10x-v2-seurat"
    _copy_dir(chr21 / "filtered_feature_bc_matrix", raw / "pbmc" / "mtx" / "chr21" / "outs" / "filtered_feature_bc_matrix")
    _copy_dir(pbmc, raw / "pbmc" / "mtx" / "protein")
    _copy_dir(seurat, raw / "seurat" / "mtx" / "v2_sample")
    (raw / "chr21_h5" / "10x_h5").mkdir(parents=True)
    shutil.copy(chr21 / "filtered_feature_bc_matrix.h5", raw / "chr21_h5" / "10x_h5" / "chr21_again.h5")
    _cell_metadata(raw, "pbmc", {"chr21": chr21 / "filtered_feature_bc_matrix" / "barcodes.tsv.gz",
                                 "protein": pbmc / "barcodes.tsv.gz"})
    _sample_metadata(raw, "pbmc", {"chr21": "10x 3' v3", "protein": "10x 3' v3 + CITE-seq"})
    _sample_metadata(raw, "seurat", {"v2_sample": "10x 3' v2"})
    return raw


def _copy_dir(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)


def _barcodes(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return [line.strip() for line in fh if line.strip()]


def _cell_metadata(raw: Path, study: str, samples: dict[str, Path]) -> None:
    folder = raw / study / "cell_metadata"
    folder.mkdir(parents=True)
    lines = ["barcode\tsample_name\tcell_type"]
    for sample, barcodes in samples.items():
        lines += [f"{b}\t{sample}\t{CELL_TYPES[i % len(CELL_TYPES)]}" for i, b in enumerate(_barcodes(barcodes))]
    with gzip.open(folder / f"{study}.tsv.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")


def _sample_metadata(raw: Path, study: str, protocols: dict[str, str]) -> None:
    folder = raw / study / "sample_metadata"
    folder.mkdir(parents=True)
    rows = ["sample_name\tscrnaseq_protocol"] + [f"{s}\t{p}" for s, p in protocols.items()]
    (folder / f"{study}.tsv").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_work")
    print(f"demo raw data laid out in {build(target)}")

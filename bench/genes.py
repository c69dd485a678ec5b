"""Gene harmonization figures: var rows and repeated symbols before/after a gene reference, and the
cost of mapping one sample.

    .venv/bin/python bench/genes.py [--cells 1000] [--repeat 5]

1. Mixed real inputs (as tests/test_genes.py builds them from tests/data/10x-v3-chr21): the Cell
   Ranger sample (Ensembl ids), an h5ad with NCBI GeneIDs/newer symbols, and an h5ad with mouse-style
   symbols (a study with `organism: mus_musculus`), applied into one atlas without and one with the
   reference tests/data/genes-chr21.tsv.gz. Counted from the atlas' var: rows, and symbols (upper
   case) that appear under two or more var ids.
2. Mapping cost: a generated reference of 33,538 genes (Cell Ranger's GRCh38 size) with alias ids and
   symbols, and a sample of 33,538 features (ids with version suffixes, alias ids, lower-case symbols,
   alias symbols, unmapped) x `--cells` cells: median time of `genes.map_features` and of
   `genes.harmonize` (mapping plus summing the counts onto genes), and the one-off reference parse.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import DEFAULT_SCHEMA, Project, invoke_cli  # noqa: E402
from test_genes import CHR21, REFERENCE, _ncbi_sample, _write_h5ad  # noqa: E402

from soma_manifest import genes  # noqa: E402
from soma_manifest.readers import read_mtx_dir  # noqa: E402

N_GENES = 33_538


def var_figures(root: Path, reference: bool) -> tuple[int, int]:
    import tiledbsoma as soma

    project = Project(root)
    shutil.copytree(CHR21, project.raw / "cr" / "mtx" / "c1")
    _ncbi_sample(project.raw)
    real = read_mtx_dir(CHR21)
    title = [s.capitalize() for s in real.feature_names]
    _write_h5ad(project.raw / "mouse" / "h5ad" / "m1.h5ad", real.counts, real.barcodes, title, title)
    schema = root / "schema.yaml"
    text = DEFAULT_SCHEMA.read_text()
    if reference:
        shutil.copy(REFERENCE, root / "genes.tsv.gz")
        text = text.replace("universe: union", "universe: union\n  reference: genes.tsv.gz")
    schema.write_text(text.replace("version: 1\n", "version: 1\norganism: homo_sapiens\n"))
    project.write_manifest("  - name: cr\n  - name: ncbi\n    format: h5ad\n"
                           "  - name: mouse\n    format: h5ad\n    organism: mus_musculus\n", schema=schema)
    result = invoke_cli("apply", project.manifest)
    assert result.returncode == 0, result.stderr
    with soma.Experiment.open(str(project.atlas_uri)) as exp:
        var = exp.ms["RNA"].var.read().concat().to_pandas()
    ids_per_symbol = var.groupby(var["gene_symbol"].str.upper())["var_id"].nunique()
    return len(var), int((ids_per_symbol >= 2).sum())


def mapping_cost(folder: Path, n_cells: int, repeat: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    ids = np.array([f"ENSG{i:011d}" for i in range(N_GENES)], dtype=object)
    symbols = np.array([f"GENE{i}" for i in range(N_GENES)], dtype=object)
    lines = ["id\tsymbol\talias_ids\talias_symbols"] + [
        f"{ids[i]}\t{symbols[i]}\tGeneID:{100000 + i}\tOLD{i};PREV{i}" for i in range(N_GENES)]
    path = folder / "reference.tsv.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    start = time.perf_counter()
    reference = genes.load_reference(str(path), digest)
    parse = time.perf_counter() - start
    # The sample: 60% versioned ids, 15% alias ids, 15% lower-case symbols, 5% alias symbols, 5% unknown.
    kind = rng.choice(5, size=N_GENES, p=[0.6, 0.15, 0.15, 0.05, 0.05])
    f_ids = np.array([[f"{ids[i]}.7", f"GeneID:{100000 + i}", symbols[i].lower(), f"OLD{i}", f"NEW{i}"][k]
                      for i, k in enumerate(kind)], dtype=object)
    f_symbols = np.array([[symbols[i], symbols[i], symbols[i].lower(), f"PREV{i}", f"NEW{i}"][k]
                          for i, k in enumerate(kind)], dtype=object)
    counts = sp.random(n_cells, N_GENES, density=0.05, format="csr", random_state=0,
                       data_rvs=lambda n: rng.integers(1, 20, n)).astype(np.int32)

    def median(fn) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    report = genes.harmonize(reference, counts, f_ids, f_symbols, f_ids, "drop", "bench/s")[3]
    return {"parse_ms": parse * 1e3,
            "map_ms": median(lambda: genes.map_features(reference, f_ids, f_symbols)) * 1e3,
            "harmonize_ms": median(lambda: genes.harmonize(reference, counts, f_ids, f_symbols, f_ids,
                                                           "drop", "bench/s")) * 1e3,
            "nnz": counts.nnz, "report": report.text()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for reference in (False, True):
            rows, repeated = var_figures(Path(tmp) / ("with" if reference else "without"), reference)
            print(f"{'with' if reference else 'without'} reference: {rows} var rows, "
                  f"{repeated} symbols under two or more var ids")
        cost = mapping_cost(Path(tmp), args.cells, args.repeat)
    print(f"mapping a {N_GENES:,}-feature sample ({args.cells:,} cells, {cost['nnz']:,} nnz): "
          f"map_features {cost['map_ms']:.1f} ms, harmonize {cost['harmonize_ms']:.1f} ms (median of "
          f"{args.repeat}); reference parse (once per process) {cost['parse_ms']:.0f} ms")
    print(f"  {cost['report']}")


if __name__ == "__main__":
    main()

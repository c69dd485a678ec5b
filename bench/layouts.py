"""Compare X layouts: write time, one-gene and one-cell read times, size.

    python bench/layouts.py SAMPLES CELLS NNZ_PER_CELL [LAYOUT,...]   # e.g. 4 5000 1450

Writes random counts (20,000 genes) into one SparseNDArray per layout under /tmp/perf/ (scratch),
then reads 10 frequent genes over all cells and 10 cells over all genes.
"""
import sys, time, shutil
from pathlib import Path
import numpy as np, pyarrow as pa, scipy.sparse as sp
import tiledbsoma as soma

N_SAMPLES, CELLS, GENES, PER_CELL = int(sys.argv[1]), int(sys.argv[2]), 20000, int(sys.argv[3])
rng = np.random.default_rng(0)
p = rng.gamma(0.3, size=GENES); p /= p.sum()
samples = []
for s in range(N_SAMPLES):
    indptr = [0]; idx = []
    for c in range(CELLS):
        g = np.unique(rng.choice(GENES, PER_CELL, p=p))
        idx.append(g); indptr.append(indptr[-1] + len(g))
    idx = np.concatenate(idx).astype(np.int32)
    data = rng.integers(1, 20, len(idx)).astype(np.int32)
    samples.append(sp.csr_matrix((data, idx, np.array(indptr)), shape=(CELLS, GENES)))
nnz = sum(m.nnz for m in samples)
print("nnz", nnz, flush=True)

LAYOUTS = {
  "cells_wide": ({"tiledb": {"create": {"dims": {"soma_dim_1": {"tile": 1 << 20}}}}}, "csr", False),
  "genes_default_sorted": (None, "csr", True),
  "genes_colmajor_t1": ({"tiledb": {"create": {"dims": {"soma_dim_1": {"tile": 1}}, "cell_order": "col-major", "tile_order": "col-major"}}}, "csc", False),
  "genes_colmajor_t1_cap10k": ({"tiledb": {"create": {"capacity": 10000, "dims": {"soma_dim_1": {"tile": 1}}, "cell_order": "col-major", "tile_order": "col-major"}}}, "csc", False),
  "genes_colmajor_t1_cap25k": ({"tiledb": {"create": {"capacity": 25000, "dims": {"soma_dim_1": {"tile": 1}}, "cell_order": "col-major", "tile_order": "col-major"}}}, "csc", False),
  "genes_colmajor_wide0": ({"tiledb": {"create": {"dims": {"soma_dim_0": {"tile": 1<<30}, "soma_dim_1": {"tile": 1}}, "cell_order": "col-major", "tile_order": "col-major"}}}, "csc", False),
}
only = sys.argv[4].split(",") if len(sys.argv) > 4 else list(LAYOUTS)
res = {}
for name in only:
    cfg, order, sort = LAYOUTS[name]
    uri = f"/tmp/perf/x_{name}"
    shutil.rmtree(uri, ignore_errors=True)
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    n_obs = N_SAMPLES * CELLS
    soma.SparseNDArray.create(uri, type=pa.int32(), shape=(n_obs, GENES), platform_config=cfg).close()
    t = time.perf_counter()
    with soma.SparseNDArray.open(uri, "w") as X:
        for s, m in enumerate(samples):
            start = s * CELLS
            if order == "csr":
                r = np.repeat(np.arange(CELLS, dtype=np.int64), np.diff(m.indptr)) + start
                X.write(pa.table({"soma_dim_0": r, "soma_dim_1": m.indices.astype(np.int64), "soma_data": m.data}),
                        platform_config={"tiledb": {"write": {"sort_coords": sort}}})
            else:
                c = m.tocsc()
                cols = np.repeat(np.arange(GENES, dtype=np.int64), np.diff(c.indptr))
                X.write(pa.table({"soma_dim_0": c.indices.astype(np.int64) + start, "soma_dim_1": cols, "soma_data": c.data}),
                        platform_config={"tiledb": {"write": {"sort_coords": False}}})
    wt = time.perf_counter() - t
    r2 = np.random.default_rng(1); genes = r2.choice(np.argsort(-p)[:2000], 10, replace=False)
    with soma.SparseNDArray.open(uri) as X:
        X.read(coords=(slice(None), [int(genes[0])])).tables().concat()
        t = time.perf_counter()
        n = 0
        for g in genes:
            n += len(X.read(coords=(slice(None), [int(g)])).tables().concat())
        gt = (time.perf_counter() - t) / len(genes)
        cells = r2.choice(n_obs, 10, replace=False)
        t = time.perf_counter()
        for c in cells:
            X.read(coords=([int(c)],)).tables().concat()
        ct = (time.perf_counter() - t) / len(cells)
    size = sum(f.stat().st_size for f in Path(uri).rglob("*") if f.is_file())
    res[name] = dict(write_s=round(wt, 2), gene_read_ms=round(gt * 1e3, 1), cell_read_ms=round(ct * 1e3, 1), nnz_per_gene=n // len(genes), MB=round(size / 1e6, 1))
    print(name, res[name], flush=True)

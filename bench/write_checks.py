"""What TileDB's write-time checks cost a global-order X write, next to the checks ingest makes instead.

    .venv/bin/python bench/write_checks.py [H5AD] [--repeat 3]

H5AD defaults to the full preset's first input (bench/out/full/h5ad_input/, made by `bench/run.py --preset
full`). Its X (CSR) is written, in one process, into a fresh int32 SparseNDArray with soma-manifest's
cell-optimized layout (the gene axis in one tile) in 5M-entry row chunks with `sort_coords=False`, once per
TileDB setting below and repetition (alternating, fresh array each time). The last row times ingest's own
chunk builder, atlas.chunks.read_chunk, which checks instead of TileDB (column bounds, scipy's canonical-format test
after the sort), over the same chunks. Prints one table, time ÷ the write with every check on first; the
fastest of the repetitions.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma as soma

from soma_manifest.atlas.chunks import read_chunk, row_chunks
from soma_manifest.atlas import TRUSTED_ORDER

REPO = Path(__file__).resolve().parent.parent
CHUNK_NNZ = 5_000_000
SETTINGS = {
    "TileDB's checks on (its default)": {},
    **{f"{name} off": {name: value} for name, value in TRUSTED_ORDER.items()},
    "all three off (soma-manifest's X writes)": TRUSTED_ORDER,
}


def write_seconds(csr: sp.csr_matrix, config: dict[str, str], folder: Path) -> float:
    uri = str(folder / "x")
    shutil.rmtree(uri, ignore_errors=True)
    context = soma.SOMATileDBContext(tiledb_config=config)
    soma.SparseNDArray.create(uri, type=pa.int32(), shape=csr.shape, context=context,
                              platform_config={"tiledb": {"create": {"dims": {"soma_dim_1": {"tile": 1 << 20}}}}})
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    cols = csr.indices.astype(np.int64)
    start = time.perf_counter()
    with soma.SparseNDArray.open(uri, "w", context=context) as x:
        for a in range(0, csr.nnz, CHUNK_NNZ):
            b = min(a + CHUNK_NNZ, csr.nnz)
            x.write(pa.table({"soma_dim_0": rows[a:b], "soma_dim_1": cols[a:b], "soma_data": csr.data[a:b]}),
                    platform_config={"tiledb": {"write": {"sort_coords": False}}})
    return time.perf_counter() - start


def own_check_seconds(csr: sp.csr_matrix, path: str) -> float:
    """ingest's own chunk builder and its checks (atlas.chunks.read_chunk), over the sample in 5M-entry row chunks,
    with an identity gene mapping."""
    x, columns = {"data": csr.data, "indices": csr.indices}, np.arange(csr.shape[1], dtype=np.int64)
    start = time.perf_counter()
    for lo, hi in row_chunks(csr.indptr, CHUNK_NNZ):
        read_chunk(x, csr.indptr, lo, hi, columns, csr.shape[1], path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("h5ad", nargs="?", type=Path,
                        default=REPO / "bench" / "out" / "full" / "h5ad_input" / "study_a__S01.h5ad")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with h5py.File(args.h5ad) as f:
        x = f["X"]
        csr = sp.csr_matrix((x["data"][:], x["indices"][:], x["indptr"][:]), shape=tuple(x.attrs["shape"]))
    times: dict[str, list[float]] = {name: [] for name in [*SETTINGS, "own"]}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.repeat):
            for name, config in SETTINGS.items():
                times[name].append(write_seconds(csr, config, Path(scratch)))
            times["own"].append(own_check_seconds(csr, str(args.h5ad)))
    base = min(times["TileDB's checks on (its default)"])
    print(f"{args.h5ad.name}: {csr.shape[0]:,} cells x {csr.shape[1]:,} genes, {csr.nnz:,} entries, "
          f"fastest of {args.repeat}\n")
    print("| write | ÷ checks on | seconds |\n|---|---|---|")
    for name in SETTINGS:
        print(f"| {name} | {min(times[name]) / base:.2f}x | {min(times[name]):.3f} |")
    print(f"| (ingest's chunk builder with its checks, same chunks, no write) | {min(times['own']) / base:.2f}x | "
          f"{min(times['own']):.3f} |")


if __name__ == "__main__":
    main()

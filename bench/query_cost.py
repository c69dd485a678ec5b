"""Query cost of the atlas layout: one sample's cells as AnnData, and one gene across all cells.

    .venv/bin/python bench/query_cost.py [--preset full]

Compares the atlases that bench/run.py left in bench/out/<preset>/: soma-manifest's (X with
the whole gene axis in one tile, written in global order) and tiledbsoma's default layout.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import tiledbsoma

REPO = Path(__file__).resolve().parent.parent


def timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(uri: Path, sample: str, gene_joinid: int) -> tuple[float, float, int, int]:
    with tiledbsoma.Experiment.open(str(uri)) as exp:
        def one_sample():
            q = exp.axis_query("RNA", obs_query=tiledbsoma.AxisQuery(value_filter=f"sample_name == '{sample}'"))
            return q.to_anndata(X_name="raw")

        def one_gene():
            q = exp.axis_query("RNA", var_query=tiledbsoma.AxisQuery(coords=(gene_joinid,)))
            return q.X("raw").tables().concat()

        cells = one_sample().n_obs
        entries = len(one_gene())
        return timed(one_sample), timed(one_gene), cells, entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full")
    args = parser.parse_args()
    out = REPO / "bench" / "out" / args.preset
    layouts = {"soma-manifest (gene axis in one tile)": out / "atlas" / "bench_atlas",
               "tiledbsoma default": out / "atlas_default"}
    with tiledbsoma.Experiment.open(str(layouts["soma-manifest (gene axis in one tile)"])) as exp:
        sample = exp.obs.read(column_names=["sample_name"]).concat()["sample_name"][0].as_py()
        var_ids = exp.ms["RNA"].var.read(column_names=["var_id"]).concat()["var_id"].to_pylist()
        gene = var_ids[len(var_ids) // 2]  # the same gene, looked up by id in each atlas
    print(f"| layout ({args.preset} preset) | one sample as AnnData s | one gene, all cells s | cells | gene entries |")
    print("|---|---|---|---|---|")
    for name, uri in layouts.items():
        if not uri.exists():
            print(f"| {name} | missing: run bench/run.py --preset {args.preset} first | | | |")
            continue
        with tiledbsoma.Experiment.open(str(uri)) as exp:
            var = exp.ms["RNA"].var.read(column_names=["soma_joinid", "var_id"],
                                         value_filter=f"var_id == '{gene}'").concat()
        s, g, cells, entries = measure(uri, sample, int(var["soma_joinid"][0].as_py()))
        print(f"| {name} | {s:.2f} | {g:.2f} | {cells:,} | {entries:,} |")


if __name__ == "__main__":
    main()

"""Compaction: fragments, query time and the incremental-add ratio before and after `soma-manifest compact`.

    .venv/bin/python bench/compaction.py [--base-samples 100] [--base-cells 10000] [--applies 20]
                                         [--new-cells 5000] [--out bench/out/compaction]

Builds a base atlas of base-samples x base-cells cells (few genes per cell, as bench/incremental.py)
in `--applies` applies, with automatic compaction off, so that fragments pile up as they do over months
of applies. Then, on that atlas: fragments per array, one-sample and one-gene query time, and the time
to add one new sample (new-cells cells, ~1,450 genes per cell); then `compact`; then the same
figures again, adding a second new sample of the same shape. The reference is adding the first new
sample to an empty atlas. Apply times are `total_seconds` of the run report (logs/last-apply.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from incremental import CLI, apply, prepare  # noqa: E402
from query_cost import measure  # noqa: E402


def manifest(folder: Path, raw: Path, selection: dict[str, list[str]]) -> Path:
    """A manifest of the given samples per study, with automatic compaction off."""
    path = folder / "atlas.yaml"
    studies = "".join(f"  - name: {study}\n    samples: {json.dumps(samples)}\n"
                      for study, samples in selection.items() if samples)
    path.write_text("version: 1\natlas: {name: atlas, storage: atlas}\n"
                    f"schema: {REPO / 'schemas' / 'default.yaml'}\n"
                    f"storage: {{raw: {raw}, h5ad: h5ad, logs: logs}}\n"
                    "compaction: {after_fragments: false}\n"
                    f"studies:\n{studies}")
    return path


def figures(path: Path) -> dict:
    """Fragments per array and the two query times of the atlas behind a manifest."""
    sys.path.insert(0, str(REPO))
    from soma_manifest import atlas

    uri = path.parent / "atlas" / "atlas"
    counts = {name: atlas.fragment_count(u) for name, u in atlas.array_uris(str(uri)).items()}
    with atlas.open_experiment(str(uri)) as exp:
        sample = exp.obs.read(column_names=["sample_name"]).concat()["sample_name"][0].as_py()
        n_var = exp.ms["RNA"].var.count
    one_sample, one_gene, cells, _ = measure(uri, sample, n_var // 2)
    return {"fragments": counts, "one_sample_s": one_sample, "one_gene_s": one_gene, "sample_cells": cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-samples", type=int, default=100)
    parser.add_argument("--base-cells", type=int, default=10_000)
    parser.add_argument("--applies", type=int, default=20)
    parser.add_argument("--new-cells", type=int, default=5_000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "compaction")
    args = parser.parse_args()
    out = args.out.resolve()
    raw, base_data = prepare(out, args.base_samples, args.base_cells, new_samples=2, new_cells=args.new_cells)
    base = {study.name: sorted(p.name for p in (study / "mtx").iterdir())
            for study in sorted(base_data.iterdir()) if (study / "mtx").is_dir()}

    empty = out / "empty_atlas"
    shutil.rmtree(empty, ignore_errors=True)
    empty.mkdir()
    add_empty = apply(manifest(empty, raw, {"incoming": ["new_0"]}))

    folder = out / "big_atlas"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    keys = [(study, s) for study, samples in base.items() for s in samples]
    start = time.perf_counter()
    for k in range(1, args.applies + 1):
        chosen = keys[: len(keys) * k // args.applies]
        apply(manifest(folder, raw, {study: [s for st, s in chosen if st == study] for study in base}))
    build_s = time.perf_counter() - start
    cells = len(keys) * args.base_cells
    print(f"built the base atlas ({cells:,} cells) in {args.applies} applies, {build_s:.0f} s")

    before = figures(folder / "atlas.yaml")
    add_before = apply(manifest(folder, raw, {**base, "incoming": ["new_0"]}))
    start = time.perf_counter()
    result = subprocess.run([str(CLI), "--no-color", "compact", str(folder / "atlas.yaml")], check=True,
                            capture_output=True, text=True)
    compact_s = time.perf_counter() - start
    after = figures(folder / "atlas.yaml")
    add_after = apply(manifest(folder, raw, {**base, "incoming": ["new_0", "new_1"]}))

    print(result.stdout)
    print(f"| base atlas, {cells:,} cells, {args.applies} applies | fragments (max / total over arrays) | "
          "one sample s | one gene s | add 1 sample s (apply total) | ÷ add to empty atlas |")
    print("|---|---|---|---|---|---|")
    for name, fig, add in (("before compaction", before, add_before), ("after compaction", after, add_after)):
        counts = fig["fragments"].values()
        print(f"| {name} | {max(counts)} / {sum(counts)} | {fig['one_sample_s']:.2f} | {fig['one_gene_s']:.2f} | "
              f"{add['total_seconds']:.2f} | {add['total_seconds'] / add_empty['total_seconds']:.2f}x |")
    print(f"\nadd 1 sample ({args.new_cells:,} cells) to an empty atlas: {add_empty['total_seconds']:.2f} s; "
          f"compact (CLI wall, with interpreter start): {compact_s:.1f} s")
    (out / "results.json").write_text(json.dumps({
        "cells": cells, "applies": args.applies, "before": before, "after": after, "compact_wall_s": compact_s,
        "add_empty": add_empty, "add_before": add_before, "add_after": add_after}, indent=1, default=str))


if __name__ == "__main__":
    main()

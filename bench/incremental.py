"""Incremental scaling: the cost of adding one sample to a ~1M-cell atlas versus to an empty one.

    .venv/bin/python bench/incremental.py [--base-samples 100] [--base-cells 10000] [--out bench/out/incremental]

The base atlas holds base-samples x base-cells cells with few genes detected per cell (so it
builds in minutes); the added sample has the full preset's shape (5,000 cells, ~1,450 genes
per cell). Both adds run the real CLI; the figures come from the run report (logs/last-apply.json).
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

from generate import Preset, generate  # noqa: E402

CLI = REPO / ".venv" / "bin" / "soma-manifest"


def manifest(folder: Path, raw: Path, studies: list[str]) -> Path:
    path = folder / "atlas.yaml"
    path.write_text("version: 1\natlas: {name: atlas, storage: atlas}\n"
                    f"schema: {REPO / 'schemas' / 'default.yaml'}\n"
                    f"storage: {{raw: {raw}, h5ad: h5ad, logs: logs}}\nstudies:\n"
                    + "".join(f"  - name: {s}\n" for s in studies))
    return path


def apply(path: Path) -> dict:
    start = time.perf_counter()
    subprocess.run([str(CLI), "--no-color", "apply", str(path), "--processes", "2"], check=True,
                   capture_output=True)
    report = json.loads((path.parent / "logs" / "last-apply.json").read_text())
    return report | {"wall_seconds": time.perf_counter() - start}


def prepare(out: Path, base_samples: int, base_cells: int, *, new_samples: int, new_cells: int) -> tuple[Path, Path]:
    """The base data (base_samples x base_cells, ~30 genes per cell) and the new samples (the full preset's
    shape), generated once under `out`; then `out/raw`: the base's studies plus study `incoming` with the new
    samples as new_0, new_1, ... Returns that raw folder and the base's own raw folder."""
    base_data, new_data = out / "base_data", out / "new_data"
    if not (base_data / "generated.json").exists():
        generate(base_data, Preset("base", base_samples, base_cells, 20_000, 30), seed=0)
    if not (new_data / "generated.json").exists():
        generate(new_data, Preset("new", new_samples, new_cells, 20_000, 1_450), seed=7)
    raw = out / "raw"
    if raw.exists():
        shutil.rmtree(raw)
    shutil.copytree(base_data / "raw", raw)
    (raw / "incoming" / "mtx").mkdir(parents=True)
    for i, sample in enumerate(sorted((new_data / "raw").glob("*/mtx/*"))):
        shutil.copytree(sample, raw / "incoming" / "mtx" / f"new_{i}")
    return raw, base_data / "raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-samples", type=int, default=100)
    parser.add_argument("--base-cells", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "incremental")
    args = parser.parse_args()
    out = args.out.resolve()
    raw, base_data = prepare(out, args.base_samples, args.base_cells, new_samples=1, new_cells=5_000)
    base_studies = sorted(p.name for p in base_data.iterdir())

    rows = []
    for name, setup in (("empty atlas", []), ("~1M-cell atlas", base_studies)):
        folder = out / name.replace(" ", "_").replace("~", "")
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        cells = 0
        if setup:
            built = apply(manifest(folder, raw, setup))
            cells = args.base_samples * args.base_cells
            print(f"built the base atlas ({cells:,} cells) in {built['wall_seconds']:.1f} s")
        added = apply(manifest(folder, raw, setup + ["incoming"]))
        rows.append((name, cells, added))
    print("\n| add 1 sample (5,000 cells, ~7.2M nnz) to | atlas cells before | apply total s | convert s | ingest s | "
          "CLI wall s |")
    print("|---|---|---|---|---|---|")
    for name, cells, r in rows:
        print(f"| {name} | {cells:,} | {r['total_seconds']:.2f} | {r['convert_seconds']:.2f} | "
              f"{r['ingest_seconds']:.2f} | {r['wall_seconds']:.2f} |")
    ratio = rows[1][2]["total_seconds"] / rows[0][2]["total_seconds"]
    print(f"\nratio (1M-cell atlas / empty): {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()

"""Schema evolution in place (issue #24) against a rebuild, through the real CLI.

    python bench/schema_evolution.py [--preset small|full] [--processes 2] [--columns-only]
                                     [--out bench/out/schema_evolution]

Builds the preset's atlas with the default schema (the rebuild it is measured against), then, on that atlas
and one after the other: adds one obs column (from the sample metadata), drops one (pct_ribo), adds a
derived layer (normalized, float32). Then builds the atlas with that layer from scratch: what the layer adds
to a build is that build's time less the first one's. Each step is one `soma-manifest apply` in a fresh
interpreter: its wall time, and the apply's own time from logs/last-apply.json (without the interpreter's
start and imports, 3-4 s on a loaded 2-core machine, which every command pays alike). The table gives the
ratios first (targets of #24: adding a column <= 5% of a rebuild, dropping one <= 2%, adding a layer <= 1.3x
what it adds to a build), then the seconds and, for each in-place step, whether X's counts fragments stayed
as they were. Below it, the per-sample step times of the column's apply (from its log): what a sample costs.
`--columns-only` skips the layer (its two applies are most of the run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from generate import PRESETS, generate  # noqa: E402

DONOR = "  - {name: donor, type: string, source: sample_metadata, from: scrnaseq_protocol, default: unknown}\n"
CELL_TYPE = "  - {name: cell_type, type: string, source: cell_metadata, default: unknown}\n"
PCT_RIBO = "  - {name: pct_ribo, type: float32, source: computed}\n"
RAW = "  - {name: raw, type: int32, source: counts}\n"
NORM = "  - {name: norm, type: float32, source: normalized}\n"


def project(root: Path, data: Path, schema_text: str) -> Path:
    """A fresh project over the generated raw data, with its own schema file; returns the manifest."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "schema.yaml").write_text(schema_text)
    studies = sorted(p.name for p in (data / "raw").iterdir() if p.is_dir())
    manifest = root / "atlas.yaml"
    manifest.write_text(
        "version: 1\natlas: {name: atlas, storage: atlas}\nschema: schema.yaml\n"
        f"storage: {{raw: {data / 'raw'}, h5ad: h5ad, logs: logs}}\n"
        "studies:\n" + "".join(f"  - name: {s}\n" for s in studies))
    return manifest


def apply(manifest: Path, processes: int) -> tuple[float, float]:
    """The command's wall time, and the apply's own (logs/last-apply.json: without the interpreter's start and
    imports, which every command pays alike)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "soma_manifest", "apply", str(manifest), "--processes", str(processes)],
                   check=True, capture_output=True, env={**os.environ, "NO_COLOR": "1"})
    wall = time.perf_counter() - start
    return wall, json.loads((manifest.parent / "logs" / "last-apply.json").read_text())["total_seconds"]


def step_seconds(manifest: Path) -> dict[str, list[float]]:
    """Per-sample seconds of each worker step in the newest apply log ("S01: write_obs done (0.9s)", "S01: converted
    (..., 0.5s)")."""
    log = max((manifest.parent / "logs").glob("apply-*.log"), key=lambda p: p.stat().st_mtime)
    found: dict[str, list[float]] = {}
    for step, seconds in re.findall(r": (write_obs|converted|ingest)[^(\n]*\((?:[^)\n]*, )?([0-9.]+)s", log.read_text()):
        found.setdefault(step, []).append(float(seconds))
    return found


def x_fragments(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "atlas" / "atlas" / "ms" / "RNA" / "X" / "raw" / "__fragments").iterdir())


def edit(manifest: Path, old: str, new: str) -> None:
    schema = manifest.parent / "schema.yaml"
    text = schema.read_text()
    assert old in text, old
    schema.write_text(text.replace(old, new))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--columns-only", action="store_true", help="add and drop a column; skip the layer")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "schema_evolution")
    args = parser.parse_args()
    out = (args.out / args.preset).resolve()
    data = out / "data"
    if not (data / "generated.json").exists():
        generate(data, PRESETS[args.preset], seed=0)
    default = (REPO / "schemas" / "default.yaml").read_text()

    manifest = project(out / "evolved", data, default)
    build = apply(manifest, args.processes)
    fragments = x_fragments(manifest.parent)
    edit(manifest, CELL_TYPE, CELL_TYPE + DONOR)
    add_column = apply(manifest, args.processes)
    per_sample = step_seconds(manifest)
    add_kept = x_fragments(manifest.parent) == fragments
    edit(manifest, PCT_RIBO, "")
    drop_column = apply(manifest, args.processes)
    drop_kept = x_fragments(manifest.parent) == fragments
    nan = (float("nan"), float("nan"))
    add_layer, layer_kept, build_with_layer = nan, True, nan
    if not args.columns_only:
        edit(manifest, RAW, RAW + NORM)
        add_layer = apply(manifest, args.processes)
        layer_kept = x_fragments(manifest.parent) == fragments
        scratch = project(out / "with_layer", data, default.replace(RAW, RAW + NORM))
        build_with_layer = apply(scratch, args.processes)

    def ratio(a: tuple[float, float], b: tuple[float, float], i: int) -> float:
        return a[i] / b[i] if b[i] > 0 else float("nan")

    layer_in_build = (build_with_layer[0] - build[0], build_with_layer[1] - build[1])
    rows = [
        ("add one obs column / rebuild", add_column, build, "<= 0.05", add_kept),
        ("drop one obs column / rebuild", drop_column, build, "<= 0.02", drop_kept),
        ("add a derived layer / what it adds to a build", add_layer, layer_in_build, "<= 1.3", layer_kept),
    ]
    print(f"schema evolution, preset {args.preset}, {args.processes} processes; rebuild (default schema) "
          f"{build[0]:.2f} s ({build[1]:.2f} s in apply), with the layer {build_with_layer[0]:.2f} s "
          f"({build_with_layer[1]:.2f} s)\n")
    print("| in place | ratio (command) | ratio (in apply) | target | seconds: command, in apply (vs) | "
          "X counts fragments unchanged |")
    print("|---|--:|--:|--:|--:|---|")
    for name, step, base, target, kept in rows:
        print(f"| {name} | {ratio(step, base, 0):.3f} | {ratio(step, base, 1):.3f} | {target} | "
              f"{step[0]:.2f}, {step[1]:.2f} (vs {base[0]:.2f}, {base[1]:.2f}) | {'yes' if kept else 'NO'} |")
    print("\nadding the column, per sample (s): " + "; ".join(
        f"{step} {min(v):.2f}-{max(v):.2f} (median {sorted(v)[len(v) // 2]:.2f}, n={len(v)})"
        for step, v in sorted(per_sample.items())))


if __name__ == "__main__":
    main()

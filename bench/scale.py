"""Thousands of small samples (issue 23): the same cells split into more and more samples, through the real CLI.

    PYTHONPATH=$PWD .venv/bin/python bench/scale.py [--cells 20000] [--splits 8,80,400] [--nnz-per-cell 200]
                                                    [--genes 5000] [--processes 2] [--out bench/out/scale]

For each split N, `generate.py` writes N samples of cells/N cells (cached in OUT/<cells>x<N>/data); the last
sample is held back, the rest applied from scratch (`soma-manifest apply --processes P`, a fresh interpreter,
peak RSS of the command and of each worker polled), then: a no-op `plan`, a no-op `apply`, `verify`, and the
held-back sample added (`apply`). The table gives the ratios to the first split first, then the figures.

State bytes written: the state's serial counts its saves (`state.save_state` bumps it once a save), so an
apply's saves are the serial's growth; bytes = saves x the final state size (an upper bound: the state grows
during the apply). Fragments: the most of any array and the sum over arrays at the end of the first apply
(after its own compaction, if any); compaction seconds from the apply's log ("compacted the atlas ... (Xs)").
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, MB, run_watched  # noqa: E402
from generate import GENERATED_JSON, Preset, generate  # noqa: E402
from run import ATLAS_NAME, MANIFEST_TEMPLATE, SCHEMA  # noqa: E402

CLI = Path(sys.executable).parent / "soma-manifest"


@dataclass
class Row:
    samples: int
    cells: int
    apply_s: float = 0.0
    parent_mb: float = 0.0
    worker_mb: float = 0.0
    saves: int = 0
    state_kb: float = 0.0
    fragments_max: int = 0
    fragments_sum: int = 0
    compact_s: float = 0.0
    noop_plan_s: float = 0.0
    noop_apply_s: float = 0.0
    verify_s: float = 0.0
    add_one_s: float = 0.0
    steps: dict = field(default_factory=dict)  # the first apply's run report

    @property
    def state_mb_written(self) -> float:
        return self.saves * self.state_kb / 1024


def _data(work: Path, cells: int, samples: int, genes: int, nnz: int, processes: int) -> Path:
    data = work / "data"
    if not (data / GENERATED_JSON).exists():
        shutil.rmtree(data, ignore_errors=True)
        generate(data, Preset("scale", samples=samples, cells=cells // samples, genes=genes, nnz_per_cell=nnz),
                 processes=processes)
        shutil.rmtree(data / "h5ad_input", ignore_errors=True)  # the baselines' inputs: not used here
    return data


def _timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode not in (0,):
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def _fragments(atlas: Path) -> tuple[int, int]:
    from soma_manifest import atlas as soma_atlas

    counts = [soma_atlas.fragment_count(u) for u in soma_atlas.array_uris(str(atlas)).values()]
    return max(counts), sum(counts)


def _serial(state: Path) -> tuple[int, int]:
    return json.loads(state.read_text())["serial"], state.stat().st_size


def measure(out: Path, cells: int, samples: int, genes: int, nnz: int, processes: int) -> Row:
    work = out / f"{cells}x{samples}"
    work.mkdir(parents=True, exist_ok=True)
    data = _data(work, cells, samples, genes, nnz, processes)
    project = work / "project"
    shutil.rmtree(project, ignore_errors=True)
    shutil.copytree(data / "raw", project / "raw", symlinks=True)
    held = sorted((project / "raw").glob("*/mtx/*"))[-1]
    aside = project / "held_back"
    aside.mkdir()
    held.rename(aside / held.name)
    studies = "\n".join(f"  - name: {p.name}" for p in sorted((project / "raw").iterdir()))
    manifest = project / "atlas.yaml"
    manifest.write_text(MANIFEST_TEMPLATE.format(name=ATLAS_NAME, schema=SCHEMA, studies=studies, prefix="", raw="raw"))
    state = project / "atlas" / f"{ATLAS_NAME}.state.json"
    apply = [str(CLI), "--no-color", "apply", str(manifest), "--processes", str(processes)]
    row = Row(samples=samples, cells=cells)
    run = run_watched(apply, cwd=project)
    if run.returncode != 0:
        raise SystemExit(f"apply failed: {run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    row.apply_s, row.parent_mb, row.worker_mb = run.seconds, run.parent_peak_bytes / MB, run.child_peak_bytes / MB
    row.saves, size = _serial(state)
    row.state_kb = size / 1024
    row.steps = json.loads((project / "logs" / "last-apply.json").read_text())
    assert row.steps["succeeded"] == samples - 1 and not row.steps["failed"], row.steps
    found = re.findall(r"compacted the atlas: .*\(([\d.]+)s\)", Path(row.steps["log_file"]).read_text())
    row.compact_s = sum(float(s) for s in found)
    row.fragments_max, row.fragments_sum = _fragments(project / "atlas" / ATLAS_NAME)
    row.noop_plan_s = _timed([str(CLI), "--no-color", "plan", str(manifest)], project)
    row.noop_apply_s = _timed(apply, project)
    row.verify_s = _timed([str(CLI), "--no-color", "verify", str(manifest)], project)
    (aside / held.name).rename(held)
    row.add_one_s = _timed(apply, project)
    return row


def render(rows: list[Row]) -> str:
    base = rows[0]

    def r(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    head = ["samples x cells", "apply ÷ first", "verify ÷ first", "no-op apply ÷ no-op plan",
            "apply s", "s/sample", "parent MB", "worker MB", "state saves", "state KB", "state MB written (≤)",
            "fragments max/sum", "compaction s", "no-op plan s", "no-op apply s", "verify s", "add one s",
            "convert s", "ingest s", "allocate s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s = row.steps
        cells = [f"{row.samples} x {row.cells // row.samples}", r(row.apply_s, base.apply_s),
                 r(row.verify_s, base.verify_s), r(row.noop_apply_s, row.noop_plan_s),
                 f"{row.apply_s:.1f}", f"{row.apply_s / row.samples:.3f}", f"{row.parent_mb:.0f}",
                 f"{row.worker_mb:.0f}", str(row.saves), f"{row.state_kb:.0f}", f"{row.state_mb_written:.1f}",
                 f"{row.fragments_max}/{row.fragments_sum}", f"{row.compact_s:.1f}", f"{row.noop_plan_s:.2f}",
                 f"{row.noop_apply_s:.2f}", f"{row.verify_s:.2f}", f"{row.add_one_s:.2f}",
                 f"{s.get('convert_seconds', 0):.1f}", f"{s.get('ingest_seconds', 0):.1f}",
                 f"{s.get('allocate_seconds', 0):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000, help="cells in all, whatever the split")
    parser.add_argument("--splits", default="8,80,400", help="numbers of samples, comma-separated")
    parser.add_argument("--nnz-per-cell", type=int, default=200)
    parser.add_argument("--genes", type=int, default=5_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "scale")
    args = parser.parse_args()
    rows = []
    for samples in (int(s) for s in args.splits.split(",")):
        rows.append(measure(args.out.resolve(), args.cells, samples, args.genes, args.nnz_per_cell, args.processes))
        print(f"{samples} samples: apply {rows[-1].apply_s:.1f}s", file=sys.stderr, flush=True)
    table = render(rows)
    print(f"{args.cells:,} cells, ~{args.nnz_per_cell} nnz/cell, {args.genes:,} genes, {args.processes} processes; "
          "the last sample held back and added at the end\n")
    print(table)
    (args.out / "results.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))


if __name__ == "__main__":
    main()

"""Thousands of small samples (issue 23): the same cells split into more and more samples, through the real CLI.

    PYTHONPATH=$PWD .venv/bin/python bench/scale.py [--cells 20000] [--splits 8,80,400] [--nnz-per-cell 200]
                                                    [--genes 5000] [--processes 2] [--add-many 100] [--skewed L]
                                                    [--out bench/out/scale]

For each split N, `generate.py` writes N samples of cells/N cells (cached in OUT/<cells>x<N>/data); the last
sample is held back (and, with `--add-many K` and N >= 4K, K more), the rest applied from scratch
(`soma-manifest apply --processes P`, a fresh interpreter, peak RSS and CPU of the command and peak RSS of each
worker polled), then: a no-op `plan`, a no-op `apply`, `verify`, the held-back sample added (`apply`), the K
held-back samples added, and reads through the Python API of one sample's cells and of one gene (seconds inside
the interpreter, after the import). `--skewed L` adds one more row: half the cells in L large samples, the
other half in as many small samples as the last split. The table gives the ratios to the first split first, then the figures.

State bytes written: the state's serial counts its saves (`state.save_state` bumps it once a save), so an
apply's saves are the serial's growth; bytes = saves x the final state size (an upper bound: the state grows
during the apply). Fragments: the most of any array and the sum over arrays at the end of the first apply
(after its own compaction, if any), and the most of any array at any time during it (the arrays' `__fragments`
folders polled every second); compaction seconds from the apply's log ("compacted the atlas ... (Xs)").
Coordinator CPU per sample: (CPU of the first apply's own process - CPU of the one-sample add's) / (samples of
the first apply - 1): the fixed cost of a command (imports, start-up) taken out. Last ÷ first tenth: worker
seconds per sample (convert, plus ingest or a share of a grouped ingest; the apply log's figures, 0.1 s
resolution), the samples in the order their ingests ended: the last tenth's mean over the first tenth's.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
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
    large: int = 0  # a skewed mix: this many large samples (half the cells) beside the small ones
    add_many: int = 0
    add_many_s: float = 0.0
    parent_cpu_s: float = 0.0
    cpu_per_sample_ms: float = 0.0
    fragments_peak: int = 0  # most fragments of any array at any time during the first apply
    tenth_ratio: float = 0.0
    read_sample_s: float = 0.0
    read_gene_s: float = 0.0
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


class _FragmentWatch:
    """Polls, once a second in a thread, the most fragments any array of the atlas has."""

    def __init__(self, atlas: Path) -> None:
        self.atlas, self.peak, self._stop = atlas, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _FragmentWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            for folder in self.atlas.rglob("__fragments"):
                try:
                    self.peak = max(self.peak, sum(1 for _ in folder.iterdir()))
                except OSError:  # removed by a vacuum meanwhile
                    pass


def _tenths(log_file: Path) -> float:
    """Worker seconds per sample (its convert step, plus its ingest step or its share of a grouped one), from
    the apply log, in the order the ingests ended: the last tenth's mean over the first tenth's."""
    converts, heads, costs = {}, {}, []
    lines = iter(log_file.read_text().splitlines())
    for line in lines:
        if m := re.search(r"INFO (\S+): converted \(.*?([\d.]+)s\)", line):
            converts[m.group(1)] = float(m.group(2))
        elif m := re.search(r"INFO (\S+) and (\d+) more: ingested in one step", line):
            heads[m.group(1)] = int(m.group(2)) + 1
        elif m := re.search(r"INFO (\S+): (?:ingest|write_obs) done \(([\d.]+)s", line):
            size = heads.pop(m.group(1), 1)
            keys = [m.group(1)] + [re.search(r"INFO (\S+): ", next(lines)).group(1) for _ in range(size - 1)]
            costs += [converts.get(k, 0.0) + float(m.group(2)) / size for k in keys]
    tenth = len(costs) // 10
    if tenth < 1:
        return 0.0
    first, last = sum(costs[:tenth]), sum(costs[-tenth:])
    return last / first if first else 0.0


_READS = """
import json, sys, time
import soma_manifest
atlas = soma_manifest.load(sys.argv[1])
import tiledbsoma  # the import is not part of a read
start = time.perf_counter()
cells = atlas.to_anndata(samples=[sys.argv[2]]).n_obs
one_sample = time.perf_counter() - start
start = time.perf_counter()
gene = atlas.to_anndata(genes=[sys.argv[3]])
print(json.dumps({"sample": one_sample, "gene": time.perf_counter() - start, "cells": cells, "gene_nnz": gene.X.nnz}))
"""


def _reads(project: Path, manifest: Path, sample_dir: Path) -> tuple[float, float]:
    """Seconds to read one sample's cells and one gene (all cells) through the Python API."""
    import gzip

    with gzip.open(sample_dir / "features.tsv.gz", "rt") as features:
        gene = features.readline().split("\t")[0]
    key = f"{sample_dir.parent.parent.name}/{sample_dir.name}"
    done = subprocess.run([sys.executable, "-c", _READS, str(manifest), key, gene], cwd=project,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"reads failed:\n{done.stderr[-2000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["cells"] > 0 and found["gene_nnz"] > 0, found
    return found["sample"], found["gene"]


def _serial(state: Path) -> tuple[int, int]:
    return json.loads(state.read_text())["serial"], state.stat().st_size


def _copy_studies(data: Path, raw: Path, prefix: str) -> None:
    """Copy data's studies into raw, each renamed prefix + its name (its metadata files are named after it)."""
    for study in sorted((data / "raw").iterdir()):
        dest = raw / f"{prefix}{study.name}"
        shutil.copytree(study, dest, symlinks=True)
        for table in dest.glob(f"*_metadata/{study.name}.tsv.gz"):
            table.rename(table.with_name(f"{dest.name}.tsv.gz"))


def measure(out: Path, cells: int, samples: int, genes: int, nnz: int, processes: int, add_many: int,
            large: int = 0) -> Row:
    """One split: `samples` samples of cells/samples cells; with `large`, a skewed mix instead: half the cells in
    `large` samples (their studies named big_*), the other half in `samples` small ones."""
    work = out / (f"{cells}x{large}+{samples}" if large else f"{cells}x{samples}")
    work.mkdir(parents=True, exist_ok=True)
    project = work / "project"
    shutil.rmtree(project, ignore_errors=True)
    if large:
        _copy_studies(_data(out / f"{cells // 2}x{large}", cells // 2, large, genes, nnz, processes),
                      project / "raw", "big_")
        _copy_studies(_data(out / f"{cells // 2}x{samples}", cells // 2, samples, genes, nnz, processes),
                      project / "raw", "")
    else:
        _copy_studies(_data(work, cells, samples, genes, nnz, processes), project / "raw", "")
    raws = sorted((project / "raw").glob("*/mtx/*"))
    samples += large
    add_many = add_many if samples >= 4 * add_many else 0
    held, many = raws[-1], raws[-1 - add_many:-1] if add_many else []
    aside, aside_many = project / "held_back", project / "held_back_many"
    for folder, dirs in ((aside, [held]), (aside_many, many)):
        for d in dirs:
            (folder / d.parent.parent.name).mkdir(parents=True, exist_ok=True)
            d.rename(folder / d.parent.parent.name / d.name)
    studies = "\n".join(f"  - name: {p.name}" for p in sorted((project / "raw").iterdir()))
    manifest = project / "atlas.yaml"
    manifest.write_text(MANIFEST_TEMPLATE.format(name=ATLAS_NAME, schema=SCHEMA, studies=studies, prefix="", raw="raw"))
    state = project / "atlas" / f"{ATLAS_NAME}.state.json"
    apply = [str(CLI), "--no-color", "apply", str(manifest), "--processes", str(processes)]
    applied = samples - 1 - len(many)
    row = Row(samples=samples, cells=cells, add_many=len(many), large=large)
    with _FragmentWatch(project / "atlas") as watch:
        run = run_watched(apply, cwd=project)
    if run.returncode != 0:
        raise SystemExit(f"apply failed: {run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    row.apply_s, row.parent_mb, row.worker_mb = run.seconds, run.parent_peak_bytes / MB, run.child_peak_bytes / MB
    row.parent_cpu_s, row.fragments_peak = run.parent_cpu_s, watch.peak
    row.saves, size = _serial(state)
    row.state_kb = size / 1024
    row.steps = json.loads((project / "logs" / "last-apply.json").read_text())
    assert row.steps["succeeded"] == applied and not row.steps["failed"], row.steps
    log_file = Path(row.steps["log_file"])
    found = re.findall(r"compacted the atlas: .*\(([\d.]+)s\)", log_file.read_text())
    row.compact_s = sum(float(s) for s in found)
    row.tenth_ratio = _tenths(log_file)
    row.fragments_max, row.fragments_sum = _fragments(project / "atlas" / ATLAS_NAME)
    row.noop_plan_s = _timed([str(CLI), "--no-color", "plan", str(manifest)], project)
    row.noop_apply_s = _timed(apply, project)
    row.verify_s = _timed([str(CLI), "--no-color", "verify", str(manifest)], project)
    (aside / held.parent.parent.name / held.name).rename(held)
    one = run_watched(apply, cwd=project)
    if one.returncode != 0:
        raise SystemExit(f"one-sample add failed: {one.stdout[-3000:]}\n{one.stderr[-3000:]}")
    row.add_one_s = one.seconds
    row.cpu_per_sample_ms = max(0.0, row.parent_cpu_s - one.parent_cpu_s) / max(1, applied - 1) * 1000
    if many:
        for d in many:
            (aside_many / d.parent.parent.name / d.name).rename(d)
        row.add_many_s = _timed(apply, project)
    row.read_sample_s, row.read_gene_s = _reads(project, manifest, raws[0])
    return row


def render(rows: list[Row]) -> str:
    base = rows[0]

    def r(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    head = ["samples x cells", "apply ÷ first", "verify ÷ first", "no-op apply ÷ no-op plan",
            "last ÷ first tenth", "coordinator CPU ms/sample", "apply s", "s/sample", "parent MB", "worker MB", "state saves", "state KB", "state MB written (≤)",
            "fragments max/sum (peak)", "compaction s", "no-op plan s", "no-op apply s", "verify s",
            "add one s", "add many s", "read sample s", "read gene s", "convert s", "ingest s", "allocate s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s = row.steps
        size = f"{row.large} x {row.cells // 2 // row.large} + {row.samples - row.large} x " \
            f"{row.cells // 2 // (row.samples - row.large)}" if row.large else f"{row.samples} x {row.cells // row.samples}"
        cells = [size, r(row.apply_s, base.apply_s),
                 r(row.verify_s, base.verify_s), r(row.noop_apply_s, row.noop_plan_s),
                 f"{row.tenth_ratio:.2f}x", f"{row.cpu_per_sample_ms:.1f}", f"{row.apply_s:.1f}", f"{row.apply_s / row.samples:.3f}", f"{row.parent_mb:.0f}",
                 f"{row.worker_mb:.0f}", str(row.saves), f"{row.state_kb:.0f}", f"{row.state_mb_written:.1f}",
                 f"{row.fragments_max}/{row.fragments_sum} ({row.fragments_peak})", f"{row.compact_s:.1f}",
                 f"{row.noop_plan_s:.2f}", f"{row.noop_apply_s:.2f}", f"{row.verify_s:.2f}", f"{row.add_one_s:.2f}",
                 f"{row.add_many_s:.2f} ({row.add_many})" if row.add_many else "-",
                 f"{row.read_sample_s:.2f}", f"{row.read_gene_s:.2f}",
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
    parser.add_argument("--add-many", type=int, default=100,
                        help="also hold back this many samples and add them at the end (splits of at least 4x this)")
    parser.add_argument("--skewed", type=int, default=0, metavar="L",
                        help="also a skewed mix: half the cells in L large samples, half in the last split's number")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "scale")
    args = parser.parse_args()
    rows = []
    for samples in (int(s) for s in args.splits.split(",")):
        rows.append(measure(args.out.resolve(), args.cells, samples, args.genes, args.nnz_per_cell, args.processes,
                            args.add_many))
        print(f"{samples} samples: apply {rows[-1].apply_s:.1f}s", file=sys.stderr, flush=True)
    if args.skewed:
        rows.append(measure(args.out.resolve(), args.cells, samples, args.genes, args.nnz_per_cell, args.processes,
                            args.add_many, large=args.skewed))
    table = render(rows)
    print(f"{args.cells:,} cells, ~{args.nnz_per_cell} nnz/cell, {args.genes:,} genes, {args.processes} processes; "
          "the last sample held back and added at the end\n")
    print(table)
    (args.out / "results.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))


if __name__ == "__main__":
    main()

"""Benchmark soma-manifest against tiledbsoma's documented flow and the engine floor.

    python bench/run.py --preset small|full [--processes 2] [--out bench/out] [--repeat N]
                        [--flows manifest,manifest4,manifest_h5ad,default,tuned,floor,mtx_floor,mtx_floor4]

Generates the preset's data once (cached in OUT/<preset>/), runs each flow into a fresh
atlas in its own process, checks each atlas against the inputs and prints one table
(also saved as OUT/<preset>/results.md and results.json). With --repeat N, N rounds of
all the flows, each flow's fastest run shown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, MB, REPO_ROOT, FlowResult, WatchedRun, dir_bytes, fresh_dir, run_watched, wait_until_idle  # noqa: E402
from generate import GENERATED_JSON, GeneratedData, Preset, add_preset_args, generate, preset_from_args  # noqa: E402

BASELINES = BENCH_DIR / "baselines.py"
SCHEMA = REPO_ROOT / "schemas" / "default.yaml"
FLOWS = {  # key -> row name
    "manifest": "soma-manifest apply",
    "manifest4": "soma-manifest apply, 4 layers",
    "manifest_h5ad": "soma-manifest apply from h5ad",
    "manifest_ingest": "soma-manifest ingest only",
    "default": "tiledbsoma default",
    "tuned": "tuned from_h5ad",
    "floor": "engine floor",
    "mtx_floor": "end-to-end floor (MTX)",
    "mtx_floor4": "4-layer floor (MTX)",
}
BASELINE_FLOWS = {"default": "default", "tuned": "tuned", "floor": "floor", "mtx_floor": "mtx-floor",
                  "mtx_floor4": "mtx-floor4"}  # key -> baselines.py flow
#: The rows measured against the 4-layer floor; every other row against the 1-layer floor.
FOUR_LAYER_ROWS = {FLOWS["manifest4"], FLOWS["mtx_floor4"]}
#: The reference pipeline's four X layers, as a schema's `layers:` block.
FOUR_LAYERS_YAML = """layers:
  - {name: raw, type: int32, source: counts}
  - {name: normalized, type: float32, source: normalized}
  - {name: raw_by_gene, type: int32, source: counts, optimize: genes}
  - {name: normalized_by_gene, type: float32, source: normalized, optimize: genes}
"""
ATLAS_NAME = "bench_atlas"  # the experiment is <atlas.storage>/<atlas.name>
MANIFEST_TEMPLATE = """\
version: 1
atlas:
  name: {name}
  storage: ./{prefix}atlas
schema: {schema}
storage:
  raw: ./{raw}
  h5ad: ./{prefix}h5ad
  logs: ./{prefix}logs
studies:
{studies}
"""


# ---------------------------------------------------------------- data


def work_dir(out: Path, preset: Preset) -> Path:
    """OUT/<preset> for a named preset, OUT/<shape> for a custom one."""
    if preset.name != "custom":
        return out / preset.name
    return out / f"{preset.samples}x{preset.cells}x{preset.genes}x{preset.nnz_per_cell}"


def ensure_data(work: Path, preset: Preset, seed: int, processes: int) -> tuple[GeneratedData, bool]:
    """The cached data when it matches preset and seed, else freshly generated ones."""
    if (work / GENERATED_JSON).exists():
        cached = GeneratedData.load(work)
        if cached.preset == preset and cached.seed == seed and all(map(os.path.exists, cached.h5ads)):
            return cached, True
    for sub in ("raw", "h5ad_input"):
        fresh_dir(work / sub)
    return generate(work, preset, seed=seed, processes=processes), False


# ---------------------------------------------------------------- flows


def run_baseline(flow: str, work: Path, data: GeneratedData, processes: int) -> FlowResult:
    """One baseline flow in its own process (so its parent peak RSS is its own)."""
    json_out = work / f"result_{flow}.json"
    json_out.unlink(missing_ok=True)
    mtx = ["--mtx", *(s.mtx_dir for s in data.samples)] if flow.startswith("mtx") else []
    cmd = [sys.executable, str(BASELINES), BASELINE_FLOWS[flow], *data.h5ads, *mtx, "--atlas",
           str(work / f"atlas_{flow}"), "--processes", str(processes), "--json-out", str(json_out)]
    run = run_watched(cmd)
    if run.returncode != 0 or not json_out.exists():
        return FlowResult(flow=FLOWS[flow], error=f"failed: {run.last_error_line()}")
    return _note_other_load(FlowResult.from_json(json_out.read_text()), run)


def _note_other_load(row: FlowResult, run: WatchedRun) -> FlowResult:
    """Record how busy the rest of the machine was: the numbers mean little if it was."""
    row.checks["other_cores_busy"] = round(run.other_cores, 2)
    return row


def write_manifest(work: Path, data: GeneratedData, variant: str) -> Path:
    """OUT/<preset>/<variant>.yaml naming every generated study, with its own atlas, h5ad and logs
    folders. manifest4: the reference's four layers; manifest_h5ad: the studies as h5ad files."""
    prefix = "" if variant == "manifest" else f"{variant}_"
    schema, raw, fmt = SCHEMA, "raw", ""
    if variant == "manifest4":
        text = SCHEMA.read_text()
        schema = work / "schema4.yaml"
        schema.write_text(text.replace(text[text.index("layers:"):text.index("genes:")], FOUR_LAYERS_YAML))
    if variant == "manifest_h5ad":
        raw, fmt = "h5ad_raw", "\n    format: h5ad"
        for s in data.samples:  # the raw layout of h5ad studies: <raw>/<study>/h5ad/<sample>.h5ad
            link = work / raw / s.study / "h5ad" / f"{s.sample}.h5ad"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(s.h5ad)
    studies = "\n".join(f"  - name: {s}{fmt}" for s in sorted({s.study for s in data.samples}))
    path = work / f"{variant}.yaml"
    path.write_text(MANIFEST_TEMPLATE.format(name=ATLAS_NAME, schema=schema, studies=studies, prefix=prefix, raw=raw))
    return path


def run_manifest(work: Path, data: GeneratedData, processes: int, variant: str = "manifest") -> FlowResult:
    """The real CLI as a subprocess: ``soma-manifest apply <variant>.yaml --processes N``."""
    row = FlowResult(flow=FLOWS[variant])
    cli = Path(sys.executable).parent / "soma-manifest"
    if not cli.exists():
        return _unavailable(row, f"{cli} not installed")
    if not SCHEMA.exists():
        return _unavailable(row, f"{SCHEMA.relative_to(REPO_ROOT)} missing")
    manifest = write_manifest(work, data, variant)
    prefix = "" if variant == "manifest" else f"{variant}_"
    for sub in ("atlas", "h5ad", "logs"):  # the state file lives in atlas/
        fresh_dir(work / f"{prefix}{sub}")
    if variant == "manifest_ingest":
        setup = run_watched([str(cli), "apply", str(manifest), "--processes", str(processes)], cwd=work)
        if setup.returncode != 0:
            return _unavailable(row, setup.last_error_line())
        _forget_the_atlas(manifest)
        fresh_dir(work / f"{prefix}logs")
    run = run_watched([str(cli), "apply", str(manifest), "--processes", str(processes)], cwd=work)
    if run.returncode != 0:
        return _unavailable(row, run.last_error_line())
    row.total_s = round(run.seconds, 3)
    row.checks["command_wall_s"] = row.total_s
    row.parent_rss_bytes, row.worker_rss_bytes = run.parent_peak_bytes, run.child_peak_bytes
    _apply_run_report(row, work / f"{prefix}logs" / "last-apply.json")
    experiment = work / f"{prefix}atlas" / ATLAS_NAME
    row.atlas_bytes = dir_bytes(experiment)
    row.checks.update(verify_atlas(experiment, data))
    row.nnz, row.n_obs = row.checks.get("atlas_nnz"), row.checks.get("atlas_cells")
    return _note_other_load(row, run)


def _forget_the_atlas(manifest: Path) -> None:
    """For the ingest-only row: delete the atlas and reset the atlas side of its state (every sample's ingest
    fields, the joinid counters, orphans, history, compaction) to the state model's defaults, so that the next
    apply runs only the ingest steps, from the h5ad files, like the default flow's ingest of ready-made h5ad
    files. A bench setup only: no command does this."""
    from soma_manifest.manifest import load_manifest
    from soma_manifest.state import SampleState, State, load_state, save_state

    loaded = load_manifest(manifest)
    shutil.rmtree(str(loaded.atlas_uri))
    state = load_state(loaded.state_path)
    for entry in state.samples.values():
        for name in _ATLAS_SIDE:
            setattr(entry, name, SampleState.model_fields[name].get_default(call_default_factory=True))
    for name in ("next_joinid", "next_sample_joinid", "orphans", "orphan_samples", "history", "compaction"):
        setattr(state, name, State.model_fields[name].get_default(call_default_factory=True))
    save_state(state, loaded.state_path)


#: SampleState's fields that describe the atlas, not the sample's h5ad.
_ATLAS_SIDE = ("joinids", "ingest", "atlas_raw_digest", "atlas_conversion", "atlas_meta_digest", "atlas_cells",
               "atlas_nnz", "ingested_at", "sample_joinid")


def _unavailable(row: FlowResult, reason: str) -> FlowResult:
    row.error = f"not available: {reason}"
    return row


def _apply_run_report(row: FlowResult, report: Path) -> None:
    """Take convert/ingest/total seconds from the CLI's run report when it wrote one.

    Peak RSS stays the polled VmHWM of the process tree (the method of the other rows);
    the CLI's own figures are kept in ``checks`` for comparison.
    """
    if not report.exists():
        row.checks["run_report"] = "absent: end-to-end is the wall time of the command"
        return
    doc = json.loads(report.read_text())
    row.convert_s = doc.get("convert_seconds")
    row.ingest_s = doc.get("ingest_seconds")
    row.total_s = doc.get("total_seconds", row.total_s)
    for key in ("peak_rss_worker_bytes", "peak_rss_parent_bytes"):
        if key in doc:
            row.checks[f"cli_reported_{key}"] = doc[key]


def verify_atlas(atlas: Path, data: GeneratedData) -> dict:
    """baselines.py verify: cells, nnz and sum against the h5ad copies of the raw data."""
    json_out = atlas.parent.parent / "result_manifest_verify.json"
    json_out.unlink(missing_ok=True)
    run = run_watched([sys.executable, str(BASELINES), "verify", *data.h5ads, "--atlas", str(atlas),
                       "--json-out", str(json_out)])
    if run.returncode != 0 or not json_out.exists():
        return {"verify_error": run.last_error_line()}
    return json.loads(json_out.read_text())


def run_flow(flow: str, work: Path, data: GeneratedData, processes: int, wait_idle_s: float) -> FlowResult:
    if wait_idle_s > 0:
        wait_until_idle(wait_idle_s)
    if flow.startswith("manifest"):
        return run_manifest(work, data, processes, flow)
    return run_baseline(flow, work, data, processes)


def fastest(runs: list[FlowResult]) -> FlowResult:
    """The fastest of a flow's runs (other processes only ever add time), listing every run's end-to-end
    seconds in its checks."""
    ok = [r for r in runs if not r.error and r.total_s is not None]
    if not ok:
        return runs[0]
    best = min(ok, key=lambda r: r.total_s)
    if len(runs) > 1:
        best.checks["end_to_end_s_all_runs"] = [round(r.total_s, 2) for r in ok]
    return best


# ---------------------------------------------------------------- table


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return format(value / scale, fmt) if value is not None else "-"


def _check(row: FlowResult) -> str:
    checks = row.checks
    if "totals_match" not in checks:
        return checks.get("verify_error", "-")
    ok = checks["totals_match"] and checks.get("sample_equal", True)
    return ("ok" if ok else "MISMATCH") + ("" if "sample_equal" in checks else " (totals)")


def render_table(rows: list[FlowResult]) -> str:
    """Markdown table: ratios first (end-to-end / the MTX floor with the same layers, time /
    soma-manifest's, ingest time / the engine floor's), then absolute numbers."""
    def found(name: str) -> FlowResult | None:
        return next((r for r in rows if r.flow == name and not r.error), None)

    ref, floor = found(FLOWS["manifest"]), found(FLOWS["floor"])
    mtx_floors = {1: found(FLOWS["mtx_floor"]), 4: found(FLOWS["mtx_floor4"])}
    head = ["flow", "end-to-end ÷ MTX floor", "ingest ÷ soma-manifest", "end-to-end ÷ soma-manifest",
            "ingest ÷ floor", "convert s", "ingest s", "end-to-end s", "ingest nnz/s", "parent peak RSS MB",
            "worker peak RSS MB", "atlas MB", "check", "other load (cores)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.error:
            cells = [r.flow, r.error] + [""] * (len(head) - 2)
        else:
            mtx_floor = mtx_floors[4 if r.flow in FOUR_LAYER_ROWS else 1]
            cells = [
                r.flow,
                _ratio(r.total_s, mtx_floor.total_s if mtx_floor else None),
                _ratio(r.ingest_s, ref.ingest_s if ref else None),
                _ratio(r.total_s, ref.total_s if ref else None),
                _ratio(r.ingest_s, floor.ingest_s if floor else None),
                _num(r.convert_s, ".2f"),
                _num(r.ingest_s, ".2f"),
                _num(r.total_s, ".2f"),
                _num(r.nnz_per_s, ".2f", 1e6) + "M" if r.nnz_per_s else "-",
                _num(r.parent_rss_bytes, ".0f", MB),
                _num(r.worker_rss_bytes, ".0f", MB),
                _num(r.atlas_bytes, ".1f", MB),
                _check(r),
                _num(r.checks.get("other_cores_busy"), ".2f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    default, ingest_only = found(FLOWS["default"]), found(FLOWS["manifest_ingest"])
    if default and ingest_only and default.ingest_s and ingest_only.ingest_s:
        lines.append(f"\ningest of converted h5ad files: the default flow's ingest ÷ soma-manifest's (ingest only) = "
                     f"{default.ingest_s / ingest_only.ingest_s:.2f}x")
    return "\n".join(lines)


def describe(data: GeneratedData, cached: bool, processes: int) -> str:
    """One header line: the data, the machine, the versions."""
    from importlib.metadata import version

    p = data.preset
    source = "cached" if cached else f"generated in {data.seconds:.1f} s"
    return (
        f"preset {p.name}: {p.samples} samples x {p.cells:,} cells x {data.n_genes:,} genes, "
        f"{data.total_nnz:,} nnz ({data.total_nnz / data.total_cells:.0f}/cell), data {source}; "
        f"{processes} processes on {os.cpu_count()} cores; tiledbsoma {version('tiledbsoma')}, "
        f"Python {platform.python_version()}"
    )


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_preset_args(parser)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every flow; each flow's fastest run is shown")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to this long for the machine to be idle")
    parser.add_argument("--flows", default=",".join(FLOWS), help="comma-separated subset of " + ",".join(FLOWS))
    args = parser.parse_args(argv)
    flows = [f.strip() for f in args.flows.split(",") if f.strip()]
    if unknown := set(flows) - set(FLOWS):
        parser.error(f"unknown flows: {', '.join(sorted(unknown))}")

    preset = preset_from_args(args)
    work = work_dir(args.out.resolve(), preset)
    work.mkdir(parents=True, exist_ok=True)
    data, cached = ensure_data(work, preset, args.seed, args.processes)
    header = describe(data, cached, args.processes)
    print(header, flush=True)

    # Repeats run in rounds of every flow, not flow after flow: this machine's speed drifts by 10-20% over
    # minutes, and a ratio of two rows must not measure that drift.
    runs: dict[str, list[FlowResult]] = {flow: [] for flow in flows}
    for round_ in range(args.repeat):
        for flow in flows:
            print(f"running {FLOWS[flow]} (round {round_ + 1} of {args.repeat}) ...", flush=True)
            runs[flow].append(run_flow(flow, work, data, args.processes, args.wait_idle))
        rows = [fastest(runs[flow]) for flow in flows]
        # Saved after every round, so a long run that is stopped keeps the rounds it finished.
        table = render_table(rows)
        (work / "results.md").write_text(header + "\n\n" + table + "\n")
        (work / "results.json").write_text(
            json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=2, default=str)
        )
    print(table)


if __name__ == "__main__":
    main()

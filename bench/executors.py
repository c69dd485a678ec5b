"""Executors side by side, and what the serial coordinator costs per step.

    python bench/executors.py [--preset small|full] [--processes 2] [--repeat 1] [--out bench/out]

Rows (the real CLI in a subprocess, into a fresh atlas each time, on the preset's raw MTX), each ÷ the first:
loky + local paths (the default), Dask LocalCluster + local paths, and Dask LocalCluster + the S3 emulator
(moto's server on loopback, tests/s3server.py: raw files, h5ads, atlas and state in a bucket; the upload is not
timed; the emulator shows the request pattern, not a real service's latency, and its CPU counts as other load).
Local atlases are checked against the inputs (bench/baselines.py verify), the S3 one with `verify --deep`.

Then it times, against the atlas the loky run built, each serial step the coordinator
(`apply`) runs between the workers' steps: reading a sample's genes, extending var, resizing,
deleting a range, and saving a state of 1,000 samples; and from those and the measured
per-sample worker time it projects an apply of 1,000 samples on 32 workers. Results:
OUT/<preset>/executors.md and executors.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, MB, fresh_dir, run_watched  # noqa: E402
from generate import GeneratedData, add_preset_args, preset_from_args  # noqa: E402
from query_cost import timed  # noqa: E402
from run import ATLAS_NAME, ensure_data, verify_atlas, work_dir, write_manifest  # noqa: E402
from s3 import manifest as s3_manifest  # noqa: E402  (also puts tests/ on sys.path)
from s3server import S3Server, moto_server  # noqa: E402

ROWS = {"loky + local": ("local", "loky"), "Dask LocalCluster + local": ("local", "dask"),
        "Dask LocalCluster + S3 emulator": ("s3", "dask")}


def run_apply(manifest: Path, outputs: list[Path], processes: int, executor: str) -> dict:
    """One apply into fresh `outputs` (the manifest's atlas, h5ad and log folders, when local)."""
    cli = Path(sys.executable).parent / "soma-manifest"
    for folder in outputs:
        fresh_dir(folder)
    run = run_watched([str(cli), "apply", str(manifest), "--processes", str(processes), "--executor", executor],
                      cwd=manifest.parent)
    if run.returncode != 0:
        raise SystemExit(f"apply failed: {run.last_error_line()}")
    report = json.loads((manifest.parent / "logs" / "last-apply.json").read_text())
    return {"wall_s": run.seconds, "report": report, "worker_step_s": _step_seconds(Path(report["log_file"]).read_text()),
            "worker_peak_mb": round(run.child_peak_bytes / MB), "other_cores_busy": round(run.other_cores, 2)}


def local_row(work: Path, data: GeneratedData, processes: int, executor: str) -> dict:
    manifest = write_manifest(work, data, "manifest")
    row = run_apply(manifest, [work / "atlas", work / "h5ad", work / "logs"], processes, executor)
    checks = verify_atlas(work / "atlas" / ATLAS_NAME, data)
    row["checks"] = "ok (inputs)" if _checks_ok(checks) else "FAILED"
    return row


def s3_row(work: Path, data: GeneratedData, processes: int, executor: str, server: S3Server) -> dict:
    """The same apply with everything but the logs in a fresh bucket."""
    bucket = server.new_bucket()
    server.upload_tree(work / "raw", bucket, "raw")
    folder = work / "s3"
    folder.mkdir(exist_ok=True)
    where = {part: f"s3://{bucket}/{part}" for part in ("raw", "h5ad", "atlas")}
    manifest = s3_manifest(folder / "atlas.yaml", sorted({s.study for s in data.samples}), where, server.endpoint)
    row = run_apply(manifest, [folder / "logs"], processes, executor)
    verify = run_watched([str(Path(sys.executable).parent / "soma-manifest"), "verify", "--deep", str(manifest)])
    row["checks"] = "ok (verify --deep)" if verify.returncode == 0 else f"FAILED: {verify.last_error_line()}"
    return row


def _step_seconds(log: str) -> dict[str, list[float]]:
    """Seconds of each worker step, from the run log's 'converted (... 1.2s)' and 'ingest done (1.2s)'."""
    return {"convert": [float(s) for s in re.findall(r": converted \(.*?, ([\d.]+)s\)", log)],
            "ingest": [float(s) for s in re.findall(r": ingest done \(([\d.]+)s\)", log)]}


def _checks_ok(checks: dict) -> bool:
    """As bench/run.py reads baselines.py verify: cell/nnz/sum totals and one sample cell by cell."""
    return bool(checks.get("totals_match")) and checks.get("sample_equal", True)


def _median_s(fn) -> float:
    return timed(fn, repeat=5)


def coordinator_costs(work: Path, manifest_path: Path) -> dict[str, float]:
    """Each serial coordinator step, timed on a copy of the atlas the loky run built (median of 5)."""
    import pandas as pd

    from soma_manifest import atlas, h5ad
    from soma_manifest.manifest import load_manifest
    from soma_manifest.schema import load_schema
    from soma_manifest.state import load_state, save_state

    manifest = load_manifest(manifest_path)
    schema = load_schema(manifest.schema_path)
    scratch = fresh_dir(work / "coordinator")
    shutil.copytree(manifest.atlas_uri, scratch / "atlas")
    uri = str(scratch / "atlas")
    state = load_state(manifest.state_path)
    path = next(s.h5ad for s in state.samples.values())
    genes = h5ad.read_var(path, schema)
    counter = iter(range(10**6))

    def new_genes() -> None:
        n = next(counter)
        fresh = pd.DataFrame({c.name: [f"NEW{n}_{i}" for i in range(100)] for c in schema.var},
                             index=pd.Index([f"ENSGNEW{n:06d}{i:04d}" for i in range(100)], name="var_id"))
        atlas.extend_var(uri, schema, fresh)

    size = state.next_joinid
    grown = iter(range(1, 10**6))
    one = next(iter(state.samples.values()))
    big = state.model_copy(deep=True)
    big.samples = {f"study/s{i:04d}": one.model_copy() for i in range(1000)}
    state_file = scratch / "state.json"
    return {
        "read sample genes (h5ad var)": _median_s(lambda: h5ad.read_var(path, schema)),
        "extend var, no new genes": _median_s(lambda: atlas.extend_var(uri, schema, genes)),
        "extend var, 100 new genes": _median_s(new_genes),
        "resize obs + X": _median_s(lambda: atlas.resize_obs(uri, schema, size + 1000 * next(grown))),
        "delete a 1,000-cell range": _median_s(lambda: atlas.delete_obs_range(uri, schema, 0, 1000)),
        "save state, 1,000 samples": _median_s(lambda: save_state(big, state_file)),
    }


def projection(costs: dict[str, float], per_sample_worker_s: float, workers: int = 32,
               samples: int = 1000) -> list[str]:
    """When does the serial coordinator limit an apply of `samples` on `workers`?"""
    # Per sample (conversions arriving one at a time, the worst case): a save after its convert, one for its
    # allocation, one after its ingest. Its genes come with the convert outcome; var is extended and the
    # arrays grown only for batches that bring new genes or outgrow the room grown ahead (amortized away).
    save = costs["save state, 1,000 samples"]
    per_sample = 3 * save
    # Without a gene reference, a sample with new genes also extends var, grows var and X, and waits for the
    # ingests running at that moment (a schema change must not meet a worker opening the array).
    new_genes = per_sample + costs["extend var, 100 new genes"] + costs["resize obs + X"]
    arrivals = workers / per_sample_worker_s  # samples/s the workers finish when never starved
    load = per_sample * arrivals
    lines = [
        f"- measured worker time per sample (convert + ingest): {per_sample_worker_s:.2f} s",
        f"- coordinator time per sample: {per_sample * 1000:.0f} ms (3 state saves of {save * 1000:.0f} ms); "
        f"{new_genes * 1000:.0f} ms for a sample that brings new genes (extend var "
        f"{costs['extend var, 100 new genes'] * 1000:.0f} ms, grow {costs['resize obs + X'] * 1000:.0f} ms), "
        "which also waits for the ingests running then",
        f"- {workers} workers finish {arrivals:.1f} samples/s; the coordinator is busy {load:.0%} of the time "
        f"({'the bottleneck' if load >= 1 else 'not the bottleneck'} at this sample size)",
        f"- it becomes the bottleneck when a sample's worker time drops under {per_sample * workers:.1f} s "
        f"(with {workers} workers), or above {per_sample_worker_s / per_sample:.0f} workers at this sample size",
        f"- projected apply of {samples} samples on {workers} workers: "
        f"{max(samples * per_sample_worker_s / workers, samples * per_sample):.0f} s "
        f"(workers: {samples * per_sample_worker_s / workers:.0f} s; coordinator alone: {samples * per_sample:.0f} s)",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_preset_args(parser)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="keep the fastest of N runs per row")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    args = parser.parse_args(argv)
    preset = preset_from_args(args)
    work = work_dir(args.out, preset)
    data, _ = ensure_data(work, preset, args.seed, args.processes)
    rows = {}
    with moto_server() as server:
        for name, (store, executor) in ROWS.items():
            runs = [local_row(work, data, args.processes, executor) if store == "local"
                    else s3_row(work, data, args.processes, executor, server) for _ in range(args.repeat)]
            rows[name] = min(runs, key=lambda r: r["wall_s"])
            rows[name]["all_wall_s"] = [round(r["wall_s"], 2) for r in runs]
            if name == "loky + local":  # its atlas is the one the coordinator steps are timed on
                costs = coordinator_costs(work, work / "manifest.yaml")
                steps = rows[name]["worker_step_s"]
                per_sample_worker_s = (sum(steps["convert"]) + sum(steps["ingest"])) / max(1, len(steps["ingest"]))
    base = rows["loky + local"]["wall_s"]
    table = ["| executor | wall ÷ loky + local | wall s | convert s | ingest s | allocate s | worker peak RSS MB "
             "| atlas checks | other cores busy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        rep = r["report"]
        table.append(f"| {name} | {r['wall_s'] / base:.2f}x | {r['wall_s']:.1f} | {rep['convert_seconds']:.1f} | "
                     f"{rep['ingest_seconds']:.1f} | {rep.get('allocate_seconds', 0.0):.2f} | {r['worker_peak_mb']} | "
                     f"{r['checks']} | {r['other_cores_busy']} |")
    cost_lines = [f"| {k} | {v * 1000:.1f} |" for k, v in costs.items()]
    text = "\n".join([f"# Executors, preset {preset.name}, {args.processes} processes "
                      f"({data.total_cells:,} cells, {data.total_nnz:,} nnz)", "", *table, "",
                      "## Serial coordinator steps (median of 5, ms)", "", "| step | ms |", "|---|---|", *cost_lines,
                      "", "## Projection: 1,000 samples on 32 workers", "",
                      *projection(costs, per_sample_worker_s)])
    print(text)
    (work / "executors.md").write_text(text + "\n")
    (work / "executors.json").write_text(json.dumps({"rows": rows, "coordinator_s": costs,
                                                     "per_sample_worker_s": per_sample_worker_s}, indent=1,
                                                    default=str))


if __name__ == "__main__":
    main()

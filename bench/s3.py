"""Object storage cost: the same apply with raw, h5ad, atlas and state on an S3 emulator vs. on local disk,
and a no-op plan over many samples on the emulator.

    .venv/bin/python bench/s3.py [--preset small] [--processes 2] [--plan-samples 1000] [--out bench/out/s3]

The emulator is moto's server on loopback (tests/s3server.py): it shows the request pattern and the
overhead of going through S3 APIs, not the latency or bandwidth of a real service. Requests are counted
from the server's request log. Logs stay local in both runs (to read logs/last-apply.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH), str(REPO / "tests")]

from generate import PRESETS, generate  # noqa: E402
from plan_speed import STUDIES, write_sample  # noqa: E402
from s3server import S3Server, moto_server  # noqa: E402

SCHEMA = REPO / "schemas" / "default.yaml"
PHASES = ("convert_seconds", "ingest_seconds", "verify_seconds", "total_seconds")


def manifest(path: Path, studies: list[str], where: dict[str, str], endpoint: str | None) -> Path:
    store = f"object_store: {{endpoint_url: {endpoint}, region: us-east-1}}\n" if endpoint else ""
    path.write_text(
        f"version: 1\natlas: {{name: atlas, storage: {where['atlas']}}}\nschema: {SCHEMA}\n"
        f"storage: {{raw: {where['raw']}, h5ad: {where['h5ad']}, logs: {path.parent / 'logs'}}}\n{store}"
        "studies:\n" + "".join(f"  - name: {s}\n" for s in studies))
    return path


def requests(log: Path) -> int:
    """Requests the emulator served so far (one access-log line each)."""
    return sum(1 for line in log.read_text(errors="replace").splitlines() if '" 20' in line or '" 4' in line)


def apply(path: Path, processes: int) -> tuple[dict, float]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "soma_manifest", "apply", str(path), "--processes", str(processes)],
                   check=True, capture_output=True, env={**os.environ, "NO_COLOR": "1"})
    wall = time.perf_counter() - start
    return json.loads((path.parent / "logs" / "last-apply.json").read_text()), wall


def plan_wall(path: Path, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "soma_manifest", "plan", str(path), "--json"], check=True,
                       capture_output=True, env={**os.environ, "NO_COLOR": "1"})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_apply(out: Path, server: S3Server, log: Path, preset: str, processes: int) -> list[str]:
    data_dir = out / "data"
    data = generate(data_dir, PRESETS[preset], seed=0, processes=processes)
    studies = sorted({s.study for s in data.samples})
    bucket = server.new_bucket()
    server.upload_tree(data_dir / "raw", bucket, "raw")
    local = out / "local"
    shutil.rmtree(local, ignore_errors=True)  # a second run would otherwise apply nothing, and report the last
    local.mkdir(parents=True)
    on_disk = manifest(local / "atlas.yaml", studies, {"raw": str(data_dir / "raw"), "h5ad": str(local / "h5ad"),
                                                       "atlas": str(local / "atlas")}, None)
    remote = out / "remote"
    remote.mkdir(parents=True, exist_ok=True)
    on_s3 = manifest(remote / "atlas.yaml", studies, {"raw": f"s3://{bucket}/raw", "h5ad": f"s3://{bucket}/h5ad",
                                                      "atlas": f"s3://{bucket}/atlas"}, server.endpoint)
    local_report, local_wall = apply(on_disk, processes)
    before = requests(log)
    s3_report, s3_wall = apply(on_s3, processes)
    apply_requests = requests(log) - before
    before = requests(log)
    noop_wall = plan_wall(on_s3, repeat=1)
    noop_requests = requests(log) - before
    rows = [f"Preset {preset}: {len(data.samples)} samples, {data.total_cells:,} cells, {data.total_nnz:,} nnz; "
            f"{processes} processes.", "", "| phase | local s | S3 emulator s | ratio |", "|---|---|---|---|"]
    for phase in PHASES:
        a, b = local_report[phase], s3_report[phase]
        rows.append(f"| {phase.removesuffix('_seconds')} | {a:.2f} | {b:.2f} | {b / a if a else float('nan'):.2f} |")
    rows.append(f"| apply wall (CLI) | {local_wall:.2f} | {s3_wall:.2f} | {s3_wall / local_wall:.2f} |")
    rows += ["", f"S3 requests: apply {apply_requests:,} (atlas creation, raw reads, h5ad writes and reads, "
                 f"TileDB writes, state saves, lease); no-op plan {noop_requests} ({noop_wall:.2f} s wall)."]
    return rows


def bench_plan(out: Path, server: S3Server, log: Path, samples: int) -> list[str]:
    from soma_manifest.manifest import load_manifest
    from soma_manifest.plan import make_plan, observe
    from soma_manifest.schema import load_schema
    from soma_manifest.state import SampleState, State, load_state, save_state

    raw = out / "plan_raw"
    if not raw.exists():
        for i in range(samples):
            write_sample(raw / f"study_{i % STUDIES:02d}" / "mtx" / f"S{i:06d}", i)
    bucket = server.new_bucket()
    server.upload_tree(raw, bucket, "raw")
    path = manifest(out / "plan.yaml", [f"study_{s:02d}" for s in range(STUDIES)],
                    {"raw": f"s3://{bucket}/raw", "h5ad": f"s3://{bucket}/h5ad", "atlas": f"s3://{bucket}/atlas"},
                    server.endpoint)
    loaded = load_manifest(path)
    schema = load_schema(loaded.schema_path)
    observed = observe(loaded, None)
    state = State(atlas=str(loaded.atlas_uri), structure=schema.structure, studies=observed.study_caches)
    for key, o in observed.samples.items():
        state.samples[key] = SampleState(
            study=o.source.study, sample=o.source.sample, format="mtx", raw_files=list(o.files),
            raw_digest=o.raw_digest, meta_digest=o.meta_digest, conversion=schema.conversion, converted=True,
            cells=2, nnz=2, joinids=state.allocate(2), ingest="done", atlas_raw_digest=o.raw_digest,
            atlas_conversion=schema.conversion, atlas_meta_digest=o.meta_digest, atlas_cells=2, atlas_nnz=2)
    save_state(state, loaded.state_path)
    client = server.client()
    for marker in ("__tiledb_group.tdb", "__meta/m"):  # what the planner checks for a complete atlas
        client.put_object(Bucket=bucket, Key=f"atlas/atlas/{marker}", Body=b"")
    times = []
    before = requests(log)
    for _ in range(3):
        start = time.perf_counter()
        state = load_state(loaded.state_path)
        plan = make_plan(loaded, schema, observe(loaded, state), state, True)
        times.append(time.perf_counter() - start)
        assert not plan.actions, "the no-op plan found changes"
    per_plan = (requests(log) - before) // 3
    return [f"No-op plan over {samples:,} samples ({3 * samples:,} objects, {STUDIES} studies) on the emulator: "
            f"{statistics.median(times):.2f} s in-process, {plan_wall(path):.2f} s CLI wall, "
            f"{per_plan} requests per plan."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--plan-samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=BENCH / "out" / "s3")
    parser.add_argument("--skip-apply", action="store_true", help="only the no-op plan")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "moto.log"
    with moto_server(log) as server:
        rows = [] if args.skip_apply else bench_apply(args.out, server, log, args.preset, args.processes)
        rows += ["", *bench_plan(args.out, server, log, args.plan_samples)]
    print("\n".join(rows))


if __name__ == "__main__":
    main()

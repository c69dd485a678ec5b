"""Plan speed over a synthetic raw tree of many samples, with nothing changed and with one sample added.

    .venv/bin/python bench/plan_speed.py [--samples 10000] [--out bench/out/plan_speed]

Builds <out>/raw with tiny Cell Ranger folders (3 files each) in 10 studies and a state that
records every sample as ingested (built from the planner's own observation, so no atlas is
needed), then times `plan` in-process (observe + make_plan) and as the real CLI command.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from soma_manifest.manifest import load_manifest  # noqa: E402
from soma_manifest.plan import make_plan, observe  # noqa: E402
from soma_manifest.schema import load_schema  # noqa: E402
from soma_manifest.state import SampleState, State, save_state  # noqa: E402

STUDIES = 10
MATRIX = b"%%MatrixMarket matrix coordinate integer general\n3 2 2\n1 1 4\n3 2 1\n"
FEATURES = b"ENSG01\tA\tGene Expression\nENSG02\tB\tGene Expression\nENSG03\tMT-C\tGene Expression\n"


def write_sample(folder: Path, index: int) -> None:
    folder.mkdir(parents=True)
    (folder / "matrix.mtx.gz").write_bytes(gzip.compress(MATRIX, mtime=0))
    (folder / "features.tsv.gz").write_bytes(gzip.compress(FEATURES, mtime=0))
    (folder / "barcodes.tsv.gz").write_bytes(gzip.compress(f"AAAC{index:012d}-1\nTTTG{index:012d}-1\n".encode(),
                                                           mtime=0))


def build(out: Path, samples: int) -> Path:
    if out.exists():
        shutil.rmtree(out)
    for i in range(samples):
        write_sample(out / "raw" / f"study_{i % STUDIES:02d}" / "mtx" / f"S{i:06d}", i)
    manifest = out / "atlas.yaml"
    manifest.write_text(
        "version: 1\natlas: {name: atlas, storage: atlases}\n"
        f"schema: {REPO / 'schemas' / 'default.yaml'}\n"
        "storage: {raw: raw, h5ad: h5ads, logs: logs}\nstudies:\n"
        + "".join(f"  - name: study_{s:02d}\n" for s in range(STUDIES)))
    loaded = load_manifest(manifest)
    schema = load_schema(loaded.schema_path)
    observed = observe(loaded, None)
    state = State(atlas=str(loaded.atlas_uri), structure=schema.structure, studies=observed.study_caches)
    for key, o in observed.samples.items():
        start = state.next_joinid
        state.samples[key] = SampleState(
            study=o.source.study, sample=o.source.sample, format="mtx", raw_files=list(o.files),
            raw_digest=o.raw_digest, meta_digest=o.meta_digest, conversion=schema.conversion, converted=True,
            cells=2, nnz=2, joinids=state.allocate(2), ingest="done", atlas_raw_digest=o.raw_digest,
            atlas_conversion=schema.conversion, atlas_meta_digest=o.meta_digest, atlas_cells=2, atlas_nnz=2)
        assert start + 2 == state.next_joinid
    save_state(state, loaded.state_path)
    # The planner also checks the atlas exists (plan.atlas_present): an empty group with its metadata folder.
    for marker in ("__group", "__meta"):
        Path(loaded.atlas_uri.uri, marker).mkdir(parents=True)
    return manifest


def time_in_process(manifest: Path, repeat: int = 3) -> tuple[float, int]:
    from soma_manifest.state import load_state

    times, actions = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        loaded = load_manifest(manifest)
        schema = load_schema(loaded.schema_path)
        state = load_state(loaded.state_path)
        plan = make_plan(loaded, schema, observe(loaded, state), state, True)
        times.append(time.perf_counter() - start)
        actions = len(plan.actions)
    return statistics.median(times), actions


def time_cli(manifest: Path, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([str(REPO / ".venv" / "bin" / "soma-manifest"), "plan", str(manifest), "--json"],
                       check=True, capture_output=True, env={**os.environ, "NO_COLOR": "1"})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "plan_speed")
    args = parser.parse_args()
    start = time.perf_counter()
    manifest = build(args.out, args.samples)
    print(f"built {args.samples} samples and their state in {time.perf_counter() - start:.1f} s")
    rows = []
    noop, n = time_in_process(manifest)
    rows.append(("no-op", n, noop, time_cli(manifest)))
    write_sample(args.out / "raw" / "study_00" / "mtx" / "S_new", args.samples + 1)
    added, n = time_in_process(manifest)
    rows.append(("one sample added", n, added, time_cli(manifest)))
    print(f"\n| plan over {args.samples:,} samples | actions | in-process s | CLI wall s (incl. interpreter start) |")
    print("|---|---|---|---|")
    for name, actions, in_process, cli in rows:
        print(f"| {name} | {actions} | {in_process:.2f} | {cli:.2f} |")


if __name__ == "__main__":
    main()

"""The GitOps case: one sample added to an existing atlas of the small preset, through the real CLI.

    .venv/bin/python bench/small_add.py [--repeat 5] [--processes 2] [--out bench/out/small_add]

Three of the small preset's four samples are applied once (the base); each repetition copies the base
project, adds the fourth sample's raw folder and runs the `soma-manifest apply` command (the installed
script, as users run it) in a fresh interpreter. The table gives the whole command's wall time against the
1.5 s target, then what bounds it: `soma-manifest plan` on the same project (interpreter, the command
line's imports, planning; no storage engine), one interpreter importing what apply imports
(`import soma_manifest.apply` without the packages executors.workers.lean_imports leaves out, as the command does;
ended with os._exit as the command is, since the interpreter's own teardown took ~0.5 s more), and the run
report's phases (logs/last-apply.json). The heading names the executor apply chose (from its log): a sample
this small runs inline, in apply's own process. Median over the repetitions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from generate import PRESETS, generate  # noqa: E402

PYTHON = REPO / ".venv" / "bin" / "python"
TARGET_S = 1.5


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "small_add")
    args = parser.parse_args()
    out = args.out.resolve()
    data = out / "data"
    if not (data / "generated.json").exists():
        generate(data, PRESETS["small"], seed=0)
    last = sorted((data / "raw").glob("*/mtx/*"))[-1]  # the sample to add
    base = out / "base"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(data / "raw", base / "raw", ignore=lambda folder, names: [last.name] if
                    Path(folder) == data / "raw" / last.parent.parent.name / "mtx" else [])
    studies = sorted(p.name for p in (data / "raw").iterdir() if p.is_dir())
    (base / "atlas.yaml").write_text(
        "version: 1\natlas: {name: atlas, storage: atlas}\n"
        f"schema: {REPO / 'schemas' / 'default.yaml'}\n"
        "storage: {raw: raw, h5ad: h5ad, logs: logs}\nstudies:\n" + "".join(f"  - name: {s}\n" for s in studies))
    cli = [str(PYTHON.parent / "soma-manifest"), "--no-color"]
    subprocess.run([*cli, "apply", str(base / "atlas.yaml"), "--processes", str(args.processes)], check=True,
                   capture_output=True)

    # as the command imports it: without the packages executors.workers.lean_imports leaves out
    imports = statistics.median(timed([str(PYTHON), "-c", "from soma_manifest import executors; "
                                       "executors.workers.lean_imports(); import soma_manifest.apply; import os; os._exit(0)"])
                                for _ in range(args.repeat))
    walls, plans, reports, executors = [], [], [], set()
    for _ in range(args.repeat):
        run = out / "run"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run, symlinks=True)
        shutil.copytree(last, run / "raw" / last.parent.parent.name / "mtx" / last.name)
        plans.append(timed([*cli, "plan", str(run / "atlas.yaml")]))
        walls.append(timed([*cli, "apply", str(run / "atlas.yaml"), "--processes", str(args.processes)]))
        reports.append(json.loads((run / "logs" / "last-apply.json").read_text()))
        log = Path(reports[-1]["log_file"]).read_text()
        executors.add(log.split(" executor ", 1)[1].split(",", 1)[0])
        assert reports[-1]["succeeded"] == 1 and not reports[-1]["failed"], reports[-1]
    wall = statistics.median(walls)

    def phase(name: str) -> float:
        return statistics.median(r[f"{name}_seconds"] for r in reports)

    print(f"one sample ({last.parent.parent.name}/{last.name}) added to a {len(studies)}-study atlas of the small "
          f"preset, {args.processes} processes, executor {'/'.join(sorted(executors))}, median of {args.repeat}\n")
    print("| command wall ÷ 1.5 s target | command wall s | `plan` command s | interpreter + apply's imports s | "
          "convert s | ingest s | verify s | apply total s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {wall / TARGET_S:.2f}x | {wall:.2f} | {statistics.median(plans):.2f} | {imports:.2f} | "
          f"{phase('convert'):.2f} | {phase('ingest'):.2f} | {phase('verify'):.2f} | {phase('total'):.2f} |")
    print(f"\nall command walls: {', '.join(f'{w:.2f}' for w in walls)}")


if __name__ == "__main__":
    main()

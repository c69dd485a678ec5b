"""Benchmark of `soma-manifest report` on big generated atlases: render time and page size.

    python bench/report.py [--cells 100000 1000000] [--cells-per-sample 5000] [--work DIR]

The report reads obs (obs_id and the QC columns), the samples table, the presence matrix, the state and the
history, never X, so each atlas is generated without X: a real atlas of the default schema (made by
soma_manifest.atlas), whose obs, var (20,000 genes), samples table and presence matrix are written directly
with tiledbsoma in ten "applies", each with its history entry, and a state file and manifest beside it.
Per cell: UMIs log-normal around a per-sample level, genes per cell from the UMIs, pct_mito a few percent;
one sample in fifty is mitochondria-heavy and one has few cells, so the outlier marks are drawn too.

Printed per size (medians of --repeat runs): the report as the CLI makes it (a fresh process: imports, reads,
HTML written) in wall-clock and CPU seconds (user + system: what it costs when it does not wait for the
cores, e.g. while other sessions share the machine), its in-process parts (gather: the reads and summaries; render: the HTML), the HTML's size, and
the load other processes put on the machine just before (it waits up to two minutes for a quiet moment).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, _children_cpu_s, dir_bytes, fresh_dir, wait_until_idle  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
from soma_manifest import atlas, state as st  # noqa: E402
from soma_manifest.schema import load_schema  # noqa: E402

GENES = 20_000
APPLIES = 10
STUDIES = ("study_a", "study_b", "study_c", "study_d")


def build(root: Path, cells: int, per_sample: int, seed: int = 0) -> Path:
    """A generated atlas of `cells` cells; returns its manifest."""
    import tiledbsoma as soma

    fresh_dir(root).mkdir(parents=True)
    schema = load_schema(REPO_ROOT / "schemas" / "default.yaml")
    uri = str(root / "atlases" / "atlas")
    lineage = str(uuid.uuid4())
    atlas.create_atlas(uri, schema, lineage)
    rng = np.random.default_rng(seed)
    ids = [f"ENSG{i:011d}" for i in range(GENES)]
    atlas.extend_var(uri, schema, pd.DataFrame({"gene_symbol": [f"G{i}" for i in range(GENES)]},
                                               index=pd.Index(ids, name="var_id")))
    n_samples = max(1, cells // per_sample)
    sizes = np.full(n_samples, per_sample)
    sizes[-1] += cells - sizes.sum()
    if n_samples > 2:
        sizes[1] = max(per_sample // 20, 10)  # few cells
        sizes[-1] += per_sample - sizes[1]
    atlas.resize_obs(uri, schema, cells)
    atlas.resize_samples(uri, schema, n_samples)
    state = st.State(atlas=uri, lineage=lineage, structure=schema.structure,
                     structure_summary=schema.structure_summary())
    with soma.Experiment.open(uri, context=atlas.context()) as exp:
        obs_uri, obs_schema = exp.obs.uri, exp.obs.schema
        samples_uri, presence_uri = exp[atlas.SAMPLES].uri, exp.ms["RNA"][atlas.PRESENCE].uri
        samples_schema = exp[atlas.SAMPLES].schema
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for part in (p for p in np.array_split(np.arange(n_samples), APPLIES) if len(p)):
        tables, rows, presence = [], [], []
        for j in part:
            study, name = STUDIES[j % len(STUDIES)], f"sample_{j:04d}"
            n, start = int(sizes[j]), int(starts[j])
            umi = np.maximum(rng.lognormal(np.log(3000) + rng.normal(0, 0.3), 0.6, n), 50).astype(np.int64)
            genes = np.minimum((umi ** 0.8 * rng.uniform(0.6, 0.9, n)).astype(np.int64), GENES)
            mito = rng.beta(2, 40, n) * 100 * (8 if j % 50 == 7 else 1)
            barcodes = np.char.add(np.char.add(f"{study}/{name}/", np.arange(n).astype(str)), "-1")
            tables.append(pa.table({
                "soma_joinid": np.arange(start, start + n, dtype=np.int64), "obs_id": barcodes.astype(object),
                "barcode": np.char.add(np.arange(n).astype(str), "-1").astype(object),
                "sample_name": np.full(n, name, dtype=object), "study_name": np.full(n, study, dtype=object),
                "scrnaseq_protocol": np.full(n, "10x 3' v3", dtype=object),
                "cell_type": rng.choice(["T cell", "B cell", "monocyte"], n).astype(object),
                "nnz": genes, "umi_counts": umi, "pct_mito": np.minimum(mito, 100).astype(np.float32),
                "pct_ribo": rng.uniform(10, 30, n).astype(np.float32),
                "log_mean": np.full(n, np.log(umi).mean(), np.float32),
                "log_var": np.full(n, np.log(umi).var(), np.float32)}).select(obs_schema.names).cast(obs_schema))
            measured = np.sort(rng.choice(GENES, int(GENES * rng.uniform(0.85, 1.0)), replace=False))
            rows.append({"soma_joinid": int(j), "sample_id": f"{study}/{name}", "study": study, "sample": name,
                         "cells": n, "obs_joinid_start": start, "obs_joinid_stop": start + n,
                         "n_measured_genes": len(measured)})
            presence.append((np.full(len(measured), j, dtype=np.int64), measured.astype(np.int64)))
            state.samples[f"{study}/{name}"] = st.SampleState(
                study=study, sample=name, format="mtx", converted=True, cells=n, joinids=(start, start + n),
                ingest="done", atlas_cells=n, atlas_nnz=int(genes.sum()), sample_joinid=int(j))
        with soma.DataFrame.open(obs_uri, "w", context=atlas.context()) as obs:
            obs.write(pa.concat_tables(tables))
        with soma.DataFrame.open(samples_uri, "w", context=atlas.context()) as table:
            table.write(pa.Table.from_pylist(rows, schema=samples_schema))
        with soma.SparseNDArray.open(presence_uri, "w", context=atlas.context()) as matrix:
            r, c = (np.concatenate(x) for x in zip(*presence))
            matrix.write(pa.table({"soma_dim_0": r, "soma_dim_1": c, "soma_data": np.ones(len(r), dtype=bool)}))
        stamp = atlas.settled_timestamp()
        done = [k for k, s in state.samples.items()]
        state.history.append(st.HistoryEntry(
            serial=state.serial + 1, started_at=st.now(), finished_at=st.now(), timestamp_ms=stamp,
            changes={"added": done[-len(part):]}, cells_added=int(sizes[part].sum()),
            cells_total=int(sum(s.atlas_cells or 0 for s in state.samples.values())), verified=True))
        state.next_joinid = int(starts[part[-1]] + sizes[part[-1]])
        state.next_sample_joinid = int(part[-1]) + 1
        st.save_state(state, root / "atlases" / "atlas.state.json")
    atlas.mark_presence_complete(uri)
    for study in STUDIES:
        (root / "raw" / study / "mtx").mkdir(parents=True, exist_ok=True)
    manifest = root / "atlas.yaml"
    manifest.write_text(f"version: 1\natlas:\n  name: atlas\n  storage: atlases\nschema: "
                        f"{REPO_ROOT / 'schemas' / 'default.yaml'}\nstorage:\n  raw: raw\n  h5ad: h5ads\n"
                        f"  logs: logs\nstudies:\n" + "".join(f"  - name: {s}\n" for s in STUDIES))
    return manifest


def measure(manifest: Path, repeat: int) -> dict[str, float]:
    """Medians of `repeat` runs: the CLI in a fresh process, then the in-process parts."""
    from soma_manifest import api
    from soma_manifest.qc_page import render

    out = manifest.parent / "atlas-report.html"
    runs: dict[str, list[float]] = {"cli_s": [], "cli_cpu_s": [], "gather_s": [], "render_s": []}
    for _ in range(repeat):
        cpu = _children_cpu_s()
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "soma_manifest", "report", str(manifest), "--out", str(out)],
                                capture_output=True, text=True,
                                env={"PYTHONPATH": str(REPO_ROOT), "NO_COLOR": "1", "PATH": "/usr/bin:/bin"})
        runs["cli_s"].append(time.perf_counter() - started)
        runs["cli_cpu_s"].append(_children_cpu_s() - cpu)
        if result.returncode:
            raise SystemExit(result.stderr)
        started = time.perf_counter()
        report = api.load(manifest).report()
        runs["gather_s"].append(time.perf_counter() - started)
        started = time.perf_counter()
        render(report)
        runs["render_s"].append(time.perf_counter() - started)
    return {**{k: float(np.median(v)) for k, v in runs.items()}, "html_bytes": out.stat().st_size,
            "samples": len(report.samples), "atlas_bytes": dir_bytes(manifest.parent / "atlases" / "atlas")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--cells-per-sample", type=int, default=5_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/soma-manifest-bench-report"))
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (medians are printed)")
    parser.add_argument("--reuse", action="store_true", help="use the atlases a previous run generated in --work")
    args = parser.parse_args()
    print("| cells | samples | report (CLI, fresh process) s | its CPU s | gather s | render s | HTML "
          "| other load (cores) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cells in args.cells:
        manifest = args.work / f"cells-{cells}" / "atlas.yaml"
        if not (args.reuse and manifest.exists()):
            manifest = build(manifest.parent, cells, args.cells_per_sample)
        load = wait_until_idle(120)  # other sessions share the machine: wait for a quiet moment, say how quiet
        m = measure(manifest, args.repeat)
        print(f"| {cells:,} | {m['samples']:,} | {m['cli_s']:.2f} | {m['cli_cpu_s']:.2f} | {m['gather_s']:.2f} | "
              f"{m['render_s']:.2f} | "
              f"{m['html_bytes'] / 1024:,.0f} KB | {load:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""The QC report's numbers (`soma-manifest report`): gathered from obs, the samples table, the feature presence
matrix, the state and the history, never from X, and summarized (quantiles, histograms) so that the page stays
small whatever the atlas' size. report_html.py draws them; `--json` prints them.

Per cell, three QC metrics are summarized when the schema computes them: UMIs (`compute: umi_counts`),
genes per cell (`n_genes`, else `nnz`: the cell's genes with a count) and `pct_mito` (percent).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np

from soma_manifest import atlas
from soma_manifest.history import describe, is_readable, kept_serials
from soma_manifest.manifest import KeepHistory
from soma_manifest.schema import AtlasSchema
from soma_manifest.state import GeneMapping, HistoryEntry, State
from soma_manifest.tags import tagged

if TYPE_CHECKING:
    import pyarrow as pa
    import tiledbsoma

#: The quantiles a box is drawn from: whiskers at 5% and 95%, the box from 25% to 75%, the median.
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
BINS = 40  # histogram bins per metric (the violins)

# Outlier rules, stated in the report as they are applied.
FEW_CELLS_FRACTION = 0.2  # fewer cells than this fraction of the median sample's
HIGH_MITO_PCT = 10.0  # median pct_mito above this
UNMAPPED_FRACTION = 0.25  # at least this fraction of the sample's features unmapped (dropped or kept as is)
RULES = {
    "few cells": f"fewer cells than {FEW_CELLS_FRACTION:.0%} of the median sample's",
    "high mito": f"median pct_mito above {HIGH_MITO_PCT:g}%",
    "unmapped": f"{UNMAPPED_FRACTION:.0%} or more of the sample's features not mapped onto the gene reference",
}


@dataclass(frozen=True)
class Metric:
    """One per-cell QC metric; `log`: plotted on a log10 axis (values below 1 at 1)."""

    name: str  # umis | genes | pct_mito
    column: str  # its obs column
    label: str
    log: bool
    edges: list[float]  # histogram bin edges, in plotted units (log10 for log metrics)


_METRICS = (("umis", ("umi_counts",), "UMIs per cell", True), ("genes", ("n_genes", "nnz"), "genes per cell", True),
            ("pct_mito", ("pct_mito",), "pct_mito (%)", False))


@dataclass
class Summary:
    """One metric over one group's cells: QUANTILES, and (studies only) the histogram over the metric's edges."""

    quantiles: list[float]
    histogram: list[int] | None = None


@dataclass
class Row:
    """A study or a sample."""

    key: str  # "<study>" or "<study>/<sample>"
    study: str
    cells: int
    samples: int  # 1 for a sample
    metrics: dict[str, Summary]  # by Metric.name
    genes_measured: int | None  # a sample's presence row; a study's: the union of its samples'
    mapping: dict[str, int] | None = None  # features, mapped, summed, dropped, kept (with a gene reference)
    flags: list[str] = field(default_factory=list)  # outlier rules it meets (RULES)

    def median(self, metric: str) -> float | None:
        summary = self.metrics.get(metric)
        return summary.quantiles[QUANTILES.index(0.5)] if summary else None


@dataclass
class AtlasReport:
    atlas: str
    generated_at: str
    serial: int | None  # the apply read (None: the atlas now)
    tag: str | None
    overview: dict
    metrics: list[Metric]
    studies: list[Row]
    samples: list[Row]
    history: list[dict]  # serial, finished_at, cells_total, changes, tags; up to the apply read
    rules: dict[str, str] = field(default_factory=lambda: dict(RULES))
    quantiles: tuple[float, ...] = QUANTILES

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def gather(uri: str, schema: AtlasSchema, state: State, exp: tiledbsoma.Experiment, *, serial: int | None,
           tag: str | None, verify_problems: list[str] | None, keep: KeepHistory) -> AtlasReport:
    """The report of the experiment `exp` (open as of apply `serial`, or now) with the state's ledger."""
    metrics_at = {name: next((c.name for c in schema.obs if c.source == "computed" and c.computed in kinds), None)
                  for name, kinds, _, _ in _METRICS}
    columns = [c for c in metrics_at.values() if c]
    obs = exp.obs.read(column_names=["obs_id", *columns]).concat()
    ms = exp.ms[schema.measurement]
    n_genes = ms.var.count
    layers = sorted(ms.X.keys())
    table = _samples_table(exp)
    keys, codes = _sample_codes(obs)
    studies = sorted({k.split("/", 1)[0] for k in keys})
    study_of = np.array([studies.index(k.split("/", 1)[0]) for k in keys], dtype=np.int64)
    cell_study = study_of[codes] if len(keys) else np.zeros(0, dtype=np.int64)
    metrics = []
    sample_summaries: list[dict[str, Summary]] = [{} for _ in keys]
    study_summaries: list[dict[str, Summary]] = [{} for _ in studies]
    for name, _, label, log in _METRICS:
        column = metrics_at[name]
        if column is None:
            continue
        values = obs[column].to_numpy(zero_copy_only=False).astype(np.float64)
        plotted = np.log10(np.maximum(values, 1.0)) if log else values
        edges = _edges(plotted)
        metrics.append(Metric(name, column, label, log, edges.tolist()))
        order = np.argsort(values, kind="stable")  # once; each grouping below is a stable sort by group
        for group, summaries, n_groups, hist in ((codes, sample_summaries, len(keys), False),
                                                  (cell_study, study_summaries, len(studies), True)):
            quantiles = _group_quantiles(values, order, group, n_groups)
            counts = _group_histograms(plotted, edges, group, n_groups) if hist else None
            for g in range(n_groups):
                summaries[g][name] = Summary(quantiles[g].tolist(),
                                             counts[g].tolist() if counts is not None else None)
    cells = np.bincount(codes, minlength=len(keys)) if len(keys) else np.zeros(0, dtype=np.int64)
    measured = _measured(exp, schema, table, keys, studies)
    joinids = {row["sample_id"]: int(j) for j, row in table.iterrows()} if table is not None else {}
    sample_rows = [Row(key, key.split("/", 1)[0], int(cells[i]), 1, sample_summaries[i], measured.get(key),
                       _mapping(state, key, joinids.get(key)))
                   for i, key in enumerate(keys)]
    study_rows = [Row(s, s, int(cells[study_of == i].sum()), int((study_of == i).sum()), study_summaries[i],
                      measured.get(s), _total_mapping([r.mapping for r in sample_rows if r.study == s]))
                  for i, s in enumerate(studies)]
    _flag(sample_rows)
    for study in study_rows:
        study.flags = sorted({f for r in sample_rows if r.study == study.key for f in r.flags})
    entries = [e for e in state.history if serial is None or e.serial <= serial]
    names = tagged(state)
    kept = kept_serials(state, keep)
    history = [{"serial": e.serial, "finished_at": e.finished_at, "cells_total": e.cells_total,
                "changes": describe(e.changes), "tags": names.get(e.serial, []),
                "readable": is_readable(state, e), "kept": e.serial in kept} for e in entries]
    last = entries[-1] if entries else None
    overview = {
        "studies": len(studies), "samples": len(keys), "cells": len(obs), "genes": n_genes, "layers": layers,
        "genes_measured_by_any": measured.get("", None), "genes_measured_by_all": measured.get("*", None),
        "storage_bytes": _storage_bytes(uri), "fragments": _fragments(uri),
        "last_apply": {"serial": last.serial, "finished_at": last.finished_at} if last else None,
        "verify": _verify(last, verify_problems),
    }
    return AtlasReport(atlas=uri, generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       serial=serial, tag=tag, overview=overview, metrics=metrics, studies=study_rows,
                       samples=sample_rows, history=history)


def _sample_codes(obs: pa.Table) -> tuple[list[str], np.ndarray]:
    """The sample keys ("<study>/<sample>", the obs_id without its barcode), sorted, and each cell's index."""
    import pyarrow.compute as pc

    prefix = pc.replace_substring_regex(obs["obs_id"], pattern="/[^/]*$", replacement="")
    encoded = pc.dictionary_encode(prefix).combine_chunks() if len(obs) else None
    if encoded is None:
        return [], np.zeros(0, dtype=np.int64)
    found = encoded.dictionary.to_pylist()
    order = np.argsort(np.array(found, dtype=object))
    rank = np.empty(len(found), dtype=np.int64)
    rank[order] = np.arange(len(found))
    return sorted(found), rank[encoded.indices.to_numpy()]


def _edges(plotted: np.ndarray) -> np.ndarray:
    low, high = (float(plotted.min()), float(plotted.max())) if len(plotted) else (0.0, 1.0)
    return np.linspace(low, high if high > low else low + 1.0, BINS + 1)


def _group_quantiles(values: np.ndarray, order: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """QUANTILES of `values` within each group (linear interpolation, as np.quantile), from one value order."""
    if not n_groups:
        return np.zeros((0, len(QUANTILES)))
    by_group = order[np.argsort(group[order], kind="stable")]  # grouped, values ascending inside each group
    ranked = values[by_group]
    sizes = np.bincount(group, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    position = starts[:, None] + np.asarray(QUANTILES)[None, :] * np.maximum(sizes - 1, 0)[:, None]
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, starts[:, None] + np.maximum(sizes - 1, 0)[:, None])
    if not len(ranked):
        return np.zeros((n_groups, len(QUANTILES)))
    low, high = np.clip(low, 0, len(ranked) - 1), np.clip(high, 0, len(ranked) - 1)
    frac = position - np.floor(position)
    result = ranked[low] + (ranked[high] - ranked[low]) * frac
    result[sizes == 0] = np.nan
    return result


def _group_histograms(plotted: np.ndarray, edges: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    bins = np.clip(np.searchsorted(edges, plotted, side="right") - 1, 0, BINS - 1)
    return np.bincount(group * BINS + bins, minlength=n_groups * BINS).reshape(n_groups, BINS)


def _samples_table(exp: tiledbsoma.Experiment):
    """The samples table as read, or None in an atlas made before it."""
    if atlas.SAMPLES not in exp:
        return None
    return exp[atlas.SAMPLES].read().concat().to_pandas().set_index("soma_joinid")


def _measured(exp: tiledbsoma.Experiment, schema: AtlasSchema, table, keys: list[str],
              studies: list[str]) -> dict[str, int]:
    """Genes measured (presence matrix): per sample key, per study (the union of its samples'), "" by any
    sample and "*" by every sample. Empty in an atlas made before the presence matrix."""
    ms = exp.ms[schema.measurement]
    if table is None or atlas.PRESENCE not in ms or not len(table):
        return {}
    entries = ms[atlas.PRESENCE].read().tables().concat()
    rows, cols = entries["soma_dim_0"].to_numpy(), entries["soma_dim_1"].to_numpy()
    key_of = table["sample_id"]
    study_index = {s: i for i, s in enumerate(studies)}
    row_study = np.array([study_index.get(str(key_of.get(r, "")).split("/", 1)[0], -1) for r in
                          range(int(rows.max()) + 1)] if len(rows) else [], dtype=np.int64)
    wanted = set(keys)
    found = {str(key_of[j]): int(n) for j, n in table["n_measured_genes"].items() if str(key_of[j]) in wanted}
    if len(rows):
        study = row_study[rows]
        pairs = np.unique(study[study >= 0] * (int(cols.max()) + 1) + cols[study >= 0])
        per_study = np.bincount(pairs // (int(cols.max()) + 1), minlength=len(studies))
        found.update({s: int(per_study[i]) for i, s in enumerate(studies)})
        per_gene = np.bincount(cols)
        found[""] = int((per_gene > 0).sum())
        found["*"] = int((per_gene >= len(table)).sum())
    return found


def _mapping(state: State, key: str, sample_joinid: int | None) -> dict[str, int] | None:
    """The sample's gene mapping from the state, when the state's entry is the version read (same sample joinid)."""
    entry = state.samples.get(key)
    if entry is None or entry.gene_mapping is None or entry.sample_joinid != sample_joinid:
        return None
    return _mapping_counts(entry.gene_mapping)


def _mapping_counts(m: GeneMapping) -> dict[str, int]:
    return {"features": m.features, "mapped": m.by_id + m.by_alias_id + m.by_symbol + m.by_alias_symbol,
            "summed": m.summed, "dropped": m.dropped, "kept": m.kept}


def _total_mapping(mappings: list[dict[str, int] | None]) -> dict[str, int] | None:
    known = [m for m in mappings if m is not None]
    if not known:
        return None
    return {k: sum(m[k] for m in known) for k in known[0]}


def _flag(samples: list[Row]) -> None:
    """Mark the samples that meet an outlier rule (RULES)."""
    if not samples:
        return
    typical = float(np.median([r.cells for r in samples]))
    for row in samples:
        if row.cells < FEW_CELLS_FRACTION * typical:
            row.flags.append("few cells")
        mito = row.median("pct_mito")
        if mito is not None and mito > HIGH_MITO_PCT:
            row.flags.append("high mito")
        m = row.mapping
        if m and m["features"] and (m["dropped"] + m["kept"]) >= UNMAPPED_FRACTION * m["features"]:
            row.flags.append("unmapped")


def _storage_bytes(uri: str) -> int | None:
    """Bytes of the atlas folder now; None on object storage (not listed object by object)."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in path:
        return None
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:  # a file vacuumed away while walking
                pass
    return total


def _fragments(uri: str) -> int:
    """Fragments of every array of the atlas, now (compaction merges them)."""
    return sum(atlas.fragment_count(u) for u in atlas.array_uris(uri).values())


def _verify(last: HistoryEntry | None, problems: list[str] | None) -> dict:
    """Whether verify passed: run now (`problems` given), else the check the apply read made of what it wrote
    (`passed` None: not recorded, by a version before it was)."""
    if problems is not None:
        return {"ran": "now", "passed": not problems, "problems": problems[:20]}
    return {"ran": f"apply {last.serial}" if last is not None else None,
            "passed": last.verified if last is not None else None, "problems": []}

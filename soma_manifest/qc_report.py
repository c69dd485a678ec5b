"""The QC report's numbers (`soma-manifest report`): gathered from obs, the samples table, the feature presence
matrix, the state and the history, never from X, and summarized (quantiles, histograms) so that the page stays
small whatever the atlas' size. qc_page.py draws them; `--json` prints them.

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
from soma_manifest.history import is_readable, kept_serials
from soma_manifest.render import history_changes
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
    ms = exp.ms[schema.measurement]
    n_genes = ms.var.count
    layers = sorted(ms.X.keys())
    table = _samples_table(exp)
    obs, keys, codes = _cells_by_sample(exp, table, columns)
    studies = sorted({k.split("/", 1)[0] for k in keys})
    study_of = np.array([studies.index(k.split("/", 1)[0]) for k in keys], dtype=np.int64)
    cell_study = study_of[codes] if len(keys) else np.zeros(0, dtype=np.int64)
    metrics = []
    sample_summaries: list[dict[str, Summary]] = [{} for _ in keys]
    study_summaries: list[dict[str, Summary]] = [{} for _ in studies]
    groupings = [(_Grouping(codes, len(keys)), sample_summaries, False),
                 (_Grouping(cell_study, len(studies)), study_summaries, True)]
    for name, _, label, log in _METRICS:
        column = metrics_at[name]
        if column is None:
            continue
        values = obs[column].to_numpy(zero_copy_only=False).astype(np.float64)
        plotted = np.log10(np.maximum(values, 1.0)) if log else values
        edges = _edges(plotted)
        metrics.append(Metric(name, column, label, log, edges.tolist()))
        for grouping, summaries, hist in groupings:
            quantiles = grouping.quantiles(values)
            counts = _group_histograms(plotted, edges, grouping.group, grouping.n) if hist else None
            for g in range(grouping.n):
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
                "changes": history_changes(e.changes), "tags": names.get(e.serial, []),
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


def _cells_by_sample(exp: tiledbsoma.Experiment, table, columns: list[str]) -> tuple[pa.Table, list[str], np.ndarray]:
    """obs' `columns`, the sample keys ("<study>/<sample>") sorted, and each cell's index into them.

    A sample owns a contiguous joinid range, which the samples table records: cells are placed by their joinid
    (no obs_id strings to read). When a cell falls outside every range (an atlas read as of an apply before
    the samples table), the keys come from obs_id, whose prefix is the sample key.
    """
    if table is not None and len(table):
        obs = exp.obs.read(column_names=["soma_joinid", *columns]).concat()
        ranges = table.sort_values("obs_joinid_start")
        starts, stops = ranges["obs_joinid_start"].to_numpy(), ranges["obs_joinid_stop"].to_numpy()
        joinids = obs["soma_joinid"].to_numpy()
        at = np.searchsorted(starts, joinids, side="right") - 1
        if len(joinids) == 0 or (at.min() >= 0 and (joinids < stops[at]).all()):
            found = ranges["sample_id"].astype(str).tolist()
            keys = sorted(set(found))
            rank = _ranks(found, keys)
            return obs, keys, rank[at] if len(at) else np.zeros(0, dtype=np.int64)
    import pyarrow.compute as pc

    obs = exp.obs.read(column_names=["obs_id", *columns]).concat()
    if not len(obs):
        return obs, [], np.zeros(0, dtype=np.int64)
    prefix = pc.replace_substring_regex(obs["obs_id"], pattern="/[^/]*$", replacement="")
    encoded = pc.dictionary_encode(prefix).combine_chunks()
    found = encoded.dictionary.to_pylist()
    keys = sorted(found)
    rank = _ranks(found, keys)
    return obs, keys, rank[encoded.indices.to_numpy()]


def _ranks(found: list[str], keys: list[str]) -> np.ndarray:
    index = {k: i for i, k in enumerate(keys)}
    return np.array([index[k] for k in found], dtype=np.int64)


def _edges(plotted: np.ndarray) -> np.ndarray:
    low, high = (float(plotted.min()), float(plotted.max())) if len(plotted) else (0.0, 1.0)
    return np.linspace(low, high if high > low else low + 1.0, BINS + 1)


class _Grouping:
    """Cells grouped (by sample or study), for quantiles per group: the grouping order is computed once."""

    def __init__(self, group: np.ndarray, n: int) -> None:
        self.group, self.n = group, n
        # Cells arrive in joinid order and a sample's cells are one joinid range, so this is nearly sorted.
        self.order = np.argsort(group, kind="stable")
        self.sizes = np.bincount(group, minlength=n) if n else np.zeros(0, dtype=np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def quantiles(self, values: np.ndarray) -> np.ndarray:
        """QUANTILES of `values` within each group (linear interpolation, as np.quantile); NaN for an empty one."""
        ranked = values[self.order]
        for a, b in zip(self.bounds[:-1], self.bounds[1:]):
            ranked[a:b].sort()
        result = np.full((self.n, len(QUANTILES)), np.nan)
        full = self.sizes > 0
        last = np.maximum(self.sizes - 1, 0)[:, None]
        position = np.asarray(QUANTILES)[None, :] * last
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, last)
        base = self.bounds[:-1, None]
        if len(ranked):
            lo, hi = ranked[np.minimum(base + low, len(ranked) - 1)], ranked[np.minimum(base + high, len(ranked) - 1)]
            result[full] = (lo + (hi - lo) * (position - low))[full]
        return result


def _group_histograms(plotted: np.ndarray, edges: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    # The edges are evenly spaced (_edges): a bin is arithmetic, no search.
    bins = np.clip(((plotted - edges[0]) * (BINS / (edges[-1] - edges[0]))).astype(np.int64), 0, BINS - 1)
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
    wanted = set(keys)
    found = {str(k): int(n) for k, n in zip(table["sample_id"], table["n_measured_genes"]) if str(k) in wanted}
    if len(rows):
        study_index = {s: i for i, s in enumerate(studies)}
        row_study = np.full(int(rows.max()) + 1, -1, dtype=np.int64)
        for joinid, key in table["sample_id"].items():
            if joinid < len(row_study):
                row_study[joinid] = study_index.get(str(key).split("/", 1)[0], -1)
        study = row_study[rows]
        inside = study >= 0
        n_var = int(cols.max()) + 1
        seen = np.bincount(study[inside] * n_var + cols[inside], minlength=len(studies) * n_var)
        found.update({s: int(n) for s, n in zip(studies, (seen.reshape(len(studies), n_var) > 0).sum(axis=1))})
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

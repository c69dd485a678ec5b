"""The QC report as one self-contained HTML page: inline CSS, inline SVG figures, a few lines of inline script
(sortable tables); nothing is fetched, so it opens offline and can be mailed or attached to a CI run.

Why hand-written SVG: the figures are boxes, violins, bars and one line drawn from summaries (quantiles,
histograms) that qc_report.py already computed, so a plotting library would add an import (matplotlib: ~0.5 s
and a dependency) or a bundled JS library (hundreds of KB inline) to draw a few hundred shapes. Each sample is
one row of a few shapes, never one point per cell, so the page's size grows with the samples, not the cells.
"""

from __future__ import annotations

import math
from html import escape

from soma_manifest.qc_report import QUANTILES, AtlasReport, Metric, Row

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
FLAG_COLOR = "#c0392b"
WIDTH = 760  # of every figure, in px
LABEL_MAX = 34  # characters of a row label shown (the full key is in the row's tooltip)
_Q = {q: i for i, q in enumerate(QUANTILES)}


def figure_ids(report: AtlasReport) -> list[str]:
    """The ids of the figures the page holds for this report (tests check each is drawn)."""
    ids = [f"fig-{m.name}-by-study" for m in report.metrics]
    ids += ["fig-cells-per-sample", "fig-genes-measured-per-sample"]
    ids += [f"fig-{m.name}-by-sample" for m in report.metrics]
    return ids + ["fig-cells-over-applies"]


def render(report: AtlasReport) -> str:
    """The whole page."""
    colors = {s.key: PALETTE[i % len(PALETTE)] for i, s in enumerate(report.studies)}
    when = (f"as apply {report.serial} left it" + (f" (tag {escape(report.tag)})" if report.tag else "")
            if report.serial is not None else "now")
    parts = [f"<h1>Atlas report: {escape(_name(report.atlas))}</h1>",
             f"<p class='sub'>{escape(report.atlas)}, {when}; generated {escape(report.generated_at)}.</p>",
             _overview(report), _legend(report, colors),
             "<h2>By study</h2>", "<div class='grid'>",
             *(_study_figure(report, m, colors) for m in report.metrics), "</div>",
             _table("studies", report.studies, report, study_level=True),
             "<h2>By sample</h2>", _rules(report), "<div class='grid'>",
             _bars("fig-cells-per-sample", "Cells per sample", report.samples, colors, lambda r: r.cells),
             _bars("fig-genes-measured-per-sample", "Genes measured per sample", report.samples, colors,
                   lambda r: r.genes_measured),
             *(_sample_figure(report, m, colors) for m in report.metrics), "</div>",
             _table("samples", report.samples, report, study_level=False),
             "<h2>History</h2>", _history(report)]
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>Atlas report: {escape(_name(report.atlas))}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(parts)}<script>{_SCRIPT}</script></body></html>\n")


# ---------------------------------------------------------------- text parts


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _fmt(value: float | int | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 100:
        return f"{int(round(value)):,}"
    return f"{value:.{digits}g}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "not measured on object storage"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def _overview(report: AtlasReport) -> str:
    o = report.overview
    last = o["last_apply"]
    verify = o["verify"]
    if verify["passed"] is None:
        checked = "not recorded"
    else:
        now = verify["ran"] == "now"
        checked = ("passed" if verify["passed"] else "failed" + (f" ({len(verify['problems'])} shown below)"
                                                                  if now else "")) + (
            " (run now)" if now else f" (the check {verify['ran']} made of what it wrote)")
    cards = [("studies", _fmt(o["studies"])), ("samples", _fmt(o["samples"])), ("cells", _fmt(o["cells"])),
             ("genes (var rows)", _fmt(o["genes"])),
             ("genes measured", f"{_fmt(o['genes_measured_by_any'])} by any sample, "
                                f"{_fmt(o['genes_measured_by_all'])} by all"),
             ("layers", ", ".join(o["layers"]) or "–"), ("size on storage (now)", _bytes(o["storage_bytes"])),
             ("fragments (now)", _fmt(o["fragments"])),
             ("last apply", f"{last['serial']} at {last['finished_at']}" if last else "–"),
             ("verify", checked)]
    items = "".join(f"<div class='card'><div class='k'>{escape(k)}</div><div class='v'>{escape(v)}</div></div>"
                    for k, v in cards)
    problems = "".join(f"<li>{escape(p)}</li>" for p in verify["problems"])
    return f"<section id='overview' class='cards'>{items}</section>" + (f"<ul class='bad'>{problems}</ul>"
                                                                          if problems else "")


def _legend(report: AtlasReport, colors: dict[str, str]) -> str:
    items = "".join(f"<span><i style='background:{colors[s.key]}'></i>{escape(s.key)}</span>" for s in report.studies)
    return f"<p class='legend'>{items}</p>"


def _rules(report: AtlasReport) -> str:
    flagged = sum(1 for r in report.samples if r.flags)
    rules = "; ".join(f"<b>{escape(k)}</b>: {escape(v)}" for k, v in report.rules.items())
    return (f"<p class='rules'><span class='flag'>⚑</span> {flagged} of {len(report.samples)} samples marked as "
            f"outliers. Rules: {rules}. Boxes span the 25–75% quantiles with the median; whiskers reach the 5% "
            f"and 95% quantiles; violins are histograms of every cell.</p>")


_COLUMNS = (("cells", "cells"), ("umis", "median UMIs"), ("genes", "median genes"), ("pct_mito", "median pct_mito"),
            ("mapped", "mapped"), ("dropped", "dropped"), ("summed", "summed"), ("measured", "genes measured"))


def _table(name: str, rows: list[Row], report: AtlasReport, *, study_level: bool) -> str:
    head = ["study" if study_level else "sample"] + (["samples"] if study_level else ["study"])
    head += [label for _, label in _COLUMNS] + ["outlier"]
    ths = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = []
    for r in rows:
        m = r.mapping or {}
        values = {"cells": r.cells, "umis": r.median("umis"), "genes": r.median("genes"),
                  "pct_mito": r.median("pct_mito"), "mapped": m.get("mapped"), "dropped": m.get("dropped"),
                  "summed": m.get("summed"), "measured": r.genes_measured}
        second = f"<td class='n' data-v='{r.samples}'>{r.samples}</td>" if study_level else f"<td>{escape(r.study)}</td>"
        cells = [f"<td>{escape(r.key)}</td>", second]
        for key, _ in _COLUMNS:
            v = values[key]
            sort = "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"
            cells.append(f"<td class='n' data-v='{sort}'>{_fmt(v)}</td>")
        flags = ", ".join(r.flags)
        cells.append(f"<td>{'<span class=flag>⚑</span> ' + escape(flags) if flags else ''}</td>")
        body.append(f"<tr{' class=flagged' if r.flags else ''}>{''.join(cells)}</tr>")
    note = "" if any(r.mapping for r in rows) else (
        "<p class='note'>Gene mapping columns are empty: the schema has no gene reference, or the state's entry "
        "is of another version of the sample than the one read.</p>")
    return (f"<table id='table-{name}' class='sortable'><thead><tr>{ths}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>{note}")


# ---------------------------------------------------------------- figures


class _Axis:
    """Values to x pixels over [x0, x1]; log10 for log metrics (values below 1 drawn at 1)."""

    def __init__(self, low: float, high: float, x0: float, x1: float, log: bool) -> None:
        self.log = log
        self.low, self.high = (self._t(low), self._t(high))
        if self.high <= self.low:
            self.high = self.low + 1.0
        self.x0, self.x1 = x0, x1

    def _t(self, v: float) -> float:
        return math.log10(max(v, 1.0)) if self.log else v

    def x(self, v: float) -> float:
        return self.px(self._t(v))

    def px(self, t: float) -> float:
        """x of a value already in axis units (log10 for a log axis)."""
        return self.x0 + (t - self.low) / (self.high - self.low) * (self.x1 - self.x0)

    def ticks(self) -> list[tuple[float, str]]:
        if self.log:
            # 1, 10, 100, ...; over less than two decades also 2 and 5 of each
            steps = (1, 2, 5) if self.high - self.low < 2 else (1,)
            exps = range(math.floor(self.low), math.ceil(self.high) + 1)
            marks = [math.log10(m * 10.0 ** e) for e in exps for m in steps]
            return [(t, _short(10.0 ** t)) for t in marks if self.low - 1e-9 <= t <= self.high + 1e-9]
        step = _nice_step((self.high - self.low) / 5)
        start = math.ceil(self.low / step) * step
        return [(start + i * step, _short(start + i * step)) for i in range(int((self.high - start) / step) + 1)]


def _nice_step(raw: float) -> float:
    power = 10.0 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _short(v: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= size:
            return f"{v / size:.3g}{suffix}"
    return f"{round(v, 6):g}"


def _label_width(rows: list[Row]) -> int:
    return min(max((len(r.key) for r in rows), default=4), LABEL_MAX) * 7 + 24


def _frame(fig_id: str, title: str, rows: list[Row], row_height: int, axis: _Axis, colors: dict[str, str],
           body: list[str], note: str = "") -> str:
    """A figure of one row per study or sample: labels on the left, the x axis with its ticks below."""
    top, bottom = 6, 28
    height = top + row_height * max(len(rows), 1) + bottom
    out = [f"<figure id='{fig_id}' class='fig'><figcaption>{escape(title)}{note}</figcaption>",
           f"<svg width='{WIDTH}' height='{height}' "
           f"viewBox='0 0 {WIDTH} {height}' role='img' aria-label='{escape(title)}'>"]
    base = top + row_height * max(len(rows), 1)
    for t, label in axis.ticks():
        x = axis.px(t)
        out.append(f"<line class='grid' x1='{x:.1f}' x2='{x:.1f}' y1='{top}' y2='{base}'/>"
                   f"<text class='tick' x='{x:.1f}' y='{base + 14}'>{escape(label)}</text>")
    out.append(f"<line class='axis' x1='{axis.x0}' x2='{axis.x1}' y1='{base}' y2='{base}'/>")
    for i, r in enumerate(rows):
        y = top + i * row_height + row_height / 2
        label = r.key if len(r.key) <= LABEL_MAX else r.key[: LABEL_MAX - 1] + "…"
        flag = "<tspan class='flag'>⚑ </tspan>" if r.flags else ""
        out.append(f"<text class='label' x='{axis.x0 - 8}' y='{y + 4:.1f}'>{flag}{escape(label)}</text>")
    out += body
    out.append("</svg></figure>")
    return "".join(out)


def _study_figure(report: AtlasReport, metric: Metric, colors: dict[str, str]) -> str:
    """Violins (the histogram of every cell of the study) with a box over each."""
    rows = report.studies
    row_height = 40
    axis = _axis_for(metric, rows, _label_width(rows))
    body = []
    for i, r in enumerate(rows):
        s = r.metrics[metric.name]
        cy = 6 + i * row_height + row_height / 2
        color = colors[r.study]
        counts = s.histogram or []
        peak = max(counts) if counts else 0
        if peak:
            centers = [(a + b) / 2 for a, b in zip(metric.edges, metric.edges[1:])]
            used = [k for k, c in enumerate(counts) if c]
            span = range(used[0], used[-1] + 1)
            half = row_height / 2 - 3
            top = [f"{axis.px(centers[k]):.1f},{cy - half * counts[k] / peak:.1f}" for k in span]
            low = [f"{axis.px(centers[k]):.1f},{cy + half * counts[k] / peak:.1f}" for k in reversed(span)]
            body.append(f"<polygon class='violin' points='{' '.join(top + low)}' fill='{color}'/>")
        body.append(_box(axis, s.quantiles, cy, 6, color, _tip(r, metric, s.quantiles), filled=False))
    return _frame(f"fig-{metric.name}-by-study", f"{metric.label} by study", rows, row_height, axis, colors, body,
                  " (log scale)" if metric.log else "")


def _sample_figure(report: AtlasReport, metric: Metric, colors: dict[str, str]) -> str:
    rows = report.samples
    row_height = 16
    axis = _axis_for(metric, rows, _label_width(rows))
    body = [_box(axis, r.metrics[metric.name].quantiles, 6 + i * row_height + row_height / 2, 5, colors[r.study],
                 _tip(r, metric, r.metrics[metric.name].quantiles), filled=True)
            for i, r in enumerate(rows)]
    return _frame(f"fig-{metric.name}-by-sample", f"{metric.label} by sample", rows, row_height, axis, colors, body,
                  " (log scale)" if metric.log else "")


def _axis_for(metric: Metric, rows: list[Row], left: int) -> _Axis:
    """From the metric's histogram range (every cell), so that whiskers and violins fit."""
    low, high = metric.edges[0], metric.edges[-1]
    if metric.log:
        low, high = 10.0 ** low, 10.0 ** high
    return _Axis(low, high, left, WIDTH - 16, metric.log)


def _tip(r: Row, metric: Metric, q: list[float]) -> str:
    parts = ", ".join(f"{int(k * 100)}%: {_fmt(v)}" for k, v in zip(QUANTILES, q))
    return f"{r.key}: {metric.label} {parts} ({r.cells:,} cells)"


def _box(axis: _Axis, q: list[float], cy: float, half: float, color: str, tip: str, *, filled: bool) -> str:
    if any(v is None or math.isnan(v) for v in q):
        return ""
    x05, x25, x50, x75, x95 = (axis.x(q[_Q[k]]) for k in QUANTILES)
    fill = color if filled else "#ffffff"
    return (f"<g class='box'><title>{escape(tip)}</title>"
            f"<line x1='{x05:.1f}' x2='{x95:.1f}' y1='{cy:.1f}' y2='{cy:.1f}' stroke='#333'/>"
            f"<rect x='{x25:.1f}' y='{cy - half:.1f}' width='{max(x75 - x25, 1):.1f}' height='{2 * half:.1f}' "
            f"fill='{fill}' fill-opacity='{0.75 if filled else 0.9}' stroke='#333'/>"
            f"<line x1='{x50:.1f}' x2='{x50:.1f}' y1='{cy - half:.1f}' y2='{cy + half:.1f}' stroke='#000' "
            f"stroke-width='2'/></g>")


def _bars(fig_id: str, title: str, rows: list[Row], colors: dict[str, str], value) -> str:
    row_height = 16
    values = [value(r) for r in rows]
    known = [v for v in values if v is not None]
    axis = _Axis(0, max(known, default=1) or 1, _label_width(rows), WIDTH - 60, False)
    body = []
    for i, (r, v) in enumerate(zip(rows, values)):
        if v is None:
            continue
        y = 6 + i * row_height
        body.append(f"<g class='bar'><title>{escape(r.key)}: {v:,}</title>"
                    f"<rect x='{axis.x0}' y='{y + 3}' width='{max(axis.x(v) - axis.x0, 1):.1f}' "
                    f"height='{row_height - 6}' fill='{colors[r.study]}'/>"
                    f"<text class='val' x='{axis.x(v) + 4:.1f}' y='{y + row_height - 4}'>{_short(v)}</text></g>")
    note = "" if known else " (not in this atlas: it has no samples table yet)"
    return _frame(fig_id, title, rows, row_height, axis, colors, body, note)


def _history(report: AtlasReport) -> str:
    """Cells after each apply of the history (up to the apply read), with its tags."""
    entries = report.history
    width, height, left, right, top, bottom = WIDTH, 240, 70, 20, 24, 40
    peak = max((e["cells_total"] for e in entries), default=1) or 1
    y_axis = _Axis(0, peak, 0, 1, False)
    ticks = y_axis.ticks()
    top_value = max(peak, ticks[-1][0]) if ticks else peak

    def y(v: float) -> float:
        return top + (1 - v / top_value) * (height - top - bottom)

    def x(i: int) -> float:
        return left + (i + 0.5) * (width - left - right) / max(len(entries), 1)

    out = ["<figure id='fig-cells-over-applies' class='fig wide'><figcaption>Cells after each apply</figcaption>",
           f"<svg width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
           f"role='img' aria-label='Cells after each apply'>"]
    for v, label in ticks:
        out.append(f"<line class='grid' x1='{left}' x2='{width - right}' y1='{y(v):.1f}' y2='{y(v):.1f}'/>"
                   f"<text class='label' x='{left - 6}' y='{y(v) + 4:.1f}'>{escape(label)}</text>")
    if entries:
        points = " ".join(f"{x(i):.1f},{y(e['cells_total']):.1f}" for i, e in enumerate(entries))
        out.append(f"<polyline class='line' points='{points}'/>")
    every = max(1, len(entries) // 20)  # at most ~20 serial labels
    for i, e in enumerate(entries):
        tip = f"apply {e['serial']} at {e['finished_at']}: {e['changes']}; {e['cells_total']:,} cells"
        out.append(f"<g class='point'><title>{escape(tip)}</title><circle cx='{x(i):.1f}' "
                   f"cy='{y(e['cells_total']):.1f}' r='4'/></g>")
        if i % every == 0 or i == len(entries) - 1:
            out.append(f"<text class='tick' x='{x(i):.1f}' y='{height - bottom + 16}'>{e['serial']}</text>")
        if e["tags"]:
            out.append(f"<text class='tag' x='{x(i):.1f}' y='{y(e['cells_total']) - 9:.1f}'>"
                       f"{escape(', '.join(e['tags']))}</text>")
    out.append(f"<text class='tick' x='{(left + width - right) / 2:.0f}' y='{height - 4}'>apply (serial)</text>")
    if not entries:
        out.append(f"<text class='tick' x='{width / 2:.0f}' y='{height / 2:.0f}'>no applies recorded</text>")
    out.append("</svg></figure>")
    return "".join(out)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#222;margin:24px auto;max-width:1580px;
padding:0 16px}
h1{font-size:22px;margin:0 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#666;margin:0 0 14px}.note{color:#666;font-size:12px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:8px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 10px}.card .k{color:#666;font-size:12px}
.card .v{font-size:16px;font-weight:600}
.legend span{margin-right:14px;white-space:nowrap}.legend i{display:inline-block;width:11px;height:11px;
margin-right:5px;border-radius:2px;vertical-align:-1px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(620px,1fr));gap:10px}
.fig svg{width:100%;height:auto;max-width:980px}.fig.wide svg{max-width:760px}
.fig{margin:0;border:1px solid #eee;border-radius:6px;padding:6px}figcaption{font-weight:600;margin:0 0 4px}
svg text{font:11px system-ui,sans-serif;fill:#333}svg .tick{text-anchor:middle;fill:#666}
svg .label{text-anchor:end}svg .val{fill:#555;font-size:10px}svg .tag{text-anchor:middle;font-weight:700;fill:#8e44ad}
svg .grid{stroke:#eee}svg .axis{stroke:#999}svg .violin{fill-opacity:.45;stroke:#555;stroke-width:.5}
svg .line{fill:none;stroke:#4e79a7;stroke-width:2}svg circle{fill:#4e79a7}
.flag{color:#c0392b;fill:#c0392b}
table{border-collapse:collapse;margin:10px 0;font-size:13px}
th,td{border-bottom:1px solid #eee;padding:3px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
th{cursor:pointer;background:#f6f6f6;position:sticky;top:0;user-select:none}th:after{content:' ⇅';color:#aaa}
tr.flagged td{background:#fdf0ee}.rules{font-size:13px}.bad{color:#c0392b}
"""

# Click a header to sort by it (numbers by their data-v, text otherwise); click again to reverse.
_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var dir = th.getAttribute('data-dir') === 'asc' ? -1 : 1;
      th.setAttribute('data-dir', dir === 1 ? 'asc' : 'desc');
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col], u = x.getAttribute('data-v'), v = y.getAttribute('data-v');
        if (u !== null && v !== null) {
          var p = u === '' ? -Infinity : parseFloat(u), q = v === '' ? -Infinity : parseFloat(v);
          return dir * (p - q);
        }
        return dir * x.textContent.localeCompare(y.textContent);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

"""Plans and ledgers as text (rich markup), markdown and JSON. Returns strings; never prints."""

from __future__ import annotations

import json

from rich.markup import escape

from soma_manifest.evolution import SchemaChange
from soma_manifest.plan import KINDS, PLAN_FORMAT_VERSION, Action, Plan
from soma_manifest.state import State

_STYLE = {"add": "green", "replace": "yellow", "update": "cyan", "ingest": "green", "resume": "magenta",
          "retry": "magenta", "remove": "red", "cleanup": "red", "invalid": "bold red"}
_VERB = {"add": "to add", "replace": "to replace", "update": "to update", "ingest": "to ingest",
         "resume": "to resume", "retry": "to retry", "remove": "to remove", "cleanup": "orphan ranges to delete",
         "invalid": "unreadable"}
FOLD_AFTER = 20  # markdown: a longer group goes into a collapsed <details> block
MAX_ROWS = 200  # markdown: rows shown per group (a GitHub comment holds at most 65,536 characters)


def _cells(action: Action) -> str:
    parts = []
    if action.cells is not None:
        parts.append(f"{action.cells:,} cells")
    if action.delete_range is not None and action.kind not in ("remove", "cleanup"):
        parts.append(f"replaces joinids {action.delete_range[0]}-{action.delete_range[1]}")
    return ", ".join(parts)


def schema_change_line(change: SchemaChange) -> str:
    """`+ obs column donor (string, from sample_metadata; default unknown): filled for 1,234 samples`."""
    label = {"obs": "obs column", "var": "var column", "layer": "layer"}[change.what]
    if change.kind == "drop":
        return f"- {label} {change.name}"
    cost = ""
    if change.what == "obs":
        cost = f": filled for {change.samples:,} samples"
    elif change.what == "layer":
        cost = f": computed for {change.samples:,} samples, {_count(change.entries or 0)} entries"
    return f"+ {label} {change.name} ({change.type}, {change.detail}){cost}"


def _count(n: int) -> str:
    """1.2B, 3.4M, 12,345: an entry count at a glance."""
    for size, unit in ((10**9, "B"), (10**6, "M")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:,}"


def summary_line(plan: Plan) -> str:
    s = plan.summary
    if not plan.has_changes:
        return f"No changes. {s.samples} samples, all up to date."
    counts = ", ".join(f"{n} {_VERB[k]}" for k, n in s.actions.items())
    if plan.schema_changes:
        n = len(plan.schema_changes)
        counts = f"{n} schema change{'s' if n > 1 else ''} in place" + (f", {counts}" if counts else "")
    created = "create the atlas; " if plan.create_atlas else ""
    cells = f"; {s.cells_deleted:,} cells deleted" if s.cells_deleted else ""
    return f"Plan: {created}{counts}; {s.unchanged} unchanged; {s.steps} steps{cells}."


def _genes(state: State | None, key: str) -> list[str]:
    """The sample's last gene-mapping report, as an indented line (none without a reference)."""
    entry = state.samples.get(key) if state is not None else None
    if entry is None or entry.gene_mapping is None:
        return []
    return [f"  [dim]      genes: {escape(entry.gene_mapping.text())}[/]"]


def plan_text(plan: Plan, *, verbose: bool = False, state: State | None = None) -> str:
    """The plan; `verbose` adds up-to-date samples and, given the `state`, each sample's gene mapping."""
    lines = [f"soma-manifest plan for {escape(plan.manifest)}",
             f"  atlas {escape(plan.atlas)} (state serial {plan.serial if plan.serial is not None else 'none'})", ""]
    if plan.create_atlas:
        lines.append(f"  [green]+ create atlas[/] {escape(plan.atlas)}")
    for change in plan.schema_changes:
        lines.append(f"  [{'green' if change.kind == 'add' else 'red'}]{escape(schema_change_line(change))}[/]")
    width = max((len(a.key) for a in plan.actions), default=0)
    for a in plan.actions:
        style = _STYLE[a.kind]
        symbol = KINDS[a.kind]
        steps = " -> ".join(a.steps) if a.steps else "none"
        extra = _cells(a)
        lines.append(f"  [{style}]{symbol:>3} {escape(a.key):<{width}}  {a.kind:<8}[/] {escape(a.reason)}"
                     + (f"  [dim]({extra})[/]" if extra else "") + f"  [dim]steps: {steps}[/]")
        if verbose:
            lines += _genes(state, a.key)
    if verbose:
        for key in plan.unchanged:
            lines.append(f"  [dim]  = {escape(key)}  up to date[/]")
            lines += _genes(state, key)
    if plan.actions or plan.create_atlas or plan.schema_changes:
        lines.append("")
    lines.append(f"[bold]{summary_line(plan)}[/]")
    if plan.deletions:
        lines.append("[red]This plan deletes cells: apply needs --allow-delete.[/]")
    return "\n".join(lines)


def plan_markdown(plan: Plan) -> str:
    """A pull-request comment: summary first, then a table per kind; long tables folded, longer ones cut."""
    serial = plan.serial if plan.serial is not None else "none"
    out = [f"### soma-manifest plan for `{_md(plan.manifest)}`", "", f"**{summary_line(plan)}**", "",
           f"Atlas `{_md(plan.atlas)}`, state serial {serial}.", ""]
    deleting = plan.deletions
    if deleting:
        cells = sum(a.cells or 0 for a in deleting)
        out += [f"> **This plan deletes {cells:,} cells of {len(deleting)} removed sample(s)**: "
                "apply it with `--allow-delete`.", ""]
    if plan.schema_changes:
        lines = [f"- `{_md(schema_change_line(c))}`" for c in plan.schema_changes]
        out += ["#### schema changes (in place)", "", *lines, ""]
    groups: dict[str, list[Action]] = {}
    for a in plan.actions:
        groups.setdefault(a.kind, []).append(a)
    for kind in (k for k in KINDS if k in groups):
        actions = groups[kind]
        rows = ["| sample | reason | cells | steps |", "|---|---|--:|---|"]
        rows += [f"| `{_md(a.key)}` | {_md(a.reason)} | {f'{a.cells:,}' if a.cells is not None else ''} "
                 f"| {' → '.join(a.steps)} |" for a in actions[:MAX_ROWS]]
        if len(actions) > MAX_ROWS:
            rows.append(f"| … | {len(actions) - MAX_ROWS:,} more: see the JSON plan | | |")
        title = f"{KINDS[kind]} {kind}: {len(actions)}"
        if len(actions) > FOLD_AFTER:
            out += [f"<details><summary><b>{title}</b></summary>", "", *rows, "", "</details>", ""]
        else:
            out += [f"#### {title}", "", *rows, ""]
    return "\n".join(out)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def plan_json_schema() -> dict:
    """The JSON Schema of the plan document, generated from the Plan model."""
    schema = Plan.model_json_schema(mode="serialization")
    schema["title"] = f"soma-manifest plan, format version {PLAN_FORMAT_VERSION}"
    schema["properties"]["format_version"]["const"] = PLAN_FORMAT_VERSION  # a reader of v1 rejects other versions
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://soma-manifest.invalid/plan.schema.json", **schema}


def ledger_rows(state: State) -> list[dict]:
    rows = []
    for key in sorted(state.samples):
        s = state.samples[key]
        rows.append({
            "key": key, "format": s.format, "converted": s.converted, "ingest": s.ingest,
            "cells": s.atlas_cells if s.ingest == "done" else s.cells,
            "nnz": s.atlas_nnz if s.ingest == "done" else s.nnz,
            "joinids": list(s.joinids) if s.joinids else None,
            "ingested_at": s.ingested_at, "failed_step": s.failed_step, "error": s.error, "h5ad": s.h5ad,
            "gene_mapping": s.gene_mapping.model_dump() if s.gene_mapping else None,
        })
    return rows


def ledger_json(state: State) -> str:
    return json.dumps({"format_version": 1, "lineage": state.lineage, "serial": state.serial,
                       "atlas": state.atlas, "samples": ledger_rows(state)}, indent=1)


def ledger_text(state: State) -> str:
    rows = ledger_rows(state)
    head = f"{'sample':<40} {'status':<10} {'cells':>9} {'nnz':>12}  joinids"
    lines = [f"atlas {escape(state.atlas)} (lineage {state.lineage}, serial {state.serial})", head]
    for r in rows:
        status = "failed" if r["failed_step"] else r["ingest"]
        joinids = f"{r['joinids'][0]}-{r['joinids'][1]}" if r["joinids"] else ""
        cells = f"{r['cells']:,}" if r["cells"] is not None else ""
        nnz = f"{r['nnz']:,}" if r["nnz"] is not None else ""
        lines.append(f"{escape(r['key']):<40} {status:<10} {cells:>9} {nnz:>12}  {joinids}")
        if r["error"]:
            lines.append(f"    [red]{escape(r['failed_step'])}: {escape(r['error'])}[/]")
        lines += _genes(state, r["key"])
    total = sum(r["cells"] or 0 for r in rows if r["ingest"] == "done")
    lines.append(f"{len(rows)} samples, {total:,} cells in the atlas")
    return "\n".join(lines)


def history_changes(changes: dict[str, list[str]]) -> str:
    """`added 2, replaced 1` for the changes of a history entry."""
    return ", ".join(f"{word} {len(keys)}" for word, keys in changes.items()) or "created the atlas"


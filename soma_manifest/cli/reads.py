"""The commands that read the atlas and its applies: the ledger and summaries, history, release tags, diffs,
the QC report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from soma_manifest import api, render
from soma_manifest.cli.app import NoColor, PlanFormat, app, output_format
from soma_manifest.cli.console import Output, guard


@app.command()
def show(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable ledger."),
    summary: bool = typer.Option(False, "--summary", help="Summarize the atlas itself (cells, genes, samples)."),
    serial: Optional[int] = typer.Option(None, "--serial", help="With --summary: the atlas as apply SERIAL left it "
                                                                 "(see `history`)."),
    tag: Optional[str] = typer.Option(None, "--tag", help="With --summary: the atlas as the apply tagged TAG left it."),
    no_color: NoColor = False,
) -> None:
    """The per-sample ledger from the state."""
    if (serial is not None or tag is not None) and not summary:
        raise typer.BadParameter("--serial and --tag need --summary (the ledger is always the current state's)",
                                 param_hint="--tag" if tag is not None else "--serial")

    def run() -> int:
        atlas = api.load(manifest_path)
        state = atlas.require_state()
        if as_json:
            sys.stdout.write(render.ledger_json(state) + "\n")
        else:
            Output.out().print(render.ledger_text(state))
        if summary:
            _print_summary(atlas.summary(serial, tag=tag), atlas.schema)
        return 0

    guard(run)


def _print_summary(found: api.AtlasSummary, schema: api.AtlasSchema) -> None:
    out = Output.out()
    named = f" ({found.tag})" if found.tag else ""
    when = f" as apply {found.serial}{named} left it" if found.serial is not None else ""
    out.print(f"\nAtlas {escape(found.uri)}{when}: {found.cells:,} cells x {found.genes:,} genes, "
              f"layers {', '.join(found.layers)}, {len(found.samples)} samples")
    for (study, sample), cells in sorted(found.samples.items()) if found.serial is not None else ():
        out.print(f"  {study}/{sample}: {cells:,} cells", markup=False)
    at = f", tiledb_timestamp={found.timestamp_ms}" if found.timestamp_ms is not None else ""
    out.print(f"Read it with: tiledbsoma.Experiment.open(uri{at}).axis_query('{schema.measurement}')"
              f".to_anndata(X_name='{schema.counts_layer.name}')", markup=False)


@app.command()
def history(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable history."),
    no_color: NoColor = False,
) -> None:
    """The applies that changed the atlas, and which of them can still be read (`show --serial N --summary`)."""
    def run() -> int:
        atlas = api.load(manifest_path)
        rows = atlas.history()
        if as_json:
            compaction = atlas.require_state().compaction.model_dump()
            sys.stdout.write(json.dumps({"history": rows, "compaction": compaction}, indent=1) + "\n")
            return 0
        out = Output.out()
        if not rows:
            out.print("No applies recorded yet.")
        for row in rows:
            status = ("kept readable" if row["kept"] else "readable until a compaction purges deletes after it") \
                if row["readable"] else "[red]no longer readable[/] (compaction purged cells deleted after it)"
            tags = f"  tags: {', '.join(row['tags'])}" if row["tags"] else ""
            out.print(f"serial {row['serial']}  {row['finished_at']}  {render.history_changes(row['changes'])}; "
                      f"{row['cells_total']:,} cells  tiledb_timestamp={row['timestamp_ms']}  {status}"
                      f"{escape(tags)}")
        return 0

    guard(run)


@app.command()
def tag(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST"),
    name: Optional[str] = typer.Argument(None, metavar="[NAME]", help="The tag, e.g. v1.0 or stable."),
    serial: Optional[int] = typer.Option(None, "--serial", help="The apply to tag (default: the last one)."),
    delete: Optional[str] = typer.Option(None, "--delete", metavar="NAME", help="Remove this tag."),
    list_tags: bool = typer.Option(False, "--list", help="List the tags."),
    no_color: NoColor = False,
) -> None:
    """Name an apply (a release tag): it stays readable whatever compaction.keep_history says, and readers open
    it by name (`show --tag`, `report --tag`, `diff --from`). Setting an existing tag moves it."""
    chosen = [x for x in (name is not None, delete is not None, list_tags) if x]
    if len(chosen) != 1:
        raise typer.BadParameter("give one of NAME, --delete NAME or --list", param_hint="NAME")
    if serial is not None and name is None:
        raise typer.BadParameter("--serial goes with NAME", param_hint="--serial")

    def run() -> int:
        atlas = api.load(manifest_path)
        out = Output.out()
        if list_tags:
            tags = atlas.tags()
            if not tags:
                out.print("No tags yet.")
            for tag_name, tagged in tags.items():
                out.print(f"{tag_name}  serial {tagged}", markup=False)
            return 0
        if delete is not None:
            was = atlas.tag(delete, delete=True)
            out.print(f"Deleted tag {delete} (it named apply {was}).", markup=False)
            return 0
        before = atlas.tags().get(name)
        tagged = atlas.tag(name, serial)
        moved = f" (moved from apply {before})" if before is not None and before != tagged else ""
        out.print(f"Tagged apply {tagged} as {name}{moved}.", markup=False)
        return 0

    guard(run)


@app.command()
def diff(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST"),
    from_ref: Optional[str] = typer.Option(None, "--from", metavar="SERIAL|TAG",
                                           help="The earlier apply (default: the one before --to)."),
    to_ref: Optional[str] = typer.Option(None, "--to", metavar="SERIAL|TAG",
                                         help="The later apply (default: the last)."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    fmt: Optional[PlanFormat] = typer.Option(None, "--format", help="text (default), json or markdown."),
    no_color: NoColor = False,
) -> None:
    """What changed between two applies: samples added, removed, replaced, updated; cells per study; genes added;
    schema changes. Reads obs and var as each apply left them (never X)."""
    chosen = output_format(as_json, fmt)

    def run() -> int:
        result = api.load(manifest_path).diff(from_ref, to_ref)
        # Text is the markdown itself: it reads as well in a terminal as in a pull request.
        sys.stdout.write((result.to_json() if chosen is PlanFormat.json else result.to_markdown()) + "\n")
        return 0

    guard(run)


@app.command()
def report(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST"),
    out: str = typer.Option("atlas-report.html", "--out", help="The HTML file to write (a path or an s3:// URI)."),
    serial: Optional[int] = typer.Option(None, "--serial", help="The atlas as apply SERIAL left it."),
    tag: Optional[str] = typer.Option(None, "--tag", help="The atlas as the apply tagged TAG left it."),
    as_json: bool = typer.Option(False, "--json", help="Print the report's numbers as JSON instead."),
    verify: bool = typer.Option(False, "--verify", help="Run verify now (it counts X entries) for the overview."),
    no_color: NoColor = False,
) -> None:
    """A QC report to look at: one self-contained HTML file (opens offline) with the atlas' overview, per study
    and per sample QC with outliers marked, and how the atlas grew. From obs, the samples table, the presence
    matrix, the state and the history; never from X."""
    if serial is not None and tag is not None:
        raise typer.BadParameter("give --serial or --tag, not both", param_hint="--tag")
    if verify and (serial is not None or tag is not None):
        raise typer.BadParameter("--verify checks the atlas as it is now, not with --serial or --tag",
                                 param_hint="--verify")

    def run() -> int:
        atlas = api.load(manifest_path)
        if as_json:
            sys.stdout.write(atlas.report(serial, tag, verify=verify).to_json() + "\n")
            return 0
        result, where = atlas.write_report(out, serial, tag, verify=verify)
        o = result.overview
        Output.err().print(f"Wrote {escape(where)}: {o['samples']} samples, {o['cells']:,} cells.")
        return 0

    guard(run)

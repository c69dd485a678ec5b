"""The commands that check and change the atlas: each parses its arguments, calls the API, and prints what it
returns (console.py). The commands that read it are in reads.py."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from soma_manifest import api, render
from soma_manifest.cli.app import NoColor, PlanFormat, app, output_format
from soma_manifest.cli.console import Output, guard, interruptible, progress_reporter
from soma_manifest.errors import ManifestError, SomaManifestError


@app.command()
def validate(manifests: list[Path] = typer.Argument(..., help="One or more manifest files."),
             no_color: NoColor = False) -> None:
    """Check manifests, their schemas and raw layouts. Writes nothing. Exit 1 if any is invalid."""

    def run() -> int:
        failures = 0
        for path in manifests:
            try:
                samples = api.load(path).validate()
            except ManifestError as exc:
                failures += 1
                Output.err().print(f"[red]invalid:[/] {escape(str(path))}")
                for problem in exc.problems:
                    Output.err().print(f"  {problem}", markup=False)
                continue
            except SomaManifestError as exc:
                failures += 1
                Output.err().print(f"[red]invalid:[/] {escape(str(path))}: {escape(exc.render())}")
                continue
            studies = len({s.study for s in samples})
            Output.out().print(f"valid: {escape(str(path))} ({len(samples)} samples in {studies} studies)")
        return 1 if failures else 0

    guard(run)


_REFERENCE = "(soma-curation's flag) "


@app.command(context_settings={"allow_extra_args": True})
def init(
    ctx: typer.Context,
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST", help="The manifest to write (e.g. atlas.yaml)."),
    raw: Path = typer.Option(..., "--raw", "--raw-storage-dir", help="The raw tree: <raw>/<study>/<format>/<sample>."),
    atlas_storage: Path = typer.Option(..., "--atlas-storage", "--atlas-storage-dir",
                                       help="The folder that holds the atlas."),
    name: str = typer.Option(..., "--name", "--atlas-name", help="The atlas name."),
    h5ad: Optional[Path] = typer.Option(None, "--h5ad", "--h5ad-storage-dir",
                                        help="h5ad folder (default: <atlas-storage>/<name>-h5ad)."),
    logs: Optional[Path] = typer.Option(None, "--logs", "--log-dir",
                                        help="Log folder (default: <atlas-storage>/<name>-logs)."),
    schema_path: Optional[Path] = typer.Option(None, "--schema",
                                               help="A soma-manifest schema (default: a copy of the default one)."),
    db_schema: Optional[Path] = typer.Option(None, "--db-schema-fp",
                                             help=_REFERENCE + "A soma-curation schema, translated next to MANIFEST."),
    processes: Optional[int] = typer.Option(None, "--processes", min=1, help="Default worker count for apply."),
    include_studies: list[str] = typer.Option([], "--include-studies",
                                              help="Only these studies (after MANIFEST: `--include-studies a b c`)."),
    collection_type: Optional[str] = typer.Option(None, "--raw-collection-type",
                                                  help=_REFERENCE + "The format to prefer: mtx, h5ad or 10x_h5."),
    filenames_pkl: Optional[str] = typer.Option(None, "--filenames-pkl", help=_REFERENCE + "Ignored."),
    mapping_pkl: Optional[str] = typer.Option(None, "--registration-mapping-pkl", help=_REFERENCE + "Ignored."),
    no_color: NoColor = False,
) -> None:
    """Write a manifest listing the studies under a raw tree, and its schema. Overwrites nothing."""
    # `--include-studies a b c` as the reference writes it: click leaves b and c as extra arguments.
    if ctx.args and not include_studies:
        raise typer.BadParameter(f"unexpected arguments: {' '.join(ctx.args)}", param_hint="MANIFEST")
    notes = [f"{flag} is ignored: the state file replaces the reference's pickle checkpoints"
             for flag, value in (("--filenames-pkl", filenames_pkl), ("--registration-mapping-pkl", mapping_pkl))
             if value is not None]

    def run() -> int:
        result = api.init(manifest_path, raw, atlas_storage, name, h5ad=h5ad, logs=logs, schema=schema_path,
                          reference_schema=db_schema, processes=processes,
                          include_studies=(*include_studies, *ctx.args), format_hint=collection_type,
                          notes=tuple(notes))
        err = Output.err()
        for note in result.notes:
            err.print(f"note: {escape(note)}")
        listed = [s for s in result.studies if s.format]
        Output.out().print(f"Wrote {', '.join(escape(str(p)) for p in result.written)} "
                           f"({len(listed)} of {len(result.studies)} studies listed).")
        Output.out().print(f"Next: soma-manifest validate {escape(str(manifest_path))}, then plan and apply.")
        return 0

    guard(run)


@app.command()
def plan(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST"),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    fmt: Optional[PlanFormat] = typer.Option(None, "--format", help="text (default), json or markdown."),
    out: Optional[str] = typer.Option(None, "--out", help="Save the plan (JSON; a path or s3:// URI) for "
                                                           "`apply PLAN.json`."),
    detailed_exitcode: bool = typer.Option(False, "--detailed-exitcode",
                                           help="Exit 0 with no changes, 2 with changes, 1 on error."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also list the samples that are up to date."),
    no_color: NoColor = False,
) -> None:
    """Show what apply would do to each sample, and why. Writes nothing (but --out)."""
    chosen = output_format(as_json, fmt)

    def run() -> int:
        atlas = api.load(manifest_path)
        the_plan = atlas.plan()
        if out is not None:
            api.save_plan(the_plan, out)
            Output.err().print(f"Saved the plan to {escape(str(out))}; apply it with "
                               f"`soma-manifest apply {escape(str(out))}` from this directory.")
        if chosen is PlanFormat.json:
            sys.stdout.write(the_plan.to_json() + "\n")
        elif chosen is PlanFormat.markdown:
            sys.stdout.write(render.plan_markdown(the_plan) + "\n")
        else:
            Output.out().print(render.plan_text(the_plan, verbose=verbose, state=atlas.state if verbose else None))
        return 2 if detailed_exitcode and the_plan.has_changes else 0

    guard(run)


class ExecutorKind(str, Enum):
    loky = "loky"
    dask = "dask"


@app.command()
def apply(
    target: str = typer.Argument(..., metavar="MANIFEST_OR_PLAN",
                                 help="A manifest, or a plan saved with `plan --out` (a path or s3:// URI)."),
    processes: Optional[int] = typer.Option(None, "--processes", "-p", min=1,
                                            help="Worker processes (default: manifest's, else CPU count)."),
    allow_delete: bool = typer.Option(False, "--allow-delete", help="Allow deleting the cells of removed samples."),
    executor_kind: Optional[ExecutorKind] = typer.Option(
        None, "--executor", help="loky (processes on this machine) or dask; default: the manifest's executor.kind."),
    scheduler: Optional[str] = typer.Option(
        None, "--scheduler", metavar="ADDRESS", help="A Dask scheduler, e.g. tcp://10.0.0.5:8786 (implies dask)."),
    chunk_nnz: int = typer.Option(5_000_000, "--chunk-nnz", min=1000, hidden=True),
    grace: Optional[float] = typer.Option(None, "--grace", min=0.0, hidden=True,
                                          help="Seconds running steps get to finish after SIGINT/SIGTERM."),
    no_color: NoColor = False,
) -> None:
    """Make the atlas match the manifest: run exactly the steps `plan` shows (or refuse a stale saved plan)."""
    if executor_kind is ExecutorKind.loky and scheduler:
        raise typer.BadParameter("--scheduler needs --executor dask", param_hint="--scheduler")

    def run() -> int:
        atlas, saved = api.load_target(target)
        err = Output.err()
        planned: list[api.Plan] = []

        def announce(the_plan: api.Plan) -> None:
            planned.append(the_plan)
            if saved is not None:
                err.print(f"Applying the plan saved at {saved.created_at} ({escape(str(target))}).")
            if not the_plan.has_changes:
                err.print(f"No changes: {the_plan.summary.samples} samples up to date. Nothing to do.")
            else:
                err.print(render.plan_text(the_plan))

        with interruptible() as interrupt, progress_reporter(err) as reporter:
            report = atlas.apply(processes=processes, allow_delete=allow_delete, plan=saved, reporter=reporter,
                                 on_plan=announce, chunk_nnz=chunk_nnz,
                                 executor=executor_kind.value if executor_kind else None, scheduler=scheduler,
                                 interrupt=interrupt, grace=grace)
        for path in report.swept:
            err.print(f"Removed {escape(path)}, left by an interrupted run.")
        if not planned[0].has_changes:
            return 0
        _print_report(report, atlas.uri)
        if report.interrupted:
            return 128 + report.interrupted
        return 0 if report.ok else 1

    guard(run)


def _print_report(report: api.ApplyReport, uri: str) -> None:
    err = Output.err()
    seconds = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    err.print(f"Apply finished: {len(report.succeeded)} succeeded, {len(report.failed)} failed, "
              f"{report.unchanged} unchanged, {len(report.removed)} removed ({seconds}).")
    for key, error in sorted(report.failed.items()):
        err.print(f"  [red]failed[/] {escape(key)}: {escape(error)}")
    for problem in report.verify_problems:
        err.print(f"  [red]verify[/] {escape(problem)}")
    if report.failed:
        err.print("The failed samples are recorded in the state; fix them and run apply again to retry.")
    if report.interrupted:
        import signal

        left = f": {', '.join(report.not_run)}" if report.not_run else ""
        err.print(f"Interrupted by {signal.Signals(report.interrupted).name}; {len(report.not_run)} step(s) did "
                  f"not run{escape(left)}. The state is saved: run `soma-manifest apply` again to resume.")
    err.print(f"Atlas: {escape(uri)}  (log: {escape(str(report.log_file))})")


@app.command()
def verify(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST"),
    deep: bool = typer.Option(False, "--deep", help="Also compare every sample's X and obs with its h5ad."),
    no_color: NoColor = False,
) -> None:
    """Check that the atlas holds exactly what the state says. Exit 1 on drift."""
    def run() -> int:
        atlas = api.load(manifest_path)
        problems = atlas.verify(deep=deep)
        if problems:
            Output.out().print(f"[red]Drift found in {escape(atlas.uri)}:[/]")
            for p in problems:
                Output.out().print(f"  - {escape(p)}")
            return 1
        state = atlas.require_state()
        cells = sum(s.atlas_cells or 0 for s in state.samples.values() if s.ingest == "done")
        Output.out().print(f"OK: {len(state.samples)} samples, {cells:,} cells match the state"
                           + (" and their h5ad files" if deep else "") + ".")
        return 0

    guard(run)


@app.command()
def compact(manifest_path: Path = typer.Argument(..., metavar="MANIFEST"), no_color: NoColor = False) -> None:
    """Consolidate and vacuum every array of the atlas, under the lock; the applies that
    compaction.keep_history retains stay readable."""
    def run() -> int:
        atlas = api.load(manifest_path)
        report = atlas.compact()
        if report is None:
            Output.err().print("No atlas yet: nothing to compact.")
            return 0
        out = Output.out()
        if report.finished_interrupted:
            out.print("Finished the work of an interrupted compaction.")
        for a in report.arrays:
            purged = "  (deleted cells purged)" if a.purged else ""
            out.print(f"  {a.name}: {a.fragments_before} -> {a.fragments_after} fragments{purged}", markup=False)
        out.print(f"Compacted {escape(atlas.uri)}: {report.fragments_before} -> "
                  f"{report.fragments_after} fragments in {report.seconds:.1f}s.")
        return 0

    guard(run)


@app.command()
def unlock(manifest_path: Path = typer.Argument(..., metavar="MANIFEST"), no_color: NoColor = False) -> None:
    """Remove the atlas lock deliberately (after making sure no apply is running)."""
    def run() -> int:
        holder = api.unlock(manifest_path)
        if holder is None:
            Output.err().print("The atlas was not locked.")
        else:
            Output.err().print(f"Removed the lock held by {escape(holder.describe())}.")
        return 0

    guard(run)


class SchemaOf(str, Enum):
    manifest = "manifest"
    plan = "plan"


@app.command()
def schema(of: SchemaOf = typer.Argument(SchemaOf.manifest, help="manifest (default) or plan."),
           no_color: NoColor = False) -> None:
    """Print a JSON Schema: of the manifest (schemas/manifest.schema.json) or of plans (schemas/plan.schema.json)."""
    doc = api.manifest_json_schema() if of is SchemaOf.manifest else render.plan_json_schema()
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")

"""The soma-manifest command line. The only module that prints or exits.

Exit codes: 0 success (for `plan --detailed-exitcode`: no changes); 2 only from
`plan --detailed-exitcode`, when there are changes; 1 everything else that went wrong, usage
errors and invalid manifests included, so that CI never reads an error as "changes present".
Results go to stdout (machine-readable with --json); progress, logs and errors go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Iterator, NoReturn, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from soma_manifest import api
from soma_manifest.errors import ManifestError, PlanError, SomaManifestError
from soma_manifest.manifest import LoadedManifest, load_manifest, manifest_json_schema
from soma_manifest.plan import PLAN_FORMAT_VERSION, Plan

try:  # recent typer vendors click; older releases use click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


class Output:
    """stdout for results, stderr for progress and errors; styles only on a terminal."""

    plain = False  # --no-color

    @classmethod
    def _console(cls, stderr: bool) -> Console:
        plain = cls.plain or bool(os.environ.get("NO_COLOR"))
        # force_terminal=False also beats FORCE_COLOR and drops bold/dim, not only colours.
        return Console(stderr=stderr, highlight=False, soft_wrap=True, no_color=plain or None,
                       force_terminal=False if plain else None)

    @classmethod
    def out(cls) -> Console:
        return cls._console(stderr=False)

    @classmethod
    def err(cls) -> Console:
        return cls._console(stderr=True)


def _set_plain(value: bool) -> None:
    if value:
        Output.plain = True


# Accepted before the command and after it (`soma-manifest plan M --no-color`, as in Terraform): every
# command declares it; the callback acts on it, and the command never receives the value.
NoColor = Annotated[bool, typer.Option("--no-color", help="Never use colours (also NO_COLOR=1).",
                                       callback=_set_plain, expose_value=False)]


@app.callback()
def _options(no_color: NoColor = False) -> None:
    """Terraform-style desired state for single-cell atlases in TileDB-SOMA."""


def _guard(fn: Callable[[], int]) -> None:
    """Run a command; a SomaManifestError becomes one clear message on stderr and exit 1."""
    try:
        code = fn()
    except ManifestError as exc:
        err = Output.err()
        err.print("[red]error:[/] invalid input")
        for problem in exc.problems:
            err.print(f"  {problem}", markup=False)
        raise typer.Exit(1)
    except SomaManifestError as exc:
        Output.err().print(f"[red]error:[/] {_escape(exc.render())}")
        raise typer.Exit(1)
    raise typer.Exit(code)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# --- commands ---------------------------------------------------------------------------------

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
                Output.err().print(f"[red]invalid:[/] {_escape(str(path))}")
                for problem in exc.problems:
                    Output.err().print(f"  {problem}", markup=False)
                continue
            except SomaManifestError as exc:
                failures += 1
                Output.err().print(f"[red]invalid:[/] {_escape(str(path))}: {_escape(exc.render())}")
                continue
            studies = len({s.study for s in samples})
            Output.out().print(f"valid: {_escape(str(path))} ({len(samples)} samples in {studies} studies)")
        return 1 if failures else 0

    _guard(run)


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
    from soma_manifest.init import InitRequest, init_manifest

    # `--include-studies a b c` as the reference writes it: click leaves b and c as extra arguments.
    if ctx.args and not include_studies:
        raise typer.BadParameter(f"unexpected arguments: {' '.join(ctx.args)}", param_hint="MANIFEST")
    notes = [f"{flag} is ignored: the state file replaces the reference's pickle checkpoints"
             for flag, value in (("--filenames-pkl", filenames_pkl), ("--registration-mapping-pkl", mapping_pkl))
             if value is not None]

    def run() -> int:
        result = init_manifest(InitRequest(
            manifest=manifest_path, raw=raw, atlas_storage=atlas_storage, name=name, h5ad=h5ad, logs=logs,
            schema=schema_path, reference_schema=db_schema, processes=processes,
            include_studies=(*include_studies, *ctx.args), format_hint=collection_type, notes=tuple(notes)))
        err = Output.err()
        for note in result.notes:
            err.print(f"note: {_escape(note)}")
        listed = [s for s in result.studies if s.format]
        Output.out().print(f"Wrote {', '.join(_escape(str(p)) for p in result.written)} "
                           f"({len(listed)} of {len(result.studies)} studies listed).")
        Output.out().print(f"Next: soma-manifest validate {_escape(str(manifest_path))}, then plan and apply.")
        return 0

    _guard(run)


class PlanFormat(str, Enum):  # also diff's
    text = "text"
    json = "json"
    markdown = "markdown"


def _format(as_json: bool, fmt: PlanFormat | None) -> PlanFormat:
    """The output format of `--json` / `--format`."""
    if as_json and fmt not in (None, PlanFormat.json):
        raise typer.BadParameter("--json and --format markdown/text exclude each other", param_hint="--json")
    return PlanFormat.json if as_json else fmt or PlanFormat.text


@app.command()
def plan(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST"),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    fmt: Optional[PlanFormat] = typer.Option(None, "--format", help="text (default), json or markdown."),
    out: Optional[Path] = typer.Option(None, "--out", help="Save the plan (JSON) for `apply PLAN.json`."),
    detailed_exitcode: bool = typer.Option(False, "--detailed-exitcode",
                                           help="Exit 0 with no changes, 2 with changes, 1 on error."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also list the samples that are up to date."),
    no_color: NoColor = False,
) -> None:
    """Show what apply would do to each sample, and why. Writes nothing (but --out)."""
    from soma_manifest import render

    chosen = _format(as_json, fmt)

    def run() -> int:
        atlas = api.load(manifest_path)
        the_plan = atlas.plan()
        if out is not None:
            _write_plan(the_plan.to_json(), out)
            Output.err().print(f"Saved the plan to {_escape(str(out))}; apply it with "
                               f"`soma-manifest apply {_escape(str(out))}` from this directory.")
        if chosen is PlanFormat.json:
            sys.stdout.write(the_plan.to_json() + "\n")
        elif chosen is PlanFormat.markdown:
            sys.stdout.write(render.plan_markdown(the_plan) + "\n")
        else:
            Output.out().print(render.plan_text(the_plan, verbose=verbose, state=atlas.state if verbose else None))
        return 2 if detailed_exitcode and the_plan.has_changes else 0

    _guard(run)


def _write_plan(text: str, path: Path) -> None:
    _write_file(text + "\n", path, "cannot save the plan", PlanError)


def _write_file(text: str, path: Path, what: str, error: type[SomaManifestError] = SomaManifestError) -> None:
    """Write a file atomically; a folder that cannot be written is one located error (`what: cause`)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise error(f"{what}: {exc.strerror}", where=path) from None


def _read_saved_plan(path: Path) -> Plan | None:
    """The plan saved at `path`, or None when `path` is a manifest (anything that is not a saved plan)."""
    if path.suffix.lower() in (".yaml", ".yml"):
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the manifest loader says what is wrong with it
    if not isinstance(data, dict) or data.get("kind") != "soma-manifest-plan":
        return None
    if data.get("format_version") != PLAN_FORMAT_VERSION:
        raise PlanError(f"plan format version {data.get('format_version')} is not supported (this soma-manifest "
                        f"reads version {PLAN_FORMAT_VERSION})", where=path,
                        hint="make the plan with the soma-manifest that applies it")
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PlanError(f"not a valid plan: {'.'.join(map(str, first['loc']))}: {first['msg']}", where=path,
                        hint="make it again with `soma-manifest plan --out`") from None


def _saved_manifest(saved: Plan) -> Path:
    path = Path(saved.manifest)
    if not path.is_file():
        raise PlanError(f"the plan's manifest {saved.manifest} is not found here", where=Path.cwd(),
                        hint="run apply in the directory plan ran in (in CI: the repository root)")
    return path


class ExecutorKind(str, Enum):
    loky = "loky"
    dask = "dask"


@app.command()
def apply(
    target: Path = typer.Argument(..., metavar="MANIFEST_OR_PLAN",
                                  help="A manifest, or a plan saved with `plan --out`."),
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
    from soma_manifest import render
    from soma_manifest.progress import progress_reporter

    if executor_kind is ExecutorKind.loky and scheduler:
        raise typer.BadParameter("--scheduler needs --executor dask", param_hint="--scheduler")

    def run() -> int:
        saved = _read_saved_plan(target)
        atlas = api.load(_saved_manifest(saved) if saved else target)
        err = Output.err()
        planned: list[Plan] = []

        def announce(the_plan: Plan) -> None:
            planned.append(the_plan)
            if saved is not None:
                err.print(f"Applying the plan saved at {saved.created_at} ({_escape(str(target))}).")
            if not the_plan.has_changes:
                err.print(f"No changes: {the_plan.summary.samples} samples up to date. Nothing to do.")
            else:
                err.print(render.plan_text(the_plan))

        with _interruptible() as interrupt, progress_reporter(err) as reporter:
            report = atlas.apply(processes=processes, allow_delete=allow_delete, plan=saved, reporter=reporter,
                                 on_plan=announce, chunk_nnz=chunk_nnz,
                                 executor=executor_kind.value if executor_kind else None, scheduler=scheduler,
                                 interrupt=interrupt, grace=grace)
        for path in report.swept:
            err.print(f"Removed {_escape(path)}, left by an interrupted run.")
        if not planned[0].has_changes:
            return 0
        _print_report(report, atlas.manifest)
        if report.interrupted:
            return 128 + report.interrupted
        return 0 if report.ok else 1

    _guard(run)


@contextmanager
def _interruptible() -> Iterator[object]:
    """SIGINT and SIGTERM during apply. The first asks apply to stop starting steps and to finish cleanly
    (apply saves the state, the lock is released, exit 130/143). A second one stops at once: the lock is
    released so that steps still running stop before their next write, and the process exits; the state,
    saved after every step, is as after a kill -9 and the next apply converges from it.

    The handlers only set a flag and write with os.write. Before, SIGINT raised KeyboardInterrupt wherever
    each process was (apply and every worker: a terminal signals the whole group), and workers crashed with
    SIGSEGV inside TileDB's own SIGINT handler (see executors._quiet_worker); SIGTERM ended apply without
    releasing the lock."""
    import signal

    from soma_manifest.interrupt import Interrupt

    interrupt = Interrupt()

    def handler(signum: int, frame: object) -> None:
        if interrupt.signum is None:
            interrupt.signum = signum
            os.write(2, f"\n{signal.Signals(signum).name}: stopping; running steps may finish (press Ctrl-C "
                        "again to stop at once).\n".encode())
            return
        if interrupt.lock is not None:
            interrupt.lock.__exit__(None, None, None)
        os.write(2, b"Stopped at once. The state is saved after every step: run `soma-manifest apply` again "
                    b"to resume.\n")
        os._exit(128 + interrupt.signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupt
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _print_report(report, manifest: LoadedManifest) -> None:
    err = Output.err()
    seconds = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    err.print(f"Apply finished: {len(report.succeeded)} succeeded, {len(report.failed)} failed, "
              f"{report.unchanged} unchanged, {len(report.removed)} removed ({seconds}).")
    for key, error in sorted(report.failed.items()):
        err.print(f"  [red]failed[/] {_escape(key)}: {_escape(error)}")
    for problem in report.verify_problems:
        err.print(f"  [red]verify[/] {_escape(problem)}")
    if report.failed:
        err.print("The failed samples are recorded in the state; fix them and run apply again to retry.")
    if report.interrupted:
        import signal

        left = f": {', '.join(report.not_run)}" if report.not_run else ""
        err.print(f"Interrupted by {signal.Signals(report.interrupted).name}; {len(report.not_run)} step(s) did "
                  f"not run{_escape(left)}. The state is saved: run `soma-manifest apply` again to resume.")
    err.print(f"Atlas: {_escape(str(manifest.atlas_uri))}  (log: {_escape(str(report.log_file))})")


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
            Output.out().print(f"[red]Drift found in {_escape(atlas.uri)}:[/]")
            for p in problems:
                Output.out().print(f"  - {_escape(p)}")
            return 1
        state = atlas.require_state()
        cells = sum(s.atlas_cells or 0 for s in state.samples.values() if s.ingest == "done")
        Output.out().print(f"OK: {len(state.samples)} samples, {cells:,} cells match the state"
                           + (" and their h5ad files" if deep else "") + ".")
        return 0

    _guard(run)


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
    from soma_manifest import render

    if (serial is not None or tag is not None) and not summary:
        raise typer.BadParameter("--serial and --tag need --summary (the ledger is always the current state's)",
                                 param_hint="--tag" if tag is not None else "--serial")

    def run() -> int:
        nonlocal serial
        the_atlas = api.load(manifest_path)
        state = the_atlas.require_state()
        if tag is not None:
            from soma_manifest.tags import resolve

            serial = resolve(state, serial, tag)
        if as_json:
            sys.stdout.write(render.ledger_json(state) + "\n")
        else:
            Output.out().print(render.ledger_text(state))
        if summary:
            from soma_manifest import atlas
            from soma_manifest.history import timestamp_of

            timestamp = timestamp_of(state, serial) if serial is not None else None
            ov = atlas.overview(the_atlas.uri, timestamp)
            when = f" as apply {serial}{f' ({tag})' if tag else ''} left it" if serial is not None else ""
            Output.out().print(f"\nAtlas {_escape(the_atlas.uri)}{when}: {ov.cells:,} cells x "
                               f"{ov.genes:,} genes, layers {', '.join(ov.layers)}, {len(ov.samples)} samples")
            for (study, sample), cells in sorted(ov.samples.items()) if serial is not None else ():
                Output.out().print(f"  {study}/{sample}: {cells:,} cells", markup=False)
            at = f", tiledb_timestamp={timestamp}" if timestamp is not None else ""
            schema = the_atlas.schema
            Output.out().print(f"Read it with: tiledbsoma.Experiment.open(uri{at}).axis_query('"
                               f"{schema.measurement}').to_anndata(X_name='{schema.counts_layer.name}')",
                               markup=False)
        return 0

    _guard(run)


@app.command()
def history(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable history."),
    no_color: NoColor = False,
) -> None:
    """The applies that changed the atlas, and which of them can still be read (`show --serial N --summary`)."""
    from soma_manifest import history as hist

    def run() -> int:
        the_atlas = api.load(manifest_path)
        rows = the_atlas.history()
        if as_json:
            compaction = the_atlas.require_state().compaction.model_dump()
            sys.stdout.write(json.dumps({"history": rows, "compaction": compaction}, indent=1) + "\n")
            return 0
        out = Output.out()
        if not rows:
            out.print("No applies recorded yet.")
        for row in rows:
            status = ("kept readable" if row["kept"] else "readable until a compaction purges deletes after it") \
                if row["readable"] else "[red]no longer readable[/] (compaction purged cells deleted after it)"
            tags = f"  tags: {', '.join(row['tags'])}" if row["tags"] else ""
            out.print(f"serial {row['serial']}  {row['finished_at']}  {hist.describe(row['changes'])}; "
                      f"{row['cells_total']:,} cells  tiledb_timestamp={row['timestamp_ms']}  {status}"
                      f"{_escape(tags)}")
        return 0

    _guard(run)


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
        the_atlas = api.load(manifest_path)
        out = Output.out()
        if list_tags:
            tags = the_atlas.tags()
            if not tags:
                out.print("No tags yet.")
            for tag_name, tagged in tags.items():
                out.print(f"{tag_name}  serial {tagged}", markup=False)
            return 0
        if delete is not None:
            was = the_atlas.tag(delete, delete=True)
            out.print(f"Deleted tag {delete} (it named apply {was}).", markup=False)
            return 0
        before = the_atlas.tags().get(name)
        tagged = the_atlas.tag(name, serial)
        moved = f" (moved from apply {before})" if before is not None and before != tagged else ""
        out.print(f"Tagged apply {tagged} as {name}{moved}.", markup=False)
        return 0

    _guard(run)


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
    from soma_manifest.diff import markdown

    chosen = _format(as_json, fmt)

    def run() -> int:
        result = api.load(manifest_path).diff(from_ref, to_ref)
        # Text is the markdown itself: it reads as well in a terminal as in a pull request.
        sys.stdout.write((result.to_json() if chosen is PlanFormat.json else markdown(result)) + "\n")
        return 0

    _guard(run)


@app.command()
def report(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST"),
    out: Path = typer.Option(Path("atlas-report.html"), "--out", help="The HTML file to write."),
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
        result = api.load(manifest_path).report(serial, tag, verify=verify)
        if as_json:
            sys.stdout.write(result.to_json() + "\n")
            return 0
        from soma_manifest.report_html import render

        _write_file(render(result), out, "cannot write the report")
        o = result.overview
        Output.err().print(f"Wrote {_escape(str(out))}: {o['samples']} samples, {o['cells']:,} cells.")
        return 0

    _guard(run)


@app.command()
def compact(manifest_path: Path = typer.Argument(..., metavar="MANIFEST"), no_color: NoColor = False) -> None:
    """Consolidate and vacuum every array of the atlas, under the lock; the applies that
    compaction.keep_history retains stay readable."""
    def run() -> int:
        the_atlas = api.load(manifest_path)
        report = the_atlas.compact()
        if report is None:
            Output.err().print("No atlas yet: nothing to compact.")
            return 0
        out = Output.out()
        if report.finished_interrupted:
            out.print("Finished the work of an interrupted compaction.")
        for a in report.arrays:
            purged = "  (deleted cells purged)" if a.purged else ""
            out.print(f"  {a.name}: {a.fragments_before} -> {a.fragments_after} fragments{purged}", markup=False)
        out.print(f"Compacted {_escape(the_atlas.uri)}: {report.fragments_before} -> "
                  f"{report.fragments_after} fragments in {report.seconds:.1f}s.")
        return 0

    _guard(run)


@app.command()
def unlock(manifest_path: Path = typer.Argument(..., metavar="MANIFEST"), no_color: NoColor = False) -> None:
    """Remove the atlas lock deliberately (after making sure no apply is running)."""
    from soma_manifest.lock import force_unlock, lock_path

    def run() -> int:
        manifest = load_manifest(manifest_path)
        holder = force_unlock(lock_path(manifest.state_path))
        if holder is None:
            Output.err().print("The atlas was not locked.")
        else:
            Output.err().print(f"Removed the lock held by {_escape(holder.describe())}.")
        return 0

    _guard(run)


class SchemaOf(str, Enum):
    manifest = "manifest"
    plan = "plan"


@app.command()
def schema(of: SchemaOf = typer.Argument(SchemaOf.manifest, help="manifest (default) or plan."),
           no_color: NoColor = False) -> None:
    """Print a JSON Schema: of the manifest (schemas/manifest.schema.json) or of plans (schemas/plan.schema.json)."""
    from soma_manifest import render

    doc = manifest_json_schema() if of is SchemaOf.manifest else render.plan_json_schema()
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    api.dedicate_process()
    # Not standalone: click would exit 2 on a usage error, which `plan --detailed-exitcode` means "changes".
    try:
        code = app(standalone_mode=False)
    except ClickException as exc:
        exc.show()
        code = 1
    _exit(code or 0)


def _exit(code: int) -> NoReturn:
    """Exit without the interpreter's teardown, which took ~0.7 s of a one-sample add (joining loky's
    workers as they shut down, then finalizing the storage engine's objects and modules), once everything
    is stored: the commands close their files, state and logs (and release the lock) before they return.
    Idle local workers are stopped (killed) first, else they would outlive the command."""
    api.stop_workers()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), a closed stream
            pass
    os._exit(code)

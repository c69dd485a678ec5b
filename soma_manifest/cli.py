"""The soma-manifest command line. The only module that prints or exits.

Exit codes: 0 success (for `plan --detailed-exitcode`: no changes); 2 only from
`plan --detailed-exitcode`, when there are changes; 1 everything else that went wrong, usage
errors and invalid manifests included, so that CI never reads an error as "changes present".
Results go to stdout (machine-readable with --json); progress, logs and errors go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from soma_manifest.errors import ManifestError, PlanError, SomaManifestError
from soma_manifest.manifest import LoadedManifest, load_manifest, manifest_json_schema
from soma_manifest.plan import PLAN_FORMAT_VERSION, Plan, atlas_present, make_plan, observe
from soma_manifest.schema import AtlasSchema, load_schema
from soma_manifest.state import load_state

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


def _load(manifest_path: Path) -> tuple[LoadedManifest, AtlasSchema]:
    manifest = load_manifest(manifest_path)
    return manifest, load_schema(manifest.schema_path)


def _compute_plan(manifest: LoadedManifest, schema: AtlasSchema):
    state = load_state(manifest.state_path)
    observations = observe(manifest, state)
    plan = make_plan(manifest, schema, observations, state, atlas_present=atlas_present(manifest.atlas_uri))
    # The plan names its manifest relative to where plan ran (the repository root in CI), so that
    # `apply plan.json` finds it in whichever checkout of the repository it runs.
    return plan.model_copy(update={"manifest": _relative_to_cwd(manifest.path)}), observations, state


def _relative_to_cwd(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --- commands ---------------------------------------------------------------------------------

@app.command()
def validate(manifests: list[Path] = typer.Argument(..., help="One or more manifest files."),
             no_color: NoColor = False) -> None:
    """Check manifests, their schemas and raw layouts. Writes nothing. Exit 1 if any is invalid."""
    from soma_manifest.sources import discover, sample_files

    def run() -> int:
        failures = 0
        for path in manifests:
            try:
                manifest, _ = _load(path)
                samples = discover(manifest)
                problems = []
                for s in samples:
                    try:
                        sample_files(s)
                    except SomaManifestError as exc:
                        problems.append(f"{s.key}: {exc.render()}")
                if problems:
                    raise ManifestError(problems)
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


class PlanFormat(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


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

    if as_json and fmt not in (None, PlanFormat.json):
        raise typer.BadParameter("--json and --format markdown/text exclude each other", param_hint="--json")
    chosen = PlanFormat.json if as_json else fmt or PlanFormat.text

    def run() -> int:
        manifest, schema = _load(manifest_path)
        the_plan, _, _ = _compute_plan(manifest, schema)
        if out is not None:
            _write_plan(render.plan_json(the_plan), out)
            Output.err().print(f"Saved the plan to {_escape(str(out))}; apply it with "
                               f"`soma-manifest apply {_escape(str(out))}` from this directory.")
        if chosen is PlanFormat.json:
            sys.stdout.write(render.plan_json(the_plan) + "\n")
        elif chosen is PlanFormat.markdown:
            sys.stdout.write(render.plan_markdown(the_plan) + "\n")
        else:
            Output.out().print(render.plan_text(the_plan, verbose=verbose))
        return 2 if detailed_exitcode and the_plan.has_changes else 0

    _guard(run)


def _write_plan(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise PlanError(f"cannot save the plan: {exc.strerror}", where=path) from None


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
    from soma_manifest import apply as executor
    from soma_manifest import render
    from soma_manifest.lock import AtlasLock, lock_path
    from soma_manifest.progress import progress_reporter

    if executor_kind is ExecutorKind.loky and scheduler:
        raise typer.BadParameter("--scheduler needs --executor dask", param_hint="--scheduler")

    def run() -> int:
        saved = _read_saved_plan(target)
        manifest, schema = _load(_saved_manifest(saved) if saved else target)
        err = Output.err()
        with AtlasLock(lock_path(manifest.state_path)) as lock, _interruptible(lock) as interrupt:
            the_plan, observations, state = _compute_plan(manifest, schema)
            if saved is not None:
                executor.check_saved_plan(saved, the_plan)
                err.print(f"Applying the plan saved at {saved.created_at} ({_escape(str(target))}).")
            state = executor.open_state(manifest, state, schema)
            if not the_plan.has_changes:
                err.print(f"No changes: {the_plan.summary.samples} samples up to date. Nothing to do.")
                return 0
            err.print(render.plan_text(the_plan))
            config = _executor_config(manifest, processes, executor_kind, scheduler)
            with progress_reporter(err) as reporter:
                report = executor.execute(manifest, schema, the_plan, observations, state, lease=lock.lease,
                                          executor=config, allow_delete=allow_delete, reporter=reporter,
                                          chunk_nnz=chunk_nnz, interrupt=interrupt,
                                          grace=executor.DEFAULT_GRACE_S if grace is None else grace)
        _print_report(report, manifest)
        if report.interrupted:
            return 128 + report.interrupted
        return 0 if report.ok else 1

    _guard(run)


def _executor_config(manifest: LoadedManifest, processes: int | None, kind: ExecutorKind | None,
                     scheduler: str | None):
    from soma_manifest.executors import ExecutorConfig

    block = manifest.spec.executor
    chosen = kind.value if kind else "dask" if scheduler else block.kind
    address = scheduler or (block.address if chosen == "dask" else None)
    workers = processes or manifest.spec.processes or os.cpu_count() or 1
    return ExecutorConfig(chosen, address, workers)


@contextmanager
def _interruptible(lock) -> Iterator[object]:
    """SIGINT and SIGTERM during apply. The first asks apply to stop starting steps and to finish cleanly
    (apply saves the state, the lock is released, exit 130/143). A second one stops at once: the lock is
    released so that steps still running stop before their next write, and the process exits; the state,
    saved after every step, is as after a kill -9 and the next apply converges from it.

    The handlers only set a flag and write with os.write. Before, SIGINT raised KeyboardInterrupt wherever
    each process was (apply and every worker: a terminal signals the whole group), and workers crashed with
    SIGSEGV inside TileDB's own SIGINT handler (see executors._quiet_worker); SIGTERM ended apply without
    releasing the lock."""
    import signal

    from soma_manifest.apply import Interrupt

    interrupt = Interrupt()

    def handler(signum: int, frame: object) -> None:
        if interrupt.signum is None:
            interrupt.signum = signum
            os.write(2, f"\n{signal.Signals(signum).name}: stopping; running steps may finish (press Ctrl-C "
                        "again to stop at once).\n".encode())
            return
        lock.__exit__(None, None, None)
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
    from soma_manifest.verify import verify as run_verify

    def run() -> int:
        manifest, schema = _load(manifest_path)
        state = _require_state(manifest)
        problems = run_verify(str(manifest.atlas_uri), schema, state, deep=deep)
        if problems:
            Output.out().print(f"[red]Drift found in {_escape(str(manifest.atlas_uri))}:[/]")
            for p in problems:
                Output.out().print(f"  - {_escape(p)}")
            return 1
        cells = sum(s.atlas_cells or 0 for s in state.samples.values() if s.ingest == "done")
        Output.out().print(f"OK: {len(state.samples)} samples, {cells:,} cells match the state"
                           + (" and their h5ad files" if deep else "") + ".")
        return 0

    _guard(run)


def _require_state(manifest: LoadedManifest):
    from soma_manifest.errors import StateError

    state = load_state(manifest.state_path)
    if state is None:
        raise StateError("no state file yet", where=manifest.state_path, hint="run `soma-manifest apply` first")
    return state


@app.command()
def show(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable ledger."),
    summary: bool = typer.Option(False, "--summary", help="Summarize the atlas itself (cells, genes, samples)."),
    no_color: NoColor = False,
) -> None:
    """The per-sample ledger from the state."""
    from soma_manifest import render

    def run() -> int:
        manifest, schema = _load(manifest_path)
        state = _require_state(manifest)
        if as_json:
            sys.stdout.write(render.ledger_json(state) + "\n")
        else:
            Output.out().print(render.ledger_text(state))
        if summary:
            from soma_manifest import atlas

            ov = atlas.overview(str(manifest.atlas_uri))
            Output.out().print(f"\nAtlas {_escape(str(manifest.atlas_uri))}: {ov.cells:,} cells x {ov.genes:,} genes, "
                               f"layers {', '.join(ov.layers)}, {len(ov.samples)} samples")
            Output.out().print("Read it with: tiledbsoma.Experiment.open(uri).axis_query('"
                               f"{schema.measurement}').to_anndata(X_name='{schema.counts_layer.name}')",
                               markup=False)
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
    # Not standalone: click would exit 2 on a usage error, which `plan --detailed-exitcode` means "changes".
    try:
        code = app(standalone_mode=False)
    except ClickException as exc:
        exc.show()
        code = 1
    sys.exit(code or 0)

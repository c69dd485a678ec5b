"""The Python API: an `Atlas` holds the operations; the CLI only parses arguments, calls them and prints.

Heavy imports (tiledbsoma, anndata, scipy, pandas) happen inside the methods that need them, so that
`import soma_manifest` and `Atlas.plan()` stay fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from soma_manifest import planfile
from soma_manifest.api.process import before_exit, dedicate_process, stop_at_once, stop_workers
from soma_manifest.api.reads import AtlasSummary, Reads
from soma_manifest.api.releases import Releases
from soma_manifest.errors import PlanError
from soma_manifest.interrupt import Interrupt
from soma_manifest.manifest import load_manifest, manifest_json_schema
from soma_manifest.plan import Observations, Plan, atlas_present, make_plan, observe
from soma_manifest.reports import ApplyReport, CompactionReport, Reporter
from soma_manifest.schema import AtlasSchema, load_schema
from soma_manifest.sources import SampleSource
from soma_manifest.state import State

if TYPE_CHECKING:
    from soma_manifest.executors import ExecutorConfig
    from soma_manifest.init import InitResult
    from soma_manifest.lock import Holder

# Also re-exported for callers (the CLI imports nothing else of the package but render and errors):
# Interrupt, manifest_json_schema, and the types the operations take and return.
__all__ = ["ApplyReport", "Atlas", "AtlasSchema", "AtlasSummary", "CompactionReport", "Interrupt", "Plan",
           "Reporter", "dedicate_process", "init", "load", "load_target", "manifest_json_schema", "read_plan",
           "save_plan", "stop_workers", "unlock", "before_exit", "stop_at_once"]


def load(path: str | os.PathLike[str]) -> Atlas:
    """The atlas a manifest describes: its manifest and schema, parsed and checked.

    Raises ManifestError (every problem in `.problems`, each located `file:line`) for an invalid manifest,
    SchemaError for an invalid schema. The state file is read when an operation needs it.
    """
    manifest = load_manifest(Path(path))
    with manifest.referenced("schema"):
        return Atlas(manifest, load_schema(manifest.schema_path))


def save_plan(plan: Plan, where: str | os.PathLike[str]) -> None:
    """Save a plan (`Atlas.plan()`) for a later `Atlas.apply(plan=...)`: a local file or an s3:// object."""
    planfile.save_plan(plan, where)


def read_plan(where: str | os.PathLike[str]) -> Plan | None:
    """The plan saved at `where` (a local file or an s3:// object); None when it is not a saved plan.

    Raises PlanError for a plan of another format version, or an invalid one.
    """
    return planfile.read_saved_plan(where)


def load_target(where: str | os.PathLike[str]) -> tuple[Atlas, Plan | None]:
    """What `soma-manifest apply` is given: a manifest, or a saved plan. The atlas, and the saved plan (None
    for a manifest). A saved plan names its manifest relative to where plan ran: PlanError when it is not
    found from the working directory."""
    saved = read_plan(where)
    if saved is None and os.fspath(where).startswith("s3://"):
        raise PlanError(f"no saved plan at {os.fspath(where)}", where=os.fspath(where),
                        hint="save one there with `soma-manifest plan MANIFEST --out URI`, or apply a local manifest")
    return load(planfile.manifest_of(saved) if saved else where), saved


def unlock(path: str | os.PathLike[str]) -> Holder | None:
    """Remove the atlas lock deliberately (make sure no apply is running first): the holder it named, None when
    the atlas was not locked. Reads the manifest only, so a broken schema does not stand in the way."""
    from soma_manifest.lock import force_unlock, lock_path

    return force_unlock(lock_path(load_manifest(Path(path)).state_path))


def init(manifest: str | os.PathLike[str], raw: str | os.PathLike[str], atlas_storage: str | os.PathLike[str],
         name: str, **options: object) -> InitResult:
    """Write a first manifest (and its schema) listing the studies under a raw tree; overwrites nothing.

    options: init.InitRequest's other fields (h5ad, logs, schema, reference_schema, processes, include_studies,
    format_hint, notes). Raises InitError when a file to write exists, or an input is unusable.
    """
    from soma_manifest.init import InitRequest, init_manifest

    return init_manifest(InitRequest(manifest=Path(manifest), raw=Path(raw), atlas_storage=Path(atlas_storage),
                                     name=name, **options))





@dataclass(frozen=True)
class Atlas(Reads, Releases):
    """One atlas: the manifest (desired state), its schema, and the state file (what was done). The changes
    are here; the reads are in reads.py, the history, tags, report, diff and compaction in releases.py."""

    # --- desired state ----------------------------------------------------------------------------

    def validate(self) -> list[SampleSource]:
        """The selected samples, after checking that each one's raw files are there. Writes nothing.

        Raises ManifestError listing every sample whose raw files are missing or unusable.
        """
        from soma_manifest.errors import ManifestError, SomaManifestError
        from soma_manifest.sources import discover, sample_files

        samples = discover(self.manifest)
        problems = []
        for s in samples:
            try:
                sample_files(s)
            except SomaManifestError as exc:
                problems.append(f"{s.key}: {exc.render()}")
        if problems:
            raise ManifestError(problems)
        return samples

    def plan(self) -> Plan:
        """What apply would do to each sample, and why (pure; no tiledbsoma import)."""
        return self._plan()[0]

    def _plan(self) -> tuple[Plan, Observations, State | None]:
        state = self.state
        observations = observe(self.manifest, state)
        plan = make_plan(self.manifest, self.schema, observations, state,
                         atlas_present=atlas_present(self.manifest.atlas_uri))
        # The plan names its manifest relative to where plan ran (the repository root in CI), so that
        # `apply plan.json` finds it in whichever checkout of the repository it runs.
        return plan.model_copy(update={"manifest": _relative_to_cwd(self.manifest.path)}), observations, state

    # --- changes ----------------------------------------------------------------------------------

    def apply(self, processes: int | None = None, allow_delete: bool = False, *, plan: Plan | None = None,
              reporter: Reporter | None = None, on_plan: Callable[[Plan], None] | None = None,
              chunk_nnz: int | None = None, executor: str | None = None, scheduler: str | None = None,
              interrupt: Interrupt | None = None, grace: float | None = None) -> ApplyReport:
        """Make the atlas match the manifest, under the atlas lock; the same executor as `soma-manifest apply`.

        processes: worker processes (default: the manifest's, else the CPU count). allow_delete: allow
        deleting the cells of samples that left the manifest (else such a plan is refused, changing nothing).
        plan: a plan saved earlier (`read_plan(path)`); refused (PlanError) when it no
        longer describes what apply would do. on_plan: called with the plan about to run, once it is checked.
        executor: "loky" or "dask" (default: the manifest's executor.kind); scheduler: a Dask scheduler
        address (implies dask; default: the manifest's executor.address, else a LocalCluster). interrupt: set its
        `signum` (e.g. from a signal handler) to stop starting steps; running ones get `grace` seconds, then
        the report says `interrupted` and the state is ready for the next apply to resume.
        Failures of single samples are in `report.failed`; `report.ok` is False when any sample failed.
        """
        from soma_manifest.atlas_meta import nothing_to_do
        from soma_manifest.executors import warm_up
        from soma_manifest.lock import AtlasLock, lock_path
        from soma_manifest.sweep import sweep_leftovers

        with AtlasLock(lock_path(self.manifest.state_path)) as lock:
            if interrupt is not None:
                interrupt.lock = lock
            swept = [str(p) for p in sweep_leftovers(self.manifest, lock.path)]
            current, observations, state = self._plan()
            if plan is not None:
                planfile.check_saved_plan(plan, current)
            if not current.has_changes and nothing_to_do(self.manifest, state):
                # No storage engine and no workers for a no-op: its checks came from the atlas' metadata files
                if on_plan is not None:
                    on_plan(current)
                return ApplyReport(unchanged=len(current.unchanged), swept=swept)
            config = self._executor_config(processes, executor, scheduler, current)
            if current.worker_sizes and (allow_delete or not current.deletions):
                # (not for an apply that will be refused, or that runs nothing on workers)
                warm_up(config)  # the workers import the storage engine while this process does (below)
            from soma_manifest import compact
            from soma_manifest.apply import execute
            from soma_manifest.migrate import upgrade
            from soma_manifest.verify import open_state

            state = open_state(self.manifest, state, self.schema)
            upgrade(self.manifest, self.schema, state)
            if on_plan is not None:
                on_plan(current)
            if not current.has_changes:
                compact.finish_pending(self.manifest, state)
                return ApplyReport(unchanged=len(current.unchanged), swept=swept)
            options = {} if chunk_nnz is None else {"chunk_nnz": chunk_nnz}
            if grace is not None:
                options["grace"] = grace
            report = execute(self.manifest, self.schema, current, observations, state, lease=lock.lease,
                             executor=config, allow_delete=allow_delete, reporter=reporter, interrupt=interrupt,
                             **options)
            report.swept = swept
            return report

    def _executor_config(self, processes: int | None, kind: str | None, scheduler: str | None,
                         plan: Plan) -> ExecutorConfig:
        """Where the steps run: arguments first, then the manifest's executor block and processes (on loky,
        sized to the plan's samples by executors.on_this_machine)."""
        from soma_manifest.executors import ExecutorConfig, on_this_machine

        block = self.manifest.spec.executor
        chosen = kind or ("dask" if scheduler else block.kind)
        address = scheduler or (block.address if chosen == "dask" else None)
        workers = processes or self.manifest.spec.processes or os.cpu_count() or 1
        if chosen == "loky":
            return on_this_machine(workers, plan.worker_sizes)
        return ExecutorConfig(chosen, address, workers)


def _relative_to_cwd(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)

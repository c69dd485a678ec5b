"""Run a Plan: convert on the pool, allocate and prepare serially, delete, ingest on the pool.

The state is saved after every finished step, and every joinid range is recorded before
anything is written into it, so a kill at any moment leaves a state the next apply resumes from.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from concurrent.futures import Future, as_completed
from dataclasses import dataclass, field
from typing import Callable, Protocol

from soma_manifest import atlas, storage
from soma_manifest.convert import ConvertJob, ConvertResult, h5ad_path_for
from soma_manifest.errors import AtlasError, PlanError, StateError
from soma_manifest.faults import crash_point
from soma_manifest.manifest import LoadedManifest
from soma_manifest.plan import Action, Observations, Plan
from soma_manifest.schema import AtlasSchema
from soma_manifest.state import SampleState, State, now, save_state
from soma_manifest.steps import Outcome, convert_step, ingest_step, peak_rss, write_obs_step

log = logging.getLogger("soma_manifest")
DEFAULT_CHUNK_NNZ = 5_000_000


class Reporter(Protocol):
    """Where apply reports progress; the CLI draws it, tests may ignore it."""

    def phase(self, name: str, total: int) -> None: ...
    def advance(self, name: str, key: str, ok: bool) -> None: ...
    def done(self, name: str) -> None: ...


class SilentReporter:
    def phase(self, name: str, total: int) -> None: ...
    def advance(self, name: str, key: str, ok: bool) -> None: ...
    def done(self, name: str) -> None: ...


@dataclass
class ApplyReport:
    created_atlas: bool = False
    succeeded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    cells_deleted: int = 0
    verify_problems: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_worker: int = 0
    log_file: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.verify_problems


@dataclass
class Executor:
    """One apply run against one atlas; holds the state it saves after every step."""

    manifest: LoadedManifest
    schema: AtlasSchema
    state: State
    processes: int
    reporter: Reporter
    chunk_nnz: int = DEFAULT_CHUNK_NNZ
    report: ApplyReport = field(default_factory=ApplyReport)

    @property
    def uri(self) -> str:
        return str(self.manifest.atlas_uri)

    def save(self) -> None:
        crash_point("before_state_replace")
        save_state(self.state, self.manifest.state_path)

    def entry(self, action: Action) -> SampleState:
        entry = self.state.samples.get(action.key)
        if entry is None:
            entry = SampleState(study=action.study, sample=action.sample, format=action.format)
            self.state.samples[action.key] = entry
        return entry

    def fail(self, key: str, step: str, error: str) -> None:
        entry = self.state.samples.get(key)
        if entry is not None:
            entry.failed_step, entry.error = step, error
        self.report.failed[key] = f"{step}: {error}"
        log.error("%s: %s failed: %s", key, step, error)


def open_state(manifest: LoadedManifest, state: State | None, schema: AtlasSchema) -> State:
    """Check that state and atlas belong together; a fresh state when there is neither."""
    uri = str(manifest.atlas_uri)
    present = atlas.atlas_exists(uri)
    if state is None:
        if present:
            raise StateError(f"the atlas {uri} exists but its state file does not", where=manifest.state_path,
                             hint=f"restore the state file (or {manifest.state_path.name}.backup), "
                                  "or point storage.state at it")
        return State(atlas=uri, structure=schema.structure, structure_summary=schema.structure_summary())
    if present:
        lineage = atlas.read_lineage(uri)
        if lineage is not None and lineage != state.lineage:
            raise StateError(f"this state file belongs to another atlas (lineage {state.lineage}, the atlas at "
                             f"{uri} has {lineage})", where=manifest.state_path,
                             hint="point storage.state at the state file of this atlas")
    elif any(s.ingest != "none" for s in state.samples.values()):
        raise AtlasError("the atlas is missing but the state records ingested samples", where=uri,
                         hint=f"restore the atlas folder, or move {manifest.state_path} away to rebuild from scratch")
    return state


_REPLAN = "run `soma-manifest plan --out` again and review the new plan"


def check_saved_plan(saved: Plan, current: Plan) -> None:
    """Refuse a saved plan that no longer describes what apply would do now, saying why."""
    if (saved.atlas, saved.state) != (current.atlas, current.state):
        raise PlanError(f"the plan is for the atlas {saved.atlas} (state {saved.state}), but the manifest now "
                        f"points at {current.atlas} (state {current.state})", where=current.manifest,
                        hint="relative storage paths follow the manifest's folder: apply where the plan was made, "
                             "or plan again")
    if saved.lineage != current.lineage:
        def state_of(lineage: str | None) -> str:
            return f"the state of lineage {lineage}" if lineage else "no state file"

        raise PlanError(f"the plan is stale: it was made against {state_of(saved.lineage)}, there is now "
                        f"{state_of(current.lineage)}; the state file was created, replaced or removed since",
                        where=current.state, hint=_REPLAN)
    if saved.serial != current.serial:
        raise PlanError(f"the plan is stale: it was made against state serial {saved.serial}, the state is now at "
                        f"serial {current.serial}; another apply has run since", where=current.state, hint=_REPLAN)
    if saved.manifest_digest != current.manifest_digest:
        raise PlanError("the plan is stale: the manifest changed since it was made", where=current.manifest,
                        hint=_REPLAN)
    if (saved.schema_structure, saved.schema_conversion) != (current.schema_structure, current.schema_conversion):
        raise PlanError("the plan is stale: the schema changed since it was made", where=current.schema_path,
                        hint=_REPLAN)
    if saved.comparable() != current.comparable():
        changes = _plan_changes(saved, current) or ["the samples to change differ"]
        more = f" and {len(changes) - 5} more" if len(changes) > 5 else ""
        raise PlanError(f"the plan is stale: {'; '.join(changes[:5])}{more}", where=current.manifest, hint=_REPLAN)


def _plan_changes(saved: Plan, current: Plan) -> list[str]:
    """What would be done differently now, one phrase per sample."""
    changes = []
    if saved.create_atlas != current.create_atlas:
        changes.append("the atlas was created since" if saved.create_atlas else "the atlas is gone")
    old = {a.key: a for a in saved.actions}
    new = {a.key: a for a in current.actions}
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if before is None:
            changes.append(f"{key} now needs {after.kind}")
        elif after is None:
            changes.append(f"{key} no longer needs {before.kind}")
        elif before.raw_digest != after.raw_digest:
            changes.append(f"raw data of {key} changed")
        elif before.meta_digest != after.meta_digest:
            changes.append(f"metadata of {key} changed")
        elif before.comparable() != after.comparable():
            changes.append(f"{key} now needs {after.kind} ({' -> '.join(after.steps) or 'no steps'})")
    return changes


def execute(manifest: LoadedManifest, schema: AtlasSchema, plan: Plan, observations: Observations,
            state: State, *, processes: int, allow_delete: bool, reporter: Reporter | None = None,
            chunk_nnz: int = DEFAULT_CHUNK_NNZ) -> ApplyReport:
    """Make the atlas match the plan. Failures of single samples are recorded, not raised."""
    deletions = [a for a in plan.actions if a.deletes_cells]
    if deletions and not allow_delete:
        listing = ", ".join(f"{a.key} ({a.cells} cells)" for a in deletions[:10])
        more = f" and {len(deletions) - 10} more" if len(deletions) > 10 else ""
        raise PlanError(f"the plan deletes cells of {len(deletions)} sample(s): {listing}{more}",
                        hint="nothing was changed; re-run with --allow-delete to delete them")
    run = Executor(manifest, schema, state, max(1, processes), reporter or SilentReporter(), chunk_nnz)
    run.report.unchanged = len(plan.unchanged)
    started = time.perf_counter()
    with _RunLog(manifest, run.report):
        log.info("apply %s: %d actions, %d unchanged, %d processes", manifest.path, len(plan.actions),
                 len(plan.unchanged), run.processes)
        state.studies.update(observations.study_caches)
        _refresh_unchanged(run, plan, observations)
        if plan.create_atlas:
            _create(run)
        _forget_removed(run, plan)
        _timed(run, "convert", lambda: _convert_all(run, plan))
        ingests = _allocate(run, plan)
        _timed(run, "delete", lambda: _delete_orphans(run))
        _timed(run, "ingest", lambda: _ingest_all(run, plan, ingests))
        _timed(run, "verify", lambda: _quick_verify(run))
        run.report.seconds["total"] = time.perf_counter() - started
        parent = peak_rss()
        _write_run_summary(manifest, run.report, parent)
    return run.report


def _timed(run: Executor, name: str, fn: Callable[[], None]) -> None:
    start = time.perf_counter()
    fn()
    run.report.seconds[name] = time.perf_counter() - start


def _refresh_unchanged(run: Executor, plan: Plan, observations: Observations) -> None:
    """Unchanged samples whose files were only touched get their new stats, so plans stop re-hashing."""
    for key in plan.unchanged:
        seen = observations.samples[key]
        entry = run.state.samples[key]
        if list(seen.files) != entry.raw_files:
            entry.raw_files = list(seen.files)


def _create(run: Executor) -> None:
    # The state (with the lineage) is saved before the atlas exists, so a crash in between
    # leaves a state that simply creates the atlas again.
    run.save()
    atlas.create_atlas(run.uri, run.schema, run.state.lineage)
    crash_point("after_create")
    run.report.created_atlas = True
    log.info("created atlas %s", run.uri)


def _forget_removed(run: Executor, plan: Plan) -> None:
    removed = [a for a in plan.actions if a.kind == "remove"]
    for action in removed:
        entry = run.state.samples.pop(action.key)
        if entry.joinids is not None and entry.ingest != "none":
            run.state.orphans.append(entry.joinids)
            run.report.cells_deleted += entry.atlas_cells or 0
        run.report.removed.append(action.key)
        log.info("%s: removed from the state; its cells are queued for deletion", action.key)
    if removed:
        run.save()


def _pool(processes: int):
    from loky import get_reusable_executor

    return get_reusable_executor(max_workers=processes, timeout=30)


def _while_coordinator_lives(coordinator: int, fn: Callable[..., Outcome], *args: object) -> Outcome:
    """Run one step on a worker, unless apply (the worker's parent) is gone.

    loky's workers keep taking queued jobs after a kill -9 of apply. Such a job must not start: its writes
    would be stamped after the next apply deleted the dead run's joinid ranges, and outlive that delete.
    (A job already running stops before its next X chunk: see atlas.ingest_h5ad.)
    """
    if os.getppid() != coordinator:
        os._exit(1)
    return fn(*args)


def _run_pool(run: Executor, name: str, jobs: list[tuple[str, Callable, tuple]],
              on_done: Callable[[Outcome], None]) -> None:
    """Run jobs on the pool; each outcome is handled (and the state saved) as soon as it arrives."""
    if not jobs:
        return
    run.reporter.phase(name, len(jobs))
    pool = _pool(run.processes)
    futures: dict[Future, str] = {pool.submit(_while_coordinator_lives, os.getpid(), fn, *args): key
                                  for key, fn, args in jobs}
    for future in as_completed(futures):
        key = futures[future]
        try:
            outcome = future.result()
        except Exception as exc:  # noqa: BLE001 - a worker killed or lost: that sample failed
            outcome = Outcome(key, name, False, 0.0, 0, error=f"worker process died: {type(exc).__name__}: {exc}")
        run.report.peak_rss_worker = max(run.report.peak_rss_worker, outcome.peak_rss)
        if outcome.detail:
            log.debug("%s: %s traceback:\n%s", key, name, outcome.detail)
        on_done(outcome)
        run.reporter.advance(name, key, outcome.ok)
    run.reporter.done(name)


def _convert_all(run: Executor, plan: Plan) -> None:
    by_key = {a.key: a for a in plan.actions}
    jobs = []
    for action in plan.actions:
        if not action.converts:
            if action.kind == "invalid":
                run.entry(action)
                run.fail(action.key, "read", action.reason)
            continue
        entry = run.entry(action)
        h5ad = entry.h5ad if "convert_metadata" in action.steps else str(
            h5ad_path_for(run.manifest.h5ad, action.study, action.sample))
        job = ConvertJob(action.key, action.study, action.sample, action.format, action.path,
                         str(run.manifest.raw), h5ad, metadata_only="convert_metadata" in action.steps,
                         store=run.manifest.store)
        jobs.append((action.key, convert_step, (job, run.schema)))
    if any(a.kind == "invalid" for a in plan.actions):
        run.save()

    def done(outcome: Outcome) -> None:
        action = by_key[outcome.key]
        entry = run.state.samples[outcome.key]
        if not outcome.ok:
            run.fail(outcome.key, "convert", outcome.error or "")
        else:
            result: ConvertResult = outcome.value
            entry.raw_files = list(action.raw_files)
            entry.raw_digest, entry.meta_digest = action.raw_digest or "", action.meta_digest or ""
            entry.conversion, entry.h5ad, entry.converted = run.schema.conversion, result.h5ad, True
            entry.cells, entry.nnz, entry.converted_at = result.cells, result.nnz, now()
            log.info("%s: converted (%d cells, %d nnz, %.1fs)%s", outcome.key, result.cells, result.nnz,
                     outcome.seconds, f"; left out {result.dropped_features} non-gene features"
                     if result.dropped_features else "")
        run.save()
        crash_point("after_convert")

    _run_pool(run, "convert", jobs, done)


def _allocate(run: Executor, plan: Plan) -> list[Action]:
    """Serially: give each sample to ingest a fresh joinid range, extend var, resize the arrays."""
    ready = [a for a in plan.actions if a.ingests and a.key not in run.report.failed]
    if not ready:
        return []
    genes = [atlas.read_h5ad_var(run.state.samples[a.key].h5ad, run.schema) for a in ready]
    atlas.extend_var(run.uri, run.schema, _union(genes))
    for action in ready:
        entry = run.state.samples[action.key]
        if entry.joinids is not None and entry.ingest != "none":
            run.state.orphans.append(entry.joinids)
        entry.joinids = run.state.allocate(entry.cells or 0)
        entry.ingest = "allocated"
    atlas.resize_obs(run.uri, run.schema, run.state.next_joinid)
    run.save()
    crash_point("after_allocate")
    return ready


def _union(frames: list) -> object:
    import pandas as pd

    merged = pd.concat(frames)
    return merged[~merged.index.duplicated(keep="first")]


def _delete_orphans(run: Executor) -> None:
    while run.state.orphans:
        start, stop = run.state.orphans[0]
        crash_point("mid_delete")
        atlas.delete_obs_range(run.uri, run.schema, start, stop)
        crash_point("after_delete")
        run.state.orphans.pop(0)
        run.save()
        log.info("deleted joinids [%d, %d)", start, stop)


def _ingest_all(run: Executor, plan: Plan, ready: list[Action]) -> None:
    jobs = []
    for action in ready:
        entry = run.state.samples[action.key]
        args = (action.key, run.uri, run.schema, entry.h5ad, entry.joinids[0], run.chunk_nnz, run.manifest.store)
        jobs.append((action.key, ingest_step, args))
    for action in plan.actions:
        if "write_obs" in action.steps and action.key not in run.report.failed:
            entry = run.state.samples[action.key]
            jobs.append((action.key, write_obs_step, (action.key, run.uri, run.schema, entry.h5ad,
                                                      entry.joinids[0], run.manifest.store)))
    finished = 0

    def done(outcome: Outcome) -> None:
        nonlocal finished
        entry = run.state.samples[outcome.key]
        if not outcome.ok:
            run.fail(outcome.key, outcome.step, outcome.error or "")
        else:
            if outcome.step == "ingest":
                entry.ingest, entry.ingested_at = "done", now()
                entry.atlas_raw_digest, entry.atlas_conversion = entry.raw_digest, entry.conversion
                entry.atlas_cells, entry.atlas_nnz = entry.cells, entry.nnz
            entry.atlas_meta_digest = entry.meta_digest
            entry.failed_step = entry.error = None
            run.report.succeeded.append(outcome.key)
            log.info("%s: %s done (%.1fs)", outcome.key, outcome.step, outcome.seconds)
        run.save()
        finished += 1
        if finished == 1:
            crash_point("mid_ingest")

    _run_pool(run, "ingest", jobs, done)


def _quick_verify(run: Executor) -> None:
    """Check what this run touched: cells, distinct obs ids and nnz per range, as the state says."""
    touched = [k for k in run.report.succeeded
               if k in run.state.samples and run.state.samples[k].ingest == "done"]
    entries = [run.state.samples[k] for k in touched]
    if not entries:
        return
    stats = atlas.range_stats(run.uri, run.schema, [e.joinids for e in entries])
    for key, entry, got in zip(touched, entries, stats):
        if (got.cells, got.obs_ids, got.nnz) != (entry.atlas_cells, entry.atlas_cells, entry.atlas_nnz):
            run.report.verify_problems.append(
                f"{key}: atlas holds {got.cells} cells ({got.obs_ids} distinct ids), {got.nnz} nnz in "
                f"[{entry.joinids[0]}, {entry.joinids[1]}); the state expects {entry.atlas_cells} cells, "
                f"{entry.atlas_nnz} nnz")


class _RunLog:
    """A log file per run in the logs folder (DEBUG, with worker tracebacks).

    On an object store the log is written to a local temporary file and stored when the run ends.
    """

    def __init__(self, manifest: LoadedManifest, report: ApplyReport) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        self.path = manifest.logs / f"apply-{stamp}-{os.getpid()}.log"
        report.log_file = str(self.path)
        self.staged = tempfile.NamedTemporaryFile(suffix=".log", delete=False).name if self.path.is_remote else None
        storage.mkdir(manifest.logs)
        with storage.guard("open the log file", self.path):
            self.handler = logging.FileHandler(self.staged or self.path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self) -> None:
        log.addHandler(self.handler)
        log.setLevel(logging.DEBUG)

    def __exit__(self, *exc: object) -> None:
        log.removeHandler(self.handler)
        self.handler.close()
        if self.staged:
            try:
                storage.put_file(self.staged, self.path)
            finally:
                if os.path.exists(self.staged):
                    os.unlink(self.staged)


def _write_run_summary(manifest: LoadedManifest, report: ApplyReport, parent_rss: int) -> None:
    """logs/last-apply.json: machine-readable figures of the last run (the benchmark reads it)."""
    payload = {
        "convert_seconds": report.seconds.get("convert", 0.0),
        "ingest_seconds": report.seconds.get("ingest", 0.0),
        "delete_seconds": report.seconds.get("delete", 0.0),
        "verify_seconds": report.seconds.get("verify", 0.0),
        "total_seconds": report.seconds.get("total", 0.0),
        "peak_rss_worker_bytes": report.peak_rss_worker,
        "peak_rss_parent_bytes": parent_rss,
        "succeeded": len(report.succeeded),
        "failed": report.failed,
        "log_file": report.log_file,
    }
    storage.write_atomic(manifest.logs / "last-apply.json", json.dumps(payload, indent=1).encode())


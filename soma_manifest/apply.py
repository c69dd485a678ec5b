"""Run a Plan: convert on the workers; as conversions arrive, allocate, extend var and resize serially,
delete the old ranges, and ingest on the workers while other samples still convert (no phase barrier).

The state is saved after every finished step, and every joinid range is recorded before
anything is written into it, so a kill at any moment leaves a state the next apply resumes from.
Which executor runs the steps (loky or Dask) is executors.py's business; this module only submits
steps and consumes their outcomes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from soma_manifest import atlas, compact, genes, storage
from soma_manifest.convert import ConvertJob, ConvertResult, h5ad_path_for
from soma_manifest.errors import AtlasError, PlanError, StateError, StorageError
from soma_manifest.executors import ExecutorConfig, StepExecutor, start_executor
from soma_manifest.faults import crash_point
from soma_manifest.interrupt import Interrupt
from soma_manifest.lock import Lease
from soma_manifest.manifest import LoadedManifest
from soma_manifest.plan import Action, Observations, Plan
from soma_manifest.reports import ApplyReport, Reporter, SilentReporter
from soma_manifest.schema import AtlasSchema
from soma_manifest.state import SampleState, State, now, save_state
from soma_manifest.steps import Outcome, convert_step, ingest_step, peak_rss, write_obs_step

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("soma_manifest")
DEFAULT_CHUNK_NNZ = 5_000_000
#: After a first SIGINT/SIGTERM, how long running steps may take to finish before they are abandoned.
DEFAULT_GRACE_S = 30.0
_POLL_S = 0.2
#: Seconds between stores of a run log kept on an object store (each store uploads the whole log).
LOG_UPLOAD_S = 2.0


@dataclass
class Run:
    """One apply run against one atlas; holds the state it saves after every step."""

    manifest: LoadedManifest
    schema: AtlasSchema
    state: State
    steps: StepExecutor
    lease: Lease
    reporter: Reporter
    interrupt: Interrupt
    chunk_nnz: int = DEFAULT_CHUNK_NNZ
    grace: float = DEFAULT_GRACE_S
    report: ApplyReport = field(default_factory=ApplyReport)
    checked: dict[str, atlas.RangeStats] = field(default_factory=dict)  # ranges as their steps checked them

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


def execute(manifest: LoadedManifest, schema: AtlasSchema, plan: Plan, observations: Observations,
            state: State, *, lease: Lease, executor: ExecutorConfig, allow_delete: bool,
            reporter: Reporter | None = None, chunk_nnz: int = DEFAULT_CHUNK_NNZ,
            interrupt: Interrupt | None = None, grace: float = DEFAULT_GRACE_S) -> ApplyReport:
    """Make the atlas match the plan. Failures of single samples are recorded, not raised.

    `lease` is the lock held by the caller; steps stop writing once it is no longer current. When
    `interrupt` gets a signal, no new step starts, running ones get `grace` seconds, and the report
    says so (`interrupted`); the state is then as after any finished step, and the next apply resumes.
    """
    deletions = plan.deletions
    if deletions and not allow_delete:
        listing = ", ".join(f"{a.key} ({a.cells} cells)" for a in deletions[:10])
        more = f" and {len(deletions) - 10} more" if len(deletions) > 10 else ""
        raise PlanError(f"the plan deletes cells of {len(deletions)} sample(s): {listing}{more}",
                        hint="nothing was changed; re-run with --allow-delete to delete them")
    if any(a.converts for a in plan.actions):
        genes.schema_reference(schema)  # a bad gene reference is one error before any change, not one per sample
        storage.check_writable(manifest.h5ad)  # so is a read-only h5ad folder
    # Started before anything is written: an unreachable scheduler fails the apply with nothing changed.
    steps = start_executor(executor)
    run = Run(manifest, schema, state, steps, lease, reporter or SilentReporter(), interrupt or Interrupt(),
              chunk_nnz, grace)
    run.report.unchanged = len(plan.unchanged)
    started = time.perf_counter()
    try:
        with _RunLog(manifest, run.report):
            where = f" at {executor.address}" if executor.address else ""
            log.info("apply %s: %d actions, %d unchanged, executor %s%s, %d processes", manifest.path,
                     len(plan.actions), len(plan.unchanged), executor.kind, where, executor.processes)
            state.studies.update(observations.study_caches)
            _refresh_unchanged(run, plan, observations)
            if run.interrupt.signum is None:
                if plan.create_atlas:
                    _create(run)
                _forget_removed(run, plan)
                _Pipeline(run, plan).drive()
            else:
                run.report.interrupted = run.interrupt.signum
            _timed_verify(run)
            run.report.seconds["total"] = time.perf_counter() - started
            compact.after_apply(manifest, plan, state, run.report)  # history entry, then compaction if due
            if run.report.interrupted:
                log.warning("interrupted by signal %d; %d step(s) not run: %s", run.report.interrupted,
                            len(run.report.not_run), ", ".join(run.report.not_run))
            parent = peak_rss()
            _write_run_summary(manifest, run.report, parent)
    finally:
        steps.shutdown()
    return run.report


def _timed_verify(run: Run) -> None:
    start = time.perf_counter()
    _quick_verify(run)
    run.report.seconds["verify"] = time.perf_counter() - start


def _refresh_unchanged(run: Run, plan: Plan, observations: Observations) -> None:
    """Unchanged samples whose files were only touched get their new stats, so plans stop re-hashing."""
    for key in plan.unchanged:
        seen = observations.samples[key]
        entry = run.state.samples[key]
        if list(seen.files) != entry.raw_files:
            entry.raw_files = list(seen.files)


def _create(run: Run) -> None:
    # The state (with the lineage) is saved before the atlas exists, so a crash in between
    # leaves a state that simply creates the atlas again.
    run.save()
    atlas.create_atlas(run.uri, run.schema, run.state.lineage)
    crash_point("after_create")
    run.report.created_atlas = True
    log.info("created atlas %s", run.uri)


def _forget_removed(run: Run, plan: Plan) -> None:
    removed = [a for a in plan.actions if a.kind == "remove"]
    for action in removed:
        entry = run.state.samples.pop(action.key)
        run.state.retire_sample(entry)
        if entry.joinids is not None and entry.ingest != "none":
            run.state.orphans.append(entry.joinids)
            run.report.cells_deleted += entry.atlas_cells or 0
        run.report.removed.append(action.key)
        log.info("%s: removed from the state; its cells are queued for deletion", action.key)
    if removed:
        run.save()


class _Pipeline:
    """Converts, and ingests as soon as their conversions arrive: one loop over the executor's outcomes.

    The coordinator's serial work happens between outcomes, batched over what arrived together:
    allocate ranges + extend var + resize (one state save), then the pending deletes (a save each), then
    the ingests are submitted. So a range is in the state before any step can write into it, and a
    sample's old range is deleted before its new version is ingested.

    A resize writes a new array schema file, and a worker that opens the array while TileDB writes that
    file reads it empty ("Read exceeds file size ... file_size 0") and fails its sample. So a batch that
    needs a domain to grow (or var to extend, or a delete) waits until no ingest or obs update is in
    flight; conversions go on meanwhile. Growing the cells and samples domains ahead, for the samples
    still to come, makes such batches rare: usually the first, and one for each sample with new genes.
    """

    def __init__(self, run: Run, plan: Plan) -> None:
        self.run = run
        self.by_key = {a.key: a for a in plan.actions}
        self.converting = 0  # convert steps submitted and not yet finished
        self.ready: list[Action] = []  # converted (or nothing to convert), waiting for ingest or write_obs
        self.later = sum(1 for a in plan.actions if a.ingests or "write_obs" in a.steps)
        self.ingests_started: float | None = None
        self.ingests_finished = 0
        self.writing = 0  # ingest and write_obs steps submitted and not yet finished
        self.converts_started = time.perf_counter()
        self.unallocated = sum(1 for a in plan.actions if a.ingests)  # ingests without a range yet
        self.room: atlas.Room | None = None  # read when first needed, then kept up to date
        self.genes: dict[str, pd.DataFrame] = {}  # each ready sample's var rows

    def drive(self) -> None:
        run = self.run
        self._submit_converts()
        self._delete_orphans()
        while True:
            if run.interrupt.signum is not None:
                self._stop()
                return
            if self.ready and (not self.writing or self._fits()):
                self._start_ingests()
            if not run.steps.busy:
                break
            for outcome in run.steps.wait(_POLL_S):
                self._record(outcome)
        self._close_phases()

    # ---- converts

    def _submit_converts(self) -> None:
        run = self.run
        organisms = {s.name: s.organism or run.schema.organism for s in run.manifest.studies}
        for action in self.by_key.values():
            if action.kind == "invalid":
                run.entry(action)
                run.fail(action.key, "read", action.reason)
            elif action.converts:
                entry = run.entry(action)
                metadata_only = "convert_metadata" in action.steps
                h5ad = entry.h5ad if metadata_only else str(h5ad_path_for(run.manifest.h5ad, action.study,
                                                                           action.sample))
                job = ConvertJob(action.key, action.study, action.sample, action.format, action.path,
                                 str(run.manifest.raw), h5ad, metadata_only=metadata_only,
                                 organism=organisms.get(action.study))
                run.steps.submit(action.key, "convert", convert_step, run.lease, job, run.schema)
                self.converting += 1
            elif action.ingests or "write_obs" in action.steps:
                self.ready.append(action)
        if any(a.kind == "invalid" for a in self.by_key.values()):
            run.save()
        if self.converting:
            run.reporter.phase("convert", self.converting)

    def _converted(self, outcome: Outcome) -> None:
        run = self.run
        action = self.by_key[outcome.key]
        entry = run.state.samples[outcome.key]
        self.converting -= 1
        if not outcome.ok:
            run.fail(outcome.key, "convert", outcome.error or "")
            self.unallocated -= action.ingests
        else:
            result: ConvertResult = outcome.value
            entry.raw_files = list(action.raw_files)
            entry.raw_digest, entry.meta_digest = action.raw_digest or "", action.meta_digest or ""
            entry.conversion, entry.h5ad, entry.converted = run.schema.conversion, result.h5ad, True
            entry.cells, entry.nnz, entry.converted_at = result.cells, result.nnz, now()
            if "convert_metadata" not in action.steps:  # a metadata update keeps the h5ad's genes
                entry.gene_mapping = result.gene_mapping
            if result.var is not None:
                self.genes[outcome.key] = atlas.var_rows(result.var, run.schema)
            log.info("%s: converted (%d cells, %d nnz, %.1fs)%s%s", outcome.key, result.cells, result.nnz,
                     outcome.seconds, f"; left out {result.dropped_features} non-gene features"
                     if result.dropped_features else "",
                     f"; genes: {result.gene_mapping.text()}" if result.gene_mapping else "")
            if action.ingests or "write_obs" in action.steps:
                self.ready.append(action)
        run.save()
        crash_point("after_convert")
        if self.converting == 0:
            run.report.seconds["convert"] = time.perf_counter() - self.converts_started
            run.reporter.done("convert")

    # ---- allocate, delete, ingest

    def _start_ingests(self) -> None:
        """Serially, for everything that became ready together: allocate, delete what must go, submit."""
        run = self.run
        batch, self.ready = self.ready, []
        allocated = self._allocate([a for a in batch if a.ingests])
        self._delete_orphans()
        if self.ingests_started is None:
            self.ingests_started = time.perf_counter()
            run.reporter.phase("ingest", self.later - sum(1 for k in run.report.failed if k in self.by_key
                                                          and self._goes_to_ingest(k)))
        for action in allocated:
            entry = run.state.samples[action.key]
            run.steps.submit(action.key, "ingest", ingest_step, run.lease, action.key, run.uri, run.schema,
                             entry.h5ad, entry.joinids[0], run.chunk_nnz, entry.sample_joinid, urgent=True)
            self.writing += 1
        for action in batch:
            if "write_obs" in action.steps:
                entry = run.state.samples[action.key]
                run.steps.submit(action.key, "write_obs", write_obs_step, run.lease, action.key, run.uri,
                                 run.schema, entry.h5ad, entry.joinids[0], urgent=True)
                self.writing += 1

    def _goes_to_ingest(self, key: str) -> bool:
        action = self.by_key[key]
        return action.ingests or "write_obs" in action.steps

    def _fits(self) -> bool:
        """Whether the ready batch can be allocated without a schema change or a delete (see the class)."""
        run = self.run
        if run.state.orphans or run.state.orphan_samples:
            return False
        ingests = [run.state.samples[a.key] for a in self.ready if a.ingests]
        if any((e.joinids is not None and e.ingest != "none") or e.sample_joinid is not None for e in ingests):
            return False  # allocating retires an old range or sample row, to be deleted
        room = self._room()
        cells = sum(e.cells or 0 for e in ingests)
        return (run.state.next_joinid + cells <= room.cells
                and run.state.next_sample_joinid + len(ingests) <= room.samples
                and all(room.genes.issuperset(self._var(a.key).index) for a in self.ready if a.ingests))

    def _room(self) -> atlas.Room:
        if self.room is None:
            self.room = atlas.room(self.run.uri, self.run.schema)
        return self.room

    def _var(self, key: str) -> pd.DataFrame:
        """The sample's var rows: from its conversion in this run, else from its h5ad."""
        if key not in self.genes:
            self.genes[key] = atlas.read_h5ad_var(self.run.state.samples[key].h5ad, self.run.schema)
        return self.genes[key]

    def _allocate(self, ready: list[Action]) -> list[Action]:
        """Give each sample a fresh joinid range (its old one becomes an orphan), extend var, grow; save."""
        run = self.run
        if not ready:
            return []
        start = time.perf_counter()
        room = self._room()
        frames = [self._var(a.key) for a in ready]
        # Set arithmetic, not Index.isin against the ~20k known ids: 80 ms a batch, most of the allocation.
        new_ids = set().union(*(frame.index for frame in frames)) - room.genes
        if new_ids:
            genes = _union(frames)
            atlas.extend_var(run.uri, run.schema, genes.loc[genes.index.isin(list(new_ids))])
            room.genes.update(new_ids)
        cells = []
        for action in ready:
            entry = run.state.samples[action.key]
            if entry.joinids is not None and entry.ingest != "none":
                run.state.orphans.append(entry.joinids)
            entry.joinids = run.state.allocate(entry.cells or 0)
            run.state.allocate_sample(entry)
            entry.ingest = "allocated"
            cells.append(entry.cells or 0)
        self.unallocated -= len(ready)
        if run.state.next_joinid > room.cells:
            # Room for the samples still to come too, at 1.25x this batch's mean: one resize, not one a batch.
            room.cells = run.state.next_joinid + int(1.25 * self.unallocated * sum(cells) / len(cells))
            atlas.resize_obs(run.uri, run.schema, room.cells)
        if run.state.next_sample_joinid > room.samples or new_ids:  # the presence matrix spans var too
            room.samples = max(room.samples, run.state.next_sample_joinid + self.unallocated)
            atlas.resize_samples(run.uri, run.schema, room.samples)
        run.save()
        _add_seconds(run, "allocate", start)
        crash_point("after_allocate")
        if self.converting:
            crash_point("overlap_allocate")
        return ready

    def _delete_orphans(self) -> None:
        run = self.run
        while run.state.orphans and run.interrupt.signum is None:
            start, stop = run.state.orphans[0]
            began = time.perf_counter()
            crash_point("mid_delete")
            atlas.delete_obs_range(run.uri, run.schema, start, stop)
            crash_point("after_delete")
            run.state.orphans.pop(0)
            run.save()
            _add_seconds(run, "delete", began)
            log.info("deleted joinids [%d, %d)", start, stop)
        if run.state.orphan_samples and run.interrupt.signum is None:
            atlas.delete_samples(run.uri, run.schema, run.state.orphan_samples)
            log.info("deleted the rows of sample joinids %s", run.state.orphan_samples)
            run.state.orphan_samples = []
            run.save()

    def _ingested(self, outcome: Outcome) -> None:
        run = self.run
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
            ingested = outcome.step == "ingest"
            run.checked[outcome.key] = outcome.value.stats if ingested else outcome.value
            run.report.succeeded.append(outcome.key)
            log.info("%s: %s done (%.1fs%s)", outcome.key, outcome.step, outcome.seconds,
                     ", from memory" if ingested and outcome.value.from_memory else "")
        run.save()
        self.writing -= 1
        self.ingests_finished += 1
        if self.ingests_finished == 1:
            crash_point("mid_ingest")
        if self.converting:
            crash_point("overlap_ingest")

    # ---- outcomes, interrupts, phases

    def _record(self, outcome: Outcome) -> None:
        run = self.run
        run.report.peak_rss_worker = max(run.report.peak_rss_worker, outcome.peak_rss)
        if outcome.detail:
            log.debug("%s: %s traceback:\n%s", outcome.key, outcome.step, outcome.detail)
        if outcome.step == "convert":
            self._converted(outcome)
        else:
            self._ingested(outcome)
        run.reporter.advance(outcome.step if outcome.step == "convert" else "ingest", outcome.key, outcome.ok)

    def _stop(self) -> None:
        """After a signal: start nothing new, give running steps the grace period, record what did not run."""
        run = self.run
        run.report.interrupted = run.interrupt.signum
        not_run = run.steps.cancel_queued() + [("ingest", a.key) for a in self.ready]
        self.ready = []
        deadline = time.monotonic() + run.grace
        while run.steps.busy and time.monotonic() < deadline:
            for outcome in run.steps.wait(min(_POLL_S, max(0.0, deadline - time.monotonic()))):
                self._record(outcome)
                self.ready = []  # a conversion that finished now is ingested by the next apply
        not_run += run.steps.abandon()
        run.report.not_run = [f"{step} {key}" for step, key in not_run]
        self._close_phases()

    def _close_phases(self) -> None:
        run = self.run
        if self.ingests_started is not None:
            run.report.seconds["ingest"] = time.perf_counter() - self.ingests_started
            run.reporter.done("ingest")


def _add_seconds(run: Run, name: str, start: float) -> None:
    run.report.seconds[name] = run.report.seconds.get(name, 0.0) + time.perf_counter() - start


def _union(frames: list[pd.DataFrame]) -> pd.DataFrame:
    import pandas as pd

    merged = pd.concat(frames)
    return merged[~merged.index.duplicated(keep="first")]


def _quick_verify(run: Run) -> None:
    """Check what this run touched: cells, distinct obs ids and nnz per range, as the state says.

    The steps that wrote the ranges checked them (Run.checked; see atlas.ingest_sample); one without is read here.
    """
    touched = [k for k in run.report.succeeded
               if k in run.state.samples and run.state.samples[k].ingest == "done"]
    unchecked = [k for k in touched if k not in run.checked]
    if unchecked:  # opening the arrays alone took 0.65 s on the S3 emulator
        stats = atlas.range_stats(run.uri, run.schema, [run.state.samples[k].joinids for k in unchecked])
        run.checked.update(zip(unchecked, stats))
    for key in touched:
        entry, got = run.state.samples[key], run.checked[key]
        start, stop = entry.joinids
        if (got.start, got.stop, got.cells, got.obs_ids, got.nnz) != (
                start, stop, entry.atlas_cells, entry.atlas_cells, entry.atlas_nnz):
            run.report.verify_problems.append(
                f"{key}: atlas holds {got.cells} cells ({got.obs_ids} distinct ids), {got.nnz} nnz in "
                f"[{got.start}, {got.stop}); the state expects {entry.atlas_cells} cells, "
                f"{entry.atlas_nnz} nnz in [{start}, {stop})")


class _RunLog:
    """A log file per run in the logs folder (DEBUG, with worker tracebacks).

    On an object store (no appends there) the log is written to a local temporary file and stored whole:
    once as the run starts, then every LOG_UPLOAD_S seconds while it grew (never per line), and once more
    when the run ends. An apply killed with -9 leaves its log up to its last few seconds.
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
        self.stored = -1  # bytes of the staged log last stored
        self.stop = threading.Event()
        self.uploader = threading.Thread(target=self._store_periodically, name="run-log-upload", daemon=True)

    def __enter__(self) -> None:
        if self.staged:
            try:
                self._store()  # an unwritable logs prefix fails the apply before it changes anything
            except BaseException:
                self.handler.close()
                os.unlink(self.staged)
                raise
            self.uploader.start()
        log.addHandler(self.handler)
        log.setLevel(logging.DEBUG)

    def __exit__(self, *exc: object) -> None:
        log.removeHandler(self.handler)
        self._close()

    def _close(self) -> None:
        self.handler.close()
        if self.staged:
            self.stop.set()
            if self.uploader.is_alive():
                self.uploader.join()
            try:
                self._store()
            finally:
                os.unlink(self.staged)

    def _store(self) -> None:
        """Store the staged log whole (one PUT) if it grew; whole records only, read under the handler's lock."""
        with self.handler.lock:
            if os.path.getsize(self.staged) == self.stored:
                return
            with open(self.staged, "rb") as fh:
                data = fh.read()
        storage.write_atomic(self.path, data)
        self.stored = len(data)

    def _store_periodically(self) -> None:
        while not self.stop.wait(LOG_UPLOAD_S):
            try:
                self._store()
            except StorageError as exc:  # a passing outage: the next round, or the final store, tries again
                log.debug("cannot store the run log yet: %s", exc.render())


def _write_run_summary(manifest: LoadedManifest, report: ApplyReport, parent_rss: int) -> None:
    """logs/last-apply.json: machine-readable figures of the last run (the benchmark reads it)."""
    payload = {
        "convert_seconds": report.seconds.get("convert", 0.0),
        "ingest_seconds": report.seconds.get("ingest", 0.0),
        "delete_seconds": report.seconds.get("delete", 0.0),
        "verify_seconds": report.seconds.get("verify", 0.0),
        "allocate_seconds": report.seconds.get("allocate", 0.0),
        "total_seconds": report.seconds.get("total", 0.0),
        "peak_rss_worker_bytes": report.peak_rss_worker,
        "peak_rss_parent_bytes": parent_rss,
        "succeeded": len(report.succeeded),
        "failed": report.failed,
        "log_file": report.log_file,
    }
    storage.write_atomic(manifest.logs / "last-apply.json", json.dumps(payload, indent=1).encode())


"""Run a Plan: `execute` and the steps it takes, in order.

Outcomes are saved at most every run.SAVE_EVERY_S, and every joinid range is recorded before anything is
written into it, so a kill at any moment leaves a state the next apply resumes from (redoing at most the
outcomes of the last interval; see run.py).
"""

from __future__ import annotations

import logging
import time

from soma_manifest import atlas, compact, genes, storage
from soma_manifest.apply import evolve
from soma_manifest.apply.deletes import forget_removed
from soma_manifest.apply.pipeline import Pipeline
from soma_manifest.apply.run import DEFAULT_CHUNK_NNZ, DEFAULT_GRACE_S, Run
from soma_manifest.apply.runlog import RunLog, write_run_summary
from soma_manifest.errors import PlanError
from soma_manifest.executors import ExecutorConfig, start_executor
from soma_manifest.faults import crash_point
from soma_manifest.interrupt import Interrupt
from soma_manifest.lock import Lease
from soma_manifest.manifest import LoadedManifest
from soma_manifest.plan import Observations, Plan
from soma_manifest.reports import ApplyReport, Reporter, SilentReporter
from soma_manifest.schema import AtlasSchema
from soma_manifest.state import State
from soma_manifest.steps import peak_rss
from soma_manifest.verify import quick_verify

log = logging.getLogger("soma_manifest")


def execute(manifest: LoadedManifest, schema: AtlasSchema, plan: Plan, observations: Observations,
            state: State, *, lease: Lease, executor: ExecutorConfig, allow_delete: bool,
            reporter: Reporter | None = None, chunk_nnz: int = DEFAULT_CHUNK_NNZ,
            interrupt: Interrupt | None = None, grace: float = DEFAULT_GRACE_S) -> ApplyReport:
    """Make the atlas match the plan. Failures of single samples are recorded, not raised.

    0. Refuse, changing nothing: deletes without `allow_delete`, a bad gene reference, an unwritable h5ad
       folder, an unreachable executor. Then open the run log (runlog.py).
    1. Record the metadata digests and the new stats of touched but unchanged files.
    2. Create the atlas, if the plan says so (the state, with its lineage, is saved first).
    3. Take removed samples out of the state; their ranges become orphans (deletes.py). Make the plan's schema
       changes in place: columns added or dropped, layers created or dropped (evolve.py).
    4. Convert on the workers and, as conversions arrive, allocate ranges, extend var, grow the domains
       (allocation.py), delete the orphans (deletes.py) and ingest or update obs on the workers, with no
       barrier between converting and ingesting (pipeline.py). Then compute the layers added in place for the
       samples the atlas held, and record the new structure once complete (evolve.py).
    5. Check what the run touched (verify.quick_verify).
    6. Record the apply in the history, then compact if due (compact.after_apply).
    7. Write logs/last-apply.json (runlog.py).

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
        with RunLog(manifest, run.report):
            where = f" at {executor.address}" if executor.address else ""
            log.info("apply %s: %d actions, %d unchanged, executor %s%s, %d processes", manifest.path,
                     len(plan.actions), len(plan.unchanged), executor.kind, where, executor.processes)
            state.studies.update(observations.study_caches)
            _refresh_unchanged(run, plan, observations)
            if run.interrupt.signum is None:
                if plan.create_atlas:
                    _create(run)
                forget_removed(run, plan)
                evolve.prepare(run, plan)
                Pipeline(run, plan).drive()
                evolve.finish(run)
            else:
                run.report.interrupted = run.interrupt.signum
            quick_verify(run.uri, schema, state, run.report, run.checked)
            run.report.seconds["total"] = time.perf_counter() - started
            compact.after_apply(manifest, plan, state, run.report)  # history entry, then compaction if due
            if run.report.interrupted:
                log.warning("interrupted by signal %d; %d step(s) not run: %s", run.report.interrupted,
                            len(run.report.not_run), ", ".join(run.report.not_run))
            parent = peak_rss()
            write_run_summary(manifest, run.report, parent)
    finally:
        steps.shutdown()
    return run.report


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

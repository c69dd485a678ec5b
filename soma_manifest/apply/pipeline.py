"""Scheduling: converts on the workers, and ingests as soon as their conversions arrive, in one loop over
the executor's outcomes (no phase barrier). Which executor runs the steps is the executors package's business.

The coordinator's serial work happens between outcomes, batched over what arrived together: allocate
(allocation.py; one state save), then the pending deletes (deletes.py; a save each), then the ingests are
submitted. So a range is in the state before any step can write into it, and a sample's old range is
deleted before its new version is ingested. While an ingest or obs update is in flight, a batch goes
ahead only if it needs no schema change and no delete (Allocator.fits); conversions go on meanwhile.

Small samples are ingested in groups (grouping.py): while conversions run, small converted samples wait until
a group's worth (growing with the apply) is ready; their ranges are allocated one after the other, and one
step writes them all, one fragment per array. A group that fails is not a failure of its members: their ranges
are retired (deleted, as any interrupted range) and each is retried alone, in a fresh range.
"""

from __future__ import annotations

import logging
import time

from soma_manifest.apply.allocation import Allocator
from soma_manifest.apply.deletes import delete_orphans
from soma_manifest.apply.grouping import groups, ripe
from soma_manifest.apply.run import Run
from soma_manifest.atlas import Member
from soma_manifest.convert import ConvertJob, ConvertResult, h5ad_path_for
from soma_manifest.faults import crash_point
from soma_manifest.plan import Action, Plan
from soma_manifest.steps import Outcome, convert_step, ingest_group_step, ingest_step, write_obs_step

log = logging.getLogger("soma_manifest")
_POLL_S = 0.2


class Pipeline:
    """Drives one run's steps to their end (or to an interrupt), recording each outcome in the state."""

    def __init__(self, run: Run, plan: Plan) -> None:
        self.run = run
        self.by_key = {a.key: a for a in plan.actions}
        self.converting = 0  # convert steps submitted and not yet finished
        self.ready: list[Action] = []  # converted (or nothing to convert), waiting for ingest or write_obs
        self.later = sum(1 for a in plan.actions if _writes(a))
        self.ingests_started: float | None = None
        self.ingests_finished = 0
        self.ingests_submitted = 0  # samples whose ingest was submitted (a group counts its members)
        self.writing = 0  # ingest and write_obs steps submitted and not yet finished
        self.converts_started = time.perf_counter()
        self.allocator = Allocator(run, sum(1 for a in plan.actions if a.ingests))
        self.groups: dict[str, list[str]] = {}  # a grouped ingest in flight: its first key -> its members' keys
        self.alone: set[str] = set()  # members of a failed group: retried one step each

    def drive(self) -> None:
        run = self.run
        self._submit_converts()
        delete_orphans(run)
        while True:
            if run.interrupt.signum is not None:
                self._stop()
                return
            if (self.ready and ripe(self.ready, run.state.samples, self.alone, converting=self.converting > 0,
                                        first=self.ingests_started is None, ingested=self.ingests_submitted)
                    and (not self.writing or self.allocator.fits(self.ready))):
                self._start_writes()
            if not run.steps.busy:
                break
            for outcome in run.steps.wait(_POLL_S):
                self._record(outcome)
        run.flush()
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
            elif _writes(action):
                self.ready.append(action)
        if any(a.kind == "invalid" for a in self.by_key.values()):
            run.save()
        if self.converting:
            run.reporter.phase("convert", self.converting)

    def _converted(self, outcome: Outcome) -> None:
        run = self.run
        action = self.by_key[outcome.key]
        self.converting -= 1
        if not outcome.ok:
            run.fail(outcome.key, "convert", outcome.error or "")
            self.allocator.not_coming(int(action.ingests))
        else:
            result: ConvertResult = outcome.value
            run.state.samples[outcome.key].mark_converted(
                raw_files=action.raw_files, raw_digest=action.raw_digest or "", meta_digest=action.meta_digest or "",
                conversion=run.schema.conversion, h5ad=result.h5ad, cells=result.cells, nnz=result.nnz,
                gene_mapping=result.gene_mapping, metadata_only="convert_metadata" in action.steps)
            self.allocator.converted(outcome.key, result.var)
            log.info("%s: converted (%d cells, %d nnz, %.1fs)%s%s", outcome.key, result.cells, result.nnz,
                     outcome.seconds, f"; left out {result.dropped_features} non-gene features"
                     if result.dropped_features else "",
                     f"; genes: {result.gene_mapping.text()}" if result.gene_mapping else "")
            if _writes(action):
                self.ready.append(action)
        if outcome.ok and run.state.samples[outcome.key].ingest != "none":
            # Its h5ad was rewritten while the atlas holds (part of) another version of it: a lost record would
            # leave the next plan trusting an h5ad that no longer matches the atlas. Not batched.
            run.save()
        else:
            run.recorded()  # a lost record only costs the next apply this conversion again
        crash_point("after_convert")
        if self.converting == 0:
            run.report.seconds["convert"] = time.perf_counter() - self.converts_started
            run.reporter.done("convert")

    # ---- ingests and obs updates

    def _start_writes(self) -> None:
        """Serially, for everything that became ready together: allocate, delete what must go, submit."""
        run = self.run
        batch, self.ready = self.ready, []
        allocated = self.allocator.allocate([a for a in batch if a.ingests], converting=self.converting > 0)
        delete_orphans(run)
        if self.ingests_started is None:
            self.ingests_started = time.perf_counter()
            run.reporter.phase("ingest", self.later - sum(1 for k in run.report.failed if k in self.by_key
                                                          and _writes(self.by_key[k])))
        for group in groups([a.key for a in allocated], run.state.samples, self.alone, run.chunk_nnz):
            if len(group) > 1:
                members = [Member(key, run.state.samples[key].sample_joinid, run.state.samples[key].h5ad,
                                  run.state.samples[key].joinids[0]) for key in group]
                run.steps.submit(group[0], "ingest_group", ingest_group_step, run.lease, run.uri, run.schema,
                                 members, run.chunk_nnz, urgent=True)
                self.groups[group[0]] = group
                self.ingests_submitted += len(group) - 1
                log.info("%s and %d more: ingested in one step", group[0], len(group) - 1)
            else:
                entry = run.state.samples[group[0]]
                run.steps.submit(group[0], "ingest", ingest_step, run.lease, group[0], run.uri, run.schema,
                                 entry.h5ad, entry.joinids[0], run.chunk_nnz, entry.sample_joinid, urgent=True)
            self.writing += 1
            self.ingests_submitted += 1
        updates = [a.key for a in batch if "write_obs" in a.steps]
        for key in updates:
            run.state.samples[key].mark_obs_write_started()
        if updates:
            run.save()  # on record before any of them can write, as an ingest's range is (fencing)
        for key in updates:
            entry = run.state.samples[key]
            run.steps.submit(key, "write_obs", write_obs_step, run.lease, key, run.uri, run.schema, entry.h5ad,
                             entry.joinids[0], urgent=True)
            self.writing += 1

    def _written(self, outcome: Outcome) -> None:
        self._member_written(outcome.key, outcome.step, outcome.ok, outcome.value, outcome.error, outcome.seconds)
        self.run.recorded()
        self._step_ended()

    def _group_written(self, outcome: Outcome) -> None:
        """A grouped ingest ended: each member done; or, when it failed, each member retried alone (its range is
        retired by the allocation, so deleted before the retry writes: a group that failed half-way leaves
        nothing behind)."""
        run = self.run
        keys = self.groups.pop(outcome.key)
        if outcome.ok:
            for key, ingested in zip(keys, outcome.value):
                self._member_written(key, "ingest", True, ingested, None, outcome.seconds)
                run.reporter.advance("ingest", key, True)
            run.recorded()
            crash_point("after_group")
        else:
            log.warning("%s and %d more: the grouped ingest failed (%s); each is retried alone", keys[0],
                        len(keys) - 1, outcome.error)
            self.alone.update(keys)
            self.allocator.again(len(keys))
            self.ready.extend(self.by_key[key] for key in keys)
        self._step_ended()

    def _member_written(self, key: str, step: str, ok: bool, value, error: str | None, seconds: float) -> None:
        run = self.run
        entry = run.state.samples[key]
        if not ok:
            run.fail(key, step, error or "")
            return
        ingested = step == "ingest"
        if ingested:
            entry.mark_ingested()
        else:
            entry.mark_metadata_written()
        run.checked[key] = value.stats if ingested else value
        run.report.succeeded.append(key)
        log.info("%s: %s done (%.1fs%s)", key, step, seconds, ", from memory" if ingested and value.from_memory else "")

    def _step_ended(self) -> None:
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
        elif outcome.step == "ingest_group":
            self._group_written(outcome)
            return  # advanced per member
        else:
            self._written(outcome)
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
        run.flush()
        run.report.not_run = [f"{step} {key}" for step, key in not_run]
        self._close_phases()

    def _close_phases(self) -> None:
        run = self.run
        if self.ingests_started is not None:
            run.report.seconds["ingest"] = time.perf_counter() - self.ingests_started
            run.reporter.done("ingest")


def _writes(action: Action) -> bool:
    """Whether the action writes into the atlas on a worker (an ingest or an obs update)."""
    return action.ingests or "write_obs" in action.steps

"""One apply run: what its parts share (manifest, schema, state, executor, lease, report) and how the state is
saved: at once where a save guards a later write (a range before anything writes into it, an obs update before
it is submitted, deletes), and at most every SAVE_EVERY_S for outcomes (converted, ingested, failed). A kill
loses at most the outcomes of that last interval: a lost "converted" makes the next apply convert the sample
again, a lost "ingested" leaves its range "allocated", which the next apply deletes and ingests again."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from soma_manifest import atlas
from soma_manifest.executors import StepExecutor
from soma_manifest.faults import crash_point
from soma_manifest.interrupt import Interrupt
from soma_manifest.lock import Lease
from soma_manifest.manifest import LoadedManifest
from soma_manifest.plan import Action
from soma_manifest.reports import ApplyReport, Reporter
from soma_manifest.schema import AtlasSchema
from soma_manifest.state import SampleState, State, save_state

log = logging.getLogger("soma_manifest")
DEFAULT_CHUNK_NNZ = 5_000_000
#: Outcome records are saved at most this often (each save rewrites the whole state: 1.3 MB at 1,000 samples).
SAVE_EVERY_S = 1.0
#: After a first SIGINT/SIGTERM, how long running steps may take to finish before they are abandoned.
DEFAULT_GRACE_S = 30.0


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
    unsaved: int = 0  # outcomes recorded in the state since its last save
    saved_at: float = 0.0  # time.monotonic() of the last save

    @property
    def uri(self) -> str:
        return str(self.manifest.atlas_uri)

    def save(self) -> None:
        """Save the state now: the one save point of a run."""
        crash_point("before_state_replace")
        save_state(self.state, self.manifest.state_path)
        self.unsaved, self.saved_at = 0, time.monotonic()

    def recorded(self) -> None:
        """An outcome was recorded in the state: saved with the next save, at most SAVE_EVERY_S from now."""
        self.unsaved += 1
        if time.monotonic() - self.saved_at >= SAVE_EVERY_S:
            self.save()

    def flush(self) -> None:
        """Save the outcomes recorded since the last save (the end of the steps, an interrupt)."""
        if self.unsaved:
            self.save()

    def entry(self, action: Action) -> SampleState:
        entry = self.state.samples.get(action.key)
        if entry is None:
            entry = SampleState(study=action.study, sample=action.sample, format=action.format)
            self.state.samples[action.key] = entry
        return entry

    def fail(self, key: str, step: str, error: str) -> None:
        entry = self.state.samples.get(key)
        if entry is not None:
            entry.mark_failed(step, error)
        self.report.failed[key] = f"{step}: {error}"
        log.error("%s: %s failed: %s", key, step, error)

    def add_seconds(self, name: str, start: float) -> None:
        """Add the time since `start` (perf_counter) to the report's figure `name`."""
        self.report.seconds[name] = self.report.seconds.get(name, 0.0) + time.perf_counter() - start

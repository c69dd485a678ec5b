"""Compaction: consolidate and vacuum every array of the atlas, keeping the retained applies readable.

Every apply adds fragments (obs, var, each X layer; deletes add delete commits), and reads and writes slow
down with their number. Consolidation keeps each cell's timestamp, so reads as of an earlier apply stay
exact; only purging deleted cells loses history, and it is done only where no kept apply needs them
(see docs/operations.md). The caller holds the atlas lock.
"""

from __future__ import annotations

import logging
import time

from soma_manifest import atlas, history
from soma_manifest.errors import AtlasError
from soma_manifest.faults import crash_point
from soma_manifest.manifest import LoadedManifest
from soma_manifest.plan import Plan
from soma_manifest.reports import ApplyReport, ArrayCompaction, CompactionReport
from soma_manifest.state import State, now, save_state

log = logging.getLogger("soma_manifest")


def compact(manifest: LoadedManifest, state: State) -> CompactionReport:
    """Consolidate and vacuum every array that has more than one fragment or deletes to purge.

    The state is saved first, marked pending and with the purge to come, so that a kill at any point
    leaves `history` cautious rather than wrong, and the next apply or compact finishes the work.
    """
    started = time.perf_counter()
    report = CompactionReport(finished_interrupted=state.compaction.pending)
    keep_from = history.oldest_kept_timestamp(state, manifest.spec.compaction.keep_history)
    purged_until = state.compaction.purged_until_ms or 0
    work = []
    for name, uri in atlas.array_uris(str(manifest.atlas_uri)).items():
        deletes = atlas.delete_timestamps(uri)
        # Purging applies every delete of the array: only when none is newer than the oldest kept apply.
        # Deletes purged already are purged again only to finish a killed compaction.
        fresh = deletes and (deletes[-1] > purged_until or state.compaction.pending)
        purge = bool(fresh) and (keep_from is None or deletes[-1] <= keep_from)
        work.append((name, uri, purge, deletes[-1] if purge else 0))
    state.compaction.pending = True
    state.compaction.purged_until_ms = max([purged_until] + [t for *_, t in work]) or None
    save_state(state, manifest.state_path)
    crash_point("compact_started")
    for name, uri, purge, _ in work:
        before = atlas.fragment_count(uri)
        # Consolidation writes every cell with the array's latest schema: the values of a column dropped since the
        # oldest kept apply would be lost for reads at it. Such an array waits until no kept apply predates the drop.
        dropped = atlas.columns_dropped_since(uri, keep_from) if keep_from is not None else []
        if dropped:
            log.info("%s: not consolidated: kept applies still read its dropped column(s) %s", name, ", ".join(dropped))
        elif before > 1 or purge:
            atlas.consolidate_array(uri, purge=purge)
            crash_point("compact_after_array")
        report.arrays.append(ArrayCompaction(name, before, atlas.fragment_count(uri), purge))
    state.compaction.pending = False
    state.compaction.last_at = now()
    save_state(state, manifest.state_path)
    report.seconds = time.perf_counter() - started
    return report


def most_fragments(manifest: LoadedManifest) -> int:
    """The largest fragment count of any array of the atlas."""
    return max((atlas.fragment_count(uri) for uri in atlas.array_uris(str(manifest.atlas_uri)).values()), default=0)


def after_apply(manifest: LoadedManifest, plan: Plan, state: State, report: ApplyReport) -> None:
    """apply's last step: record the apply in the history, then compact if an array has too many
    fragments (compaction.after_fragments) or a killed compaction left work behind."""
    history.record(manifest, plan, state, report, atlas.settled_timestamp())
    threshold = manifest.spec.compaction.after_fragments
    if atlas.atlas_exists(str(manifest.atlas_uri)) and (state.compaction.pending or (
            threshold is not False and most_fragments(manifest) > threshold)):
        _compact_logged(manifest, state)


def finish_pending(manifest: LoadedManifest, state: State) -> None:
    """For an apply with nothing else to do: finish the work of a killed compaction."""
    if state.compaction.pending and atlas.atlas_exists(str(manifest.atlas_uri)):
        _compact_logged(manifest, state)


def _compact_logged(manifest: LoadedManifest, state: State) -> None:
    """Compact inside an apply. A failure does not fail the apply (the atlas is complete and readable):
    it is logged, and stays pending for the next apply or compact."""
    try:
        result = compact(manifest, state)
    except AtlasError as exc:
        log.error("compaction failed; the next apply or `soma-manifest compact` retries it: %s", exc.render())
        return
    log.info("compacted the atlas: %d fragments -> %d (%.1fs)", result.fragments_before, result.fragments_after,
             result.seconds)

"""What leaves the atlas: samples that left the manifest leave the state first (their ranges queued as
orphans), then the queued ranges and sample rows are deleted, one saved state after each."""

from __future__ import annotations

import logging
import time

from soma_manifest import atlas
from soma_manifest.apply.run import Run
from soma_manifest.faults import crash_point
from soma_manifest.plan import Plan

log = logging.getLogger("soma_manifest")


def forget_removed(run: Run, plan: Plan) -> None:
    """Take the removed samples out of the state; their cells are deleted with the other orphans."""
    removed = [a for a in plan.actions if a.kind == "remove"]
    for action in removed:
        entry = run.state.remove_sample(action.key)
        if entry.holds_range:
            run.report.cells_deleted += entry.atlas_cells or 0
        run.report.removed.append(action.key)
        log.info("%s: removed from the state; its cells are queued for deletion", action.key)
    if removed:
        run.save()


def delete_orphans(run: Run) -> None:
    """Delete the queued ranges (a save after each), then the queued sample rows; stops at an interrupt."""
    while run.state.orphans and run.interrupt.signum is None:
        start, stop = run.state.orphans[0]
        began = time.perf_counter()
        crash_point("mid_delete")
        atlas.delete_obs_range(run.uri, run.schema, start, stop)
        crash_point("after_delete")
        run.state.orphans.pop(0)
        run.save()
        run.add_seconds("delete", began)
        log.info("deleted joinids [%d, %d)", start, stop)
    if run.state.orphan_samples and run.interrupt.signum is None:
        atlas.delete_samples(run.uri, run.schema, run.state.orphan_samples)
        log.info("deleted the rows of sample joinids %s", run.state.orphan_samples)
        run.state.orphan_samples = []
        run.save()

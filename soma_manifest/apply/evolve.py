"""Schema evolution during an apply: the plan's schema changes, made in place.

`prepare` runs before any sample step: columns are added and dropped and layers created and dropped, so that
samples ingested or rewritten by this apply get the new structure directly. `finish` runs after them: each
layer added in place is computed for every sample the atlas held before (one worker step per sample, recorded
in the state before it starts); once nothing is left, the state and the atlas record the new structure.
"""

from __future__ import annotations

import logging
import time

from soma_manifest import atlas
from soma_manifest.apply.run import Run
from soma_manifest.evolution import conversion_parts, in_place
from soma_manifest.faults import crash_point
from soma_manifest.plan import Plan
from soma_manifest.state import LayerFill
from soma_manifest.steps import write_layer_step

log = logging.getLogger("soma_manifest")
_POLL_S = 0.2


def prepare(run: Run, plan: Plan) -> None:
    """Record the conversion's parts; make the plan's column and layer changes; restamp the samples the change
    reaches without a write of their own."""
    state, schema = run.state, run.schema
    state.conversions[schema.conversion] = conversion_parts(schema)
    changes = plan.schema_changes
    if changes and not plan.create_atlas:
        added = [c.name for c in changes if c.what == "layer" and c.kind == "add"]
        for name in added:  # on record before the layer exists: the next apply fills what this one does not
            if name not in state.layer_fills:
                state.layer_fills[name] = LayerFill(todo={k: s.joinids[0] for k, s in state.samples.items()
                                                          if s.ingest == "done" and s.joinids})
        run.save()
        started = time.perf_counter()
        for what in ("obs", "var"):
            add = {c.name: c.type for c in changes if c.what == what and c.kind == "add"}
            drop = [c.name for c in changes if c.what == what and c.kind == "drop"]
            if add or drop:
                atlas.evolve_columns(run.uri, schema, what, add=add, drop=drop)
        for name in added:
            atlas.add_layer(run.uri, schema, next(layer for layer in schema.layers if layer.name == name))
        for change in changes:
            if change.what == "layer" and change.kind == "drop":
                atlas.drop_layer(run.uri, schema, change.name)
                state.layer_fills.pop(change.name, None)
                if change.name not in state.dropped_layers:
                    state.dropped_layers.append(change.name)
        crash_point("after_evolve")
        log.info("schema changes made in place: %s", ", ".join(c.short for c in changes))
        run.add_seconds("schema", started)
    for key in plan.unchanged:  # their counts and obs rows stand (plan._in_place_update)
        entry = state.samples[key]
        if entry.ingest == "done" and entry.atlas_conversion != schema.conversion \
                and in_place(state.conversions.get(entry.atlas_conversion), schema):
            entry.mark_restamped(schema.conversion)
    run.save()


def finish(run: Run) -> None:
    """Compute the layers added in place for the samples still without them; then, once every sample holds the
    schema's conversion and no layer is left to fill, record the new structure."""
    state = run.state
    started = time.perf_counter()
    submitted = 0
    for name, fill in state.layer_fills.items():
        for key, start in list(fill.todo.items()):
            entry = state.samples.get(key)
            if entry is None or entry.ingest != "done" or entry.joinids is None or entry.joinids[0] != start:
                del fill.todo[key]  # removed, or re-ingested in a new range with every layer
                continue
            if run.interrupt.signum is None:
                run.steps.submit(key, "write_layer", write_layer_step, run.lease, key, run.uri, run.schema, name,
                                 entry.joinids[0], entry.joinids[1])
                submitted += 1
    if submitted:
        run.reporter.phase("layers", submitted)
        _drive(run)
        run.reporter.done("layers")
        run.add_seconds("layers", started)
    for name in [n for n, fill in state.layer_fills.items() if not fill.todo]:
        del state.layer_fills[name]
    complete = not state.layer_fills and all(
        s.atlas_conversion == run.schema.conversion for s in state.samples.values() if s.ingest == "done")
    if complete and state.structure != run.schema.structure:
        atlas.set_structure(run.uri, run.schema)
        state.structure, state.structure_summary = run.schema.structure, run.schema.structure_summary()
        log.info("the atlas now has the schema's structure")
    run.save()


def _drive(run: Run) -> None:
    """Wait for the layer steps, recording each; after a signal, queued ones are cancelled (the next apply
    computes them) and running ones get the grace period."""
    deadline = None
    while run.steps.busy:
        if run.interrupt.signum is not None and deadline is None:
            run.report.interrupted = run.interrupt.signum
            run.report.not_run += [f"{step} {key}" for step, key in run.steps.cancel_queued()]
            deadline = time.monotonic() + run.grace
        if deadline is not None and time.monotonic() > deadline:
            run.report.not_run += [f"{step} {key}" for step, key in run.steps.abandon()]
            return
        for outcome in run.steps.wait(_POLL_S):
            _record(run, outcome)


def _record(run: Run, outcome) -> None:
    # A failed fill is not a failure of the sample (which would re-ingest it): the layer stays to fill.
    if not outcome.ok:
        run.report.failed[outcome.key] = f"write_layer: {outcome.error}"
        log.error("%s: write_layer failed: %s", outcome.key, outcome.error)
    else:
        name, entries = outcome.value
        run.state.layer_fills[name].todo.pop(outcome.key, None)
        log.info("%s: layer %s computed (%d entries, %.1fs)", outcome.key, name, entries, outcome.seconds)
    run.reporter.advance("layers", outcome.key, outcome.ok)
    run.save()
    crash_point("mid_layer_fill")

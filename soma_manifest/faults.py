"""Fault injection for crash tests: SOMA_MANIFEST_CRASH_AT=<point>[:<n>] kills the process there with SIGKILL.

Points: after_create, after_convert, after_allocate, after_delete, mid_delete, mid_ingest (parent, once one
ingest has finished), after_group (parent, a grouped ingest recorded), worker_ingest_after_obs (a worker, between
its obs and X writes), worker_group_after_rows (a worker, inside a grouped ingest: its samples-table rows
written, no cell yet), before_state_replace,
and inside the convert/ingest overlap: overlap_allocate (parent, ranges allocated for a batch of
conversions while other samples still convert) and overlap_ingest (parent, an ingest finished while
conversions still run); compact_started (the state marked pending, before any array), compact_after_array
(after each consolidated array); after_evolve (schema changes made in place, before the state records them)
and mid_layer_fill (parent, after a layer added in place was computed for one sample and recorded).
With `:<n>` the process dies the n-th time it reaches the point (e.g. before_state_replace:3, the third state
save), so that a kill can land in the middle of a run; counts are per process.

SOMA_MANIFEST_FAIL_AT=<point> raises a RuntimeError at a fail point instead (worker_group_after_rows).

SOMA_MANIFEST_PAUSE_AT=<point>[,<point>...]:<folder> holds a worker at a pause point (convert_start,
ingest_start (also a grouped ingest), write_obs_start: before the step checks its lease; write_obs_fenced,
write_layer_fenced: after an obs update's or a layer fill's lease check, before its write) while `<folder>/armed`
exists and is empty or names that point: it creates `<folder>/paused-<pid>`, waits for `<folder>/release`, then
creates `<folder>/resumed-<pid>`. Fencing tests use it to keep a dead apply's step alive until a new apply has run.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "SOMA_MANIFEST_CRASH_AT"
FAIL_ENV = "SOMA_MANIFEST_FAIL_AT"
PAUSE_ENV = "SOMA_MANIFEST_PAUSE_AT"
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fail_point(name: str) -> None:
    """SOMA_MANIFEST_FAIL_AT=<point>: raise there, every time (a step that fails, its process alive)."""
    if os.environ.get(FAIL_ENV) == name:
        raise RuntimeError(f"failure injected at {name} ({FAIL_ENV})")


def pause_point(name: str) -> None:
    points, _, folder = os.environ.get(PAUSE_ENV, "").partition(":")
    if name not in points.split(","):
        return
    try:
        armed = (Path(folder) / "armed").read_text().strip()
    except OSError:
        return
    if armed not in ("", name):
        return
    (Path(folder) / f"paused-{os.getpid()}").touch()
    while not (Path(folder) / "release").exists():
        time.sleep(0.05)
    (Path(folder) / f"resumed-{os.getpid()}").touch()

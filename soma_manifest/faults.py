"""Fault injection for crash tests: SOMA_MANIFEST_CRASH_AT=<point>[:<n>] kills the process there with SIGKILL.

Points: after_create, after_convert, after_allocate, after_delete, mid_delete, mid_ingest (parent, once one
ingest has finished), worker_ingest_after_obs (a worker, between its obs and X writes), before_state_replace,
compact_started (the state marked pending, before any array), compact_after_array (after each consolidated array).
With `:<n>` the process dies the n-th time it reaches the point (e.g. before_state_replace:3, the third state
save), so that a kill can land in the middle of a run; counts are per process.
"""

from __future__ import annotations

import os
import signal

ENV = "SOMA_MANIFEST_CRASH_AT"
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

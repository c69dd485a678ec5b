"""Fault injection for crash tests: SOMA_MANIFEST_CRASH_AT=<point> kills the process there with SIGKILL.

Points: after_create, after_convert, after_allocate, after_delete, mid_delete, mid_ingest (parent, once one
ingest has finished), worker_ingest_after_obs (a worker, between its obs and X writes), before_state_replace.
"""

from __future__ import annotations

import os
import signal

ENV = "SOMA_MANIFEST_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)

"""The work a pool worker does: top-level, picklable functions with small arguments.

Each returns an Outcome instead of raising, so that an error crosses the process boundary
as text and one bad sample never breaks the pool.
"""

from __future__ import annotations

import resource
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from soma_manifest import storage
from soma_manifest.errors import SomaManifestError
from soma_manifest.schema import AtlasSchema
from soma_manifest.storage import StoreSettings


@dataclass(frozen=True)
class Outcome:
    key: str
    step: str
    ok: bool
    seconds: float
    peak_rss: int  # bytes, this worker process so far
    value: Any = None
    error: str | None = None
    detail: str | None = field(default=None, repr=False)  # traceback, for the log file only


def peak_rss() -> int:
    """This process' high-water RSS in bytes. VmHWM, not ru_maxrss: a loky worker (fork+exec)
    inherits in ru_maxrss the parent's RSS at fork time, overstating an idle worker many times."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run(key: str, step: str, fn: Callable[[], Any]) -> Outcome:
    start = time.perf_counter()
    try:
        value, error, detail = fn(), None, None
    except SomaManifestError as exc:
        value, error, detail = None, exc.render(), traceback.format_exc()
    except Exception as exc:  # noqa: BLE001 - any failure of one sample is recorded, not fatal
        value, error, detail = None, f"{type(exc).__name__}: {exc}", traceback.format_exc()
    return Outcome(key, step, error is None, time.perf_counter() - start, peak_rss(), value, error, detail)


def convert_step(job, schema: AtlasSchema) -> Outcome:
    from soma_manifest.convert import convert_sample

    storage.configure(job.store)
    return _run(job.key, "convert", lambda: convert_sample(job, schema))


def ingest_step(key: str, uri: str, schema: AtlasSchema, h5ad: str, start: int, chunk_nnz: int,
                store: StoreSettings | None = None) -> Outcome:
    from soma_manifest.atlas import ingest_h5ad

    storage.configure(store)
    return _run(key, "ingest", lambda: ingest_h5ad(uri, schema, h5ad, start, chunk_nnz=chunk_nnz))


def write_obs_step(key: str, uri: str, schema: AtlasSchema, h5ad: str, start: int,
                   store: StoreSettings | None = None) -> Outcome:
    from soma_manifest.atlas import update_obs

    storage.configure(store)
    return _run(key, "write_obs", lambda: update_obs(uri, schema, h5ad, start))

"""The work a worker does (loky or Dask): top-level, picklable functions with small arguments.

Each returns an Outcome instead of raising, so that an error crosses the process boundary
as text and one bad sample never breaks the pool. Each takes its apply's Lease and does nothing
once the lease is no longer current (see `fence`); the atlas writes check it again before every write.
"""

from __future__ import annotations

import resource
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from soma_manifest import handoff, storage
from soma_manifest.errors import LeaseLost, SomaManifestError
from soma_manifest.faults import pause_point
from soma_manifest.lock import Lease
from soma_manifest.schema import AtlasSchema


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


def fence(lease: Lease) -> Callable[[], None]:
    """A check to call before each write: raises LeaseLost once the apply that started the step no longer
    holds the atlas (it ended, died and was taken over, or was unlocked). One small file read."""

    def check() -> None:
        if not lease.is_current():
            raise LeaseLost("this apply no longer holds the atlas lock; the step stopped before writing more",
                            where=lease.lock, hint="the apply that holds the lock now redoes this sample")

    return check


def _run(key: str, step: str, lease: Lease, fn: Callable[[Callable[[], None]], Any]) -> Outcome:
    start = time.perf_counter()
    storage.configure(lease.store)  # the apply's object-store settings (never credentials)
    check = fence(lease)
    try:
        pause_point("ingest_start" if step == "ingest_group" else f"{step}_start")  # fencing tests hold either
        check()
        value, error, detail = fn(check), None, None
    except SomaManifestError as exc:
        value, error, detail = None, exc.render(), traceback.format_exc()
    except Exception as exc:  # noqa: BLE001 - any failure of one sample is recorded, not fatal
        value, error, detail = None, f"{type(exc).__name__}: {exc}", traceback.format_exc()
    return Outcome(key, step, error is None, time.perf_counter() - start, peak_rss(), value, error, detail)


def convert_step(lease: Lease, job, schema: AtlasSchema) -> Outcome:
    """Convert one sample; the worker keeps it in memory for its ingest (see handoff)."""
    from soma_manifest.convert import convert_in_memory

    def convert(check: Callable[[], None]):
        handoff.drop()  # never hold two samples
        result, adata = convert_in_memory(job, schema)
        if not job.metadata_only:
            handoff.keep(result.h5ad, adata)
        return result

    return _run(job.key, "convert", lease, convert)


@dataclass(frozen=True)
class Ingested:
    stats: Any  # atlas.RangeStats: the range as written (apply's quick verify; see atlas.ingest_sample)
    from_memory: bool  # this worker still held the converted sample: its h5ad was not read


def ingest_step(lease: Lease, key: str, uri: str, schema: AtlasSchema, h5ad: str, start: int,
                chunk_nnz: int, sample_joinid: int) -> Outcome:
    """Write the sample at [start, ...); the value is an Ingested."""
    from soma_manifest.atlas import ingest_sample

    def ingest(check: Callable[[], None]) -> Ingested:
        converted = handoff.take(h5ad)
        # The range is checked here, on the worker, while other samples still convert and ingest; in
        # the coordinator, at the end, reading it back was serial (4.7 s of a 32 s apply on the full preset).
        return Ingested(ingest_sample(uri, schema, key, sample_joinid, h5ad, start, chunk_nnz=chunk_nnz,
                                      fence=check, converted=converted), converted is not None)

    return _run(key, "ingest", lease, ingest)


def write_obs_step(lease: Lease, key: str, uri: str, schema: AtlasSchema, h5ad: str, start: int) -> Outcome:
    """Rewrite the sample's obs rows; the value is its range as read back."""
    from soma_manifest.atlas import update_obs

    def write_obs(check: Callable[[], None]):
        return update_obs(uri, schema, h5ad, start, fence=check)  # obs rows read back; X neither written nor read

    return _run(key, "write_obs", lease, write_obs)


def write_layer_step(lease: Lease, key: str, uri: str, schema: AtlasSchema, layer: str, start: int,
                     stop: int) -> Outcome:
    """Compute an X layer added in place for the sample's cells, from the counts the atlas holds; the value
    is (the layer, the entries written)."""
    from soma_manifest.atlas import write_layer

    def write(check: Callable[[], None]) -> tuple[str, int]:
        return layer, write_layer(uri, schema, layer, start, stop, fence=check)

    return _run(key, "write_layer", lease, write)


def ingest_group_step(lease: Lease, uri: str, schema: AtlasSchema, members: list, chunk_nnz: int) -> Outcome:
    """Write several small samples at their consecutive ranges in one step (atlas.ingest_group); the outcome
    carries the first member's key, and its value is one Ingested per member, in order."""
    from soma_manifest.atlas import ingest_group

    def ingest(check: Callable[[], None]) -> list[Ingested]:
        return [Ingested(stats, False) for stats in ingest_group(uri, schema, members, chunk_nnz=chunk_nnz,
                                                                 fence=check)]

    return _run(members[0].key, "ingest_group", lease, ingest)

"""Where steps run: a loky pool on this machine (loky_pool.py), a dask.distributed cluster (dask_client.py),
or, for an apply of one small sample, apply's own process (inline.py). The only package that knows which one.

The coordinator (apply) submits top-level step functions with small picklable arguments and consumes
their Outcomes as they complete, through the StepExecutor protocol; queue.py holds what every backend
shares, workers.py what runs inside our own worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from soma_manifest.executors import workers
from soma_manifest.executors.dask_client import DaskExecutor
from soma_manifest.executors.inline import InlineExecutor
from soma_manifest.executors.loky_pool import (LokyExecutor, loky_pool, release_semaphores, stop_at_once,
                                               stop_local_workers)
from soma_manifest.executors.workers import dedicate_process
from soma_manifest.steps import Outcome

__all__ = ["ExecutorConfig", "StepExecutor", "start_executor", "on_this_machine", "warm_up", "dedicate_process",
           "stop_local_workers", "stop_at_once", "release_semaphores", "INLINE_MAX_BYTES"]

#: The largest raw sample (bytes of its files) whose steps run inline, in apply's own process, when it is the
#: only sample of an apply on loky: about 1.5M nonzeros of gzipped MTX. A worker would do the same work after
#: starting and importing the storage engine again (~1 s, bench/small_add.py). The bound keeps apply's own
#: peak small (a 6 MB sample of 2.4M nonzeros took it from 199 to 354 MB) and a signal's wait for the running
#: step short (under a second).
INLINE_MAX_BYTES = 4 << 20


@dataclass(frozen=True)
class ExecutorConfig:
    """Which executor runs the steps: `loky`, `dask` on `address` (None: a LocalCluster), or `inline`."""

    kind: str = "loky"
    address: str | None = None
    processes: int = 1


class StepExecutor(Protocol):
    def submit(self, key: str, step: str, fn: Callable[..., Outcome], *args: Any, urgent: bool = False) -> None: ...
    @property
    def busy(self) -> bool: ...
    def wait(self, timeout: float) -> list[Outcome]: ...
    def cancel_queued(self) -> list[tuple[str, str]]: ...
    def abandon(self) -> list[tuple[str, str]]: ...
    def shutdown(self) -> None: ...


def on_this_machine(processes: int, sample_bytes: list[int]) -> ExecutorConfig:
    """loky's config for an apply whose samples with steps have raw files of these sizes: inline for one
    small sample (INLINE_MAX_BYTES), else never more workers than samples."""
    if len(sample_bytes) == 1 and 0 < sample_bytes[0] <= INLINE_MAX_BYTES:
        return ExecutorConfig("inline", None, 1)
    return ExecutorConfig("loky", None, max(1, min(processes, len(sample_bytes))))


def start_executor(spec: ExecutorConfig) -> StepExecutor:
    if spec.kind == "inline":
        return InlineExecutor()
    if spec.kind == "dask":
        return DaskExecutor(spec.address, spec.processes)
    return LokyExecutor(spec.processes)


def warm_up(spec: ExecutorConfig) -> None:
    """Start the loky pool now and have each worker import the storage engine, while this process imports
    it too (an apply waited ~1.2 s for each in turn). Returns at once; Dask workers are left alone."""
    if spec.kind != "dask" and workers.dedicated():
        workers.lean_imports()
    if spec.kind == "loky":
        pool = loky_pool(spec.processes)
        for _ in range(spec.processes):
            pool.submit(workers.warm_imports)

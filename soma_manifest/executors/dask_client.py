"""A dask.distributed cluster: the scheduler at an address, or a LocalCluster of this machine."""

from __future__ import annotations

import os
import time
from typing import Any

from soma_manifest.errors import ExecutorError
from soma_manifest.executors.queue import QueuedExecutor, Task
from soma_manifest.steps import Outcome

#: How long a client waits for an unreachable scheduler before giving up.
CONNECT_TIMEOUT_S = 20


class DaskExecutor(QueuedExecutor):
    """A dask.distributed Client: of the scheduler at `address`, or of a LocalCluster of `processes` workers."""

    def __init__(self, address: str | None, processes: int) -> None:
        super().__init__()
        from distributed import Client, as_completed

        self.address = address
        self.cluster = None
        if address is None:
            self.cluster = _local_cluster(processes)
            self.client = Client(self.cluster)
            self.client.wait_for_workers(processes)
        else:
            try:
                self.client = Client(address, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError, ValueError) as exc:
                raise ExecutorError(f"cannot reach the Dask scheduler at {address} ({exc})", where=address,
                                    hint="start the scheduler and its workers, or check executor.address / "
                                         "--scheduler; nothing was written") from None
        self.completed = as_completed()

    def _slots(self) -> int:
        return max(1, sum(self.client.nthreads().values()))

    def _send(self, task: Task) -> Any:
        future = self.client.submit(task.fn, *task.args, key=f"{task.step}-{task.key}-{os.urandom(4).hex()}",
                                    pure=False)
        self.completed.add(future)
        return future

    def wait(self, timeout: float) -> list[Outcome]:
        self._fill()
        deadline = time.monotonic() + timeout
        while True:
            done = self.completed.next_batch(block=False)
            if done or not self.running or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        outcomes = []
        for future in done:
            task = self.running.pop(future, None)
            if task is None:
                continue
            try:
                outcomes.append(future.result())
            except Exception as exc:  # noqa: BLE001 - KilledWorker, a lost connection: that step failed
                outcomes.append(self._lost(task, exc))
        return outcomes

    def _abandon_running(self) -> None:
        # Dask does not stop a running task; its lease check stops it once apply releases the lock.
        self.client.cancel(list(self.running))

    def shutdown(self) -> None:
        self.abandon()
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def dask_setup(worker: object) -> None:
    """Run by each LocalCluster worker process as it starts (its `preload`): leave apply's process group.

    A Ctrl-C reaches the terminal's foreground process group, and only apply decides what stops. In the group,
    a worker process died of it (asyncio's SIGINT handler in the worker's main thread), taking its running
    step with it; blocking SIGINT (as loky's workers do, `workers.quiet_worker`) cannot cover the threads Dask started
    before. The worker stays in apply's session, and exits when apply does (Dask watches its parent)."""
    os.setpgid(0, 0)


#: Set aside from a LocalCluster's workers for apply itself (its peak: 0.3-0.6 GB, bench/README.md) and the OS.
COORDINATOR_BYTES = 1 << 30
#: The least one step needs on a Dask worker at the default chunk size: ~0.7 GB measured (the ingest's 5M-nnz X
#: chunks bound it up to ~17M nnz a sample; beyond, the convert holds the whole sample: ~27 MB per million nnz).
STEP_BYTES = 700 << 20
#: Where the nanny restarts a worker, as a fraction of its memory limit (Dask's default).
TERMINATE = 0.95


def worker_memory_limit(processes: int) -> int:
    """Each LocalCluster worker's memory limit: an equal share of the memory Dask sees for this process (the RAM,
    or a cgroup or SLURM limit), once apply's own is set aside. Equal shares let every worker hold a sample at
    once; a sample that needs more than 95% of a share is stopped by the nanny and fails (recorded, retried by
    the next apply): fewer processes give each one more."""
    from distributed.system import MEMORY_LIMIT

    share = (MEMORY_LIMIT - COORDINATOR_BYTES) // processes
    if share * TERMINATE < STEP_BYTES:
        most = max(1, int((MEMORY_LIMIT - COORDINATOR_BYTES) * TERMINATE // STEP_BYTES))
        raise ExecutorError(f"{processes} Dask workers would get {share / 2**30:.2f} GB each of this machine's "
                            f"{MEMORY_LIMIT / 2**30:.1f} GB; one step needs at least {STEP_BYTES / 2**30:.1f} GB",
                            where="processes", hint=f"use at most {most} processes here; nothing was written")
    return share


def _local_cluster(processes: int):
    """One single-threaded worker process per slot, spawned (no fork after tiledbsoma started its threads)."""
    import dask
    from distributed import LocalCluster

    memory = worker_memory_limit(processes)
    dask.config.set({
        "distributed.worker.multiprocessing-method": "spawn",
        # A step holds one sample; spilling or pausing cannot help it. Past TERMINATE the nanny restarts the
        # worker and that step fails (recorded, retried by the next apply).
        "distributed.worker.memory.target": False,
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.pause": False,
        "distributed.worker.memory.terminate": TERMINATE,
    })
    return LocalCluster(n_workers=processes, threads_per_worker=1, processes=True, memory_limit=memory,
                        dashboard_address=":0", silence_logs=50, preload=[__name__])

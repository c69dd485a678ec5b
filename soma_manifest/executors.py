"""Where steps run: a loky pool on this machine, a dask.distributed cluster, or, for an apply of one small
sample, apply's own process. The only module that knows which one.

The coordinator (apply) submits top-level step functions with small picklable arguments and consumes
their Outcomes as they complete. Submissions wait in a local queue and reach the backend only when a
worker slot is free, so that "stop submitting" really leaves the not-yet-started steps unstarted (and
urgent steps, e.g. ingests, overtake queued converts). A worker lost mid-step turns into a failed
Outcome for that step; nothing is raised.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Protocol

from soma_manifest.errors import ExecutorError
from soma_manifest.steps import Outcome

#: How long a client waits for an unreachable scheduler before giving up.
CONNECT_TIMEOUT_S = 20


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


@dataclass
class _Task:
    key: str
    step: str
    fn: Callable[..., Outcome]
    args: tuple


class StepExecutor(Protocol):
    def submit(self, key: str, step: str, fn: Callable[..., Outcome], *args: Any, urgent: bool = False) -> None: ...
    @property
    def busy(self) -> bool: ...
    def wait(self, timeout: float) -> list[Outcome]: ...
    def cancel_queued(self) -> list[tuple[str, str]]: ...
    def abandon(self) -> list[tuple[str, str]]: ...
    def shutdown(self) -> None: ...


class _Queued:
    """The local queue and slot accounting shared by every backend."""

    def __init__(self) -> None:
        self.queue: deque[_Task] = deque()
        self.running: dict[Any, _Task] = {}  # backend future -> task

    def submit(self, key: str, step: str, fn: Callable[..., Outcome], *args: Any, urgent: bool = False) -> None:
        task = _Task(key, step, fn, args)
        (self.queue.appendleft if urgent else self.queue.append)(task)
        self._fill()

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    def cancel_queued(self) -> list[tuple[str, str]]:
        """Forget the steps that have not started; returns (step, key) of each."""
        dropped = [(t.step, t.key) for t in self.queue]
        self.queue.clear()
        return dropped

    def abandon(self) -> list[tuple[str, str]]:
        """Stop waiting for the running steps (and stop them where the backend can); returns (step, key) of each."""
        dropped = self.cancel_queued() + [(t.step, t.key) for t in self.running.values()]
        if self.running:
            self._abandon_running()
        self.running.clear()
        return dropped

    def _abandon_running(self) -> None:
        raise NotImplementedError

    def _fill(self) -> None:
        # Called by submit and as wait begins, not as it returns: the coordinator first handles what finished,
        # so a sample's ingest (urgent) takes the slot its conversion freed, on the worker that holds it.
        slots = self._slots() if self.queue else 0
        while self.queue and len(self.running) < slots:
            task = self.queue.popleft()
            self.running[self._send(task)] = task

    def _lost(self, task: _Task, exc: BaseException) -> Outcome:
        return Outcome(task.key, task.step, False, 0.0, 0,
                       error=f"worker process died: {type(exc).__name__}: {exc}".rstrip(": "))

    def _slots(self) -> int:
        raise NotImplementedError

    def _send(self, task: _Task) -> Any:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Nothing stays queued (a backend that holds more releases it too)."""
        self.queue.clear()


def _quiet_worker() -> None:
    """Workers never see SIGINT: a Ctrl-C reaches the whole process group, and only apply decides what stops.

    Blocked, not ignored: TileDB installs its own SIGINT handler when a worker opens its first array, and a
    Ctrl-C delivered to it there crashed the worker (SIGSEGV, when the handler it replaced was SIG_IGN).
    A blocked signal is never delivered, whatever handler is installed, in this thread and in the threads
    it starts later."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    _lean_imports()


def _lean_imports() -> None:
    """Keep out of a process of ours four packages that the storage engine's import loads and this tool never
    uses: Dask (~0.5 s), zarr (~0.2 s), charset_normalizer (~0.08 s) and shapely (~0.02 s), of the ~1.2 s that
    import took.

    - Dask: anndata (which tiledbsoma imports) imports dask.array whenever dask is installed. With None in
      sys.modules, `find_spec("dask")` is None and anndata goes without, as when Dask is not installed.
    - charset_normalizer: scipy's array-API layer reads every attribute of numpy, which imports numpy.f2py,
      which imports charset_normalizer when it is installed (for requests, which no process of ours loads), to
      guess the encoding of Fortran sources. With None, f2py goes without, as when it is not installed.
    - zarr: anndata needs it for zarr stores; this tool reads and writes h5ad files only. A placeholder module
      stands in: anndata's `from zarr import Array, Group` gets two classes that no object is an instance of,
      and any other use raises. (anndata is pinned to 0.12, and the suite runs every command with it.)
    - shapely: tiledbsoma's spatial types (scenes, geometry and point-cloud dataframes) use it; an atlas has
      none. Placeholders stand in the same way: somacore's import-time `shapely.geometry.base.BaseGeometry`
      is a class of its own. (tiledbsoma is pinned to 2.3.)

    Only in loky's workers and in a dedicated process (the command line) applying on loky or inline."""
    for absent in ("dask", "charset_normalizer"):
        if absent not in sys.modules:
            sys.modules[absent] = None  # type: ignore[assignment]
    if "zarr" not in sys.modules:
        sys.modules["zarr"] = _placeholder("zarr", "Array", "Group")
    if "shapely" not in sys.modules:
        base = _placeholder("shapely.geometry.base", "BaseGeometry")
        geometry = _placeholder("shapely.geometry", base=base)
        sys.modules.update({"shapely": _placeholder("shapely", geometry=geometry), "shapely.geometry": geometry,
                            "shapely.geometry.base": base})


def _placeholder(name: str, *classes: str, **submodules: ModuleType) -> ModuleType:
    """A module that only has these classes (of its own, so no object is an instance of them) and submodules."""
    module = ModuleType(name, "A placeholder: this process never uses this package (executors._lean_imports).")
    for cls in classes:
        setattr(module, cls, type(cls, (), {"__module__": name}))
    for attr, sub in submodules.items():
        setattr(module, attr, sub)
    return module


def _while_coordinator_lives(coordinator: int, fn: Callable[..., Outcome], *args: object) -> Outcome:
    """Run one step on a loky worker, unless apply (the worker's parent) is gone.

    loky's workers keep taking queued jobs after a kill -9 of apply; such a job does not start. (The lease,
    checked by the step itself, is what fences it for certain; this only saves the wasted work early.)
    """
    if os.getppid() != coordinator:
        os._exit(1)
    return fn(*args)


class LokyExecutor(_Queued):
    """A reusable loky pool of `processes` workers on this machine (fork+exec: safe with tiledbsoma threads).
    The pool outlives shutdown, for the next apply in this process (loky reuses it)."""

    def __init__(self, processes: int) -> None:
        super().__init__()
        self.processes = processes
        self.pool = self._pool()

    def _pool(self):
        return _loky_pool(self.processes)

    def _slots(self) -> int:
        return self.processes

    def _send(self, task: _Task) -> Any:
        try:
            return self.pool.submit(_while_coordinator_lives, os.getpid(), task.fn, *task.args)
        except Exception:  # noqa: BLE001 - a pool broken by a lost worker: loky gives a fresh one
            self.pool = self._pool()
            return self.pool.submit(_while_coordinator_lives, os.getpid(), task.fn, *task.args)

    def wait(self, timeout: float) -> list[Outcome]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures

        self._fill()
        if not self.running:
            return []
        done, _ = wait_futures(list(self.running), timeout=timeout, return_when=FIRST_COMPLETED)
        outcomes = []
        for future in done:
            task = self.running.pop(future)
            try:
                outcomes.append(future.result())
            except Exception as exc:  # noqa: BLE001 - a worker killed or lost: that step failed
                outcomes.append(self._lost(task, exc))
        return outcomes

    def _abandon_running(self) -> None:
        # Steps still running are killed; their ranges stay "allocated" in the state and are redone.
        _retired.append(_held(self.pool))
        self.pool.shutdown(wait=False, kill_workers=True)


_pool: Any = None  # the loky pool this process started last (loky reuses it)
_dedicated = False  # see dedicate_process
#: The threads and call queue of each loky pool that was shut down (by us or by loky, replacing it), until
#: stop_local_workers has seen its threads end (_settle).
_retired: list[tuple[Any, Any]] = []
#: How long stop_local_workers waits for the threads of shut-down pools, in all: they end within milliseconds
#: once the workers are killed; the bound only keeps a wedged one from holding the exit.
SETTLE_TIMEOUT_S = 10.0


def _loky_pool(processes: int):
    from loky import get_reusable_executor

    global _pool
    # Workers read object-store credentials from their environment (never from task arguments). Passing the
    # AWS_* variables makes loky start fresh workers when they changed since its pool was started.
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    before, held = _pool, _held(_pool)
    _pool = get_reusable_executor(max_workers=processes, timeout=30, initializer=_quiet_worker, env=aws)
    if before is not None and _pool is not before:  # loky shut it down: broken, shut down, other arguments
        _retired.append(held)
    _retired[:] = [(m, q) for m, q in _retired if _alive(m, q)]
    return _pool


def _held(pool: Any) -> tuple[Any, Any]:
    """A pool's manager thread and call queue, taken before it is shut down (shutdown forgets them)."""
    return getattr(pool, "_executor_manager_thread", None), getattr(pool, "_call_queue", None)


def _alive(manager: Any, calls: Any) -> bool:
    return any(t is not None and t.is_alive() for t in (manager, getattr(calls, "_thread", None)))


def _settle() -> None:
    """Wait until the threads of every shut-down pool have ended, then let go of them.

    A pool's call queue (three named semaphores) is held by its feeder thread, which ends a little after
    shutdown returns: loky joins it only in processes other than the one that made the queue. The command line
    exits with os._exit, which runs no finalizer; a semaphore still alive then is never unlinked, and loky's
    resource tracker warned "There appear to be 3 leaked semlock objects to clean up at shutdown" on stderr
    (about one 16-sample apply in three). Once the threads end, the last references go and the semaphores
    are unlinked and unregistered there and then."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    for manager, calls in _retired:
        if manager is not None:
            manager.join(max(0.0, deadline - time.monotonic()))  # it closes the queue, starting the feeder's end
        feeder = getattr(calls, "_thread", None)
        if feeder is not None:
            feeder.join(max(0.0, deadline - time.monotonic()))
    _retired.clear()


def dedicate_process() -> None:
    """Declare that this process runs soma-manifest only (the command line does): an apply on loky or inline
    then leaves out of it the packages _lean_imports names, as the workers do. A library user's process is
    never changed so."""
    global _dedicated
    _dedicated = True


def stop_local_workers() -> None:
    """Stop the loky workers this process started, idle between applies (they would otherwise live until
    their 30 s idle timeout, or hold the interpreter's exit while they shut down), and wait until nothing of
    their pools holds a semaphore (_settle)."""
    global _pool
    if _pool is not None:
        _retired.append(_held(_pool))
        _pool.shutdown(wait=True, kill_workers=True)
        _pool = None
    _settle()


def stop_at_once() -> None:
    """For a process about to end with os._exit now, from a signal handler (a second Ctrl-C): SIGKILL this
    process's loky workers (their steps are redone by the next apply, as after a kill -9; else they ran on,
    lease-fenced, and lingered until loky's idle timeout) and release its named semaphores. Takes no lock of
    loky's: the handler may have interrupted this thread inside one."""
    for process in list(getattr(_pool, "_processes", {}).values()):
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    release_semaphores()


def release_semaphores() -> None:
    """Unlink the named semaphores this process still holds, as the interpreter's exit would (multiprocessing's
    finalizers): for a process about to end with os._exit, which runs none. Else each resource tracker (loky's,
    and multiprocessing's for a LocalCluster's process queues) warned on stderr of "leaked semlock objects",
    once the last process holding it was gone. Only modules already loaded: none is imported here (this runs in
    a signal handler too)."""
    util = sys.modules.get("multiprocessing.util")
    if util is None:
        return
    cleanups = {getattr(sys.modules.get(name), "SemLock", None) for name in
                ("multiprocessing.synchronize", "loky.backend.synchronize")}
    cleanups = {cls._cleanup for cls in cleanups if cls is not None}
    for finalizer in list(util._finalizer_registry.values()):
        if getattr(finalizer, "_callback", None) in cleanups:
            finalizer()


def _warm_imports() -> None:
    import gc
    import importlib

    # tiledbsoma and anndata: ~1.2 s, else paid by the worker's first step
    for module in ("soma_manifest.atlas", "soma_manifest.convert"):
        importlib.import_module(module)
    # The garbage collector's full passes no longer walk the objects those imports made, which live as long
    # as the worker: perf put the collector at 3.2% of a worker's CPU over three full-preset samples, 1.1%
    # with them frozen.
    gc.freeze()


def warm_up(spec: ExecutorConfig) -> None:
    """Start the loky pool now and have each worker import the storage engine, while this process imports
    it too (an apply waited ~1.2 s for each in turn). Returns at once; Dask workers are left alone."""
    if spec.kind != "dask" and _dedicated:
        _lean_imports()
    if spec.kind == "loky":
        pool = _loky_pool(spec.processes)
        for _ in range(spec.processes):
            pool.submit(_warm_imports)


class InlineExecutor(_Queued):
    """Steps run one at a time in this process, inside `wait`: for an apply of one small sample (the GitOps
    case, one sample added on a merge), whose steps cost less than a worker's start (INLINE_MAX_BYTES).

    A running step is not abandoned: a signal stops the apply when the step returns. A crash inside a step
    ends apply with it, as a kill -9 would; the state, saved before every step, lets the next apply redo it."""

    def _slots(self) -> int:
        return 1

    def _send(self, task: _Task) -> Any:
        return object()  # a token: the step runs in wait, once the coordinator waits for it

    def wait(self, timeout: float) -> list[Outcome]:
        self._fill()
        outcomes = []
        for token, task in list(self.running.items()):
            outcomes.append(task.fn(*task.args))
            del self.running[token]
        return outcomes

    def _abandon_running(self) -> None:
        pass  # nothing runs between two waits


class DaskExecutor(_Queued):
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

    def _send(self, task: _Task) -> Any:
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
    step with it; blocking SIGINT (as loky's workers do, `_quiet_worker`) cannot cover the threads Dask started
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

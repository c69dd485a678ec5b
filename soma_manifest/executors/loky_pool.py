"""A loky pool on this machine, and what ends it cleanly: its workers stopped, its named semaphores released
before the command line's os._exit (which runs no finalizer)."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from soma_manifest.executors.queue import QueuedExecutor, Task
from soma_manifest.executors.workers import quiet_worker, while_coordinator_lives
from soma_manifest.steps import Outcome


class LokyExecutor(QueuedExecutor):
    """A reusable loky pool of `processes` workers on this machine (fork+exec: safe with tiledbsoma threads).
    The pool outlives shutdown, for the next apply in this process (loky reuses it)."""

    def __init__(self, processes: int) -> None:
        super().__init__()
        self.processes = processes
        self.pool = self._pool()

    def _pool(self):
        return loky_pool(self.processes)

    def _slots(self) -> int:
        return self.processes

    def _send(self, task: Task) -> Any:
        try:
            return self.pool.submit(while_coordinator_lives, os.getpid(), task.fn, *task.args)
        except Exception:  # noqa: BLE001 - a pool broken by a lost worker: loky gives a fresh one
            self.pool = self._pool()
            return self.pool.submit(while_coordinator_lives, os.getpid(), task.fn, *task.args)

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
#: The threads and call queue of each loky pool that was shut down (by us or by loky, replacing it), until
#: stop_local_workers has seen its threads end (_settle).
_retired: list[tuple[Any, Any]] = []
#: How long stop_local_workers waits for the threads of shut-down pools, in all: they end within milliseconds
#: once the workers are killed; the bound only keeps a wedged one from holding the exit.
SETTLE_TIMEOUT_S = 10.0


def loky_pool(processes: int):
    from loky import get_reusable_executor

    global _pool
    # Workers read object-store credentials from their environment (never from task arguments). Passing the
    # AWS_* variables makes loky start fresh workers when they changed since its pool was started.
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    before, held = _pool, _held(_pool)
    _pool = get_reusable_executor(max_workers=processes, timeout=30, initializer=quiet_worker, env=aws)
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

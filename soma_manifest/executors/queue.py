"""The local queue and slot accounting every backend shares: submissions wait here and reach the backend only
when a worker slot is free, so that "stop submitting" really leaves the not-yet-started steps unstarted (and
urgent steps, e.g. ingests, overtake queued converts). A worker lost mid-step turns into a failed Outcome for
that step; nothing is raised."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from soma_manifest.steps import Outcome


@dataclass
class Task:
    key: str
    step: str
    fn: Callable[..., Outcome]
    args: tuple


class QueuedExecutor:
    """The local queue and slot accounting shared by every backend."""

    def __init__(self) -> None:
        self.queue: deque[Task] = deque()
        self.running: dict[Any, Task] = {}  # backend future -> task

    def submit(self, key: str, step: str, fn: Callable[..., Outcome], *args: Any, urgent: bool = False) -> None:
        task = Task(key, step, fn, args)
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

    def _lost(self, task: Task, exc: BaseException) -> Outcome:
        return Outcome(task.key, task.step, False, 0.0, 0,
                       error=f"worker process died: {type(exc).__name__}: {exc}".rstrip(": "))

    def _slots(self) -> int:
        raise NotImplementedError

    def _send(self, task: Task) -> Any:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Nothing stays queued (a backend that holds more releases it too)."""
        self.queue.clear()

"""Steps in apply's own process: for an apply of one small sample."""

from __future__ import annotations

from typing import Any

from soma_manifest.executors.queue import QueuedExecutor, Task
from soma_manifest.steps import Outcome


class InlineExecutor(QueuedExecutor):
    """Steps run one at a time in this process, inside `wait`: for an apply of one small sample (the GitOps
    case, one sample added on a merge), whose steps cost less than a worker's start (INLINE_MAX_BYTES).

    A running step is not abandoned: a signal stops the apply when the step returns. A crash inside a step
    ends apply with it, as a kill -9 would; the state, saved before every step, lets the next apply redo it."""

    def _slots(self) -> int:
        return 1

    def _send(self, task: Task) -> Any:
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

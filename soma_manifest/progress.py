"""Progress display for apply, drawn on stderr: a bar on a terminal, one line per sample elsewhere."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class _BarReporter:
    """Draws its bars from the first phase on, so nothing is drawn while apply waits for the lock or plans."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}

    def phase(self, name: str, total: int) -> None:
        if self.progress is None:
            columns = (TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self.progress = Progress(*columns, console=self.console, transient=False)
            self.progress.start()
        self.tasks[name] = self.progress.add_task(name, total=total)

    def advance(self, name: str, key: str, ok: bool) -> None:
        self.progress.advance(self.tasks[name])
        if not ok:
            self.progress.console.print(f"  [red]failed[/] {name} {escape(key)}")

    def done(self, name: str) -> None: ...

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class _LineReporter:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.counts: dict[str, list[int]] = {}

    def phase(self, name: str, total: int) -> None:
        self.counts[name] = [0, total]
        self.console.print(f"{name}: {total} sample(s)")

    def advance(self, name: str, key: str, ok: bool) -> None:
        count = self.counts[name]
        count[0] += 1
        status = "ok" if ok else "[red]FAILED[/]"
        self.console.print(f"  {name} {count[0]}/{count[1]} {escape(key)} {status}")

    def done(self, name: str) -> None: ...


@contextmanager
def progress_reporter(console: Console) -> Iterator[object]:
    if not console.is_terminal:
        yield _LineReporter(console)
        return
    reporter = _BarReporter(console)
    try:
        yield reporter
    finally:
        reporter.close()

"""The terminal: stdout for results and stderr for the rest (styled only on a terminal), one clear message
per error, apply's progress (a bar on a terminal, one line per sample elsewhere), and its signal handling."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape

from soma_manifest import api
from soma_manifest.errors import ManifestError, SomaManifestError

if TYPE_CHECKING:
    from rich.progress import Progress


class Output:
    """stdout for results, stderr for progress and errors; styles only on a terminal."""

    plain = False  # --no-color

    @classmethod
    def _console(cls, stderr: bool) -> Console:
        plain = cls.plain or bool(os.environ.get("NO_COLOR"))
        # force_terminal=False also beats FORCE_COLOR and drops bold/dim, not only colours.
        return Console(stderr=stderr, highlight=False, soft_wrap=True, no_color=plain or None,
                       force_terminal=False if plain else None)

    @classmethod
    def out(cls) -> Console:
        return cls._console(stderr=False)

    @classmethod
    def err(cls) -> Console:
        return cls._console(stderr=True)


def guard(fn: Callable[[], int]) -> None:
    """Run a command; a SomaManifestError becomes one clear message on stderr and exit 1."""
    try:
        code = fn()
    except ManifestError as exc:
        err = Output.err()
        err.print("[red]error:[/] invalid input")
        for problem in exc.problems:
            err.print(f"  {problem}", markup=False)
        raise typer.Exit(1)
    except SomaManifestError as exc:
        Output.err().print(f"[red]error:[/] {escape(exc.render())}")
        raise typer.Exit(1)
    raise typer.Exit(code)


# ---- apply's progress (reports.Reporter)

class _BarReporter:
    """Draws its bars from the first phase on, so nothing is drawn while apply waits for the lock or plans."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}

    def phase(self, name: str, total: int) -> None:
        if self.progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
def progress_reporter(console: Console) -> Iterator[api.Reporter]:
    """Draws apply's progress on `console` (stderr)."""
    if not console.is_terminal:
        yield _LineReporter(console)
        return
    reporter = _BarReporter(console)
    try:
        yield reporter
    finally:
        reporter.close()


# ---- signals

@contextmanager
def interruptible() -> Iterator[api.Interrupt]:
    """SIGINT and SIGTERM during apply. The first asks apply to stop starting steps and to finish cleanly
    (apply saves the state, the lock is released, exit 130/143). A second one stops at once: the lock is
    released so that steps still running on a cluster stop before their next write, local workers are killed
    (api.stop_at_once), and the process exits; the state, saved after every step, is as after a kill -9 and
    the next apply converges from it.

    The handlers only set a flag and write with os.write. Before, SIGINT raised KeyboardInterrupt wherever
    each process was (apply and every worker: a terminal signals the whole group), and workers crashed with
    SIGSEGV inside TileDB's own SIGINT handler (see executors.workers.quiet_worker); SIGTERM ended apply without
    releasing the lock."""
    import signal

    interrupt = api.Interrupt()

    def handler(signum: int, frame: object) -> None:
        if interrupt.signum is None:
            interrupt.signum = signum
            os.write(2, f"\n{signal.Signals(signum).name}: stopping; running steps may finish (press Ctrl-C "
                        "again to stop at once).\n".encode())
            return
        if interrupt.lock is not None:
            interrupt.lock.__exit__(None, None, None)
        api.stop_at_once()
        os.write(2, b"Stopped at once. The state is saved after every step: run `soma-manifest apply` again "
                    b"to resume.\n")
        os._exit(128 + interrupt.signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupt
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)



"""Helpers shared by the benchmark scripts: timing, peak memory, disk size, process pools.

Peak RSS is read from ``VmHWM`` in ``/proc/<pid>/status`` rather than from
``getrusage().ru_maxrss``: a worker started by fork+exec (loky, spawn) inherits in
``ru_maxrss`` the resident size of the parent at fork time, so a worker of a parent
that has imported tiledbsoma would report the parent's memory as its own. ``VmHWM``
belongs to the process's own address space and starts afresh at exec.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MB = 1024 * 1024


def peak_rss_bytes(pid: int | str = "self") -> int:
    """High-water resident set size of a process (this one by default), in bytes."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if pid == "self":  # not Linux: fall back to getrusage (KiB on Linux, bytes on macOS)
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return 0


def dir_bytes(path: Path) -> int:
    """Apparent size of every file under ``path`` (``du -sb``)."""
    return sum(
        (Path(root) / name).stat().st_size for root, _, files in os.walk(path) for name in files
    )


def fresh_dir(path: Path) -> Path:
    """Remove ``path`` if it exists and return it (the caller creates it as needed)."""
    if path.exists():
        shutil.rmtree(path)
    return path


class Stopwatch:
    """Named wall-clock laps: ``with sw.lap("ingest"): ...`` then ``sw.seconds["ingest"]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def lap(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def process_pool(processes: int) -> Any:
    """A fresh loky pool (fork+exec: safe after tiledbsoma has started its threads)."""
    from loky import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=processes)


@dataclass
class FlowResult:
    """One row of the benchmark table. Seconds are wall clock; bytes are peaks or sizes."""

    flow: str
    convert_s: float | None = None
    ingest_s: float | None = None
    total_s: float | None = None
    nnz: int | None = None
    n_obs: int | None = None
    parent_rss_bytes: int | None = None
    worker_rss_bytes: int | None = None
    atlas_bytes: int | None = None
    error: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def nnz_per_s(self) -> float | None:
        """Ingest throughput."""
        if self.nnz and self.ingest_s:
            return self.nnz / self.ingest_s
        return None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> FlowResult:
        return cls(**json.loads(text))


@dataclass
class WatchedRun:
    """A finished subprocess: exit code, wall time, peak RSS of it and of its descendants."""

    returncode: int
    seconds: float
    parent_peak_bytes: int
    child_peak_bytes: int
    parent_cpu_s: float  # CPU seconds (user + system) of the command's own process, children excluded
    other_cores: float  # mean cores kept busy by other processes of the machine meanwhile
    stdout: str
    stderr: str

    def last_error_line(self) -> str:
        lines = [line for line in (self.stderr or self.stdout).splitlines() if line.strip()]
        return lines[-1].strip() if lines else f"exit code {self.returncode}"


def run_watched(cmd: list[str], cwd: Path | None = None, poll_s: float = 0.05) -> WatchedRun:
    """Run ``cmd``; poll the high-water RSS of it and every descendant while it runs."""
    import subprocess
    import tempfile

    import psutil

    peaks: dict[int, int] = {}
    parent_cpu = 0.0
    busy_before, ours_before = _busy_cpu_s(), _children_cpu_s()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, text=True)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                pids = [proc.pid] + [c.pid for c in root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pids = []
            for pid in pids:
                peaks[pid] = max(peaks.get(pid, 0), peak_rss_bytes(pid))
            try:
                cpu = root.cpu_times()
                parent_cpu = cpu.user + cpu.system
            except psutil.NoSuchProcess:
                pass
            time.sleep(poll_s)
        seconds = time.perf_counter() - start
        others = (_busy_cpu_s() - busy_before) - (_children_cpu_s() - ours_before)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    children = [v for pid, v in peaks.items() if pid != proc.pid]
    return WatchedRun(
        returncode=proc.returncode,
        seconds=seconds,
        parent_peak_bytes=peaks.get(proc.pid, 0),
        child_peak_bytes=max(children, default=0),
        parent_cpu_s=parent_cpu,
        other_cores=max(0.0, others / seconds),
        stdout=stdout,
        stderr=stderr,
    )


def _busy_cpu_s() -> float:
    """CPU seconds all processes of the machine have run (user, nice, system, interrupts)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished (and reaped) descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_until_idle(max_wait_s: float, busy_cores: float = 0.2, sample_s: float = 3.0) -> float:
    """Wait until other processes use less than ``busy_cores`` cores (measured over
    ``sample_s``), at most ``max_wait_s``; return the last measured load in cores."""
    import psutil

    deadline = time.monotonic() + max_wait_s
    while True:
        load = psutil.cpu_percent(interval=sample_s) / 100 * (os.cpu_count() or 1)
        if load < busy_cores or time.monotonic() >= deadline:
            return load

"""What an apply or a compaction reports back, and where apply reports its progress. No internal imports:
apply, compact and history all import these, and none of them imports another for its report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Reporter(Protocol):
    """Where apply reports progress; the CLI draws it, tests may ignore it."""

    def phase(self, name: str, total: int) -> None: ...
    def advance(self, name: str, key: str, ok: bool) -> None: ...
    def done(self, name: str) -> None: ...


class SilentReporter:
    def phase(self, name: str, total: int) -> None: ...
    def advance(self, name: str, key: str, ok: bool) -> None: ...
    def done(self, name: str) -> None: ...


@dataclass
class ApplyReport:
    created_atlas: bool = False
    succeeded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    cells_deleted: int = 0
    verify_problems: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_worker: int = 0
    log_file: str | None = None
    swept: list[str] = field(default_factory=list)  # leftovers of killed runs removed before this run
    interrupted: int | None = None  # the signal that stopped the run early
    not_run: list[str] = field(default_factory=list)  # "<step> <key>" of steps an interrupt left undone

    @property
    def ok(self) -> bool:
        return not self.failed and not self.verify_problems


@dataclass(frozen=True)
class ArrayCompaction:
    name: str  # path inside the experiment, e.g. ms/RNA/X/raw
    fragments_before: int
    fragments_after: int
    purged: bool  # deleted cells were dropped


@dataclass
class CompactionReport:
    arrays: list[ArrayCompaction] = field(default_factory=list)
    seconds: float = 0.0
    finished_interrupted: bool = False  # a killed compaction's work was finished

    @property
    def fragments_before(self) -> int:
        return sum(a.fragments_before for a in self.arrays)

    @property
    def fragments_after(self) -> int:
        return sum(a.fragments_after for a in self.arrays)

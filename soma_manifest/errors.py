"""The one exception family of soma-manifest. No internal imports.

Every error names where the problem is (a file, and a line, row or sample when known)
and what to do about it, so that the CLI can print it as one line.
"""

from __future__ import annotations

from pathlib import Path


class SomaManifestError(Exception):
    """Base class: `where` locates the problem, `hint` says what to fix."""

    def __init__(self, message: str, *, where: str | Path | None = None, hint: str | None = None) -> None:
        self.message = message
        self.where = str(where) if where is not None else None
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text = f"{text} ({self.hint})"
        return text


class ManifestError(SomaManifestError):
    """The manifest is invalid. May carry several problems, each already located."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class SchemaError(SomaManifestError):
    """The atlas schema file is invalid, or a change to it cannot be applied."""


class SourceError(SomaManifestError):
    """Raw input (matrix, barcodes, features, metadata, h5ad, 10x h5) is unreadable or invalid."""


class StateError(SomaManifestError):
    """The state file is missing, corrupt, of another version, or of another atlas."""


class LockError(SomaManifestError):
    """Another apply holds the atlas lock."""


class PlanError(SomaManifestError):
    """A saved plan cannot be applied (stale, or of another manifest)."""


class AtlasError(SomaManifestError):
    """The atlas on disk does not match what the operation expects."""


class InitError(SomaManifestError):
    """`init` cannot write a manifest: a file exists already, or its input is unusable."""


class ExecutorError(SomaManifestError):
    """The executor cannot run steps (e.g. the Dask scheduler is unreachable)."""


class LeaseLost(SomaManifestError):
    """This apply no longer holds the atlas: a step stops before writing anything more."""
class StorageError(SomaManifestError):
    """A file or object of the tool's own (state, lock, h5ad, log, raw) cannot be read or written."""

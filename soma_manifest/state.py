"""The state file: what was done to the atlas, per sample, and from which fingerprints.

JSON with a format version, a lineage (ties the file to one atlas) and a serial (bumped on
every save). Saved atomically after every finished step; the previous version is kept as
`<state>.backup`. The file may be local or on S3 (storage: a whole-object PUT is atomic there).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from soma_manifest import storage
from soma_manifest.errors import StateError
from soma_manifest.storage import Location

FORMAT_VERSION = 1
IngestStatus = Literal["none", "allocated", "done"]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class FileStamp(_Model):
    path: str
    size: int
    mtime_ns: int
    etag: str = ""  # objects on S3


class SampleState(_Model):
    """One sample's ledger entry: what its h5ad holds, and separately what the atlas holds.

    Keeping the two apart is what makes resume safe: a sample re-converted by a run that then
    died still shows that the atlas holds the old version.
    """

    study: str
    sample: str
    format: str
    # the h5ad (convert step)
    raw_files: list[FileStamp] = Field(default_factory=list)
    raw_digest: str = ""
    meta_digest: str = ""
    conversion: str = ""  # schema conversion fingerprint the h5ad was made with
    h5ad: str | None = None
    converted: bool = False
    cells: int | None = None
    nnz: int | None = None
    converted_at: str | None = None
    # the atlas (ingest step)
    joinids: tuple[int, int] | None = None  # [start, stop) in obs, recorded before any write
    ingest: IngestStatus = "none"
    atlas_raw_digest: str = ""
    atlas_conversion: str = ""
    atlas_meta_digest: str = ""
    atlas_cells: int | None = None
    atlas_nnz: int | None = None
    ingested_at: str | None = None
    # the last failure, cleared by the next success
    failed_step: str | None = None
    error: str | None = None


class StudyCache(_Model):
    """Metadata digests per sample, valid while the metadata files' stats are unchanged."""

    stats: list[FileStamp]
    digests: dict[str, str]


class State(_Model):
    format_version: int = FORMAT_VERSION
    lineage: str = Field(default_factory=lambda: str(uuid.uuid4()))
    serial: int = 0
    atlas: str
    structure: str = ""  # schema structure fingerprint the atlas was created with
    # ... and that structure in words (AtlasSchema.structure_summary), to name what a schema change alters
    structure_summary: dict[str, list[str]] = Field(default_factory=dict)
    created_at: str = Field(default_factory=now)
    next_joinid: int = 0
    samples: dict[str, SampleState] = Field(default_factory=dict)
    orphans: list[tuple[int, int]] = Field(default_factory=list)  # joinid ranges to delete
    studies: dict[str, StudyCache] = Field(default_factory=dict)

    def allocate(self, n: int) -> tuple[int, int]:
        """A fresh joinid range; ranges are never reused, so a crash cannot mix two samples."""
        start = self.next_joinid
        self.next_joinid += n
        return (start, start + n)

    def known_ranges(self) -> list[tuple[int, int]]:
        """Every range the state accounts for: samples' (whatever their status) and orphans."""
        ranges = [s.joinids for s in self.samples.values() if s.joinids is not None]
        return sorted(ranges + list(self.orphans))


def backup_path(path: Location) -> Location:
    return path.with_name(path.name + ".backup")


def load_state(path: Location) -> State | None:
    """The state at `path`, None when there is none yet. Never repairs: refuses with a clear error."""
    path = Location(path)
    data = storage.read_bytes(path, missing_ok=True)
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    restore = f"the previous version is at {backup_path(path)}: inspect it and copy it over the state file"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateError(f"state file is corrupt or truncated (line {exc.lineno}: {exc.msg})", where=path,
                         hint=restore) from None
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise StateError("not a soma-manifest state file (no format_version)", where=path, hint=restore)
    version = raw["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StateError(f"state format version {version} is newer than this soma-manifest understands "
                         f"({FORMAT_VERSION})", where=path, hint="upgrade soma-manifest; the file was left as it is")
    try:
        return State.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(map(str, first["loc"]))
        raise StateError(f"state file is invalid at {loc}: {first['msg']}", where=path, hint=restore) from None


def save_state(state: State, path: Location) -> None:
    """Atomically replace the state file, keeping the previous one as a backup; bumps the serial."""
    state.serial += 1
    storage.write_atomic(Location(path), state.model_dump_json(indent=1).encode(), backup=backup_path(Location(path)))

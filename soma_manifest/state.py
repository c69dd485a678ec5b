"""The state file: what was done to the atlas, per sample, and from which fingerprints.

JSON with a format version, a lineage (ties the file to one atlas) and a serial (bumped on
every save). Saved atomically after every finished step; the previous version is kept as
`<state>.backup`. The file may be local or on S3 (storage: a whole-object PUT is atomic there).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from soma_manifest import storage
from soma_manifest.errors import StateError
from soma_manifest.storage import Location

# 2: release tags (`tags`). A version-1 tool would ignore them and compact tagged applies away, so it refuses
# version 2.
# 3: schema evolution in place (`conversions`, `layer_fills`, `dropped_layers`). A version-2 tool would refuse
# them as unknown fields ("invalid"); the bump makes it say "newer" instead. It would also not finish a layer fill.
# This tool reads versions 1 and 2 (_upgraded) and writes version 3.
FORMAT_VERSION = 3
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


class GeneMapping(_Model):
    """How a sample's features met the gene reference (genes.map_features), for plan -v, show and logs."""

    features: int  # gene-expression features of the sample
    by_id: int = 0  # matched a reference id (version suffix ignored)
    by_alias_id: int = 0
    by_symbol: int = 0
    by_alias_symbol: int = 0
    unmapped: int = 0  # matched nothing
    ambiguous: int = 0  # matched several reference genes by its best rule
    kept: int = 0  # unmapped or ambiguous, kept under their own id (unmapped: keep)
    dropped: int = 0  # unmapped or ambiguous, left out (unmapped: drop)
    summed: int = 0  # mapped onto a gene another feature of the sample also mapped onto
    genes: int = 0  # var rows the sample ends up with
    examples: list[str] = Field(default_factory=list)  # the first few unmapped/ambiguous features

    def text(self) -> str:
        """One line, e.g. "508 features -> 506 genes: mapped 10 by alias id, 492 by symbol; 1 dropped (e.g. X)"."""
        rules = ", ".join(f"{n} {label}" for n, label in (
            (self.by_id, "by id"), (self.by_alias_id, "by alias id"), (self.by_symbol, "by symbol"),
            (self.by_alias_symbol, "by alias symbol")) if n)
        rest = [f"{n} {label}" for n, label in ((self.summed, "summed into another feature's gene"),
                                                 (self.kept, "kept unmapped"), (self.dropped, "dropped")) if n]
        if self.ambiguous:
            rest.append(f"{self.ambiguous} of them ambiguous")
        examples = f" (e.g. {', '.join(self.examples)})" if self.examples and (self.kept or self.dropped) else ""
        return (f"{self.features} features -> {self.genes} genes: mapped {rules or 'none'}"
                + (f"; {'; '.join(rest)}{examples}" if rest else ""))


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
    gene_mapping: GeneMapping | None = None  # with a gene reference: how its features were mapped
    # the atlas (ingest step)
    joinids: tuple[int, int] | None = None  # [start, stop) in obs, recorded before any write
    ingest: IngestStatus = "none"
    atlas_raw_digest: str = ""
    atlas_conversion: str = ""
    atlas_meta_digest: str = ""
    atlas_cells: int | None = None
    atlas_nnz: int | None = None
    ingested_at: str | None = None
    # An obs rewrite of its range was submitted and its outcome not recorded: the atlas' obs rows may hold what
    # that step wrote (a step that passed its lease check may still write after a takeover), so the next apply
    # rewrites them with a later timestamp whatever the digests say. Saved before the step starts.
    obs_pending: bool = False
    # its row of the samples table and the feature presence matrix; fresh with every joinid range
    sample_joinid: int | None = None
    # the last failure, cleared by the next success
    failed_step: str | None = None
    error: str | None = None

    # The ledger's transitions: apply changes an entry only through these.

    @property
    def holds_range(self) -> bool:
        """Whether the atlas may hold cells of this sample in its joinid range (ingested, or an ingest began)."""
        return self.joinids is not None and self.ingest != "none"

    def mark_converted(self, *, raw_files: Sequence[FileStamp], raw_digest: str, meta_digest: str,
                       conversion: str, h5ad: str, cells: int, nnz: int, gene_mapping: GeneMapping | None,
                       metadata_only: bool) -> None:
        """Its h5ad now holds this version; what the atlas holds is unchanged."""
        self.raw_files = list(raw_files)
        self.raw_digest, self.meta_digest, self.conversion = raw_digest, meta_digest, conversion
        self.h5ad, self.converted, self.converted_at = h5ad, True, now()
        self.cells, self.nnz = cells, nnz
        if not metadata_only:  # a metadata update keeps the h5ad's genes
            self.gene_mapping = gene_mapping

    def mark_allocated(self, joinids: tuple[int, int]) -> None:
        """A fresh joinid range, recorded (and saved) before anything is written into it."""
        self.joinids, self.ingest = joinids, "allocated"

    def mark_ingested(self) -> None:
        """The atlas now holds its h5ad's version, in its joinid range."""
        self.ingest, self.ingested_at = "done", now()
        self.atlas_raw_digest, self.atlas_conversion = self.raw_digest, self.conversion
        self.atlas_cells, self.atlas_nnz = self.cells, self.nnz
        self.mark_metadata_written()

    def mark_obs_write_started(self) -> None:
        """An obs rewrite of its range is about to be submitted (recorded, and saved, before it can write)."""
        self.obs_pending = True

    def mark_metadata_written(self) -> None:
        """The atlas' obs rows of the sample now hold its h5ad's metadata. Its X already held the h5ad's counts
        (an obs update is planned only then), so the atlas now holds the h5ad's conversion too."""
        self.atlas_meta_digest = self.meta_digest
        self.atlas_conversion = self.conversion
        self.obs_pending = False
        self.failed_step = self.error = None

    def mark_restamped(self, conversion: str) -> None:
        """A schema change that alters neither its counts nor its obs rows (a layer or var column added or
        dropped) was made in place: the atlas, and its h5ad if it held the same, now count as of `conversion`."""
        if self.conversion == self.atlas_conversion:
            self.conversion = conversion
        self.atlas_conversion = conversion

    def mark_failed(self, step: str, error: str) -> None:
        self.failed_step, self.error = step, error


class ConversionParts(_Model):
    """What a conversion fingerprint is made of (AtlasSchema.matrix, obs_fingerprints, ...): whether a sample
    converted with one holds the counts of another, so that a schema change can be made in place."""

    matrix: str
    obs: dict[str, str]
    var: dict[str, str]
    layers: dict[str, str]


class LayerFill(_Model):
    """An X layer added to an existing atlas, computed from the counts sample by sample (schema evolution).
    Recorded, and saved, before the layer is created: the next apply fills what this one did not. A fill is
    idempotent (the same values from the same counts), so one a dead apply had begun is simply written again,
    later; one of a sample replaced meanwhile is not needed (its new range was ingested with every layer)."""

    todo: dict[str, int] = Field(default_factory=dict)  # sample key -> the obs joinid its range started at


class StudyCache(_Model):
    """Metadata digests per sample, valid while the metadata files' stats are unchanged."""

    stats: list[FileStamp]
    digests: dict[str, str]


class HistoryEntry(_Model):
    """One apply that changed the atlas, and the TileDB timestamp to read the atlas as it left it."""

    serial: int  # the state's serial once this entry was saved
    started_at: str
    finished_at: str
    timestamp_ms: int  # after the apply's last write: opening the atlas at it shows the apply's result
    changes: dict[str, list[str]] = Field(default_factory=dict)  # plan kind -> sample keys that succeeded
    cells_added: int = 0
    cells_deleted: int = 0
    cells_total: int = 0
    manifest_digest: str = ""
    tool_version: str = ""
    schema_conversion: str = ""  # the schema's conversion fingerprint the apply ran with ("" before it was recorded)
    verified: bool | None = None  # the apply's own check of the ranges it wrote passed (None: not recorded)


class CompactionState(_Model):
    pending: bool = False  # a compaction started and has not finished: the next apply or compact finishes it
    # Deleted cells were purged up to this timestamp: the atlas can no longer be read as it was before it.
    purged_until_ms: int | None = None
    last_at: str | None = None


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
    next_sample_joinid: int = 0
    orphan_samples: list[int] = Field(default_factory=list)  # sample joinids whose rows are to delete
    studies: dict[str, StudyCache] = Field(default_factory=dict)
    history: list[HistoryEntry] = Field(default_factory=list)  # states written before history load with none
    compaction: CompactionState = Field(default_factory=CompactionState)
    tags: dict[str, int] = Field(default_factory=dict)  # release tag -> history serial; kept readable (tags.py)
    # Schema evolution: the parts of each conversion fingerprint an apply ran with (plan's in-place test), and
    # the layers added in place whose samples are not all computed yet. `structure` changes once none is left.
    conversions: dict[str, ConversionParts] = Field(default_factory=dict)
    layer_fills: dict[str, LayerFill] = Field(default_factory=dict)
    # Layers dropped in place: their arrays stay (reads at earlier serials), so their names are not reused.
    dropped_layers: list[str] = Field(default_factory=list)

    def allocate(self, n: int) -> tuple[int, int]:
        """A fresh joinid range; ranges are never reused, so a crash cannot mix two samples."""
        start = self.next_joinid
        self.next_joinid += n
        return (start, start + n)

    def allocate_to(self, entry: SampleState) -> None:
        """Give the sample a fresh joinid range and sample joinid; what the atlas held of it is queued for deletion."""
        if entry.holds_range:
            self.orphans.append(entry.joinids)
        self.allocate_sample(entry)
        entry.mark_allocated(self.allocate(entry.cells or 0))

    def remove_sample(self, key: str) -> SampleState:
        """Take the sample out of the ledger; what the atlas holds of it is queued for deletion."""
        entry = self.samples.pop(key)
        self.retire_sample(entry)
        if entry.holds_range:
            self.orphans.append(entry.joinids)
        return entry

    def allocate_sample(self, entry: SampleState) -> None:
        """Give the sample a fresh sample joinid (never reused); its previous one is queued for deletion."""
        self.retire_sample(entry)
        entry.sample_joinid = self.next_sample_joinid
        self.next_sample_joinid += 1

    def retire_sample(self, entry: SampleState) -> None:
        """Queue the sample's rows of the samples table and presence matrix for deletion."""
        if entry.sample_joinid is not None:
            self.orphan_samples.append(entry.sample_joinid)
            entry.sample_joinid = None

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
        return State.model_validate(_upgraded(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(map(str, first["loc"]))
        raise StateError(f"state file is invalid at {loc}: {first['msg']}", where=path, hint=restore) from None


def _upgraded(raw: dict) -> dict:
    """A state of an earlier format version as a document of this one (written as this one on the next save).

    1 -> 2 added `tags`, 2 -> 3 the schema-evolution fields: each is absent from the older file and means what its
    default says (no tags; no conversion parts recorded, no layer fill running, no layer dropped). Only the
    version moves: an atlas of a version-2 state gets its first schema change as replaces (no parts recorded)."""
    if raw["format_version"] < FORMAT_VERSION:
        raw = {**raw, "format_version": FORMAT_VERSION}
    return raw


def save_state(state: State, path: Location) -> None:
    """Atomically replace the state file, keeping the previous one as a backup; bumps the serial."""
    state.serial += 1
    state.format_version = FORMAT_VERSION
    storage.write_atomic(Location(path), state.model_dump_json(indent=1).encode(), backup=backup_path(Location(path)))

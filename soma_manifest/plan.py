"""The plan: what apply will do to each sample, and why. Pure data; no tiledbsoma here.

`observe` looks at raw storage (read-only); `make_plan` is a pure function of the manifest,
the schema, those observations and the state. `plan` renders the Plan that `apply` executes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from soma_manifest import storage
from soma_manifest.errors import SomaManifestError
from soma_manifest.evolution import SchemaChange, in_place, schema_changes
from soma_manifest.manifest import LoadedManifest
from soma_manifest.schema import AtlasSchema
from soma_manifest.sources import (
    FORMAT_DIRS,
    SampleSource,
    content_digest,
    discover,
    metadata_digests,
    metadata_stats,
    sample_files,
    stat_files,
)
from soma_manifest.state import ConversionParts, FileStamp, State, StudyCache
from soma_manifest.storage import Location

# 2: `schema_changes` (schema evolution in place). A plan of version 1 is refused (planfile.py): make it again.
PLAN_FORMAT_VERSION = 2
Kind = Literal["add", "replace", "update", "ingest", "resume", "retry", "remove", "cleanup", "invalid"]
#: Display order of kinds and their symbols (Terraform-like).
KINDS: dict[str, str] = {
    "add": "+", "replace": "-/+", "update": "~", "ingest": ">", "resume": ">", "retry": "!",
    "remove": "-", "cleanup": "-", "invalid": "x",
}


class _Frozen(BaseModel):
    # A plan document always carries every field, so its JSON Schema marks them all required.
    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_serialization_defaults_required=True)


class Action(_Frozen):
    """One sample's change. `steps` is what apply runs, in order."""

    key: str
    kind: Kind
    reason: str
    steps: tuple[str, ...]
    study: str | None = None
    sample: str | None = None
    format: str | None = None
    path: str | None = None
    cells: int | None = None  # known for samples already converted or in the atlas
    nnz: int | None = None
    delete_range: tuple[int, int] | None = None  # cells removed before anything is written
    raw_digest: str | None = None
    meta_digest: str | None = None
    raw_files: tuple[FileStamp, ...] = ()

    @property
    def converts(self) -> bool:
        return "convert" in self.steps or "convert_metadata" in self.steps

    @property
    def ingests(self) -> bool:
        return "ingest" in self.steps

    @property
    def runs_on_workers(self) -> bool:
        """Has a step that runs on a worker (convert, ingest, obs update)."""
        return self.converts or self.ingests or "write_obs" in self.steps

    @property
    def raw_bytes(self) -> int:
        """The size of the sample's raw files, as planned."""
        return sum(f.size for f in self.raw_files)

    @property
    def deletes_cells(self) -> bool:
        """Cells leave the atlas for good (not replaced by a new version)."""
        return self.kind == "remove" and bool(self.cells)

    def comparable(self) -> dict:
        """The change and its content fingerprints; not the raw path, file stats or the reason worded from them."""
        return self.model_dump(exclude={"path", "raw_files", "reason"})


class Summary(_Frozen):
    samples: int
    unchanged: int
    actions: dict[str, int]
    steps: int
    cells_added_known: int
    cells_deleted: int
    failed_expected: int


class Plan(_Frozen):
    """Everything apply needs to check that what it runs is what was reviewed."""

    format_version: int = PLAN_FORMAT_VERSION
    kind: Literal["soma-manifest-plan"] = "soma-manifest-plan"
    created_at: str
    manifest: str
    manifest_digest: str
    schema_path: str
    schema_structure: str
    schema_conversion: str
    atlas: str
    state: str
    lineage: str | None
    serial: int | None
    create_atlas: bool
    schema_changes: tuple[SchemaChange, ...] = ()
    actions: tuple[Action, ...]
    unchanged: tuple[str, ...]
    summary: Summary

    @property
    def has_changes(self) -> bool:
        return self.create_atlas or bool(self.actions) or bool(self.schema_changes)

    @property
    def deletions(self) -> list[Action]:
        """The actions whose cells leave the atlas for good: apply refuses them without allow_delete."""
        return [a for a in self.actions if a.deletes_cells]

    @property
    def worker_actions(self) -> list[Action]:
        """The samples with a step that runs on a worker (convert, ingest, obs update)."""
        return [a for a in self.actions if a.runs_on_workers]

    @property
    def worker_sizes(self) -> list[int]:
        """The raw bytes of each sample with a step on a worker, and a 0 for each sample a layer added in place
        is computed for (a worker step too): what sizes the worker pool."""
        fills = sum(c.samples or 0 for c in self.schema_changes if c.what == "layer" and c.kind == "add")
        return [a.raw_bytes for a in self.worker_actions] + [0] * fills

    def to_json(self) -> str:
        """The plan document of `plan --json` and `plan --out` (format: docs/gitops.md, schemas/plan.schema.json)."""
        return self.model_dump_json(indent=1)

    def comparable(self) -> dict:
        """The parts that must match between a saved plan and the one computed at apply time.

        Left out: where the checkout is (manifest and schema paths), so a plan made in one checkout
        applies in another; contents are bound by the manifest digest and the schema fingerprints.
        """
        data = self.model_dump(exclude={"created_at", "summary", "manifest", "schema_path", "actions"})
        return {**data, "actions": [a.comparable() for a in self.actions]}


@dataclass(frozen=True)
class Observed:
    """What raw storage holds for one selected sample right now."""

    source: SampleSource
    files: tuple[FileStamp, ...] = ()
    raw_digest: str = ""
    meta_digest: str = ""
    h5ad_present: bool = False
    error: str | None = None


@dataclass(frozen=True)
class Observations:
    samples: dict[str, Observed]
    study_caches: dict[str, StudyCache]
    gone: dict[str, str] = field(default_factory=dict)  # samples in the state, not selected: why


def observe(manifest: LoadedManifest, state: State | None) -> Observations:
    """Discover the selected samples and fingerprint them, reusing the state's digests when stats match.

    On S3, each study's raw prefix and the h5ad prefix are listed once (size, ETag, last-modified per object).
    """
    with storage.snapshot():
        storage.prefetch(manifest.h5ad)
        return _observe(manifest, state)


def _observe(manifest: LoadedManifest, state: State | None) -> Observations:
    sources = discover(manifest)
    previous = state.samples if state else {}
    by_study: dict[str, list[SampleSource]] = {}
    for src in sources:
        by_study.setdefault(src.study, []).append(src)
    caches = {study: _study_cache(manifest, study, [s.sample for s in srcs], state)
              for study, srcs in by_study.items()}
    observed = _observe_samples(manifest, sources, caches, previous)
    gone = {key: _why_gone(manifest, prev) for key, prev in previous.items() if key not in observed}
    return Observations(observed, caches, gone)


def _why_gone(manifest: LoadedManifest, prev) -> str:
    """Why a sample of the state is no longer selected: the reviewer of a deletion needs to know."""
    if prev.study not in {s.name for s in manifest.studies}:
        return f"study {prev.study} is no longer in the manifest"
    subdir, suffix = FORMAT_DIRS.get(prev.format, ("", ""))
    path = manifest.raw / prev.study / subdir / f"{prev.sample}{suffix}"
    if not storage.exists(path):
        return f"its raw data is gone ({path} not found)"
    return "no longer selected by the manifest (samples/exclude)"


def _study_cache(manifest: LoadedManifest, study: str, samples: list[str], state: State | None) -> StudyCache:
    stats = [_stamp(s) for s in metadata_stats(manifest.raw, study)]
    cached = state.studies.get(study) if state else None
    if cached is not None and cached.stats == stats and all(s in cached.digests for s in samples):
        return StudyCache(stats=stats, digests={s: cached.digests[s] for s in samples})
    return StudyCache(stats=stats, digests=metadata_digests(manifest.raw, study, samples))


def _stamp(stat) -> FileStamp:
    # model_construct: these come straight from os.stat, and validating 30,000 of them costs a plan 0.4 s.
    return FileStamp.model_construct(path=stat.path, size=stat.size, mtime_ns=stat.mtime_ns, etag=stat.etag)


def _observe_samples(manifest: LoadedManifest, sources: list[SampleSource], caches: dict[str, StudyCache],
                     previous: dict) -> dict[str, Observed]:
    """Stat every sample; the content digests that unchanged stats cannot reuse are computed afterwards,
    on threads when there is much to read (_content_digests)."""
    observed: dict[str, Observed] = {}
    to_hash: dict[str, list[Location]] = {}
    for src in sources:
        meta, prev = caches[src.study].digests[src.sample], previous.get(src.key)
        try:
            paths = sample_files(src)
            stamps = tuple(_stamp(s) for s in stat_files(paths, manifest.raw))
        except SomaManifestError as exc:
            observed[src.key] = Observed(src, meta_digest=meta, error=exc.render())
            continue
        reused = prev is not None and tuple(prev.raw_files) == stamps and prev.raw_digest
        h5ad_present = bool(prev and prev.h5ad and storage.exists(Location(prev.h5ad)))
        observed[src.key] = Observed(src, stamps, prev.raw_digest if reused else "", meta, h5ad_present)
        if not reused:
            to_hash[src.key] = paths
    size = sum(stamp.size for key in to_hash for stamp in observed[key].files)
    for key, digest in zip(to_hash, _content_digests(list(to_hash.values()), manifest.raw, size)):
        seen = observed[key]
        observed[key] = (replace(seen, raw_digest=digest) if isinstance(digest, str)
                         else Observed(seen.source, meta_digest=seen.meta_digest, error=digest.render()))
    return observed


#: Threads that digest raw files, used when there are more than _DIGEST_THREADED_BYTES to read or the files
#: are on S3: blake2b and file reads release the GIL, and S3 reads wait on the network. A plan of the full bench
#: preset (16 new samples, 560 MB) took 0.71-0.88 s with the digests in one thread, 0.46-0.49 s on 2 cores.
_DIGEST_THREADS = 8
_DIGEST_THREADED_BYTES = 64 << 20


def _content_digests(samples: list[list[Location]], root: Location, size: int) -> list[str | SomaManifestError]:
    """Each sample's content digest, or the error that names its unreadable file."""
    def digest(paths: list[Location]) -> str | SomaManifestError:
        try:
            return content_digest(paths, root)
        except SomaManifestError as exc:
            return exc

    if len(samples) < 2 or (size < _DIGEST_THREADED_BYTES and not storage.store_for(root).networked):
        return [digest(paths) for paths in samples]
    with ThreadPoolExecutor(min(_DIGEST_THREADS, len(samples)), thread_name_prefix="digest") as pool:
        return list(pool.map(digest, samples))


def atlas_present(uri: Location) -> bool:
    """Whether a complete atlas exists at `uri`, without importing the storage engine: a TileDB group
    with its metadata, which atlas creation writes last (see atlas.create_atlas)."""
    group = storage.exists(uri / "__tiledb_group.tdb") or storage.is_dir(uri / "__group")
    return group and storage.is_dir(uri / "__meta")


def make_plan(manifest: LoadedManifest, schema: AtlasSchema, observations: Observations,
              state: State | None, atlas_present: bool) -> Plan:
    """Pure: diff the desired samples against the state, and the schema's structure against the atlas'."""
    changes = schema_changes(schema, state, manifest.schema_path)
    samples = state.samples if state else {}
    parts = state.conversions if state else {}
    actions: list[Action] = []
    unchanged: list[str] = []
    for key, obs in observations.samples.items():
        prev = samples.get(key)
        action = _sample_action(obs, prev, schema, parts.get(prev.atlas_conversion) if prev else None)
        if action is None:
            unchanged.append(key)
        else:
            actions.append(action)
    for key, prev in samples.items():
        if key not in observations.samples:
            actions.append(_removal(key, prev, observations.gone.get(key, "no longer selected by the manifest")))
    for start, stop in (state.orphans if state else []):
        actions.append(Action(key=f"(orphans)/{start}-{stop}", kind="cleanup", steps=("delete",),
                              reason="cells left by an interrupted replace or removal",
                              cells=stop - start, delete_range=(start, stop)))
    actions.sort(key=lambda a: a.key)
    return Plan(
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        manifest=str(manifest.path),
        manifest_digest=manifest.digest,
        schema_path=str(manifest.schema_path),
        schema_structure=schema.structure,
        schema_conversion=schema.conversion,
        atlas=str(manifest.atlas_uri),
        state=str(manifest.state_path),
        lineage=state.lineage if state else None,
        serial=state.serial if state else None,
        create_atlas=not atlas_present,
        schema_changes=changes,
        actions=tuple(actions),
        unchanged=tuple(sorted(unchanged)),
        summary=_summarize(actions, len(observations.samples), len(unchanged)),
    )


def _sample_action(obs: Observed, prev, schema: AtlasSchema, parts: ConversionParts | None) -> Action | None:
    src = obs.source
    base = dict(key=src.key, study=src.study, sample=src.sample, format=src.format, path=str(src.path),
                raw_digest=obs.raw_digest, meta_digest=obs.meta_digest, raw_files=obs.files)
    if obs.error:
        return Action(kind="invalid", reason=obs.error, steps=(), **base)
    if prev is None:
        return Action(kind="add", reason="new sample", steps=("convert", "ingest"), **base)
    h5ad_current = (prev.converted and obs.h5ad_present and prev.raw_digest == obs.raw_digest
                    and prev.conversion == schema.conversion and prev.meta_digest == obs.meta_digest)
    in_atlas = prev.joinids if prev.ingest != "none" else None
    steps = (() if h5ad_current else ("convert",)) + ("ingest",)
    known = dict(cells=prev.cells, nnz=prev.nnz) if h5ad_current else {}
    if prev.failed_step:
        return Action(kind="retry", reason=f"failed last run ({prev.failed_step}): {prev.error}", steps=steps,
                      delete_range=in_atlas, **known, **base)
    if prev.ingest == "allocated":
        return Action(kind="resume", reason="interrupted during ingest", steps=steps, delete_range=in_atlas,
                      **known, **base)
    if prev.ingest == "none":
        reason = "converted but not ingested" if h5ad_current else "not converted yet (interrupted or h5ad missing)"
        return Action(kind="ingest", reason=reason, steps=steps, **known, **base)
    if (prev.atlas_raw_digest == obs.raw_digest and prev.atlas_conversion != schema.conversion
            and in_place(parts, schema)):
        return _in_place_update(obs, prev, schema, parts, base)
    if prev.atlas_raw_digest != obs.raw_digest or prev.atlas_conversion != schema.conversion:
        why = (_changed_files(prev.raw_files, obs.files) if prev.atlas_raw_digest != obs.raw_digest
               else "schema conversion changed")
        return Action(kind="replace", reason=why, steps=steps, delete_range=in_atlas, **known, **base)
    if prev.atlas_meta_digest != obs.meta_digest or prev.obs_pending:
        # Re-joining metadata onto the existing h5ad skips parsing the raw matrix; h5ad inputs carry
        # their own annotations, so those re-convert. Only onto an h5ad of the raw data and conversion
        # the atlas holds: a run that died after re-converting a change since reverted left another one.
        cheap = (obs.h5ad_present and prev.converted and src.format != "h5ad"
                 and prev.raw_digest == obs.raw_digest and prev.conversion == schema.conversion)
        if prev.atlas_meta_digest != obs.meta_digest:
            reason, convert = "cell or sample metadata changed", ("convert_metadata" if cheap else "convert",)
        else:  # what the atlas should hold is unchanged; an h5ad of it needs no convert
            reason, convert = "interrupted during an obs update: its obs rows are written again", \
                () if h5ad_current else ("convert_metadata" if cheap else "convert",)
        return Action(kind="update", reason=reason, steps=(*convert, "write_obs"),
                      cells=prev.atlas_cells, nnz=prev.atlas_nnz, **base)
    if (prev.raw_digest, prev.conversion, prev.meta_digest) != (obs.raw_digest, schema.conversion, obs.meta_digest):
        # The atlas is current but the h5ad is not: a run died after re-converting a change that was then
        # reverted. Re-convert, so that the h5ad (which verify --deep compares with) matches again.
        return Action(kind="update", reason="its h5ad is of another version (left by an interrupted run)",
                      steps=("convert", "write_obs"), cells=prev.atlas_cells, nnz=prev.atlas_nnz, **base)
    return None


def _in_place_update(obs: Observed, prev, schema: AtlasSchema, parts: ConversionParts, base: dict
                     ) -> Action | None:
    """The schema changed, not the sample's counts: its obs rows are rewritten if a column was added or redefined
    (or its metadata changed meanwhile); a change of layers or var columns, or obs columns dropped, is made by
    apply for the whole atlas (None: no action of its own)."""
    redefined = [n for n, d in schema.obs_fingerprints.items() if parts.obs.get(n) != d]
    if not redefined and prev.atlas_meta_digest == obs.meta_digest and not prev.obs_pending:
        return None
    # Obs rows are re-joined onto the h5ad the atlas holds when its computed (QC) columns stand; else the raw
    # data is read again for them. Either way X is not written.
    computed_stand = all(parts.obs.get(c.name) == schema.obs_fingerprints[c.name]
                         for c in schema.obs if c.source == "computed")
    cheap = (computed_stand and obs.h5ad_present and prev.converted
             and obs.source.format != "h5ad" and prev.raw_digest == obs.raw_digest
             and prev.conversion == prev.atlas_conversion)
    why = (f"obs column{'s' if len(redefined) > 1 else ''} {', '.join(redefined)} added or redefined"
           if redefined else "cell or sample metadata changed")
    return Action(kind="update", reason=f"{why} (X unchanged: obs rows rewritten in place)",
                  steps=("convert_metadata" if cheap else "convert", "write_obs"),
                  cells=prev.atlas_cells, nnz=prev.atlas_nnz, **base)


def _changed_files(before: list[FileStamp], after: tuple[FileStamp, ...]) -> str:
    old = {f.path: f for f in before}
    new = {f.path: f for f in after}
    names = sorted(p for p in old.keys() | new.keys() if old.get(p) != new.get(p))
    shown = ", ".join(Path(p).name for p in names[:3]) or "content"
    return f"raw data changed: {shown}"


def _removal(key: str, prev, why: str) -> Action:
    in_atlas = prev.joinids if prev.ingest != "none" else None
    return Action(key=key, kind="remove", reason=why, steps=("delete",) if in_atlas else ("forget",),
                  study=prev.study, sample=prev.sample, format=prev.format, delete_range=in_atlas,
                  cells=prev.atlas_cells if in_atlas else 0, nnz=prev.atlas_nnz if in_atlas else 0)


def _summarize(actions: list[Action], samples: int, unchanged: int) -> Summary:
    counts: dict[str, int] = {}
    for a in actions:
        counts[a.kind] = counts.get(a.kind, 0) + 1
    return Summary(
        samples=samples,
        unchanged=unchanged,
        actions={k: counts[k] for k in KINDS if k in counts},
        steps=sum(len(a.steps) for a in actions),
        cells_added_known=sum(a.cells or 0 for a in actions if a.ingests),
        cells_deleted=sum(a.cells or 0 for a in actions if a.kind in ("remove", "cleanup")),
        failed_expected=counts.get("invalid", 0),
    )

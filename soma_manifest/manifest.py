"""The manifest: the user's desired state of one atlas. The only parser of manifest files."""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator,
                      model_validator)

from soma_manifest import storage
from soma_manifest.errors import ManifestError, SomaManifestError
from soma_manifest.storage import Location, StoreSettings
from soma_manifest.yamlio import LocatedYaml, load_yaml, pydantic_problems

Format = Literal["mtx", "h5ad", "10x_h5"]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AtlasSpec(_Frozen):
    name: str = Field(pattern=_NAME, description="Atlas name; the experiment lives at <storage>/<name>.")
    storage: str = Field(description="Folder holding the atlas (relative to the manifest file).")


class StorageSpec(_Frozen):
    raw: str = Field(description="Raw data root: <raw>/<study>/<format>/<sample>... (a local path or s3:// URI).")
    h5ad: str = Field(description="Where converted, standardized h5ad files are written (local path or s3:// URI).")
    logs: str = Field(description="Where a log file per apply run is written (local path or s3:// URI).")
    state: str | None = Field(default=None, description="State file; default <atlas.storage>/<atlas.name>.state.json.")


class ExecutorSpec(_Frozen):
    kind: Literal["loky", "dask"] = Field(
        default="loky", description="loky: worker processes on this machine. dask: a dask.distributed cluster.")
    address: str | None = Field(
        default=None, pattern=r"^(tcp|tls|ucx|ws|wss)://\S+$",
        description="Scheduler of an existing Dask cluster, e.g. tcp://10.0.0.5:8786; omitted: a local cluster "
                    "of `processes` workers.")

    @model_validator(mode="after")
    def _address_needs_dask(self) -> "ExecutorSpec":
        if self.address is not None and self.kind != "dask":
            raise ValueError("address is only for kind: dask (set kind: dask, or remove address)")
        return self
class ObjectStoreSpec(_Frozen):
    """Settings for s3:// paths. Credentials never go here: they come from the AWS environment chain."""

    endpoint_url: str | None = Field(
        default=None, pattern=r"^https?://[^/@\s]+/?$",
        description="S3-compatible endpoint (MinIO, Ceph, ...), e.g. http://127.0.0.1:9000; "
                    "default: AWS, or the AWS_ENDPOINT_URL environment variable.")
    region: str | None = Field(default=None, pattern=r"^[a-z0-9-]+$", description="Region, e.g. us-east-1.")

    def settings(self) -> StoreSettings:
        return StoreSettings(self.endpoint_url.rstrip("/") if self.endpoint_url else None, self.region)


class StudySpec(_Frozen):
    name: str = Field(pattern=_NAME, description="Study folder name under storage.raw.")
    format: Format = Field(default="mtx", description="mtx (Cell Ranger folders), h5ad, or 10x_h5.")
    samples: list[str] | None = Field(
        default=None, min_length=1, description="Samples to include (glob patterns allowed); default all."
    )
    exclude: list[str] = Field(default_factory=list, description="Samples to leave out (glob patterns allowed).")
    organism: str | None = Field(
        default=None, pattern=r"^[a-z]+_[a-z]+$",
        description="This study's organism when it differs from the schema's (a deliberate cross-species atlas).",
    )


#: Fragments in one array above which apply compacts the atlas at its end (see bench/compaction.py).
DEFAULT_AFTER_FRAGMENTS = 64


class KeepHistory(_Frozen):
    """Which applies stay readable (`show --serial N`) through compactions: the union of both limits."""

    applies: PositiveInt | None = Field(default=10, description="Keep the last N applies readable.")
    days: PositiveFloat | None = Field(default=None, description="Keep the applies of the last N days readable.")


class CompactionSpec(_Frozen):
    after_fragments: Literal[False] | PositiveInt = Field(
        default=DEFAULT_AFTER_FRAGMENTS,
        description="apply compacts the atlas when an array has more fragments than this; false: never.")
    keep_history: KeepHistory = Field(default_factory=KeepHistory,
                                      description="Which applies compaction keeps readable.")

    @field_validator("after_fragments", mode="before")
    @classmethod
    def _not_true(cls, value: object) -> object:
        if value is True:
            raise ValueError("give a number of fragments, or false to turn automatic compaction off")
        return value


class Manifest(_Frozen):
    """soma-manifest manifest, format version 1. Relative paths resolve against the manifest's folder."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, title="soma-manifest manifest")

    version: Literal[1] = Field(description="Manifest format version.")
    atlas: AtlasSpec
    schema_: str = Field(alias="schema", description="Atlas schema file (see schemas/default.yaml): a local path or "
                                                     "an s3:// URI; the files it names resolve against its folder.")
    storage: StorageSpec
    object_store: ObjectStoreSpec | None = Field(default=None, description="Settings used for s3:// paths.")
    processes: PositiveInt | None = Field(default=None, description="Default worker count for apply.")
    compaction: CompactionSpec = Field(default_factory=CompactionSpec,
                                       description="Consolidating the atlas' fragments, and the history kept readable.")
    executor: ExecutorSpec = Field(default=ExecutorSpec(), description="Where apply runs its steps.")
    studies: list[StudySpec] = Field(min_length=1)

    @field_validator("studies")
    @classmethod
    def _unique_studies(cls, studies: list[StudySpec]) -> list[StudySpec]:
        names = [s.name for s in studies]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"study listed twice: {', '.join(dupes)} (list each study once)")
        return studies


class LoadedManifest(BaseModel):
    """A validated manifest with every path resolved, plus where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    spec: Manifest
    digest: str
    # Locations: local paths or s3:// URIs, path-like (`/`, `.name`, `.parent`, `str()`); I/O goes through storage.
    atlas_uri: Location
    schema_path: Location
    raw: Location
    h5ad: Location
    logs: Location
    state_path: Location
    # dotted location ("studies.1.samples.0") -> line in the manifest file, for located errors
    lines: dict[str, int]

    @property
    def studies(self) -> list[StudySpec]:
        return self.spec.studies

    @property
    def name(self) -> str:
        return self.spec.atlas.name

    @property
    def store(self) -> StoreSettings:
        """The object-store settings (no credentials), for workers that must reach the same store."""
        return self.spec.object_store.settings() if self.spec.object_store else StoreSettings()

    def locate(self, loc: tuple[str | int, ...]) -> str:
        """`file:line` of a manifest location (the nearest enclosing one that has a line)."""
        for n in range(len(loc), 0, -1):
            line = self.lines.get(".".join(map(str, loc[:n])))
            if line is not None:
                return f"{self.path}:{line}"
        return str(self.path)

    @contextmanager
    def referenced(self, key: str) -> Iterator[None]:
        """Errors about the file this manifest names at `key` also name that line (`atlas.yaml:4: schema: ...`)."""
        try:
            yield
        except ManifestError as exc:
            raise ManifestError([f"{self.locate((key,))}: {key}: {p}" for p in exc.problems]) from None
        except SomaManifestError as exc:
            raise ManifestError([f"{self.locate((key,))}: {key}: {exc.render()}"]) from None


def load_manifest(path: str | os.PathLike[str]) -> LoadedManifest:
    """Parse and validate a manifest; all problems are reported at once, each with its line.

    Its object_store settings become this process' settings for s3:// paths (storage.configure).
    """
    # Path() makes "s3://b/k" a local "s3:/b/k" (the command line's arguments are Paths already)
    if os.fspath(path).startswith("s3:/"):
        uri = "s3://" + os.fspath(path)[4:].lstrip("/")
        raise ManifestError([f"{uri}: a manifest is read from a local file (a checkout); only saved plans "
                             "(`plan --out`) and the paths inside a manifest may be s3:// URIs"])
    path = Path(path)
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise ManifestError([f"{path}:1: a manifest is a YAML mapping with version, atlas, schema, storage and studies"])
    secrets = _secret_keys(doc, doc.data, ())
    if secrets:
        raise ManifestError(secrets)
    try:
        spec = Manifest.model_validate(doc.data)
    except ValidationError as exc:
        raise ManifestError(pydantic_problems(doc, exc.errors())) from None
    base = str(path.resolve().parent)
    atlas_root = storage.resolve(spec.atlas.storage, base)
    state = (storage.resolve(spec.storage.state, base) if spec.storage.state
             else atlas_root / f"{spec.atlas.name}.state.json")
    loaded = LoadedManifest(
        path=path.resolve(),
        spec=spec,
        digest=hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest(),
        atlas_uri=atlas_root / spec.atlas.name,
        schema_path=storage.resolve(spec.schema_, base),
        raw=storage.resolve(spec.storage.raw, base),
        h5ad=storage.resolve(spec.storage.h5ad, base),
        logs=storage.resolve(spec.storage.logs, base),
        state_path=state,
        lines={**_study_lines(doc, spec), "schema": doc.line_of(("schema",))},
    )
    storage.configure(loaded.store)
    return loaded


#: Key names that hold credentials. Credentials come only from the environment (AWS chain).
_SECRET = re.compile(r"secret|passw|token|credential|access_?key|session|private_?key|api_?key", re.IGNORECASE)


def _secret_keys(doc: LocatedYaml, node: Any, loc: tuple[str | int, ...]) -> list[str]:
    """Every key that looks like a credential, located; the values are never repeated."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if _SECRET.search(str(key)):
                found.append(doc.problem((*loc, key), "looks like a credential: credentials never go in a manifest "
                                                      "(remove it; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                                                      "AWS_PROFILE in the environment)"))
            else:
                found.extend(_secret_keys(doc, value, (*loc, key)))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found.extend(_secret_keys(doc, item, (*loc, i)))
    return found


def _study_lines(doc: LocatedYaml, spec: Manifest) -> dict[str, int]:
    lines = {}
    for i, study in enumerate(spec.studies):
        lines[f"studies.{i}"] = doc.line_of(("studies", i))
        for key in ("samples", "exclude"):
            for j, _ in enumerate(getattr(study, key) or []):
                lines[f"studies.{i}.{key}.{j}"] = doc.line_of(("studies", i, key, j))
    return lines


def manifest_json_schema() -> dict:
    """The JSON Schema of the manifest format, for editors and CI validation."""
    schema = Manifest.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://soma-manifest.invalid/manifest.schema.json"
    return schema

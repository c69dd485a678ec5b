"""`soma-manifest init`: write a first manifest (and its schema) for an existing raw tree.

Every study folder under the raw root is listed with the format its sub-folder shows. The schema is the
one given, a translation of a soma-curation schema (reference_schema.py), or a copy of the packaged default.
Nothing is overwritten: if any file to write exists, nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from soma_manifest.errors import InitError
from soma_manifest.manifest import AtlasSpec, Format, StudySpec
from soma_manifest.reference_schema import scalar, translate
from soma_manifest.schema import load_schema
from soma_manifest.sources import FORMAT_DIRS, _list_samples, is_junk

FORMATS: tuple[str, ...] = get_args(Format)


@dataclass(frozen=True)
class InitRequest:
    """What to write; relative paths are relative to the working directory, as on a command line."""

    manifest: Path
    raw: Path
    atlas_storage: Path
    name: str
    h5ad: Path | None = None
    logs: Path | None = None
    schema: Path | None = None  # a soma-manifest schema to use as it is
    reference_schema: Path | None = None  # a soma-curation schema to translate
    processes: int | None = None
    include_studies: tuple[str, ...] = ()
    format_hint: str | None = None  # preferred format when a study holds several
    notes: tuple[str, ...] = ()  # from the caller, e.g. flags that were ignored


@dataclass(frozen=True)
class Study:
    """A study folder: the format it is listed with (None: left out, for `reason`), and its sample counts."""

    name: str
    found: dict[str, int]  # format -> samples, the chosen format first
    reason: str | None = None

    @property
    def format(self) -> str | None:
        return None if self.reason else next(iter(self.found))

    @property
    def comment(self) -> str:
        if self.reason:
            return f"left out: {self.reason}"
        chosen, *others = self.found
        text = f"{chosen}, {self.found[chosen]} sample{'s' if self.found[chosen] != 1 else ''}"
        if others:
            text += (f"; also holds {', '.join(f'{o}/ ({self.found[o]})' for o in others)}, left out: a study is "
                     "read in one format (--raw-collection-type chooses it)")
        return text


@dataclass
class InitResult:
    written: list[Path]
    studies: list[Study]
    notes: list[str] = field(default_factory=list)


def default_schema_text() -> str:
    """The packaged default schema (schemas/default.yaml, shipped inside the package)."""
    return resources.files("soma_manifest").joinpath("default_schema.yaml").read_text(encoding="utf-8")


def init_manifest(req: InitRequest) -> InitResult:
    """Write the manifest, and the schema (and gene list) it needs next to it; refuse to overwrite anything."""
    if req.manifest.suffix.lower() not in (".yaml", ".yml"):
        raise InitError("the manifest must be a .yaml file", where=req.manifest,
                        hint="name it e.g. atlas.yaml, and put it before --include-studies")
    if not _valid(AtlasSpec, req.name):
        raise InitError(f"'{req.name}' is not a valid atlas name", hint="use letters, digits, '_', '.' or '-'")
    if req.schema is not None and req.reference_schema is not None:
        raise InitError("give either --schema (a soma-manifest schema) or --db-schema-fp (a soma-curation schema)")
    if req.format_hint is not None and req.format_hint not in FORMATS:
        raise InitError(f"unknown raw format '{req.format_hint}'", hint=f"use one of {', '.join(FORMATS)}")
    base = req.manifest.resolve().parent
    notes = list(req.notes)
    studies = detect_studies(req.raw, req.include_studies, req.format_hint)
    if not any(s.format for s in studies):
        raise InitError("no study folder with samples found", where=req.raw,
                        hint="a sample lives at <raw>/<study>/mtx/<sample>/, <raw>/<study>/h5ad/<sample>.h5ad or "
                             "<raw>/<study>/10x_h5/<sample>.h5")
    notes += [f"study {s.name}: {s.comment}" for s in studies if s.reason or len(s.found) > 1]

    files: dict[Path, str] = {}
    schema_notes: list[str] = []  # the translated schema carries them as comments; the manifest does not
    schema_file = base / f"{req.manifest.stem}.schema.yaml"
    if req.schema is not None:
        load_schema(req.schema)
        schema_ref = _path_text(req.schema, base)
        schema_comment = "the atlas schema"
    elif req.reference_schema is not None:
        gene_file = base / f"{req.manifest.stem}.genes.tsv"
        translation = translate(req.reference_schema, gene_file.name)
        files[schema_file] = translation.schema_text
        if translation.genes is not None:
            files[gene_file] = "".join(f"{g}\n" for g in translation.genes)
        schema_notes = [f"schema: {n}" for n in translation.notes]
        schema_ref, schema_comment = schema_file.name, f"translated from {req.reference_schema}; see its notes"
    else:
        files[schema_file] = default_schema_text()
        schema_ref, schema_comment = schema_file.name, "a copy of the default schema: edit it before the first apply"
    files[req.manifest.resolve()] = _manifest_text(req, base, studies, schema_ref, schema_comment, notes)

    existing = [p for p in files if p.exists()]
    if existing:
        raise InitError(f"{', '.join(map(str, existing))} already exist{'s' if len(existing) == 1 else ''}; "
                        "nothing was written", where=req.manifest,
                        hint="remove or rename it, or choose another manifest name")
    _write_all(files)
    return InitResult(list(files), studies, notes + schema_notes)


def detect_studies(raw: Path, include: tuple[str, ...], hint: str | None) -> list[Study]:
    """The study folders under `raw` (or those named in `include`) and the format each holds."""
    if not raw.is_dir():
        raise InitError("raw storage folder not found", where=raw, hint="check --raw (--raw-storage-dir)")
    names = sorted(e.name for e in os.scandir(raw) if e.is_dir() and not is_junk(e.name))
    missing = [n for n in include if n not in names]
    if missing:
        raise InitError(f"no study folder {', '.join(missing)} (found: {', '.join(names) or 'none'})", where=raw,
                        hint="fix --include-studies")
    order = ([hint] if hint else []) + [f for f in FORMATS if f != hint]
    studies = []
    for name in (sorted(set(include)) if include else names):
        found = {}
        for fmt in order:
            folder, suffix = FORMAT_DIRS[fmt]
            if (raw / name / folder).is_dir() and (samples := _list_samples(raw / name / folder, suffix)):
                found[fmt] = len(samples)
        reason = None
        if not _valid(StudySpec, name):
            reason = "the folder name is not a valid study name (letters, digits, '_', '.', '-'); rename the folder"
        elif not found:
            reason = "no mtx/, h5ad/ or 10x_h5/ folder with samples"
        studies.append(Study(name, found, reason))
    return studies


def _valid(model: type[AtlasSpec] | type[StudySpec], name: str) -> bool:
    """Whether the manifest accepts `name` as an atlas or study name."""
    try:
        model.model_validate({"name": name, "storage": "."} if model is AtlasSpec else {"name": name})
    except ValidationError:
        return False
    return True


def _path_text(path: Path, base: Path) -> str:
    """How the manifest names `path`: absolute stays absolute, relative becomes relative to the manifest."""
    path = path.expanduser()
    return str(path) if path.is_absolute() else os.path.relpath(path.resolve(), base)


def _manifest_text(req: InitRequest, base: Path, studies: list[Study], schema_ref: str, schema_comment: str,
                   notes: list[str]) -> str:
    h5ad = req.h5ad or req.atlas_storage / f"{req.name}-h5ad"
    logs = req.logs or req.atlas_storage / f"{req.name}-logs"
    lines = ["# Written by `soma-manifest init`. Relative paths resolve against this file's folder.",
             f"# Next: soma-manifest validate {req.manifest.name}; soma-manifest plan {req.manifest.name}; "
             f"soma-manifest apply {req.manifest.name}"]
    if notes:
        lines += ["# Notes:"] + [f"# - {note}" for note in notes]
    lines += ["version: 1",
              "atlas:",
              f"  name: {scalar(req.name)}",
              f"  storage: {scalar(_path_text(req.atlas_storage, base))}  # the atlas is <storage>/<name>",
              f"schema: {scalar(schema_ref)}  # {schema_comment}",
              "storage:",
              f"  raw: {scalar(_path_text(req.raw, base))}  # <raw>/<study>/<format folder>/<sample>",
              f"  h5ad: {scalar(_path_text(h5ad, base))}  # standardized intermediate h5ad files",
              f"  logs: {scalar(_path_text(logs, base))}  # one log file per apply"]
    if req.processes is not None:
        lines.append(f"processes: {req.processes}  # default for apply; --processes overrides")
    lines.append("studies:")
    for study in studies:
        if study.format is None:
            lines.append(f"  # - name: {study.name}  # {study.comment}")
        elif study.format == "mtx":
            lines.append(f"  - name: {study.name}  # {study.comment}")
        else:
            lines += [f"  - name: {study.name}", f"    format: {study.format}  # {study.comment}"]
    return "\n".join(lines) + "\n"


def _write_all(files: dict[Path, str]) -> None:
    """Create every file exclusively; on any failure remove what was written, so nothing is left half done."""
    written: list[Path] = []
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "x", encoding="utf-8") as fh:
                written.append(path)
                fh.write(text)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        raise InitError(f"cannot write: {exc.strerror}", where=exc.filename or next(iter(files))) from None

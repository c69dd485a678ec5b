"""A read-only look at raw storage: which samples the manifest selects, and their fingerprints.

Stdlib and storage only: this runs on every `plan`, which must stay fast with thousands of samples.
Raw storage may be local or s3://; on S3 each study prefix is listed once per plan (storage.snapshot).
"""

from __future__ import annotations

import csv
import fnmatch
import gzip
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from soma_manifest import storage
from soma_manifest.errors import ManifestError, SourceError
from soma_manifest.manifest import LoadedManifest, StudySpec
from soma_manifest.storage import Location

#: Where a format's samples live under <raw>/<study>/, and the file suffix of one sample.
FORMAT_DIRS = {"mtx": ("mtx", ""), "h5ad": ("h5ad", ".h5ad"), "10x_h5": ("10x_h5", ".h5")}
#: Cell Ranger keeps the matrix folder inside the sample folder under one of these names.
MTX_SUBDIRS = ("", "outs/filtered_feature_bc_matrix", "filtered_feature_bc_matrix")
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileStat:
    """A raw file's size and mtime (local) or ETag and last-modified (S3); equal stats mean the content
    digest can be reused."""

    path: str
    size: int
    mtime_ns: int
    etag: str = ""


@dataclass(frozen=True)
class SampleSource:
    """One selected sample: where its raw data is."""

    study: str
    sample: str
    format: str
    path: Location  # the mtx folder, or the .h5ad / .h5 file

    @property
    def key(self) -> str:
        return f"{self.study}/{self.sample}"


def is_junk(name: str) -> bool:
    """macOS and editor droppings (.DS_Store, ._foo) and other hidden files are never samples."""
    return name.startswith(".") or name.startswith("~")


def discover(manifest: LoadedManifest) -> list[SampleSource]:
    """Every sample the manifest selects, sorted by key; all layout problems raised at once.

    Inside a `storage.snapshot()`, an s3:// study is listed once and later lookups use that listing.
    """
    problems: list[str] = []
    found: list[SampleSource] = []
    for index, study in enumerate(manifest.studies):
        storage.prefetch(manifest.raw / study.name)
        found.extend(_discover_study(manifest, index, study, problems))
    if problems:
        raise ManifestError(problems)
    return sorted(found, key=lambda s: s.key)


def _discover_study(manifest: LoadedManifest, index: int, study: StudySpec, problems: list[str]) -> list[SampleSource]:
    subdir, suffix = FORMAT_DIRS[study.format]
    folder = manifest.raw / study.name / subdir
    where = manifest.locate(("studies", index))
    if not storage.is_dir(manifest.raw / study.name):
        problems.append(f"{where}: studies.{index}.name: study folder {manifest.raw / study.name} not found "
                        f"(create it, or fix the study name or storage.raw)")
        return []
    if not storage.is_dir(folder):
        problems.append(f"{where}: studies.{index}: no {subdir}/ folder in {manifest.raw / study.name} for format "
                        f"'{study.format}' (put the samples in {folder}, or set the study's format)")
        return []
    available = _list_samples(folder, suffix)
    if not available:
        problems.append(f"{where}: studies.{index}: {folder} holds no samples")
        return []
    selected = set(available) if study.samples is None else set()
    for j, pattern in enumerate(study.samples or []):
        hits = fnmatch.filter(available, pattern)
        if not hits:
            problems.append(f"{manifest.locate(('studies', index, 'samples', j))}: studies.{index}.samples.{j}: "
                            f"'{pattern}' matches no sample in {folder} (available: {_preview(available)})")
        selected.update(hits)
    for j, pattern in enumerate(study.exclude):
        hits = fnmatch.filter(available, pattern)
        if not hits:
            problems.append(f"{manifest.locate(('studies', index, 'exclude', j))}: studies.{index}.exclude.{j}: "
                            f"'{pattern}' matches no sample in {folder} (available: {_preview(available)})")
        selected.difference_update(hits)
    if not selected and not problems:
        problems.append(f"{where}: studies.{index}: the include/exclude lists leave no sample of '{study.name}'")
    return [SampleSource(study.name, name, study.format, folder / f"{name}{suffix}") for name in sorted(selected)]


def _list_samples(folder: Location, suffix: str) -> list[str]:
    names = []
    for name, is_dir in (storage.listdir(folder) or {}).items():
        if is_junk(name):
            continue
        if suffix and name.endswith(suffix) and not is_dir:
            names.append(name[: -len(suffix)])
        elif not suffix and is_dir:
            names.append(name)
    return sorted(names)


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def mtx_files(folder: Location | Path) -> dict[str, Location]:
    """The matrix, barcodes and features (v3) or genes (v2) files of a Cell Ranger MTX sample.

    The files may sit in the sample folder itself or in Cell Ranger's `outs/filtered_feature_bc_matrix`.
    """
    folder = Location(folder)
    names = _listing(folder, required=True)
    if not any(n.startswith("matrix.mtx") for n in names):
        for sub in MTX_SUBDIRS[1:]:
            nested = _listing(folder / sub, required=False)
            if nested is not None and any(n.startswith("matrix.mtx") for n in nested):
                return _mtx_roles(folder / sub, nested)
    return _mtx_roles(folder, names)


def _listing(base: Location, *, required: bool) -> set[str] | None:
    """Names in `base` (junk left out); None when an optional folder is absent."""
    try:
        entries = storage.listdir(base)
    except NotADirectoryError:
        if not required:
            return None
        raise SourceError("expected a Cell Ranger MTX folder, found a file", where=base,
                          hint="declare single-file samples with format 10x_h5 or h5ad") from None
    if entries is None:
        if not required:
            return None
        raise SourceError("sample folder not found", where=base, hint="check the path in the manifest")
    return {name for name in entries if not is_junk(name)}


_MTX_ROLES = {
    "matrix": ("matrix.mtx.gz", "matrix.mtx"),
    "barcodes": ("barcodes.tsv.gz", "barcodes.tsv"),
    "features": ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"),
}


def _mtx_roles(base: Location, names: set[str]) -> dict[str, Location]:
    files = {}
    for role, candidates in _MTX_ROLES.items():
        found = [name for name in candidates if name in names]
        if not found:
            listing = f"the folder contains: {_preview(sorted(names))}" if names else "the folder is empty"
            raise SourceError(f"no {role} file ({' or '.join(candidates)}); {listing}", where=base,
                              hint=f"add the {role} file, named as Cell Ranger names it")
        if len(found) > 1:
            raise SourceError(f"ambiguous {role} file: {' and '.join(found)} both exist", where=base,
                              hint="keep only the one that belongs to this matrix")
        files[role] = base / found[0]
    return files


def sample_files(source: SampleSource) -> list[Location]:
    """The raw files a sample consists of, in a stable order."""
    if source.format == "mtx":
        return list(mtx_files(source.path).values())
    if not storage.is_file(source.path):
        raise SourceError("sample file not found", where=source.path)
    return [source.path]


def stat_files(paths: list[Location], root: Location) -> tuple[FileStat, ...]:
    stats = []
    for path in paths:
        st = storage.stat(path)
        stats.append(FileStat(_relative(path, root), st.size, st.mtime_ns, st.etag))
    return tuple(stats)


def content_digest(paths: list[Location], root: Location) -> str:
    """Digest of the files' names (relative to `root`) and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        h.update(_relative(path, root).encode() + b"\0")
        with storage.open_read(path) as fh, storage.guard("read", path):
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _relative(path: Location, root: Location) -> str:
    # String prefix instead of relative_to: this runs for every raw file on every plan.
    text, base = str(path), str(root)
    return text[len(base) + 1:] if text.startswith(base + "/") else text


# --- metadata ---------------------------------------------------------------------------------

def metadata_file(raw: Location | Path, study: str, kind: str) -> Location | None:
    """`<raw>/<study>/<kind>/<study>.tsv[.gz]`, or None when the study has none."""
    folder = Location(raw) / study / kind
    for name in (f"{study}.tsv.gz", f"{study}.tsv"):
        if storage.is_file(folder / name):
            return folder / name
    return None


def read_tsv_rows(path: Location) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a (possibly gzipped) TSV, for digests; the converter re-reads it typed."""
    data = storage.read_bytes(path)
    try:
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        text = data.decode("utf-8")
    except (EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read metadata file: {exc}", where=path,
                          hint="it must be a tab-separated text file, gzipped when named .gz") from None
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    if not rows:
        return [], []
    return rows[0], rows[1:]


def metadata_digests(raw: Location, study: str, samples: list[str]) -> dict[str, str]:
    """Per sample, a digest of the metadata rows that concern it (cell_ and sample_metadata).

    Rows are attributed by their sample_name column; a file without one concerns every sample.
    """
    parts: dict[str, hashlib.blake2b] = {s: hashlib.blake2b(digest_size=16) for s in samples}
    for kind in ("cell_metadata", "sample_metadata"):
        path = metadata_file(raw, study, kind)
        if path is None:
            continue
        header, rows = read_tsv_rows(path)
        head = ("\t".join(header) + "\n").encode()
        for h in parts.values():
            h.update(kind.encode() + b"\0" + head)
        if "sample_name" in header:
            col = header.index("sample_name")
            for row in rows:
                h = parts.get(row[col] if col < len(row) else "")
                if h is not None:
                    h.update(("\t".join(row) + "\n").encode())
        else:
            whole = "\n".join("\t".join(r) for r in rows).encode()
            for h in parts.values():
                h.update(whole)
    return {s: h.hexdigest() for s, h in parts.items()}


def metadata_stats(raw: Location, study: str) -> tuple[FileStat, ...]:
    """Stats of a study's metadata files; unchanged stats let the planner reuse cached digests."""
    paths = [p for kind in ("cell_metadata", "sample_metadata") if (p := metadata_file(raw, study, kind))]
    return stat_files(paths, raw)

"""Translate a schema file of the reference pipeline (soma-curation, `--db-schema-fp`) into a soma-manifest schema.

A reference schema file is partial: it is deep-merged over the reference's defaults (REFERENCE_DEFAULTS), so
the translation starts from them. Whatever has no equivalent is kept as a note, which `init` prints and writes
into the translated schema as YAML comments.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from soma_manifest.errors import InitError
from soma_manifest.schema import AtlasSchema, Computed
from soma_manifest.yamlio import LocatedYaml, load_yaml

_STRING = [["sample_name", "categorical__large_string"], ["scrnaseq_protocol", "categorical__large_string"],
           ["study_name", "categorical__large_string"]]

#: The reference's built-in schema (soma-curation), which a schema file is merged over.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "PAI_SCHEMA_VERSION": "1.0.0",
    "MEASUREMENT_RNA_NAME": "RNA",
    "PAI_PRESENCE_MATRIX_NAME": "feature_presence_matrix",
    "CORE_GENE_SET_PATH": None,
    "PAI_OBS_INDEX_COLUMNS": [["soma_joinid", "int64"]],
    "PAI_OBS_SAMPLE_COLUMNS": _STRING,
    "PAI_OBS_CELL_COLUMNS": [["barcode", "large_string"], ["cell_type", "categorical__large_string"]],
    "PAI_OBS_COMPUTED_COLUMNS": [["nnz", "uint32"], ["umi_counts", "uint32"], ["pct_mito", "float32"],
                                 ["pct_ribo", "float32"], ["log_mean", "float32"], ["log_var", "float32"]],
    "COMPUTED_COLUMN_FUNCTIONS": {"nnz": "compute_nnz", "umi_counts": "compute_umi_counts",
                                  "pct_mito": "compute_pct_mito", "pct_ribo": "compute_pct_ribo",
                                  "log_mean": "compute_log_mean", "log_var": "compute_log_var"},
    "PAI_VAR_INDEX_COLUMNS": [["soma_joinid", "int64"]],
    "PAI_VAR_COLUMNS": [["gene", "large_string"], ["ens", "large_string"]],
    "PAI_X_LAYERS": [["col_raw", "uint32"], ["col_norm", "float32"], ["row_raw", "uint32"], ["row_norm", "float32"]],
    "PAI_OBSM_LAYERS": {"embeddings": "float32", "umap": "float32"},
    "PAI_PRESENCE_LAYER": "uint8",
    "PAI_OBS_PLATFORM_CONFIG": {},
    "PAI_VAR_PLATFORM_CONFIG": {},
    "PAI_X_LAYERS_PLATFORM_CONFIG": {},
    "PAI_PRESENCE_PLATFORM_CONFIG": {},
    "VALIDATION_SCHEMA": {"REQUIRED_OBS_COLUMNS": ["barcode", "sample_name", "study_name"],
                          "REQUIRED_VAR_COLUMNS": ["gene"], "GENE_INTERSECTION_THRESHOLD_FRAC": 0.0},
}

#: Reference column types -> soma-manifest types (there are no unsigned or dictionary-encoded types).
_TYPES = {"large_string": "string", "string": "string", "categorical__large_string": "string",
          "categorical__string": "string", "int64": "int64", "int32": "int32", "uint32": "int64",
          "uint16": "int32", "uint8": "int32", "int16": "int32", "int8": "int32", "float32": "float32",
          "float64": "float64", "bool_": "bool", "bool": "bool"}
#: What the reference computes and soma-manifest computes too (log_mean/log_var: see `_UPCOMING`).
_COMPUTES = ("nnz", "umi_counts", "n_genes", "pct_mito", "pct_ribo", "log_mean", "log_var")
_UPCOMING = tuple(c for c in _COMPUTES if c not in Computed.__args__)
_FIXED_OBS = {"barcode": "barcode", "sample_name": "sample", "study_name": "study"}
_PLAIN = re.compile(r"^[A-Za-z_./][A-Za-z0-9_.\-/ ]*$")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


@dataclass
class Translation:
    """The translated schema as YAML text (with notes as comments), its gene list, and the notes."""

    schema_text: str
    genes: list[str] | None
    notes: list[str] = field(default_factory=list)


def translate(path: Path, gene_file: str) -> Translation:
    """Translate the reference schema at `path`; a fixed gene universe is referred to as `gene_file`."""
    doc = load_yaml(path)
    if doc.data is not None and not isinstance(doc.data, dict):
        raise InitError("a soma-curation schema is a YAML mapping of PAI_* keys", where=f"{path}:1")
    given = doc.data or {}
    return _Translator(doc, _deep_merge(REFERENCE_DEFAULTS, given), set(given), gene_file).run()


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _Translator:
    def __init__(self, doc: LocatedYaml, ref: dict[str, Any], given: set[str], gene_file: str) -> None:
        self.doc, self.ref, self.given, self.gene_file = doc, ref, given, gene_file
        self.notes: list[str] = []
        self.comments: dict[int, str] = {}  # id of an emitted entry -> its trailing comment
        self.retyped: dict[tuple[str, str], list[str]] = {}  # (reference type, ours) -> column names

    def fail(self, key: tuple[str | int, ...], message: str) -> InitError:
        where = (f"{self.doc.path}:{self.doc.line_of(key)}" if key[0] in self.given
                 else f"{self.doc.path} (soma-curation default)")
        return InitError(f"{'.'.join(map(str, key))}: {message}", where=where,
                         hint="fix the soma-curation schema, or write a soma-manifest schema and pass --schema")

    def columns(self, key: str) -> list[tuple[str, str]]:
        value = self.ref.get(key) or []
        if not isinstance(value, list):
            raise self.fail((key,), "expected a list of [name, type] pairs")
        pairs = []
        for i, item in enumerate(value):
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise self.fail((key, i), f"expected a [name, type] pair, found {item!r}")
            pairs.append((item[0], item[1]))
        return pairs

    def column_type(self, key: str, name: str, ref_type: str) -> str | None:
        ours = _TYPES.get(ref_type)
        if ours is None:
            self.notes.append(f"{key}: column '{name}' of type {ref_type} has no equivalent type; left out")
        elif ref_type != ours:
            self.retyped.setdefault((ref_type, ours), []).append(name)
        return ours

    def retyped_notes(self) -> None:
        for (ref_type, ours), names in self.retyped.items():
            why = ("stored as plain strings, without dictionary encoding" if ref_type.startswith("categorical")
                   else f"there are no unsigned types; {ours} holds every {ref_type} value"
                   if ref_type.startswith("u") else f"{ours} holds every {ref_type} value")
            self.notes.append(f"{ref_type} -> {ours} ({', '.join(names)}): {why}")

    def run(self) -> Translation:
        obs = self.obs()
        var = self.var()
        layers = self.layers()
        genes, gene_list = self.genes()
        self.retyped_notes()
        self.no_equivalents(obs)
        data = {"version": 1, "measurement": self.ref.get("MEASUREMENT_RNA_NAME") or "RNA",
                "obs": obs, "var": var, "layers": layers, "genes": genes}
        self.check(data)
        return Translation(self.render(data), gene_list, self.notes)

    def obs(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for key, source in (("PAI_OBS_SAMPLE_COLUMNS", "sample_metadata"), ("PAI_OBS_CELL_COLUMNS", "cell_metadata")):
            for name, ref_type in self.columns(key):
                kind = self.column_type(key, name, ref_type)
                if kind is None:
                    continue
                column: dict[str, Any] = {"name": name, "type": kind, "source": _FIXED_OBS.get(name, source)}
                if name in _FIXED_OBS and kind != "string":
                    raise self.fail((key,), f"'{name}' holds text in soma-manifest; declare it as a string type")
                if name not in _FIXED_OBS:
                    if kind == "string":
                        column["default"] = "unknown"
                    else:
                        self.notes.append(f"{key}: '{name}' ({kind}) has no default: a cell without a value fails "
                                          "its sample (add `default:` to accept missing values)")
                out.append(column)
                self.comments[id(column)] = ref_type
        functions = self.ref.get("COMPUTED_COLUMN_FUNCTIONS") or {}
        for name, ref_type in self.columns("PAI_OBS_COMPUTED_COLUMNS"):
            kind = self.column_type("PAI_OBS_COMPUTED_COLUMNS", name, ref_type)
            function = str(functions.get(name, f"compute_{name}"))
            compute = function.removeprefix("compute_")
            if kind is None:
                continue
            if compute not in _COMPUTES:
                self.notes.append(f"PAI_OBS_COMPUTED_COLUMNS: '{name}' ({function}) has no equivalent: soma-manifest "
                                  f"computes {', '.join(_COMPUTES)}; left out")
                continue
            column = {"name": name, "type": kind, "source": "computed"}
            if compute != name:
                column["compute"] = compute
            out.append(column)
            self.comments[id(column)] = f"{ref_type}, {function}"
        upcoming = sorted({c.get("compute", c["name"]) for c in out if c["source"] == "computed"} & set(_UPCOMING))
        if upcoming:
            self.notes.append(f"computed {', '.join(upcoming)}: this soma-manifest does not compute "
                              f"{'them' if len(upcoming) > 1 else 'it'} yet, so `validate` refuses this schema "
                              "until it does; to use it now, delete those obs lines")
        return out

    def var(self) -> list[dict[str, Any]]:
        out = []
        for name, ref_type in self.columns("PAI_VAR_COLUMNS"):
            if name == "gene":
                column = {"name": name, "type": "string", "source": "feature_name"}
                out.append(column)
                self.comments[id(column)] = f"{ref_type}, the gene symbol"
            elif name == "ens":
                self.notes.append("PAI_VAR_COLUMNS: 'ens' (which held the symbol again) is not kept: var_id holds "
                                  "the gene id")
            else:
                self.notes.append(f"PAI_VAR_COLUMNS: '{name}' has no equivalent (var columns are the gene symbol "
                                  "or the feature type); left out")
        return out

    def layers(self) -> list[dict[str, Any]]:
        out = []
        for name, ref_type in self.columns("PAI_X_LAYERS"):
            kind = self.column_type("PAI_X_LAYERS", name, ref_type)
            if kind is None:
                continue
            if "raw" in name:
                source, what = "counts", "raw counts"
            elif "norm" in name:
                # The reference normalizes to log1p(counts / cell total x 10,000): our `log1p` layer.
                source, what = "log1p", "log1p(counts / total x 1e4)"
            else:
                self.notes.append(f"PAI_X_LAYERS: layer '{name}' is neither raw (*raw*) nor normalized (*norm*); "
                                  "left out")
                continue
            layer = {"name": name, "type": kind, "source": source,
                     "optimize": "genes" if name.startswith("col") else "cells"}
            out.append(layer)
            self.comments[id(layer)] = f"{ref_type}, {what}"
        return out

    def genes(self) -> tuple[dict[str, Any], list[str] | None]:
        core = self.ref.get("CORE_GENE_SET_PATH")
        if not core:
            self.notes.append("CORE_GENE_SET_PATH is not set: the reference then uses a small bundled dummy list; "
                              "here the gene axis grows with the samples (universe: union)")
            return {"universe": "union"}, None
        gene_path = Path(str(core)).expanduser()
        if not gene_path.is_absolute() and not gene_path.exists():
            gene_path = self.doc.path.parent / gene_path  # the reference reads it from its working directory
        try:
            raw = gene_path.read_bytes()
            text = (gzip.decompress(raw) if gene_path.suffix == ".gz" else raw).decode("utf-8")
        except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
            raise self.fail(("CORE_GENE_SET_PATH",), f"cannot read the core gene set {gene_path}: {exc}") from None
        symbols = sorted({line.split("\t")[0].strip() for line in text.splitlines() if line.strip()})
        if not symbols:
            raise self.fail(("CORE_GENE_SET_PATH",), f"the core gene set {gene_path} lists no gene")
        self.notes.append(f"CORE_GENE_SET_PATH: {len(symbols)} gene symbols, sorted, are the fixed gene universe "
                          f"({self.gene_file}). The universe matches a sample's genes by gene id and these ids are "
                          "symbols: samples whose features carry Ensembl ids match none of them; give the file "
                          "the gene ids in its first column and the symbols in its second")
        return {"universe": "fixed", "file": self.gene_file}, symbols

    def no_equivalents(self, obs: list[dict[str, Any]]) -> None:
        ref = self.ref
        self.notes.append(f"PAI_SCHEMA_VERSION {ref.get('PAI_SCHEMA_VERSION')!s} is kept as a comment only: the "
                          "state tracks schema changes by fingerprint")
        if ref.get("PAI_OBSM_LAYERS"):
            self.notes.append(f"PAI_OBSM_LAYERS ({', '.join(map(str, ref['PAI_OBSM_LAYERS']))}): no obsm arrays "
                              "are created")
        self.notes.append(f"PAI_PRESENCE_MATRIX_NAME ({ref.get('PAI_PRESENCE_MATRIX_NAME')}) and PAI_PRESENCE_LAYER: "
                          "no presence matrix is declared in the schema")
        configs = [k for k in REFERENCE_DEFAULTS if k.endswith("_PLATFORM_CONFIG") and ref.get(k)]
        self.notes.append("platform configs" + (f" ({', '.join(configs)})" if configs else "")
                          + ": no equivalent; a layer's layout is `optimize: cells` (row_*) or `genes` (col_*)")
        if [c[0] for c in self.columns("PAI_OBS_INDEX_COLUMNS")] != ["soma_joinid"] or \
                [c[0] for c in self.columns("PAI_VAR_INDEX_COLUMNS")] != ["soma_joinid"]:
            self.notes.append("PAI_OBS/VAR_INDEX_COLUMNS: only soma_joinid exists (plus obs_id and var_id)")
        validation = ref.get("VALIDATION_SCHEMA") or {}
        names = {c["name"] for c in obs}
        missing = [c for c in validation.get("REQUIRED_OBS_COLUMNS") or [] if c not in names]
        self.notes.append("REQUIRED_OBS_COLUMNS / REQUIRED_VAR_COLUMNS: no separate check; every declared column "
                          "is filled for every cell or the sample fails"
                          + (f" (required but not declared: {', '.join(missing)})" if missing else ""))
        threshold = validation.get("GENE_INTERSECTION_THRESHOLD_FRAC")
        self.notes.append(f"GENE_INTERSECTION_THRESHOLD_FRAC ({threshold}): no equivalent; samples are not "
                          "refused for sharing few genes with the universe")
        unknown = sorted(k for k in self.given if k not in REFERENCE_DEFAULTS)
        if unknown:
            self.notes.append(f"unknown keys, ignored: {', '.join(unknown)}")

    def check(self, data: dict[str, Any]) -> None:
        """Validate with soma-manifest's own schema model, except the computes it does not know yet."""
        known = {**data, "obs": [c for c in data["obs"] if c.get("compute", c["name"]) not in _UPCOMING
                                 or c["source"] != "computed"]}
        try:
            AtlasSchema.model_validate(known)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InitError(f"the translated schema is invalid at {'.'.join(map(str, first['loc']))}: "
                            f"{first['msg']}", where=self.doc.path,
                            hint="fix the soma-curation schema, or write a soma-manifest schema and pass --schema"
                            ) from None

    def render(self, data: dict[str, Any]) -> str:
        lines = [f"# Translated by `soma-manifest init` from the soma-curation schema {self.doc.path}",
                 "# (merged over soma-curation's defaults; each entry's comment gives the reference's type).",
                 f"# Reference PAI_SCHEMA_VERSION: {self.ref.get('PAI_SCHEMA_VERSION')}",
                 "# Notes:"]
        lines += [f"# - {note}" for note in self.notes]
        lines += ["version: 1", f"measurement: {scalar(data['measurement'])}"]
        for section in ("obs", "var", "layers"):
            lines.append(f"{section}:")
            lines += [f"  - {flow(entry)}  # {self.comments[id(entry)]}" for entry in data[section]]
        lines.append("genes:")
        lines += [f"  {k}: {scalar(v)}" for k, v in data["genes"].items()]
        lines.append('  feature_types: ["Gene Expression"]')
        return "\n".join(lines) + "\n"


def scalar(value: Any) -> str:
    """A YAML scalar: plain when unambiguous, else JSON-quoted (JSON strings are YAML)."""
    if isinstance(value, str) and _PLAIN.match(value) and value.lower() not in _YAML_WORDS and value.strip() == value:
        return value
    return json.dumps(value)


def flow(entry: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {scalar(v)}" for k, v in entry.items()) + "}"

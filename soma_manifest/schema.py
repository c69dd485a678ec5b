"""The atlas schema: which obs/var columns, X layers and genes the atlas holds.

Loaded from a YAML file (schemas/default.yaml by default). Two fingerprints split it:
`structure` (what the TileDB arrays look like; changing it needs a new atlas) and
`conversion` (how raw samples become rows; changing it re-converts samples).
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from soma_manifest.errors import ManifestError, SchemaError
from soma_manifest.yamlio import load_yaml, pydantic_problems

ColumnType = Literal["string", "int32", "int64", "float32", "float64", "bool"]
ObsSource = Literal["barcode", "sample", "study", "sample_metadata", "cell_metadata", "computed"]
Computed = Literal["nnz", "umi_counts", "n_genes", "pct_mito", "pct_ribo", "n_measured_genes"]
LayerSource = Literal["counts", "normalized", "log1p"]
LayerType = Literal["int32", "int64", "float32", "float64"]

#: Reserved column names: the SOMA join id and the atlas' own id columns.
RESERVED = frozenset({"soma_joinid", "obs_id", "var_id"})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ObsColumn(_Frozen):
    """One obs column and where its values come from."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: ColumnType = "string"
    source: ObsSource
    # Column name in the metadata file (sample_/cell_metadata) when it differs from `name`.
    from_: str | None = Field(default=None, alias="from")
    # Which QC value a `computed` column holds; defaults to the column's name.
    compute: Computed | None = None
    # Value used when the metadata has no value for a cell or sample; without it that is an error.
    default: str | int | float | bool | None = None

    @model_validator(mode="after")
    def _check(self) -> "ObsColumn":
        if self.name in RESERVED:
            raise ValueError(f"'{self.name}' is reserved; choose another column name")
        if self.source == "computed":
            if self.compute is None and self.name not in Computed.__args__:
                raise ValueError(
                    f"computed column '{self.name}' needs `compute:` one of {', '.join(Computed.__args__)}"
                )
        elif self.compute is not None:
            raise ValueError("`compute:` only applies to columns with source: computed")
        if self.from_ is not None and self.source not in ("sample_metadata", "cell_metadata"):
            raise ValueError("`from:` only applies to metadata-sourced columns")
        return self

    @property
    def metadata_column(self) -> str:
        return self.from_ or self.name

    @property
    def computed(self) -> str:
        return self.compute or self.name


class VarColumn(_Frozen):
    """One var column; genes are identified by `var_id` (the gene id), these add attributes."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: Literal["string"] = "string"
    source: Literal["feature_name", "feature_type"]


class Layer(_Frozen):
    """One X layer of the measurement, derived from the raw counts."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: LayerType = "int32"
    source: LayerSource = "counts"
    # cells: the whole gene axis in one tile, written in global order without a sort (fast
    # ingest, fast per-cell reads). genes: TileDB's default tiles, written with a sort (slower
    # ingest; reading one gene across all cells is about 3x faster), e.g. for a copy layer.
    optimize: Literal["cells", "genes"] = "cells"

    @model_validator(mode="after")
    def _check(self) -> "Layer":
        if self.source == "counts" and not self.type.startswith("int"):
            raise ValueError("a counts layer holds raw integer counts: use type int32 or int64")
        if self.source != "counts" and not self.type.startswith("float"):
            raise ValueError(f"a {self.source} layer holds fractions: use type float32 or float64")
        return self


class Genes(_Frozen):
    """The gene universe: `union` grows with every sample; `fixed` comes from a gene list file."""

    universe: Literal["union", "fixed"] = "union"
    # For `fixed`: a TSV whose first column is the gene id and optional second the symbol.
    file: str | None = None
    # Only features of these Cell Ranger types enter the measurement (antibodies etc. do not).
    feature_types: tuple[str, ...] = ("Gene Expression",)

    @model_validator(mode="after")
    def _check(self) -> "Genes":
        if (self.universe == "fixed") != (self.file is not None):
            raise ValueError("`file:` is required with universe: fixed and only allowed with it")
        return self


class QC(_Frozen):
    """Prefixes of gene symbols counted by the pct_mito and pct_ribo columns."""

    mito_prefixes: tuple[str, ...] = ("MT-", "mt-")
    ribo_prefixes: tuple[str, ...] = ("RPS", "RPL", "Rps", "Rpl")


class AtlasSchema(_Frozen):
    """What the atlas holds. See README.md, "Schema reference"."""

    version: Literal[1]
    measurement: str = Field(default="RNA", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    obs: tuple[ObsColumn, ...]
    var: tuple[VarColumn, ...] = (VarColumn(name="gene_symbol", source="feature_name"),)
    layers: tuple[Layer, ...] = (Layer(name="raw"),)
    genes: Genes = Genes()
    qc: QC = QC()
    # Set by the loader: the folder relative gene-list paths resolve against, and its content.
    source_path: str = Field(default="", exclude=True)
    gene_list_digest: str = Field(default="", exclude=True)

    @model_validator(mode="after")
    def _check(self) -> "AtlasSchema":
        for kind, cols in (("obs", self.obs), ("var", self.var), ("layers", self.layers)):
            names = [c.name for c in cols]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"duplicate {kind} names: {', '.join(dupes)}")
        if not self.layers:
            raise ValueError("at least one X layer is required")
        if not any(layer.source == "counts" for layer in self.layers):
            raise ValueError("one layer must hold the raw counts (source: counts)")
        return self

    @property
    def counts_layer(self) -> Layer:
        return next(layer for layer in self.layers if layer.source == "counts")

    @cached_property
    def structure(self) -> str:
        """Fingerprint of the array layout; an atlas cannot change it in place."""
        return _digest({
            "measurement": self.measurement,
            "obs": [(c.name, c.type) for c in self.obs],
            "var": [(c.name, c.type) for c in self.var],
            "layers": [(layer.name, layer.type, layer.optimize) for layer in self.layers],
            "genes": self.genes.universe,
        })

    @cached_property
    def conversion(self) -> str:
        """Fingerprint of how samples are converted; a change re-converts every sample."""
        return _digest({
            "obs": [c.model_dump(by_alias=True) for c in self.obs],
            "var": [c.model_dump() for c in self.var],
            "layers": [layer.model_dump() for layer in self.layers],
            "genes": self.genes.model_dump(),
            "gene_list": self.gene_list_digest,
            "qc": self.qc.model_dump(),
        })

    def structure_summary(self) -> dict[str, list[str]]:
        """Human-readable structure, for the message that refuses a structure change."""
        return {
            "obs": [f"{c.name}:{c.type}" for c in self.obs],
            "var": [f"{c.name}:{c.type}" for c in self.var],
            "layers": [f"{layer.name}:{layer.type}" for layer in self.layers],
            "genes": [self.genes.universe],
            "measurement": [self.measurement],
        }

    def gene_list_path(self) -> Path | None:
        if self.genes.file is None:
            return None
        path = Path(self.genes.file)
        return path if path.is_absolute() else Path(self.source_path).parent / path


def load_schema(path: Path) -> AtlasSchema:
    """Parse and validate a schema file; every problem is reported with its line."""
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise ManifestError([f"{path}:1: the schema must be a YAML mapping (see schemas/default.yaml)"])
    try:
        schema = AtlasSchema.model_validate({**doc.data, "source_path": str(path)})
    except ValidationError as exc:
        raise ManifestError(pydantic_problems(doc, exc.errors())) from None
    gene_file = schema.gene_list_path()
    if gene_file is not None:
        try:
            digest = hashlib.blake2b(gene_file.read_bytes(), digest_size=16).hexdigest()
        except OSError as exc:
            raise SchemaError(f"cannot read the fixed gene list: {exc.strerror}", where=gene_file,
                              hint=f"fix genes.file in {path}") from None
        schema = schema.model_copy(update={"gene_list_digest": digest})
    return schema


def _digest(obj: object) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()

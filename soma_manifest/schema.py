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

from soma_manifest import storage
from soma_manifest.errors import ManifestError, SchemaError, StorageError
from soma_manifest.storage import Location
from soma_manifest.yamlio import load_yaml, pydantic_problems

ColumnType = Literal["string", "int32", "int64", "float32", "float64", "bool"]
ObsSource = Literal["barcode", "sample", "study", "sample_metadata", "cell_metadata", "computed"]
Computed = Literal["nnz", "umi_counts", "n_genes", "pct_mito", "pct_ribo", "log_mean", "log_var",
                   "n_measured_genes"]
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
    # cells: global order (cell, gene), written from row chunks; fast per-cell reads.
    # genes: global order (gene, cell), written from column chunks; fast per-gene reads.
    # Both are written without a sort, at the same speed.
    optimize: Literal["cells", "genes"] = "cells"

    @model_validator(mode="after")
    def _check(self) -> "Layer":
        if self.source == "counts" and not self.type.startswith("int"):
            raise ValueError("a counts layer holds raw integer counts: use type int32 or int64")
        if self.source != "counts" and not self.type.startswith("float"):
            raise ValueError(f"a {self.source} layer holds fractions: use type float32 or float64")
        return self

    @property
    def layout(self) -> str:
        """The on-disk layout, as the structure fingerprint records it. Gene-optimized layers
        were TileDB's default tiles before they became gene-major: the new name makes atlases
        built with the old layout refuse the new one instead of being written in the wrong order."""
        return "genes:gene-major" if self.optimize == "genes" else self.optimize


class Genes(_Frozen):
    """The gene universe: `union` grows with every sample; `fixed` comes from a gene list file."""

    universe: Literal["union", "fixed"] = "union"
    # For `fixed`: a TSV whose first column is the gene id and optional second the symbol.
    file: str | None = None
    # Only features of these Cell Ranger types enter the measurement (antibodies etc. do not).
    feature_types: tuple[str, ...] = ("Gene Expression",)
    # A gene reference every sample's features are mapped onto (genes.py); without one, ids are taken as given.
    reference: str | None = None
    # What happens to a feature the reference does not name (or names ambiguously); default drop.
    unmapped: Literal["drop", "keep", "fail"] | None = None

    @model_validator(mode="after")
    def _check(self) -> "Genes":
        if (self.universe == "fixed") != (self.file is not None):
            raise ValueError("`file:` is required with universe: fixed and only allowed with it")
        if self.unmapped is not None and self.reference is None:
            raise ValueError("`unmapped:` only applies with a gene `reference:`")
        return self

    @property
    def unmapped_policy(self) -> Literal["drop", "keep", "fail"]:
        return self.unmapped or "drop"


class QC(_Frozen):
    """Prefixes of gene symbols counted by the pct_mito and pct_ribo columns."""

    mito_prefixes: tuple[str, ...] = ("MT-", "mt-")
    ribo_prefixes: tuple[str, ...] = ("RPS", "RPL", "Rps", "Rpl")


class AtlasSchema(_Frozen):
    """What the atlas holds. See README.md, "Schema reference"."""

    version: Literal[1]
    # e.g. homo_sapiens, mus_musculus: samples whose genes clearly belong to another organism are refused.
    organism: str | None = Field(default=None, pattern=r"^[a-z]+_[a-z]+$")
    measurement: str = Field(default="RNA", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    obs: tuple[ObsColumn, ...]
    var: tuple[VarColumn, ...] = (VarColumn(name="gene_symbol", source="feature_name"),)
    layers: tuple[Layer, ...] = (Layer(name="raw"),)
    genes: Genes = Genes()
    qc: QC = QC()
    # Set by the loader: where the schema is (its files resolve against its folder), and their content.
    source_path: str = Field(default="", exclude=True)
    gene_list_digest: str = Field(default="", exclude=True)
    gene_reference_digest: str = Field(default="", exclude=True)

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
            "layers": [(layer.name, layer.type, layer.layout) for layer in self.layers],
            "genes": self.genes.universe,
        })

    @cached_property
    def conversion(self) -> str:
        """Fingerprint of how samples are converted; a change re-converts every sample."""
        return _digest({
            "obs": [c.model_dump(by_alias=True) for c in self.obs],
            "var": [c.model_dump() for c in self.var],
            "layers": [layer.model_dump() for layer in self.layers],
            # Without a reference the fingerprint is what it was before references existed: no re-conversion.
            "genes": self.genes.model_dump(exclude={"reference", "unmapped"}),
            **({"gene_reference": [self.gene_reference_digest, self.genes.unmapped_policy]}
               if self.genes.reference else {}),
            "gene_list": self.gene_list_digest,
            "qc": self.qc.model_dump(),
        })

    @cached_property
    def matrix(self) -> str:
        """Fingerprint of how a sample's counts are made: the conversion without the obs columns, QC settings,
        var columns and X layers. A sample converted with the same one holds the same counts, so a change of
        those is made in place (schema evolution) instead of re-ingesting it."""
        return _digest({
            "genes": self.genes.model_dump(exclude={"reference", "unmapped"}),
            **({"gene_reference": [self.gene_reference_digest, self.genes.unmapped_policy]}
               if self.genes.reference else {}),
            "gene_list": self.gene_list_digest,
        })

    @cached_property
    def obs_fingerprints(self) -> dict[str, str]:
        """Each obs column's definition (source, default, ...), by name; pct_mito and pct_ribo with the QC prefixes
        they count, so a prefix change redefines them alone."""
        prefixes = {"pct_mito": self.qc.mito_prefixes, "pct_ribo": self.qc.ribo_prefixes}
        return {c.name: _digest([c.model_dump(by_alias=True),
                                 prefixes.get(c.computed) if c.source == "computed" else None]) for c in self.obs}

    @cached_property
    def var_fingerprints(self) -> dict[str, str]:
        """Each var column's definition, by name."""
        return {c.name: _digest(c.model_dump()) for c in self.var}

    @cached_property
    def layer_fingerprints(self) -> dict[str, str]:
        """Each X layer's definition, by name: a layer whose definition is unchanged holds the right values."""
        return {layer.name: _digest(layer.model_dump()) for layer in self.layers}

    def structure_summary(self) -> dict[str, list[str]]:
        """Human-readable structure, for the message that refuses a structure change."""
        return {
            "obs": [f"{c.name}:{c.type}" for c in self.obs],
            "var": [f"{c.name}:{c.type}" for c in self.var],
            "layers": [f"{layer.name}:{layer.type}" + (" (gene-major)" if layer.optimize == "genes" else "")
                       for layer in self.layers],
            "genes": [self.genes.universe],
            "measurement": [self.measurement],
        }

    def gene_list_path(self) -> Location | None:
        return self._relative(self.genes.file)

    def gene_reference_path(self) -> Location | None:
        return self._relative(self.genes.reference)

    def _relative(self, name: str | None) -> Location | None:
        """A file the schema names: relative to the schema's folder (an s3:// prefix for a schema on S3)."""
        return None if name is None else storage.resolve(name, Location(self.source_path).parent)


def load_schema(path: Path | Location) -> AtlasSchema:
    """Parse and validate a schema file (local or s3://); every problem is reported with its line."""
    loc = Location(path)
    doc = load_yaml(loc)
    if not isinstance(doc.data, dict):
        raise ManifestError([f"{loc}:1: the schema must be a YAML mapping (see schemas/default.yaml)"])
    try:
        schema = AtlasSchema.model_validate({**doc.data, "source_path": loc.uri})
    except ValidationError as exc:
        raise ManifestError(pydantic_problems(doc, exc.errors())) from None
    digests = {}
    for field, file, what, key in (("gene_list_digest", schema.gene_list_path(), "the fixed gene list", "file"),
                                   ("gene_reference_digest", schema.gene_reference_path(), "the gene reference",
                                    "reference")):
        if file is not None:
            try:
                digests[field] = hashlib.blake2b(storage.read_bytes(file), digest_size=16).hexdigest()
            except StorageError as exc:
                raise SchemaError(f"cannot read {what}: {exc.message.removeprefix('cannot read: ')}", where=file,
                                  hint=f"fix genes.{key} in {loc}") from None
    return schema.model_copy(update=digests) if digests else schema


def _digest(obj: object) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()

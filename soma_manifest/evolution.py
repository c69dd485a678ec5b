"""Schema evolution, planned: the structure changes from the atlas' to the schema's that apply makes in place,
and the refusal (one located error) of those it cannot. Pure data; no tiledbsoma here (apply/evolve.py runs them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from soma_manifest.errors import SchemaError
from soma_manifest.schema import AtlasSchema
from soma_manifest.state import ConversionParts, State
from soma_manifest.storage import Location


class SchemaChange(BaseModel):
    """One change of the atlas' structure made in place (schema evolution), beside the per-sample actions.

    `what` is obs, var or layer; `samples` and `entries` what filling it costs (None when nothing is written)."""

    # As the plan's other models: frozen, and every field required in the plan's JSON Schema.
    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_serialization_defaults_required=True)

    kind: Literal["add", "drop"]
    what: Literal["obs", "var", "layer"]
    name: str
    type: str
    detail: str = ""  # e.g. "from sample_metadata; default unknown", "from counts, optimize: genes"
    samples: int | None = None
    entries: int | None = None

    @property
    def short(self) -> str:
        """`+obs donor`, `-layer log1p`: the change in a few characters (logs, history)."""
        return f"{'+' if self.kind == 'add' else '-'}{self.what} {self.name}"


def schema_changes(schema: AtlasSchema, state: State | None, schema_path: Location) -> tuple[SchemaChange, ...]:
    """The structure changes from the atlas' to the schema's, each made in place by apply (schema evolution).

    Raises a located SchemaError for what cannot be made in place: a retyped column or layer, another gene
    universe or measurement name, or a state too old to say what its structure is."""
    if state is None or not state.structure:
        return ()
    # A layer an interrupted apply added (not yet in the recorded structure), since taken out of the schema.
    leftover = tuple(SchemaChange(kind="drop", what="layer", name=n, type="") for n in state.layer_fills
                     if n not in schema.layer_fingerprints)
    if state.structure == schema.structure:
        return leftover
    before, after = state.structure_summary, schema.structure_summary()
    reused = [f"X layer {layer.name} added under the name of a layer dropped earlier: the dropped layer's array "
              "keeps that name for reads of earlier applies; choose another name" for layer in schema.layers
              if layer.name in state.dropped_layers and layer.name not in _names(before.get("layers", []))]
    refused = "; ".join(filter(None, [_refused_changes(before, after, schema), *reused]))
    if refused:
        raise SchemaError(
            f"the schema changes the atlas structure in a way that cannot be made in place ({refused})",
            where=schema_path,
            hint="revert that part of the schema, or build a new atlas: give atlas.name a new name in the manifest "
                 "and apply (the old atlas stays untouched). Columns and layers can be added or dropped in place; "
                 "see README, \"Changing the schema of an existing atlas\"",
        )
    in_atlas = [s for s in state.samples.values() if s.ingest == "done"]
    samples = len(in_atlas)
    old = {section: _names(before.get(section, [])) for section in ("obs", "var", "layers")}
    changes: list[SchemaChange] = []
    for col in schema.obs:
        if col.name not in old["obs"]:
            detail = f"from {col.source}" + (f" {col.computed}" if col.source == "computed" else "") \
                + (f" column {col.metadata_column}" if col.from_ else "") \
                + (f"; default {col.default}" if col.default is not None else "")
            changes.append(SchemaChange(kind="add", what="obs", name=col.name, type=col.type, detail=detail,
                                        samples=samples))
    for layer in schema.layers:
        if layer.name not in old["layers"]:
            fill = state.layer_fills.get(layer.name)
            todo = [state.samples[k] for k in fill.todo if k in state.samples] if fill is not None else in_atlas
            detail = "from counts" + (", normalized" if layer.source == "normalized" else "") \
                + (", log1p" if layer.source == "log1p" else "") + f"; optimize: {layer.optimize}"
            changes.append(SchemaChange(kind="add", what="layer", name=layer.name, type=layer.type, detail=detail,
                                        samples=len(todo), entries=sum(s.atlas_nnz or 0 for s in todo)))
    new = {"obs": {c.name for c in schema.obs}, "var": {c.name for c in schema.var},
           "layers": {layer.name for layer in schema.layers}}
    for section, what in (("obs", "obs"), ("var", "var"), ("layers", "layer")):
        changes += [SchemaChange(kind="drop", what=what, name=name, type=type_.split(" ")[0])
                    for name, type_ in old[section].items() if name not in new[section]]
    return tuple(changes) + tuple(c for c in leftover if c.name not in old["layers"])


def _names(items: list[str]) -> dict[str, str]:
    """{"name": "type"} of a structure summary section ("name:type" items)."""
    return dict(item.rpartition(":")[::2] for item in items)


def _refused_changes(before: dict[str, list[str]], after: dict[str, list[str]], schema: AtlasSchema) -> str:
    """The structure changes that cannot be made in place, in words ("" when every change can)."""
    if not before:  # a state written before summaries were kept
        return "the state does not record the atlas' structure (it was made by an older soma-manifest)"
    refused = []
    for section, why in (("genes", "the gene universe decides how var and X are laid out"),
                         ("measurement", "the measurement's name is part of every X and var path")):
        if before.get(section) != after.get(section):
            refused.append(f"{_SECTIONS[section]} {', '.join(before.get(section, []))} -> "
                           f"{', '.join(after.get(section, []))}: {why}")
    for section in ("obs", "var", "layers"):
        old, new = _names(before.get(section, [])), _names(after.get(section, []))
        refused += [f"{_SECTIONS[section]} {n} retyped from {old[n]} to {t}: TileDB cannot change a column's type; "
                    "add it under a new name and drop the old one" for n, t in new.items() if n in old and old[n] != t]
    refused += [f"var column {n} added: its values come from every sample's raw features, which an atlas does not "
                "keep; adding it in place is not supported yet" for n in _names(after.get("var", []))
                if n not in _names(before.get("var", []))]
    counts = {layer.name for layer in schema.layers if layer.source == "counts"}
    refused += [f"X layer {n} added with source counts: the atlas' counts are in its existing counts layer"
                for n in counts if n not in _names(before.get("layers", []))]
    return "; ".join(refused)


_SECTIONS = {"obs": "obs column", "var": "var column", "layers": "X layer", "genes": "gene universe",
             "measurement": "measurement"}


def conversion_parts(schema: AtlasSchema) -> ConversionParts:
    """The parts of the schema's conversion fingerprint (recorded in the state by every apply)."""
    return ConversionParts(matrix=schema.matrix, obs=schema.obs_fingerprints,
                           var=schema.var_fingerprints, layers=schema.layer_fingerprints)


def in_place(parts: ConversionParts | None, schema: AtlasSchema) -> bool:
    """Whether a sample the atlas holds as of `parts` holds the schema's counts, var values and common layers:
    then a schema change reaches it in place (an obs rewrite at most), without a new X."""
    if parts is None or parts.matrix != schema.matrix:
        return False
    now = schema.layer_fingerprints, schema.var_fingerprints
    return all(parts.layers[n] == d for n, d in now[0].items() if n in parts.layers) and \
        all(parts.var[n] == d for n, d in now[1].items() if n in parts.var)


def check_structure(schema: AtlasSchema, state: State | None, schema_path: Location) -> None:
    """Raise the located SchemaError of a structure change that cannot be made in place (see schema_changes)."""
    schema_changes(schema, state, schema_path)

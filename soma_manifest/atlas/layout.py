"""The atlas' arrays: creating the experiment, finding its members, their Arrow schemas, its metadata.

Layout: `obs` (index soma_joinid; `obs_id` + the schema's obs columns), `ms/<measurement>/var`
(`var_id` + the schema's var columns) and `ms/<measurement>/X/<layer>` SparseNDArrays; the `samples`
table (one row per sample joinid) and `ms/<measurement>/feature_presence_matrix` (sample x gene, bool).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import tiledbsoma as soma

from soma_manifest import storage
from soma_manifest.atlas import engine
from soma_manifest.atlas_meta import LINEAGE_KEY, PRESENCE_KEY, STRUCTURE_KEY
from soma_manifest.errors import AtlasError
from soma_manifest.schema import AtlasSchema

# The experiment's own keys; PRESENCE_KEY is set once the samples table and the feature presence matrix hold a
# row for every ingested sample. Defined in atlas_meta, which reads them without the storage engine.
SAMPLES = "samples"  # top-level DataFrame: one row per sample joinid
PRESENCE = "feature_presence_matrix"  # in ms/<measurement>: bool, sample joinid x var joinid

#: The Arrow type of each schema column type.
ARROW = {
    "string": pa.large_string(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
}

SAMPLES_SCHEMA = pa.schema([
    ("soma_joinid", pa.int64()), ("sample_id", pa.large_string()), ("study", pa.large_string()),
    ("sample", pa.large_string()), ("cells", pa.int64()), ("obs_joinid_start", pa.int64()),
    ("obs_joinid_stop", pa.int64()), ("n_measured_genes", pa.int64()),
])


@dataclass(frozen=True)
class Members:
    """URIs of the arrays of one atlas."""

    obs: str
    var: str
    layers: dict[str, str]


def atlas_exists(uri: str) -> bool:
    """Whether a complete atlas is at `uri`: creation writes its lineage last, so one without is partial.

    On an object store the prefix is looked up first: tiledbsoma's `exists` answers False when it cannot
    reach the store, and an unreachable store must be one error naming it, not an atlas to create.
    """
    loc = storage.Location(uri)
    if storage.store_for(loc).networked and not storage.exists(loc):
        return False
    return soma.Experiment.exists(uri, context=engine.ctx()) and read_lineage(uri) is not None


def create_atlas(uri: str, schema: AtlasSchema, lineage: str) -> None:
    """Create the empty atlas, tied to the state's lineage; all or nothing for a reader and the next apply.

    Locally it is built in a hidden sibling, then renamed. Object stores have no rename: it is built in
    place and its metadata (structure, lineage) is written last; until then `atlas_exists` and the plan
    see no atlas, and the next apply removes the partial one and builds again.
    """
    if atlas_exists(uri):
        raise AtlasError("an atlas already exists here", where=uri, hint="point the manifest at another path")
    if not storage.store_for(uri).renames_atomically:
        storage.delete_tree(storage.Location(uri))
        _build_experiment(uri, schema, lineage)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.creating-"))
    try:
        built = scratch / "atlas"
        _build_experiment(str(built), schema, lineage)
        # Members are stored with relative URIs, so the renamed experiment opens in place.
        os.replace(built, target)
    except OSError as exc:
        raise AtlasError(f"cannot create the atlas: {exc.strerror}", where=uri,
                         hint="the path must not exist or be an empty folder") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build_experiment(uri: str, schema: AtlasSchema, lineage: str) -> None:
    """Every array exists before any ingest: a writer that created one would race the others."""
    with soma.Experiment.create(uri, context=engine.ctx()) as exp:
        exp.add_new_dataframe("obs", schema=_obs_schema(schema), domain=((0, 0),))
        ms = exp.add_new_collection("ms")
        rna = ms.add_new_collection(schema.measurement, soma.Measurement)
        rna.add_new_dataframe("var", schema=var_schema(schema), domain=((0, 0),))
        x = rna.add_new_collection("X")
        for layer in schema.layers:
            # Shapes start at 1 (the minimum); resize_obs and extend_var grow them.
            x.add_new_sparse_ndarray(layer.name, type=ARROW[layer.type], shape=(1, 1),
                                     platform_config=engine.X_CREATE[layer.optimize])
        _add_sample_arrays(exp, rna)
    with soma.Experiment.open(uri, "w", context=engine.ctx()) as exp:  # last: marks the atlas complete
        exp.metadata[STRUCTURE_KEY] = schema.structure
        exp.metadata[LINEAGE_KEY] = lineage
        exp.metadata[PRESENCE_KEY] = "1"


def add_sample_arrays(uri: str, schema: AtlasSchema) -> None:
    """Create the samples table and presence matrix in an atlas made before them (idempotent)."""
    with soma.Experiment.open(uri, "w", context=engine.ctx()) as exp:
        _add_sample_arrays(exp, exp.ms[schema.measurement])


def _add_sample_arrays(exp: soma.Experiment, ms: soma.Measurement) -> None:
    """The samples table and the feature presence matrix, where missing (atlases made before them lack them)."""
    if SAMPLES not in exp:
        exp.add_new_dataframe(SAMPLES, schema=SAMPLES_SCHEMA, domain=((0, 0),))
    if PRESENCE not in ms:
        ms.add_new_sparse_ndarray(PRESENCE, type=pa.bool_(), shape=(1, 1))


def _obs_schema(schema: AtlasSchema) -> pa.Schema:
    return pa.schema([("soma_joinid", pa.int64()), ("obs_id", pa.large_string()),
                      *((c.name, ARROW[c.type]) for c in schema.obs)])


def var_schema(schema: AtlasSchema) -> pa.Schema:
    return pa.schema([("soma_joinid", pa.int64()), ("var_id", pa.large_string()),
                      *((c.name, ARROW[c.type]) for c in schema.var)])


def obs_table(obs: pd.DataFrame, schema: AtlasSchema, start: int) -> pa.Table:
    """A sample's obs (index obs_id) as the atlas' obs rows at soma_joinids [start, start+n)."""
    # anndata stores string columns as categoricals; the atlas holds them as plain strings.
    columns = {c.name: pa.array(obs[c.name].to_numpy(dtype=object if c.type == "string" else None),
                                type=ARROW[c.type]) for c in schema.obs}
    joinids = pa.array(np.arange(start, start + len(obs), dtype=np.int64))
    return pa.table({"soma_joinid": joinids, "obs_id": pa.array(obs.index.astype(str), pa.large_string()), **columns},
                    schema=_obs_schema(schema))


def read_structure(uri: str) -> str | None:
    with open_experiment(uri) as exp:
        return exp.metadata.get(STRUCTURE_KEY)


def read_lineage(uri: str) -> str | None:
    """The lineage of the state file the atlas was created with."""
    with open_experiment(uri) as exp:
        return exp.metadata.get(LINEAGE_KEY)


def presence_complete(uri: str) -> bool:
    """Whether the atlas has the samples table and presence matrix, filled for every ingested sample."""
    with open_experiment(uri) as exp:
        return exp.metadata.get(PRESENCE_KEY) == "1"


def mark_presence_complete(uri: str) -> None:
    with soma.Experiment.open(uri, "w", context=engine.ctx()) as exp:
        exp.metadata[PRESENCE_KEY] = "1"


def column_names(uri: str, schema: AtlasSchema) -> tuple[list[str], list[str], list[str]]:
    """obs column names, var column names and X layer names as they are on disk."""
    with open_experiment(uri) as exp:
        ms = exp.ms[schema.measurement] if schema.measurement in exp.ms else None
        var = list(ms.var.schema.names) if ms is not None else []
        layers = list(ms.X.keys()) if ms is not None and "X" in ms else []
        return list(exp.obs.schema.names), var, layers


def open_experiment(uri: str, timestamp: int | None = None) -> soma.Experiment:
    """The experiment, read-only; with `timestamp` (ms), as it was at that moment (TileDB time travel)."""
    try:
        return soma.Experiment.open(uri, tiledb_timestamp=timestamp, context=engine.ctx())
    except soma.DoesNotExistError:
        raise AtlasError("no atlas here", where=uri, hint="run apply to create it") from None


def members(uri: str, schema: AtlasSchema) -> Members:
    return _members_of(uri, schema.measurement, tuple(layer.name for layer in schema.layers))


@functools.lru_cache(maxsize=64)
def _members_of(uri: str, measurement: str, layers: tuple[str, ...]) -> Members:
    # Cached: opening the experiment took 10-40 ms, several times per ingest. Member URIs never change
    # for an atlas URI (an atlas rebuilt there names its members the same way); a failure is not cached.
    with open_experiment(uri) as exp:
        try:
            ms = exp.ms[measurement]
            return Members(obs=exp.obs.uri, var=ms.var.uri, layers={name: ms.X[name].uri for name in layers})
        except KeyError as exc:
            raise AtlasError(f"the atlas has no {exc}", where=uri,
                             hint="it was created with another schema structure") from None


def sample_members(uri: str, schema: AtlasSchema) -> tuple[str, str]:
    """URIs of the samples table and the presence matrix."""
    return _sample_members_of(uri, schema.measurement)


@functools.lru_cache(maxsize=64)
def _sample_members_of(uri: str, measurement: str) -> tuple[str, str]:
    # Cached as _members_of is (14 ms an ingest); an atlas without them yet raises, which is not cached.
    with open_experiment(uri) as exp:
        table, presence = sample_arrays(exp, measurement, where=uri)
        return table.uri, presence.uri


def sample_arrays(exp: soma.Experiment, measurement: str, *, where: str
                  ) -> tuple[soma.DataFrame, soma.SparseNDArray]:
    """The samples table and the presence matrix of an open experiment (at `where`, for the error)."""
    ms = exp.ms[measurement]
    if SAMPLES not in exp or PRESENCE not in ms:
        raise AtlasError("the atlas has no samples table or feature presence matrix", where=where,
                         hint="run apply: it adds them to atlases made before them")
    return exp[SAMPLES], ms[PRESENCE]

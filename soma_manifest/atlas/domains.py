"""The arrays' domains and the var rows: what the atlas has room for, and growing it.

The caller allocates joinids: each sample owns a contiguous obs range `[start, start+n)` and domains are
grown once, serially, before parallel ingests write disjoint ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import tiledbsoma as soma

from soma_manifest.atlas import clock, engine, layout
from soma_manifest.errors import AtlasError
from soma_manifest.schema import AtlasSchema


@dataclass
class Room:
    """What the atlas' domains hold now. apply allocates within it while ingests run: growing a domain
    writes a new array schema, which a worker opening that array at the same moment may read empty."""

    cells: int  # obs and every X layer's dim 0
    samples: int  # the samples table and the presence matrix's dim 0
    genes: set[str]  # var ids in var


def room(uri: str, schema: AtlasSchema) -> Room:
    members = layout.members(uri, schema)
    samples_uri, presence_uri = layout.sample_members(uri, schema)
    ctx = engine.ctx()
    with soma.DataFrame.open(members.obs, context=ctx) as obs, \
            soma.DataFrame.open(members.var, context=ctx) as var, \
            soma.DataFrame.open(samples_uri, context=ctx) as table, \
            soma.SparseNDArray.open(presence_uri, context=ctx) as presence:
        cells = [df_size(obs)]
        for layer_uri in members.layers.values():
            with soma.SparseNDArray.open(layer_uri, context=ctx) as x:
                cells.append(x.shape[0])
        return Room(cells=min(cells), samples=min(df_size(table), presence.shape[0]),
                    genes=set(_var_ids(var).index))


def df_size(df: soma.DataFrame) -> int:
    """Rows the soma_joinid domain can hold."""
    return df.domain[0][1] + 1


def read_var_ids(uri: str, schema: AtlasSchema) -> pd.Series:
    """var_id -> soma_joinid (int64)."""
    with soma.DataFrame.open(layout.members(uri, schema).var, context=engine.ctx()) as var:
        return _var_ids(var)


def _var_ids(var: soma.DataFrame) -> pd.Series:
    table = var.read(column_names=["soma_joinid", "var_id"]).concat()
    return pd.Series(table["soma_joinid"].to_numpy(), index=pd.Index(table["var_id"].to_numpy(), name="var_id"),
                     name="soma_joinid", dtype="int64")


def extend_var(uri: str, schema: AtlasSchema, genes: pd.DataFrame) -> int:
    """Append the genes not yet in var (in the given order); grow var and X to fit. Returns the var count."""
    if genes.index.has_duplicates:
        raise AtlasError("duplicate gene ids in the genes to add", where=uri)
    members = layout.members(uri, schema)
    with soma.DataFrame.open(members.var, context=engine.ctx()) as var:
        known = _var_ids(var)
    new = genes.loc[~genes.index.isin(known.index), [c.name for c in schema.var]]
    first = int(known.max()) + 1 if len(known) else 0
    total = first + len(new)
    if total > engine.VAR_TILE:
        raise AtlasError(f"{total} genes exceed the atlas' limit of {engine.VAR_TILE}", where=uri,
                         hint="restrict genes.feature_types in the schema")
    with clock.mutation() as stamp:
        # Grow first: a crash then leaves room but no rows, and the re-run appends the same genes.
        _grow(members, stamp, n_obs=0, n_var=total)
        if len(new):
            table = pa.Table.from_pandas(
                new.assign(soma_joinid=np.arange(first, total, dtype=np.int64), var_id=new.index.astype(str)),
                schema=layout.var_schema(schema), preserve_index=False)
            with soma.DataFrame.open(members.var, "w", tiledb_timestamp=stamp, context=engine.ctx()) as var:
                var.write(table)
    return total


def resize_obs(uri: str, schema: AtlasSchema, n_obs: int) -> None:
    """Grow obs and every X layer's dim 0 to hold at least n_obs cells (never shrinks)."""
    with clock.mutation() as stamp:
        _grow(layout.members(uri, schema), stamp, n_obs=n_obs, n_var=0)


def _grow(members: layout.Members, stamp: int, *, n_obs: int, n_var: int) -> None:
    """Grow domains that are smaller than asked; the other axis is left as it is."""
    for uri, n in ((members.obs, n_obs), (members.var, n_var)):
        with soma.DataFrame.open(uri, "w", tiledb_timestamp=stamp, context=engine.ctx()) as df:
            if df_size(df) < n:
                df.tiledbsoma_resize_soma_joinid_shape(n)
    for uri in members.layers.values():
        with soma.SparseNDArray.open(uri, "w", tiledb_timestamp=stamp, context=engine.ctx()) as x:
            shape = (max(x.shape[0], n_obs), max(x.shape[1], n_var))
            if shape != x.shape:
                x.resize(shape)


def resize_samples(uri: str, schema: AtlasSchema, n_samples: int) -> None:
    """Grow the samples table to n_samples rows and the presence matrix to n_samples x the var domain."""
    samples_uri, presence_uri = layout.sample_members(uri, schema)
    with soma.DataFrame.open(layout.members(uri, schema).var, context=engine.ctx()) as var:
        n_var = df_size(var)
    with clock.mutation() as stamp:
        with soma.DataFrame.open(samples_uri, "w", tiledb_timestamp=stamp, context=engine.ctx()) as table:
            if df_size(table) < n_samples:
                table.tiledbsoma_resize_soma_joinid_shape(n_samples)
        with soma.SparseNDArray.open(presence_uri, "w", tiledb_timestamp=stamp, context=engine.ctx()) as presence:
            shape = (max(presence.shape[0], n_samples), max(presence.shape[1], n_var))
            if shape != presence.shape:
                presence.resize(shape)


def check_room(uri: str, members: layout.Members, stop: int, n_var: int) -> None:
    """Refuse, before writing anything, an ingest the domains cannot hold."""
    with soma.DataFrame.open(members.obs, context=engine.ctx()) as obs:
        small = [f"obs holds {df_size(obs)}"] if df_size(obs) < stop else []
    for name, layer_uri in members.layers.items():
        with soma.SparseNDArray.open(layer_uri, context=engine.ctx()) as x:
            if x.shape[0] < stop or x.shape[1] < n_var:
                small.append(f"X[{name}] is {x.shape[0]}x{x.shape[1]}")
    if small:
        raise AtlasError(f"the atlas is too small for cells up to {stop} and {n_var} genes: {'; '.join(small)}",
                         where=uri, hint="resize_obs and extend_var must run before ingest")

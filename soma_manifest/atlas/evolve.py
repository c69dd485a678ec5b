"""Schema evolution in place: obs/var columns added or dropped, X layers added (and computed per sample from
the counts the atlas holds) or dropped, and the structure fingerprint the atlas records.

Time travel: TileDB keeps every schema version and every group membership change with its timestamp, so the
atlas opened at a timestamp before a change reads the columns and layers it had then (README, "Changing the
schema of an existing atlas"). A dropped layer's array stays on disk for those reads.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import tiledbsoma as soma

from soma_manifest.atlas import clock, engine, layout
from soma_manifest.atlas.chunks import row_totals
from soma_manifest.errors import AtlasError
from soma_manifest.faults import pause_point
from soma_manifest.schema import AtlasSchema, Layer


def _uris(uri: str, schema: AtlasSchema) -> tuple[str, str, str]:
    """obs, var and X collection URIs (without the layers: the schema may name layers not created yet)."""
    with layout.open_experiment(uri) as exp:
        ms = exp.ms[schema.measurement]
        return exp.obs.uri, ms.var.uri, ms.X.uri


def evolve_columns(uri: str, schema: AtlasSchema, what: str, *, add: dict[str, str], drop: list[str]) -> None:
    """Add (name -> type) and drop obs or var columns; those already added or dropped are skipped, so a
    change an interrupted apply made halfway is finished by the next."""
    obs_uri, var_uri, _ = _uris(uri, schema)
    df_uri = obs_uri if what == "obs" else var_uri
    with soma.DataFrame.open(df_uri, context=engine.ctx()) as df:
        names = set(df.schema.names)
    add = {n: t for n, t in add.items() if n not in names}
    drop = [n for n in drop if n in names]
    if add or drop:
        engine.evolve_dataframe(df_uri, add=add, drop=drop)


def add_layer(uri: str, schema: AtlasSchema, layer: Layer) -> None:
    """Create the (empty) layer with the counts layer's shape, unless it exists (idempotent)."""
    _, _, x_uri = _uris(uri, schema)
    with layout.open_experiment(uri) as exp:
        x = exp.ms[schema.measurement].X
        if layer.name in x:
            return
        shape = x[schema.counts_layer.name].shape
    with clock.mutation() as stamp, soma.Collection.open(x_uri, "w", tiledb_timestamp=stamp,
                                                         context=engine.ctx()) as x:
        x.add_new_sparse_ndarray(layer.name, type=layout.ARROW[layer.type], shape=shape,
                                 platform_config=engine.X_CREATE[layer.optimize])


def drop_layer(uri: str, schema: AtlasSchema, name: str) -> None:
    """Take the layer out of the measurement (its array stays on disk, readable at earlier timestamps)."""
    _, _, x_uri = _uris(uri, schema)
    with clock.mutation() as stamp, soma.Collection.open(x_uri, "d", tiledb_timestamp=stamp,
                                                         context=engine.ctx()) as x:
        if name in x:
            del x[name]


def write_layer(uri: str, schema: AtlasSchema, name: str, start: int, stop: int, *,
                fence: Callable[[], None] = clock.no_fence) -> int:
    """Compute layer `name` for cells [start, stop) from the counts the atlas holds, and write it; returns
    the entries written. The values are those an ingest writes (atlas.ingest._write_chunk): counts per 10k
    of each cell's total, and their log1p."""
    layer = next(layer for layer in schema.layers if layer.name == name)
    members = layout.members(uri, schema)
    with soma.SparseNDArray.open(members.layers[schema.counts_layer.name], context=engine.ctx()) as counts:
        table = counts.read((slice(start, stop - 1),)).tables().concat()
    if layer.source == "counts":
        raise AtlasError(f"layer {name} holds counts: it cannot be computed in place", where=uri,
                         hint="the atlas' counts are in its counts layer")
    rows = table["soma_dim_0"].to_numpy()
    cols = table["soma_dim_1"].to_numpy()
    # The layer's global order ((cell, gene), or (gene, cell) for a gene-optimized layer), so the write skips
    # TileDB's sort and its checks, as an ingest's does (engine.GLOBAL_ORDER, engine.x_writer_ctx).
    # An unordered read of a consolidated or once-written range mostly comes in (cell, gene) order already:
    # checking that is one pass, a sort of 7.8M entries took 1.2 s.
    key = (rows - start) * (int(cols.max(initial=0)) + 1) + cols if layer.optimize == "cells" \
        else cols * (stop - start) + (rows - start)
    data = table["soma_data"].to_numpy()
    if not bool(np.all(key[1:] > key[:-1])):
        order = np.argsort(key, kind="stable")
        rows, cols, data = rows[order], cols[order], data[order]
    totals = row_totals(rows - start, data, stop - start)[rows - start]
    values = data / totals * 1e4
    if layer.source == "log1p":
        values = np.log1p(values)
    out = pa.table({"soma_dim_0": rows, "soma_dim_1": cols, "soma_data": values.astype(layer.type, copy=False)})
    with clock.mutation() as stamp, soma.SparseNDArray.open(members.layers[name], "w", tiledb_timestamp=stamp,
                                                            context=engine.x_writer_ctx()) as x:
        fence()  # after the stamp is fixed, as ingest's: a takeover after it rewrites the sample later
        pause_point("write_layer_fenced")
        if len(out):
            x.write(out, platform_config=engine.GLOBAL_ORDER)
    return len(out)


def set_structure(uri: str, schema: AtlasSchema) -> None:
    """Record the schema's structure fingerprint in the atlas (once every change of it is made)."""
    with soma.Experiment.open(uri, "w", context=engine.ctx()) as exp:
        exp.metadata[layout.STRUCTURE_KEY] = schema.structure

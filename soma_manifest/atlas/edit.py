"""Deleting a sample's obs range and rewriting its obs rows in place."""

from __future__ import annotations

from collections.abc import Callable

import tiledbsoma as soma

from soma_manifest.atlas import clock, engine, layout
from soma_manifest.atlas.checks import RangeStats, obs_rows_as_written, read_slices
from soma_manifest.atlas.domains import df_size
from soma_manifest.errors import AtlasError
from soma_manifest.faults import pause_point
from soma_manifest.h5ad import read_sample_obs
from soma_manifest.schema import AtlasSchema


def delete_obs_range(uri: str, schema: AtlasSchema, start: int, stop: int) -> None:
    """Delete rows [start, stop) from obs and every X layer; the next write is visible."""
    if stop <= start:
        return
    members = layout.members(uri, schema)
    # Per-array slices (not obs_axis_delete, which looks up obs first) also remove X
    # entries whose obs rows are missing, e.g. after a crashed ingest.
    with clock.mutation() as stamp:
        with soma.DataFrame.open(members.obs, "d", tiledb_timestamp=stamp, context=engine.ctx()) as obs:
            if start < df_size(obs):
                obs.delete_cells((slice(start, min(stop, df_size(obs)) - 1),))
        for layer_uri in members.layers.values():
            with soma.SparseNDArray.open(layer_uri, "d", tiledb_timestamp=stamp, context=engine.ctx()) as x:
                if start < x.shape[0]:
                    x.delete_cells((slice(start, min(stop, x.shape[0]) - 1),))


def update_obs(uri: str, schema: AtlasSchema, h5ad: str, start: int, *,
               fence: Callable[[], None] = clock.no_fence) -> RangeStats:
    """Overwrite obs rows [start, start+n) with the h5ad's obs (same obs_ids); X is untouched. Returns the rows as
    read back after the write (checks.obs_rows_as_written: X not read). `fence` as for ingest_h5ad."""
    table = layout.obs_table(read_sample_obs(h5ad, schema), schema, start)
    n = len(table)
    members = layout.members(uri, schema)
    with soma.DataFrame.open(members.obs, context=engine.ctx()) as obs:
        current = read_slices(obs, [(start, start + n)], ["obs_id"])["obs_id"]
    if not current.equals(table["obs_id"]):
        raise AtlasError(f"rows {start}..{start + n} do not hold the cells of {h5ad}", where=uri,
                         hint="re-ingest the sample instead of updating its obs")
    with clock.mutation() as stamp, \
            soma.DataFrame.open(members.obs, "w", tiledb_timestamp=stamp, context=engine.ctx()) as obs:
        fence()
        pause_point("write_obs_fenced")  # tests: a step held between its lease check and its write
        obs.write(table)
    with soma.DataFrame.open(members.obs, context=engine.ctx()) as obs:
        return obs_rows_as_written(obs, table, start)

"""The atlas: one TileDB-SOMA Experiment, one module per concept. Imports run one way, each module using only
those listed before it:

- `engine`: every use of tiledbsoma's private API and the TileDB settings (contexts, X tiling, consolidation)
- `clock`: write timestamps (`mutation`), so that a later mutation always gets a later timestamp
- `layout`: creating the experiment, its members, Arrow schemas and metadata
- `domains`: var rows, and the room the domains hold (grown serially before parallel ingests)
- `checks`: cells, obs ids and X entries per obs range, and what lies outside the ranges (verify)
- `samples`: the samples table and the feature presence matrix
- `chunks`: X chunks in TileDB's global order, checked where TileDB is told not to check
- `ingest`: writing a sample's cells; `edit`: deleting a range, rewriting obs
- `evolve`: schema evolution in place (columns and layers added or dropped, a new layer computed per sample)
- `read`: reading as a user does; `fragments`: counting and consolidating fragments (compaction)

The names below are the package's interface: `from soma_manifest import atlas; atlas.ingest_sample(...)`.
"""

from soma_manifest.atlas.checks import RangeStats, count_x_outside, obs_joinids_outside, range_stats, x_columns
from soma_manifest.atlas.clock import settled_timestamp
from soma_manifest.atlas.engine import READER_SETTINGS, TRUSTED_ORDER, context
from soma_manifest.atlas.domains import Room, extend_var, read_var_ids, resize_obs, resize_samples, room
from soma_manifest.atlas.edit import delete_obs_range, update_obs
from soma_manifest.atlas.evolve import add_layer, drop_layer, evolve_columns, set_structure, write_layer
from soma_manifest.atlas.fragments import (
    array_uris,
    columns_dropped_since,
    consolidate_array,
    delete_timestamps,
    fragment_count,
)
from soma_manifest.atlas.ingest import IngestStats, Member, ingest_group, ingest_h5ad, ingest_sample
from soma_manifest.atlas.layout import (
    LINEAGE_KEY,
    PRESENCE,
    PRESENCE_KEY,
    SAMPLES,
    STRUCTURE_KEY,
    add_sample_arrays,
    atlas_exists,
    column_names,
    create_atlas,
    mark_presence_complete,
    open_experiment,
    presence_complete,
    read_lineage,
    read_structure,
)
from soma_manifest.atlas.read import Overview, overview, read_sample, var_joinids
from soma_manifest.atlas.samples import (
    delete_samples,
    read_presence,
    read_presence_rows,
    read_samples_table,
    write_sample,
)

# The intermediate h5ad's readers, under the names apply.py and verify.py call them by (h5ad.py owns them).
from soma_manifest.h5ad import measured_genes, var_rows
from soma_manifest.h5ad import read_var as read_h5ad_var

__all__ = [
    "LINEAGE_KEY", "PRESENCE", "PRESENCE_KEY", "READER_SETTINGS", "SAMPLES", "STRUCTURE_KEY", "TRUSTED_ORDER",
    "IngestStats", "Member", "Overview", "RangeStats", "Room",
    "add_layer", "add_sample_arrays", "array_uris", "atlas_exists", "column_names", "columns_dropped_since",
    "consolidate_array", "context", "count_x_outside", "create_atlas", "delete_obs_range", "delete_samples",
    "delete_timestamps", "drop_layer", "evolve_columns", "extend_var", "fragment_count", "ingest_group",
    "ingest_h5ad", "ingest_sample", "mark_presence_complete", "measured_genes", "obs_joinids_outside",
    "open_experiment", "overview", "presence_complete", "range_stats", "read_h5ad_var", "read_lineage",
    "read_presence", "read_presence_rows", "read_sample", "read_samples_table", "read_structure", "read_var_ids",
    "resize_obs", "resize_samples", "room", "set_structure", "settled_timestamp", "update_obs", "var_joinids",
    "var_rows", "write_layer", "write_sample", "x_columns",
]

"""Migration of atlases made by earlier versions, run by the next apply: today one, adding the samples table
and feature presence matrix to atlases made before them.

Runs serially under the lock, before the plan is executed. Every ingested sample gets a sample joinid
(recorded in the state first), then its rows are written from its h5ad; only then is the atlas marked
complete, so a killed upgrade simply runs again (the writes are idempotent).
"""

from __future__ import annotations

import logging

from soma_manifest import atlas, storage
from soma_manifest.manifest import LoadedManifest
from soma_manifest.schema import AtlasSchema
from soma_manifest.state import State, save_state

log = logging.getLogger("soma_manifest")


def upgrade(manifest: LoadedManifest, schema: AtlasSchema, state: State) -> None:
    """Give an existing atlas without them a samples table and presence matrix filled for its samples.

    A sample whose h5ad is gone or of another version than the atlas holds cannot be filled from it:
    it is marked failed, so that the next plan re-ingests it (which writes its rows).
    """
    uri = str(manifest.atlas_uri)
    if not atlas.atlas_exists(uri) or atlas.presence_complete(uri):
        return
    atlas.add_sample_arrays(uri, schema)
    filled = []
    for key, entry in sorted(state.samples.items()):
        if entry.ingest != "done" or entry.joinids is None:
            continue
        current = (entry.raw_digest, entry.conversion) == (entry.atlas_raw_digest, entry.atlas_conversion)
        if entry.h5ad and storage.exists(storage.Location(entry.h5ad)) and current:
            if entry.sample_joinid is None:
                state.allocate_sample(entry)
            filled.append((key, entry))
        else:
            entry.mark_failed("ingest", "no feature presence row: its h5ad is missing or of another version; "
                                        "apply re-ingests it")
    save_state(state, manifest.state_path)
    atlas.resize_samples(uri, schema, state.next_sample_joinid)
    for key, entry in filled:
        atlas.write_sample(uri, schema, entry.sample_joinid, key, entry.h5ad, entry.joinids[0])
    atlas.mark_presence_complete(uri)
    log.info("added the samples table and feature presence matrix to %s (%d samples)", uri, len(filled))

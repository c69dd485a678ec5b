"""The atlas' own metadata keys, and the checks an apply with no changes makes from them without importing the
storage engine (importing tiledbsoma costs ~1.5 s, five times a no-op plan)."""

from __future__ import annotations

from soma_manifest.errors import StateError
from soma_manifest.manifest import LoadedManifest
from soma_manifest.state import State
from soma_manifest.storage.tiledb_meta import group_metadata

STRUCTURE_KEY = "soma_manifest.structure"
LINEAGE_KEY = "soma_manifest.lineage"
PRESENCE_KEY = "soma_manifest.feature_presence"
_EXPERIMENT = ("soma_object_type", "SOMAExperiment")


def check_lineage(manifest: LoadedManifest, state: State, lineage: str | None) -> None:
    """Refuse a state file that belongs to another atlas than the one at the manifest's atlas URI."""
    if lineage is not None and lineage != state.lineage:
        raise StateError(f"this state file belongs to another atlas (lineage {state.lineage}, the atlas at "
                         f"{manifest.atlas_uri} has {lineage})", where=manifest.state_path,
                         hint="point storage.state at the state file of this atlas")


def nothing_to_do(manifest: LoadedManifest, state: State | None) -> bool:
    """Whether an apply whose plan has no changes has nothing left to do either, told from the atlas' metadata
    files: the atlas is complete (an experiment with its lineage), of this state's lineage (else the same
    StateError as verify.open_state), has its samples table and presence matrix (else migrate.upgrade must
    add them), and no compaction is pending. False when that cannot be told here: the caller then makes the
    full checks through the storage engine."""
    if state is None or state.compaction.pending:
        return False
    meta = group_metadata(manifest.atlas_uri)
    if meta is None or meta.get(_EXPERIMENT[0]) != _EXPERIMENT[1] or LINEAGE_KEY not in meta:
        return False
    check_lineage(manifest, state, meta[LINEAGE_KEY])
    return meta.get(PRESENCE_KEY) == "1"

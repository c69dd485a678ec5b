"""What every group of Atlas operations builds on: the manifest and schema, the state, and opening the
experiment now or as an earlier apply left it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from soma_manifest.errors import StateError
from soma_manifest.manifest import LoadedManifest
from soma_manifest.schema import AtlasSchema
from soma_manifest.state import State, load_state

if TYPE_CHECKING:
    import tiledbsoma


@dataclass(frozen=True)
class AtlasBase:
    """What `Atlas` and each group of its operations share: the manifest and schema (its fields), the state."""

    manifest: LoadedManifest
    schema: AtlasSchema

    @property
    def uri(self) -> str:
        """Where the TileDB-SOMA Experiment lives."""
        return str(self.manifest.atlas_uri)

    @property
    def state(self) -> State | None:
        """The state file as it is now on disk; None before the first apply."""
        return load_state(self.manifest.state_path)

    def require_state(self) -> State:
        """The state; StateError when there is none yet."""
        state = self.state
        if state is None:
            raise StateError("no state file yet", where=self.manifest.state_path,
                             hint="run `soma-manifest apply` first")
        return state

    def _serial(self, serial: int | None, tag: str | None) -> int | None:
        """The serial to read, from a serial or a tag (None: now)."""
        from soma_manifest.tags import resolve

        return resolve(self.require_state(), serial, tag) if tag is not None else serial

    def _experiment(self, serial: int | None = None) -> tiledbsoma.Experiment:
        # The one place that opens the experiment for reading: now, or as of an earlier apply.
        from soma_manifest.atlas import open_experiment
        from soma_manifest.history import timestamp_of

        timestamp = timestamp_of(self.require_state(), serial) if serial is not None else None
        return open_experiment(self.uri, timestamp)

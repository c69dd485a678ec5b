"""Room in the atlas for the samples ready to ingest: fresh joinid ranges and sample joinids, new genes
appended to var, the obs and samples domains grown. The coordinator's serial work, one saved state per batch.

A resize writes a new array schema file, and a worker that opens the array while TileDB writes that file
reads it empty ("Read exceeds file size ... file_size 0") and fails its sample. So a batch that needs a
domain to grow (or var to extend, or a delete) waits until no ingest or obs update is in flight (`fits`).
Growing the cells and samples domains ahead, for the samples still to come, makes such batches rare:
usually the first, and one for each sample with new genes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from soma_manifest import atlas
from soma_manifest.apply.run import Run
from soma_manifest.faults import crash_point
from soma_manifest.plan import Action

if TYPE_CHECKING:
    import pandas as pd


class Allocator:
    """Allocates for one run; knows the atlas' room (read once, then kept up to date) and each ready sample's genes."""

    def __init__(self, run: Run, to_allocate: int) -> None:
        self.run = run
        self.unallocated = to_allocate  # ingests without a range yet: the room to grow ahead for
        self.room: atlas.Room | None = None
        self.genes: dict[str, pd.DataFrame] = {}  # each converted, not yet allocated sample's var rows

    def converted(self, key: str, var: pd.DataFrame | None) -> None:
        """A sample's conversion arrived: keep its var rows (a metadata update has none: its h5ad has them)."""
        if var is not None:
            self.genes[key] = atlas.var_rows(var, self.run.schema)

    def not_coming(self, samples: int) -> None:
        """These samples will not be ingested in this run (their conversion failed)."""
        self.unallocated -= samples

    def again(self, samples: int) -> None:
        """These samples, allocated already, will be allocated again (their grouped ingest failed)."""
        self.unallocated += samples

    def fits(self, ready: list[Action]) -> bool:
        """Whether the batch can be allocated without a schema change or a delete (see the module)."""
        run = self.run
        if run.state.orphans or run.state.orphan_samples:
            return False
        ingests = [run.state.samples[a.key] for a in ready if a.ingests]
        if any(e.holds_range or e.sample_joinid is not None for e in ingests):
            return False  # allocating retires an old range or sample row, to be deleted
        room = self._room()
        cells = sum(e.cells or 0 for e in ingests)
        return (run.state.next_joinid + cells <= room.cells
                and run.state.next_sample_joinid + len(ingests) <= room.samples
                and all(room.genes.issuperset(self._var(a.key).index) for a in ready if a.ingests))

    def allocate(self, ready: list[Action], *, converting: bool) -> list[Action]:
        """Give each sample a fresh joinid range (its old one becomes an orphan), extend var, grow; save.
        `converting`: conversions are still running (a kill point of its own)."""
        run = self.run
        if not ready:
            return []
        start = time.perf_counter()
        room = self._room()
        frames = [self._var(a.key) for a in ready]
        # Set arithmetic, not Index.isin against the ~20k known ids: 80 ms a batch, most of the allocation.
        new_ids = set().union(*(frame.index for frame in frames)) - room.genes
        if new_ids:
            genes = _union(frames)
            atlas.extend_var(run.uri, run.schema, genes.loc[genes.index.isin(list(new_ids))])
            room.genes.update(new_ids)
        cells = []
        for action in ready:
            entry = run.state.samples[action.key]
            run.state.allocate_to(entry)
            cells.append(entry.cells or 0)
        self.unallocated -= len(ready)
        for action in ready:  # not needed once allocated: the coordinator holds no sample's genes beyond that
            self.genes.pop(action.key, None)
        if run.state.next_joinid > room.cells:
            # Room for the samples still to come too, at 1.25x this batch's mean: one resize, not one a batch.
            room.cells = run.state.next_joinid + int(1.25 * self.unallocated * sum(cells) / len(cells))
            atlas.resize_obs(run.uri, run.schema, room.cells)
        if run.state.next_sample_joinid > room.samples or new_ids:  # the presence matrix spans var too
            room.samples = max(room.samples, run.state.next_sample_joinid + self.unallocated)
            atlas.resize_samples(run.uri, run.schema, room.samples)
        run.save()
        run.add_seconds("allocate", start)
        crash_point("after_allocate")
        if converting:
            crash_point("overlap_allocate")
        return ready

    def _room(self) -> atlas.Room:
        if self.room is None:
            self.room = atlas.room(self.run.uri, self.run.schema)
        return self.room

    def _var(self, key: str) -> pd.DataFrame:
        """The sample's var rows: from its conversion in this run, else from its h5ad."""
        if key not in self.genes:
            self.genes[key] = atlas.read_h5ad_var(self.run.state.samples[key].h5ad, self.run.schema)
        return self.genes[key]


def _union(frames: list[pd.DataFrame]) -> pd.DataFrame:
    import pandas as pd

    merged = pd.concat(frames)
    return merged[~merged.index.duplicated(keep="first")]

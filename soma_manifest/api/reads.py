"""Atlas operations that read: the ledger, the experiment (now or at an earlier apply), summaries, AnnData
slices, the presence matrix, and verify."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from soma_manifest.api.base import AtlasBase
from soma_manifest.errors import AtlasError

if TYPE_CHECKING:
    import anndata
    import pandas as pd
    import tiledbsoma


@dataclass(frozen=True)
class AtlasSummary:
    """What the atlas holds, now or as apply `serial` left it (`Atlas.summary`)."""

    uri: str
    serial: int | None
    timestamp_ms: int | None  # the TileDB timestamp it was read at; None: now
    cells: int
    genes: int
    layers: tuple[str, ...]
    samples: dict[tuple[str, str], int]  # (study, sample) -> cells, from the obs ids
    tag: str | None = None  # the release tag it was asked by


class Reads(AtlasBase):
    """The read operations of `Atlas` (api/__init__.py composes them)."""

    def verify(self, deep: bool = False) -> list[str]:
        """Every drift between the atlas and the state, one line each; [] when they match.

        deep: also compare every sample's X and obs with its h5ad, and its X entries with its presence row.
        Raises StateError when there is no state yet.
        """
        from soma_manifest.verify import verify

        return verify(self.uri, self.schema, self.require_state(), deep=deep)

    def samples(self) -> pd.DataFrame:
        """The per-sample ledger from the state (no atlas read), indexed by "<study>/<sample>".

        Columns: study, sample, format, status (done, allocated = interrupted, none = not ingested, failed),
        cells, nnz (in the atlas once ingested, else of its h5ad), joinid_start, joinid_stop (its obs
        soma_joinids, [start, stop)), sample_joinid (its row of the samples table and of the feature presence
        matrix), converted, ingested_at, failed_step, error, h5ad.
        """
        import pandas as pd

        from soma_manifest.render import ledger_rows

        state = self.state
        rows = ledger_rows(state) if state is not None else []
        entries = state.samples if state is not None else {}
        table = pd.DataFrame.from_records([{
            "key": r["key"], "study": entries[r["key"]].study, "sample": entries[r["key"]].sample,
            "format": r["format"], "status": "failed" if r["failed_step"] else r["ingest"],
            "cells": r["cells"], "nnz": r["nnz"],
            "joinid_start": r["joinids"][0] if r["joinids"] else None,
            "joinid_stop": r["joinids"][1] if r["joinids"] else None,
            "sample_joinid": entries[r["key"]].sample_joinid,
            "converted": r["converted"], "ingested_at": r["ingested_at"], "failed_step": r["failed_step"],
            "error": r["error"], "h5ad": r["h5ad"],
        } for r in rows], columns=_SAMPLE_COLUMNS)
        for column in ("cells", "nnz", "joinid_start", "joinid_stop", "sample_joinid"):
            table[column] = table[column].astype("Int64")
        return table.set_index("key").rename_axis("sample_key")

    def open(self, serial: int | None = None, tag: str | None = None) -> tiledbsoma.Experiment:
        """The atlas as a read-only tiledbsoma.Experiment: `with atlas.open() as exp: ...`.

        serial: read the atlas exactly as apply `serial` left it (see `history()`); StateError when that
        apply is unknown or a compaction made it unreadable. tag: the apply a release tag names (see `tag`).
        """
        return self._experiment(self._serial(serial, tag))

    def summary(self, serial: int | None = None, *, tag: str | None = None) -> AtlasSummary:
        """Cells, genes, layers and cells per sample of the atlas; serial or tag: as that apply left it (see
        `history()`; StateError when that apply is unknown or a compaction made it unreadable)."""
        from soma_manifest.atlas import overview
        from soma_manifest.history import timestamp_of

        serial = self._serial(serial, tag)
        timestamp = timestamp_of(self.require_state(), serial) if serial is not None else None
        found = overview(self.uri, timestamp)
        return AtlasSummary(self.uri, serial, timestamp, found.cells, found.genes, tuple(found.layers),
                            dict(found.samples), tag)

    def to_anndata(self, samples: Sequence[str] | None = None, genes: Sequence[str] | None = None,
                   layer: str = "raw", obs_columns: Sequence[str] | None = None,
                   obs_filter: str | None = None, serial: int | None = None,
                   tag: str | None = None) -> anndata.AnnData:
        """Cells of the atlas as AnnData: obs indexed by obs_id, var by var_id, X from `layer`.

        samples: "<study>/<sample>" keys (default: all cells). genes: var ids or symbols; a symbol selects
        every var row that carries it (default: all genes). obs_columns: obs columns to read (default all).
        obs_filter: a tiledbsoma value filter on obs, e.g. "cell_type == 'T cell'". An unknown sample, gene,
        layer or column raises AtlasError. serial: read the atlas as apply `serial` left it (see `open`);
        tag: as the apply that release tag names.
        """
        import tiledbsoma as soma

        from soma_manifest.atlas import var_joinids

        layers = [x.name for x in self.schema.layers]
        if layer not in layers:
            raise AtlasError(f"no X layer '{layer}' (layers: {', '.join(layers)})", where=self.uri)
        if obs_columns is not None:
            known = {c.name for c in self.schema.obs} | {"obs_id", "soma_joinid"}
            unknown = [c for c in obs_columns if c not in known]
            if unknown:
                raise AtlasError(f"no obs column {', '.join(map(repr, unknown))}", where=self.uri)
            obs_columns = ["obs_id", *(c for c in obs_columns if c != "obs_id")]
        serial = self._serial(serial, tag)
        with self._experiment(serial) as exp:
            obs_coords = None if samples is None else (
                self._obs_joinids(samples) if serial is None else _obs_joinids_as_read(exp, samples))
            var_coords = None if genes is None else var_joinids(exp, self.schema, list(genes))
            query = exp.axis_query(
                self.schema.measurement,
                obs_query=soma.AxisQuery(coords=(obs_coords,) if obs_coords is not None else (),
                                         value_filter=obs_filter),
                var_query=soma.AxisQuery(coords=(var_coords,)) if var_coords is not None else None)
            return query.to_anndata(X_name=layer, column_names={"obs": obs_columns, "var": None},
                                    obs_id_name="obs_id", var_id_name="var_id")

    def _obs_joinids(self, keys: Sequence[str]):
        """The obs soma_joinids of these samples, from the state's ranges."""
        import numpy as np

        state = self.require_state()
        ranges = []
        for key in keys:
            entry = state.samples.get(key)
            if entry is None or entry.ingest != "done" or entry.joinids is None:
                raise AtlasError(f"no sample {key} in the atlas", where=self.uri,
                                 hint="samples are named <study>/<sample>; see atlas.samples()")
            ranges.append(np.arange(*entry.joinids, dtype=np.int64))
        return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)

    def presence(self) -> anndata.AnnData:
        """Which genes each sample measured: obs = the ingested samples (indexed by "<study>/<sample>", with
        the samples table's columns), var indexed by var_id, X = a scipy.sparse bool matrix (CSR)."""
        from soma_manifest.atlas import read_presence

        state = self.require_state()
        done = {s.sample_joinid: key for key, s in state.samples.items()
                if s.ingest == "done" and s.sample_joinid is not None}
        with self._experiment() as exp:
            return read_presence(exp, self.schema, done)


def _obs_joinids_as_read(exp: tiledbsoma.Experiment, keys: Sequence[str]):
    """The obs soma_joinids of these samples as the experiment reads (at an earlier apply, the state's
    ranges may be those of later versions): by the obs_id prefix "<study>/<sample>/"."""
    import numpy as np
    import pyarrow.compute as pc

    table = exp.obs.read(column_names=["soma_joinid", "obs_id"]).concat()
    prefix = pc.replace_substring_regex(table["obs_id"], pattern="/[^/]*$", replacement="")
    found = []
    for key in keys:
        hits = table["soma_joinid"].filter(pc.equal(prefix, key)).to_numpy()
        if not len(hits):
            raise AtlasError(f"no sample {key} in the atlas at that apply", where=exp.uri,
                             hint="samples are named <study>/<sample>; see show --serial N --summary")
        found.append(hits)
    return np.sort(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


_SAMPLE_COLUMNS = ["key", "study", "sample", "format", "status", "cells", "nnz", "joinid_start", "joinid_stop",
                   "sample_joinid", "converted", "ingested_at", "failed_step", "error", "h5ad"]

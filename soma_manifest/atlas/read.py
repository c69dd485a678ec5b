"""Reading the atlas as a user does: a sample's cells, its overall sizes, genes by id or symbol."""

from __future__ import annotations

from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import tiledbsoma as soma

from soma_manifest.atlas.layout import open_experiment
from soma_manifest.errors import AtlasError
from soma_manifest.schema import AtlasSchema


@dataclass(frozen=True)
class Overview:
    cells: int
    genes: int
    layers: tuple[str, ...]
    samples: dict[tuple[str, str], int]  # (study_name, sample_name) -> cells


def read_sample(uri: str, schema: AtlasSchema, start: int, stop: int) -> anndata.AnnData:
    """Cells [start, stop) with all genes, as a user reads them: X = counts, other layers in .layers."""
    others = [layer.name for layer in schema.layers if layer.name != schema.counts_layer.name]
    with open_experiment(uri) as exp:
        query = exp.axis_query(schema.measurement, obs_query=soma.AxisQuery(coords=(slice(start, stop - 1),)))
        return query.to_anndata(X_name=schema.counts_layer.name, X_layers=others,
                                obs_id_name="obs_id", var_id_name="var_id")


def overview(uri: str, timestamp: int | None = None) -> Overview:
    """Sizes of the atlas (as it was at `timestamp`, by default now) and its cells per (study, sample),
    parsed from obs_id."""
    with open_experiment(uri, timestamp) as exp:
        obs_ids = exp.obs.read(column_names=["obs_id"]).concat()["obs_id"]
        (ms,) = exp.ms.values()
        genes = ms.var.count
        layers = tuple(ms.X.keys())
    # obs_id = "<study>/<sample>/<barcode>": strip the barcode, count, split the rest.
    per_sample = pc.value_counts(pc.replace_substring_regex(obs_ids, pattern="/[^/]*$", replacement=""))
    samples = {tuple(key.split("/", 1)): n for key, n in zip(per_sample.field("values").to_pylist(),
                                                             per_sample.field("counts").to_pylist())}
    return Overview(cells=len(obs_ids), genes=genes, layers=layers, samples=samples)


def var_joinids(exp: soma.Experiment, schema: AtlasSchema, genes: list[str]) -> np.ndarray:
    """The var joinids of genes given by id or symbol (a symbol: every row carrying it), sorted."""
    symbol = next((c.name for c in schema.var if c.source == "feature_name"), None)
    var = exp.ms[schema.measurement].var
    table = var.read(column_names=["soma_joinid", "var_id", *([symbol] if symbol else [])]).concat().to_pandas()
    wanted = pd.Series(genes, dtype=object)
    hit = table["var_id"].isin(wanted) | (table[symbol].isin(wanted) if symbol else False)
    found = set(table["var_id"]) | (set(table[symbol]) if symbol else set())
    unknown = [g for g in genes if g not in found]
    if unknown:
        raise AtlasError(f"{len(unknown)} gene(s) not in the atlas: {', '.join(unknown[:5])}", where=exp.uri,
                         hint="give var ids (var_id) or symbols" + (f" ({symbol})" if symbol else ""))
    return np.sort(table.loc[hit, "soma_joinid"].to_numpy(dtype=np.int64))

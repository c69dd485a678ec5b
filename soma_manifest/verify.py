"""Does the atlas really hold what the state says? Read-only checks, from cheap to deep: whether a state
and an atlas belong together at all (`open_state`), what one apply touched (`quick_verify`), everything
(`verify`, `soma-manifest verify [--deep]`)."""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from soma_manifest import atlas, storage
from soma_manifest.atlas_meta import check_lineage
from soma_manifest.errors import AtlasError, SourceError, StateError, StorageError
from soma_manifest.manifest import LoadedManifest
from soma_manifest.reports import ApplyReport
from soma_manifest.schema import AtlasSchema
from soma_manifest.state import SampleState, State


def open_state(manifest: LoadedManifest, state: State | None, schema: AtlasSchema) -> State:
    """Check that state and atlas belong together; a fresh state when there is neither."""
    uri = str(manifest.atlas_uri)
    present = atlas.atlas_exists(uri)
    if state is None:
        if present:
            raise StateError(f"the atlas {uri} exists but its state file does not", where=manifest.state_path,
                             hint=f"restore the state file (or {manifest.state_path.name}.backup), "
                                  "or point storage.state at it")
        return State(atlas=uri, structure=schema.structure, structure_summary=schema.structure_summary())
    if present:
        check_lineage(manifest, state, atlas.read_lineage(uri))
    elif any(s.ingest != "none" for s in state.samples.values()):
        raise AtlasError("the atlas is missing but the state records ingested samples", where=uri,
                         hint=f"restore the atlas folder, or move {manifest.state_path} away to rebuild from scratch")
    return state


def quick_verify(uri: str, schema: AtlasSchema, state: State, report: ApplyReport,
                 checked: dict[str, atlas.RangeStats]) -> None:
    """After an apply: check what it touched (cells, distinct obs ids and nnz per range, as the state says).
    Adds each problem to `report.verify_problems`, and the time taken to `report.seconds["verify"]`.

    The steps that wrote the ranges checked them (`checked`; see atlas.ingest_sample); one without is read here.
    """
    started = time.perf_counter()
    touched = [k for k in report.succeeded if k in state.samples and state.samples[k].ingest == "done"]
    unchecked = [k for k in touched if k not in checked]
    if unchecked:  # opening the arrays alone took 0.65 s on the S3 emulator
        stats = atlas.range_stats(uri, schema, [state.samples[k].joinids for k in unchecked])
        checked.update(zip(unchecked, stats))
    for key in touched:
        entry, got = state.samples[key], checked[key]
        start, stop = entry.joinids
        nnz = entry.atlas_nnz if got.nnz is None else got.nnz  # None: an obs-only update, which writes no X
        if (got.start, got.stop, got.cells, got.obs_ids, nnz) != (
                start, stop, entry.atlas_cells, entry.atlas_cells, entry.atlas_nnz):
            report.verify_problems.append(
                f"{key}: atlas holds {got.cells} cells ({got.obs_ids} distinct ids), {nnz} nnz in "
                f"[{got.start}, {got.stop}); the state expects {entry.atlas_cells} cells, "
                f"{entry.atlas_nnz} nnz in [{start}, {stop})")
    report.seconds["verify"] = time.perf_counter() - started


def verify(uri: str, schema: AtlasSchema, state: State, *, deep: bool = False) -> list[str]:
    """Every drift found, one readable line each; empty when the atlas matches the state."""
    if not atlas.atlas_exists(uri):
        return [f"the atlas {uri} does not exist"] if state.samples else []
    problems = _structure(uri, schema, state)
    if problems:
        return problems
    done = {k: s for k, s in sorted(state.samples.items()) if s.ingest == "done" and s.joinids}
    pending = [k for k, s in state.samples.items() if s.ingest == "allocated"]
    for key in pending:
        problems.append(f"{key}: ingest was interrupted; run apply to finish it")
    if state.orphans:
        problems.append(f"{len(state.orphans)} joinid range(s) wait for deletion; run apply")
    stats = atlas.range_stats(uri, schema, [s.joinids for s in done.values()])
    for (key, s), got in zip(done.items(), stats):
        if got.cells != s.atlas_cells or got.obs_ids != got.cells:
            problems.append(f"{key}: {got.cells} cells ({got.obs_ids} distinct obs ids) in joinids "
                            f"{s.joinids[0]}-{s.joinids[1]}, the state expects {s.atlas_cells}")
        if got.nnz != s.atlas_nnz:
            problems.append(f"{key}: {got.nnz} nonzero counts, the state expects {s.atlas_nnz}")
    if not pending and not state.orphans:  # pending ranges may hold partial copies of a sample
        problems.extend(_ids_in_place(uri, done, stats))
    known = state.known_ranges()
    outside = atlas.obs_joinids_outside(uri, known)
    if outside:
        problems.append(f"cells outside every range the state knows (orphans), e.g. joinids {outside[:5]}")
    stray = atlas.count_x_outside(uri, schema, known)
    if stray:
        problems.append(f"{stray} X entries outside every range the state knows")
    problems.extend(_presence(uri, schema, state, done, deep))
    if deep:
        for key, s in done.items():
            problems.extend(_compare_with_h5ad(uri, schema, key, s))
    return problems


def _presence(uri: str, schema: AtlasSchema, state: State, done: dict[str, SampleState], deep: bool) -> list[str]:
    """The samples table and presence matrix hold one row per ingested sample: its cells and obs range, and
    exactly the genes of its h5ad; no rows of other samples. Deep: no X entry outside its presence row."""
    if not atlas.presence_complete(uri):
        return ["the atlas has no samples table and feature presence matrix yet; run apply to add them"]
    table = atlas.read_samples_table(uri, schema)
    rows = atlas.read_presence_rows(uri, schema)
    var_ids = atlas.read_var_ids(uri, schema)
    problems = []
    for key, s in done.items():
        j = s.sample_joinid
        if j is None or j not in table.index:
            problems.append(f"{key}: no row in the samples table")
        else:
            got = table.loc[j]
            if (got["sample_id"], got["cells"], got["obs_joinid_start"], got["obs_joinid_stop"]) != \
                    (key, s.atlas_cells, *s.joinids):
                problems.append(f"{key}: its samples table row ({got['sample_id']}, {got['cells']} cells, joinids "
                                f"{got['obs_joinid_start']}-{got['obs_joinid_stop']}) differs from the state")
        if not s.h5ad:
            problems.append(f"{key}: no h5ad recorded; cannot check its feature presence row")
            continue
        try:
            genes = atlas.measured_genes(s.h5ad)
        except SourceError as exc:
            problems.append(f"{key}: cannot check its feature presence row: {exc.render()}")
            continue
        expected = np.sort(var_ids.reindex(genes.astype(str)).dropna().to_numpy(dtype=np.int64))
        present = rows.get(j, np.zeros(0, dtype=np.int64)) if j is not None else np.zeros(0, dtype=np.int64)
        if len(expected) != len(genes) or not np.array_equal(present, expected):
            problems.append(f"{key}: its feature presence row has {len(present)} genes, its h5ad {len(genes)} "
                            f"({len(np.setdiff1d(present, expected))} extra, {len(np.setdiff1d(expected, present))} "
                            "missing)")
        elif deep:
            outside = np.setdiff1d(atlas.x_columns(uri, schema, *s.joinids), present)
            if len(outside):
                problems.append(f"{key}: X has entries in {len(outside)} gene(s) outside its presence row")
    known = {s.sample_joinid for s in state.samples.values() if s.sample_joinid is not None}
    known |= set(state.orphan_samples)
    stray = sorted((set(table.index) | set(rows)) - known)
    if stray:
        problems.append(f"rows of {len(stray)} unknown sample joinid(s) in the samples table or presence matrix, "
                        f"e.g. {stray[:5]}")
    return problems


def _ids_in_place(uri: str, done: dict[str, SampleState], stats: list[atlas.RangeStats]) -> list[str]:
    """Every obs id (`<study>/<sample>/<barcode>`) lies in its own sample's range. With the per-range
    checks (distinct ids, cell counts) that makes obs ids unique over the whole atlas."""
    found = atlas.overview(uri).samples
    problems = []
    for (key, s), got in zip(done.items(), stats):
        n = found.pop((s.study, s.sample), 0)
        if n > got.cells:
            problems.append(f"{key}: {n - got.cells} cell(s) outside joinids {s.joinids[0]}-{s.joinids[1]} "
                            "carry its obs ids")
        elif n < got.cells:
            problems.append(f"{key}: {got.cells - n} cell(s) in its joinids carry obs ids of other samples")
    problems += [f"{study}/{sample}: {n} cell(s) carry obs ids of a sample the state does not know"
                 for (study, sample), n in sorted(found.items())]
    return problems


def _structure(uri: str, schema: AtlasSchema, state: State) -> list[str]:
    problems = []
    lineage = atlas.read_lineage(uri)
    if lineage is not None and lineage != state.lineage:
        problems.append(f"the atlas has lineage {lineage}, the state {state.lineage}: they do not belong together")
    if atlas.read_structure(uri) != schema.structure:
        problems.append("the atlas structure does not match the schema (columns, types or layers differ)")
    obs_cols, var_cols, layers = atlas.column_names(uri, schema)
    for name in [c.name for c in schema.obs] + ["obs_id"]:
        if name not in obs_cols:
            problems.append(f"obs column '{name}' is missing from the atlas")
    for name in [c.name for c in schema.var] + ["var_id"]:
        if name not in var_cols:
            problems.append(f"var column '{name}' is missing from the atlas")
    for layer in schema.layers:
        if layer.name not in layers:
            problems.append(f"X layer '{layer.name}' is missing from the atlas")
    return problems


def _compare_with_h5ad(uri: str, schema: AtlasSchema, key: str, s) -> list[str]:
    import anndata as ad

    if not s.h5ad:
        return [f"{key}: no h5ad recorded; cannot compare deeply"]
    try:
        with storage.local_file(s.h5ad) as local:
            expected = ad.read_h5ad(local)
    except (OSError, StorageError) as exc:
        return [f"{key}: cannot read its h5ad {s.h5ad}: {exc}"]
    got = atlas.read_sample(uri, schema, *s.joinids)
    got.obs_names = got.obs["obs_id"].astype(str).to_numpy() if "obs_id" in got.obs else got.obs_names
    if sorted(got.obs_names) != sorted(expected.obs_names):
        return [f"{key}: obs ids in the atlas differ from its h5ad"]
    got = got[expected.obs_names]
    var_ids = got.var["var_id"].astype(str).to_numpy() if "var_id" in got.var else got.var_names.to_numpy()
    position = {v: i for i, v in enumerate(var_ids)}
    missing = [v for v in expected.var_names if v not in position]
    if missing:
        return [f"{key}: genes missing from the atlas var: {missing[:5]}"]
    cols = np.array([position[v] for v in expected.var_names], dtype=np.int64)
    got_x = sp.csr_matrix(got.X)
    coo = sp.coo_matrix(expected.X)
    expected_x = sp.csr_matrix((coo.data, (coo.row, cols[coo.col])), shape=got_x.shape)
    problems = []
    if (got_x != expected_x).nnz:
        problems.append(f"{key}: X counts in the atlas differ from its h5ad")
    for layer in schema.layers:
        if layer.source != "counts":
            have, want = sp.csr_matrix(got.layers[layer.name]), _derived(expected_x, layer.source, layer.type)
            if have.shape != want.shape or (have != want).nnz:
                problems.append(f"{key}: X layer '{layer.name}' differs from its counts ({layer.source})")
    for col in schema.obs:
        a = got.obs[col.name].to_numpy()
        b = expected.obs[col.name].to_numpy()
        if col.type.startswith("float"):
            same = np.allclose(a.astype(float), b.astype(float), equal_nan=True)
        else:
            same = np.array_equal(a.astype(str), b.astype(str))
        if not same:
            problems.append(f"{key}: obs column '{col.name}' differs from its h5ad")
    return problems


def _derived(counts: sp.csr_matrix, source: str, dtype: str) -> sp.csr_matrix:
    """The values a derived layer must hold for these counts: per 10k of each cell's total (as float64, as
    ingest and a layer added in place compute them), and their log1p for a log1p layer."""
    counts = sp.csr_matrix(counts)
    counts.sum_duplicates()
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    totals = np.maximum(np.bincount(rows, weights=counts.data, minlength=counts.shape[0]), 1)
    values = counts.data / totals[rows] * 1e4
    if source == "log1p":
        values = np.log1p(values)
    return sp.csr_matrix((values.astype(dtype), counts.indices, counts.indptr), shape=counts.shape)

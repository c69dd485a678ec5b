"""soma_manifest.atlas against real tiledbsoma, on small generated intermediate h5ads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from loky import get_reusable_executor

from soma_manifest import atlas
from soma_manifest.atlas import checks, clock
from soma_manifest.errors import AtlasError, SourceError
from soma_manifest.schema import AtlasSchema, load_schema

DEFAULT_SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "default.yaml"
GENES = [f"ENSG{i:03d}" for i in range(30)]


@pytest.fixture(scope="module")
def schema() -> AtlasSchema:
    """The default schema plus a bool obs column, the two derived layers and gene-optimized copies."""
    doc = load_schema(DEFAULT_SCHEMA).model_dump(by_alias=True)
    doc["obs"] = [*doc["obs"], {"name": "is_doublet", "type": "bool", "source": "cell_metadata", "default": False}]
    doc["layers"] = [{"name": "raw", "type": "int32", "source": "counts"},
                     {"name": "norm", "type": "float32", "source": "normalized"},
                     {"name": "logn", "type": "float64", "source": "log1p"},
                     {"name": "raw_g", "type": "int32", "source": "counts", "optimize": "genes"},
                     {"name": "norm_g", "type": "float32", "source": "normalized", "optimize": "genes"}]
    return AtlasSchema.model_validate(doc)


@pytest.fixture(params=["cells and genes", "cells only"])
def layouts(request: pytest.FixtureRequest, schema: AtlasSchema) -> AtlasSchema:
    """The schema, and the schema without its gene-optimized layers (X chunks then come from the sample's rows)."""
    if request.param == "cells and genes":
        return schema
    doc = schema.model_dump(by_alias=True)
    doc["layers"] = [layer for layer in doc["layers"] if layer["optimize"] == "cells"]
    return AtlasSchema.model_validate(doc)


@pytest.fixture()
def uri(tmp_path: Path, schema: AtlasSchema) -> str:
    path = str(tmp_path / "atlas")
    atlas.create_atlas(path, schema, "test-lineage")
    return path


class Sample:
    """A standardized intermediate h5ad, as the convert step writes it, and its content."""

    def __init__(self, tmp_path: Path, schema: AtlasSchema, key: str, genes: list[str], *, cells: int = 40,
                 seed: int = 0, density: float = 0.3, barcodes: list[str] | None = None) -> None:
        rng = np.random.default_rng(seed)
        study, sample = key.split("/")
        barcodes = barcodes or [f"BC{i:04d}-1" for i in range(cells)]
        counts = sp.random(len(barcodes), len(genes), density=density, format="csr", random_state=seed,
                           data_rvs=lambda k: rng.integers(1, 30, k)).astype(np.int32)
        fixed = {"barcode": barcodes, "sample_name": sample, "study_name": study}
        obs = pd.DataFrame({c.name: fixed.get(c.name, _random_column(rng, c.type, len(barcodes)))
                            for c in schema.obs}, index=[f"{key}/{b}" for b in barcodes])
        var = pd.DataFrame({"gene_symbol": [f"SYM{g}" for g in genes]}, index=genes)
        self.adata = ad.AnnData(X=counts, obs=obs, var=var)
        self.path = str(tmp_path / f"{study}__{sample}__{seed}.h5ad")
        self.adata.write_h5ad(self.path)

    @property
    def n(self) -> int:
        return self.adata.n_obs

    def with_obs(self, tmp_path: Path, **columns: object) -> str:
        """Another h5ad of the same cells and counts, with some obs columns replaced."""
        changed = self.adata.copy()
        changed.obs = changed.obs.assign(**columns)
        path = str(tmp_path / f"changed-{Path(self.path).name}")
        changed.write_h5ad(path)
        return path


def _random_column(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    if kind == "string":
        return rng.choice(["T cell", "B cell", "NK"], n).astype(object)
    if kind == "bool":
        return rng.random(n) < 0.5
    return (rng.random(n) * 100).astype(kind)


def _prepare(uri: str, schema: AtlasSchema, samples: list[Sample]) -> list[tuple[int, int]]:
    """What the coordinator does: add genes, allocate contiguous ranges, resize once."""
    genes = pd.concat([s.adata.var for s in samples])
    atlas.extend_var(uri, schema, genes[~genes.index.duplicated()])
    starts = np.cumsum([0] + [s.n for s in samples])
    atlas.resize_obs(uri, schema, int(starts[-1]))
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


def _assert_holds(uri: str, schema: AtlasSchema, sample: Sample, start: int) -> None:
    """The atlas rows [start, start+n) are exactly the sample: obs, and every layer gene by gene."""
    got = atlas.read_sample(uri, schema, start, start + sample.n)
    want = sample.adata
    assert list(got.obs_names) == list(want.obs_names)
    for column in want.obs.columns:
        np.testing.assert_array_equal(got.obs[column].to_numpy(), want.obs[column].to_numpy(), err_msg=column)
    assert len(got.var_names) == len(atlas.read_var_ids(uri, schema))
    counts = want.X.toarray()
    normalized = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * 1e4
    np.testing.assert_array_equal(got[:, want.var_names].X.toarray(), counts)
    np.testing.assert_allclose(got[:, want.var_names].layers["norm"].toarray(), normalized, rtol=1e-6)
    np.testing.assert_allclose(got[:, want.var_names].layers["logn"].toarray(), np.log1p(normalized), rtol=1e-12)
    assert got.X.nnz == want.X.nnz  # nothing outside the sample's genes
    assert got.X.dtype == np.int32 and got.layers["norm"].dtype == np.float32
    if "raw_g" in got.layers:  # gene-optimized copies hold exactly the same values (derived ones bit for bit)
        assert (sp.csr_matrix(got.layers["raw_g"]) != sp.csr_matrix(got.X)).nnz == 0
        assert (sp.csr_matrix(got.layers["norm_g"]) != sp.csr_matrix(got.layers["norm"])).nnz == 0


def test_create_is_atomic_and_records_structure(tmp_path: Path, schema: AtlasSchema) -> None:
    path = str(tmp_path / "sub" / "atlas")
    assert not atlas.atlas_exists(path)
    atlas.create_atlas(path, schema, "test-lineage")
    assert atlas.atlas_exists(path)
    assert atlas.read_structure(path) == schema.structure
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["atlas"]  # no scratch left
    with pytest.raises(AtlasError, match="already exists"):
        atlas.create_atlas(path, schema, "test-lineage")
    assert atlas.overview(path) == atlas.Overview(cells=0, genes=0, layers=("logn", "norm", "norm_g", "raw", "raw_g"),
                                                   samples={})


def test_extend_var_is_idempotent_and_appends_in_order(uri: str, schema: AtlasSchema) -> None:
    first = pd.DataFrame({"gene_symbol": ["A", "B"]}, index=["g2", "g1"])
    assert atlas.extend_var(uri, schema, first) == 2
    assert atlas.extend_var(uri, schema, first) == 2
    more = pd.DataFrame({"gene_symbol": ["B", "C"]}, index=["g1", "g0"])
    assert atlas.extend_var(uri, schema, more) == 3
    assert atlas.read_var_ids(uri, schema).to_dict() == {"g2": 0, "g1": 1, "g0": 2}


def test_parallel_ingest_round_trips(tmp_path: Path, uri: str, schema: AtlasSchema) -> None:
    rng = np.random.default_rng(7)
    samples = [
        Sample(tmp_path, schema, "s1/a", GENES[:20], seed=1),
        # Same barcodes, other sample; genes partly disjoint and shuffled.
        Sample(tmp_path, schema, "s2/a", list(rng.permutation(GENES[10:])), seed=2),
        # Genes in reverse atlas order: every row must be re-sorted before the unsorted write.
        Sample(tmp_path, schema, "s2/b", GENES[::-1], cells=25, seed=3, density=0.6),
    ]
    ranges = _prepare(uri, schema, samples)
    executor = get_reusable_executor(max_workers=2)
    futures = [executor.submit(atlas.ingest_h5ad, uri, schema, s.path, start, chunk_nnz=50)
               for s, (start, _) in zip(samples, ranges)]
    stats = [f.result() for f in futures]
    assert [(s.cells, s.nnz) for s in stats] == [(s.n, s.adata.X.nnz) for s in samples]
    for sample, (start, _) in zip(samples, ranges):
        _assert_holds(uri, schema, sample, start)
    assert atlas.obs_joinids_outside(uri, ranges) == []
    assert atlas.count_x_outside(uri, schema, ranges) == 0
    assert atlas.overview(uri).samples == {("s1", "a"): 40, ("s2", "a"): 40, ("s2", "b"): 25}


def test_delete_then_reingest_is_always_visible(tmp_path: Path, uri: str, schema: AtlasSchema) -> None:
    sample = Sample(tmp_path, schema, "s1/a", GENES[:10], cells=10, seed=4)
    [(start, stop)] = _prepare(uri, schema, [sample])
    full = [atlas.RangeStats(start, stop, cells=10, obs_ids=10, nnz=sample.adata.X.nnz)]
    atlas.ingest_h5ad(uri, schema, sample.path, start)
    for _ in range(20):
        atlas.delete_obs_range(uri, schema, start, stop)
        atlas.ingest_h5ad(uri, schema, sample.path, start)
        assert atlas.range_stats(uri, schema, [(start, stop)]) == full
    atlas.delete_obs_range(uri, schema, start, stop)
    assert atlas.range_stats(uri, schema, [(start, stop)])[0].cells == 0
    assert atlas.count_x_outside(uri, schema, []) == 0  # every layer emptied, not just the counts


def test_ingest_counts_its_entries_from_what_it_committed_and_reads_when_a_stamp_is_shared(
        tmp_path: Path, uri: str, schema: AtlasSchema, monkeypatch: pytest.MonkeyPatch) -> None:
    """ingest_sample takes the range's X entries from the fragments committed at its own timestamp; when
    another ingest committed at the same millisecond, those are not all its own, and it counts the range."""
    first = Sample(tmp_path, schema, "s1/a", GENES, cells=30, seed=12)
    second = Sample(tmp_path, schema, "s1/b", GENES, cells=20, seed=13, density=0.5)
    ranges = _prepare(uri, schema, [first, second])
    atlas.resize_samples(uri, schema, 2)
    counted = []
    real_count = checks._entries_per_range
    monkeypatch.setattr(checks, "_entries_per_range", lambda *args: counted.append(args[1]) or real_count(*args))
    stamps = []
    real_mutation = clock.mutation

    @contextmanager
    def shared_stamp() -> Iterator[int]:
        with real_mutation() as stamp:
            stamps.append(stamps[0] if stamps else stamp)  # every mutation at the first one's stamp
            yield stamps[-1]

    monkeypatch.setattr(clock, "mutation", shared_stamp)
    stats = [atlas.ingest_sample(uri, schema, key, i, s.path, start, chunk_nnz=100, fence=lambda: None)
             for i, (key, s, (start, _)) in enumerate(zip(["s1/a", "s1/b"], [first, second], ranges))]
    assert stats == [atlas.RangeStats(start, stop, cells=s.n, obs_ids=s.n, nnz=s.adata.X.nnz)
                     for s, (start, stop) in zip([first, second], ranges)]
    assert counted == [[ranges[1]]]  # only the second ingest read its range back
    assert len(set(stamps)) == 1


def test_mutations_get_increasing_timestamps() -> None:
    """A delete at T hides writes stamped T: the next mutation must get a later stamp."""
    stamps = []
    for _ in range(50):
        with clock.mutation() as stamp:
            stamps.append(stamp)
    assert all(a < b for a, b in zip(stamps, stamps[1:]))


def test_replace_with_fewer_nonzeros_leaves_nothing_stale(tmp_path: Path, uri: str, schema: AtlasSchema) -> None:
    dense = Sample(tmp_path, schema, "s1/a", GENES, seed=5, density=0.8)
    sparse = Sample(tmp_path, schema, "s1/a", GENES, seed=6, density=0.1)
    [(start, stop)] = _prepare(uri, schema, [dense])
    atlas.ingest_h5ad(uri, schema, dense.path, start)
    atlas.delete_obs_range(uri, schema, start, stop)
    atlas.ingest_h5ad(uri, schema, sparse.path, start)
    _assert_holds(uri, schema, sparse, start)
    atlas.delete_obs_range(uri, schema, stop, stop + 10)  # deleting nothing is fine


def test_update_obs_rewrites_in_place(tmp_path: Path, uri: str, schema: AtlasSchema) -> None:
    sample = Sample(tmp_path, schema, "s1/a", GENES, seed=8)
    other = Sample(tmp_path, schema, "s2/a", GENES, seed=9)
    [(start, stop)] = _prepare(uri, schema, [sample])
    atlas.ingest_h5ad(uri, schema, sample.path, start)
    changed = sample.with_obs(tmp_path, cell_type="Treg", umi_counts=np.arange(sample.n, dtype=np.int64))
    # X is not read back after an obs-only update (nnz None); the obs rows are, and compared with what was written
    assert atlas.update_obs(uri, schema, changed, start) == atlas.RangeStats(start, stop, sample.n, sample.n, None)
    got = atlas.read_sample(uri, schema, start, stop)
    assert list(got.obs["cell_type"]) == ["Treg"] * sample.n
    assert list(got.obs["umi_counts"]) == list(range(sample.n))
    np.testing.assert_array_equal(got[:, sample.adata.var_names].X.toarray(), sample.adata.X.toarray())
    assert atlas.range_stats(uri, schema, [(start, stop)])[0] == atlas.RangeStats(
        start, stop, cells=sample.n, obs_ids=sample.n, nnz=sample.adata.X.nnz)
    with pytest.raises(AtlasError, match="do not hold the cells"):
        atlas.update_obs(uri, schema, other.path, start)


def test_obs_rows_read_back_must_equal_those_written(tmp_path: Path, uri: str, schema: AtlasSchema) -> None:
    """The check after an obs-only update compares every value read back, not only counts and ids."""
    import pyarrow as pa
    import tiledbsoma as soma

    from soma_manifest.atlas import layout
    from soma_manifest.atlas.checks import obs_rows_as_written
    from soma_manifest.h5ad import open_sample

    sample = Sample(tmp_path, schema, "s1/a", GENES, seed=8)
    [(start, stop)] = _prepare(uri, schema, [sample])
    atlas.ingest_h5ad(uri, schema, sample.path, start)
    with open_sample(sample.path, schema) as opened:
        written = layout.obs_table(opened.obs, schema, start)
    other = written.set_column(written.schema.get_field_index("cell_type"), "cell_type",
                               pa.array(["Treg"] * sample.n, written.schema.field("cell_type").type))
    with soma.DataFrame.open(layout.members(uri, schema).obs) as obs:
        assert obs_rows_as_written(obs, written, start) == atlas.RangeStats(start, stop, sample.n, sample.n, None)
        with pytest.raises(AtlasError, match=r"differ from those written \(columns cell_type\)"):
            obs_rows_as_written(obs, other, start)


def test_verify_finds_an_orphaned_range(tmp_path: Path, uri: str, schema: AtlasSchema) -> None:
    kept = Sample(tmp_path, schema, "s1/a", GENES, cells=20, seed=10)
    orphan = Sample(tmp_path, schema, "s1/b", GENES, cells=150, seed=11)
    (kept_range, orphan_range) = _prepare(uri, schema, [kept, orphan])
    for sample, (start, _) in ((kept, kept_range), (orphan, orphan_range)):
        atlas.ingest_h5ad(uri, schema, sample.path, start)
    assert atlas.obs_joinids_outside(uri, [kept_range]) == list(range(20, 120))  # capped at 100
    assert atlas.count_x_outside(uri, schema, [kept_range]) == 5 * orphan.adata.X.nnz  # five layers
    assert atlas.count_x_outside(uri, schema, [kept_range, orphan_range]) == 0
    assert atlas.range_stats(uri, schema, [orphan_range, (170, 170)]) == [
        atlas.RangeStats(*orphan_range, cells=150, obs_ids=150, nnz=orphan.adata.X.nnz),
        atlas.RangeStats(170, 170, cells=0, obs_ids=0, nnz=0)]


def test_ingest_refuses_too_small_domains_before_writing(tmp_path: Path, uri: str, schema: AtlasSchema) -> None:
    sample = Sample(tmp_path, schema, "s1/a", GENES, cells=10, seed=12)
    atlas.extend_var(uri, schema, sample.adata.var.iloc[:5])
    atlas.resize_obs(uri, schema, 10)
    with pytest.raises(AtlasError, match="not in the atlas' var"):
        atlas.ingest_h5ad(uri, schema, sample.path, 0)
    atlas.extend_var(uri, schema, sample.adata.var)
    atlas.resize_obs(uri, schema, 5)  # never shrinks
    with pytest.raises(AtlasError, match="too small"):
        atlas.ingest_h5ad(uri, schema, sample.path, 5)
    assert atlas.obs_joinids_outside(uri, []) == []
    assert atlas.count_x_outside(uri, schema, []) == 0
    atlas.ingest_h5ad(uri, schema, sample.path, 0)
    _assert_holds(uri, schema, sample, 0)


@pytest.mark.parametrize(("damage", "message"), [("duplicate", "duplicate entries .* cells 0..9"),
                                                  ("past the last gene", "outside its 30 genes"),
                                                  ("negative", "outside its 30 genes")])
def test_ingest_refuses_an_x_tiledb_would_not_check(tmp_path: Path, layouts: AtlasSchema, damage: str,
                                                    message: str) -> None:
    """X is written without TileDB's order, duplicate and domain checks (atlas.TRUSTED_ORDER), so ingest
    checks each chunk itself: a damaged h5ad is refused, naming it, before any X entry is written."""
    schema, uri = layouts, str(tmp_path / "atlas")
    atlas.create_atlas(uri, schema, "test-lineage")
    sample = Sample(tmp_path, schema, "s1/a", GENES, cells=10, seed=13)
    [(start, _)] = _prepare(uri, schema, [sample])
    with h5py.File(sample.path, "r+") as f:
        indptr, indices = f["X/indptr"][:], f["X/indices"]
        first = int(indptr[np.flatnonzero(np.diff(indptr) >= 2)[0]])  # a cell with two genes or more
        indices[first] = {"duplicate": indices[first + 1], "past the last gene": len(GENES), "negative": -1}[damage]
    with pytest.raises(SourceError, match=message) as raised:
        atlas.ingest_h5ad(uri, schema, sample.path, start)
    assert raised.value.where == sample.path
    assert atlas.count_x_outside(uri, schema, []) == 0


def test_ingest_sorts_a_cell_whose_genes_are_out_of_order(tmp_path: Path, layouts: AtlasSchema) -> None:
    """A valid CSR need not have sorted columns: with genes in the atlas' order, such a chunk is sorted, not
    written as it is (TileDB does not check the order) nor refused."""
    schema, uri = layouts, str(tmp_path / "atlas")
    atlas.create_atlas(uri, schema, "test-lineage")
    sample = Sample(tmp_path, schema, "s1/a", GENES, cells=10, seed=14)
    [(start, _)] = _prepare(uri, schema, [sample])
    with h5py.File(sample.path, "r+") as f:
        indptr, indices, data = f["X/indptr"][:], f["X/indices"], f["X/data"]
        first = int(indptr[np.flatnonzero(np.diff(indptr) >= 2)[0]])
        indices[first:first + 2], data[first:first + 2] = indices[first:first + 2][::-1], data[first:first + 2][::-1]
    atlas.ingest_h5ad(uri, schema, sample.path, start)
    _assert_holds(uri, schema, sample, start)


def test_every_tiledb_context_of_the_tool_turns_off_the_crashing_tile_merge() -> None:
    """TileDB 2.30's sparse global-order reader crashed in its tile-merge preprocessing (see
    atlas.READER_SETTINGS); every context the tool opens arrays with turns it off."""
    config = atlas.context().native_context.config()
    assert config["sm.query.sparse_global_order.preprocess_tile_merge"] == "0"

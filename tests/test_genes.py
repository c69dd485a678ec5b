"""Gene harmonization (one gene, one var row), the organism guard, and the log_mean/log_var columns.

Real data: the Cell Ranger sample of tests/data/10x-v3-chr21 (Ensembl ids), and h5ads built here from
the same real matrix that carry NCBI GeneIDs and newer symbols, or mouse-style symbols. The reference
tests/data/genes-chr21.tsv.gz is that sample's real features.tsv (id, symbol) with real NCBI GeneIDs
of ten genes and real newer HGNC symbols of five (see tests/data/README.md).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import DATA, DEFAULT_SCHEMA, Project, invoke_cli, read_state
from soma_manifest import genes
from soma_manifest.errors import SchemaError, SourceError
from soma_manifest.readers import read_mtx_dir
from soma_manifest.schema import AtlasSchema, load_schema

CHR21 = DATA / "10x-v3-chr21" / "filtered_feature_bc_matrix"
REFERENCE = DATA / "genes-chr21.tsv.gz"
# Real NCBI GeneIDs and newer HGNC symbols held in the reference's alias columns.
GENE_IDS = {"APP": 351, "SOD1": 6647, "RUNX1": 861, "CBS": 875, "DYRK1A": 1859, "ETS2": 2114, "ERG": 2078,
            "S100B": 6285, "TMPRSS2": 7113, "IFNAR1": 3454}
NEW_SYMBOLS = {"ATP5O": "ATP5PO", "C21orf33": "GATD3A", "C21orf2": "CFAP410", "C21orf59": "CFAP298",
               "RRP1B": "KIAA0179"}


def reference_from(tmp_path: Path, text: str, name: str = "ref.tsv") -> genes.GeneReference:
    path = tmp_path / name
    path.write_text(text)
    return genes.load_reference(str(path), hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest())


SMALL = ("id\tsymbol\talias_ids\talias_symbols\n"
         "ENSG00000000001\tALPHA\tGeneID:1;ENSG00000000091\tALF\n"
         "ENSG00000000002\tBETA\t\tSHARED\n"
         "ENSG00000000003\tGAMMA\t\tSHARED;GAM\n"
         "ENSG00000000004\tCH507-9B2.2\t\t\n"
         "ENSG00000000005\tCH507-9B2.1\t\t\n")


# --- the reference and each mapping rule --------------------------------------------------------

def test_each_rule_version_suffixes_case_and_ambiguity(tmp_path: Path) -> None:
    ref = reference_from(tmp_path, SMALL)
    ids = np.array(["ENSG00000000001.15", "geneid:1", "ENSG00000000091.3", "x1", "x2", "x3", "x4", "x5", "x6"],
                   dtype=object)
    symbols = np.array(["?", "?", "?", "beta", "alf", "SHARED", "NOPE", "CH507-9B2.1", "gam"], dtype=object)
    mapped = genes.map_features(ref, ids, symbols)
    assert mapped.rows.tolist() == [0, 0, 0, 1, 0, genes.AMBIGUOUS, genes.UNMAPPED, 4, 2]
    by = [genes.RULES[r] if r >= 0 else None for r in mapped.rules]
    assert by == ["by_id", "by_alias_id", "by_alias_id", "by_symbol", "by_alias_symbol", None, None,
                  "by_symbol", "by_alias_symbol"]


def test_an_earlier_rule_wins_over_an_ambiguous_later_one(tmp_path: Path) -> None:
    ref = reference_from(tmp_path, SMALL)
    mapped = genes.map_features(ref, np.array(["ENSG00000000003"], dtype=object), np.array(["SHARED"], dtype=object))
    assert mapped.rows.tolist() == [2] and genes.RULES[mapped.rules[0]] == "by_id"


def test_cell_ranger_features_file_is_a_reference_and_bad_references_are_refused(tmp_path: Path) -> None:
    ref = genes.load_reference(str(CHR21 / "features.tsv.gz"), _digest(CHR21 / "features.tsv.gz"))
    table = genes.load_reference(str(REFERENCE), _digest(REFERENCE))
    assert ref.ids.tolist() == table.ids.tolist() and ref.symbols.tolist() == table.symbols.tolist()
    protein = DATA / "10x-v3-pbmc-protein" / "filtered_feature_bc_matrix" / "features.tsv.gz"
    assert len(genes.load_reference(str(protein), _digest(protein)).ids) == 100, "antibodies are no genes"
    with pytest.raises(SchemaError, match=r"'ENSG00000000001' appears more than once \(lines 2, 3"):
        reference_from(tmp_path, "id\tsymbol\nENSG00000000001\tA\nENSG00000000001.2\tB\n", "dupe.tsv")
    with pytest.raises(SchemaError, match="line 3: a gene needs an id and a symbol"):
        reference_from(tmp_path, "id\tsymbol\nENSG1\tA\nENSG2\t\n", "empty.tsv")
    with pytest.raises(SchemaError, match="changed while apply was running"):
        genes.load_reference(str(REFERENCE), "0" * 32)


def _digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def _harmonize(tmp_path: Path, policy: str, ids: list[str], symbols: list[str], counts: np.ndarray):
    ref = reference_from(tmp_path, SMALL)
    return genes.harmonize(ref, sp.csr_matrix(counts), np.array(ids, dtype=object), np.array(symbols, dtype=object),
                           np.array(ids, dtype=object), policy, "s/x")


COUNTS = np.array([[1, 2, 3, 4], [0, 5, 0, 7]])


def test_unmapped_policies_and_features_of_one_gene_are_summed(tmp_path: Path) -> None:
    ids, symbols = ["ENSG00000000002", "GeneID:1", "x", "NEW1"], ["BETA", "?", "alf", "NEW1"]
    counts, out_ids, out_symbols, report = _harmonize(tmp_path, "drop", ids, symbols, COUNTS)
    assert out_ids.tolist() == ["ENSG00000000001", "ENSG00000000002"] and out_symbols.tolist() == ["ALPHA", "BETA"]
    assert counts.toarray().tolist() == [[2 + 3, 1], [5, 0]], "ALPHA's two features are summed"
    assert (report.by_id, report.by_alias_id, report.by_alias_symbol, report.dropped, report.summed,
            report.genes, report.examples) == (1, 1, 1, 1, 1, 2, ["NEW1"])
    counts, out_ids, out_symbols, report = _harmonize(tmp_path, "keep", ids, symbols, COUNTS)
    assert out_ids.tolist() == ["ENSG00000000001", "ENSG00000000002", "NEW1"]
    assert counts.toarray().tolist() == [[5, 1, 4], [5, 0, 7]] and (report.kept, report.dropped) == (1, 0)
    with pytest.raises(SourceError, match=r"sample s/x: 1 features do not map .*: NEW1"):
        _harmonize(tmp_path, "fail", ids, symbols, COUNTS)


def test_a_sample_whose_features_mostly_do_not_map_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"sample s/x: only 1 of 4 features map onto the gene reference ref.tsv"
                       r" \(unmapped e.g. a \(A\), b \(B\), c \(C\)\) \(likely cause: the reference is of another"):
        _harmonize(tmp_path, "keep", ["ENSG00000000002", "a", "b", "c"], ["BETA", "A", "B", "C"], COUNTS)


# --- organism guard -------------------------------------------------------------------------------

def _chr21_features() -> tuple[np.ndarray, np.ndarray]:
    raw = read_mtx_dir(CHR21)
    return raw.feature_ids, raw.feature_names


def test_organism_guard_by_ensembl_prefix_and_symbol_case() -> None:
    ids, symbols = _chr21_features()
    genes.check_organism("homo_sapiens", ids, symbols, "s/x")
    genes.check_organism("homo_sapiens", symbols, symbols, "s/x")
    genes.check_organism("xenopus_laevis", ids, symbols, "s/x")  # no known convention: not checked
    with pytest.raises(SourceError,
                       match=r"look like homo_sapiens, not mus_musculus \(507 of 507 gene ids start with ENSG\)"):
        genes.check_organism("mus_musculus", ids, symbols, "s/x")
    mouse_ids = np.array([i.replace("ENSG", "ENSMUSG") for i in ids], dtype=object)
    with pytest.raises(SourceError, match="look like mus_musculus, not homo_sapiens"):
        genes.check_organism("homo_sapiens", mouse_ids, symbols, "s/x")
    title = np.array([s.capitalize() for s in symbols], dtype=object)
    with pytest.raises(SourceError, match=r"mouse or rat genes \(title-case symbols\), not homo_sapiens"):
        genes.check_organism("homo_sapiens", title, title, "s/x")
    genes.check_organism("mus_musculus", title, title, "s/x")
    with pytest.raises(SourceError, match="human or primate genes"):
        genes.check_organism("mus_musculus", symbols, symbols, "s/x")


def test_organism_guard_without_reference_and_log_library_columns(tmp_path: Path) -> None:
    """Without a gene reference the guard still refuses; log_mean/log_var follow scVI's library prior."""
    from soma_manifest.convert import ConvertJob, convert_sample

    real = read_mtx_dir(CHR21)
    counts = sp.vstack([sp.csr_matrix((1, real.counts.shape[1]), dtype=np.int32), real.counts[:20]]).tocsr()
    barcodes = np.concatenate([["EMPTY-1"], real.barcodes[:20]])
    schema_path = tmp_path / "schema.yaml"
    schema_path.write_text(_schema(tmp_path).read_text().replace("  reference: genes.tsv.gz\n  unmapped: drop\n", ""))
    schema = load_schema(schema_path)
    assert schema.genes.reference is None

    def convert(name: str, ids: list[str], symbols: list[str]) -> ad.AnnData:
        path = tmp_path / "raw" / f"{name}.h5ad"
        _write_h5ad(path, counts, barcodes, ids, symbols)
        job = ConvertJob(f"s/{name}", "s", name, "h5ad", str(path), str(tmp_path / "raw"),
                         str(tmp_path / "out" / f"{name}.h5ad"), organism="homo_sapiens")
        convert_sample(job, schema)
        return ad.read_h5ad(job.h5ad_path)

    got = convert("human", list(real.feature_ids), list(real.feature_names))
    assert list(got.var_names) == list(real.feature_ids), "ids taken as given"
    totals = np.asarray(counts.sum(axis=1)).ravel().astype(float)
    log = np.concatenate([[0.0], np.log(totals[1:])])  # an empty cell counts as log 0, as in scVI
    np.testing.assert_allclose(got.obs["log_mean"], np.float32(np.mean(log)))
    np.testing.assert_allclose(got.obs["lib_var"], np.var(log, ddof=0))
    with pytest.raises(SourceError, match="s/mouse: its genes look like mouse or rat genes"):
        title = [s.capitalize() for s in real.feature_names]
        convert("mouse", title, title)
    assert not (tmp_path / "out" / "mouse.h5ad").exists()


# --- schema ---------------------------------------------------------------------------------------

def test_schema_reference_is_a_conversion_change(tmp_path: Path) -> None:
    plain = load_schema(DEFAULT_SCHEMA)
    path = _schema(tmp_path)
    schema = load_schema(path)
    assert schema.structure != plain.structure  # the two log columns
    with_ref = load_schema(_schema(tmp_path, logs=False))
    assert with_ref.structure == plain.structure and with_ref.conversion != plain.conversion
    reference = tmp_path / "genes.tsv.gz"
    reference.write_bytes(gzip.compress(gzip.decompress(reference.read_bytes()) + b"ENSG09999999999\tNEW\t\t\n"))
    assert load_schema(path).conversion != schema.conversion, "a changed reference re-converts"
    again = AtlasSchema.model_validate(schema.model_dump(by_alias=True))
    assert (again.genes, again.organism) == (schema.genes, "homo_sapiens"), "a schema survives its own dump"
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFAULT_SCHEMA.read_text().replace("universe: union", "universe: union\n  unmapped: keep"))
    with pytest.raises(Exception, match="only applies with a gene `reference:`"):
        load_schema(bad)


def _schema(folder: Path, *, logs: bool = True, unmapped: str = "drop") -> Path:
    shutil.copy(REFERENCE, folder / "genes.tsv.gz")
    text = DEFAULT_SCHEMA.read_text().replace(
        "version: 1\n", "version: 1\norganism: homo_sapiens\n").replace(
        "universe: union", f"universe: union\n  reference: genes.tsv.gz\n  unmapped: {unmapped}")
    if logs:
        text = text.replace("  - {name: pct_ribo, type: float32, source: computed}",
                            "  - {name: pct_ribo, type: float32, source: computed}\n"
                            "  - {name: log_mean, type: float32, source: computed}\n"
                            "  - {name: lib_var, type: float64, source: computed, compute: log_var}")
    path = folder / ("schema.yaml" if logs else "schema-nolog.yaml")
    path.write_text(text)
    return path


def test_a_bad_reference_is_one_error_before_any_change(tmp_path: Path) -> None:
    project = Project(tmp_path)
    shutil.copytree(CHR21, project.raw / "cr" / "mtx" / "c1")
    schema = _schema(tmp_path, logs=False)
    (tmp_path / "genes.tsv.gz").write_bytes(gzip.compress(b"id\tsymbol\nENSG1\tA\nENSG1.3\tB\n"))
    project.write_manifest("  - name: cr\n", schema=schema)
    result = invoke_cli("apply", project.manifest)
    assert result.returncode == 1
    assert "genes.tsv.gz: gene id 'ENSG1' appears more than once (lines 2, 3" in " ".join(result.stderr.split())
    assert not project.state_path.exists() and not project.atlas_uri.exists()


# --- on real data, through apply --------------------------------------------------------------------

def _write_h5ad(path: Path, counts: sp.csr_matrix, barcodes: np.ndarray, ids: list[str], symbols: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    var = pd.DataFrame({"gene_symbols": symbols}, index=pd.Index(ids))
    ad.AnnData(X=counts.astype(np.float32), obs=pd.DataFrame(index=pd.Index(barcodes)), var=var).write_h5ad(path)


def _ncbi_sample(raw: Path) -> tuple[sp.csr_matrix, list[str]]:
    """The real chr21 matrix as an h5ad of another annotation: NCBI GeneIDs where known, newer symbols,
    one gene twice (by GeneID and by symbol), and one feature no reference knows. Returns the counts
    expected per reference gene (reference order) and the expected kept var ids."""
    real = read_mtx_dir(CHR21)
    symbols = list(real.feature_names)
    ids = [f"GeneID:{GENE_IDS[s]}" if s in GENE_IDS else NEW_SYMBOLS.get(s, s) for s in symbols]
    shown = [NEW_SYMBOLS.get(s, s) for s in symbols]
    unknown = symbols.index("CBSL")
    ids[unknown] = shown[unknown] = "NOT-A-GENE"
    app = symbols.index("APP")
    counts = sp.hstack([real.counts, real.counts[:, [app]]]).tocsr()  # APP again, under its symbol
    _write_h5ad(raw / "ncbi" / "h5ad" / "n1.h5ad", counts, real.barcodes, ids + ["APP"], shown + ["APP"])
    expected = real.counts.tolil()
    expected[:, app] = real.counts[:, app] * 2
    expected[:, unknown] = 0
    return expected.tocsr(), [i for i in real.feature_ids if i != real.feature_ids[unknown]]


def test_real_mixed_inputs_get_one_var_row_per_gene_and_mouse_symbols_stay_out(tmp_path: Path) -> None:
    import tiledbsoma as soma

    real = read_mtx_dir(CHR21)
    project = Project(tmp_path)
    shutil.copytree(CHR21, project.raw / "cr" / "mtx" / "c1")
    expected, kept_ids = _ncbi_sample(project.raw)
    title = [s.capitalize() for s in real.feature_names]
    _write_h5ad(project.raw / "mouse" / "h5ad" / "m1.h5ad", real.counts, real.barcodes, title, title)
    studies = "  - name: cr\n  - name: ncbi\n    format: h5ad\n  - name: mouse\n    format: h5ad\n"
    project.write_manifest(studies, schema=_schema(tmp_path))
    result = invoke_cli("apply", project.manifest)
    assert result.returncode != 0
    state = read_state(project)
    mouse = state.samples["mouse/m1"]
    assert mouse.failed_step == "convert" and mouse.ingest == "none"
    assert "mouse/m1: its genes look like mouse or rat genes (title-case symbols), not homo_sapiens" in mouse.error
    cr, ncbi = state.samples["cr/c1"].gene_mapping, state.samples["ncbi/n1"].gene_mapping
    assert (cr.features, cr.by_id, cr.genes, cr.dropped) == (507, 507, 507, 0)
    assert (ncbi.features, ncbi.by_alias_id, ncbi.by_alias_symbol, ncbi.by_symbol) == (508, 10, 5, 492)
    assert (ncbi.dropped, ncbi.unmapped, ncbi.summed, ncbi.genes, ncbi.examples) == (1, 1, 1, 506, ["NOT-A-GENE"])

    with soma.Experiment.open(str(project.atlas_uri)) as exp:
        var = exp.ms["RNA"].var.read().concat().to_pandas()
        obs = exp.obs.read().concat().to_pandas()
        assert sorted(var["var_id"]) == sorted(real.feature_ids), "one var row per gene, by reference id"
        assert var["gene_symbol"].is_unique
        assert set(obs["study_name"]) == {"cr", "ncbi"}, "nothing of the mouse sample entered the atlas"
        for study, want in (("cr", real.counts), ("ncbi", expected)):
            got = exp.axis_query("RNA", obs_query=soma.AxisQuery(value_filter=f"study_name == '{study}'")
                                 ).to_anndata(X_name="raw", obs_id_name="obs_id", var_id_name="var_id")
            got = got[[f"{study}/{study[0]}1/{b}" for b in real.barcodes]]
            genes_in = kept_ids if study == "ncbi" else list(real.feature_ids)
            x = sp.csr_matrix(got[:, genes_in].X)
            columns = [list(real.feature_ids).index(g) for g in genes_in]
            assert (x != want[:, columns]).nnz == 0, f"{study}: counts differ from the input summed per gene"
            assert sp.csr_matrix(got.X).nnz == want.nnz
    totals = np.asarray(real.counts.sum(axis=1)).ravel()
    log = np.log(totals, out=np.zeros(len(totals)), where=totals > 0)
    cells = obs[obs["study_name"] == "cr"]
    np.testing.assert_allclose(cells["log_mean"], np.mean(log), rtol=1e-6)
    np.testing.assert_allclose(cells["lib_var"], np.var(log), rtol=1e-12)

    shown = invoke_cli("show", project.manifest)
    shown_text = " ".join(shown.stdout.split())
    assert "genes: 508 features -> 506 genes: mapped 10 by alias id, 492 by symbol, 5 by alias symbol" in shown_text
    plan = invoke_cli("plan", "-v", project.manifest)
    assert "genes: 507 features -> 507 genes: mapped 507 by id" in " ".join(plan.stdout.split())
    log_text = "".join(p.read_text() for p in (project.root / "logs").rglob("*.log"))
    assert "ncbi/n1: converted" in log_text and "1 dropped (e.g. NOT-A-GENE)" in log_text

    # A deliberate cross-species study: its title-case symbols map onto the human genes by symbol.
    project.write_manifest(studies.replace("name: mouse\n", "name: mouse\n    organism: mus_musculus\n"),
                           schema=_schema(tmp_path))
    assert invoke_cli("apply", project.manifest).returncode == 0
    mouse = read_state(project).samples["mouse/m1"].gene_mapping
    assert (mouse.by_symbol, mouse.genes) == (507, 507)
    with soma.Experiment.open(str(project.atlas_uri)) as exp:
        assert len(exp.ms["RNA"].var.read().concat()) == 507


def test_without_reference_ids_are_taken_as_given(tmp_path: Path) -> None:
    project = Project(tmp_path)
    real = read_mtx_dir(CHR21)
    shutil.copytree(CHR21, project.raw / "cr" / "mtx" / "c1")
    _ncbi_sample(project.raw)
    project.write_manifest("  - name: cr\n  - name: ncbi\n    format: h5ad\n")
    assert invoke_cli("apply", project.manifest).returncode == 0
    import tiledbsoma as soma

    with soma.Experiment.open(str(project.atlas_uri)) as exp:
        var = exp.ms["RNA"].var.read().concat().to_pandas()
    assert len(var) == 507 + 508  # the h5ad's ids (GeneIDs, symbols, NOT-A-GENE, APP) are other var ids
    assert set(real.feature_ids) <= set(var["var_id"])
    assert read_state(project).samples["cr/c1"].gene_mapping is None
    assert json.loads(invoke_cli("show", "--json", project.manifest).stdout)["samples"][0]["gene_mapping"] is None

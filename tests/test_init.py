"""`soma-manifest init`: a manifest for an existing raw tree, the reference pipeline's flags and schema files."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DEFAULT_SCHEMA, Project, invoke_cli
from soma_manifest.init import default_schema_text
from soma_manifest.manifest import load_manifest
from soma_manifest.schema import load_schema

CANONICAL = ["--raw", "raw", "--atlas-storage", "atlases", "--name", "my_atlas"]


@pytest.fixture
def tree(project: Project, monkeypatch: pytest.MonkeyPatch) -> Project:
    """The project's raw tree plus a study holding two formats and a folder with no samples; cwd is its root."""
    for folder, name in (("h5ad", "x.h5ad"), ("10x_h5", "y.h5")):
        (project.raw / "study_c" / folder).mkdir(parents=True)
        (project.raw / "study_c" / folder / name).write_bytes(b"")
    (project.raw / "notes").mkdir()
    project.manifest.unlink()
    monkeypatch.chdir(project.root)
    return project


def init(*args: str) -> tuple[int, str, str]:
    result = invoke_cli("init", "conf/atlas.yaml", *args)
    return result.returncode, result.stdout, result.stderr


def test_init_lists_the_studies_and_validate_passes(tree: Project) -> None:
    code, out, err = init(*CANONICAL)
    assert code == 0, err
    manifest, schema = tree.root / "conf" / "atlas.yaml", tree.root / "conf" / "atlas.schema.yaml"
    assert f"Wrote {schema}, {manifest} (3 of 4 studies listed)" in out
    text = manifest.read_text()
    # relative paths are written relative to the manifest's folder; h5ad and logs default next to the atlas
    for line in ("  storage: ../atlases  #", "  raw: ../raw  #", "  h5ad: ../atlases/my_atlas-h5ad  #",
                 "  logs: ../atlases/my_atlas-logs  #", "schema: atlas.schema.yaml  #",
                 "  - name: study_a  # mtx, 2 samples", "  - name: study_b  # mtx, 1 sample",
                 "  - name: study_c\n    format: h5ad  # h5ad, 1 sample; also holds 10x_h5/ (1), left out",
                 "  # - name: notes  # left out: no mtx/, h5ad/ or 10x_h5/ folder with samples"):
        assert line in text, line
    assert "note: study study_c: h5ad, 1 sample; also holds 10x_h5/ (1)" in err
    assert schema.read_text() == DEFAULT_SCHEMA.read_text()
    loaded = load_manifest(manifest)
    assert (loaded.atlas_uri, loaded.raw, loaded.h5ad) == (
        tree.root / "atlases" / "my_atlas", tree.raw, tree.root / "atlases" / "my_atlas-h5ad")
    result = invoke_cli("validate", manifest)
    assert result.returncode == 0, result.stderr
    assert "(4 samples in 3 studies)" in result.stdout


def test_the_packaged_default_schema_is_the_default_schema() -> None:
    assert default_schema_text() == DEFAULT_SCHEMA.read_text()


@pytest.mark.parametrize(("reference", "canonical"), [
    (["--raw-storage-dir", "raw"], ["--raw", "raw"]),
    (["--atlas-storage-dir", "atlases"], ["--atlas-storage", "atlases"]),
    (["--atlas-name", "my_atlas"], ["--name", "my_atlas"]),
    (["--h5ad-storage-dir", "h5"], ["--h5ad", "h5"]),
    (["--log-dir", "lg"], ["--logs", "lg"]),
], ids=lambda v: v[0])
def test_reference_flags_are_aliases(tree: Project, reference: list[str], canonical: list[str]) -> None:
    flag = canonical[0]
    args = CANONICAL if flag not in CANONICAL else [
        a for i, a in enumerate(CANONICAL) if flag not in CANONICAL[i - i % 2: i - i % 2 + 1]]
    assert init(*args, *canonical)[0] == 0
    expected = (tree.root / "conf" / "atlas.yaml").read_text()
    for name in ("atlas.yaml", "atlas.schema.yaml"):
        (tree.root / "conf" / name).unlink()
    code, _, err = init(*args, *reference)
    assert code == 0, err
    assert (tree.root / "conf" / "atlas.yaml").read_text() == expected


def test_the_rest_of_a_pasted_reference_command(tree: Project) -> None:
    code, _, err = init("--atlas-name", "my_atlas", "--raw-storage-dir", "raw", "--atlas-storage-dir", "atlases",
                        "--processes", "3", "--raw-collection-type", "10x_h5", "--filenames-pkl", "f.pkl",
                        "--registration-mapping-pkl", "m.pkl", "--include-studies", "study_c", "study_b")
    assert code == 0, err
    text = (tree.root / "conf" / "atlas.yaml").read_text()
    assert "processes: 3  #" in text
    assert "studies:\n  - name: study_b  # mtx, 1 sample\n  - name: study_c\n    format: 10x_h5  # 10x_h5" in text
    assert "study_a" not in text
    for flag in ("--filenames-pkl", "--registration-mapping-pkl"):
        note = f"{flag} is ignored: the state file replaces the reference's pickle checkpoints"
        assert f"note: {note}" in err and f"# - {note}" in text
    assert invoke_cli("validate", tree.root / "conf" / "atlas.yaml").returncode == 0


def test_an_unknown_included_study_is_refused(tree: Project) -> None:
    code, _, err = init(*CANONICAL, "--include-studies", "study_a", "study_z")
    assert code == 1
    assert "error: raw: no study folder study_z (found: notes, study_a, study_b, study_c)" in err
    assert not (tree.root / "conf").exists()


@pytest.mark.parametrize("existing", ["atlas.yaml", "atlas.schema.yaml"])
def test_init_overwrites_nothing(tree: Project, existing: str) -> None:
    conf = tree.root / "conf"
    conf.mkdir()
    (conf / existing).write_text("mine\n")
    code, _, err = init(*CANONICAL)
    assert code == 1
    assert f"{conf / existing} already exists; nothing was written" in err
    assert sorted(p.name for p in conf.iterdir()) == [existing]
    assert (conf / existing).read_text() == "mine\n"


PARTIAL_REFERENCE = """\
PAI_SCHEMA_VERSION: "2.1.0"
PAI_OBS_SAMPLE_COLUMNS:
  - [sample_name, categorical__large_string]
  - [study_name, categorical__large_string]
  - [scrnaseq_protocol, categorical__large_string]
PAI_OBS_COMPUTED_COLUMNS:
  - [nnz, uint32]
  - [umi_counts, uint32]
  - [pct_mito, float32]
  - [genes_detected, uint32]
  - [doublet_score, float32]
COMPUTED_COLUMN_FUNCTIONS:
  genes_detected: compute_n_genes
  doublet_score: compute_scrublet
VALIDATION_SCHEMA:
  GENE_INTERSECTION_THRESHOLD_FRAC: 0.5
"""


def test_a_partial_reference_schema_is_translated_over_the_defaults(tree: Project) -> None:
    (tree.root / "ref").mkdir()
    (tree.root / "ref" / "core.tsv").write_text("RPL3\tx\nGENE1\nMT-CO1\nGENE1\n")
    (tree.root / "ref" / "schema.yaml").write_text(PARTIAL_REFERENCE + "CORE_GENE_SET_PATH: core.tsv\n")
    code, _, err = init(*CANONICAL, "--db-schema-fp", "ref/schema.yaml", "--include-studies", "study_a", "study_b")
    assert code == 0, err
    conf = tree.root / "conf"
    text = (conf / "atlas.schema.yaml").read_text()
    for line in (
        "# Reference PAI_SCHEMA_VERSION: 2.1.0",
        "  - {name: sample_name, type: string, source: sample}  # categorical__large_string",
        "  - {name: scrnaseq_protocol, type: string, source: sample_metadata, default: unknown}",
        "  - {name: barcode, type: string, source: barcode}  # large_string",  # the default cell columns
        "  - {name: cell_type, type: string, source: cell_metadata, default: unknown}",
        "  - {name: nnz, type: int64, source: computed}  # uint32, compute_nnz",
        "  - {name: genes_detected, type: int64, source: computed, compute: n_genes}  # uint32, compute_n_genes",
        "var:\n  - {name: gene, type: string, source: feature_name}",
        "  - {name: col_raw, type: int64, source: counts, optimize: genes}  # uint32, raw counts",
        "  - {name: col_norm, type: float32, source: log1p, optimize: genes}",
        "  - {name: row_raw, type: int64, source: counts, optimize: cells}",
        "  - {name: row_norm, type: float32, source: log1p, optimize: cells}",
        "genes:\n  universe: fixed\n  file: atlas.genes.tsv",
        "# - uint32 -> int64 (nnz, umi_counts, genes_detected, col_raw, row_raw): there are no unsigned types",
        "# - PAI_OBS_COMPUTED_COLUMNS: 'doublet_score' (compute_scrublet) has no equivalent",
        "# - GENE_INTERSECTION_THRESHOLD_FRAC (0.5): no equivalent",
        "# - PAI_OBSM_LAYERS (embeddings, umap): no obsm arrays are created",
        "# - CORE_GENE_SET_PATH: 3 gene symbols, sorted, are the fixed gene universe (atlas.genes.tsv)",
    ):
        assert line in text, line
    assert "doublet_score, type" not in text and "ens" not in text.split("var:")[1].split("layers:")[0]
    assert "note: schema: GENE_INTERSECTION_THRESHOLD_FRAC (0.5): no equivalent" in err
    assert (conf / "atlas.genes.tsv").read_text() == "GENE1\nMT-CO1\nRPL3\n"
    schema = load_schema(conf / "atlas.schema.yaml")
    assert [c.name for c in schema.obs] == ["sample_name", "study_name", "scrnaseq_protocol", "barcode", "cell_type",
                                            "nnz", "umi_counts", "pct_mito", "genes_detected"]
    assert schema.genes.universe == "fixed" and schema.gene_list_path() == conf / "atlas.genes.tsv"
    result = invoke_cli("validate", conf / "atlas.yaml")
    assert result.returncode == 0, result.stderr


def test_the_default_reference_schema_emits_log_mean_and_log_var(tree: Project) -> None:
    """The reference's defaults compute log_mean/log_var; they are emitted whether or not this soma-manifest
    computes them yet (checked on the YAML text, so that this test does not depend on it)."""
    (tree.root / "ref.yaml").write_text("# everything from the defaults\n")
    code, _, err = init(*CANONICAL, "--db-schema-fp", "ref.yaml")
    assert code == 0, err
    text = (tree.root / "conf" / "atlas.schema.yaml").read_text()
    assert "  - {name: log_mean, type: float32, source: computed}  # float32, compute_log_mean\n" in text
    assert "  - {name: log_var, type: float32, source: computed}  # float32, compute_log_var\n" in text
    assert "genes:\n  universe: union\n" in text
    assert "# - CORE_GENE_SET_PATH is not set" in text


def test_a_translated_schema_builds_its_four_layers(tree: Project) -> None:
    """Applied for real: both counts layers hold the counts, both normalized ones log1p(counts / total x 1e4)."""
    import tiledbsoma as soma

    (tree.root / "ref.yaml").write_text(PARTIAL_REFERENCE)
    assert init(*CANONICAL, "--db-schema-fp", "ref.yaml", "--include-studies", "study_b")[0] == 0
    result = invoke_cli("apply", tree.root / "conf" / "atlas.yaml")
    assert result.returncode == 0, result.stderr
    data = tree.samples["study_b/s1"]
    with soma.Experiment.open(str(tree.root / "atlases" / "my_atlas")) as exp:
        ids = exp.obs.read(column_names=["obs_id"]).concat()["obs_id"].to_pylist()
        order = [ids.index(f"study_b/s1/{b}") for b in data.barcodes]
        genes = exp.ms["RNA"].var.read(column_names=["var_id"]).concat()["var_id"].to_pylist()
        columns = [genes.index(g) for g in data.gene_ids]
        counts = data.counts.toarray()
        norm = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
        for layer, expected in (("col_raw", counts), ("row_raw", counts), ("col_norm", norm), ("row_norm", norm)):
            x = exp.ms["RNA"].X[layer].read().coos().concat().to_scipy().tocsr()
            got = x[order][:, columns].toarray()
            np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=layer)


def test_a_given_schema_is_referenced_not_copied(tree: Project) -> None:
    (tree.root / "schemas").mkdir()
    (tree.root / "schemas" / "mine.yaml").write_text(DEFAULT_SCHEMA.read_text())
    code, _, err = init(*CANONICAL, "--schema", "schemas/mine.yaml")
    assert code == 0, err
    assert "schema: ../schemas/mine.yaml  # the atlas schema" in (tree.root / "conf" / "atlas.yaml").read_text()
    assert sorted(p.name for p in (tree.root / "conf").iterdir()) == ["atlas.yaml"]
    code, _, err = init(*CANONICAL, "--schema", "schemas/mine.yaml", "--db-schema-fp", "ref.yaml")
    assert code == 1 and "give either --schema" in err


def test_a_malformed_reference_schema_is_refused_with_its_line(tree: Project) -> None:
    (tree.root / "ref.yaml").write_text("PAI_SCHEMA_VERSION: '1'\nPAI_OBS_CELL_COLUMNS:\n  - [barcode]\n")
    code, _, err = init(*CANONICAL, "--db-schema-fp", "ref.yaml")
    assert code == 1
    assert "error: ref.yaml:3: PAI_OBS_CELL_COLUMNS.0: expected a [name, type] pair, found ['barcode']" in err
    assert not (tree.root / "conf").exists()

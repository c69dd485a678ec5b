"""The QC report: its numbers are exactly those of the samples' raw counts, outliers are marked by the stated
rules, reads as of a tag show that apply, and the page renders in real headless Chromium with the network off,
without console errors, every figure drawn and the tables sortable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from browser import open_page, require_chromium
from conftest import Project, SampleData, apply_ok, invoke_cli, make_sample, three_samples
from soma_manifest import api
from soma_manifest.qc_report import QUANTILES
from soma_manifest.qc_page import figure_ids, render


def _mito_heavy() -> SampleData:
    data = make_sample(30, 30, seed=5)
    counts = data.counts.tolil()
    counts[:, 0] = 40  # gene 0 is MT-CO1 (conftest.genes): about half of every cell's UMIs
    data.counts = counts.tocsr()
    return data


def applied_once(root: Path) -> Project:
    """conftest's `applied` project, for module-scoped fixtures: three samples in two studies, applied."""
    p = three_samples(root)
    apply_ok(p)
    return p


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """Two applies: three ordinary samples (tagged v1), then a tiny one and a mitochondria-heavy one."""
    p = applied_once(tmp_path_factory.mktemp("report"))
    assert invoke_cli("tag", p.manifest, "v1").returncode == 0
    p.add_mtx("study_b", "tiny", make_sample(4, 25, seed=4, gene_offset=5))
    p.add_mtx("study_b", "mito", _mito_heavy())
    p.write_manifest()
    apply_ok(p)
    return p


def _expected(data: SampleData) -> dict[str, np.ndarray]:
    counts = data.counts
    umis = np.asarray(counts.sum(axis=1)).ravel().astype(float)
    mito = np.array([s.upper().startswith("MT-") for s in data.symbols])
    return {"umis": umis, "genes": np.diff(counts.indptr).astype(float),
            "pct_mito": 100 * np.asarray(counts[:, mito].sum(axis=1)).ravel() / np.maximum(umis, 1)}


def test_numbers_are_those_of_the_raw_counts(reported: Project) -> None:
    report = api.load(reported.manifest).report()
    samples = {r.key: r for r in report.samples}
    assert list(samples) == sorted(reported.samples)
    for key, data in reported.samples.items():
        row = samples[key]
        assert row.cells == data.counts.shape[0]
        assert row.genes_measured == len(data.gene_ids)
        for metric, values in _expected(data).items():
            np.testing.assert_allclose(row.metrics[metric].quantiles, np.quantile(values, QUANTILES), rtol=1e-5)
    studies = {r.key: r for r in report.studies}
    b_keys = [k for k in reported.samples if k.startswith("study_b/")]
    assert studies["study_b"].cells == sum(reported.samples[k].counts.shape[0] for k in b_keys)
    assert studies["study_b"].genes_measured == len({g for k in b_keys for g in reported.samples[k].gene_ids})
    umis = np.concatenate([_expected(reported.samples[k])["umis"] for k in b_keys])
    np.testing.assert_allclose(studies["study_b"].metrics["umis"].quantiles, np.quantile(umis, QUANTILES))
    assert sum(studies["study_b"].metrics["umis"].histogram) == len(umis)
    every = [set(d.gene_ids) for d in reported.samples.values()]
    o = report.overview
    assert (o["studies"], o["samples"], o["cells"]) == (2, 5, 139)
    assert o["genes_measured_by_any"] == len(set.union(*every)) == o["genes"]
    assert o["genes_measured_by_all"] == len(set.intersection(*every))
    assert o["verify"]["passed"] is True and o["last_apply"]["serial"] == report.history[-1]["serial"]
    assert o["storage_bytes"] > 0 and o["fragments"] > 0
    assert [h["cells_total"] for h in report.history] == [105, 139]
    assert report.history[0]["tags"] == ["v1"]


def test_outliers_are_marked_by_the_stated_rules(reported: Project) -> None:
    report = api.load(reported.manifest).report()
    flags = {r.key: r.flags for r in report.samples if r.flags}
    assert flags == {"study_b/tiny": ["few cells"], "study_b/mito": ["high mito"]}
    assert {r.key: r.flags for r in report.studies} == {"study_a": [], "study_b": ["few cells", "high mito"]}
    assert set(report.rules) == {"few cells", "high mito", "unmapped"}


def test_cells_are_placed_by_joinid_or_by_obs_id_alike(reported: Project) -> None:
    """The samples table's joinid ranges and the obs_id prefixes (atlases read before the samples table) agree."""
    from soma_manifest.qc_report import _cells_by_sample, _samples_table

    with api.load(reported.manifest).open() as exp:
        by_range = _cells_by_sample(exp, _samples_table(exp), ["umi_counts"])
        by_id = _cells_by_sample(exp, None, ["umi_counts"])
    assert "obs_id" not in by_range[0].column_names and "obs_id" in by_id[0].column_names
    assert by_range[1] == by_id[1] == sorted(reported.samples)
    assert by_range[2].tolist() == by_id[2].tolist()
    assert by_range[0]["umi_counts"].equals(by_id[0]["umi_counts"])


def test_report_as_a_tag_left_it_and_its_cli(reported: Project, tmp_path: Path) -> None:
    then = api.load(reported.manifest).report(tag="v1")
    assert [r.key for r in then.samples] == ["study_a/s1", "study_a/s2", "study_b/s1"]
    assert [h["cells_total"] for h in then.history] == [105] and then.overview["cells"] == 105

    out = tmp_path / "nested" / "r.html"
    result = invoke_cli("report", reported.manifest, "--out", out, "--tag", "v1")
    assert result.returncode == 0, result.stderr
    assert "3 samples, 105 cells" in result.stderr and "(tag v1)" in out.read_text()
    shown = json.loads(invoke_cli("report", reported.manifest, "--json").stdout)
    assert shown["overview"]["cells"] == 139 and len(shown["samples"]) == 5
    assert shown["samples"][0]["metrics"]["umis"]["quantiles"] == then.samples[0].metrics["umis"].quantiles
    refused = invoke_cli("report", reported.manifest, "--serial", "999")
    assert refused.returncode == 1 and "no apply with serial 999" in refused.stderr
    refused = invoke_cli("report", reported.manifest, "--tag", "nope")
    assert refused.returncode == 1 and "no tag 'nope' (tags: v1)" in refused.stderr


def test_browser_check_catches_errors_and_the_network_is_off(tmp_path: Path) -> None:
    """The check the report passes below can fail: a console error and an external load are both caught."""
    require_chromium()
    page = tmp_path / "bad.html"
    page.write_text("<html><body><img src='http://example.com/x.png'>"
                    "<script>console.error('boom'); undefinedFunction();</script></body></html>")
    found = open_page(page.as_uri(), ["document.images.length"], tmp_path / "bad.png")
    text = "\n".join(found.errors)
    assert "console: boom" in text and "undefinedFunction" in text
    assert "ERR_PROXY_CONNECTION_FAILED" in text or "example.com" in text, text


def test_report_renders_in_chromium_offline(reported: Project, tmp_path: Path) -> None:
    require_chromium()
    report = api.load(reported.manifest).report()
    html = render(report)
    assert "http://" not in html and "https://" not in html, "the page must not reference the network"
    path = tmp_path / "atlas-report.html"
    path.write_text(html)
    shot = tmp_path / "atlas-report.png"
    page = open_page(path.as_uri(), [
        "Array.from(document.querySelectorAll('figure.fig')).map(f => "
        "[f.id, f.querySelectorAll('svg rect, svg polygon, svg circle').length, "
        "f.querySelector('svg').getBoundingClientRect().height])",
        "(function () { var t = document.getElementById('table-samples'), th = t.tHead.rows[0].cells[2];"
        "  var order = function () { return Array.from(t.tBodies[0].rows).map(r => r.cells[0].textContent); };"
        "  th.click(); var up = order(); th.click(); return [up, order()]; })()",
        "Array.from(document.querySelectorAll('#table-samples tr.flagged td:first-child')).map(td => td.textContent)",
    ], shot, size=(1600, 1400))
    assert page.errors == []
    figures = {fid: (shapes, height) for fid, shapes, height in page.results[0]}
    assert list(figures) == figure_ids(report)
    for fid, (shapes, height) in figures.items():
        assert height > 50, f"{fid} is not drawn"
        # one box (rect) or bar per row at least; violins add polygons; the history one circle per apply
        rows = {"study": len(report.studies), "sample": len(report.samples), "applies": len(report.history)}
        assert shapes >= next(n for word, n in rows.items() if word in fid), (fid, shapes)
    ascending, descending = page.results[1]
    cells = {r.key: r.cells for r in report.samples}
    assert [cells[k] for k in ascending] == sorted(cells.values())
    assert [cells[k] for k in descending] == sorted(cells.values(), reverse=True)
    assert sorted(page.results[2]) == ["study_b/mito", "study_b/tiny"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

"""Release tags: set, move, list, delete through the CLI and the API; a tagged apply outlives a
`keep_history: {applies: 1}` compaction and reads back cell by cell; tags move only under the lock; the same
on S3."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from conftest import Project, apply_ok, invoke_cli, make_sample, read_state, run_cli
from s3server import S3Server
from soma_manifest import api
from soma_manifest.lock import AtlasLock, lock_path
from soma_manifest.state import FORMAT_VERSION
from test_compact import assert_same, change_everything, snapshot
from test_s3 import _apply, _lock_object, _project


def _ok(*args: str | Path) -> str:
    result = invoke_cli(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _refused(*args: str | Path) -> str:
    result = invoke_cli(*args)
    assert result.returncode == 1, result.stdout
    return result.stderr


def test_tag_set_move_list_delete_and_refusals(applied: Project) -> None:
    m = applied.manifest
    first = read_state(applied).history[-1].serial
    assert "Tagged apply" in _ok("tag", m, "v1.0") and f"v1.0  serial {first}" in _ok("tag", m, "--list")
    applied.add_mtx("study_b", "s2", make_sample(25, 20, seed=12, gene_offset=40))
    apply_ok(applied)
    second = read_state(applied).history[-1].serial
    assert _ok("tag", m, "stable", "--serial", str(first)).strip() == f"Tagged apply {first} as stable."
    assert _ok("tag", m, "stable").strip() == f"Tagged apply {second} as stable (moved from apply {first})."
    assert _ok("tag", m, "--list").splitlines() == ["stable  serial " + str(second), f"v1.0  serial {first}"]
    assert api.load(m).tags() == {"stable": second, "v1.0": first}
    listing = _ok("history", m).splitlines()
    assert listing[0].endswith("tags: v1.0") and listing[1].endswith("tags: stable")
    rows = json.loads(_ok("history", m, "--json"))["history"]
    assert [r["tags"] for r in rows] == [["v1.0"], ["stable"]]

    shown = _ok("show", m, "--summary", "--tag", "v1.0")
    assert f"as apply {first} (v1.0) left it: 105 cells" in shown
    assert "study_b/s2" not in shown.split("left it:")[1] and "study_a/s2: 35 cells" in shown
    assert "tiledb_timestamp=" in shown

    assert "invalid tag name '3'" in _refused("tag", m, "3")
    assert "no apply with serial 999" in _refused("tag", m, "x", "--serial", "999")
    assert "no tag 'gone' (tags: stable, v1.0)" in _refused("tag", m, "--delete", "gone")
    usage = run_cli("tag", m, "a", "--list")  # usage errors: exit 1 from the real entry point
    assert usage.returncode == 1 and "give one of NAME, --delete NAME or --list" in usage.stderr
    usage = run_cli("show", m, "--tag", "v1.0")
    assert usage.returncode == 1 and "--serial and --tag need --summary" in usage.stderr
    assert "give a serial or a tag, not both" in _refused("show", m, "--summary", "--tag", "v1.0", "--serial", "1")
    assert _ok("tag", m, "--delete", "v1.0").strip() == f"Deleted tag v1.0 (it named apply {first})."
    assert read_state(applied).tags == {"stable": second}
    assert read_state(applied).format_version == FORMAT_VERSION  # tags came with format 2; 3 keeps them


def test_tags_move_only_under_the_lock(applied: Project) -> None:
    before = read_state(applied)
    with AtlasLock(lock_path(applied.state_path)):
        assert "the atlas is locked by" in _refused("tag", applied.manifest, "v1")
    after = read_state(applied)
    assert after.tags == {} and after.serial == before.serial


def test_a_tagged_apply_outlives_compaction_and_reads_back_cell_by_cell(applied: Project) -> None:
    first = read_state(applied).history[-1]
    then = snapshot(applied, first.timestamp_ms)
    atlas = api.load(applied.manifest)
    assert atlas.tag("release") == first.serial
    change_everything(applied)  # replace, remove, re-annotate, add: cells deleted after the tagged apply
    apply_ok(applied, "--allow-delete")
    now = snapshot(applied, None)

    applied.write_manifest(extra="compaction:\n  keep_history: {applies: 1}\n")
    result = invoke_cli("compact", applied.manifest)
    assert result.returncode == 0, result.stderr
    assert "deleted cells purged" not in result.stdout, "the tagged apply needs the deleted cells"
    rows = api.load(applied.manifest).history()
    assert [(r["serial"], r["readable"], r["kept"], r["tags"]) for r in rows] == [
        (first.serial, True, True, ["release"]), (rows[1]["serial"], True, True, [])]
    assert_same(snapshot(applied, first.timestamp_ms), then)
    assert_same(snapshot(applied, None), now)

    atlas = api.load(applied.manifest)
    with atlas.open(tag="release") as exp:
        assert exp.obs.count == 105
    old = atlas.to_anndata(tag="release")
    expected = then[0]["obs_id"].tolist()
    assert sorted(old.obs_names) == expected
    x = sp.coo_matrix(old.X)
    entries = {(old.obs_names[i], old.var_names[j]): v for i, j, v in zip(x.row, x.col, x.data)}
    raw = then[1][then[1]["layer"] == "raw"]
    assert entries == dict(zip(zip(raw["obs_id"], raw["var_id"]), raw["soma_data"]))
    s2 = atlas.to_anndata(samples=["study_a/s2"], tag="release")  # removed since: read as the tag left it
    assert s2.n_obs == 35 and np.isin(s2.obs_names, expected).all()

    # Without the tag nothing keeps that apply: the next compaction purges and it is gone.
    atlas.tag("release", delete=True)
    result = invoke_cli("compact", applied.manifest)
    assert result.returncode == 0 and "deleted cells purged" in result.stdout
    assert "no longer readable" in _refused("show", applied.manifest, "--summary", "--serial", str(first.serial))
    assert "no longer readable" in _refused("tag", applied.manifest, "again", "--serial", str(first.serial))


def test_a_state_of_format_1_loads_and_is_written_as_3(applied: Project) -> None:
    raw = json.loads(applied.state_path.read_text())
    raw["format_version"] = 1
    del raw["tags"]
    applied.state_path.write_text(json.dumps(raw))
    assert read_state(applied).tags == {}
    _ok("tag", applied.manifest, "v1")
    written = json.loads(applied.state_path.read_text())
    assert written["format_version"] == 3 and list(written["tags"]) == ["v1"]


def test_tags_on_s3(tmp_path: Path, s3_server: S3Server) -> None:
    p = _project(tmp_path, s3_server)
    _apply(p)
    m = p.manifest
    assert "Tagged apply" in _ok("tag", m, "v1")

    def stored() -> dict:
        body = p.server.client().get_object(Bucket=p.bucket, Key="atlases/atlas.state.json")["Body"].read()
        return json.loads(body)["tags"]

    first = stored()["v1"]
    p.add_mtx("study_b", "s2", make_sample(20, 25, seed=7, gene_offset=40))
    p.upload()
    _apply(p)
    assert _ok("tag", m, "--list").strip() == f"v1  serial {first}"
    assert _ok("history", m).splitlines()[0].endswith("tags: v1")
    assert f"as apply {first} (v1) left it: 105 cells" in _ok("show", m, "--summary", "--tag", "v1")
    numbers = json.loads(_ok("report", m, "--tag", "v1", "--json"))
    assert numbers["overview"]["cells"] == 105 and numbers["overview"]["storage_bytes"] is None
    changes = json.loads(_ok("diff", m, "--from", "v1", "--json"))
    assert [(s["key"], s["change"]) for s in changes["samples"]] == [("study_b/s2", "added")]
    assert api.load(m).to_anndata(tag="v1").n_obs == 105

    _lock_object(p, expires=time.time() + 600)
    assert "locked by pid 4242" in _refused("tag", m, "v2")
    assert stored() == {"v1": first}
    _ok("unlock", m)
    _ok("tag", m, "--delete", "v1")
    assert stored() == {}
    assert "atlases/atlas.state.json.lock" not in p.objects()

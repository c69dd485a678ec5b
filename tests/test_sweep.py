"""Leftovers of killed runs (temp files, atlas scratch folders) are swept by the next apply that holds the lock:
only our own names, only in the folders we write to."""

from __future__ import annotations

import os
import time

from conftest import Project, apply_ok


def test_the_next_apply_sweeps_our_leftovers_only(applied: Project) -> None:
    atlases, h5ads = applied.root / "atlases", applied.root / "h5ads"
    hex32 = "0123456789abcdef" * 2
    ours = [atlases / ".atlas.state.json.k3j_x9a2.tmp", atlases / ".atlas.state.json.k3j_x9a2.tmp.prev",
            atlases / f".atlas.state.json.lock.{hex32}.tmp", atlases / f"atlas.state.json.lock.stale-{hex32}",
            h5ads / "study_a" / ".s1.h5ad.4242.tmp", h5ads / "study_b" / ".gone.h5ad.77.tmp"]
    scratch = atlases / ".atlas.creating-q8w1e2r3"
    theirs = [atlases / "notes.tmp", atlases / ".other.state.json.k3j_x9a2.tmp", h5ads / "study_a" / "mine.tmp",
              atlases / f".atlas.state.json.lock.{'f' * 32}.tmp"]  # too recent: an apply may be linking it in
    other_scratch = atlases / ".other.creating-q8w1e2r3"
    for path in ours + theirs:
        path.write_bytes(b"partial")
    old = time.time() - 3600
    for path in ours[2:4]:
        os.utime(path, (old, old))
    for folder in (scratch, other_scratch):
        (folder / "atlas" / "obs").mkdir(parents=True)
        (folder / "atlas" / "obs" / "__schema").write_bytes(b"x")

    result = apply_ok(applied)
    for path in ours + [scratch]:
        assert not path.exists(), path
        assert f"Removed {path}, left by an interrupted run." in result.stderr
    for path in theirs + [other_scratch]:
        assert path.exists(), path
    assert "No changes" in result.stderr
    assert apply_ok(applied).stderr.count("Removed") == 0

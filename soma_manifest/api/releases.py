"""Atlas operations on its applies: history, release tags, the QC report, diffs, compaction."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from soma_manifest.api.base import AtlasBase
from soma_manifest.reports import CompactionReport

if TYPE_CHECKING:
    from soma_manifest.diff import AtlasDiff
    from soma_manifest.qc_report import AtlasReport


class Releases(AtlasBase):
    """The history, tag, report, diff and compaction operations of `Atlas` (api/__init__.py composes them)."""

    def tags(self) -> dict[str, int]:
        """The release tags: name -> the serial of the apply it names (see `history()`)."""
        return dict(sorted(self.require_state().tags.items()))

    def tag(self, name: str, serial: int | None = None, *, delete: bool = False) -> int:
        """Name apply `serial` (default: the last apply) `name`, under the atlas lock; an existing tag moves.
        A tagged apply stays readable whatever compaction.keep_history says. delete: remove the tag instead.
        Returns the serial tagged (or that the deleted tag named). StateError for an unknown serial or tag, an
        invalid name, or an apply a compaction already made unreadable."""
        from soma_manifest import tags
        from soma_manifest.lock import AtlasLock, lock_path

        tags.check_name(name)
        self.require_state()
        with AtlasLock(lock_path(self.manifest.state_path)):
            if delete:
                return tags.delete_tag(self.manifest, name)
            return tags.set_tag(self.manifest, name, serial)[0]

    def report(self, serial: int | None = None, tag: str | None = None, *, verify: bool = False) -> AtlasReport:
        """The QC report's numbers (obs, samples table, presence matrix, state and history; never X), as the
        atlas is now or as apply `serial` / tag `tag` left it. verify: also run `verify()` (it counts X
        entries; the atlas now only); else the report gives the check the last apply read made of what it wrote.
        Render with `write_report(...)` (the HTML page) or `report.to_json()`."""
        from soma_manifest.qc_report import gather

        state = self.require_state()
        serial = self._serial(serial, tag)
        problems = self.verify() if verify and serial is None else None
        with self._experiment(serial) as exp:
            return gather(self.uri, self.schema, state, exp, serial=serial, tag=tag, verify_problems=problems,
                          keep=self.manifest.spec.compaction.keep_history)

    def write_report(self, out: str | os.PathLike[str], serial: int | None = None, tag: str | None = None, *,
                     verify: bool = False) -> tuple[AtlasReport, str]:
        """`report(...)` rendered as one self-contained HTML page and stored at `out` (a path, relative to the
        current folder, or an s3:// URI) in one atomic write. Returns the report and where it went."""
        from soma_manifest import storage
        from soma_manifest.qc_page import render

        result = self.report(serial, tag, verify=verify)
        where = storage.resolve(os.fspath(out), os.getcwd())
        storage.write_atomic(where, render(result).encode("utf-8"))
        return result, str(where)

    def diff(self, from_ref: str | int | None = None, to_ref: str | int | None = None) -> AtlasDiff:
        """What changed between two applies, given as serials or tags (default: the last two applies):
        samples added, removed, replaced and updated, cells per study before and after, genes added, schema
        changes. Render with `soma_manifest.diff.markdown(d)` or `d.to_json()`."""
        from soma_manifest.diff import compare

        return compare(self.uri, self.require_state(), from_ref, to_ref)

    def history(self) -> list[dict]:
        """The applies that changed the atlas, oldest first: each history entry of the state, plus `readable`
        (can still be opened with `open(serial=...)`), `kept` (retained by compaction.keep_history or a tag)
        and `tags` (its release tags)."""
        from soma_manifest import history as hist
        from soma_manifest.tags import tagged

        state = self.require_state()
        kept = hist.kept_serials(state, self.manifest.spec.compaction.keep_history)
        names = tagged(state)
        return [{**e.model_dump(), "readable": hist.is_readable(state, e), "kept": e.serial in kept,
                 "tags": names.get(e.serial, [])} for e in state.history]

    def compact(self) -> CompactionReport | None:
        """Consolidate and vacuum every array of the atlas under the lock; None when there is no atlas yet.
        The applies that compaction.keep_history retains stay readable."""
        from soma_manifest import atlas
        from soma_manifest import compact as compaction
        from soma_manifest.lock import AtlasLock, lock_path
        from soma_manifest.verify import open_state

        with AtlasLock(lock_path(self.manifest.state_path)):
            state = open_state(self.manifest, self.require_state(), self.schema)
            if not atlas.atlas_exists(self.uri):
                return None
            return compaction.compact(self.manifest, state)

"""What changed between two applies of the history (`soma-manifest diff`), for release notes and pull requests.

Samples and cells come from obs as each apply left it (TileDB time travel): a sample is `<study>/<sample>`,
the obs_id prefix. Every ingest gets a fresh joinid range, so a sample present at both applies whose first
joinid differs was replaced; `updated` (obs rewritten in place, same joinids) comes from the history entries
between the two, as do schema changes (the conversion fingerprint each apply ran with; columns and layers added
or dropped in place also change it, and the history entry names them under `schema changed`). Never reads X.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from soma_manifest.errors import StateError
from soma_manifest.history import timestamp_of
from soma_manifest.render import MAX_ROWS
from soma_manifest.state import HistoryEntry, State
from soma_manifest.tags import parse_ref, tagged

#: Genes listed by name in markdown (JSON lists them all).
GENES_SHOWN = 20


@dataclass(frozen=True)
class Side:
    """One end of a diff: an apply, or (serial None) the empty atlas before the first apply."""

    serial: int | None
    tags: list[str]
    finished_at: str | None
    cells: int
    genes: int

    def label(self) -> str:
        if self.serial is None:
            return "the empty atlas"
        return f"apply {self.serial}" + (f" ({', '.join(self.tags)})" if self.tags else "")


@dataclass(frozen=True)
class SampleChange:
    key: str
    change: str  # added | removed | replaced | updated
    cells_before: int | None
    cells_after: int | None


@dataclass(frozen=True)
class StudyCells:
    study: str
    cells_before: int
    cells_after: int


@dataclass(frozen=True)
class SchemaChange:
    serial: int
    text: str


@dataclass
class AtlasDiff:
    before: Side
    after: Side
    samples: list[SampleChange] = field(default_factory=list)  # by change, then key
    studies: list[StudyCells] = field(default_factory=list)
    genes_added: list[str] = field(default_factory=list)  # var ids, in var order
    schema: list[SchemaChange] = field(default_factory=list)

    def count(self, change: str) -> int:
        return sum(1 for s in self.samples if s.change == change)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["summary"] = {c: self.count(c) for c in _CHANGES} | {
            "cells_before": self.before.cells, "cells_after": self.after.cells,
            "genes_before": self.before.genes, "genes_after": self.after.genes, "genes_added": len(self.genes_added)}
        return data

    def to_markdown(self) -> str:
        """For a pull request comment or release notes (also the CLI's text output)."""
        return markdown(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


_CHANGES = ("added", "removed", "replaced", "updated")


def compare(uri: str, state: State, from_ref: str | int | None, to_ref: str | int | None) -> AtlasDiff:
    """The diff between two applies given as serials or tags (default: the last two; with one apply, the
    empty atlas and that apply). StateError for an unknown or unreadable apply."""
    if not state.history:
        raise StateError("no applies recorded yet: nothing to compare", hint="run `soma-manifest apply` first")
    after = _entry(state, to_ref, default=state.history[-1])
    assert after is not None
    earlier = [e for e in state.history if e.serial < after.serial]
    before = _entry(state, from_ref, default=earlier[-1] if earlier else None)
    old, old_genes = _read(uri, state, before)
    new, new_genes = _read(uri, state, after)
    names = tagged(state)
    diff = AtlasDiff(before=_side(before, names, old, old_genes), after=_side(after, names, new, new_genes))
    between = _between(state, before, after)
    updated = {key for e in between for key in e.changes.get("updated", [])}
    changes = []
    for key in sorted(set(old) | set(new)):
        was, now = old.get(key), new.get(key)
        if was is None or now is None:
            change = "added" if was is None else "removed"
        elif was[1] != now[1]:
            change = "replaced"
        elif key in updated:
            change = "updated"
        else:
            continue
        changes.append(SampleChange(key, change, was[0] if was else None, now[0] if now else None))
    diff.samples = sorted(changes, key=lambda c: (_CHANGES.index(c.change), c.key))
    studies = sorted({k.split("/", 1)[0] for k in (*old, *new)})
    diff.studies = [StudyCells(s, _study_cells(old, s), _study_cells(new, s)) for s in studies]
    known = set(old_genes)
    diff.genes_added = [g for g in new_genes if g not in known]
    diff.schema = _schema_changes(state, between)
    return diff


def _entry(state: State, ref: str | int | None, default: HistoryEntry | None) -> HistoryEntry | None:
    if ref is None:
        return default
    serial = ref if isinstance(ref, int) else parse_ref(state, ref)
    timestamp_of(state, serial)  # refuses an unknown or unreadable apply, saying why
    return next(e for e in state.history if e.serial == serial)


def _read(uri: str, state: State, entry: HistoryEntry | None) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Per sample key: (cells, first obs joinid); and the var ids in joinid order: as `entry` left the atlas."""
    if entry is None:
        return {}, []
    import pyarrow as pa
    import pyarrow.compute as pc

    from soma_manifest.atlas import open_experiment

    with open_experiment(uri, entry.timestamp_ms) as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "obs_id"]).concat()
        (ms,) = exp.ms.values()
        var = ms.var.read(column_names=["soma_joinid", "var_id"]).concat().sort_by("soma_joinid")
    keys = pc.replace_substring_regex(obs["obs_id"], pattern="/[^/]*$", replacement="")
    grouped = pa.table({"key": keys, "joinid": obs["soma_joinid"]}).group_by("key").aggregate(
        [("joinid", "count"), ("joinid", "min")])
    samples = {k: (n, first) for k, n, first in zip(grouped["key"].to_pylist(), grouped["joinid_count"].to_pylist(),
                                                     grouped["joinid_min"].to_pylist())}
    return samples, var["var_id"].to_pylist()


def _side(entry: HistoryEntry | None, names: dict[int, list[str]], samples: dict[str, tuple[int, int]],
          genes: list[str]) -> Side:
    return Side(serial=entry.serial if entry else None, tags=names.get(entry.serial, []) if entry else [],
                finished_at=entry.finished_at if entry else None,
                cells=sum(n for n, _ in samples.values()), genes=len(genes))


def _between(state: State, before: HistoryEntry | None, after: HistoryEntry) -> list[HistoryEntry]:
    """The applies after the older end, up to and including the newer one (either end may be the older)."""
    low = min(before.serial, after.serial) if before is not None else -1
    high = max(before.serial, after.serial) if before is not None else after.serial
    return [e for e in state.history if low < e.serial <= high]


def _study_cells(samples: dict[str, tuple[int, int]], study: str) -> int:
    return sum(n for key, (n, _) in samples.items() if key.split("/", 1)[0] == study)


def _schema_changes(state: State, between: list[HistoryEntry]) -> list[SchemaChange]:
    """The applies among `between` that ran with another conversion fingerprint than the apply before them."""
    previous = {e.serial: p for p, e in zip(state.history, state.history[1:])}
    found = []
    for entry in between:
        prior = previous.get(entry.serial)
        if prior is None or not (prior.schema_conversion and entry.schema_conversion):
            continue
        in_place = entry.changes.get("schema changed")
        if in_place:
            found.append(SchemaChange(entry.serial, f"schema changed in place: {', '.join(in_place)}"))
        elif prior.schema_conversion != entry.schema_conversion:
            found.append(SchemaChange(entry.serial, "the schema's conversion changed (its sources, defaults, QC "
                                                    "prefixes, feature types or genes): samples were re-converted "
                                                    "(replaced, or their obs rows rewritten when their counts "
                                                    "stand)"))
    return found


def markdown(diff: AtlasDiff) -> str:
    """For a pull request comment or release notes."""
    b, a = diff.before, diff.after
    lines = [f"### Atlas changes: {b.label()} → {a.label()}", ""]
    counts = ", ".join(f"{diff.count(c)} {c}" for c in _CHANGES)
    lines += [f"**Samples:** {counts}. **Cells:** {b.cells:,} → {a.cells:,} ({a.cells - b.cells:+,}). "
              f"**Genes:** {b.genes:,} → {a.genes:,} ({len(diff.genes_added):+,} added).", ""]
    if diff.studies:
        lines += ["| study | cells before | cells after | change |", "|---|---:|---:|---:|"]
        lines += [f"| {s.study} | {s.cells_before:,} | {s.cells_after:,} | {s.cells_after - s.cells_before:+,} |"
                  for s in diff.studies]
        lines.append("")
    if diff.samples:
        lines += ["| sample | change | cells before | cells after |", "|---|---|---:|---:|"]
        lines += [f"| `{s.key}` | {s.change} | {_n(s.cells_before)} | {_n(s.cells_after)} |"
                  for s in diff.samples[:MAX_ROWS]]
        if len(diff.samples) > MAX_ROWS:  # a GitHub comment holds at most 65,536 characters
            lines.append(f"\n{len(diff.samples) - MAX_ROWS:,} more sample changes: see `diff --json`.")
    else:
        lines.append("No sample changed.")
    lines.append("")
    if diff.genes_added:
        shown = ", ".join(f"`{g}`" for g in diff.genes_added[:GENES_SHOWN])
        more = f" and {len(diff.genes_added) - GENES_SHOWN:,} more" if len(diff.genes_added) > GENES_SHOWN else ""
        lines += [f"**Genes added ({len(diff.genes_added):,}):** {shown}{more}.", ""]
    if diff.schema:
        lines += ["**Schema:**"] + [f"- apply {c.serial}: {c.text}" for c in diff.schema]
    else:
        lines.append("**Schema:** unchanged.")
    return "\n".join(lines)


def _n(value: int | None) -> str:
    return "" if value is None else f"{value:,}"

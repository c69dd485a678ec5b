"""Apply history: one state entry per apply that changed the atlas, with the TileDB timestamp to read
the atlas as that apply left it, and which entries compaction keeps readable."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from soma_manifest import __version__
from soma_manifest.errors import StateError
from soma_manifest.manifest import KeepHistory, LoadedManifest
from soma_manifest.plan import Action, Plan
from soma_manifest.reports import ApplyReport
from soma_manifest.state import HistoryEntry, State, save_state

# Plan kinds as history words: resumed and retried samples may be new or replacements.
_WORDS = {"add": "added", "ingest": "added", "replace": "replaced", "update": "updated", "remove": "removed",
          "resume": "resumed", "retry": "retried", "cleanup": "cleaned up"}


def record(manifest: LoadedManifest, plan: Plan, state: State, report: ApplyReport,
           timestamp_ms: int) -> HistoryEntry | None:
    """At the end of an apply: add its entry to the state and save it, if the apply changed the atlas.

    `timestamp_ms` is after the apply's last write and before any later one (atlas.settled_timestamp).
    """
    changes: dict[str, list[str]] = {}
    cells_added = cells_deleted = 0
    for action in plan.actions:
        if not _succeeded(action, report, state):
            continue
        changes.setdefault(_WORDS[action.kind], []).append(action.key)
        entry = state.samples.get(action.key)
        if action.ingests and entry is not None:
            cells_added += entry.atlas_cells or 0
        cells_deleted += _cells_deleted(action)
    if plan.schema_changes and not plan.create_atlas:  # made in place, before any sample step (apply/evolve.py)
        changes["schema changed"] = [c.short for c in plan.schema_changes]
    if not changes and not report.created_atlas:
        return None
    finished = datetime.now(timezone.utc)
    started = finished - timedelta(seconds=report.seconds.get("total", 0.0))
    entry = HistoryEntry(
        serial=state.serial + 1,  # save_state bumps it
        started_at=started.isoformat(timespec="seconds"), finished_at=finished.isoformat(timespec="seconds"),
        timestamp_ms=timestamp_ms, changes=changes, cells_added=cells_added, cells_deleted=cells_deleted,
        cells_total=sum(s.atlas_cells or 0 for s in state.samples.values() if s.ingest == "done"),
        manifest_digest=manifest.digest, tool_version=__version__, schema_conversion=plan.schema_conversion,
        verified=not report.verify_problems)
    state.history.append(entry)
    save_state(state, manifest.state_path)
    return entry


def _succeeded(action: Action, report: ApplyReport, state: State) -> bool:
    if action.kind == "remove":
        return action.key in report.removed
    if action.kind == "cleanup":
        return action.delete_range is not None and action.delete_range not in state.orphans
    return action.kind != "invalid" and action.key in report.succeeded


def _cells_deleted(action: Action) -> int:
    """Cells this (succeeded) action took out of the atlas: an old version, a removed sample, orphans."""
    if action.delete_range and (action.ingests or action.kind in ("remove", "cleanup")):
        return action.delete_range[1] - action.delete_range[0]
    return (action.cells or 0) if action.kind == "remove" else 0


def kept_serials(state: State, keep: KeepHistory) -> set[int]:
    """The applies kept readable: the last `applies` ones, those of the last `days`, and every tagged one."""
    kept = {e.serial for e in state.history[-keep.applies:]} if keep.applies else set()
    kept |= set(state.tags.values())
    if keep.days:
        since = (datetime.now(timezone.utc) - timedelta(days=keep.days)).isoformat(timespec="seconds")
        kept |= {e.serial for e in state.history if e.finished_at >= since}
    return kept


def oldest_kept_timestamp(state: State, keep: KeepHistory) -> int | None:
    """The timestamp compaction must keep the atlas readable from; None when no apply is kept."""
    kept = kept_serials(state, keep)
    stamps = [e.timestamp_ms for e in state.history if e.serial in kept]
    return min(stamps) if stamps else None


def is_readable(state: State, entry: HistoryEntry) -> bool:
    """Whether the atlas still reads exactly as this apply left it (no purge removed cells it held)."""
    purged = state.compaction.purged_until_ms
    return purged is None or entry.timestamp_ms >= purged


def timestamp_of(state: State, serial: int) -> int:
    """The TileDB timestamp (ms) to open the atlas at to read it as apply `serial` left it."""
    entry = next((e for e in state.history if e.serial == serial), None)
    if entry is None:
        known = ", ".join(str(e.serial) for e in state.history[-10:]) or "none yet"
        raise StateError(f"no apply with serial {serial} in the history (the last ones: {known})",
                         hint="`soma-manifest history` lists the applies and their serials")
    if not is_readable(state, entry):
        raise StateError(f"apply {serial} is no longer readable: a compaction purged cells deleted after it",
                         hint="compaction.keep_history sets which applies stay readable; "
                              "`soma-manifest history` says which are")
    return entry.timestamp_ms


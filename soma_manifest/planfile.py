"""The saved plan (`plan --out`, `apply PLAN`): its file, its format version, and whether it is stale.

A saved plan is the plan's JSON, written and read through storage, so it may be a local file or an
s3:// object. An s3:// plan is read with the environment's object-store settings (AWS_ENDPOINT_URL, ...):
the manifest that names the endpoint is known only once the plan is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import ValidationError

from soma_manifest import storage
from soma_manifest.errors import PlanError
from soma_manifest.plan import PLAN_FORMAT_VERSION, Plan
from soma_manifest.storage import Location

_KIND = "soma-manifest-plan"
_REPLAN = "run `soma-manifest plan --out` again and review the new plan"


def save_plan(plan: Plan, where: str | os.PathLike[str]) -> None:
    """Write the plan's JSON to `where` in one step (a crash leaves the old file or the new one)."""
    storage.write_atomic(_location(where), (plan.to_json() + "\n").encode())


def read_saved_plan(where: str | os.PathLike[str]) -> Plan | None:
    """The plan saved at `where`; None when `where` is not a saved plan (a manifest: its loader says what
    is wrong with it). PlanError for a plan of another format version or an invalid one."""
    loc = _location(where)
    if loc.suffix.lower() in (".yaml", ".yml"):
        return None
    data = storage.read_bytes(loc, missing_ok=True)
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("kind") != _KIND:
        return None
    version = doc.get("format_version")
    if version != PLAN_FORMAT_VERSION:
        older = isinstance(version, int) and not isinstance(version, bool) and version < PLAN_FORMAT_VERSION
        raise PlanError(
            f"plan format version {version} is " + ("older than" if older else "not")
            + f" the one this soma-manifest applies ({PLAN_FORMAT_VERSION})"
            + (": the plan was made by an older soma-manifest and is stale" if older else ""),
            where=loc, hint="make the plan again with `soma-manifest plan --out` of the soma-manifest that applies it")
    try:
        return Plan.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PlanError(f"not a valid plan: {'.'.join(map(str, first['loc']))}: {first['msg']}", where=loc,
                        hint="make it again with `soma-manifest plan --out`") from None


def _location(where: str | os.PathLike[str]) -> Location:
    """An s3:// URI as it is; a local path made absolute (relative to the working directory)."""
    return storage.resolve(os.fspath(where), os.getcwd())


def manifest_of(saved: Plan) -> Path:
    """The saved plan's manifest: named relative to where plan ran, so apply runs there too."""
    path = Path(saved.manifest)
    if not path.is_file():
        raise PlanError(f"the plan's manifest {saved.manifest} is not found here", where=Path.cwd(),
                        hint="run apply in the directory plan ran in (in CI: the repository root)")
    return path


def check_saved_plan(saved: Plan, current: Plan) -> None:
    """Refuse a saved plan that no longer describes what apply would do now, saying why."""
    if (saved.atlas, saved.state) != (current.atlas, current.state):
        raise PlanError(f"the plan is for the atlas {saved.atlas} (state {saved.state}), but the manifest now "
                        f"points at {current.atlas} (state {current.state})", where=current.manifest,
                        hint="relative storage paths follow the manifest's folder: apply where the plan was made, "
                             "or plan again")
    if saved.lineage != current.lineage:
        def state_of(lineage: str | None) -> str:
            return f"the state of lineage {lineage}" if lineage else "no state file"

        raise PlanError(f"the plan is stale: it was made against {state_of(saved.lineage)}, there is now "
                        f"{state_of(current.lineage)}; the state file was created, replaced or removed since",
                        where=current.state, hint=_REPLAN)
    if saved.serial != current.serial:
        raise PlanError(f"the plan is stale: it was made against state serial {saved.serial}, the state is now at "
                        f"serial {current.serial}; another apply has run since", where=current.state, hint=_REPLAN)
    if saved.manifest_digest != current.manifest_digest:
        raise PlanError("the plan is stale: the manifest changed since it was made", where=current.manifest,
                        hint=_REPLAN)
    if (saved.schema_structure, saved.schema_conversion) != (current.schema_structure, current.schema_conversion):
        raise PlanError("the plan is stale: the schema changed since it was made", where=current.schema_path,
                        hint=_REPLAN)
    if saved.comparable() != current.comparable():
        changes = _plan_changes(saved, current) or ["the samples to change differ"]
        more = f" and {len(changes) - 5} more" if len(changes) > 5 else ""
        raise PlanError(f"the plan is stale: {'; '.join(changes[:5])}{more}", where=current.manifest, hint=_REPLAN)


def _plan_changes(saved: Plan, current: Plan) -> list[str]:
    """What would be done differently now, one phrase per sample."""
    changes = []
    if saved.create_atlas != current.create_atlas:
        changes.append("the atlas was created since" if saved.create_atlas else "the atlas is gone")
    old = {a.key: a for a in saved.actions}
    new = {a.key: a for a in current.actions}
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if before is None:
            changes.append(f"{key} now needs {after.kind}")
        elif after is None:
            changes.append(f"{key} no longer needs {before.kind}")
        elif before.raw_digest != after.raw_digest:
            changes.append(f"raw data of {key} changed")
        elif before.meta_digest != after.meta_digest:
            changes.append(f"metadata of {key} changed")
        elif before.comparable() != after.comparable():
            changes.append(f"{key} now needs {after.kind} ({' -> '.join(after.steps) or 'no steps'})")
    return changes

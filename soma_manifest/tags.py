"""Release tags: names for applies of the history (`v1.0`, `stable`), kept readable whatever
compaction.keep_history says (history.kept_serials), stored in the state and changed only under the lock.

Readers open a tag as they would a serial (`open(tag=...)`, `show --tag`, `report --tag`, `diff --from`);
a tag moves when it is set again, as the Census' `stable` alias does between releases.
"""

from __future__ import annotations

import re

from soma_manifest.errors import StateError
from soma_manifest.history import is_readable
from soma_manifest.manifest import LoadedManifest
from soma_manifest.state import State, load_state, save_state

# A letter first, so that a tag never reads as a serial where either is accepted (`diff --from 3`).
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    """The tag name, or StateError saying what a tag name may be."""
    if not _NAME.match(name):
        raise StateError(f"invalid tag name {name!r}",
                         hint="a letter, then up to 63 letters, digits, '.', '_' or '-' (e.g. v1.0, stable)")
    return name


def serial_of(state: State, tag: str) -> int:
    """The serial a tag names; StateError listing the tags when there is no such tag."""
    if tag not in state.tags:
        known = ", ".join(sorted(state.tags)) or "none yet"
        raise StateError(f"no tag {tag!r} (tags: {known})", hint="`soma-manifest tag MANIFEST --list` lists them")
    return state.tags[tag]


def resolve(state: State, serial: int | None, tag: str | None) -> int | None:
    """The serial to read: the one given, the tag's, or None (now). Both given is an error."""
    if serial is not None and tag is not None:
        raise StateError("give a serial or a tag, not both")
    return serial_of(state, tag) if tag is not None else serial


def parse_ref(state: State, ref: str) -> int:
    """A serial ("3") or a tag ("v1.0") as a serial of the history."""
    return int(ref) if ref.isdigit() else serial_of(state, ref)


def tagged(state: State) -> dict[int, list[str]]:
    """serial -> its tags, sorted."""
    found: dict[int, list[str]] = {}
    for name, serial in sorted(state.tags.items()):
        found.setdefault(serial, []).append(name)
    return found


def set_tag(manifest: LoadedManifest, name: str, serial: int | None) -> tuple[int, int | None]:
    """Tag apply `serial` (default: the last apply) as `name`, moving the tag if it exists.
    Returns (the serial tagged, the serial the tag named before or None). The caller holds the lock."""
    check_name(name)
    state = _fresh(manifest)
    if not state.history:
        raise StateError("no applies recorded yet: nothing to tag", where=manifest.state_path,
                         hint="run `soma-manifest apply` first")
    serial = state.history[-1].serial if serial is None else serial
    entry = next((e for e in state.history if e.serial == serial), None)
    if entry is None:
        known = ", ".join(str(e.serial) for e in state.history[-10:])
        raise StateError(f"no apply with serial {serial} in the history (the last ones: {known})",
                         hint="`soma-manifest history` lists the applies and their serials")
    if not is_readable(state, entry):
        raise StateError(f"apply {serial} is no longer readable: a compaction purged cells deleted after it",
                         hint="tag an apply that `soma-manifest history` shows as readable")
    before = state.tags.get(name)
    if before != serial:
        state.tags[name] = serial
        save_state(state, manifest.state_path)
    return serial, before


def delete_tag(manifest: LoadedManifest, name: str) -> int:
    """Remove a tag; returns the serial it named. The caller holds the lock. The apply stays readable until
    a compaction that no longer keeps it purges cells deleted after it."""
    state = _fresh(manifest)
    serial = serial_of(state, name)
    del state.tags[name]
    save_state(state, manifest.state_path)
    return serial


def _fresh(manifest: LoadedManifest) -> State:
    # Read again under the lock: an apply may have saved the state since the caller last read it.
    state = load_state(manifest.state_path)
    if state is None:
        raise StateError("no state file yet", where=manifest.state_path, hint="run `soma-manifest apply` first")
    return state

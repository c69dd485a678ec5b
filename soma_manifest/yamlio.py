"""Load YAML files keeping line numbers, and turn validation errors into file:line messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from soma_manifest import storage
from soma_manifest.errors import ManifestError, StorageError
from soma_manifest.storage import Location


class LocatedYaml:
    """A parsed YAML document as plain Python data, plus the line of every key and item."""

    def __init__(self, path: Path | Location, root: Any) -> None:
        self.path = path
        self._root = root
        self.data = _plain(root)

    def line_of(self, loc: Iterable[str | int]) -> int:
        """1-based line of the deepest node of `loc` that exists (the document start if none)."""
        node, line = self._root, 1
        for part in loc:
            if isinstance(node, CommentedMap) and part in node:
                line = node.lc.key(part)[0] + 1
                node = node[part]
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                line = node.lc.item(part)[0] + 1
                node = node[part]
            else:
                break
        return line

    def problem(self, loc: tuple[str | int, ...], message: str) -> str:
        """One error line: `file:LINE: dotted.path: message`."""
        dotted = ".".join(str(p) for p in loc)
        prefix = f"{self.path}:{self.line_of(loc)}"
        return f"{prefix}: {dotted}: {message}" if dotted else f"{prefix}: {message}"


def load_yaml(path: Path | Location) -> LocatedYaml:
    """Parse `path` (a local file or an s3:// object); a missing file or a YAML syntax error becomes a
    ManifestError with its line."""
    try:
        data = storage.read_bytes(Location(path), missing_ok=True)
    except StorageError as exc:
        raise ManifestError([f"{path}: {exc.message} ({exc.hint})"]) from None
    if data is None:
        raise ManifestError([f"{path}: file not found"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError([f"{path}: cannot read: {exc}"]) from None
    try:
        root = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        what = exc.problem or exc.context or "invalid YAML"
        raise ManifestError([f"{path}{line}: YAML syntax error: {what} (fix the YAML syntax at that line)"]) from None
    return LocatedYaml(path, root)


def pydantic_problems(doc: LocatedYaml, errors: list[dict[str, Any]]) -> list[str]:
    """Render pydantic's errors as located, actionable lines, in document order."""
    lines: list[tuple[int, str]] = []
    for err in errors:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        lines.append((doc.line_of(loc), doc.problem(loc, _explain(err))))
    return [text for _, text in sorted(lines, key=lambda item: item[0])]


def _explain(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key (check its spelling; README.md lists the allowed keys)"
    if kind == "missing":
        return "required key is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return msg


def _plain(node: Any) -> Any:
    if isinstance(node, CommentedMap):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, CommentedSeq):
        return [_plain(v) for v in node]
    return node

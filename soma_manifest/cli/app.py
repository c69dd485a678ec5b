"""The typer app and what its commands share: the --no-color option and the output formats."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from soma_manifest.cli.console import Output

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _set_plain(value: bool) -> None:
    if value:
        Output.plain = True


# Accepted before the command and after it (`soma-manifest plan M --no-color`, as in Terraform): every
# command declares it; the callback acts on it, and the command never receives the value.
NoColor = Annotated[bool, typer.Option("--no-color", help="Never use colours (also NO_COLOR=1).",
                                       callback=_set_plain, expose_value=False)]


@app.callback()
def _options(no_color: NoColor = False) -> None:
    """Terraform-style desired state for single-cell atlases in TileDB-SOMA."""


class PlanFormat(str, Enum):  # also diff's
    text = "text"
    json = "json"
    markdown = "markdown"


def output_format(as_json: bool, fmt: PlanFormat | None) -> PlanFormat:
    """The output format of `--json` / `--format`."""
    if as_json and fmt not in (None, PlanFormat.json):
        raise typer.BadParameter("--json and --format markdown/text exclude each other", param_hint="--json")
    return PlanFormat.json if as_json else fmt or PlanFormat.text

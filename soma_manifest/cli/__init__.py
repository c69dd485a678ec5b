"""The soma-manifest command line, over the Python API (soma_manifest.api) only. The only package that prints
or exits; elsewhere only a loky worker whose apply is gone exits (executors), and a test's kill point (faults).

Exit codes: 0 success (for `plan --detailed-exitcode`: no changes); 2 only from
`plan --detailed-exitcode`, when there are changes; 1 everything else that went wrong, usage
errors and invalid manifests included, so that CI never reads an error as "changes present".
Results go to stdout (machine-readable with --json); progress, logs and errors go to stderr.

app.py holds the typer app; commands.py (check and change the atlas) and reads.py (read it and its applies) each
parse a command's arguments, call the API and print its result; console.py owns the terminal (stdout and
stderr, error messages, apply's progress, signals).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from soma_manifest import api
from soma_manifest.cli import commands, reads  # noqa: F401 - each registers its commands on the app, in order
from soma_manifest.cli.app import app

try:  # recent typer vendors click; older releases use click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException

__all__ = ["app", "main"]


def main() -> None:
    api.dedicate_process()
    # Not standalone: click would exit 2 on a usage error, which `plan --detailed-exitcode` means "changes".
    try:
        code = app(standalone_mode=False)
    except ClickException as exc:
        exc.show()
        code = 1
    _exit(code or 0)


def _exit(code: int) -> NoReturn:
    """Exit without the interpreter's teardown, which took ~0.7 s of a one-sample add (joining loky's
    workers as they shut down, then finalizing the storage engine's objects and modules), once everything
    is stored: the commands close their files, state and logs (and release the lock) before they return.
    Idle local workers are stopped (killed) first, else they would outlive the command."""
    api.before_exit()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), a closed stream
            pass
    os._exit(code)

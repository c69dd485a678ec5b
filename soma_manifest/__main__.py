"""The `soma-manifest` command (also `python -m soma_manifest`): cli.main, after starting apply's first worker.

Kept this small on purpose: it runs before the command line's own imports, so that an apply's first loky
worker starts importing the storage engine ~0.3 s earlier (see executors.start_early).
"""

from __future__ import annotations

import sys


def _applies_on_loky(args: list[str]) -> bool:
    """Whether the arguments ask for an apply that may run on loky (the manifest may still choose Dask, in
    which case the early worker is stopped). A guess from the raw arguments; typer parses them for real."""
    positional = [a for a in args if not a.startswith("-")]
    if not positional or positional[0] != "apply" or {"--help", "-h"} & set(args):
        return False
    return not any(a.startswith("--scheduler") or a in ("dask", "--executor=dask") for a in args)


def main() -> None:
    if _applies_on_loky(sys.argv[1:]):
        from soma_manifest.executors import start_early

        start_early()
    from soma_manifest.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()

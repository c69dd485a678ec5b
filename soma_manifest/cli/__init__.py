"""The soma-manifest command line, over the Python API (soma_manifest.api) only. The only package that prints
or exits; elsewhere only a loky worker whose apply is gone exits (executors), and a test's kill point (faults).

Exit codes: 0 success (for `plan --detailed-exitcode`: no changes); 2 only from
`plan --detailed-exitcode`, when there are changes; 1 everything else that went wrong, usage
errors and invalid manifests included, so that CI never reads an error as "changes present".
Results go to stdout (machine-readable with --json); progress, logs and errors go to stderr.

commands.py parses each command's arguments, calls the API and prints its result; console.py owns the
terminal (stdout and stderr, error messages, apply's progress, signals).
"""

from soma_manifest.cli.commands import app, main

__all__ = ["app", "main"]

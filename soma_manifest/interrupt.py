"""What a signal handler tells a running apply. Its own module: the CLI installs the handler before apply's
imports (tiledbsoma, anndata) are loaded, so that they load beside the workers' (executors.warm_up)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Interrupt:
    """Set by the CLI's signal handler: the signal received, or None. apply polls it between steps."""

    signum: int | None = None
    lock: object | None = None  # the AtlasLock apply holds: a second signal releases it before exiting

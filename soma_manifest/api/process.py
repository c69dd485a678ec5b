"""The API's process-wide calls: what a process that runs applies does before it ends (the CLI's exit
paths), and how it declares itself devoted to soma-manifest."""

from __future__ import annotations

import sys


def dedicate_process() -> None:
    """Declare that this process runs soma-manifest only, as the command line does: an apply on local
    workers then also keeps Dask (which anndata imports when installed, ~0.5 s) out of this process."""
    from soma_manifest.executors import dedicate_process

    dedicate_process()


def stop_workers() -> None:
    """Stop the local worker processes that applies in this process keep for the next one."""
    from soma_manifest.executors import stop_local_workers

    stop_local_workers()


def before_exit() -> None:
    """For a process about to end with os._exit (the CLI): stop the local workers and unlink the named semaphores
    the interpreter's teardown would have (else a resource tracker warns of leaked semlock objects)."""
    from soma_manifest.executors import release_semaphores, stop_local_workers

    stop_local_workers()
    release_semaphores()


def stop_at_once() -> None:
    """From a signal handler, before os._exit: kill this process' local workers and unlink its semaphores.
    Imports nothing (a handler may have interrupted an import); a no-op when no apply ran here."""
    executors = sys.modules.get("soma_manifest.executors")
    if executors is not None:
        executors.stop_at_once()

"""What runs inside our own worker processes (loky's) and in a command-line process devoted to soma-manifest:
SIGINT blocked, heavy packages this tool never uses kept out, the storage engine imported ahead of the first
step."""

from __future__ import annotations

import os
import signal
import sys
from types import ModuleType
from typing import Callable

from soma_manifest.steps import Outcome

_dedicated = False  # see dedicate_process

def quiet_worker() -> None:
    """Workers never see SIGINT: a Ctrl-C reaches the whole process group, and only apply decides what stops.

    Blocked, not ignored: TileDB installs its own SIGINT handler when a worker opens its first array, and a
    Ctrl-C delivered to it there crashed the worker (SIGSEGV, when the handler it replaced was SIG_IGN).
    A blocked signal is never delivered, whatever handler is installed, in this thread and in the threads
    it starts later."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    lean_imports()


def lean_imports() -> None:
    """Keep out of a process of ours four packages that the storage engine's import loads and this tool never
    uses: Dask (~0.5 s), zarr (~0.2 s), charset_normalizer (~0.08 s) and shapely (~0.02 s), of the ~1.2 s that
    import took.

    - Dask: anndata (which tiledbsoma imports) imports dask.array whenever dask is installed. With None in
      sys.modules, `find_spec("dask")` is None and anndata goes without, as when Dask is not installed.
    - charset_normalizer: scipy's array-API layer reads every attribute of numpy, which imports numpy.f2py,
      which imports charset_normalizer when it is installed (for requests, which no process of ours loads), to
      guess the encoding of Fortran sources. With None, f2py goes without, as when it is not installed.
    - zarr: anndata needs it for zarr stores; this tool reads and writes h5ad files only. A placeholder module
      stands in: anndata's `from zarr import Array, Group` gets two classes that no object is an instance of,
      and any other use raises. (anndata is pinned to 0.12, and the suite runs every command with it.)
    - shapely: tiledbsoma's spatial types (scenes, geometry and point-cloud dataframes) use it; an atlas has
      none. Placeholders stand in the same way: somacore's import-time `shapely.geometry.base.BaseGeometry`
      is a class of its own. (tiledbsoma is pinned to 2.3.)

    Only in loky's workers and in a dedicated process (the command line) applying on loky or inline."""
    for absent in ("dask", "charset_normalizer"):
        if absent not in sys.modules:
            sys.modules[absent] = None  # type: ignore[assignment]
    if "zarr" not in sys.modules:
        sys.modules["zarr"] = _placeholder("zarr", "Array", "Group")
    if "shapely" not in sys.modules:
        base = _placeholder("shapely.geometry.base", "BaseGeometry")
        geometry = _placeholder("shapely.geometry", base=base)
        sys.modules.update({"shapely": _placeholder("shapely", geometry=geometry), "shapely.geometry": geometry,
                            "shapely.geometry.base": base})


def _placeholder(name: str, *classes: str, **submodules: ModuleType) -> ModuleType:
    """A module that only has these classes (of its own, so no object is an instance of them) and submodules."""
    module = ModuleType(name, "A placeholder: this process never uses this package (workers.lean_imports).")
    for cls in classes:
        setattr(module, cls, type(cls, (), {"__module__": name}))
    for attr, sub in submodules.items():
        setattr(module, attr, sub)
    return module


def while_coordinator_lives(coordinator: int, fn: Callable[..., Outcome], *args: object) -> Outcome:
    """Run one step on a loky worker, unless apply (the worker's parent) is gone.

    loky's workers keep taking queued jobs after a kill -9 of apply; such a job does not start. (The lease,
    checked by the step itself, is what fences it for certain; this only saves the wasted work early.)
    """
    if os.getppid() != coordinator:
        os._exit(1)
    return fn(*args)


def warm_imports() -> None:
    import gc
    import importlib

    # tiledbsoma and anndata: ~1.2 s, else paid by the worker's first step
    for module in ("soma_manifest.atlas", "soma_manifest.convert"):
        importlib.import_module(module)
    # The garbage collector's full passes no longer walk the objects those imports made, which live as long
    # as the worker: perf put the collector at 3.2% of a worker's CPU over three full-preset samples, 1.1%
    # with them frozen.
    gc.freeze()


def dedicate_process() -> None:
    """Declare that this process runs soma-manifest only (the command line does): an apply on loky or inline
    then leaves out of it the packages lean_imports names, as the workers do. A library user's process is
    never changed so."""
    global _dedicated
    _dedicated = True


def dedicated() -> bool:
    """Whether dedicate_process was called in this process."""
    return _dedicated

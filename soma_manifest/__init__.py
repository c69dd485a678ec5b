"""soma-manifest: Terraform-style desired state for single-cell atlases in TileDB-SOMA.

The Python API (the CLI is a thin layer over it)::

    import soma_manifest as sm

    atlas = sm.load("atlas.yaml")          # manifest + schema; ManifestError (.problems) on bad input
    plan = atlas.plan()                    # the Plan `soma-manifest plan` renders
    report = atlas.apply(processes=4)      # report.ok, report.failed
    problems = atlas.verify(deep=False)    # [] when the atlas holds what the state says
    atlas.samples()                        # the per-sample ledger (pandas), from the state
    with atlas.open() as exp: ...          # a read-only tiledbsoma.Experiment
    adata = atlas.to_anndata(samples=["study_1/S1"], genes=["CD3E"])
    presence = atlas.presence()            # samples x genes, which genes each sample measured
    atlas.history()                        # the applies that changed the atlas
    with atlas.open(serial=12) as exp: ... # the atlas exactly as apply 12 left it (also to_anndata(serial=))
    atlas.compact()                        # consolidate + vacuum, keeping compaction.keep_history readable
    sm.save_plan(plan, "s3://b/p.json")    # a plan for a later atlas.apply(plan=sm.read_plan("s3://b/p.json"))

Importing this package stays light: tiledbsoma, anndata and scipy load only when an operation needs them.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from soma_manifest.api import Atlas, load, read_plan, save_plan
    from soma_manifest.errors import (
        AtlasError,
        LockError,
        ManifestError,
        PlanError,
        SchemaError,
        SomaManifestError,
        SourceError,
        StateError,
    )
    from soma_manifest.plan import Action, Plan

_HOME = {"Atlas": "api", "load": "api", "read_plan": "api", "save_plan": "api", "Action": "plan", "Plan": "plan", **{name: "errors" for name in (
    "AtlasError", "LockError", "ManifestError", "PlanError", "SchemaError", "SomaManifestError", "SourceError",
    "StateError")}}


def __getattr__(name: str) -> object:
    # Loaded on first use, so that a worker importing one module of the package (e.g. soma_manifest.atlas)
    # does not also load the API, the manifest models and the planner.
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"soma_manifest.{_HOME[name]}"), name)
    raise AttributeError(f"module 'soma_manifest' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "Action", "Atlas", "AtlasError", "LockError", "ManifestError", "Plan", "PlanError", "SchemaError",
    "SomaManifestError", "SourceError", "StateError", "load", "read_plan", "save_plan",
]

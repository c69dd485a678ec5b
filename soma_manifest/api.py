"""The Python API: an `Atlas` holds the operations; the CLI only parses arguments, calls them and prints.

Heavy imports (tiledbsoma, anndata, scipy, pandas) happen inside the methods that need them, so that
`import soma_manifest` and `Atlas.plan()` stay fast.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from soma_manifest import planfile
from soma_manifest.errors import AtlasError, StateError
from soma_manifest.interrupt import Interrupt
from soma_manifest.manifest import LoadedManifest, load_manifest, manifest_json_schema
from soma_manifest.plan import Observations, Plan, atlas_present, make_plan, observe
from soma_manifest.reports import ApplyReport, CompactionReport, Reporter
from soma_manifest.schema import AtlasSchema, load_schema
from soma_manifest.sources import SampleSource
from soma_manifest.state import State, load_state

if TYPE_CHECKING:
    import anndata
    import pandas as pd
    import tiledbsoma

    from soma_manifest.executors import ExecutorConfig
    from soma_manifest.init import InitResult
    from soma_manifest.lock import Holder
    from soma_manifest.diff import AtlasDiff
    from soma_manifest.qc_report import AtlasReport

# Also re-exported for callers (the CLI imports nothing else of the package but render and errors):
# Interrupt, manifest_json_schema, and the types the operations take and return.
__all__ = ["ApplyReport", "Atlas", "AtlasSchema", "AtlasSummary", "CompactionReport", "Interrupt", "Plan",
           "Reporter", "dedicate_process", "init", "load", "load_target", "manifest_json_schema", "read_plan",
           "save_plan", "stop_workers", "unlock", "before_exit", "stop_at_once"]


def load(path: str | os.PathLike[str]) -> Atlas:
    """The atlas a manifest describes: its manifest and schema, parsed and checked.

    Raises ManifestError (every problem in `.problems`, each located `file:line`) for an invalid manifest,
    SchemaError for an invalid schema. The state file is read when an operation needs it.
    """
    manifest = load_manifest(Path(path))
    with manifest.referenced("schema"):
        return Atlas(manifest, load_schema(manifest.schema_path))


def save_plan(plan: Plan, where: str | os.PathLike[str]) -> None:
    """Save a plan (`Atlas.plan()`) for a later `Atlas.apply(plan=...)`: a local file or an s3:// object."""
    planfile.save_plan(plan, where)


def read_plan(where: str | os.PathLike[str]) -> Plan | None:
    """The plan saved at `where` (a local file or an s3:// object); None when it is not a saved plan.

    Raises PlanError for a plan of another format version, or an invalid one.
    """
    return planfile.read_saved_plan(where)


def load_target(where: str | os.PathLike[str]) -> tuple[Atlas, Plan | None]:
    """What `soma-manifest apply` is given: a manifest, or a saved plan. The atlas, and the saved plan (None
    for a manifest). A saved plan names its manifest relative to where plan ran: PlanError when it is not
    found from the working directory."""
    saved = read_plan(where)
    return load(planfile.manifest_of(saved) if saved else where), saved


def unlock(path: str | os.PathLike[str]) -> Holder | None:
    """Remove the atlas lock deliberately (make sure no apply is running first): the holder it named, None when
    the atlas was not locked. Reads the manifest only, so a broken schema does not stand in the way."""
    from soma_manifest.lock import force_unlock, lock_path

    return force_unlock(lock_path(load_manifest(Path(path)).state_path))


def init(manifest: str | os.PathLike[str], raw: str | os.PathLike[str], atlas_storage: str | os.PathLike[str],
         name: str, **options: object) -> InitResult:
    """Write a first manifest (and its schema) listing the studies under a raw tree; overwrites nothing.

    options: init.InitRequest's other fields (h5ad, logs, schema, reference_schema, processes, include_studies,
    format_hint, notes). Raises InitError when a file to write exists, or an input is unusable.
    """
    from soma_manifest.init import InitRequest, init_manifest

    return init_manifest(InitRequest(manifest=Path(manifest), raw=Path(raw), atlas_storage=Path(atlas_storage),
                                     name=name, **options))


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


@dataclass(frozen=True)
class AtlasSummary:
    """What the atlas holds, now or as apply `serial` left it (`Atlas.summary`)."""

    uri: str
    serial: int | None
    timestamp_ms: int | None  # the TileDB timestamp it was read at; None: now
    cells: int
    genes: int
    layers: tuple[str, ...]
    samples: dict[tuple[str, str], int]  # (study, sample) -> cells, from the obs ids
    tag: str | None = None  # the release tag it was asked by


@dataclass(frozen=True)
class Atlas:
    """One atlas: the manifest (desired state), its schema, and the state file (what was done)."""

    manifest: LoadedManifest
    schema: AtlasSchema

    @property
    def uri(self) -> str:
        """Where the TileDB-SOMA Experiment lives."""
        return str(self.manifest.atlas_uri)

    @property
    def state(self) -> State | None:
        """The state file as it is now on disk; None before the first apply."""
        return load_state(self.manifest.state_path)

    def require_state(self) -> State:
        """The state; StateError when there is none yet."""
        state = self.state
        if state is None:
            raise StateError("no state file yet", where=self.manifest.state_path,
                             hint="run `soma-manifest apply` first")
        return state

    # --- desired state ----------------------------------------------------------------------------

    def validate(self) -> list[SampleSource]:
        """The selected samples, after checking that each one's raw files are there. Writes nothing.

        Raises ManifestError listing every sample whose raw files are missing or unusable.
        """
        from soma_manifest.errors import ManifestError, SomaManifestError
        from soma_manifest.sources import discover, sample_files

        samples = discover(self.manifest)
        problems = []
        for s in samples:
            try:
                sample_files(s)
            except SomaManifestError as exc:
                problems.append(f"{s.key}: {exc.render()}")
        if problems:
            raise ManifestError(problems)
        return samples

    def plan(self) -> Plan:
        """What apply would do to each sample, and why (pure; no tiledbsoma import)."""
        return self._plan()[0]

    def _plan(self) -> tuple[Plan, Observations, State | None]:
        state = self.state
        observations = observe(self.manifest, state)
        plan = make_plan(self.manifest, self.schema, observations, state,
                         atlas_present=atlas_present(self.manifest.atlas_uri))
        # The plan names its manifest relative to where plan ran (the repository root in CI), so that
        # `apply plan.json` finds it in whichever checkout of the repository it runs.
        return plan.model_copy(update={"manifest": _relative_to_cwd(self.manifest.path)}), observations, state

    # --- changes ----------------------------------------------------------------------------------

    def apply(self, processes: int | None = None, allow_delete: bool = False, *, plan: Plan | None = None,
              reporter: Reporter | None = None, on_plan: Callable[[Plan], None] | None = None,
              chunk_nnz: int | None = None, executor: str | None = None, scheduler: str | None = None,
              interrupt: Interrupt | None = None, grace: float | None = None) -> ApplyReport:
        """Make the atlas match the manifest, under the atlas lock; the same executor as `soma-manifest apply`.

        processes: worker processes (default: the manifest's, else the CPU count). allow_delete: allow
        deleting the cells of samples that left the manifest (else such a plan is refused, changing nothing).
        plan: a plan saved earlier (`read_plan(path)`); refused (PlanError) when it no
        longer describes what apply would do. on_plan: called with the plan about to run, once it is checked.
        executor: "loky" or "dask" (default: the manifest's executor.kind); scheduler: a Dask scheduler
        address (implies dask; default: the manifest's executor.address, else a LocalCluster). interrupt: set its
        `signum` (e.g. from a signal handler) to stop starting steps; running ones get `grace` seconds, then
        the report says `interrupted` and the state is ready for the next apply to resume.
        Failures of single samples are in `report.failed`; `report.ok` is False when any sample failed.
        """
        from soma_manifest.executors import warm_up
        from soma_manifest.lock import AtlasLock, lock_path
        from soma_manifest.sweep import sweep_leftovers

        with AtlasLock(lock_path(self.manifest.state_path)) as lock:
            if interrupt is not None:
                interrupt.lock = lock
            swept = [str(p) for p in sweep_leftovers(self.manifest, lock.path)]
            current, observations, state = self._plan()
            config = self._executor_config(processes, executor, scheduler, current)
            if current.worker_sizes and (allow_delete or not current.deletions):
                # (not for an apply that will be refused, or that runs nothing on workers)
                warm_up(config)  # the workers import the storage engine while this process does (below)
            from soma_manifest import compact
            from soma_manifest.apply import execute
            from soma_manifest.migrate import upgrade
            from soma_manifest.verify import open_state

            if plan is not None:
                planfile.check_saved_plan(plan, current)
            state = open_state(self.manifest, state, self.schema)
            upgrade(self.manifest, self.schema, state)
            if on_plan is not None:
                on_plan(current)
            if not current.has_changes:
                compact.finish_pending(self.manifest, state)
                return ApplyReport(unchanged=len(current.unchanged), swept=swept)
            options = {} if chunk_nnz is None else {"chunk_nnz": chunk_nnz}
            if grace is not None:
                options["grace"] = grace
            report = execute(self.manifest, self.schema, current, observations, state, lease=lock.lease,
                             executor=config, allow_delete=allow_delete, reporter=reporter, interrupt=interrupt,
                             **options)
            report.swept = swept
            return report

    def _executor_config(self, processes: int | None, kind: str | None, scheduler: str | None,
                         plan: Plan) -> ExecutorConfig:
        """Where the steps run: arguments first, then the manifest's executor block and processes (on loky,
        sized to the plan's samples by executors.on_this_machine)."""
        from soma_manifest.executors import ExecutorConfig, on_this_machine

        block = self.manifest.spec.executor
        chosen = kind or ("dask" if scheduler else block.kind)
        address = scheduler or (block.address if chosen == "dask" else None)
        workers = processes or self.manifest.spec.processes or os.cpu_count() or 1
        if chosen == "loky":
            return on_this_machine(workers, plan.worker_sizes)
        return ExecutorConfig(chosen, address, workers)

    # --- checks and reads -------------------------------------------------------------------------

    def verify(self, deep: bool = False) -> list[str]:
        """Every drift between the atlas and the state, one line each; [] when they match.

        deep: also compare every sample's X and obs with its h5ad, and its X entries with its presence row.
        Raises StateError when there is no state yet.
        """
        from soma_manifest.verify import verify

        return verify(self.uri, self.schema, self.require_state(), deep=deep)

    def samples(self) -> pd.DataFrame:
        """The per-sample ledger from the state (no atlas read), indexed by "<study>/<sample>".

        Columns: study, sample, format, status (done, allocated = interrupted, none = not ingested, failed),
        cells, nnz (in the atlas once ingested, else of its h5ad), joinid_start, joinid_stop (its obs
        soma_joinids, [start, stop)), sample_joinid (its row of the samples table and of the feature presence
        matrix), converted, ingested_at, failed_step, error, h5ad.
        """
        import pandas as pd

        from soma_manifest.render import ledger_rows

        state = self.state
        rows = ledger_rows(state) if state is not None else []
        entries = state.samples if state is not None else {}
        table = pd.DataFrame.from_records([{
            "key": r["key"], "study": entries[r["key"]].study, "sample": entries[r["key"]].sample,
            "format": r["format"], "status": "failed" if r["failed_step"] else r["ingest"],
            "cells": r["cells"], "nnz": r["nnz"],
            "joinid_start": r["joinids"][0] if r["joinids"] else None,
            "joinid_stop": r["joinids"][1] if r["joinids"] else None,
            "sample_joinid": entries[r["key"]].sample_joinid,
            "converted": r["converted"], "ingested_at": r["ingested_at"], "failed_step": r["failed_step"],
            "error": r["error"], "h5ad": r["h5ad"],
        } for r in rows], columns=_SAMPLE_COLUMNS)
        for column in ("cells", "nnz", "joinid_start", "joinid_stop", "sample_joinid"):
            table[column] = table[column].astype("Int64")
        return table.set_index("key").rename_axis("sample_key")

    def open(self, serial: int | None = None, tag: str | None = None) -> tiledbsoma.Experiment:
        """The atlas as a read-only tiledbsoma.Experiment: `with atlas.open() as exp: ...`.

        serial: read the atlas exactly as apply `serial` left it (see `history()`); StateError when that
        apply is unknown or a compaction made it unreadable. tag: the apply a release tag names (see `tag`).
        """
        return self._experiment(self._serial(serial, tag))

    def _serial(self, serial: int | None, tag: str | None) -> int | None:
        """The serial to read, from a serial or a tag (None: now)."""
        from soma_manifest.tags import resolve

        return resolve(self.require_state(), serial, tag) if tag is not None else serial

    def _experiment(self, serial: int | None = None) -> tiledbsoma.Experiment:
        # The one place that opens the experiment for reading: now, or as of an earlier apply.
        from soma_manifest.atlas import open_experiment
        from soma_manifest.history import timestamp_of

        timestamp = timestamp_of(self.require_state(), serial) if serial is not None else None
        return open_experiment(self.uri, timestamp)

    def summary(self, serial: int | None = None, *, tag: str | None = None) -> AtlasSummary:
        """Cells, genes, layers and cells per sample of the atlas; serial or tag: as that apply left it (see
        `history()`; StateError when that apply is unknown or a compaction made it unreadable)."""
        from soma_manifest.atlas import overview
        from soma_manifest.history import timestamp_of

        serial = self._serial(serial, tag)
        timestamp = timestamp_of(self.require_state(), serial) if serial is not None else None
        found = overview(self.uri, timestamp)
        return AtlasSummary(self.uri, serial, timestamp, found.cells, found.genes, tuple(found.layers),
                            dict(found.samples), tag)

    # --- release tags, report and diff ------------------------------------------------------------

    def tags(self) -> dict[str, int]:
        """The release tags: name -> the serial of the apply it names (see `history()`)."""
        return dict(sorted(self.require_state().tags.items()))

    def tag(self, name: str, serial: int | None = None, *, delete: bool = False) -> int:
        """Name apply `serial` (default: the last apply) `name`, under the atlas lock; an existing tag moves.
        A tagged apply stays readable whatever compaction.keep_history says. delete: remove the tag instead.
        Returns the serial tagged (or that the deleted tag named). StateError for an unknown serial or tag, an
        invalid name, or an apply a compaction already made unreadable."""
        from soma_manifest import tags
        from soma_manifest.lock import AtlasLock, lock_path

        tags.check_name(name)
        self.require_state()
        with AtlasLock(lock_path(self.manifest.state_path)):
            if delete:
                return tags.delete_tag(self.manifest, name)
            return tags.set_tag(self.manifest, name, serial)[0]

    def report(self, serial: int | None = None, tag: str | None = None, *, verify: bool = False) -> AtlasReport:
        """The QC report's numbers (obs, samples table, presence matrix, state and history; never X), as the
        atlas is now or as apply `serial` / tag `tag` left it. verify: also run `verify()` (it counts X
        entries; the atlas now only); else the report gives the check the last apply read made of what it wrote.
        Render with `write_report(...)` (the HTML page) or `report.to_json()`."""
        from soma_manifest.qc_report import gather

        state = self.require_state()
        serial = self._serial(serial, tag)
        problems = self.verify() if verify and serial is None else None
        with self._experiment(serial) as exp:
            return gather(self.uri, self.schema, state, exp, serial=serial, tag=tag, verify_problems=problems,
                          keep=self.manifest.spec.compaction.keep_history)

    def write_report(self, out: str | os.PathLike[str], serial: int | None = None, tag: str | None = None, *,
                     verify: bool = False) -> tuple[AtlasReport, str]:
        """`report(...)` rendered as one self-contained HTML page and stored at `out` (a path, relative to the
        current folder, or an s3:// URI) in one atomic write. Returns the report and where it went."""
        from soma_manifest import storage
        from soma_manifest.qc_page import render

        result = self.report(serial, tag, verify=verify)
        where = storage.resolve(os.fspath(out), os.getcwd())
        storage.write_atomic(where, render(result).encode("utf-8"))
        return result, str(where)

    def diff(self, from_ref: str | int | None = None, to_ref: str | int | None = None) -> AtlasDiff:
        """What changed between two applies, given as serials or tags (default: the last two applies):
        samples added, removed, replaced and updated, cells per study before and after, genes added, schema
        changes. Render with `soma_manifest.diff.markdown(d)` or `d.to_json()`."""
        from soma_manifest.diff import compare

        return compare(self.uri, self.require_state(), from_ref, to_ref)

    def history(self) -> list[dict]:
        """The applies that changed the atlas, oldest first: each history entry of the state, plus `readable`
        (can still be opened with `open(serial=...)`), `kept` (retained by compaction.keep_history or a tag)
        and `tags` (its release tags)."""
        from soma_manifest import history as hist
        from soma_manifest.tags import tagged

        state = self.require_state()
        kept = hist.kept_serials(state, self.manifest.spec.compaction.keep_history)
        names = tagged(state)
        return [{**e.model_dump(), "readable": hist.is_readable(state, e), "kept": e.serial in kept,
                 "tags": names.get(e.serial, [])} for e in state.history]

    def compact(self) -> CompactionReport | None:
        """Consolidate and vacuum every array of the atlas under the lock; None when there is no atlas yet.
        The applies that compaction.keep_history retains stay readable."""
        from soma_manifest import atlas
        from soma_manifest import compact as compaction
        from soma_manifest.lock import AtlasLock, lock_path
        from soma_manifest.verify import open_state

        with AtlasLock(lock_path(self.manifest.state_path)):
            state = open_state(self.manifest, self.require_state(), self.schema)
            if not atlas.atlas_exists(self.uri):
                return None
            return compaction.compact(self.manifest, state)

    def to_anndata(self, samples: Sequence[str] | None = None, genes: Sequence[str] | None = None,
                   layer: str = "raw", obs_columns: Sequence[str] | None = None,
                   obs_filter: str | None = None, serial: int | None = None,
                   tag: str | None = None) -> anndata.AnnData:
        """Cells of the atlas as AnnData: obs indexed by obs_id, var by var_id, X from `layer`.

        samples: "<study>/<sample>" keys (default: all cells). genes: var ids or symbols; a symbol selects
        every var row that carries it (default: all genes). obs_columns: obs columns to read (default all).
        obs_filter: a tiledbsoma value filter on obs, e.g. "cell_type == 'T cell'". An unknown sample, gene,
        layer or column raises AtlasError. serial: read the atlas as apply `serial` left it (see `open`);
        tag: as the apply that release tag names.
        """
        import tiledbsoma as soma

        from soma_manifest.atlas import var_joinids

        layers = [x.name for x in self.schema.layers]
        if layer not in layers:
            raise AtlasError(f"no X layer '{layer}' (layers: {', '.join(layers)})", where=self.uri)
        if obs_columns is not None:
            known = {c.name for c in self.schema.obs} | {"obs_id", "soma_joinid"}
            unknown = [c for c in obs_columns if c not in known]
            if unknown:
                raise AtlasError(f"no obs column {', '.join(map(repr, unknown))}", where=self.uri)
            obs_columns = ["obs_id", *(c for c in obs_columns if c != "obs_id")]
        serial = self._serial(serial, tag)
        with self._experiment(serial) as exp:
            obs_coords = None if samples is None else (
                self._obs_joinids(samples) if serial is None else _obs_joinids_as_read(exp, samples))
            var_coords = None if genes is None else var_joinids(exp, self.schema, list(genes))
            query = exp.axis_query(
                self.schema.measurement,
                obs_query=soma.AxisQuery(coords=(obs_coords,) if obs_coords is not None else (),
                                         value_filter=obs_filter),
                var_query=soma.AxisQuery(coords=(var_coords,)) if var_coords is not None else None)
            return query.to_anndata(X_name=layer, column_names={"obs": obs_columns, "var": None},
                                    obs_id_name="obs_id", var_id_name="var_id")

    def _obs_joinids(self, keys: Sequence[str]):
        """The obs soma_joinids of these samples, from the state's ranges."""
        import numpy as np

        state = self.require_state()
        ranges = []
        for key in keys:
            entry = state.samples.get(key)
            if entry is None or entry.ingest != "done" or entry.joinids is None:
                raise AtlasError(f"no sample {key} in the atlas", where=self.uri,
                                 hint="samples are named <study>/<sample>; see atlas.samples()")
            ranges.append(np.arange(*entry.joinids, dtype=np.int64))
        return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)

    def presence(self) -> anndata.AnnData:
        """Which genes each sample measured: obs = the ingested samples (indexed by "<study>/<sample>", with
        the samples table's columns), var indexed by var_id, X = a scipy.sparse bool matrix (CSR)."""
        from soma_manifest.atlas import read_presence

        state = self.require_state()
        done = {s.sample_joinid: key for key, s in state.samples.items()
                if s.ingest == "done" and s.sample_joinid is not None}
        with self._experiment() as exp:
            return read_presence(exp, self.schema, done)


def _obs_joinids_as_read(exp: tiledbsoma.Experiment, keys: Sequence[str]):
    """The obs soma_joinids of these samples as the experiment reads (at an earlier apply, the state's
    ranges may be those of later versions): by the obs_id prefix "<study>/<sample>/"."""
    import numpy as np
    import pyarrow.compute as pc

    table = exp.obs.read(column_names=["soma_joinid", "obs_id"]).concat()
    prefix = pc.replace_substring_regex(table["obs_id"], pattern="/[^/]*$", replacement="")
    found = []
    for key in keys:
        hits = table["soma_joinid"].filter(pc.equal(prefix, key)).to_numpy()
        if not len(hits):
            raise AtlasError(f"no sample {key} in the atlas at that apply", where=exp.uri,
                             hint="samples are named <study>/<sample>; see show --serial N --summary")
        found.append(hits)
    return np.sort(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


_SAMPLE_COLUMNS = ["key", "study", "sample", "format", "status", "cells", "nnz", "joinid_start", "joinid_stop",
                   "sample_joinid", "converted", "ingested_at", "failed_step", "error", "h5ad"]


def _relative_to_cwd(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)

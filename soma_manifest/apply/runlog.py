"""The run's own records: a log file per run in the logs folder, and logs/last-apply.json with the
run's figures (the benchmark reads it)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time

from soma_manifest import storage
from soma_manifest.errors import StorageError
from soma_manifest.manifest import LoadedManifest
from soma_manifest.reports import ApplyReport

log = logging.getLogger("soma_manifest")
#: Seconds between stores of a run log kept on an object store (each store uploads the whole log).
LOG_UPLOAD_S = 2.0


class RunLog:
    """A log file per run in the logs folder (DEBUG, with worker tracebacks).

    On an object store (no appends there) the log is written to a local temporary file and stored whole:
    once as the run starts, then every LOG_UPLOAD_S seconds while it grew (never per line), and once more
    when the run ends. An apply killed with -9 leaves its log up to its last few seconds.
    """

    def __init__(self, manifest: LoadedManifest, report: ApplyReport) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        self.path = manifest.logs / f"apply-{stamp}-{os.getpid()}.log"
        report.log_file = str(self.path)
        self.staged = tempfile.NamedTemporaryFile(suffix=".log", delete=False).name if not storage.store_for(self.path).appends else None
        storage.mkdir(manifest.logs)
        with storage.guard("open the log file", self.path):
            self.handler = logging.FileHandler(self.staged or self.path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.stored = -1  # bytes of the staged log last stored
        self.stop = threading.Event()
        self.uploader = threading.Thread(target=self._store_periodically, name="run-log-upload", daemon=True)

    def __enter__(self) -> None:
        if self.staged:
            try:
                self._store()  # an unwritable logs prefix fails the apply before it changes anything
            except BaseException:
                self.handler.close()
                os.unlink(self.staged)
                raise
            self.uploader.start()
        log.addHandler(self.handler)
        log.setLevel(logging.DEBUG)

    def __exit__(self, *exc: object) -> None:
        log.removeHandler(self.handler)
        self._close()

    def _close(self) -> None:
        self.handler.close()
        if self.staged:
            self.stop.set()
            if self.uploader.is_alive():
                self.uploader.join()
            try:
                self._store()
            finally:
                os.unlink(self.staged)

    def _store(self) -> None:
        """Store the staged log whole (one PUT) if it grew; whole records only, read under the handler's lock."""
        with self.handler.lock:
            if os.path.getsize(self.staged) == self.stored:
                return
            with open(self.staged, "rb") as fh:
                data = fh.read()
        storage.write_atomic(self.path, data)
        self.stored = len(data)

    def _store_periodically(self) -> None:
        while not self.stop.wait(LOG_UPLOAD_S):
            try:
                self._store()
            except StorageError as exc:  # a passing outage: the next round, or the final store, tries again
                log.debug("cannot store the run log yet: %s", exc.render())


def write_run_summary(manifest: LoadedManifest, report: ApplyReport, parent_rss: int) -> None:
    """logs/last-apply.json: machine-readable figures of the last run (the benchmark reads it)."""
    payload = {
        "convert_seconds": report.seconds.get("convert", 0.0),
        "ingest_seconds": report.seconds.get("ingest", 0.0),
        "delete_seconds": report.seconds.get("delete", 0.0),
        "verify_seconds": report.seconds.get("verify", 0.0),
        "allocate_seconds": report.seconds.get("allocate", 0.0),
        "total_seconds": report.seconds.get("total", 0.0),
        "peak_rss_worker_bytes": report.peak_rss_worker,
        "peak_rss_parent_bytes": parent_rss,
        "succeeded": len(report.succeeded),
        "failed": report.failed,
        "log_file": report.log_file,
    }
    storage.write_atomic(manifest.logs / "last-apply.json", json.dumps(payload, indent=1).encode())


"""The TileDB engine's settings for the same store: the atlas is reached through TileDB's own S3 support.

(Kept verbatim from the former storage.py; it belongs with the engine, atlas/engine.py, once that exists.)

TileDB's own S3 requests are bounded by `tiledb_config`: vfs.s3.connect_timeout_ms (CONNECT_TIMEOUT) with
vfs.s3.connect_max_tries (2), and vfs.s3.request_timeout_ms (READ_TIMEOUT), which the AWS SDK hands to curl
as its low-speed limit: a transfer, either way, that moves less than 1 byte/s for that long fails ("Operation
too slow. Less than 1 bytes/sec transferred the last 8 seconds"). So a stalled upload or download ends; a
trickle above 1 byte/s is not cut (TileDB has no whole-request deadline). With neither endpoint nor region
set, TileDB's defaults bound them instead (10.8 s connect, 5 tries; 3 s low-speed).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from soma_manifest.storage.settings import CONNECT_TIMEOUT, READ_TIMEOUT, StoreSettings
from soma_manifest.storage.settings import settings as current_settings

_ctx_cache: dict[tuple[tuple[str, str], ...], Any] = {}
_lock = threading.Lock()


#: TileDB 2.30 (in tiledbsoma 2.3.0) crashed with SIGSEGV in the sparse global-order reader's tile-merge
#: preprocessing (ParallelMerge, in ~MergeUnit, on a thread of its pool): a core dump of a `verify --deep`
#: process, counting X entries right after an apply with deletes and a compaction. Unordered reads of
#: arrays without duplicates (all of ours) use that reader. 0 turns the preprocessing off; it only
#: reorders how tiles are loaded, never what a read returns.
READER_SETTINGS = {"sm.query.sparse_global_order.preprocess_tile_merge": "0"}

#: For global-order writes whose chunks the writer has checked itself (atlas._read_chunk: column bounds, and
#: scipy's canonical-format test: columns strictly ascending within each row, so ordered and without
#: duplicates; atlas._check_room bounds both dimensions first). TileDB's own checks of the same are passes
#: over every entry: 0.5 s of a 1.3 s, 8.7M-entry X write (bench/write_checks.py; bench/README.md, "Stop 17").
TRUSTED_ORDER = {"sm.check_global_order": "false", "sm.check_coord_dups": "false", "sm.check_coord_oob": "false"}


def tiledb_config(store: StoreSettings | None = None) -> dict[str, str]:
    """TileDB settings for the same store (and READER_SETTINGS); credentials come from the AWS chain TileDB
    reads itself."""
    store = store or current_settings()
    config: dict[str, str] = {}
    endpoint = store.endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        config["vfs.s3.endpoint_override"] = parsed.netloc or parsed.path
        config["vfs.s3.scheme"] = parsed.scheme or "https"
        config["vfs.s3.use_virtual_addressing"] = "false"
    if store.region_name():
        config["vfs.s3.region"] = store.region_name()
    if config:
        # Fail fast on an unreachable endpoint instead of TileDB's long default backoff.
        config.update({"vfs.s3.connect_timeout_ms": str(CONNECT_TIMEOUT * 1000), "vfs.s3.connect_max_tries": "2",
                       "vfs.s3.request_timeout_ms": str(READ_TIMEOUT * 1000)})
    return {**READER_SETTINGS, **config}


def tiledb_context(settings: Mapping[str, str] | None = None) -> Any:
    """The SOMATileDBContext for the configured store (plus `settings`), one per process and settings."""
    config = {**tiledb_config(), **(settings or {})}
    with _lock:
        key = tuple(sorted(config.items()))
        ctx = _ctx_cache.get(key)
        if ctx is None:
            import tiledbsoma

            ctx = tiledbsoma.SOMATileDBContext(tiledb_config=config)
            _ctx_cache[key] = ctx
        return ctx

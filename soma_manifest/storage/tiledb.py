"""The store's settings in TileDB's terms: the atlas is reached through TileDB's own S3 support (its VFS), so the
endpoint, region and time limits the tool's own requests use are handed to TileDB here. The engine's other
settings (readers, trusted writes) and the contexts are atlas/engine.py's.
"""

from __future__ import annotations

from urllib.parse import urlparse

from soma_manifest.storage.settings import CONNECT_TIMEOUT, READ_TIMEOUT, StoreSettings
from soma_manifest.storage.settings import settings as current_settings


def tiledb_vfs_config(store: StoreSettings | None = None) -> dict[str, str]:
    """TileDB VFS settings for the same store (empty for local paths and the default AWS endpoint and region);
    credentials come from the AWS chain TileDB reads itself."""
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
    return config

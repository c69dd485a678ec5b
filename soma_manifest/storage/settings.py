"""How to reach the object store: the manifest's `object_store` block, and the timeouts of every request.

Credentials are never part of these settings: they come from the standard AWS chain (environment, profile).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Seconds to wait for an S3 endpoint to accept a connection and to answer (and between two reads of an
#: answer), and attempts per request (botocore's own retries, with backoff; throttling included). An endpoint
#: that refuses, never accepts or never answers fails within about 30 s (tests/test_s3.py, black holes).
#: TileDB gets the same connect and request timeouts (tiledb.tiledb_vfs_config).
CONNECT_TIMEOUT = 5
READ_TIMEOUT = 8
ATTEMPTS = 3


@dataclass(frozen=True)
class StoreSettings:
    """Object-store settings a worker needs to reach the same store (small, picklable; never credentials)."""

    endpoint_url: str | None = None
    region: str | None = None

    def endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def region_name(self) -> str | None:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


_settings = StoreSettings()


def configure(settings: StoreSettings | None) -> None:
    """Use these settings for s3:// in this process (the manifest's object_store block; workers get it passed)."""
    global _settings
    _settings = settings or StoreSettings()


def settings() -> StoreSettings:
    return _settings

"""Write timestamps. TileDB stamps a write with its array's open time in milliseconds. A delete at T also
hides writes stamped T (even ones made after it), and two overwrites of one row stamped with the same T are
resolved arbitrarily. Every mutation therefore runs inside `mutation()`, which returns only once the clock
has passed its timestamp: a mutation that starts after another one finished always gets a later timestamp.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@contextmanager
def mutation() -> Iterator[int]:
    """The timestamp to open arrays at for one mutation; on exit, wait until the clock passes it."""
    stamp = _now_ms()
    yield stamp
    while _now_ms() <= stamp:
        time.sleep(0.0005)


def settled_timestamp() -> int:
    """A timestamp after every mutation finished so far and before any started from now on: opening the
    atlas at it reads exactly what has been written up to now (the apply history records it)."""
    with mutation() as stamp:
        pass
    return stamp


def no_fence() -> None:
    """The fence of a write that no apply's lease guards (tests, benchmarks). A fence is called once the
    mutation's timestamp is fixed: see ingest.ingest_h5ad."""

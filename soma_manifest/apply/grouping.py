"""Which small samples are ingested together, and when a batch of ready samples is worth starting.

A step costs about the same fixed time whatever its sample's size (opening the arrays, writing a fragment per
array, reading the range back: ~0.3-1 s), and each of its fragments slows every later read and write. So while
conversions run, small converted samples wait until a group's worth is ready: GROUP_MIN of them, or one
GROUP_GROWTH-th of the samples this apply has ingested so far if that is more (or a full group). Groups thus
grow with the apply, so that its fragments grow with the logarithm of its samples (about 8 + 8.5 ln(N / 128)
groups for N small samples: 31 at 2,000, 45 at 10,000) until the group bounds (cells, entries, members) cap
them; then with the data. The apply's first ingest does not wait (converting and ingesting overlap from the
start), nor does anything once conversions are over.
Pure functions of the ledger: the pipeline decides, the state records.
"""

from __future__ import annotations

from collections.abc import Mapping

from soma_manifest.plan import Action
from soma_manifest.state import SampleState

#: A sample with fewer cells is ingested in a group; a larger one has a step of its own (its fixed cost is small
#: next to its writes, and it is usually ingested from the converting worker's memory).
SMALL_CELLS = 5_000
#: A group holds at most this many cells (and at most chunk_nnz entries: one X write per layer) ...
GROUP_CELLS = 20_000
#: ... and at most this many samples (each member's h5ad is open while the group is read: ~30 ms a member).
GROUP_MEMBERS = 400
#: While conversions run, small samples wait until at least this many are ready ...
GROUP_MIN = 16
#: ... or this fraction of the samples ingested so far, if more (see the module).
GROUP_GROWTH = 8


def groupable(key: str, entry: SampleState, alone: set[str]) -> bool:
    """Whether the sample may share an ingest step (not when it failed in a group: then it is retried alone)."""
    return (entry.cells or 0) < SMALL_CELLS and key not in alone


def ripe(ready: list[Action], samples: Mapping[str, SampleState], alone: set[str], *, converting: bool,
         first: bool, ingested: int) -> bool:
    """Whether to start the ready batch now: the apply's first, once conversions are over, or when something in
    it is not to be grouped (a large sample, an obs update, a retry); else when a group's worth of small samples
    is ready (see the module; `ingested`: samples whose ingest this apply has started)."""
    if not converting or first:
        return True
    small = [a for a in ready if a.ingests and "write_obs" not in a.steps and groupable(a.key, samples[a.key], alone)]
    if len(small) < len(ready):
        return True
    return (len(small) >= min(GROUP_MEMBERS, max(GROUP_MIN, ingested // GROUP_GROWTH))
            or sum(samples[a.key].cells or 0 for a in small) >= GROUP_CELLS)


def groups(keys: list[str], samples: Mapping[str, SampleState], alone: set[str], chunk_nnz: int) -> list[list[str]]:
    """The allocated samples (in allocation order) split into steps: runs of small samples whose ranges follow
    each other, within the group bounds; every other sample alone."""
    out: list[list[str]] = []
    current: list[str] = []
    cells = nnz = 0
    stop = None
    for key in keys:
        entry = samples[key]
        if not groupable(key, entry, alone):
            out.append([key])
            continue
        n, e = entry.cells or 0, entry.nnz or 0
        if current and (entry.joinids[0] != stop or cells + n > GROUP_CELLS or nnz + e > chunk_nnz
                        or len(current) >= GROUP_MEMBERS):
            out.append(current)
            current, cells, nnz = [], 0, 0
        current.append(key)
        cells, nnz, stop = cells + n, nnz + e, entry.joinids[1]
    if current:
        out.append(current)
    return out

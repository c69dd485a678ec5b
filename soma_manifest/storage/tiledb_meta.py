"""A TileDB group's metadata read straight from its `__meta` files, without the storage engine.

Why: a no-op apply must check the atlas' lineage and flags, and importing tiledbsoma for that costs ~1.5 s,
five times the no-op plan. The files are TileDB "generic tiles" (format spec: generic_tile.md, metadata.md):
a header, a filter pipeline, chunks, then entries `key_len:u32 key del:u8 [type:u8 count:u32 value]`. Only the
layouts seen in our atlases are decoded (no filter, or gzip); anything else answers None, and the caller asks
the storage engine instead, so an unknown format costs time, never a wrong answer.
"""

from __future__ import annotations

import re
import struct
import zlib

from soma_manifest import storage
from soma_manifest.storage.location import Location

_HEADER = struct.Struct("<IQQBQBI")  # version, persisted size, tile size, datatype, cell size, encryption, pipeline
_NO_FILTER, _GZIP = (), (1,)
_STRING_TYPES = {4, 11, 12}  # TILEDB_CHAR, STRING_ASCII, STRING_UTF8: the only values read here
_SIZES = {0: 4, 1: 8, 2: 4, 3: 8, 4: 1, 5: 1, 6: 1, 7: 2, 8: 2, 9: 4, 10: 8, 11: 1, 12: 1}
_NAME = re.compile(r"__(\d+)_(\d+)_[0-9a-f]+(_\d+)?(\.meta)?")


class _Unknown(Exception):
    """A layout this reader does not decode."""


def group_metadata(uri: Location) -> dict[str, str] | None:
    """The group's string metadata as of now (later files win, deletions applied); None when the group has no
    `__meta` folder or a file this reader cannot decode."""
    names = storage.listdir(uri / "__meta")
    if names is None:
        return None
    files = []
    for name, is_dir in names.items():
        if name.endswith(".vac"):  # lists files a consolidation already folded in; those are read in order anyway
            continue
        match = _NAME.fullmatch(name)
        if is_dir or match is None:
            return None
        files.append((int(match[2]), int(match[1]), name))
    values: dict[str, str] = {}
    try:
        for _, _, name in sorted(files):
            data = storage.read_bytes(uri / "__meta" / name)
            for key, deleted, value in _entries(_payload(data or b"")):
                if deleted or value is None:
                    values.pop(key, None)
                else:
                    values[key] = value
    except (_Unknown, struct.error, zlib.error, UnicodeDecodeError, IndexError):
        return None
    return values


def _payload(data: bytes) -> bytes:
    """A generic tile's bytes, unfiltered."""
    _, persisted, tile_size, _, _, encryption, pipeline = _HEADER.unpack_from(data, 0)
    if encryption:
        raise _Unknown("encrypted")
    at = _HEADER.size
    _, count = struct.unpack_from("<II", data, at)
    filters, pos = [], at + 8
    for _ in range(count):
        kind, size = struct.unpack_from("<BI", data, pos)
        filters.append(kind)
        pos += 5 + size
    if tuple(filters) not in (_NO_FILTER, _GZIP) or pos != at + pipeline:
        raise _Unknown(f"filters {filters}")
    body = data[at + pipeline:at + pipeline + persisted]
    (chunks,), pos, out = struct.unpack_from("<Q", body, 0), 8, bytearray()
    for _ in range(chunks):
        original, filtered, meta_size = struct.unpack_from("<III", body, pos)
        meta, pos = body[pos + 12:pos + 12 + meta_size], pos + 12 + meta_size
        chunk, pos = body[pos:pos + filtered], pos + filtered
        out += chunk if not filters else _gunzip(meta, chunk)
    if len(out) != tile_size:
        raise _Unknown("size")
    return bytes(out)


def _gunzip(meta: bytes, chunk: bytes) -> bytes:
    """One gzip-filtered chunk: its metadata counts filter-metadata parts (none expected) and data parts."""
    meta_parts, data_parts = struct.unpack_from("<II", meta, 0)
    if meta_parts:
        raise _Unknown("filter metadata parts")
    out, pos = bytearray(), 0
    for i in range(data_parts):
        _, compressed = struct.unpack_from("<II", meta, 8 + 8 * i)
        out += zlib.decompress(chunk[pos:pos + compressed])
        pos += compressed
    return bytes(out)


def _entries(raw: bytes) -> list[tuple[str, bool, str | None]]:
    """(key, deleted, value) per entry; value None for non-string values (not needed here)."""
    found, pos = [], 0
    while pos < len(raw):
        (size,) = struct.unpack_from("<I", raw, pos)
        key = raw[pos + 4:pos + 4 + size].decode()
        if raw[pos + 4 + size]:  # a deletion is its key alone
            found.append((key, True, None))
            pos += 4 + size + 1
            continue
        kind, count = struct.unpack_from("<BI", raw, pos + 4 + size + 1)
        if kind not in _SIZES:
            raise _Unknown(f"value type {kind}")
        start = pos + 4 + size + 6
        pos = start + count * _SIZES.get(kind, 1)
        if pos > len(raw):
            raise _Unknown("truncated")
        found.append((key, False, raw[start:pos].decode() if kind in _STRING_TYPES else None))
    return found

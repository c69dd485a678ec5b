"""Where a file is: a local path or an s3:// URI, path-like, and how a manifest's relative paths resolve."""

from __future__ import annotations

import os
import posixpath

S3 = "s3://"


class Location:
    """A local path or an s3:// URI, path-like: `/`, `.name`, `.parent`, `.suffix`, `with_name`, `str()`, `==`.

    A local Location is also `os.PathLike`, so code that opens local files keeps working unchanged. Which
    store holds it, and what that store can do, is `storage.store_for(location)`'s to say.
    """

    # is_remote picks the backend inside storage/; code elsewhere asks the store's capabilities instead.
    __slots__ = ("uri", "is_remote")

    def __init__(self, uri: str | os.PathLike[str] | Location) -> None:
        text = uri.uri if isinstance(uri, Location) else os.fspath(uri)
        if text.startswith(S3):
            bucket_key = text[len(S3):].strip("/")
            text = S3 + "/".join(p for p in bucket_key.split("/") if p)
        elif len(text) > 1:
            text = text.rstrip("/")
        self.uri = text
        self.is_remote = text.startswith(S3)

    def __truediv__(self, part: str) -> Location:
        return Location(f"{self.uri}/{part}")

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        head = self.uri.rsplit("/", 1)[0]
        return Location(head if head and head + "/" != S3 else self.uri)

    @property
    def suffix(self) -> str:
        name = self.name
        dot = name.rfind(".")
        return name[dot:] if dot > 0 else ""

    def with_name(self, name: str) -> Location:
        return self.parent / name

    def relative_to(self, root: Location) -> str:
        prefix = root.uri + "/"
        if not self.uri.startswith(prefix):
            raise ValueError(f"{self} is not under {root}")
        return self.uri[len(prefix):]

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Location):
            return self.uri == other.uri
        if isinstance(other, (str, os.PathLike)):
            return self.uri == Location(other).uri
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.uri)

    def __fspath__(self) -> str:
        if self.is_remote:
            raise TypeError(f"{self.uri} is not a local path (read it through soma_manifest.storage)")
        return self.uri

    def __reduce__(self) -> tuple:
        return (Location, (self.uri,))


def as_location(value: Location | str | os.PathLike[str]) -> Location:
    return value if type(value) is Location else Location(value)


def resolve(value: str, base: str | Location) -> Location:
    """A path as a manifest or schema writes it: s3:// URIs as they are, absolute local paths normalized, and
    relative ones against the folder `base` (a local folder, or an s3:// prefix for a file kept on S3)."""
    if value.startswith(S3):
        return Location(value)
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        return Location(os.path.normpath(path))
    base = str(base)
    if base.startswith(S3):
        return Location(S3 + posixpath.normpath(f"{base[len(S3):]}/{path}"))
    return Location(os.path.realpath(os.path.join(base, path)))

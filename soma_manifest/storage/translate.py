"""One StorageError per failure, naming the path or URI, what happened and what to do; never credentials.

Written once for every backend: a backend says which exceptions are its failures and what caused one
(`Translates.failures`, `Translates.cause`); the OS causes (disk full, read-only, permission) are shared.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from soma_manifest.errors import StorageError
from soma_manifest.storage.location import Location


def os_cause(exc: BaseException, text: str | None = None) -> tuple[str, str]:
    """(what happened, what to do) for an OS error, or any other failure by its type and text."""
    if isinstance(exc, PermissionError):
        return getattr(exc, "strerror", None) or "Permission denied", "check the file's permissions"
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC:
        return "disk full (No space left on device)", "free space on that filesystem"
    if code == errno.EROFS:
        return "read-only filesystem", "point the manifest at a writable location"
    if code == errno.EDQUOT:
        return "disk quota exceeded", "free space or raise the quota"
    if isinstance(exc, FileNotFoundError):
        return "not found", "check the path in the manifest"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror, "check the path"
    return f"{type(exc).__name__}: {str(exc) if text is None else text}".strip(), "check the path"


class Translates:
    """Error translation as a backend shares it; a backend overrides `failures` and `cause` if it has more."""

    def failures(self) -> tuple[type[BaseException], ...]:
        """The exceptions that mean the store failed (others are bugs and stay tracebacks)."""
        return (OSError,)

    def cause(self, exc: BaseException, loc: Location) -> tuple[str, str]:
        return os_cause(exc)

    def error(self, action: str, loc: Location, exc: BaseException) -> StorageError:
        what, hint = self.cause(exc, loc)
        return StorageError(f"cannot {action}: {what}", where=loc.uri, hint=hint)

    @contextmanager
    def guard(self, action: str, loc: Location) -> Iterator[None]:
        """Turn a failure of this store inside the block into one StorageError naming `loc`."""
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            if isinstance(exc, self.failures()):
                raise self.error(action, loc, exc) from None
            raise

"""The object store protocol every storage backend implements, and its errors.

Keys are relative, ``/``-separated paths such as ``out/job1/000000-42.png``. Every backend
validates them with :func:`check_key` so that a key can never escape its root or prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from os import PathLike
from typing import Protocol, runtime_checkable

StrPath = str | PathLike[str]
Progress = Callable[[int], object]  # told the bytes of each piece of a transfer done


class StorageError(Exception):
    """A storage operation failed (network, permissions, corrupted data, ...).

    ``transient``: the store could not be reached or was overloaded (connection refused or
    cut, a timeout, an HTTP 5xx, 408 or 429, a full or stale disk), so the same request
    may succeed later. Other failures (permissions, a bad bucket, a path that cannot
    exist) will fail again however long one waits."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ObjectNotFound(StorageError):
    """The key does not exist in the store."""

    def __init__(self, key: str, where: str = "") -> None:
        self.key = key
        super().__init__(f"object not found: {key!r}" + (f" in {where}" if where else ""))


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise ValueError naming it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid storage key {key!r}: must be a non-empty string")
    if "\x00" in key:
        raise ValueError(f"invalid storage key {key!r}: contains NUL")
    if "\\" in key:
        raise ValueError(f"invalid storage key {key!r}: contains a backslash")
    if key.startswith("/"):
        raise ValueError(f"invalid storage key {key!r}: must be relative (no leading '/')")
    for segment in key.split("/"):
        if segment == "":
            raise ValueError(f"invalid storage key {key!r}: empty path segment")
        if segment in (".", ".."):
            raise ValueError(f"invalid storage key {key!r}: '{segment}' segment not allowed")
    return key


def check_prefix(prefix: str) -> str:
    """Validate a listing prefix: like a key, but may be empty or end with ``/``."""
    if prefix == "":
        return prefix
    check_key(prefix.removesuffix("/"))
    return prefix


@runtime_checkable
class ObjectStore(Protocol):
    """A flat namespace of byte objects addressed by relative keys."""

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        """Store ``data`` under ``key``, replacing any previous object atomically."""

    def get_bytes(self, key: str) -> bytes:
        """Return the object's bytes; ObjectNotFound if missing."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    def size(self, key: str) -> int:
        """The object's size in bytes; ObjectNotFound if missing."""

    def delete(self, key: str) -> None:
        """Remove the object. Deleting a missing key is not an error."""

    def put_file(
        self, key: str, path: StrPath, content_type: str = "application/octet-stream"
    ) -> None:
        """Upload a local file, streaming (multipart on S3 for big files)."""

    def get_file(self, key: str, path: StrPath, progress: Progress | None = None) -> None:
        """Download to ``path`` (streaming; ``path`` appears only when complete).
        ``progress`` is called with the number of bytes of each piece that arrives."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix`` (plain string prefix), in sorted order."""

    def url(self, key: str, expires_s: int = 3600) -> str:
        """A URL a client can GET the object from (presigned on S3, file:// locally)."""

    def describe(self) -> str:
        """Human-readable location, e.g. ``s3://bucket/prefix (endpoint ...)``."""

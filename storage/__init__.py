"""Object storage for the farm: one small protocol, a local and an S3 backend.

``open_store(url)`` picks the backend from a URL:

- ``/abs/dir``, ``./rel/dir``, ``file:///abs/dir`` or ``file://./rel/dir``: :class:`LocalStore`
- ``s3://bucket/prefix[?endpoint=http://host:9000&region=eu-west-1&create=1]``: :class:`S3Store`
  (``&public=https://s3.example.com``: image URLs are presigned for that address, where
  clients outside the farm's network reach the same server)
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

from storage.base import ObjectNotFound, ObjectStore, StorageError, check_key
from storage.local import LocalStore

__all__ = [
    "LocalStore",
    "ObjectNotFound",
    "ObjectStore",
    "StorageError",
    "check_key",
    "open_store",
]

_S3_OPTIONS = {"endpoint", "region", "create", "public"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def open_store(url: str) -> ObjectStore:
    """Open the store a URL or path names; ValueError with the reason if it cannot."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("storage URL is empty: use a path, file:///abs/dir or s3://bucket/prefix")
    url = url.strip()
    scheme = urlsplit(url).scheme.lower()
    if scheme == "" or (len(scheme) == 1 and url[1:2] == ":"):  # plain path (or C:\...)
        return LocalStore(url)
    if scheme == "file":
        return LocalStore(_file_path(url))
    if scheme == "s3":
        return _open_s3(url)
    raise ValueError(
        f"unsupported storage URL scheme {scheme!r} in {url!r}: "
        "use a path, file:///abs/dir, file://./rel/dir or s3://bucket/prefix"
    )


def _file_path(url: str) -> str:
    rest = url[len("file://") :]
    if not rest.startswith(("/", ".")) and rest.split("/", 1)[0] == "localhost":
        rest = rest[len("localhost") :]
    path = unquote(rest.split("?", 1)[0].split("#", 1)[0])
    if not path:
        raise ValueError(f"file storage URL {url!r} names no directory")
    return path


def _open_s3(url: str) -> ObjectStore:
    from storage.s3 import S3Store  # boto3 is imported only when S3 is used

    parts = urlsplit(url)
    bucket = parts.netloc
    if not bucket:
        raise ValueError(f"S3 storage URL {url!r} names no bucket: use s3://bucket/prefix")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - _S3_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} in S3 storage URL {url!r}; "
            f"allowed: {', '.join(sorted(_S3_OPTIONS))}"
        )
    create = query.get("create", ["0"])[-1].lower()
    if create not in _TRUE | _FALSE:
        raise ValueError(f"option create={create!r} in {url!r} must be 0 or 1")
    public = query.get("public", [None])[-1] or None
    if public is not None and not (
        urlsplit(public).scheme in ("http", "https") and urlsplit(public).netloc
    ):
        raise ValueError(f"option public={public!r} in {url!r} must be an http(s) URL")
    return S3Store(
        bucket,
        prefix=unquote(parts.path).strip("/"),
        endpoint_url=query.get("endpoint", [None])[-1] or None,
        region=query.get("region", [None])[-1] or None,
        create_bucket=create in _TRUE,
        public_endpoint_url=public,
    )

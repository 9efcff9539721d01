"""Object store on S3 or any S3-compatible server (MinIO, SeaweedFS, Garage, moto) via boto3.

Credentials come from the standard ``AWS_*`` variables (or any boto3 credential source).
The endpoint comes from the argument, else ``FARM_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL``.
One boto3 client is created per store and shared: boto3 clients are thread-safe.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError

from storage.base import ObjectNotFound, Progress, StorageError, StrPath, check_key, check_prefix

MiB = 1024 * 1024
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}

CLIENT_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 5},
    s3={"addressing_style": "path"},
    # boto3 >= 1.36 sends CRC32 checksums that many S3-compatible servers reject
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
)
TRANSFER_CONFIG = TransferConfig(
    multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4
)


def _endpoint_from_env() -> str | None:
    for name in ("FARM_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    return None


_BUSY = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}


def _error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def is_transient(e: BotoCoreError | ClientError) -> bool:
    """The endpoint was unreachable, cut the connection, timed out or said it is busy or
    broken for now (HTTP 5xx, 408, 429): the same request may succeed later."""
    if isinstance(e, ClientError):
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or status in (408, 429) or _error_code(e) in _BUSY
    return isinstance(e, BotoConnectionError | HTTPClientError | IncompleteReadError)


class S3Store:
    """Objects under ``s3://bucket/prefix/``; key ``a/b.png`` is ``prefix/a/b.png``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        create_bucket: bool = False,
        public_endpoint_url: str | None = None,
    ) -> None:
        """``public_endpoint_url``: where clients outside the farm's network reach the same
        server (the farm talks to ``http://minio:9000``, a browser to
        ``https://s3.example.com``); image URLs are presigned for it. SigV4 signs the
        host, so the URL is signed by a client of that endpoint, not rewritten."""
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url or _endpoint_from_env()
        self.region = (
            region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=CLIENT_CONFIG
        )
        self.public_endpoint_url = public_endpoint_url
        self.presigner = self.client
        if public_endpoint_url:  # signing is local: this client never opens a connection
            self.presigner = boto3.session.Session().client(
                "s3", endpoint_url=public_endpoint_url, region_name=self.region,
                config=CLIENT_CONFIG,
            )  # fmt: skip
        if create_bucket:
            self.create_bucket()

    # -- helpers -------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError) as e:
            if key is not None and isinstance(e, ClientError) and _error_code(e) in _NOT_FOUND:
                raise ObjectNotFound(key, self.describe()) from None
            raise StorageError(
                f"S3 {action} failed on {self.describe()}: {e}", transient=is_transient(e)
            ) from e

    def create_bucket(self) -> None:
        """Create the bucket unless it exists already."""
        with self._errors("create_bucket"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as e:
                if _error_code(e) not in _NOT_FOUND | {"NoSuchBucket"}:
                    raise
            kwargs: dict = {"Bucket": self.bucket}
            if self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                self.client.create_bucket(**kwargs)
            except ClientError as e:
                if _error_code(e) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

    # -- ObjectStore ---------------------------------------------------------------------

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        full = self._key(key)
        with self._errors("put_object"):
            self.client.put_object(
                Bucket=self.bucket, Key=full, Body=data, ContentType=content_type
            )

    def get_bytes(self, key: str) -> bytes:
        full = self._key(key)
        with self._errors("get_object", key):
            return self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        full = self._key(key)
        with self._errors("head_object", key):
            return int(self.client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])

    def delete(self, key: str) -> None:
        full = self._key(key)
        with self._errors("delete_object"):
            self.client.delete_object(Bucket=self.bucket, Key=full)

    def put_file(
        self, key: str, path: StrPath, content_type: str = "application/octet-stream"
    ) -> None:
        full = self._key(key)
        with self._errors("upload"):
            self.client.upload_file(
                os.fspath(path),
                self.bucket,
                full,
                ExtraArgs={"ContentType": content_type},
                Config=TRANSFER_CONFIG,
            )

    def get_file(self, key: str, path: StrPath, progress: Progress | None = None) -> None:
        full = self._key(key)
        dest = Path(path).absolute()
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-" + dest.name + ".")
        os.close(fd)
        try:
            with self._errors("download", key):
                self.client.download_file(
                    self.bucket, full, tmp, Config=TRANSFER_CONFIG, Callback=progress
                )
            os.replace(tmp, dest)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors("list_objects_v2"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
                for item in page.get("Contents", []):
                    yield item["Key"][len(base) :]

    def url(self, key: str, expires_s: int = 3600) -> str:
        full = self._key(key)
        with self._errors("presign"):
            return self.presigner.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=expires_s
            )

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}"
        return f"{where} (endpoint {self.endpoint_url})" if self.endpoint_url else where

    def __repr__(self) -> str:
        return f"S3Store({self.describe()!r})"

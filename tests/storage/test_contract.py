"""The ObjectStore contract, run against every backend (LocalStore and S3Store on moto)."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

import pytest

from storage import ObjectNotFound, ObjectStore, StorageError
from storage.local import LocalStore, atomic_write
from tests.servers import MotoServer
from tests.storage.conftest import unique_bucket

MiB = 1024 * 1024
BAD_KEYS = ["", "/abs", "a//b", "a/../b", "..", "a/", "a\x00b", "./a", "a\\b"]


def test_implements_protocol(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)


def test_put_get_exists_delete(store: ObjectStore) -> None:
    key = "job1/000000-42.png"
    assert not store.exists(key)
    store.put_bytes(key, b"first", content_type="image/png")
    assert store.exists(key)
    assert store.get_bytes(key) == b"first"
    assert store.size(key) == 5
    store.put_bytes(key, b"second!")  # overwrite
    assert store.get_bytes(key) == b"second!"
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting a missing key is fine


def test_missing_object(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match="nope/x.png"):
        store.get_bytes("nope/x.png")
    with pytest.raises(ObjectNotFound):
        store.size("nope/x.png")
    dest = tmp_path / "dl" / "x.png"
    with pytest.raises(ObjectNotFound):
        store.get_file("nope/x.png", dest)
    assert not dest.exists()
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []  # no temp left
    assert issubclass(ObjectNotFound, StorageError)


def test_empty_object(store: ObjectStore) -> None:
    store.put_bytes("empty", b"")
    assert store.exists("empty")
    assert store.get_bytes("empty") == b""


def test_list_is_a_string_prefix_and_sorted(store: ObjectStore) -> None:
    for key in ["b/4", "a/2", "ab/3", "a/1", "a/sub/5"]:
        store.put_bytes(key, key.encode())
    assert list(store.list("a/")) == ["a/1", "a/2", "a/sub/5"]
    assert list(store.list("a")) == ["a/1", "a/2", "a/sub/5", "ab/3"]
    assert list(store.list("a/s")) == ["a/sub/5"]
    assert list(store.list()) == ["a/1", "a/2", "a/sub/5", "ab/3", "b/4"]
    assert list(store.list("zzz/")) == []
    with pytest.raises(ValueError):
        list(store.list("../"))


def test_url_serves_the_bytes(store: ObjectStore) -> None:
    data = os.urandom(1000)
    store.put_bytes("j/000001-7.png", data, content_type="image/png")
    url = store.url("j/000001-7.png", expires_s=60)
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == data


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_rejected(store: ObjectStore, key: str) -> None:
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.url(key),
    ):
        with pytest.raises(ValueError, match="invalid storage key"):
            call()


def test_big_file_streams_both_ways(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(20 * MiB))
    store.put_file("models/big.bin", src)
    assert store.size("models/big.bin") == 20 * MiB
    dest = tmp_path / "out" / "big.bin"
    pieces: list[int] = []
    store.get_file("models/big.bin", dest, progress=pieces.append)
    assert sum(pieces) == 20 * MiB and len(pieces) >= 2  # told as it goes, not at the end
    digest = hashlib.sha256
    assert digest(dest.read_bytes()).digest() == digest(src.read_bytes()).digest()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["big.bin"]  # no temp left
    if not isinstance(store, LocalStore):  # went up in parts
        head = store.client.head_object(Bucket=store.bucket, Key="farm/out/models/big.bin")
        assert "-" in head["ETag"]


def test_describe(store: ObjectStore) -> None:
    text = store.describe()
    if isinstance(store, LocalStore):
        assert text == str(store.root) and os.path.isabs(text)
    else:
        assert text.startswith(f"s3://{store.bucket}/farm/out (endpoint http://127.0.0.1:")


# -- backend specifics ---------------------------------------------------------------------


def test_local_write_is_atomic(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("a/img.png", b"good image")

    def crash(f: object) -> None:
        f.write(b"half an im")  # type: ignore[attr-defined]
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a" / "img.png", crash)
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a" / "new.png", crash)
    assert store.get_bytes("a/img.png") == b"good image"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["img.png"]
    assert list(store.list("")) == ["a/img.png"]


def test_local_url_and_layout(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "x" / ".." / "root")
    store.put_bytes("p/j/000000-1.png", b"png")
    assert (tmp_path / "root" / "p" / "j" / "000000-1.png").read_bytes() == b"png"
    assert store.url("p/j/000000-1.png") == (tmp_path / "root/p/j/000000-1.png").as_uri()
    store.delete("p/j/000000-1.png")
    assert list((tmp_path / "root").iterdir()) == []  # empty parents pruned


def test_s3_prefix_isolates_keys(s3_env: MotoServer, tmp_path: Path) -> None:
    from storage.s3 import S3Store
    from tests.storage.conftest import unique_bucket

    bucket = unique_bucket()
    a = S3Store(bucket, prefix="one", endpoint_url=s3_env.endpoint_url, create_bucket=True)
    b = S3Store(bucket, prefix="/two/", endpoint_url=s3_env.endpoint_url, create_bucket=True)
    root = S3Store(bucket, endpoint_url=s3_env.endpoint_url)
    a.put_bytes("k", b"A")
    b.put_bytes("k", b"B")
    assert a.get_bytes("k") == b"A" and b.get_bytes("k") == b"B"
    assert list(a.list()) == ["k"]
    assert list(root.list()) == ["one/k", "two/k"]
    assert b.describe() == f"s3://{bucket}/two (endpoint {s3_env.endpoint_url})"


def test_s3_unreachable_endpoint_is_storage_error(s3_env: MotoServer) -> None:
    from storage.s3 import S3Store
    from tests.servers import free_port

    store = S3Store("bucket", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="endpoint http://127.0.0.1") as info:
        store.get_bytes("x")
    assert info.value.transient  # the endpoint may answer later: a worker waits for it


def test_s3_errors_that_wait_will_not_cure_are_not_transient(s3_env: MotoServer) -> None:
    from storage.s3 import S3Store

    store = S3Store(unique_bucket(), endpoint_url=s3_env.endpoint_url)  # never created
    with pytest.raises(StorageError, match="NoSuchBucket") as info:
        store.put_bytes("x", b"")
    assert not info.value.transient


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [
        (503, "ServiceUnavailable", True),
        (500, "InternalError", True),
        (503, "SlowDown", True),
        (429, "TooManyRequests", True),
        (400, "RequestTimeout", True),
        (403, "AccessDenied", False),
        (400, "InvalidBucketName", False),
        (404, "NoSuchBucket", False),
    ],
)
def test_s3_answers_that_can_clear_up_are_transient(
    status: int, code: str, transient: bool
) -> None:
    from botocore.exceptions import ClientError

    from storage.s3 import is_transient

    answer = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    assert is_transient(ClientError(answer, "PutObject")) is transient  # type: ignore[arg-type]


def test_local_errors_that_can_clear_up_are_transient(tmp_path: Path) -> None:
    import errno

    from storage.local import _os_error

    store = LocalStore(tmp_path / "store")
    (tmp_path / "store" / "a").write_text("")  # a file where a directory should be
    with pytest.raises(StorageError) as info:
        store.put_bytes("a/b.png", b"x")
    assert not info.value.transient
    assert _os_error("w", OSError(errno.ENOSPC, "No space left on device")).transient
    assert not _os_error("w", PermissionError(errno.EACCES, "Permission denied")).transient

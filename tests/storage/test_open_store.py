"""open_store: one URL names a backend and its location."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from storage import LocalStore, open_store
from tests.servers import MotoServer, TcpProxy


def test_plain_paths_and_file_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cases = {
        str(tmp_path / "abs"): tmp_path / "abs",
        "rel/dir": tmp_path / "rel/dir",
        f"file://{tmp_path}/u": tmp_path / "u",
        "file://./rel2": tmp_path / "rel2",
        f"file://localhost{tmp_path}/lh": tmp_path / "lh",
        f"file://{tmp_path}/sp%20ace": tmp_path / "sp ace",
    }
    for url, expected in cases.items():
        store = open_store(url)
        assert isinstance(store, LocalStore), url
        assert store.root == expected, url
        assert store.describe() == str(expected)


def test_s3_url(s3_env: MotoServer) -> None:
    from storage.s3 import S3Store

    store = open_store(f"s3://urlbucket/pre/fix/?endpoint={s3_env.endpoint_url}&create=1")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.endpoint_url) == (
        "urlbucket",
        "pre/fix",
        s3_env.endpoint_url,
    )
    store.put_bytes("k", b"v")
    assert open_store(f"s3://urlbucket/pre?endpoint={s3_env.endpoint_url}").exists("fix/k")
    assert store.describe() == f"s3://urlbucket/pre/fix (endpoint {s3_env.endpoint_url})"


def test_s3_urls_presigned_for_a_public_endpoint(s3_env: MotoServer) -> None:
    """The farm reaches S3 at one address, browsers at another (a relay here): image URLs
    are signed for the public one and fetch the object through it."""
    with TcpProxy(s3_env.port) as relay:
        public = f"http://127.0.0.1:{relay.port}"
        store = open_store(
            f"s3://pubbucket/out?endpoint={s3_env.endpoint_url}&create=1&public={public}"
        )
        store.put_bytes("a/img.png", b"png bytes")
        url = store.url("a/img.png")
        assert url.startswith(f"{public}/pubbucket/out/a/img.png?")
        assert "Signature=" in url
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.read() == b"png bytes"
    plain = open_store(f"s3://pubbucket/out?endpoint={s3_env.endpoint_url}")
    assert plain.url("a/img.png").startswith(f"{s3_env.endpoint_url}/pubbucket/out/a/img.png?")


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "FARM_S3_ENDPOINT"])
def test_s3_endpoint_from_environment(
    s3_env: MotoServer, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, s3_env.endpoint_url)
    store = open_store("s3://envbucket?create=true&region=eu-west-1")
    assert store.describe() == f"s3://envbucket/ (endpoint {s3_env.endpoint_url})"
    store.put_bytes("a/b", b"x")
    assert list(store.list()) == ["a/b"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("gs://bucket/x", "unsupported storage URL scheme 'gs'"),
        ("http://host/x", "unsupported storage URL scheme 'http'"),
        ("s3:///prefix", "names no bucket"),
        ("s3://b/p?endpont=http://x", "unknown option.*endpont"),
        ("s3://b/p?create=maybe", "create='maybe'"),
        ("s3://b/p?public=minio:9000", "public='minio:9000'.*http"),
        ("s3://b/../p", "invalid storage key"),
        ("file://", "names no directory"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)

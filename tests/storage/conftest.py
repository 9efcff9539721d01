"""Fixtures for the storage tests: one moto S3 server per session, a store per backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import LocalStore, ObjectStore
from tests.servers import MotoServer


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """Dummy AWS credentials in the environment; the endpoint is NOT set there."""
    for name, value in moto_server.env.items():
        if name != "AWS_ENDPOINT_URL":
            monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FARM_S3_ENDPOINT", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return moto_server


def unique_bucket() -> str:
    return f"test-{uuid.uuid4().hex[:16]}"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    from storage.s3 import S3Store

    server: MotoServer = request.getfixturevalue("s3_env")
    return S3Store(
        unique_bucket(), prefix="farm/out", endpoint_url=server.endpoint_url, create_bucket=True
    )

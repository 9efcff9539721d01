"""Fixtures for the API tests: one real Redis server per test module, a fresh app per test.

Each app gets its own namespace, so tests in one module never see each other's jobs.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from farm.api.app import create_app
from farm.config import Config
from storage import LocalStore
from tests.servers import RedisServer

# small limits so that "over the limit" is cheap to send
LIMITS: dict[str, Any] = {
    "max_width": 1024,
    "max_height": 1024,
    "max_steps": 100,
    "max_batch_size": 16,
    "default_batch_size": 4,
    "max_images": 5000,
    "max_prompts": 50,
    "max_prompt_chars": 500,
    "max_sweep_values": 20,
    "max_cfg_scale": 20.0,
}


def fields(r: Any) -> list[str]:
    """The fields a 422 names, each with a message."""
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and all(d["msg"] for d in detail), detail
    return [d["field"] for d in detail]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def config(redis_server: RedisServer, tmp_path: Path) -> Config:
    return Config(
        data_dir=str(tmp_path),
        redis_url=redis_server.url,
        namespace="t" + uuid.uuid4().hex[:8],
        storage_url="file://" + str(tmp_path / "store"),
        output_prefix="renders",
        **LIMITS,
    )


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def app(config: Config, redis_client: redis.Redis, store: LocalStore) -> FastAPI:
    return create_app(config, redis_client=redis_client, store=store)


@pytest.fixture
def client(app: FastAPI) -> TestClient:
    return TestClient(app)


@pytest.fixture
def submit(client: TestClient) -> Callable[..., dict[str, Any]]:
    """POST a job (defaults: model synthetic, one prompt) and return the 201 body."""

    def _submit(**fields: Any) -> dict[str, Any]:
        body = {"model": "synthetic", "prompt": "a red fox", **fields}
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    return _submit

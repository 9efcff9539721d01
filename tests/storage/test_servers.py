"""The shared test servers start, answer, and clean up after themselves."""

from __future__ import annotations

import os
import socket
import urllib.request

import pytest

from tests.servers import MotoServer, RedisServer, free_port, redis_server_binary


def test_free_port() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_redis_server_answers_ping_and_cleans_up() -> None:
    redis = pytest.importorskip("redis")
    with RedisServer() as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert os.path.basename(server.binary) in ("valkey-server", "redis-server")
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        client.close()
        pid, workdir = server.pid, server.dir
        assert os.path.isdir(workdir)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(workdir)


def test_redis_binary_override(monkeypatch: pytest.MonkeyPatch) -> None:
    real = redis_server_binary()
    monkeypatch.setenv("FARM_REDIS_SERVER", real)
    assert redis_server_binary() == real
    monkeypatch.setenv("FARM_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(FileNotFoundError, match="FARM_REDIS_SERVER"):
        redis_server_binary()


def test_moto_server_speaks_http() -> None:
    with MotoServer() as server:
        assert server.endpoint_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(server.endpoint_url + "/moto-api/", timeout=10) as r:
            assert r.status == 200
        assert server.env["AWS_ENDPOINT_URL"] == server.endpoint_url
    assert "AWS_ENDPOINT_URL" not in os.environ or os.environ["AWS_ENDPOINT_URL"] != (
        server.endpoint_url
    )

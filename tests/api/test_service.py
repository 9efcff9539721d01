"""Health, workers, models, the OpenAPI document, and behaviour with Redis down."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis
from fastapi.testclient import TestClient

from farm.api.app import create_app
from farm.config import Config
from farm.models import ModelEntry, ModelRegistry
from farm.workers_registry import WorkerRegistry
from tests.servers import RedisServer, free_port


def test_healthz_ok(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"ok": True}


def _dead_redis_client(config: Config) -> tuple[TestClient, str]:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"  # nothing listens there
    dead = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    return TestClient(create_app(config, redis_client=dead)), url


def test_redis_down_is_503_not_500(config: Config) -> None:
    client, _ = _dead_redis_client(config)
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json()["ok"] is False
    assert "Connection" in r.json()["detail"]
    for method, path, body in (
        ("GET", "/v1/jobs", None),
        ("POST", "/v1/jobs", {"model": "synthetic", "prompt": "x"}),
        ("GET", "/v1/jobs/0123456789abcdef", None),
        ("GET", "/v1/jobs/0123456789abcdef/images", None),
        ("GET", "/v1/jobs/0123456789abcdef/errors", None),
        ("POST", "/v1/jobs/0123456789abcdef/cancel", None),
        ("GET", "/v1/workers", None),
        ("GET", "/v1/stats", None),
        ("GET", "/v1/models", None),
        ("POST", "/sdapi/v1/txt2img", {"prompt": "x"}),
        ("GET", "/sdapi/v1/sd-models", None),
        ("GET", "/sdapi/v1/options", None),
        ("GET", "/sdapi/v1/progress", None),
        ("POST", "/sdapi/v1/interrupt", None),
    ):
        r = client.request(method, path, json=body)
        assert r.status_code == 503, (path, r.text)
        assert "Redis" in r.json()["detail"]


def test_healthz_reason_hides_password(config: Config) -> None:
    cfg = Config(**{**config.__dict__, "redis_url": f"redis://:hunter2@127.0.0.1:{free_port()}/0"})
    dead = redis.Redis.from_url(cfg.redis(), socket_connect_timeout=0.5)
    r = TestClient(create_app(cfg, redis_client=dead)).get("/healthz")
    assert r.status_code == 503
    assert "hunter2" not in r.text


def test_workers_lists_live_workers(
    client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    assert client.get("/v1/workers").json() == []
    reg = WorkerRegistry(redis_client, config.namespace)
    reg.publish("node1-gpu0", {"device": "cuda:0", "loaded": ["synthetic"]}, ttl=30)
    workers = client.get("/v1/workers").json()
    assert [w["name"] for w in workers] == ["node1-gpu0"]
    assert workers[0]["device"] == "cuda:0"
    assert workers[0]["last_seen"] <= time.time()
    reg.remove("node1-gpu0")
    assert client.get("/v1/workers").json() == []


def test_models_lists_builtin_and_registered(
    client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    assert [m["name"] for m in client.get("/v1/models").json()] == ["synthetic"]
    ModelRegistry(redis_client, config.namespace).add(
        ModelEntry(name="sd15", engine="sd1", sha256="a" * 64, size=123, key="models/x")
    )
    models = client.get("/v1/models").json()
    assert [m["name"] for m in models] == ["synthetic", "sd15"]
    assert models[1]["engine"] == "sd1" and models[1]["size"] == 123
    assert models[0]["engine"] == "synthetic"


def test_openapi_document(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["info"]["title"] == "render farm"
    assert set(doc["paths"]) == {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/images",
        "/v1/jobs/{job_id}/errors",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/pause",
        "/v1/jobs/{job_id}/resume",
        "/v1/jobs/{job_id}/retry",
        "/v1/jobs/{job_id}/priority",
        "/v1/workers",
        "/v1/stats",
        "/v1/inputs",
        "/v1/models",
        "/healthz",
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
        "/sdapi/v1/sd-models",
        "/sdapi/v1/loras",
        "/sdapi/v1/samplers",
        "/sdapi/v1/schedulers",
        "/sdapi/v1/options",
        "/sdapi/v1/progress",
        "/sdapi/v1/interrupt",
        "/sdapi/v1/png-info",
        "/sdapi/v1/sd-vae",
        "/sdapi/v1/hypernetworks",
        "/sdapi/v1/embeddings",
        "/sdapi/v1/refresh-checkpoints",
        "/sdapi/v1/refresh-loras",
        "/sdapi/v1/refresh-vae",
        "/sdapi/v1/refresh-embeddings",
        "/sdapi/v1/upscalers",
        "/sdapi/v1/latent-upscale-modes",
    }
    schemas = doc["components"]["schemas"]
    assert {"JobSpec", "JobDetail", "JobSummary", "ImagesPage", "ErrorBody"} <= set(schemas)
    assert {"model", "prompt", "sweep"} <= set(schemas["JobSpec"]["properties"])
    post = doc["paths"]["/v1/jobs"]["post"]
    assert "201" in post["responses"] and "422" in post["responses"]
    assert post["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }


def test_body_over_limit_is_413(client: TestClient) -> None:
    r = client.post(
        "/v1/jobs",
        content=b"x",
        headers={"content-type": "application/json", "content-length": str(10**9)},
    )
    assert r.status_code == 413
    assert "at most" in r.json()["detail"]


def test_unknown_route_and_method(client: TestClient) -> None:
    assert client.get("/v2/nothing").json() == {"detail": "Not Found"}
    r = client.delete("/v1/jobs")
    assert r.status_code == 405 and isinstance(r.json()["detail"], str)


def test_api_does_not_import_torch() -> None:
    code = (
        "import sys, farm.api.app, farm.api.__main__; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_python_m_farm_api_serves(redis_server: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "FARM_REDIS_URL": redis_server.url,
        "FARM_API_PORT": str(port),
        "FARM_DATA_DIR": str(tmp_path),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.api"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "API did not start"
                time.sleep(0.1)
        assert r.status_code == 200 and r.json() == {"ok": True}
        job = {"model": "synthetic", "prompt": "x", "count": 3}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json=job, timeout=5)
        assert r.status_code == 201 and r.json()["total"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)

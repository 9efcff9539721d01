"""Textual-inversion embeddings end to end on real servers (Redis-compatible server, S3 over
HTTP, a Celery worker process): a job submitted through the API lists the embedding its
negative prompt names, the worker fetches the file from S3 into its cache, renders with its
vectors in place of the name, and writes A1111's ``TI hashes``; an embedding the model
cannot read fails its images with a ``load`` entry naming it, not counting against the
model.

The tiny model's text encoder is 32 wide, not SD1's 768, which ``farm models add`` would
refuse; so the files here are stored and registered as ``farm models add`` stores a
converted one (tests/api/test_embeddings.py shows that step on a real-width file)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.numpy import save_file

from farm.api.app import create_app
from farm.models import ModelEntry, ModelRegistry
from storage.keys import image_key
from storage.models import ModelStore
from storage.png import parse_parameters, read_parameters
from tests.cluster import Cluster

pytestmark = pytest.mark.timeout(300)

SPEC: dict[str, Any] = {
    "model": "tiny",
    "prompt": ["a red circle", "a blue square"],
    "negative_prompt": "blurry, TinyNeg",
    "seed": 42,
    "width": 64,
    "height": 64,
    "steps": 3,
    "cfg_scale": 5.0,
    "sampler_name": "Euler",
    "batch_size": 2,
}


def register(farm: Cluster, name: str, width: int, vectors: int = 3) -> tuple[ModelEntry, str]:
    """An SD1 embedding of ``vectors`` random vectors ``width`` wide, put in S3 and
    registered; and the sha256 of the file."""
    path = farm.tmp / f"{name}.safetensors"
    rng = np.random.default_rng(width)
    save_file({"emb_params": rng.standard_normal((vectors, width)).astype(np.float32)}, str(path))
    blob = ModelStore(farm.store, farm.tmp / "embedding-upload").add(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    entry = ModelEntry(
        name=name,
        engine="embedding",
        sha256=blob.sha256,
        size=blob.size,
        key=blob.key,
        family="sd1",
        vectors=vectors,
        source_sha256=sha,
    )
    return ModelRegistry(farm.r, farm.config.namespace).add(entry), sha


def render(farm: Cluster, client: TestClient, **over: Any) -> tuple[dict[str, Any], list[bytes]]:
    r = client.post("/v1/jobs", json={**SPEC, **over})
    assert r.status_code == 201, r.text
    job = farm.wait(r.json()["id"], timeout=120)
    assert (job.state, job.done, job.failed) == ("done", 2, 0), job.summary()
    pngs = [
        farm.store.get_bytes(image_key("renders", job.id, i, job.plan.image(i).seed))
        for i in range(2)
    ]
    return r.json()["spec"], pngs


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_a_named_embedding_is_fetched_and_rendered_with(model_farm: Cluster) -> None:
    farm = model_farm
    entry, sha = register(farm, "tinyneg", width=32)
    client = TestClient(create_app(farm.config, redis_client=farm.r, store=farm.store))
    spec, with_it = render(farm, client)
    assert spec["embeddings"] == ["tinyneg"]  # found in the negative prompt, any case
    plain_spec, as_text = render(farm, client, embeddings=[])  # the name read as text
    assert plain_spec["embeddings"] == []
    for a, b in zip(with_it, as_text, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() > 2
    # the worker fetched it from S3 into its own cache
    assert (Path(farm.config.model_cache) / f"{entry.sha256}.safetensors").exists()
    params = parse_parameters(read_parameters(with_it[0]) or "")
    assert params["extra"]["TI hashes"] == f"tinyneg: {sha[:12]}"
    assert "TI hashes" not in parse_parameters(read_parameters(as_text[0]) or "")["extra"]


def test_an_embedding_the_model_cannot_read_fails_its_images_as_a_load(
    model_farm: Cluster,
) -> None:
    farm = model_farm
    register(farm, "wideneg", width=768)  # SD1's width; the tiny model's encoder is 32 wide
    client = TestClient(create_app(farm.config, redis_client=farm.r, store=farm.store))
    r = client.post("/v1/jobs", json={**SPEC, "negative_prompt": "wideneg"})
    assert r.status_code == 201 and r.json()["spec"]["embeddings"] == ["wideneg"]
    job = farm.wait(r.json()["id"], timeout=120)
    assert (job.state, job.done, job.failed) == ("failed", 0, 2)
    errors = farm.ledger.errors(job.id)
    assert errors and {e["stage"] for e in errors} == {"load"}
    assert "embedding 'wideneg'" in errors[0]["error"] and "768" in errors[0]["error"]
    # the file's fault, not the model's: no failure counts against the model
    assert list(farm.r.scan_iter(f"{farm.config.namespace}:fail:*")) == []

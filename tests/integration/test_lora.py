"""LoRA end to end on real servers (Redis-compatible server, S3 over HTTP, a Celery worker
process): the worker fetches the job's LoRA from S3 into its cache like a checkpoint,
renders with it merged, and writes A1111's LoRA parameters; a LoRA whose blob is missing
fails its images with a ``load`` entry in the job's failure list."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from farm.api.app import create_app
from farm.models import ModelRegistry
from farm.spec import JobSpec
from storage.keys import image_key
from storage.png import parse_parameters, read_parameters
from tests.cluster import Cluster

pytestmark = pytest.mark.timeout(300)

SPEC = {
    "model": "tiny",
    "prompt": ["a red circle", "a blue square"],
    "seed": 42,
    "width": 64,
    "height": 64,
    "steps": 3,
    "cfg_scale": 5.0,
    "sampler_name": "Euler",
    "batch_size": 2,
}


def addnet_hash(path: Path) -> str:
    """A1111's hash of a LoRA file: the sha256 of what follows its header."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n :]).hexdigest()


@pytest.fixture
def farm(model_farm: Cluster) -> Cluster:
    """The session's farm of one worker (tests/integration/conftest.py): model ``tiny``, the
    LoRA ``style``, and ``gone``, a LoRA whose blob is lost from the store."""
    return model_farm


def render(farm: Cluster, **kw: object) -> tuple[str, list[bytes]]:
    job_id = farm.ledger.create(JobSpec(**{**SPEC, **kw}), farm.config.default_batch_size).id
    job = farm.wait(job_id, timeout=120)
    assert (job.state, job.done, job.failed) == ("done", 2, 0), job.summary()
    return job_id, [
        farm.store.get_bytes(image_key("renders", job_id, i, job.plan.image(i).seed))
        for i in range(2)
    ]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_a_job_with_a_lora_renders_with_it_on_a_worker_that_fetched_it(farm: Cluster) -> None:
    _, base = render(farm)
    _, styled = render(farm, loras=[{"name": "style", "weight": 1.0}])
    _, again = render(farm)  # the same worker, the LoRA taken out again
    for b, s, a in zip(base, styled, again, strict=True):
        assert np.abs(pixels(b) - pixels(s)).max() > 2
        assert np.array_equal(pixels(b), pixels(a))
    # the worker fetched the LoRA from S3 into its own cache (the upload used another)
    style = ModelRegistry(farm.r, farm.config.namespace).get("style")
    assert style is not None
    assert (Path(farm.config.model_cache) / f"{style.sha256}.safetensors").exists()
    # A1111's parameters: the tag in the prompt, the file's hash in "Lora hashes"
    for png, prompt in zip(styled, SPEC["prompt"], strict=True):  # type: ignore[arg-type]
        params = parse_parameters(read_parameters(png) or "")
        assert params["prompt"] == f"{prompt} <lora:style:1>"
        want = addnet_hash(farm.files["style"])[:12]  # type: ignore[attr-defined]
        assert params["extra"]["Lora hashes"] == f"style: {want}"
    plain = parse_parameters(read_parameters(base[0]) or "")
    assert plain["prompt"] == SPEC["prompt"][0] and "Lora hashes" not in plain["extra"]  # type: ignore[index]

    # the same image asked for the A1111 way: a <lora:...> tag in the prompt
    client = TestClient(create_app(farm.config, redis_client=farm.r, store=farm.store))
    body = {
        "prompt": "a red circle <lora:style:1>",
        "override_settings": {"sd_model_checkpoint": "tiny"},
        **{k: SPEC[k] for k in ("seed", "width", "height", "steps", "cfg_scale", "sampler_name")},
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["prompt"] == body["prompt"]
    assert parse_parameters(info["infotexts"][0])["prompt"] == body["prompt"]
    png = base64.b64decode(r.json()["images"][0])
    assert np.abs(pixels(png) - pixels(styled[0])).max() <= 1


def test_a_lora_missing_from_the_store_fails_its_images_with_a_load_error(farm: Cluster) -> None:
    spec = JobSpec(**{**SPEC, "loras": [{"name": "gone", "weight": 0.5}]})
    job = farm.wait(farm.ledger.create(spec, farm.config.default_batch_size).id, timeout=120)
    assert (job.state, job.done, job.failed) == ("failed", 0, 2)
    errors = farm.ledger.errors(job.id)
    assert errors and {e["stage"] for e in errors} == {"load"}
    first = errors[0]
    assert first["images_failed"] and first["model"] == "tiny"
    assert "LoRA 'gone'" in first["error"] and "ObjectNotFound" in first["error"]
    # the LoRA's fault, not the model's: no failure counts against the model
    assert list(farm.r.scan_iter(f"{farm.config.namespace}:fail:*")) == []

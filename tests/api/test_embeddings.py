"""Textual-inversion embeddings at the edges, on a real Redis server: ``farm models add``
stores an A1111 ``.pt`` as the safetensors file workers read, a job lists the registered
embeddings its prompts name (or the ones it gives, 422 naming ``embeddings[i]`` for one
that is not a registered embedding of its models' family), and the A1111 API lists them
and finds them in its prompts the same way.

Nothing renders here (tests/integration/test_embeddings.py renders with one)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from farm import cli
from farm.config import Config
from farm.jobs import Ledger
from farm.models import ModelEntry, ModelRegistry
from farm.spec import Plan
from farm.stack import register_model
from farm.workers_registry import WorkerRegistry
from storage import LocalStore
from storage.keys import model_key
from tests.api.conftest import fields


def a1111_pt(path: Path, vectors: torch.Tensor) -> Path:
    """An embedding as A1111's trainer saves it."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vectors},
            "name": path.stem,
            "step": 1500,
            "sd_checkpoint": "abcdef12",
            "sd_checkpoint_name": "v1-5-pruned",
        },
        path,
    )
    return path


@pytest.fixture
def registry(config: Config, redis_client: redis.Redis) -> ModelRegistry:
    """Checkpoint entries ``sd``, ``xl`` and ``flux`` (no files: nothing renders), a LoRA
    ``style``, and embeddings ``easynegative`` (SD1), ``bad-hands-5`` (SD1) and ``negxl``
    (SDXL)."""
    reg = ModelRegistry(redis_client, config.namespace)
    for name, engine in (("sd", "sd1"), ("xl", "sdxl"), ("flux", "flux"), ("style", "lora")):
        reg.add(ModelEntry(name=name, engine=engine, sha256="ab" * 32, size=1))
    for name, family, vectors in (
        ("easynegative", "sd1", 8),
        ("bad-hands-5", "sd1", 2),
        ("negxl", "sdxl", 4),
    ):
        reg.add(
            ModelEntry(
                name=name, engine="embedding", sha256="cd" * 32, family=family, vectors=vectors
            )
        )
    return reg


def test_models_add_stores_an_a1111_pt_as_the_safetensors_workers_read(
    config: Config,
    redis_client: redis.Redis,
    store: LocalStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    vectors = torch.randn(3, 768, generator=torch.Generator().manual_seed(0))
    pt = a1111_pt(tmp_path / "easynegative.pt", vectors)
    for name, value in config.items():
        monkeypatch.setenv(name, str(value))
    assert cli.main(["models", "add", str(pt), "--name", "easynegative"]) == 0
    assert "embedding easynegative: sd1, 3 vectors" in capsys.readouterr().out
    entry = ModelRegistry(redis_client, config.namespace).get("easynegative")
    assert entry is not None
    assert (entry.engine, entry.family, entry.vectors) == ("embedding", "sd1", 3)
    assert not entry.is_checkpoint
    # A1111's hash (TI hashes) is the file's own; the blob is the converted file
    assert entry.source_sha256 == hashlib.sha256(pt.read_bytes()).hexdigest()
    blob = tmp_path / "blob.safetensors"
    blob.write_bytes(store.get_bytes(model_key(entry.sha256)))
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == entry.sha256
    tensors = load_file(str(blob))
    assert list(tensors) == ["emb_params"] and torch.equal(tensors["emb_params"], vectors)


def test_models_add_refuses_an_embedding_no_prompt_chunk_holds(
    config: Config, redis_client: redis.Redis, tmp_path: Path
) -> None:
    pt = a1111_pt(tmp_path / "long.pt", torch.zeros(76, 768))
    with pytest.raises(ValueError, match="76 vectors; a prompt's chunk holds 75 tokens"):
        register_model(config, redis_client, pt, "long")
    assert ModelRegistry(redis_client, config.namespace).get("long") is None
    assert register_model(config, redis_client, a1111_pt(pt, torch.zeros(75, 768)), "long")


def test_models_add_refuses_a_name_no_job_could_give(
    config: Config, redis_client: redis.Redis, tmp_path: Path
) -> None:
    pt = a1111_pt(tmp_path / "e.pt", torch.zeros(1, 768))
    with pytest.raises(ValueError, match="--name 'my embedding': must be a model name"):
        register_model(config, redis_client, pt, "my embedding")
    assert ModelRegistry(redis_client, config.namespace).get("my embedding") is None


def submitted(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/jobs", json={"model": "sd", "prompt": "a fox", **body})
    assert r.status_code == 201, r.text
    return r.json()["spec"]


def test_a_job_lists_the_registered_embeddings_its_prompts_name(
    client: TestClient, registry: ModelRegistry, config: Config, redis_client: redis.Redis
) -> None:
    spec = submitted(
        client,
        prompt=["a fox, (EasyNegative:1.2)", "a cat"],
        sweep={"negative_prompt": ["blurry", "bad-hands-5, negxl"]},
    )
    # negxl is named but made for SDXL: on an SD1 model it stays text, as in A1111
    assert spec["embeddings"] == ["bad-hands-5", "easynegative"]
    assert submitted(client, prompt="easynegatives and style")["embeddings"] == []
    assert submitted(client, model="xl", negative_prompt="negxl")["embeddings"] == ["negxl"]
    # a Flux model takes none: its names stay text
    assert (
        submitted(client, model="flux", prompt="negxl easynegative", width=64)["embeddings"] == []
    )
    # the workers' images carry them
    (job, *_) = Ledger(redis_client, config.namespace).list()
    assert Plan(job.spec).image(0).embeddings == tuple(job.spec.embeddings or ())


def test_a_job_that_lists_its_embeddings_gets_exactly_those(
    client: TestClient, registry: ModelRegistry
) -> None:
    spec = submitted(client, prompt="easynegative", embeddings=["bad-hands-5"])
    assert spec["embeddings"] == ["bad-hands-5"]  # the prompt's easynegative stays text
    assert submitted(client, prompt="easynegative", embeddings=[])["embeddings"] == []


BAD = [
    ({"embeddings": ["nope"]}, "embeddings[0]", "unknown embedding 'nope'; registered "
     "embeddings: bad-hands-5, easynegative, negxl"),
    ({"embeddings": ["easynegative", "style"]}, "embeddings[1]",
     "'style' is a LoRA, not an embedding"),
    ({"embeddings": ["sd"]}, "embeddings[0]", "'sd' is a checkpoint (sd1), not an embedding"),
    ({"embeddings": ["negxl"]}, "embeddings[0]",
     "'negxl' is an embedding for sdxl models; the job's models include sd1"),
    ({"model": "xl", "sweep": {"model": ["xl", "sd"]}, "embeddings": ["negxl"]},
     "embeddings[0]", "the job's models include sd1"),
    ({"model": "flux", "width": 64, "embeddings": ["easynegative"]}, "embeddings[0]",
     "the job's models include flux"),
    ({"embeddings": ["easynegative", "easynegative"]}, "embeddings",
     "item 1: 'easynegative' is listed twice"),
    ({"embeddings": ["a b"]}, "embeddings", "item 0: must be a model name"),
    ({"embeddings": "easynegative"}, "embeddings", "list"),
    ({"model": "easynegative"}, "model", "'easynegative' is a textual-inversion embedding, "
     "not a checkpoint"),
]  # fmt: skip


@pytest.mark.parametrize(("over", "field", "words"), BAD, ids=[str(b[0]) for b in BAD])
def test_what_is_not_a_registered_embedding_of_the_family_gets_422_naming_it(
    over: dict[str, Any], field: str, words: str, client: TestClient, registry: ModelRegistry,
    config: Config, redis_client: redis.Redis,
) -> None:  # fmt: skip
    r = client.post("/v1/jobs", json={"model": "sd", "prompt": "a fox", **over})
    got = dict(zip(fields(r), (d["msg"] for d in r.json()["detail"]), strict=True))
    assert field in got and words in got[field], got
    assert Ledger(redis_client, config.namespace).list() == []


def test_the_a1111_api_lists_them_and_finds_them_in_its_prompts(
    config: Config, redis_client: redis.Redis, store: LocalStore, registry: ModelRegistry
) -> None:
    from farm.api.app import create_app

    WorkerRegistry(redis_client, config.namespace).publish("w1", {"device": "cpu"}, ttl=60)
    app = create_app(replace(config, sdapi_timeout=0.2), redis_client=redis_client, store=store)
    client = TestClient(app)
    listed = client.get("/sdapi/v1/embeddings").json()
    assert listed["skipped"] == {}
    assert listed["loaded"]["easynegative"] == {
        "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
        "shape": 768, "vectors": 8,
    }  # fmt: skip
    assert listed["loaded"]["negxl"]["shape"] == 2048  # both encoders' widths, as A1111
    body = {
        "prompt": "a fox",
        "negative_prompt": "EasyNegative, blurry",
        "override_settings": {"sd_model_checkpoint": "sd"},
    }
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 504
    (job,) = Ledger(redis_client, config.namespace).list()
    assert job.spec.embeddings == ["easynegative"]

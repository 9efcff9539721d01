"""LoRAs at the edges, on a real Redis server: ``farm models add`` tells a LoRA file by its
keys, a job lists registered LoRAs in ``loras`` (422 naming the field otherwise), the CLI's
``--lora`` flag, and A1111's ``<lora:name:weight>`` prompt tags on ``/sdapi/v1/txt2img``.

Nothing renders here: an accepted txt2img request ends at its (tiny) timeout, and the job it
submitted shows how the tags were read."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from safetensors.numpy import save_file

from farm import cli
from farm.api.app import create_app
from farm.config import Config
from farm.jobs import Ledger
from farm.models import ModelEntry, ModelRegistry
from farm.stack import register_model
from farm.workers_registry import WorkerRegistry
from storage import LocalStore
from storage.keys import model_key

LORA_KEY = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
SD_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
F32 = np.float32


def write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file({k: np.ascontiguousarray(v, dtype=F32) for k, v in tensors.items()}, str(path))
    return path


def kohya_file(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write(
        path,
        {
            f"{LORA_KEY}.lora_down.weight": rng.standard_normal((4, 32)),
            f"{LORA_KEY}.lora_up.weight": rng.standard_normal((64, 4)),
            f"{LORA_KEY}.alpha": np.array(2.0),
        },
    )


@pytest.fixture
def registered(config: Config, redis_client: redis.Redis, tmp_path: Path) -> dict[str, Any]:
    """A checkpoint entry ``sd`` (no file needed: nothing renders) and LoRAs ``style`` and
    ``detail``, registered from real files."""
    ModelRegistry(redis_client, config.namespace).add(
        ModelEntry(name="sd", engine="sd1", sha256="ab" * 32, size=1)
    )
    style = register_model(config, redis_client, kohya_file(tmp_path / "s.safetensors"), "style")
    detail = register_model(
        config, redis_client, kohya_file(tmp_path / "d.safetensors", 1), "detail"
    )
    return {"style": style, "detail": detail}


def fields(r: Any) -> dict[str, str]:
    assert r.status_code == 422, r.text
    return {d["field"]: d["msg"] for d in r.json()["detail"]}


def test_models_add_tells_a_lora_by_its_keys(
    config: Config,
    redis_client: redis.Redis,
    store: LocalStore,
    client: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in {
        "FARM_REDIS_URL": config.redis_url,
        "FARM_NAMESPACE": config.namespace,
        "FARM_STORAGE_URL": config.storage_url,
        "FARM_MODEL_CACHE": str(tmp_path / "cache"),
        "FARM_DATA_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)
    kohya = kohya_file(tmp_path / "kohya.safetensors")
    peft = write(
        tmp_path / "peft.safetensors",
        {
            "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": np.ones((2, 64)),
            "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": np.ones((64, 2)),
        },
    )
    checkpoint = write(tmp_path / "ckpt.safetensors", {SD_KEY: np.zeros((8, 768))})
    loha = write(tmp_path / "loha.safetensors", {f"{LORA_KEY}.hada_w1_a": np.ones((64, 4))})

    assert cli.main(["models", "add", str(kohya), "--name", "style"]) == 0
    assert "LoRA style: lora, sha256 " in capsys.readouterr().out
    assert cli.main(["models", "add", str(peft), "--name", "peft-style"]) == 0
    assert cli.main(["models", "add", str(checkpoint), "--name", "base"]) == 0
    assert cli.main(["models", "add", str(loha), "--name", "loha"]) == 2
    assert "LyCORIS" in capsys.readouterr().err
    xl_key = "conditioner.embedders.1.model.ln_final.weight"  # an SDXL checkpoint's
    sdxl = write(tmp_path / "xl.safetensors", {xl_key: np.ones(4)})
    assert cli.main(["models", "add", str(sdxl), "--name", "xl"]) == 0
    # BFL's transformer alone: the farm reads Flux as one file with its encoders and VAE
    flux = write(tmp_path / "flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": np.ones(4)})
    assert cli.main(["models", "add", str(flux), "--name", "flux"]) == 2
    err = capsys.readouterr().err
    assert "not an all-in-one Flux checkpoint" in err and "the VAE (vae.*)" in err
    refiner = write(tmp_path / "refiner.safetensors", {SD_KEY: np.zeros((8, 1280))})
    assert cli.main(["models", "add", str(refiner), "--name", "refiner"]) == 2
    assert "family 'sdxl-refiner' is not supported yet" in capsys.readouterr().err

    registry = ModelRegistry(redis_client, config.namespace)
    engines = {e.name: e.engine for e in registry.list()}
    assert engines == {"synthetic": "synthetic", "style": "lora", "peft-style": "lora",
                       "base": "sd1", "xl": "sdxl"}  # fmt: skip
    entry = registry.get("style")
    assert entry is not None and store.get_bytes(model_key(entry.sha256)) == kohya.read_bytes()
    listed = {m["name"]: m["engine"] for m in client.get("/v1/models").json()}
    assert listed["style"] == "lora" and listed["base"] == "sd1"


def test_a_job_with_registered_loras_is_accepted_and_stored(
    client: TestClient, registered: dict[str, Any], redis_client: redis.Redis, config: Config
) -> None:
    body = {
        "model": "sd",
        "prompt": "a red fox",
        "count": 3,
        "loras": [{"name": "style", "weight": -0.75}, {"name": "detail"}],
    }
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["spec"]["loras"] == [
        {"name": "style", "weight": -0.75},
        {"name": "detail", "weight": 1.0},
    ]
    stored = Ledger(redis_client, config.namespace).get(job["id"])
    assert stored.spec.loras[0].name == "style"
    # every image of the job carries them, in their order
    assert {stored.plan.image(i).loras for i in range(3)} == {(("style", -0.75), ("detail", 1.0))}
    assert client.get(f"/v1/jobs/{job['id']}").json()["spec"]["loras"] == job["spec"]["loras"]
    plain = client.post("/v1/jobs", json={"model": "sd", "prompt": "x"}).json()
    assert plain["spec"]["loras"] == []


LORA = {"name": "style", "weight": 1.0}
# (field named in the 422, words of its message, body overrides)
BAD: list[tuple[str, str, dict[str, Any]]] = [
    ("loras[0].name", "unknown LoRA 'nope'; registered LoRAs: detail, style",
     {"loras": [{"name": "nope"}]}),
    ("loras[1].name", "'sd' is a checkpoint (sd1), not a LoRA",
     {"loras": [LORA, {"name": "sd"}]}),
    ("loras[0].name", "must be a model name", {"loras": [{"name": "my lora"}]}),
    ("loras[0].weight", "between -5 and 5", {"loras": [{"name": "style", "weight": 5.5}]}),
    ("loras[0].weight", "between -5 and 5", {"loras": [{"name": "style", "weight": -6}]}),
    ("loras[0].weight", "number", {"loras": [{"name": "style", "weight": "strong"}]}),
    ("loras[0].strength", "Extra inputs", {"loras": [{"name": "style", "strength": 1}]}),
    ("loras", "listed twice", {"loras": [LORA, {"name": "detail"}, LORA]}),
    ("loras", "at most 8", {"loras": [LORA] * 9}),
    ("loras[0]", "", {"loras": ["style"]}),
    ("model", "'style' is a LoRA, not a checkpoint", {"model": "style"}),
    ("sweep.model[1]", "'detail' is a LoRA", {"sweep": {"model": ["sd", "detail"]}}),
    ("loras", "model 'synthetic' (synthetic) takes no LoRA; LoRAs go with sd1 models",
     {"model": "synthetic", "loras": [LORA]}),
]  # fmt: skip


@pytest.mark.parametrize(("field", "words", "over"), BAD, ids=[f"{b[0]}-{i}" for i, b in
                                                               enumerate(BAD)])  # fmt: skip
def test_bad_loras_get_422_naming_the_field(
    field: str, words: str, over: dict[str, Any], client: TestClient,
    registered: dict[str, Any], redis_client: redis.Redis, config: Config,
) -> None:  # fmt: skip
    r = client.post("/v1/jobs", json={"model": "sd", "prompt": "a cat", **over})
    got = fields(r)
    assert field in got and words in got[field], got
    assert Ledger(redis_client, config.namespace).list() == []


def test_the_cli_lora_flag(client: TestClient, registered: dict[str, Any], config: Config) -> None:
    args = cli.build_parser().parse_args(
        ["submit", "--model", "sd", "--prompt", "x", "--lora", "style:0.5", "--lora", "detail"]
    )
    spec = cli.spec_from_args(args, config)
    assert spec["loras"] == [{"name": "style", "weight": 0.5}, {"name": "detail", "weight": 1.0}]
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 201 and r.json()["spec"]["loras"] == spec["loras"]
    for bad in ("style:strong", "style:", ":1"):
        args = cli.build_parser().parse_args(["submit", "--prompt", "x", "--lora", bad])
        with pytest.raises(SystemExit, match="--lora"):
            cli.spec_from_args(args, config)


def test_a_lora_made_for_another_family_is_refused_at_submit(
    client: TestClient, registered: dict[str, Any], redis_client: redis.Redis,
    config: Config, tmp_path: Path,
) -> None:  # fmt: skip
    rng = np.random.default_rng(3)
    xl_lora = write(  # its cross-attention keys read a 2048-wide context: SDXL's
        tmp_path / "xl-style.safetensors",
        {f"{LORA_KEY}.lora_down.weight": rng.standard_normal((4, 2048)),
         f"{LORA_KEY}.lora_up.weight": rng.standard_normal((640, 4))},
    )  # fmt: skip
    assert register_model(config, redis_client, xl_lora, "xl-style").family == "sdxl"
    assert registered["style"].family == ""  # a 32-wide context says no family: not checked
    models = ModelRegistry(redis_client, config.namespace)
    assert (entry := models.get("xl-style")) is not None and entry.family == "sdxl"  # stored
    models.add(ModelEntry(name="xl", engine="sdxl", sha256="cd" * 32, size=1))
    body = {"prompt": "a cat", "loras": [LORA, {"name": "xl-style"}]}
    got = fields(client.post("/v1/jobs", json={**body, "model": "sd"}))
    assert got == {"loras[1].name": "'xl-style' is a LoRA for sdxl models; model 'sd' is sd1"}
    got = fields(
        client.post("/v1/jobs", json={**body, "model": "xl", "sweep": {"model": ["xl", "sd"]}})
    )
    assert "model 'sd' is sd1" in got["loras[1].name"]  # every model of a sweep
    assert Ledger(redis_client, config.namespace).list() == []
    assert client.post("/v1/jobs", json={**body, "model": "xl"}).status_code == 201
    # an entry a newer version wrote with a field this one does not know still reads
    raw = json.loads(redis_client.hget(models.key, "xl") or b"{}")
    redis_client.hset(models.key, "xl", json.dumps({**raw, "added_in": "a later version"}))
    assert models.get("xl") == ModelEntry.from_dict(raw)


# ------------------------------------------------------------ the A1111-compatible API

MODEL = {"override_settings": {"sd_model_checkpoint": "sd"}}


@pytest.fixture
def sdapi(
    config: Config, redis_client: redis.Redis, store: LocalStore, registered: dict[str, Any]
) -> TestClient:
    """A client whose txt2img waits 0.3 s, on a farm with a worker 'running'."""
    WorkerRegistry(redis_client, config.namespace).publish("w1", {"device": "cpu"}, ttl=60)
    app = create_app(replace(config, sdapi_timeout=0.3), redis_client=redis_client, store=store)
    return TestClient(app)


def submitted(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    """The spec of the job a txt2img request submitted (it ends at its timeout)."""
    r = client.post("/sdapi/v1/txt2img", json={**MODEL, **body})
    assert r.status_code == 504, r.text
    return client.get(f"/v1/jobs/{r.headers['x-farm-job']}").json()["spec"]


def test_lora_tags_become_the_jobs_loras_and_leave_the_prompt(sdapi: TestClient) -> None:
    spec = submitted(sdapi, {"prompt": "a cat, <lora:style:0.7> at night <LORA:detail>"})
    assert spec["prompt"] == "a cat,  at night "  # A1111 takes the tags out, nothing more
    assert spec["loras"] == [{"name": "style", "weight": 0.7}, {"name": "detail", "weight": 1.0}]
    # the text encoder's and the UNet's weights, when they are the same
    for tag in ("<lora:style:0.5:0.5>", "<lora:style:te=0.5:unet=0.5>", "<lora:style:unet=.5:.5>"):
        assert submitted(sdapi, {"prompt": f"x {tag}"})["loras"] == [
            {"name": "style", "weight": 0.5}
        ]
    # disable_extra_networks: A1111 takes the tags out and applies none
    off = submitted(sdapi, {"prompt": "x <lora:style:1>", "disable_extra_networks": True})
    assert (off["prompt"], off["loras"]) == ("x ", [])


# (field named in the 422, words of its message, body overrides)
SD_BAD: list[tuple[str, str, dict[str, Any]]] = [
    ("prompt", "unknown LoRA 'nope'", {"prompt": "a cat <lora:nope:1>"}),
    ("prompt", "'sd' is a checkpoint", {"prompt": "a cat <lora:sd:1>"}),
    ("prompt", "LoRA 'style': weight must be between -5 and 5", {"prompt": "<lora:style:9>"}),
    ("prompt", "the weight must be a number", {"prompt": "<lora:style:lots>"}),
    ("prompt", "one weight for both", {"prompt": "<lora:style:te=0.5:unet=1>"}),
    ("prompt", "only a name and a weight", {"prompt": "<lora:style:1:1:8>"}),
    ("prompt", "named twice", {"prompt": "<lora:style:1> <lora:style:0.5>"}),
    ("prompt", "model 'synthetic' (synthetic) takes no LoRA",
     {"prompt": "<lora:style:1>", "override_settings": {"sd_model_checkpoint": "synthetic"}}),
    ("negative_prompt", "LoRA tags go in the prompt", {"negative_prompt": "<lora:style:1>"}),
    ("override_settings.sd_model_checkpoint", "'style' is a LoRA, not a checkpoint",
     {"override_settings": {"sd_model_checkpoint": "style"}}),
]  # fmt: skip


@pytest.mark.parametrize(("field", "words", "over"), SD_BAD, ids=[f"{b[0]}-{i}" for i, b in
                                                                  enumerate(SD_BAD)])  # fmt: skip
def test_bad_lora_tags_get_422_naming_the_field(
    field: str, words: str, over: dict[str, Any], sdapi: TestClient,
    redis_client: redis.Redis, config: Config,
) -> None:  # fmt: skip
    body = {**MODEL, "prompt": "a cat", **over}
    got = fields(sdapi.post("/sdapi/v1/txt2img", content=json.dumps(body),
                            headers={"content-type": "application/json"}))  # fmt: skip
    assert field in got and words in got[field], got
    assert Ledger(redis_client, config.namespace).list() == []


def test_sd_models_lists_checkpoints_and_loras_lists_loras(
    sdapi: TestClient, registered: dict[str, Any]
) -> None:
    names = {m["model_name"] for m in sdapi.get("/sdapi/v1/sd-models").json()}
    assert names == {"synthetic", "sd"}
    loras = sdapi.get("/sdapi/v1/loras").json()
    assert [(x["name"], x["path"]) for x in loras] == [
        ("detail", registered["detail"].key),
        ("style", registered["style"].key),
    ]

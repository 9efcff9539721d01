"""What a job may ask of a model's family, checked at submit against a real Redis server: a
Flux model is registered only as the all-in-one file its engine reads, samples with Euler
on its own schedule at sizes in multiples of 16 and takes no LoRA, each refusal a 422
naming the field, on the farm's API and on the A1111-compatible one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from safetensors.numpy import save_file

from farm.api.app import create_app
from farm.config import Config
from farm.jobs import Ledger
from farm.models import FLUX_PARTS, ModelEntry, ModelRegistry
from farm.stack import register_model
from farm.workers_registry import WorkerRegistry
from storage import LocalStore


def flux_file(path: Path, without: str = "") -> Path:
    """A file with one tensor under each prefix of the all-in-one layout (none loads)."""
    tensors = {
        f"{p}x.weight": np.ones(2, np.float32) for k, p in FLUX_PARTS.items() if k != without
    }
    save_file(tensors, str(path))
    return path


@pytest.fixture
def flux(config: Config, redis_client: redis.Redis, tmp_path: Path) -> ModelEntry:
    ModelRegistry(redis_client, config.namespace).add(
        ModelEntry(name="sd", engine="sd1", sha256="ab" * 32, size=1)
    )
    return register_model(config, redis_client, flux_file(tmp_path / "f.safetensors"), "flux")


def test_a_flux_file_registers_only_with_its_encoders_and_vae(
    config: Config, redis_client: redis.Redis, tmp_path: Path, flux: ModelEntry
) -> None:
    assert flux.engine == "flux"
    for part in FLUX_PARTS:
        path = flux_file(tmp_path / "part.safetensors", without=part)
        # without its transformer a file is no Flux model at all
        says = "no known diffusion model" if part == "the transformer" else f"it lacks {part} "
        with pytest.raises(ValueError, match=says):
            register_model(config, redis_client, path, "partial")
    assert ModelRegistry(redis_client, config.namespace).get("partial") is None


OK = {"model": "flux", "prompt": "a fox", "sampler_name": "Euler", "width": 64, "height": 80}
# (field named in the 422, words of its message, body overrides)
BAD: list[tuple[str, str, dict[str, Any]]] = [
    ("sampler_name", "'Euler a' does not render a Flux model; allowed for Flux: Euler",
     {"sampler_name": "Euler a"}),
    ("scheduler", "allowed for Flux: Automatic, Uniform", {"scheduler": "Karras"}),
    ("width", "72 is not a multiple of 16", {"width": 72}),
    ("height", "88 is not a multiple of 16", {"height": 88}),
    ("sweep.sampler_name[1]", "'DPM++ 2M' does not render a Flux model",
     {"sweep": {"sampler_name": ["Euler", "DPM++ 2M"]}}),
    # a sweep over an SD1 and a Flux model: every cell must render
    ("sampler_name", "does not render a Flux model",
     {"model": "sd", "sampler_name": "Euler a", "sweep": {"model": ["sd", "flux"]}}),
    ("loras", "model 'flux' (flux) takes no LoRA", {"loras": [{"name": "sd"}]}),
]  # fmt: skip


@pytest.mark.parametrize(("field", "words", "over"), BAD, ids=[b[0] for b in BAD])
def test_settings_a_flux_model_cannot_render_get_422_naming_the_field(
    field: str, words: str, over: dict[str, Any], client: TestClient, flux: ModelEntry,
    redis_client: redis.Redis, config: Config,
) -> None:  # fmt: skip
    r = client.post("/v1/jobs", json={**OK, **over})
    assert r.status_code == 422, r.text
    got = {d["field"]: d["msg"] for d in r.json()["detail"]}
    assert field in got and words in got[field], got
    assert Ledger(redis_client, config.namespace).list() == []


def test_what_fits_is_accepted_and_an_sd1_job_keeps_its_samplers(
    client: TestClient, flux: ModelEntry
) -> None:
    assert client.post("/v1/jobs", json=OK).status_code == 201
    sweep = {**OK, "sweep": {"scheduler": ["Automatic", "Uniform"], "width": [64, 128]}}
    assert client.post("/v1/jobs", json=sweep).status_code == 201
    sd = {"model": "sd", "prompt": "a fox", "sampler_name": "DPM++ 2M", "width": 72}
    assert client.post("/v1/jobs", json=sd).status_code == 201


def test_the_a1111_api_refuses_them_too(
    config: Config, redis_client: redis.Redis, store: LocalStore, flux: ModelEntry
) -> None:
    WorkerRegistry(redis_client, config.namespace).publish("w1", {"device": "cpu"}, ttl=60)
    app = create_app(replace(config, sdapi_timeout=0.3), redis_client=redis_client, store=store)
    body = {"prompt": "a fox", "override_settings": {"sd_model_checkpoint": "flux"}}
    r = TestClient(app).post("/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler a"})
    assert r.status_code == 422, r.text
    got = {d["field"]: d["msg"] for d in r.json()["detail"]}
    assert "does not render a Flux model" in got["sampler_name"], got
    assert Ledger(redis_client, config.namespace).list() == []
    r = TestClient(app).post(
        "/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler", "width": 64, "height": 64}
    )
    assert r.status_code == 504, r.text  # accepted; no worker renders it in 0.3 s


def test_a_flux_job_that_leaves_sampler_and_guidance_out_gets_fluxs(
    client: TestClient, flux: ModelEntry
) -> None:
    """The spec's defaults (Euler a, cfg 7) are SD's: a Flux job without them samples with
    Euler at the distilled guidance 3.5; one that names them keeps them, or gets the 422."""
    r = client.post("/v1/jobs", json={"model": "flux", "prompt": "a fox", "width": 64})
    assert r.status_code == 201, r.text
    assert (r.json()["spec"]["sampler_name"], r.json()["spec"]["cfg_scale"]) == ("Euler", 3.5)
    r = client.post("/v1/jobs", json={**OK, "cfg_scale": 5})
    assert r.json()["spec"]["cfg_scale"] == 5
    sd = client.post("/v1/jobs", json={"model": "sd", "prompt": "a fox"})
    assert (sd.json()["spec"]["sampler_name"], sd.json()["spec"]["cfg_scale"]) == ("Euler a", 7)
    # a sweep over an SD1 and a Flux model has no one family default: the 422 stays
    r = client.post(
        "/v1/jobs", json={"model": "sd", "prompt": "a", "sweep": {"model": ["sd", "flux"]}}
    )
    assert r.status_code == 422 and "does not render a Flux model" in r.text


@pytest.mark.parametrize(
    ("sent", "guidance"),
    [({}, 3.5), ({"cfg_scale": 6}, 6), ({"cfg_scale": 1, "distilled_cfg_scale": 2.5}, 2.5)],
)
def test_the_a1111_api_takes_forges_distilled_guidance_for_flux(
    sent: dict[str, Any], guidance: float, config: Config, redis_client: redis.Redis,
    store: LocalStore, flux: ModelEntry,
) -> None:  # fmt: skip
    WorkerRegistry(redis_client, config.namespace).publish("w1", {"device": "cpu"}, ttl=60)
    app = create_app(replace(config, sdapi_timeout=0.2), redis_client=redis_client, store=store)
    body = {"prompt": "a fox", "width": 64, "height": 64, **sent}
    body["override_settings"] = {"sd_model_checkpoint": "flux"}
    assert TestClient(app).post("/sdapi/v1/txt2img", json=body).status_code == 504
    (job,) = Ledger(redis_client, config.namespace).list()
    assert job.spec.cfg_scale == guidance


@pytest.mark.parametrize(("channels", "words"), [(8, "Pix2Pix"), (6, "reads 6 channels")])
def test_a_checkpoint_whose_unet_reads_other_inputs_is_refused_at_add(
    channels: int, words: str, config: Config, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Its UNet would fail at the first render with a shape error; refused when added,
    saying what it is. The latents' 4 channels and an inpainting checkpoint's 9 are taken."""
    key = "model.diffusion_model.input_blocks.0.0.weight"
    path = tmp_path / "m.safetensors"
    save_file({key: np.zeros((8, channels, 3, 3), np.float32)}, str(path))
    with pytest.raises(ValueError, match=f"{words}.*4 latent channels, or 9"):
        register_model(config, redis_client, path, "odd")
    assert ModelRegistry(redis_client, config.namespace).get("odd") is None
    for reads, name in ((4, "plain"), (9, "inpainting")):
        save_file({key: np.zeros((8, reads, 3, 3), np.float32)}, str(path))
        assert register_model(config, redis_client, path, name).engine == "sd1"


def test_clip_skip_goes_with_sd1_models_only(
    client: TestClient, flux: ModelEntry, config: Config, redis_client: redis.Redis,
    store: LocalStore,
) -> None:  # fmt: skip
    ModelRegistry(redis_client, config.namespace).add(
        ModelEntry(name="xl", engine="sdxl", sha256="cd" * 32, size=1)
    )
    r = client.post("/v1/jobs", json={"model": "sd", "prompt": "a", "clip_skip": 2})
    assert r.status_code == 201 and r.json()["spec"]["clip_skip"] == 2
    swept = {"model": "sd", "prompt": "a", "sweep": {"clip_skip": [1, 2]}}
    assert client.post("/v1/jobs", json=swept).status_code == 201
    for body, field in (
        ({"model": "xl", "clip_skip": 2}, "clip_skip"),
        ({"model": "flux", "width": 64, "clip_skip": 2}, "clip_skip"),
        ({"model": "xl", "sweep": {"clip_skip": [1, 2]}}, "sweep.clip_skip[1]"),
    ):
        r = client.post("/v1/jobs", json={"prompt": "a", **body})
        assert r.status_code == 422, r.text
        got = {d["field"]: d["msg"] for d in r.json()["detail"]}
        assert "is for SD1 models" in got[field], got
    # the A1111 API: a request's CLIP_stop_at_last_layers is its job's clip_skip
    WorkerRegistry(redis_client, config.namespace).publish("w1", {"device": "cpu"}, ttl=60)
    app = TestClient(
        create_app(replace(config, sdapi_timeout=0.2), redis_client=redis_client, store=store)
    )
    body = {"prompt": "a fox", "override_settings": {"sd_model_checkpoint": "sd"}}
    body["override_settings"]["CLIP_stop_at_last_layers"] = 2.0
    r = app.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 504, r.text
    jobs = Ledger(redis_client, config.namespace).list()
    assert [j.spec.clip_skip for j in jobs if "a fox" in j.spec.prompts] == [2]
    body["override_settings"]["CLIP_stop_at_last_layers"] = 0  # not read as "not given"
    r = app.post("/sdapi/v1/txt2img", json=body)
    got = {d["field"]: d["msg"] for d in r.json()["detail"]}
    assert "must be between 1" in got["override_settings.CLIP_stop_at_last_layers"], got
    body["override_settings"]["CLIP_stop_at_last_layers"] = 2
    body["override_settings"]["sd_model_checkpoint"] = "xl"
    r = app.post("/sdapi/v1/txt2img", json=body)
    got = {d["field"]: d["msg"] for d in r.json()["detail"]}
    assert "is for SD1 models" in got["override_settings.CLIP_stop_at_last_layers"], got

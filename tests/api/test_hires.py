"""The hires fix at the edges, on a real Redis server, no workers: a job's ``hires`` (422
naming ``hires.scale`` etc. for values out of range, a final size over the limits, a swept
size that would be, an init_image, a model that has no hires fix such as Flux), and
``POST /sdapi/v1/txt2img``'s ``enable_hr`` mapped onto such a job, or refused naming the
A1111 field. Nothing renders: an accepted txt2img ends at its (tiny) timeout, and the job
it submitted tells how the fields were mapped."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from farm.config import Config
from farm.jobs import Ledger
from farm.models import ModelEntry, ModelRegistry
from farm.spec import JobSpec, Plan
from farm.workers_registry import WorkerRegistry
from storage import LocalStore
from tests.api.conftest import fields

SD = {"override_settings": {"sd_model_checkpoint": "sd"}}


@pytest.fixture
def models(config: Config, redis_client: redis.Redis) -> None:
    """Registered SD1, SDXL and Flux checkpoints (no files: nothing renders)."""
    registry = ModelRegistry(redis_client, config.namespace)
    for name in ("sd1", "sdxl", "flux"):
        registry.add(ModelEntry(name=name if name != "sd1" else "sd", engine=name,
                                sha256=name[0] * 64, size=1))  # fmt: skip


@pytest.fixture
def sdapi(config: Config, redis_client: redis.Redis, store: LocalStore, models: None) -> TestClient:
    """A client whose txt2img waits 0.3 s, on a farm with a worker 'running'."""
    from farm.api.app import create_app

    WorkerRegistry(redis_client, config.namespace).publish("w1", {"device": "cpu"}, ttl=60)
    cfg = replace(config, sdapi_timeout=0.3)
    return TestClient(create_app(cfg, redis_client=redis_client, store=store))


def jobs(redis_client: redis.Redis, config: Config) -> list[Any]:
    return Ledger(redis_client, config.namespace).list()


# ---------------------------------------------------------------- the job spec


def test_a_hires_job_is_accepted_with_its_defaults(client: TestClient, models: None) -> None:
    r = client.post("/v1/jobs", json={"model": "sd", "prompt": "a fox", "hires": {}})
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert spec["hires"] == {
        "scale": 2.0, "resize_x": 0, "resize_y": 0, "upscaler": "Latent", "steps": 0,
        "denoising_strength": 0.7,
    }  # fmt: skip
    # what the worker reads back from the ledger
    job_id = r.json()["id"]
    got = client.get(f"/v1/jobs/{job_id}").json()["spec"]
    image = Plan(JobSpec.model_construct(**got)).image(0)
    assert image.hires is not None and image.hires.scale == 2.0
    assert (image.width, image.height) == (512, 512)  # the first pass's
    sdxl = {
        "model": "sdxl",
        "prompt": "a fox",
        "width": 512,
        "height": 256,
        "hires": {"resize_x": 1024},
    }
    assert client.post("/v1/jobs", json=sdxl).status_code == 201


# (field named in the 422, spec overrides)
BAD: list[tuple[str, dict[str, Any]]] = [
    ("hires.scale", {"hires": {"scale": 0.9}}),
    ("hires.scale", {"hires": {"scale": 4.5}}),
    ("hires.scale", {"hires": {"scale": "big"}}),
    ("hires.resize_x", {"hires": {"resize_x": 100}}),
    ("hires.resize_y", {"hires": {"resize_y": 4096}}),
    ("hires.upscaler", {"hires": {"upscaler": "ESRGAN_4x"}}),
    ("hires.steps", {"hires": {"steps": -1}}),
    ("hires.steps", {"hires": {"steps": 1000}}),
    ("hires.denoising_strength", {"hires": {"denoising_strength": 0}}),
    ("hires.denoising_strength", {"hires": {"denoising_strength": 1.5}}),
    ("hires.x", {"hires": {"x": 1}}),
    ("hires", {"hires": {"scale": 2.5}}),  # 1280x1280: over the limits (1024)
    ("hires", {"hires": {"resize_x": 1024}, "height": 768}),  # 1024x1536
    ("hires", {"model": "flux", "sampler_name": "Euler", "hires": {}}),  # no hires fix
    ("hires", {"model": "synthetic", "hires": {}}),
    ("hires", {"init_image": "ab" * 32, "hires": {}}),  # txt2img only
    ("body", {"hires": {"scale": 1.5}, "sweep": {"width": [512, 768]}}),  # a swept size
]


@pytest.mark.parametrize(("field", "over"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_hires_settings_are_422_naming_the_field(
    field: str, over: dict[str, Any], client: TestClient, models: None,
    redis_client: redis.Redis, config: Config,
) -> None:  # fmt: skip
    r = client.post("/v1/jobs", json={"model": "sd", "prompt": "a fox", **over})
    assert field in fields(r), r.text
    msg = " ".join(d["msg"] for d in r.json()["detail"])
    if field == "hires" and "scale" in over.get("hires", {}):
        assert "hires.scale" in msg and "1024x1024" in msg, msg
    if field == "body":
        assert "hires" in msg and "swept" in msg, msg
    assert jobs(redis_client, config) == []


# ---------------------------------------------------------------- /sdapi/v1/txt2img


def submitted(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a fox", **SD, **body})
    assert r.status_code == 504, r.text  # nothing renders: the wait ends at its timeout
    return client.get(f"/v1/jobs/{r.headers['x-farm-job']}").json()["spec"]


def test_enable_hr_maps_the_a1111_fields_to_the_job(sdapi: TestClient) -> None:
    spec = submitted(sdapi, {
        "enable_hr": True, "width": 256, "height": 384, "steps": 12, "hr_scale": 1.5,
        "hr_upscaler": "Lanczos", "hr_second_pass_steps": 6, "denoising_strength": 0.4,
        "hr_prompt": "", "hr_negative_prompt": "", "hr_sampler_name": "Use same sampler",
        "hr_scheduler": None, "hr_checkpoint_name": "", "hr_additional_modules": [],
        "sampler_name": "DPM++ 2M",
    })  # fmt: skip
    assert (spec["width"], spec["height"], spec["steps"]) == (256, 384, 12)
    assert spec["hires"] == {
        "scale": 1.5, "resize_x": 0, "resize_y": 0, "upscaler": "Lanczos", "steps": 6,
        "denoising_strength": 0.4,
    }  # fmt: skip
    assert spec["denoising_strength"] == 0.75  # img2img's, untouched
    # A1111's API defaults: Latent, the same steps, 0.75 (its txt2img class's default)
    spec = submitted(sdapi, {"enable_hr": True, "hr_resize_x": 1024, "hr_resize_y": 768,
                             "hr_prompt": "a fox", "hr_sampler_name": "Euler"})  # fmt: skip
    assert spec["hires"] == {
        "scale": 2.0, "resize_x": 1024, "resize_y": 768, "upscaler": "Latent", "steps": 0,
        "denoising_strength": 0.75,
    }  # fmt: skip
    # without enable_hr the hires fields change nothing, as in A1111
    spec = submitted(sdapi, {"enable_hr": False, "hr_scale": 3, "hr_upscaler": "ESRGAN_4x"})
    assert spec["hires"] is None


REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("hr_upscaler", {"hr_upscaler": "R-ESRGAN 4x+"}),
    ("hr_scale", {"hr_scale": 0.5}),
    ("hr_scale", {"hr_scale": 3}),  # 1536x1536, over the limits
    ("hr_resize_x", {"hr_resize_x": 100}),
    ("hr_resize_x", {"hr_resize_x": 1024, "height": 768}),  # 1024x1536
    ("hr_second_pass_steps", {"hr_second_pass_steps": -2}),
    ("denoising_strength", {"denoising_strength": 0}),
    ("hr_prompt", {"hr_prompt": "a wolf"}),
    ("hr_negative_prompt", {"hr_negative_prompt": "blurry"}),
    ("hr_sampler_name", {"hr_sampler_name": "DPM++ 2M"}),
    ("hr_scheduler", {"hr_scheduler": "Karras"}),
    ("hr_checkpoint_name", {"hr_checkpoint_name": "sdxl"}),
    ("hr_additional_modules", {"hr_additional_modules": ["ae.safetensors"]}),
    ("enable_hr", {"override_settings": {"sd_model_checkpoint": "flux"}, "sampler_name": "Euler"}),
    ("firstphase_width", {"firstphase_width": 256}),
]


@pytest.mark.parametrize(("field", "over"), REFUSED, ids=[f for f, _ in REFUSED])
def test_hires_fields_the_farm_cannot_render_are_refused_naming_them(
    field: str, over: dict[str, Any], sdapi: TestClient, redis_client: redis.Redis,
    config: Config,
) -> None:  # fmt: skip
    body = {"prompt": "a fox", **SD, "enable_hr": True, **over}
    r = sdapi.post("/sdapi/v1/txt2img", json=body)
    assert field in fields(r), r.text
    assert "hires." not in r.text  # A1111's names, not the job spec's
    assert jobs(redis_client, config) == []


def test_farm_submit_hires_flags_make_the_jobs_hires() -> None:
    from farm.cli import build_parser, spec_from_args

    config = Config.from_env()
    flags = ["--hires-scale", "1.5", "--hires-steps", "5", "--hires-denoise", "0.4"]
    args = build_parser().parse_args(
        ["submit", "--prompt", "x", *flags, "--hires-upscaler", "None"]
    )
    hires = JobSpec(**spec_from_args(args, config)).hires
    assert hires is not None
    assert (hires.scale, hires.steps, hires.denoising_strength, hires.upscaler) == (
        1.5, 5, 0.4, "None"
    )  # fmt: skip
    args = build_parser().parse_args(["submit", "--prompt", "x", "--hires-steps", "5"])
    assert spec_from_args(args, config)["hires"] == {"steps": 5}  # scale 2, the default
    assert "hires" not in spec_from_args(
        build_parser().parse_args(["submit", "--prompt", "x"]), config
    )

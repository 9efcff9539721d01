"""The A1111-compatible API (``/sdapi/v1``) against a real Redis server, no workers: how a
txt2img request becomes a job, what is refused (422 naming the field), the wait's ends
(504 and cancel on timeout, cancel when the client goes away, a failed or cancelled job)
and the lists (sd-models, samplers, schedulers, options, progress).

A worker "is running" here when its inventory entry is in Redis: txt2img refuses to wait
on a farm with no worker at all. Nothing renders, so a request that is accepted ends at
its (tiny) timeout, and the job it submitted tells how the fields were mapped.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from farm.api.app import create_app
from farm.config import Config
from farm.jobs import Ledger
from farm.models import ModelEntry, ModelRegistry
from farm.spec import MAX_SEED, JobSpec, Plan
from farm.workers_registry import WorkerRegistry
from storage import LocalStore
from storage.keys import image_key
from storage.png import encode_png
from tests.api.conftest import LIMITS, fields
from workers.engine.names import SAMPLERS, SCHEDULES

SHA = "0123456789abcdef" * 4
TINY_S = 0.3  # the txt2img wait of most tests here
SYNTH = {"override_settings": {"sd_model_checkpoint": "synthetic"}}
MODEL = "override_settings.sd_model_checkpoint"
ENSD = "eta_noise_seed_delta"

MakeClient = Callable[..., TestClient]


@pytest.fixture
def make_client(
    config: Config, redis_client: redis.Redis, store: LocalStore
) -> Iterator[MakeClient]:
    """A client of an app whose txt2img waits ``timeout`` s (other settings as given)."""

    def make(timeout: float = TINY_S, **settings: Any) -> TestClient:
        cfg = replace(config, sdapi_timeout=timeout, **settings)
        return TestClient(create_app(cfg, redis_client=redis_client, store=store))

    yield make


@pytest.fixture
def worker(redis_client: redis.Redis, config: Config) -> str:
    """A worker inventory entry, so the farm has a worker 'running'."""
    WorkerRegistry(redis_client, config.namespace).publish("w1", {"device": "cpu"}, ttl=60)
    return "w1"


def ledger(client: redis.Redis, config: Config) -> Ledger:
    return Ledger(client, config.namespace)


def timed_out_job(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    """POST a txt2img that nothing renders: the job it submitted, as /v1/jobs shows it."""
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 504, r.text
    job_id = r.headers["x-farm-job"]
    assert job_id in r.json()["detail"]
    return client.get(f"/v1/jobs/{job_id}").json()


def test_a1111_fields_map_to_one_job(make_client: MakeClient, worker: str) -> None:
    body = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "seed": 1234,
        "steps": 12,
        "cfg_scale": 5.5,
        "width": 256,
        "height": 128,
        "sampler_name": "DPM++ 2M Karras",  # A1111 before 1.9: the schedule in the name
        "batch_size": 3,
        "n_iter": 2,
        **SYNTH,
    }
    job = timed_out_job(make_client(), body)
    spec = job["spec"]
    assert (spec["prompt"], spec["negative_prompt"]) == ("a red fox", "blurry")
    assert (spec["seed"], spec["steps"], spec["cfg_scale"]) == (1234, 12, 5.5)
    assert (spec["width"], spec["height"]) == (256, 128)
    assert (spec["sampler_name"], spec["scheduler"]) == ("DPM++ 2M", "Karras")
    assert (spec["model"], spec["tags"]) == ("synthetic", ["sdapi"])
    # batch_size x n_iter images, one task per A1111 batch
    assert (job["total"], job["batch_size"], job["tasks"]) == (6, 3, 2)
    # the farm's image seeds are A1111's all_seeds: seed, seed+1, ...
    plan = Plan(JobSpec(**spec), job["batch_size"])
    assert [plan.image(i).seed for i in range(6)] == list(range(1234, 1240))
    assert [plan.task(t).images for t in range(2)] == [range(0, 3), range(3, 6)]

    split = {**body, "sampler_name": "Euler", "scheduler": "karras", "n_iter": 1}
    spec = timed_out_job(make_client(), split)["spec"]
    assert (spec["sampler_name"], spec["scheduler"], spec["count"]) == ("Euler", "Karras", 3)
    alias = {**body, "sampler_name": None, "sampler_index": "k_euler_a"}
    assert timed_out_job(make_client(), alias)["spec"]["sampler_name"] == "Euler a"

    # variation seeds: A1111's all_seeds stay the seed, all_subseeds count up
    varied = {**body, "subseed": 99, "subseed_strength": 0.25}
    spec = timed_out_job(make_client(), varied)["spec"]
    assert (spec["subseed"], spec["subseed_strength"]) == (99, 0.25)
    plan = Plan(JobSpec(**spec), job["batch_size"])
    assert [plan.image(i).seed for i in range(6)] == [1234] * 6
    assert [plan.image(i).subseed for i in range(6)] == list(range(99, 105))
    random_sub = timed_out_job(make_client(), {**varied, "subseed": -1})["spec"]
    assert 0 <= random_sub["subseed"] <= MAX_SEED  # picked at submit and recorded

    # seed resize: both sizes above 0 resize, as in A1111; one alone is ignored, as there
    sized = {**body, "seed_resize_from_w": 512, "seed_resize_from_h": 256}
    spec = timed_out_job(make_client(), sized)["spec"]
    assert (spec["seed_resize_from_w"], spec["seed_resize_from_h"]) == (512, 256)
    half = timed_out_job(make_client(), {**sized, "seed_resize_from_h": -1})["spec"]
    assert (half["seed_resize_from_w"], half["seed_resize_from_h"]) == (0, 0)

    # a request's ENSD setting is its job's (31337.0 as settings arrive too)
    ensd = {**body, "override_settings": {**SYNTH["override_settings"], ENSD: 31337.0}}
    assert timed_out_job(make_client(), ensd)["spec"]["eta_noise_seed_delta"] == 31337
    assert spec["eta_noise_seed_delta"] == 0


def test_missing_and_null_fields_take_a1111_defaults(make_client: MakeClient, worker: str) -> None:
    nulls = {
        name: None
        for name in ("prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width",
                     "height", "sampler_name", "scheduler", "batch_size", "n_iter",
                     "styles", "restore_faces", "tiling", "eta", "alwayson_scripts")
    }  # fmt: skip
    for body in (SYNTH, {**nulls, **SYNTH}):
        job = timed_out_job(make_client(), body)
        spec = job["spec"]
        assert (spec["prompt"], spec["negative_prompt"]) == ("", "")
        assert (spec["steps"], spec["cfg_scale"], spec["width"], spec["height"]) == (
            50, 7.0, 512, 512
        )  # fmt: skip
        assert (spec["sampler_name"], spec["scheduler"]) == ("Euler", "Automatic")
        assert job["total"] == 1 and 0 <= spec["seed"] <= MAX_SEED


def test_fields_that_change_nothing_are_accepted(make_client: MakeClient, worker: str) -> None:
    body = {
        "prompt": "a cat",
        "sampler_name": "Euler a",
        "eta": 1.0,
        "s_noise": 1.0,
        "s_churn": 0,
        "s_min_uncond": 0,
        "subseed": 77,
        "subseed_strength": 0,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": 0,
        "restore_faces": False,
        "tiling": False,
        "enable_hr": False,  # so the hires fields are not used, as in A1111
        "hr_scale": 2,
        "hr_upscaler": "Latent",
        "hr_second_pass_steps": 10,
        "hr_prompt": "x",
        "denoising_strength": 0.7,
        "send_images": False,
        "save_images": True,
        "do_not_save_grid": True,
        "do_not_save_samples": True,
        "styles": [],
        "script_args": [],
        "alwayson_scripts": {},
        "refiner_checkpoint": "None",
        "comments": {"note": 1},
        "force_task_id": "task(abc)",
        "disable_extra_networks": True,
        "override_settings_restore_afterwards": False,
        "override_settings": {
            "sd_model_checkpoint": "synthetic",
            "CLIP_stop_at_last_layers": 1.0,
            "sd_vae": "Automatic",
            "samples_format": "PNG",
            "eta_noise_seed_delta": None,
            "inpainting_mask_weight": 1,
        },
    }
    job = timed_out_job(make_client(), body)
    assert (job["spec"]["prompt"], job["spec"]["sampler_name"]) == ("a cat", "Euler a")


# (field named in the 422, body overrides): each asks for something the farm cannot render
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("enable_hr", {"enable_hr": True}),  # the synthetic model has no hires fix
    ("firstphase_width", {"firstphase_width": 256}),
    ("restore_faces", {"restore_faces": True}),
    ("tiling", {"tiling": True}),
    ("styles", {"styles": ["cinematic"]}),
    ("script_name", {"script_name": "x/y/z plot"}),
    ("alwayson_scripts.ControlNet", {"alwayson_scripts": {"ControlNet": {"args": []}}}),
    ("refiner_checkpoint", {"refiner_checkpoint": "sdxl-refiner"}),
    ("firstpass_image", {"firstpass_image": "iVBORw0KGgo="}),
    ("infotext", {"infotext": "a cat\nSteps: 20, Seed: 1"}),
    ("prompt", {"prompt": "a cat <lyco:detail:0.8>"}),  # LoRAs: tests/api/test_lora_spec.py
    ("negative_prompt", {"negative_prompt": "<hypernet:x:1>"}),
    ("eta", {"sampler_name": "Euler a", "eta": 0}),
    ("s_noise", {"sampler_name": "Euler a", "s_noise": 0.5}),
    ("s_churn", {"sampler_name": "Euler", "s_churn": 0.2}),
    ("s_min_uncond", {"s_min_uncond": 1.5}),
    ("override_settings.CLIP_stop_at_last_layers",
     {"override_settings": {"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "synthetic"}}),
    ("override_settings.sd_vae", {"override_settings": {"sd_vae": "vae-ft-mse.safetensors"}}),
    ("override_settings.eta_ancestral", {"override_settings": {"eta_ancestral": 0.5}}),
    ("override_settings.inpainting_mask_weight",
     {"override_settings": {"inpainting_mask_weight": 0.5}}),
    ("hr_cfg", {"hr_cfg": 1.0}),  # not an A1111 field (Forge's): unknown, so refused
]  # fmt: skip


@pytest.mark.parametrize(("field", "over"), REFUSED, ids=[f for f, _ in REFUSED])
def test_what_the_farm_cannot_render_is_refused_naming_the_field(
    field: str, over: dict[str, Any], make_client: MakeClient, worker: str,
    redis_client: redis.Redis, config: Config,
) -> None:  # fmt: skip
    r = make_client().post("/sdapi/v1/txt2img", json={"prompt": "a cat", **SYNTH, **over})
    assert field in fields(r)
    assert ledger(redis_client, config).list() == []  # nothing was submitted


NAN = float("nan")
# (field named in the 422, body overrides)
BAD: list[tuple[str, dict[str, Any]]] = [
    ("width", {"width": 100}),
    ("height", {"height": LIMITS["max_height"] + 8}),
    ("steps", {"steps": 0}),
    ("steps", {"steps": "many"}),
    ("seed", {"seed": -2}),
    ("seed", {"seed": MAX_SEED + 1}),
    ("subseed", {"subseed": -2, "subseed_strength": 0.3}),
    ("subseed", {"subseed": MAX_SEED + 1}),
    ("subseed_strength", {"subseed_strength": 1.5}),
    ("subseed_strength", {"subseed_strength": "some"}),
    ("subseed_strength", {"subseed_strength": -0.1}),
    ("seed_resize_from_w", {"seed_resize_from_w": 100, "seed_resize_from_h": 512}),
    (f"override_settings.{ENSD}", {"override_settings": {**SYNTH["override_settings"], ENSD: -1}}),
    (f"override_settings.{ENSD}", {"override_settings": {**SYNTH["override_settings"], ENSD: 1.5}}),
    ("cfg_scale", {"cfg_scale": "high"}),
    ("cfg_scale", {"cfg_scale": LIMITS["max_cfg_scale"] + 1}),
    ("batch_size", {"batch_size": 0}),
    ("batch_size", {"batch_size": LIMITS["max_batch_size"] + 1}),
    ("n_iter", {"n_iter": 0}),
    ("n_iter", {"batch_size": 4, "n_iter": LIMITS["max_images"]}),
    ("sampler_name", {"sampler_name": "Heun"}),
    ("sampler_name", {"sampler_name": "DPM++ 2M Karras", "scheduler": "Uniform"}),
    ("sampler_index", {"sampler_index": 3}),
    ("scheduler", {"scheduler": "Exponential"}),
    ("prompt", {"prompt": "x" * (LIMITS["max_prompt_chars"] + 1)}),
    ("prompt", {"prompt": ["a", "b"]}),
    ("prompt", {"prompt": "\ud800"}),
    (MODEL, {"override_settings": {"sd_model_checkpoint": "nope"}}),
    (MODEL, {"override_settings": {"sd_model_checkpoint": 5}}),
    (MODEL, {"override_settings": {"sd_model_checkpoint": "synthetic [0123456789]"}}),
    (MODEL, {"override_settings": None}),  # and the default model is not registered
    ("comments.x", {"comments": {"x": NAN}}),
]  # fmt: skip


@pytest.mark.parametrize(("field", "over"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_values_get_422_naming_the_field(
    field: str, over: dict[str, Any], make_client: MakeClient, worker: str,
    redis_client: redis.Redis, config: Config,
) -> None:  # fmt: skip
    body = json.dumps({"prompt": "a cat", **SYNTH, **over})  # NaN as JSON allows it
    r = make_client().post(
        "/sdapi/v1/txt2img", content=body, headers={"content-type": "application/json"}
    )
    assert field in fields(r)
    assert ledger(redis_client, config).list() == []


def test_junk_bodies_get_4xx(make_client: MakeClient) -> None:
    client = make_client()
    for content in (b"[]", b"3", b'"prompt"', b"{", b"\xff"):
        r = client.post(
            "/sdapi/v1/txt2img", content=content, headers={"content-type": "application/json"}
        )
        assert 400 <= r.status_code < 500, (content, r.text)
        assert r.json()["detail"]


def test_the_wait_ends_at_the_timeout_with_504_and_the_job_cancelled(
    make_client: MakeClient, worker: str, redis_client: redis.Redis, config: Config
) -> None:
    client = make_client(timeout=0.5)
    t0 = time.monotonic()
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "slow", "batch_size": 2, **SYNTH})
    took = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert 0.5 <= took < 2.0
    job_id = r.headers["x-farm-job"]
    detail = r.json()["detail"]
    assert f"job {job_id} " in detail and f"/v1/jobs/{job_id}" in detail
    assert "FARM_SDAPI_TIMEOUT" in detail and "cancelled" in detail
    job = ledger(redis_client, config).get(job_id)
    assert (job.state, job.total) == ("cancelled", 2)


def test_without_a_worker_txt2img_answers_503_at_once(
    make_client: MakeClient, redis_client: redis.Redis, config: Config
) -> None:
    t0 = time.monotonic()
    r = make_client(timeout=30).post("/sdapi/v1/txt2img", json={"prompt": "x", **SYNTH})
    assert r.status_code == 503 and "no worker" in r.json()["detail"]
    assert time.monotonic() - t0 < 5
    assert ledger(redis_client, config).list() == []


def _awaited_job(led: Ledger, timeout: float = 5.0) -> str:
    """The id of the job a txt2img in another thread submitted, once it is there."""
    deadline = time.monotonic() + timeout
    while not (jobs := led.list()):
        assert time.monotonic() < deadline, "no job was submitted"
        time.sleep(0.01)
    return jobs[0].id


def test_a_failed_job_answers_502_with_its_last_error(
    make_client: MakeClient, worker: str, redis_client: redis.Redis, config: Config
) -> None:
    led = ledger(redis_client, config)
    client = make_client(timeout=20)

    def fail_like_a_worker() -> None:
        job_id = _awaited_job(led)
        led.record_error(job_id, 0, [0, 1], stage="load", error="EngineError: bad checkpoint",
                         worker="w1", model="synthetic", images_failed=True)  # fmt: skip
        led.mark(job_id, [0, 1], ok=False)

    thread = threading.Thread(target=fail_like_a_worker)
    thread.start()
    t0 = time.monotonic()
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 2, **SYNTH})
    thread.join()
    assert time.monotonic() - t0 < 5  # it ends with the job, not at the timeout
    assert r.status_code == 502, r.text
    job_id = r.headers["x-farm-job"]
    detail = r.json()["detail"]
    assert f"job {job_id} failed: 2 of 2 images failed" in detail
    assert "load on worker w1" in detail and "EngineError: bad checkpoint" in detail
    assert f"/v1/jobs/{job_id}/errors" in detail


def test_progress_follows_the_awaited_job_and_a_cancel_ends_the_wait(
    make_client: MakeClient, worker: str, redis_client: redis.Redis, config: Config
) -> None:
    led = ledger(redis_client, config)
    client = make_client(timeout=20)
    idle = client.get("/sdapi/v1/progress").json()
    assert (idle["progress"], idle["state"]["job_count"]) == (0.0, 0)
    answers: list[Any] = []
    thread = threading.Thread(
        target=lambda: answers.append(
            client.post(
                "/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 4, "steps": 9, **SYNTH}
            )  # fmt: skip
        )
    )
    thread.start()
    job_id = _awaited_job(led)
    led.mark(job_id, [0], ok=True)
    got = client.get("/sdapi/v1/progress").json()
    assert got["progress"] == 0.25
    assert got["state"]["job_count"] == 4 and got["state"]["job_no"] == 1
    assert got["state"]["sampling_steps"] == 9 and job_id in got["state"]["job"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    thread.join(10)
    (r,) = answers
    assert r.status_code == 409 and f"job {job_id} was cancelled" in r.json()["detail"]
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0.0


def test_interrupt_answers_the_images_finished_so_far(
    make_client: MakeClient, worker: str, redis_client: redis.Redis, config: Config,
    store: LocalStore,
) -> None:  # fmt: skip
    led = ledger(redis_client, config)
    client = make_client(timeout=20)
    assert client.post("/sdapi/v1/interrupt").json() == {}  # nothing to stop
    answers: list[Any] = []
    body = {"prompt": "x", "seed": 500, "batch_size": 2, "n_iter": 3, **SYNTH}
    thread = threading.Thread(
        target=lambda: answers.append(client.post("/sdapi/v1/txt2img", json=body))
    )
    thread.start()
    job_id = _awaited_job(led)
    texts = [f"x\nSteps: 50, Seed: {500 + i}, Size: 8x8" for i in (0, 1, 2)]
    for i in (0, 2):  # a worker finished images 0 and 2 (of two tasks) when it came
        png = encode_png(Image.new("RGB", (8, 8), (i, 0, 0)), texts[i])
        store.put_bytes(image_key(config.output_prefix, job_id, i, 500 + i), png, "image/png")
    led.mark(job_id, [0, 2], ok=True)
    r = client.post("/sdapi/v1/interrupt")
    assert (r.status_code, r.json()) == (200, {})
    thread.join(10)
    (got,) = answers
    assert got.status_code == 200, got.text
    info = json.loads(got.json()["info"])
    assert (info["seed"], info["all_seeds"]) == (500, [500, 502])
    assert info["infotexts"] == [texts[0], texts[2]]
    pixels = [
        Image.open(io.BytesIO(base64.b64decode(b))).getpixel((0, 0)) for b in got.json()["images"]
    ]
    assert pixels == [(0, 0, 0), (2, 0, 0)]
    assert led.get(job_id).state == "cancelled"  # no task of it starts any more
    # the next request is not interrupted by the stop of the one before
    r = make_client().post("/sdapi/v1/txt2img", json={"prompt": "y", **SYNTH})
    assert r.status_code == 504, r.text


def test_a_client_that_goes_away_cancels_its_job(
    make_client: MakeClient, worker: str, redis_client: redis.Redis, config: Config
) -> None:
    """Raw ASGI, as a server calls the app: the client disconnects while it waits."""
    app = make_client(timeout=30).app
    body = json.dumps({"prompt": "x", **SYNTH}).encode()
    sent: list[dict[str, Any]] = []

    async def call() -> float:
        gone = asyncio.Event()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/sdapi/v1/txt2img",
            "raw_path": b"/sdapi/v1/txt2img", "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
        }  # fmt: skip
        task = asyncio.create_task(app(scope, receive, send))
        await asyncio.sleep(0.5)
        assert not task.done()  # waiting for the job
        t0 = time.monotonic()
        gone.set()
        await asyncio.wait_for(task, 5)
        return time.monotonic() - t0

    assert asyncio.run(call()) < 1.5
    (job,) = ledger(redis_client, config).list()
    assert job.state == "cancelled"
    assert sent[0]["status"] == 499


def test_sd_models_and_the_forms_of_a_checkpoint_name(
    make_client: MakeClient, worker: str, redis_client: redis.Redis, config: Config
) -> None:
    key = f"models/sha256/{SHA}.safetensors"
    ModelRegistry(redis_client, config.namespace).add(
        ModelEntry(name="sd15", engine="sd1", sha256=SHA, size=10, key=key)
    )
    client = make_client()
    listed = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    assert listed["sd15"] == {
        "title": f"sd15 [{SHA[:10]}]", "model_name": "sd15", "hash": SHA[:10],
        "sha256": SHA, "filename": key, "config": None,
    }  # fmt: skip
    assert listed["synthetic"]["title"] == "synthetic" and listed["synthetic"]["hash"] is None
    for name in (f"sd15 [{SHA[:10]}]", "sd15", "sd15.safetensors", f"sd15.ckpt [{SHA[:8]}]",
                 SHA[:10], SHA):  # fmt: skip
        body = {"prompt": "x", "override_settings": {"sd_model_checkpoint": name}}
        assert timed_out_job(client, body)["spec"]["model"] == "sd15", name
    wrong = {"prompt": "x", "override_settings": {"sd_model_checkpoint": "sd15 [ffffffffff]"}}
    r = client.post("/sdapi/v1/txt2img", json=wrong)
    assert fields(r) == [MODEL]
    assert "a different checkpoint" in r.json()["detail"][0]["msg"]
    # no model asked for: the farm's default model, which options tells
    client = make_client(default_model="sd15")
    assert timed_out_job(client, {"prompt": "x"})["spec"]["model"] == "sd15"
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == f"sd15 [{SHA[:10]}]"
    assert options["sd_checkpoint_hash"] == SHA


def test_options_accept_the_farm_settings_and_refuse_changes(
    make_client: MakeClient, redis_client: redis.Redis, config: Config
) -> None:
    client = make_client(default_model="synthetic")
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "synthetic"
    same = {"sd_model_checkpoint": "synthetic", "CLIP_stop_at_last_layers": 1, "sd_vae": "None"}
    for ok in ({}, same):
        r = client.post("/sdapi/v1/options", json=ok)
        assert r.status_code == 200, r.text
    ModelRegistry(redis_client, config.namespace).add(
        ModelEntry(name="sd15", engine="sd1", sha256=SHA, size=10, key="k")
    )
    for field, change in (
        ("sd_model_checkpoint", {"sd_model_checkpoint": "sd15"}),
        ("sd_model_checkpoint", {"sd_model_checkpoint": "nope"}),
        ("CLIP_stop_at_last_layers", {"CLIP_stop_at_last_layers": 2}),
        (ENSD, {ENSD: 31337}),  # global there: per request in override_settings
        ("show_progressbar", {"show_progressbar": True}),
    ):
        assert fields(client.post("/sdapi/v1/options", json=change)) == [field]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "synthetic"
    assert client.post("/sdapi/v1/options", json=[1]).status_code == 422


def test_samplers_and_schedulers_are_the_engines(make_client: MakeClient) -> None:
    client = make_client()
    samplers = client.get("/sdapi/v1/samplers").json()
    assert [s["name"] for s in samplers] == list(SAMPLERS)
    by_name = {s["name"]: s for s in samplers}
    assert by_name["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    assert "k_euler_a" in by_name["Euler a"]["aliases"]
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert [s["label"] for s in schedulers] == list(SCHEDULES)
    assert [s["name"] for s in schedulers] == [s.lower() for s in SCHEDULES]
    assert {s["name"]: s["default_rho"] for s in schedulers}["karras"] == 7.0

"""img2img end to end on real servers (a Redis-compatible server, S3 over HTTP, a Celery
worker process, the scheduler): a picture uploaded to ``/v1/inputs`` is fetched by the
worker from S3 and every image of the job starts from it; the PNGs carry A1111's
``Denoising strength``; ``/sdapi/v1/img2img`` renders the same images."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from farm.api.app import create_app
from storage.keys import image_key
from storage.png import parse_parameters, read_parameters
from tests.cluster import Cluster

pytestmark = pytest.mark.timeout(300)

SPEC = {
    "model": "tiny",
    "prompt": "a red circle",
    "count": 2,
    "seed": 42,
    "width": 64,
    "height": 64,
    "steps": 3,
    "cfg_scale": 5.0,
    "sampler_name": "Euler",
    "batch_size": 2,
}


@pytest.fixture
def farm(model_farm: Cluster) -> tuple[Cluster, TestClient]:
    """The session's farm of one worker (tests/integration/conftest.py), model ``tiny``,
    and the API."""
    app = create_app(model_farm.config, redis_client=model_farm.r, store=model_farm.store)
    return model_farm, TestClient(app)


def render(cluster: Cluster, client: TestClient, **kw: object) -> list[bytes]:
    r = client.post("/v1/jobs", json={**SPEC, **kw})
    assert r.status_code == 201, r.text
    job = cluster.wait(r.json()["id"], timeout=120)
    assert (job.state, job.done, job.failed) == ("done", 2, 0), job.summary()
    return [
        cluster.store.get_bytes(image_key("renders", job.id, i, job.plan.image(i).seed))
        for i in range(job.total)
    ]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def sdapi_img2img(client: TestClient, **fields: object) -> dict:
    """``POST /sdapi/v1/img2img`` with SPEC's settings (2 images on model ``tiny``) and
    ``fields``: the answer."""
    body = {
        "prompt": SPEC["prompt"],
        "batch_size": 2,
        "override_settings": {"sd_model_checkpoint": "tiny"},
        **{k: SPEC[k] for k in ("seed", "width", "height", "steps", "cfg_scale", "sampler_name")},
        **fields,
    }
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_job_with_an_init_image_starts_every_image_from_it(
    farm: tuple[Cluster, TestClient],
) -> None:
    cluster, client = farm
    picture = Image.new("RGB", (96, 80), (30, 60, 220))  # not the job's size: resized
    ImageDraw.Draw(picture).ellipse((20, 20, 70, 60), fill=(220, 30, 30))
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=95)
    r = client.post("/v1/inputs", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 201, r.text
    sha = r.json()["init_image"]

    started = render(cluster, client, init_image=sha, denoising_strength=0.3)
    plain = render(cluster, client)
    for i, (a, b) in enumerate(zip(started, plain, strict=True)):
        assert Image.open(io.BytesIO(a)).size == (64, 64)
        assert np.abs(pixels(a) - pixels(b)).mean() > 2, i  # same seed, another start
        params = parse_parameters(read_parameters(a) or "")
        assert params["seed"] == 42 + i and params["extra"]["Denoising strength"] == "0.3"
        assert "Denoising strength" not in parse_parameters(read_parameters(b) or "")["extra"]
    assert np.abs(pixels(started[0]) - pixels(started[1])).max() > 1  # the seeds still count

    # the same images asked for the A1111 way
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    answer = sdapi_img2img(client, init_images=[url], denoising_strength=0.3)
    info = json.loads(answer["info"])
    assert info["denoising_strength"] == 0.3 and info["all_seeds"] == [42, 43]
    assert answer["parameters"]["init_images"] is None  # as A1111: include_init_images false
    assert parse_parameters(info["infotexts"][0])["extra"]["Denoising strength"] == "0.3"
    for png, want in zip(answer["images"], started, strict=False):
        assert np.abs(pixels(base64.b64decode(png)) - pixels(want)).max() <= 1


def test_a_hires_txt2img_renders_at_the_larger_size(farm: tuple[Cluster, TestClient]) -> None:
    """``enable_hr`` through ``/sdapi/v1/txt2img`` on the worker: the PNGs at the upscaled
    size, A1111's hires fields in their parameters after the first pass's Size."""
    cluster, client = farm
    body = {
        "prompt": SPEC["prompt"],
        "seed": 42,
        "batch_size": 2,
        "width": 64,
        "height": 64,
        "steps": 2,
        "sampler_name": "Euler",
        "enable_hr": True,
        "hr_second_pass_steps": 2,
        "denoising_strength": 0.5,
        "override_settings": {"sd_model_checkpoint": "tiny"},
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    pngs = [base64.b64decode(png) for png in answer["images"]]
    assert [Image.open(io.BytesIO(png)).size for png in pngs] == [(128, 128)] * 2
    params = parse_parameters(read_parameters(pngs[1]) or "")
    assert (params["width"], params["height"], params["seed"]) == (64, 64, 43)
    assert {k: params["extra"][k] for k in ("Denoising strength", "Hires upscale")} == {
        "Denoising strength": "0.5",
        "Hires upscale": "2",
    }
    assert (params["extra"]["Hires steps"], params["extra"]["Hires upscaler"]) == ("2", "Latent")
    info = json.loads(answer["info"])
    assert info["extra_generation_params"]["Hires upscaler"] == "Latent"
    assert np.abs(pixels(pngs[0]) - pixels(pngs[1])).max() > 1


def test_sdapi_inpainting_repaints_only_the_masked_part(
    farm: tuple[Cluster, TestClient],
) -> None:
    """``/sdapi/v1/img2img`` with a mask on the worker, A1111's API defaults (only the masked
    part, padding 0, "fill"): the worker fetches picture and mask from S3, the PNGs have the
    picture's size, its own pixels away from the mask and A1111's inpainting fields."""
    cluster, client = farm
    picture = Image.new("RGB", (96, 80), (30, 60, 220))
    ImageDraw.Draw(picture).ellipse((20, 20, 70, 60), fill=(220, 30, 30))
    mask = Image.new("L", (96, 80), 0)
    ImageDraw.Draw(mask).rectangle((40, 30, 71, 61), fill=255)

    def encoded(im: Image.Image) -> str:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    answer = sdapi_img2img(client, init_images=[encoded(picture)], mask=encoded(mask),
                           denoising_strength=1.0)  # fmt: skip
    pngs = [base64.b64decode(png) for png in answer["images"]]
    want = np.asarray(picture, dtype=np.int16)
    far = np.ones((80, 96), bool)
    far[20:72, 30:82] = False  # the box and the blur (4) around it
    for png in pngs:
        got = pixels(png)
        assert got.shape == (80, 96, 3)  # the picture's size: the render pasted into it
        assert np.array_equal(got[far], want[far])
        assert np.abs(got[34:58, 44:68] - want[34:58, 44:68]).mean() > 5  # repainted
        extra = parse_parameters(read_parameters(png) or "")["extra"]
        assert (extra["Mask blur"], extra["Inpaint area"], extra["Masked area padding"]) == (
            "4", "Only masked", "0")  # fmt: skip
        assert extra["Masked content"] == "fill"
    assert np.abs(pixels(pngs[0]) - pixels(pngs[1])).max() > 1  # the seeds still count

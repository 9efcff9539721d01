"""End to end: the A1111-compatible txt2img on a real farm (a Redis-compatible server,
S3 over HTTP, a Celery worker subprocess, the scheduler: the session's farm of one worker).
The API runs in-process on the farm's Redis and store; the built-in ``synthetic`` model
renders a solid colour per seed at once, so the PNGs tell by their colour which seed they
were rendered with."""

from __future__ import annotations

import base64
import io
import json
import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from farm.api.app import create_app
from farm.spec import MAX_SEED
from storage.png import parse_parameters, read_parameters
from tests.cluster import Cluster
from workers.engine.synthetic import seed_colour

pytestmark = pytest.mark.timeout(120)

BASE = {
    "prompt": "a red fox, at dusk",
    "negative_prompt": "blurry",
    "width": 64,
    "height": 72,
    "steps": 3,
    "cfg_scale": 6.5,
    "sampler_name": "Euler a",
    "override_settings": {"sd_model_checkpoint": "synthetic"},
}


@pytest.fixture
def farm(model_farm: Cluster) -> tuple[Cluster, TestClient]:
    """The session's farm of one worker (tests/integration/conftest.py), and the API."""
    app = create_app(model_farm.config, redis_client=model_farm.r, store=model_farm.store)
    return model_farm, TestClient(app)


def txt2img(client: TestClient, **fields: Any) -> tuple[list[bytes], dict[str, Any], Any]:
    r = client.post("/sdapi/v1/txt2img", json={**BASE, **fields})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"]["prompt"] == BASE["prompt"]
    return [base64.b64decode(b) for b in body["images"]], json.loads(body["info"]), r


def test_txt2img_answers_the_pngs_of_seeds_seed_to_seed_plus_n(
    farm: tuple[Cluster, TestClient],
) -> None:
    cluster, client = farm
    pngs, info, r = txt2img(client, seed=1000, batch_size=2, n_iter=3)
    assert len(pngs) == 6
    assert info["seed"] == 1000 and info["all_seeds"] == list(range(1000, 1006))
    assert info["all_prompts"] == [BASE["prompt"]] * 6
    assert info["job_id"] == r.headers["x-farm-job"]
    for i, png in enumerate(pngs):
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size == (64, 72)
        assert image.convert("RGB").getpixel((5, 5)) == seed_colour(1000 + i)
        text = read_parameters(png)
        assert text is not None and info["infotexts"][i] == text
        params = parse_parameters(text)
        assert (params["prompt"], params["negative_prompt"]) == (BASE["prompt"], "blurry")
        assert (params["seed"], params["steps"], params["cfg_scale"]) == (1000 + i, 3, 6.5)
        assert (params["sampler_name"], params["model"]) == ("Euler a", "synthetic")
        assert (params["width"], params["height"]) == (64, 72)
    job = cluster.ledger.get(info["job_id"])
    assert (job.state, job.done, job.n_tasks) == ("done", 6, 3)


def test_a_random_seed_is_told_and_send_images_false_answers_none(
    farm: tuple[Cluster, TestClient],
) -> None:
    cluster, client = farm
    pngs, info, _ = txt2img(client, seed=-1, batch_size=3, send_images=False)
    assert pngs == []
    seed = info["seed"]
    assert 0 <= seed <= MAX_SEED and info["all_seeds"] == [seed, seed + 1, seed + 2]
    stored = client.get(f"/v1/jobs/{info['job_id']}/images").json()["images"]
    assert [i["seed"] for i in stored] == info["all_seeds"]
    seeds = [parse_parameters(t)["seed"] for t in info["infotexts"]]
    assert seeds == info["all_seeds"]


def test_variation_seeds_blend_each_image_toward_its_subseed(
    farm: tuple[Cluster, TestClient],
) -> None:
    cluster, client = farm
    pngs, info, _ = txt2img(
        client, seed=42, subseed=900, subseed_strength=0.25, batch_size=3,
        seed_resize_from_w=96, seed_resize_from_h=64,
    )  # fmt: skip
    # A1111's rule: every image keeps the seed, the subseeds count up
    assert (info["seed"], info["all_seeds"]) == (42, [42, 42, 42])
    assert (info["subseed"], info["all_subseeds"]) == (900, [900, 901, 902])
    assert info["subseed_strength"] == 0.25
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (96, 64)
    for i, png in enumerate(pngs):
        colour = Image.open(io.BytesIO(png)).convert("RGB").getpixel((5, 5))
        a, b = seed_colour(42), seed_colour(900 + i)  # the synthetic model blends them
        assert colour == tuple(round(x * 0.75 + y * 0.25) for x, y in zip(a, b, strict=True))
        params = parse_parameters(read_parameters(png) or "")
        assert params["seed"] == 42
        assert params["extra"]["Variation seed"] == str(900 + i)
        assert params["extra"]["Variation seed strength"] == "0.25"
        assert params["extra"]["Seed resize from"] == "96x64"
        assert list(params["extra"])[:3] == [
            "Variation seed", "Variation seed strength", "Seed resize from"
        ]  # fmt: skip
    stored = client.get(f"/v1/jobs/{info['job_id']}/images").json()["images"]
    assert [(i["seed"], i["subseed"]) for i in stored] == [(42, 900), (42, 901), (42, 902)]
    # strength 0: plain seeds, no variation in the PNGs or the listing
    plain, info, _ = txt2img(client, seed=42, subseed=900, batch_size=2)
    assert info["all_seeds"] == [42, 43] and info["subseed_strength"] == 0
    assert "Variation seed" not in parse_parameters(read_parameters(plain[0]) or "")["extra"]
    stored = client.get(f"/v1/jobs/{info['job_id']}/images").json()["images"]
    assert [i["subseed"] for i in stored] == [None, None]


def test_requests_waiting_side_by_side_each_get_their_own_images(
    farm: tuple[Cluster, TestClient],
) -> None:
    _, client = farm
    got: dict[int, list[bytes]] = {}

    def one(seed: int) -> None:
        got[seed] = txt2img(client, seed=seed, batch_size=2)[0]

    threads = [threading.Thread(target=one, args=(s,)) for s in (10, 20, 30, 40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == [10, 20, 30, 40]
    for seed, pngs in got.items():
        colours = [Image.open(io.BytesIO(p)).convert("RGB").getpixel((0, 0)) for p in pngs]
        assert colours == [seed_colour(seed), seed_colour(seed + 1)]

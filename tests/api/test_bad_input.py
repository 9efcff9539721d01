"""Acceptance: every JobSpec field rejects bad values with a 422 naming that field, and
junk requests (malformed JSON, wrong types, huge numbers, NaN, odd unicode) get 4xx."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from farm.spec import JobSpec
from tests.api.conftest import LIMITS

LONG = "x" * (LIMITS["max_prompt_chars"] + 1)
NAN = float("nan")
INF = float("inf")

# (field named in the answer, body overrides). Every JobSpec field appears at least once.
BAD: list[tuple[str, dict[str, Any]]] = [
    ("model", {"model": "bad name!"}),
    ("model", {"model": ""}),
    ("model", {"model": 5}),
    ("model", {"model": "synthetic\n"}),
    ("model", {"model": "a" * 129}),
    ("prompt", {"prompt": []}),
    ("prompt", {"prompt": 5}),
    ("prompt", {"prompt": None}),
    ("prompt", {"prompt": LONG}),
    ("prompt", {"prompt": ["ok", LONG]}),
    ("prompt", {"prompt": ["p"] * (LIMITS["max_prompts"] + 1)}),
    ("prompt[1]", {"prompt": ["ok", 7]}),
    ("prompt", {"prompt": "\ud800"}),
    ("negative_prompt", {"negative_prompt": LONG}),
    ("negative_prompt", {"negative_prompt": ["a"]}),
    ("count", {"count": 0}),
    ("count", {"count": -3}),
    ("count", {"count": "three"}),
    ("count", {"count": 1.5}),
    ("count", {"count": 10**30}),
    ("count", {"count": INF}),
    ("seed", {"seed": -2}),
    ("seed", {"seed": 2**32}),
    ("seed", {"seed": "lucky"}),
    ("seed", {"seed": 10**400}),
    ("width", {"width": 63}),
    ("width", {"width": 500}),
    ("width", {"width": LIMITS["max_width"] + 8}),
    ("width", {"width": "wide"}),
    ("width", {"width": NAN}),
    ("height", {"height": 0}),
    ("height", {"height": 1e300}),
    ("steps", {"steps": 0}),
    ("steps", {"steps": LIMITS["max_steps"] + 1}),
    ("steps", {"steps": [20]}),
    ("clip_skip", {"clip_skip": 0}),
    ("clip_skip", {"clip_skip": 13}),
    ("clip_skip", {"clip_skip": 1.5}),
    ("clip_skip", {"clip_skip": 2}),  # the synthetic model has no text encoder
    ("sweep.clip_skip[1]", {"sweep": {"clip_skip": [1, "two"]}}),
    ("subseed", {"subseed": -2}),
    ("subseed", {"subseed": 2**32}),
    ("subseed", {"subseed": "lucky"}),
    ("subseed_strength", {"subseed_strength": 1.5}),
    ("subseed_strength", {"subseed_strength": float("nan")}),
    ("subseed_strength", {"subseed_strength": "much"}),
    ("sweep.subseed_strength[1]", {"sweep": {"subseed_strength": [0.1, -1]}}),
    ("sweep.subseed[0]", {"sweep": {"subseed": [-1]}}),
    ("seed_resize_from_w", {"seed_resize_from_w": 100, "seed_resize_from_h": 512}),
    ("seed_resize_from_w", {"seed_resize_from_w": "wide", "seed_resize_from_h": 512}),
    ("seed_resize_from_h", {"seed_resize_from_w": 512}),
    ("eta_noise_seed_delta", {"eta_noise_seed_delta": -5}),
    ("eta_noise_seed_delta", {"eta_noise_seed_delta": "leet"}),
    ("seed_resize_from_h", {"seed_resize_from_w": 512, "seed_resize_from_h": 99999}),
    ("cfg_scale", {"cfg_scale": -0.5}),
    ("cfg_scale", {"cfg_scale": LIMITS["max_cfg_scale"] + 1}),
    ("cfg_scale", {"cfg_scale": NAN}),
    ("cfg_scale", {"cfg_scale": INF}),
    ("cfg_scale", {"cfg_scale": "seven"}),
    ("sampler_name", {"sampler_name": "Heun"}),
    ("sampler_name", {"sampler_name": None}),
    ("scheduler", {"scheduler": "exponential"}),
    ("init_image", {"init_image": "not-a-hash"}),
    ("init_image", {"init_image": "cd" * 32}),  # never uploaded
    ("denoising_strength", {"denoising_strength": 0.5}),  # without init_image
    ("inpaint", {"inpaint": {"mask": "cd" * 32}}),  # without init_image
    ("inpaint.mask", {"inpaint": {"mask": "not-a-hash"}}),
    ("inpaint.mask_blur", {"inpaint": {"mask": "cd" * 32, "mask_blur": "soft"}}),
    ("denoising_strength", {"denoising_strength": NAN}),
    ("hires", {"hires": 2}),
    ("hires", {"hires": {}}),  # the synthetic model has no hires fix
    ("hires", {"hires": {"scale": 4}}),  # 2048x2048, over the limits
    ("hires.scale", {"hires": {"scale": 0.5}}),
    ("hires.upscaler", {"hires": {"upscaler": "R-ESRGAN 4x+"}}),
    ("hires.denoising_strength", {"hires": {"denoising_strength": 0}}),
    ("batch_size", {"batch_size": 0}),
    ("batch_size", {"batch_size": LIMITS["max_batch_size"] + 1}),
    ("priority", {"priority": -1}),
    ("priority", {"priority": 101}),
    ("sweep", {"sweep": [1, 2]}),
    ("sweep", {"sweep": "width"}),
    ("sweep.prompt", {"sweep": {"prompt": ["a", "b"]}}),  # bad key
    ("sweep.seed", {"sweep": {"seed": [1]}}),  # bad key
    ("sweep.width[1]", {"sweep": {"width": [512, 3]}}),  # bad value
    ("sweep.cfg_scale[0]", {"sweep": {"cfg_scale": [NAN]}}),
    ("sweep.sampler_name[0]", {"sweep": {"sampler_name": ["nope"]}}),
    ("sweep.model[0]", {"sweep": {"model": ["bad name!"]}}),
    ("sweep.steps", {"sweep": {"steps": []}}),  # empty list
    ("sweep.steps", {"sweep": {"steps": 20}}),  # not a list
    ("sweep.height", {"sweep": {"height": list(range(64, 64 + 8 * 21, 8))}}),  # too many
    ("loras", {"loras": "style"}),
    ("loras[0].name", {"loras": [{"name": "bad name!"}]}),
    ("loras[0].weight", {"loras": [{"name": "style", "weight": NAN}]}),
    ("loras[0].weight", {"loras": [{"name": "style", "weight": INF}]}),
    ("loras", {"loras": [{"name": "style"}]}),  # the synthetic model takes none
    ("embeddings", {"embeddings": "easynegative"}),
    ("embeddings", {"embeddings": ["bad name!"]}),
    ("embeddings", {"embeddings": ["e"] * 33}),
    ("embeddings[0]", {"embeddings": ["easynegative"]}),  # none is registered
    ("output_prefix", {"output_prefix": "../escape"}),
    ("output_prefix", {"output_prefix": "/abs"}),
    ("output_prefix", {"output_prefix": "a//b"}),
    ("output_prefix", {"output_prefix": "a b"}),
    ("output_prefix", {"output_prefix": 5}),
    ("output_prefix", {"output_prefix": "a/./b"}),  # JobSpec lets '.' through; storage not
    ("output_prefix", {"output_prefix": "."}),
    ("output_prefix", {"output_prefix": "renders\n"}),  # JobSpec's regex '$' allows it
    ("tags", {"tags": ["x" * 65]}),
    ("tags", {"tags": ["t"] * 33}),
    ("tags", {"tags": "solo"}),
    ("tags[0]", {"tags": [5]}),
    ("tags", {"tags": ["\udcff"]}),
    ("colour", {"colour": "red"}),  # unknown extra field
    ("body", {"count": 2000, "prompt": ["a", "b", "c"]}),  # 6000 images > max_images
    ("body", {"count": 100, "sweep": {"width": [64, 128, 256], "steps": list(range(1, 20))}}),
]


def post_json(client: TestClient, body: Any) -> Any:
    """POST ``body`` as JSON the way Python writes it: NaN, Infinity and lone surrogates
    (as ``\\ud800`` escapes) included, which httpx's own encoder refuses to send."""
    return client.post(
        "/v1/jobs", content=json.dumps(body), headers={"content-type": "application/json"}
    )


def _fields(r: Any) -> list[str]:
    detail = r.json()["detail"]
    assert isinstance(detail, list), detail
    for item in detail:
        assert set(item) == {"field", "msg"} and item["msg"], item
    return [item["field"] for item in detail]


def test_every_spec_field_is_covered() -> None:
    named = {field.split(".")[0].split("[")[0] for field, _ in BAD}
    assert set(JobSpec.model_fields) <= named


@pytest.mark.parametrize(
    ("field", "override"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)]
)
def test_bad_field_is_422_naming_it(
    client: TestClient, field: str, override: dict[str, Any]
) -> None:
    body = {"model": "synthetic", "prompt": "a cat", **override}
    r = post_json(client, body)
    assert r.status_code == 422, r.text
    assert field in _fields(r), r.text


def test_bad_values_say_the_allowed_range(client: TestClient) -> None:
    r = client.post("/v1/jobs", json={"model": "synthetic", "prompt": "x", "width": 4000})
    assert r.json()["detail"] == [
        {"field": "width", "msg": "must be a multiple of 8 between 64 and 1024"}
    ]
    r = client.post("/v1/jobs", json={"model": "synthetic", "prompt": "x", "count": 6000})
    assert "5000" in r.json()["detail"][0]["msg"]


def test_several_bad_fields_are_all_named(client: TestClient) -> None:
    body = {"model": "synthetic", "prompt": "x", "width": 1, "steps": 0, "priority": 500}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422
    assert set(_fields(r)) == {"width", "steps", "priority"}


def test_missing_required_fields(client: TestClient) -> None:
    r = client.post("/v1/jobs", json={})
    assert r.status_code == 422
    assert set(_fields(r)) == {"model", "prompt"}


JUNK: list[tuple[bytes, str]] = [
    (b"", "application/json"),
    (b"{", "application/json"),
    (b'{"model": "synthetic",}', "application/json"),
    (b"null", "application/json"),
    (b"[]", "application/json"),
    (b'"a string"', "application/json"),
    (b"42", "application/json"),
    (b"1e999", "application/json"),
    (b'{"model":"synthetic","prompt":"x","count":' + b"9" * 5000 + b"}", "application/json"),
    (b'{"model":"synthetic","prompt":"x","cfg_scale":NaN}', "application/json"),
    (b'{"model":"synthetic","prompt":"x","cfg_scale":-Infinity}', "application/json"),
    (b'{"model":"synthetic","prompt":"\\ud800\\udfff\\ud800"}', "application/json"),
    (b'{"model":"synthetic","prompt":"\xff\xfe"}', "application/json"),
    (b'{"model":"synthetic","prompt":"x"}', "text/plain"),
    (b"model=synthetic&prompt=x", "application/x-www-form-urlencoded"),
    (b"\x00\x01\x02", "application/octet-stream"),
    (b'{"model":"synthetic","prompt":"x","sweep":{"\\ud800":[1]}}', "application/json"),
    (b'{"a":' * 3000 + b"1" + b"}" * 3000, "application/json"),  # deep nesting
    (b'{"model":"synthetic","prompt":"x","seed":1e400}', "application/json"),
]


@pytest.mark.parametrize(("body", "content_type"), JUNK, ids=[str(i) for i in range(len(JUNK))])
def test_junk_bodies_are_4xx(client: TestClient, body: bytes, content_type: str) -> None:
    r = client.post("/v1/jobs", content=body, headers={"content-type": content_type})
    assert 400 <= r.status_code < 500, r.text
    assert "detail" in r.json()


def test_valid_body_with_odd_but_valid_unicode_is_accepted(client: TestClient) -> None:
    prompt = "\u0000 z\u00e9bre \U0001f98a \u202e\u200b ünïcødé 漢字"
    r = client.post("/v1/jobs", json={"model": "synthetic", "prompt": prompt, "tags": ["é"]})
    assert r.status_code == 201, r.text
    got = client.get(f"/v1/jobs/{r.json()['id']}").json()
    assert got["spec"]["prompt"] == prompt

"""img2img at the edges, on a real Redis server, no workers: ``POST /v1/inputs`` stores a
picture under its hash, a job names it in ``init_image`` (422 naming the field for a picture
that is not there, a strength out of range, a model that cannot start from a picture; no job
for a refused spec), and ``POST /sdapi/v1/img2img`` maps A1111's img2img body onto such a
job (a mask: its inpainting) or refuses what the farm cannot render (a latent mask, other
resize modes, several pictures) with a 422 naming the field. Nothing renders: an accepted
img2img request ends at its (tiny) timeout, and the job it submitted tells how the fields
were mapped."""

from __future__ import annotations

import base64
import hashlib
import io
import random
from dataclasses import replace
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from farm.api import inputs
from farm.config import Config
from farm.jobs import Ledger
from farm.models import ModelEntry, ModelRegistry
from farm.spec import JobSpec, Plan
from farm.workers_registry import WorkerRegistry
from storage import LocalStore
from storage.keys import input_key
from tests.api.conftest import fields

MODEL = "override_settings.sd_model_checkpoint"
SD = {"override_settings": {"sd_model_checkpoint": "sd"}}


def picture_bytes(size=(40, 24), fmt="PNG", colour=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture
def sd(config: Config, redis_client: redis.Redis) -> str:
    """A registered SD1 checkpoint (no file needed: nothing renders)."""
    ModelRegistry(redis_client, config.namespace).add(
        ModelEntry(name="sd", engine="sd1", sha256="ab" * 32, size=1)
    )
    return "sd"


@pytest.fixture
def sdapi(config: Config, redis_client: redis.Redis, store: LocalStore, sd: str) -> TestClient:
    """A client whose img2img waits 0.3 s, on a farm with a worker 'running'."""
    from farm.api.app import create_app

    WorkerRegistry(redis_client, config.namespace).publish("w1", {"device": "cpu"}, ttl=60)
    cfg = replace(config, sdapi_timeout=0.3)
    return TestClient(create_app(cfg, redis_client=redis_client, store=store))


def upload(client: TestClient, data: bytes, content_type: str = "image/png") -> Any:
    return client.post("/v1/inputs", content=data, headers={"content-type": content_type})


def jobs(redis_client: redis.Redis, config: Config) -> list[Any]:
    return Ledger(redis_client, config.namespace).list(limit=100)


# ---------------------------------------------------------------- /v1/inputs and /v1/jobs


def test_upload_then_submit(client: TestClient, store: LocalStore, sd: str) -> None:
    r = upload(client, picture_bytes())
    assert r.status_code == 201, r.text
    got = r.json()
    sha = got["init_image"]
    assert (got["width"], got["height"]) == (40, 24)
    stored = store.get_bytes(input_key(sha))
    assert hashlib.sha256(stored).hexdigest() == sha  # content-addressed
    with Image.open(io.BytesIO(stored)) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (40, 24))
    # the same picture again: the same hash, one object
    assert upload(client, picture_bytes(), "application/octet-stream").json()["init_image"] == sha
    assert len(list(store.list("inputs/"))) == 1

    body = {"model": "sd", "prompt": "a fox", "init_image": sha, "denoising_strength": 0.4,
            "count": 3, "seed": 5, "width": 64, "height": 64}  # fmt: skip
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    spec = JobSpec(**r.json()["spec"])
    assert (spec.init_image, spec.denoising_strength) == (sha, 0.4)
    plan = Plan(spec, 2)
    assert {(plan.image(i).init_image, plan.image(i).denoising_strength) for i in range(3)} == {
        (sha, 0.4)
    }
    # swept strengths: one cell each
    swept = {**body, "denoising_strength": 0.75, "sweep": {"denoising_strength": [0.2, 1]}}
    r = client.post("/v1/jobs", json=swept)
    assert r.status_code == 201, r.text
    plan = Plan(JobSpec(**r.json()["spec"]), 4)
    assert [plan.image(i).denoising_strength for i in (0, 3)] == [0.2, 1.0]


def test_jpeg_webp_and_transparency(client: TestClient, store: LocalStore) -> None:
    for fmt in ("JPEG", "WEBP"):
        r = upload(client, picture_bytes(fmt=fmt), f"image/{fmt.lower()}")
        assert r.status_code == 201, r.text
    # transparent parts are laid on white, as A1111 flattens them
    r = upload(client, picture_bytes(mode="RGBA", colour=(10, 20, 30, 0)))
    assert r.status_code == 201, r.text
    stored = store.get_bytes(input_key(r.json()["init_image"]))
    with Image.open(io.BytesIO(stored)) as im:
        assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)


def test_bad_uploads_are_refused_naming_the_image(
    client: TestClient, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    gif = picture_bytes(fmt="GIF")
    for data in (b"", b"not a picture", picture_bytes()[:60], gif):
        r = upload(client, data)
        assert fields(r) == ["image"], data[:20]
    r = upload(client, picture_bytes(size=(inputs.MAX_INPUT_SIDE + 1, 8)))
    assert fields(r) == ["image"] and str(inputs.MAX_INPUT_SIDE) in r.json()["detail"][0]["msg"]
    monkeypatch.setattr(inputs, "MAX_INPUT_BYTES", 1000)
    noise = Image.frombytes("RGB", (40, 24), random.Random(1).randbytes(40 * 24 * 3))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    assert len(buf.getvalue()) > 1000
    r = upload(client, buf.getvalue())
    assert r.status_code == 413, r.text
    assert r.json()["detail"][0]["field"] == "image"
    assert not list(store.list("inputs/"))


def test_a_bad_init_image_or_strength_is_refused_naming_it(
    client: TestClient, redis_client: redis.Redis, config: Config, sd: str
) -> None:
    sha = upload(client, picture_bytes()).json()["init_image"]
    base = {"model": "sd", "prompt": "a fox", "init_image": sha}
    bad = [
        ("init_image", {"init_image": "cd" * 32}),  # well formed, never uploaded
        ("init_image", {"init_image": "not-a-hash"}),
        ("init_image", {"init_image": sha.upper()}),
        ("init_image", {"model": "synthetic"}),  # its engine cannot start from a picture
        ("denoising_strength", {"denoising_strength": 0}),
        ("denoising_strength", {"denoising_strength": 1.5}),
        ("denoising_strength", {"denoising_strength": -0.1}),
        ("denoising_strength", {"denoising_strength": "much"}),
        ("denoising_strength", {"init_image": "", "denoising_strength": 0.5}),  # no picture
        ("sweep.denoising_strength[1]", {"sweep": {"denoising_strength": [0.5, 2]}}),
        ("sweep.denoising_strength", {"init_image": "", "sweep": {"denoising_strength": [0.5]}}),
    ]
    for field, override in bad:
        r = client.post("/v1/jobs", json={**base, **override})
        assert fields(r) == [field], (field, override, r.text)
    assert jobs(redis_client, config) == []  # nothing stored for a refused job


def test_the_openapi_document_describes_the_upload(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    upload_op = doc["paths"]["/v1/inputs"]["post"]
    assert set(upload_op["requestBody"]["content"]) >= {"image/png", "image/jpeg", "image/webp"}
    assert {"201", "413", "422"} <= set(upload_op["responses"])
    spec = doc["components"]["schemas"]["JobSpec"]["properties"]
    assert "init_image" in spec and "denoising_strength" in spec
    img2img = doc["paths"]["/sdapi/v1/img2img"]["post"]
    ref = img2img["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    props = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    assert {"init_images", "denoising_strength", "resize_mode", "mask"} <= set(props)
    assert "enable_hr" not in props  # a txt2img field


def test_a_mask_is_read_as_a1111_reads_one(client: TestClient, store: LocalStore) -> None:
    def stored(r: Any) -> Image.Image:
        assert r.status_code == 201, r.text
        with Image.open(io.BytesIO(store.get_bytes(input_key(r.json()["init_image"])))) as im:
            return im.convert("RGB")

    # with transparency: its alpha, thresholded above 128 (opaque: repainted)
    rgba = Image.new("RGBA", (4, 1))
    for x, alpha in enumerate((0, 128, 129, 255)):
        rgba.putpixel((x, 0), (200, 10, 10, alpha))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    r = client.post("/v1/inputs?mask=true", content=buf.getvalue())
    assert [stored(r).getpixel((x, 0)) for x in range(4)] == [(0,) * 3, (0,) * 3, (255,) * 3,
                                                              (255,) * 3]  # fmt: skip
    # without: its grey levels as they are; the same bytes as a picture are flattened on white
    grey = stored(client.post("/v1/inputs?mask=true", content=picture_bytes(colour=(200, 30, 30))))
    level = Image.new("RGB", (1, 1), (200, 30, 30)).convert("L").getpixel((0, 0))
    assert grey.getpixel((0, 0)) == (level,) * 3
    assert stored(upload(client, buf.getvalue())).getpixel((0, 0)) == (255, 255, 255)


def test_inpaint_jobs_need_their_mask_uploaded(
    client: TestClient, redis_client: redis.Redis, config: Config, sd: str
) -> None:
    sha = upload(client, picture_bytes()).json()["init_image"]
    mask = client.post("/v1/inputs?mask=true", content=picture_bytes()).json()["init_image"]
    base = {"model": "sd", "prompt": "a fox", "init_image": sha}
    bad = [
        ("inpaint.mask", {"inpaint": {"mask": "cd" * 32}}),  # never uploaded
        ("inpaint.mask", {"inpaint": {"mask": "nope"}}),
        ("inpaint.mask", {"inpaint": {}}),
        ("inpaint.mask_blur", {"inpaint": {"mask": mask, "mask_blur": 99}}),
        ("inpaint.masked_content", {"inpaint": {"mask": mask, "masked_content": "smudge"}}),
        ("inpaint.padding", {"inpaint": {"mask": mask, "padding": -4}}),
        ("inpaint", {"init_image": "", "inpaint": {"mask": mask}}),  # no picture
        ("inpaint", {"inpaint": "yes"}),
    ]
    for field, override in bad:
        r = client.post("/v1/jobs", json={**base, **override})
        assert field in fields(r), (field, override, r.text)
    assert jobs(redis_client, config) == []
    r = client.post("/v1/jobs", json={**base, "inpaint": {"mask": mask, "only_masked": True}})
    assert r.status_code == 201, r.text
    spec = JobSpec(**r.json()["spec"])
    assert spec.inpaint is not None and (spec.inpaint.mask, spec.inpaint.only_masked) == (
        mask, True)  # fmt: skip
    assert spec.needs() >= {"inpaint"}


# ---------------------------------------------------------------- /sdapi/v1/img2img


def timed_out_job(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 504, r.text
    return client.get(f"/v1/jobs/{r.headers['x-farm-job']}").json()


def test_sdapi_img2img_maps_to_a_job_with_the_stored_picture(
    sdapi: TestClient, store: LocalStore
) -> None:
    png = picture_bytes(size=(100, 50))
    body = {"init_images": [b64(png)], "denoising_strength": 0.35, "prompt": "a fox",
            "seed": 9, "steps": 6, "width": 64, "height": 96, "batch_size": 2, "n_iter": 2,
            "resize_mode": 0, "inpainting_fill": 0, "mask_blur": None, "image_cfg_scale": 1.5,
            "include_init_images": False, **SD}  # fmt: skip
    job = timed_out_job(sdapi, body)
    spec = job["spec"]
    sha = spec["init_image"]
    assert (spec["denoising_strength"], spec["model"], spec["tags"]) == (0.35, "sd", ["sdapi"])
    assert (spec["width"], spec["height"], spec["seed"], job["total"]) == (64, 96, 9, 4)
    with Image.open(io.BytesIO(store.get_bytes(input_key(sha)))) as im:
        assert im.size == (100, 50)  # stored as sent; the worker resizes it
    # the same picture as a data: URL, twice, and the default strength
    url = "data:image/png;base64," + b64(png)
    spec = timed_out_job(sdapi, {"init_images": [url, url], **SD})["spec"]
    assert (spec["init_image"], spec["denoising_strength"]) == (sha, 0.75)
    assert len(list(store.list("inputs/"))) == 1


def test_sdapi_img2img_with_a_mask_inpaints_with_a1111s_api_defaults(
    sdapi: TestClient, store: LocalStore
) -> None:
    mask = Image.new("L", (100, 50), 0)
    mask.paste(255, (10, 10, 40, 30))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    body = {"init_images": [b64(picture_bytes(size=(100, 50)))], "mask": b64(buf.getvalue()),
            "prompt": "a fox", **SD}  # fmt: skip
    spec = timed_out_job(sdapi, body)["spec"]
    inpaint = spec["inpaint"]
    assert {k: v for k, v in inpaint.items() if k != "mask"} == {
        "mask_blur": 4, "masked_content": "fill", "invert_mask": False, "only_masked": True,
        "padding": 0}  # fmt: skip
    with Image.open(io.BytesIO(store.get_bytes(input_key(inpaint["mask"])))) as im:
        assert im.size == (100, 50) and im.convert("L").getpixel((20, 20)) == 255
    assert len(list(store.list("inputs/"))) == 2  # the picture and its mask
    body.update(mask_blur=9, inpainting_fill=2, inpaint_full_res=False,
                inpaint_full_res_padding=12, inpainting_mask_invert=1)  # fmt: skip
    inpaint = timed_out_job(sdapi, body)["spec"]["inpaint"]
    assert {k: v for k, v in inpaint.items() if k != "mask"} == {
        "mask_blur": 9, "masked_content": "latent noise", "invert_mask": True,
        "only_masked": False, "padding": 12}  # fmt: skip


# (field named in the 422, body overrides)
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("init_images", {"init_images": None}),
    ("init_images", {"init_images": []}),
    ("init_images", {"init_images": [b64(picture_bytes()), b64(picture_bytes(colour=(0, 0, 9)))]}),
    ("init_images[0]", {"init_images": ["@@@not base64@@@"]}),
    ("init_images[0]", {"init_images": [b64(b"not a picture")]}),
    ("init_images[0]", {"init_images": ["https://example.com/a.png"]}),
    ("resize_mode", {"resize_mode": 1}),
    ("mask", {"mask": "@@@not base64@@@"}),
    ("mask", {"mask": b64(b"not a picture")}),
    ("latent_mask", {"latent_mask": b64(picture_bytes())}),
    ("latent_mask", {"mask": b64(picture_bytes()), "latent_mask": b64(picture_bytes())}),
    ("inpainting_fill", {"mask": b64(picture_bytes()), "inpainting_fill": 4}),
    ("mask_blur_y", {"mask": b64(picture_bytes()), "mask_blur_x": 4, "mask_blur_y": 8}),
    ("mask_blur", {"mask": b64(picture_bytes()), "mask_blur": 65}),
    ("mask_blur_x", {"mask": b64(picture_bytes()), "mask_blur_x": -1, "mask_blur_y": -1}),
    ("mask_round", {"mask": b64(picture_bytes()), "mask_round": False}),
    ("inpaint_full_res_padding", {"mask": b64(picture_bytes()), "inpaint_full_res_padding": 300}),
    ("inpainting_mask_invert", {"mask": b64(picture_bytes()), "inpainting_mask_invert": 2}),
    ("inpainting_fill", {"inpainting_fill": 1}),
    ("inpaint_full_res", {"inpaint_full_res": False}),
    ("mask_blur", {"mask_blur": 8}),
    ("initial_noise_multiplier", {"initial_noise_multiplier": 0.9}),
    ("denoising_strength", {"denoising_strength": 0}),
    ("denoising_strength", {"denoising_strength": 1.2}),
    ("enable_hr", {"enable_hr": False}),  # not a field of A1111's img2img
    (MODEL, {"override_settings": {"sd_model_checkpoint": "synthetic"}}),
    ("restore_faces", {"restore_faces": True}),  # as txt2img
]


@pytest.mark.parametrize(
    ("field", "override"), REFUSED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(REFUSED)]
)
def test_sdapi_img2img_refusals_name_the_field(
    sdapi: TestClient,
    store: LocalStore,
    redis_client: redis.Redis,
    config: Config,
    field: str,
    override: dict[str, Any],
) -> None:
    body = {"init_images": [b64(picture_bytes())], "prompt": "a fox", **SD, **override}
    r = sdapi.post("/sdapi/v1/img2img", json=body)
    assert field in fields(r), r.text
    assert jobs(redis_client, config) == []
    assert not list(store.list("inputs/"))  # a refused request stores no picture


# ---------------------------------------------------------------- the CLI


def test_the_cli_uploads_the_init_image_then_submits(
    client: TestClient,
    store: LocalStore,
    config: Config,
    sd: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``farm submit --init-image FILE --denoising-strength S``, its HTTP calls answered by
    the app itself (through the test client, not a socket)."""
    from farm import cli
    from farm.client import FarmClient

    sent: list[tuple[str, str]] = []

    class Client(FarmClient):
        def request(self, method, path, body=None, raw=None, content_type="application/json"):
            sent.append((method, path))
            content = raw if raw is not None else None
            r = client.request(method, path, content=content, json=None if raw else body,
                               headers={"content-type": content_type})  # fmt: skip
            assert r.status_code < 300, r.text
            return r.json()

    monkeypatch.setattr(cli, "FarmClient", Client)
    picture = tmp_path / "in.webp"
    picture.write_bytes(picture_bytes(fmt="WEBP"))
    args = cli.build_parser().parse_args(
        ["submit", "--model", "sd", "--prompt", "a fox", "--init-image", str(picture),
         "--denoising-strength", "0.6", "--width", "64", "--height", "64"]
    )  # fmt: skip
    assert cli.cmd_submit(args, config) == 0
    assert sent == [("POST", "/v1/inputs"), ("POST", "/v1/jobs")]
    job_id = capsys.readouterr().out.split()[1].rstrip(":")
    spec = client.get(f"/v1/jobs/{job_id}").json()["spec"]
    assert spec["denoising_strength"] == 0.6
    assert store.exists(input_key(spec["init_image"]))
    args = cli.build_parser().parse_args(
        ["submit", "--prompt", "x", "--init-image", str(tmp_path / "missing.png")]
    )
    with pytest.raises(SystemExit, match="--init-image"):
        cli.cmd_submit(args, config)
    # inpainting: the mask is uploaded as one, then named in the job's inpaint
    mask = tmp_path / "mask.png"
    mask.write_bytes(picture_bytes(mode="RGBA", colour=(0, 0, 0, 255)))
    sent.clear()
    args = cli.build_parser().parse_args(
        ["submit", "--model", "sd", "--prompt", "a fox", "--init-image", str(picture),
         "--mask", str(mask), "--masked-content", "latent nothing", "--only-masked",
         "--width", "64", "--height", "64"]
    )  # fmt: skip
    assert cli.cmd_submit(args, config) == 0
    assert sent == [("POST", "/v1/inputs"), ("POST", "/v1/inputs?mask=true"), ("POST", "/v1/jobs")]
    job_id = capsys.readouterr().out.split()[1].rstrip(":")
    inpaint = client.get(f"/v1/jobs/{job_id}").json()["spec"]["inpaint"]
    assert (inpaint["masked_content"], inpaint["only_masked"]) == ("latent nothing", True)
    with Image.open(io.BytesIO(store.get_bytes(input_key(inpaint["mask"])))) as im:
        assert im.convert("L").getpixel((0, 0)) == 0  # opaque black: its grey, not its alpha
    args = cli.build_parser().parse_args(
        ["submit", "--prompt", "x", "--init-image", str(picture), "--mask", str(tmp_path / "no")]
    )
    with pytest.raises(SystemExit, match="--mask"):
        cli.cmd_submit(args, config)

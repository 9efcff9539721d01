"""The A1111-compatible API's informational endpoints, against a real Redis server:
``/png-info`` reads the parameters a picture carries (checked on an infotext A1111 itself
writes and on the farm's own PNGs), and the lists A1111 clients read at start answer that
the farm has none of them rather than 404."""

from __future__ import annotations

import base64
import io

from fastapi.testclient import TestClient
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from storage.png import encode_png, format_parameters

# as A1111 1.10 writes it (its own keys, a quoted value with a comma)
A1111_TEXT = (
    "a red fox, (at dusk:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, "
    "Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, "
    'Model: v1-5, Lora hashes: "style: 0123456789ab, detail: ba9876543210", Version: v1.10.1'
)


def b64(data: bytes, data_url: bool = False) -> str:
    text = base64.b64encode(data).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def png(text: str | None, **chunks: str) -> bytes:
    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    for k, v in chunks.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_png_info_gives_the_parameters_by_a1111s_names(client: TestClient) -> None:
    r = client.post("/sdapi/v1/png-info", json={"image": b64(png(A1111_TEXT, extra="x"), True)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == A1111_TEXT and body["items"] == {"extra": "x"}
    p = body["parameters"]
    assert (p["Prompt"], p["Negative prompt"]) == ("a red fox, (at dusk:1.2)", "blurry")
    assert (p["Steps"], p["Sampler"], p["Schedule type"], p["CFG scale"]) == (
        "20", "DPM++ 2M", "Karras", "7"
    )  # fmt: skip
    assert (p["Seed"], p["Size"], p["Size-1"], p["Size-2"]) == ("1234", "512x768", "512", "768")
    assert p["Lora hashes"] == "style: 0123456789ab, detail: ba9876543210"
    assert p["Version"] == "v1.10.1"


def test_png_info_reads_the_farms_own_pngs_and_pictures_without_parameters(
    client: TestClient,
) -> None:
    text = format_parameters("a cat", "", 4, "Euler", "Automatic", 5.0, 9, 64, 72, "tiny")
    own = encode_png(Image.new("RGB", (64, 72)), text)
    p = client.post("/sdapi/v1/png-info", json={"image": b64(own)}).json()["parameters"]
    assert (p["Prompt"], p["Negative prompt"], p["Seed"], p["Model"]) == ("a cat", "", "9", "tiny")
    assert (p["Size-1"], p["Size-2"]) == ("64", "72")
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    none = client.post("/sdapi/v1/png-info", json={"image": b64(jpeg.getvalue())}).json()
    assert none == {"info": "", "items": {}, "parameters": {}}


def test_png_info_refuses_what_is_no_picture_naming_the_field(client: TestClient) -> None:
    for image, words in (
        ("not base64!", "not base64"),
        (b64(b"plain bytes"), "not a picture"),
        ("https://example.com/a.png", "fetches no URLs"),
    ):
        r = client.post("/sdapi/v1/png-info", json={"image": image})
        assert r.status_code == 422, r.text
        (problem,) = r.json()["detail"]
        assert problem["field"] == "image" and words in problem["msg"], problem
    r = client.post("/sdapi/v1/png-info", json={})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "image"


def test_the_lists_clients_read_at_start_answer_none(client: TestClient) -> None:
    assert client.get("/sdapi/v1/sd-vae").json() == []
    assert client.get("/sdapi/v1/hypernetworks").json() == []
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    for path in ("/refresh-checkpoints", "/refresh-loras", "/refresh-vae", "/refresh-embeddings"):
        r = client.post("/sdapi/v1" + path)
        assert (r.status_code, r.json()) == (200, None), path
    names = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    assert names == ["None", "Lanczos", "Nearest"]  # no ESRGAN: it needs weights
    modes = [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert modes[0] == "Latent" and "Latent (nearest-exact)" in modes
    # what the lists name, a hires job takes
    from farm.spec import JobSpec

    for upscaler in names + modes:
        spec = JobSpec(model="m", prompt="p", hires={"upscaler": upscaler})
        assert spec.hires is not None and spec.hires.upscaler == upscaler
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/sdapi/v1/png-info", "/sdapi/v1/sd-vae", "/sdapi/v1/embeddings"} <= set(paths)

"""PNG encoding with A1111 `parameters` text: exact format, round trip, Pillow decoding."""

from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from storage.png import encode_png, format_parameters, parse_parameters, read_parameters

BASE: dict[str, Any] = {
    "prompt": "a castle on a hill, oil painting",
    "negative_prompt": "blurry, lowres",
    "steps": 20,
    "sampler_name": "Euler a",
    "scheduler": "Karras",
    "cfg_scale": 7.0,
    "seed": 123,
    "width": 512,
    "height": 768,
    "model": "sd15-tiny",
    "model_hash": "abcdef1234",
    "extra": {},
}


def roundtrip(**kwargs: Any) -> None:
    args = {**BASE, **kwargs}
    parsed = parse_parameters(format_parameters(**args))
    expected = {**args, "extra": {k: str(v) for k, v in (args["extra"] or {}).items()}}
    assert parsed == expected


def test_exact_a1111_layout() -> None:
    text = format_parameters(**{**BASE, "model_hash": "abcdef1234" + "5" * 54})
    assert text == (
        "a castle on a hill, oil painting\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 123, "
        "Size: 512x768, Model hash: abcdef1234, Model: sd15-tiny"
    )


def test_optional_parts_omitted_and_extra_appended_in_order() -> None:
    args = {**BASE, "negative_prompt": "", "scheduler": None, "model_hash": None}
    args["cfg_scale"] = 7.5
    args["extra"] = {"Job": "j1", "Clip skip": 2, "Note": "a, b: c", "Skipped": None}
    text = format_parameters(**args)
    assert text == (
        "a castle on a hill, oil painting\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 512x768, "
        'Model: sd15-tiny, Job: j1, Clip skip: 2, Note: "a, b: c"'
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"negative_prompt": "", "scheduler": None, "model_hash": None},
        {"prompt": "line one,\nline: two\n(emph:1.2), [x|y]", "negative_prompt": "a\nb, c"},
        {"prompt": "日本の城 — ünïcode 🙂", "model": 'we"ird, model: v2'},
        {"prompt": "", "negative_prompt": "only negative"},
        {"cfg_scale": 3.25, "seed": 2**40 + 5, "sampler_name": "DPM++ 2M SDE"},
        {"extra": {"Job id": "abc", "Denoising strength": "0.7", "Lora hashes": "x: 1, y: 2"}},
    ],
)
def test_roundtrip(changes: dict[str, Any]) -> None:
    roundtrip(**changes)


_text = st.text(alphabet="abcxyz XYZ,:()[]\"'\\\n0123456789éß日-", max_size=60)


@settings(max_examples=150, deadline=None)
@given(
    prompt=_text,
    negative=_text,
    model=_text.filter(lambda s: "\n" not in s),
    value=_text,
    cfg=st.floats(min_value=0, max_value=30, allow_nan=False),
)
def test_roundtrip_property(prompt: str, negative: str, model: str, value: str, cfg: float) -> None:
    prompt, negative = prompt.strip(), negative.strip()
    roundtrip(
        prompt=prompt, negative_prompt=negative, model=model, cfg_scale=cfg, extra={"Var": value}
    )


def test_parses_text_written_by_a1111() -> None:
    text = (
        "girl with a beret, ((eyeshadow))\n"
        "Negative prompt: ugly, (((deformed)))\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, "
        'Model hash: 45dee52b, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1'
    )
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "girl with a beret, ((eyeshadow))"
    assert parsed["negative_prompt"] == "ugly, (((deformed)))"
    assert (parsed["steps"], parsed["seed"], parsed["cfg_scale"]) == (20, 965400086, 7.0)
    assert (parsed["width"], parsed["height"]) == (512, 512)
    assert parsed["model_hash"] == "45dee52b" and parsed["model"] is None
    assert parsed["extra"] == {"Lora hashes": "add_detail: 7c6bad76eb54", "Version": "v1.10.1"}


def test_bad_input_named() -> None:
    with pytest.raises(ValueError, match="Steps"):
        parse_parameters("p\nSteps: many, Sampler: Euler, Seed: 1")
    with pytest.raises(ValueError, match="extra parameter name 'Seed'"):
        format_parameters(**{**BASE, "extra": {"Seed": 1}})
    with pytest.raises(ValueError, match="extra parameter name"):
        format_parameters(**{**BASE, "extra": {"bad,key": 1}})


def test_png_carries_parameters_and_decodes() -> None:
    image = Image.new("RGB", (96, 64), (200, 30, 60))
    params = format_parameters(**{**BASE, "prompt": "城 with ünïcode", "width": 96, "height": 64})
    data = encode_png(image, params)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert read_parameters(data) == params
    with Image.open(io.BytesIO(data)) as decoded:
        decoded.load()
        assert decoded.size == (96, 64) and decoded.mode == "RGB"
        assert decoded.getpixel((5, 5)) == (200, 30, 60)
    assert parse_parameters(read_parameters(data) or "")["prompt"] == "城 with ünïcode"


def test_latin1_parameters_use_a_plain_text_chunk() -> None:
    data = encode_png(Image.new("L", (8, 8)), "plain, text\nSteps: 1, Seed: 2, Size: 8x8")
    assert b"tEXtparameters\x00plain, text" in data


def test_png_without_parameters() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    assert read_parameters(buf.getvalue()) is None

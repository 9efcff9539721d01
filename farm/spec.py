"""Job spec and its expansion into images and tasks by index arithmetic.

A job asks for ``cells x prompts x count`` images, where the cells are the cartesian
product of the ``sweep`` values (like an X/Y/Z grid, first sweep key varying slowest).
Image ``k`` is::

    k = (cell * n_prompts + prompt_index) * count + repeat
    seed(k) = job seed + repeat

With variation seeds (``subseed_strength`` not 0) it is A1111's rule instead: every image
keeps the job seed and its subseed counts up, ``subseed(k) = cell's subseed + repeat``.

Nothing is expanded per image at submit time: every image and every task is computed
from its index, so accepting a million-image job costs the same as a one-image job.
A task is a contiguous range of images inside one cell, so all its images share the
model and the shape (and every other swept setting).
"""

from __future__ import annotations

import bisect
import math
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from farm.config import Config
from workers.engine.base import DEFAULT_HIRES_STRENGTH, HIRES_UPSCALERS, hires_sizes
from workers.engine.names import (
    MASKED_CONTENT,
    MAX_MASK_BLUR,
    MAX_MASK_PADDING,
    SAMPLERS,
    SCHEDULES,
)

MAX_SEED = 2**32 - 1
# what a job may need a worker to render beyond txt2img: workers publish the ones they
# render in their inventory ("features"), and the scheduler sends a job's tasks only to a
# model whose workers all render what it needs (a worker older than a feature would read
# the job without it and render the wrong images)
FEATURES = (
    "img2img",
    "hires",
    "embeddings",
    "clip_skip",
    "variation_seeds",
    "seed_resize",
    "ensd",
    "inpaint",
)
MAX_LORAS = 8  # LoRAs of one job
MAX_EMBEDDINGS = 32  # textual-inversion embeddings of one job
MAX_LORA_WEIGHT = 5.0  # |weight| of a LoRA (slider LoRAs go to about 5)
MAX_HIRES_SCALE = 4.0  # A1111's slider goes to 4
SWEEPABLE = (
    "model",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "cfg_scale",
    "sampler_name",
    "scheduler",
    "denoising_strength",
    "clip_skip",
    "subseed",
    "subseed_strength",
)
MAX_CLIP_SKIP = 12  # SD1's text encoder has 12 layers
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_DENOISING_STRENGTH = 0.75  # A1111's img2img default
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_limits: Config = Config.from_env()


def set_limits(config: Config) -> None:
    """Use the limits of ``config`` for every spec validated from now on."""
    global _limits
    _limits = config


def limits() -> Config:
    return _limits


# Field checks shared by the spec's own fields and by sweep values. Each returns the
# normalised value or raises ValueError with a message that names the allowed range.
def _check_model(v: Any) -> str:
    if not isinstance(v, str) or not _MODEL_RE.fullmatch(v):
        raise ValueError("must be a model name: letters, digits, '.', '_', '-' (1-128 chars)")
    return v


def check_model_name(name: str) -> str:
    """A name a job can give a model, LoRA or embedding by; ValueError saying the rule."""
    return _check_model(name)


def _encodable(v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid unicode (no lone surrogates)") from None
    return v


def _check_text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    _encodable(v)
    if len(v) > _limits.max_prompt_chars:
        raise ValueError(f"must be at most {_limits.max_prompt_chars} characters")
    return v


def _check_side(v: Any, maximum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("must be an integer")
    if not 64 <= v <= maximum or v % 8:
        raise ValueError(f"must be a multiple of 8 between 64 and {maximum}")
    return v


def _check_width(v: Any) -> int:
    return _check_side(v, _limits.max_width)


def _check_height(v: Any) -> int:
    return _check_side(v, _limits.max_height)


def _check_steps(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("must be an integer")
    if not 1 <= v <= _limits.max_steps:
        raise ValueError(f"must be between 1 and {_limits.max_steps}")
    return v


def _check_clip_skip(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("must be an integer")
    if not 1 <= v <= MAX_CLIP_SKIP:
        raise ValueError(f"must be between 1 (the last layer) and {MAX_CLIP_SKIP}")
    return v


def _check_subseed(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("must be an integer")
    if not 0 <= v <= MAX_SEED:
        raise ValueError(f"must be between 0 and {MAX_SEED}")
    return v


def _check_subseed_strength(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError("must be a number")
    if not 0.0 <= v <= 1.0:
        raise ValueError("must be between 0 (the seed's noise) and 1 (the subseed's)")
    return float(v)


def _check_cfg(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError("must be a number")
    if not 0.0 <= v <= _limits.max_cfg_scale:
        raise ValueError(f"must be between 0 and {_limits.max_cfg_scale}")
    return float(v)


def _check_sampler(v: Any) -> str:
    if v not in SAMPLERS:
        raise ValueError(f"must be one of {', '.join(SAMPLERS)}")
    return v


def _check_schedule(v: Any) -> str:
    if v not in SCHEDULES:
        raise ValueError(f"must be one of {', '.join(SCHEDULES)}")
    return v


def _check_strength(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError("must be a number")
    if not 0.0 < v <= 1.0:
        raise ValueError("must be above 0 and at most 1")
    return float(v)


CHECKS = {
    "model": _check_model,
    "negative_prompt": _check_text,
    "width": _check_width,
    "height": _check_height,
    "steps": _check_steps,
    "cfg_scale": _check_cfg,
    "sampler_name": _check_sampler,
    "scheduler": _check_schedule,
    "denoising_strength": _check_strength,
    "clip_skip": _check_clip_skip,
    "subseed": _check_subseed,
    "subseed_strength": _check_subseed_strength,
}


class LoraRef(BaseModel):
    """A LoRA merged into the model for every image of a job."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a registered LoRA (farm models add FILE --name NAME)")
    weight: float = Field(
        1.0, description=f"its multiplier, -{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_model(v)

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if not math.isfinite(v) or abs(v) > MAX_LORA_WEIGHT:
            raise ValueError(f"must be between -{MAX_LORA_WEIGHT:g} and {MAX_LORA_WEIGHT:g}")
        return float(v)


class InpaintSpec(BaseModel):
    """A1111's inpainting (img2img with a mask) on a normal model: only the masked part of
    the init picture is repainted; the rest is the picture's own pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mask: str = Field(
        description="the sha256 that POST /v1/inputs answered for the mask: white (above "
        "half grey) is repainted, black kept; any size (stretched to the init picture's)"
    )
    mask_blur: int = Field(
        4, description=f"pixels of Gaussian blur at the mask's edge, 0 to {MAX_MASK_BLUR}"
    )
    masked_content: str = Field(
        "original",
        description="what the masked part starts from: "
        + ", ".join(MASKED_CONTENT)
        + " (A1111's Masked content)",
    )
    invert_mask: bool = Field(
        False, description="repaint the black part instead (Inpaint not masked)"
    )
    only_masked: bool = Field(
        False,
        description="render the masked part's box (plus padding) at width x height and paste it "
        "back, so a small part gets all the pixels (A1111's Inpaint area: Only masked); the "
        "PNG then has the init picture's size",
    )
    padding: int = Field(
        32, description=f"pixels around the masked part with only_masked, 0 to {MAX_MASK_PADDING}"
    )

    @field_validator("mask")
    @classmethod
    def _mask(cls, v: str) -> str:
        if not _SHA256_RE.fullmatch(v):
            raise ValueError(
                "must be the sha256 (64 lowercase hex digits) that POST /v1/inputs answered"
            )
        return v

    @field_validator("mask_blur")
    @classmethod
    def _blur(cls, v: int) -> int:
        if isinstance(v, bool) or not 0 <= v <= MAX_MASK_BLUR:
            raise ValueError(f"must be between 0 (none) and {MAX_MASK_BLUR}")
        return v

    @field_validator("masked_content")
    @classmethod
    def _content(cls, v: str) -> str:
        if v not in MASKED_CONTENT:
            raise ValueError(f"must be one of {', '.join(MASKED_CONTENT)}")
        return v

    @field_validator("padding")
    @classmethod
    def _padding(cls, v: int) -> int:
        if isinstance(v, bool) or not 0 <= v <= MAX_MASK_PADDING:
            raise ValueError(f"must be between 0 and {MAX_MASK_PADDING}")
        return v


class HiresSpec(BaseModel):
    """A1111's hires fix (txt2img's ``enable_hr``): every image is rendered at width x
    height, upscaled and sampled again at the larger size, which the PNG has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(
        2.0, description=f"upscale factor, 1 to {MAX_HIRES_SCALE:g} (A1111's hr_scale)"
    )
    resize_x: int = Field(
        0,
        description="final width instead of scale (0: from scale, or from resize_y and the "
        "aspect ratio); a multiple of 8",
    )
    resize_y: int = Field(
        0,
        description="final height instead of scale (0: from scale, or from resize_x and "
        "the aspect ratio); both given: the upscale covers that box and is cropped to it",
    )
    upscaler: str = Field("Latent", description=f"one of {', '.join(HIRES_UPSCALERS)}")
    steps: int = Field(0, description="steps of the second pass; 0: the same as steps")
    denoising_strength: float = Field(
        DEFAULT_HIRES_STRENGTH, description="how much the second pass renews, above 0, at most 1"
    )

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float) -> float:
        if not math.isfinite(v) or not 1.0 <= v <= MAX_HIRES_SCALE:
            raise ValueError(f"must be between 1 and {MAX_HIRES_SCALE:g}")
        return float(v)

    @field_validator("resize_x", "resize_y")
    @classmethod
    def _resize(cls, v: int, info: ValidationInfo) -> int:
        most = _limits.max_width if info.field_name == "resize_x" else _limits.max_height
        if v != 0:
            try:
                _check_side(v, most)
            except ValueError as exc:
                rest = str(exc).removeprefix("must be ")
                raise ValueError(f"must be 0 (from scale) or {rest}") from None
        return v

    @field_validator("upscaler")
    @classmethod
    def _upscaler(cls, v: str) -> str:
        if v not in HIRES_UPSCALERS:
            raise ValueError(
                f"must be one of {', '.join(HIRES_UPSCALERS)} (upscalers with weights, "
                "such as ESRGAN, are not available on the farm)"
            )
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if not 0 <= v <= _limits.max_steps:
            raise ValueError(f"must be 0 (the same as steps) or up to {_limits.max_steps}")
        return v

    @field_validator("denoising_strength")
    @classmethod
    def _strength(cls, v: float) -> float:
        return _check_strength(v)

    def size_problem(self, width: int, height: int) -> str | None:
        """Why a first pass of width x height cannot be upscaled as asked (the final or
        the upscaled size off the farm's limits), naming the hires field; None if it can."""
        to_w, to_h, w, h = hires_sizes(width, height, self.scale, self.resize_x, self.resize_y)
        by = (
            f"{width}x{height} x hires.scale {self.scale:g}"
            if not (self.resize_x or self.resize_y)
            else f"hires.resize_x {self.resize_x}, hires.resize_y {self.resize_y} from "
            f"{width}x{height}"
        )
        most_w, most_h = _limits.max_width, _limits.max_height
        if w > most_w or h > most_h or to_w > most_w or to_h > most_h:
            size = f"{w}x{h}" if (w, h) == (to_w, to_h) else f"{to_w}x{to_h} before the crop"
            return f"{by} upscales to {size}; at most {most_w}x{most_h}"
        if w < 64 or h < 64:
            return f"{by} comes out at {w}x{h}; at least 64x64"
        return None


class JobSpec(BaseModel):
    """What a client asks for. Names follow A1111's txt2img API where one exists."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="registered model name")
    prompt: str | list[str] = Field(description="one prompt or a list of prompts")
    negative_prompt: str = ""
    count: int = Field(1, description="images per prompt and sweep cell (repeats)")
    seed: int = Field(-1, description="job seed; -1 picks one at submit and records it")
    subseed: int = Field(
        -1,
        description="A1111's variation seed: with a subseed_strength, each image's noise is "
        "blended toward this seed's (+ repeat) while its seed stays the job's; -1 picks one "
        "at submit",
    )
    subseed_strength: float = Field(
        0.0,
        description="how far the noise goes toward the variation seed's, 0 (none) to 1 (all of it)",
    )
    width: int = 512
    height: int = 512
    seed_resize_from_w: int = Field(
        0,
        description="A1111's Resize seed from (with seed_resize_from_h): each image's seed "
        "noise is drawn as for a picture of this size and set into the middle of its own, so "
        "a composition found at that size carries over; 0: none",
    )
    seed_resize_from_h: int = Field(0, description="see seed_resize_from_w", validate_default=True)
    eta_noise_seed_delta: int = Field(
        0,
        description="A1111's ENSD: an ancestral sampler's noise after the first comes from "
        "the seed plus this (31337 in NovelAI-style parameters); 0: from the seed",
    )
    steps: int = 20
    clip_skip: int = Field(
        1,
        description="A1111's Clip skip (SD1 models): the prompt's states from this layer of "
        f"the text encoder counted from the last (1: the last), 1 to {MAX_CLIP_SKIP}",
    )
    cfg_scale: float = 7.0
    sampler_name: str = "Euler a"
    scheduler: str = "Automatic"
    init_image: str = Field(
        "",
        description="img2img: the sha256 that POST /v1/inputs answered; every image starts "
        "from that picture (resized to width x height) instead of pure noise",
    )
    denoising_strength: float = Field(
        DEFAULT_DENOISING_STRENGTH,
        description="img2img: how much of the picture is renewed, above 0 and at most 1 "
        "(1: all of it); only with init_image",
    )
    inpaint: InpaintSpec | None = Field(
        None,
        description="inpainting (with init_image; SD1 and SDXL models): a mask says which part "
        "of the picture is repainted",
    )
    hires: HiresSpec | None = Field(
        None,
        description="A1111's hires fix (txt2img only, SD1 and SDXL models): each image "
        "rendered at width x height, upscaled and sampled again; the PNG has the final size",
    )
    batch_size: int | None = Field(None, description="images per task; default from config")
    priority: int = Field(50, description="0 (lowest) to 100 (highest)")
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description=f"field -> values, cartesian product; fields: {', '.join(SWEEPABLE)}",
    )
    loras: list[LoraRef] = Field(
        default_factory=list,
        description=f"LoRAs merged into the model for every image, at most {MAX_LORAS}",
    )
    embeddings: list[str] | None = Field(
        None,
        description="textual-inversion embeddings the prompts may use, each by writing its "
        "name; left out, the farm lists the registered ones whose names the prompts hold "
        f"(at most {MAX_EMBEDDINGS})",
    )
    output_prefix: str = ""
    tags: list[str] = Field(default_factory=list)

    @classmethod
    def model_construct(cls, _fields_set: set[str] | None = None, **values: Any) -> Self:
        """Also builds the nested models (hires, inpaint, the LoRA entries), which pydantic
        leaves as dicts here."""
        if isinstance(values.get("hires"), dict):
            values["hires"] = HiresSpec.model_construct(**values["hires"])
        if isinstance(values.get("inpaint"), dict):
            values["inpaint"] = InpaintSpec.model_construct(**values["inpaint"])
        if values.get("loras"):
            values["loras"] = [
                LoraRef.model_construct(**x) if isinstance(x, dict) else x for x in values["loras"]
            ]
        return super().model_construct(_fields_set, **values)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return _check_model(v)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be an empty list")
            if len(v) > _limits.max_prompts:
                raise ValueError(f"must hold at most {_limits.max_prompts} prompts")
            for i, p in enumerate(v):
                try:
                    _check_text(p)
                except ValueError as exc:
                    raise ValueError(f"item {i}: {exc}") from None
            return v
        return _check_text(v)

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, v: str) -> str:
        return _check_text(v)

    @field_validator("count")
    @classmethod
    def _count(cls, v: int) -> int:
        if not 1 <= v <= _limits.max_images:
            raise ValueError(f"must be between 1 and {_limits.max_images}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not -1 <= v <= MAX_SEED:
            raise ValueError(f"must be -1 (random) or between 0 and {MAX_SEED}")
        return v

    @field_validator("subseed")
    @classmethod
    def _subseed(cls, v: int) -> int:
        if isinstance(v, bool) or not -1 <= v <= MAX_SEED:
            raise ValueError(f"must be -1 (random) or between 0 and {MAX_SEED}")
        return v

    @field_validator("subseed_strength")
    @classmethod
    def _subseed_strength(cls, v: float) -> float:
        return _check_subseed_strength(v)

    @field_validator("width")
    @classmethod
    def _width(cls, v: int) -> int:
        return _check_width(v)

    @field_validator("height")
    @classmethod
    def _height(cls, v: int) -> int:
        return _check_height(v)

    @field_validator("seed_resize_from_w", "seed_resize_from_h")
    @classmethod
    def _seed_resize(cls, v: int, info: ValidationInfo) -> int:
        wide = info.field_name == "seed_resize_from_w"
        if (
            not wide
            and "seed_resize_from_w" in info.data
            and bool(v) != bool(info.data["seed_resize_from_w"])
        ):
            raise ValueError("must be given with seed_resize_from_w (both, or neither)")
        if v == 0:
            return v
        return _check_side(v, _limits.max_width if wide else _limits.max_height)

    @field_validator("eta_noise_seed_delta")
    @classmethod
    def _ensd(cls, v: int) -> int:
        if isinstance(v, bool) or not 0 <= v <= MAX_SEED:
            raise ValueError(f"must be between 0 (none) and {MAX_SEED}")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        return _check_steps(v)

    @field_validator("clip_skip")
    @classmethod
    def _clip_skip(cls, v: int) -> int:
        return _check_clip_skip(v)

    @field_validator("cfg_scale")
    @classmethod
    def _cfg(cls, v: float) -> float:
        return _check_cfg(v)

    @field_validator("sampler_name")
    @classmethod
    def _sampler(cls, v: str) -> str:
        return _check_sampler(v)

    @field_validator("scheduler")
    @classmethod
    def _schedule(cls, v: str) -> str:
        return _check_schedule(v)

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= _limits.max_batch_size:
            raise ValueError(f"must be between 1 and {_limits.max_batch_size}")
        return v

    @field_validator("priority")
    @classmethod
    def _priority(cls, v: int) -> int:
        if not 0 <= v <= 100:
            raise ValueError("must be between 0 and 100")
        return v

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, v: dict[str, list[Any]], info: ValidationInfo) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for name, values in v.items():
            if name == "denoising_strength" and info.data.get("init_image") == "":
                raise ValueError(f"{name}: only with init_image (img2img)")
            if name not in CHECKS:
                raise ValueError(f"{name!r} cannot be swept; allowed: {', '.join(SWEEPABLE)}")
            if not values:
                raise ValueError(f"{name}: must list at least one value")
            if len(values) > _limits.max_sweep_values:
                raise ValueError(f"{name}: at most {_limits.max_sweep_values} values")
            checked = []
            for i, value in enumerate(values):
                try:
                    checked.append(CHECKS[name](value))
                except ValueError as exc:
                    raise ValueError(f"{name}[{i}]: {exc}") from None
            out[name] = checked
        return out

    @field_validator("loras")
    @classmethod
    def _loras(cls, v: list[LoraRef]) -> list[LoraRef]:
        if len(v) > MAX_LORAS:
            raise ValueError(f"at most {MAX_LORAS} LoRAs")
        seen: set[str] = set()
        for i, lora in enumerate(v):
            if lora.name in seen:
                raise ValueError(f"item {i}: {lora.name!r} is listed twice; list it once")
            seen.add(lora.name)
        return v

    @field_validator("embeddings")
    @classmethod
    def _embeddings(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) > MAX_EMBEDDINGS:
            raise ValueError(f"at most {MAX_EMBEDDINGS} embeddings")
        for i, name in enumerate(v):
            try:
                _check_model(name)
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from None
            if name in v[:i]:
                raise ValueError(f"item {i}: {name!r} is listed twice; list it once")
        return v

    @field_validator("init_image")
    @classmethod
    def _init_image(cls, v: str) -> str:
        if v and not _SHA256_RE.fullmatch(v):
            raise ValueError(
                "must be the sha256 (64 lowercase hex digits) that POST /v1/inputs answered"
            )
        return v

    @field_validator("denoising_strength")
    @classmethod
    def _strength(cls, v: float, info: ValidationInfo) -> float:
        v = _check_strength(v)
        if info.data.get("init_image") == "" and v != DEFAULT_DENOISING_STRENGTH:
            raise ValueError("only with init_image (img2img: POST the picture to /v1/inputs)")
        return v

    @field_validator("inpaint")
    @classmethod
    def _inpaint(cls, v: InpaintSpec | None, info: ValidationInfo) -> InpaintSpec | None:
        if v is not None and info.data.get("init_image") == "":
            raise ValueError("only with init_image (the picture the mask is of)")
        return v

    @field_validator("hires")
    @classmethod
    def _hires(cls, v: HiresSpec | None, info: ValidationInfo) -> HiresSpec | None:
        if v is None:
            return v
        if info.data.get("init_image"):
            raise ValueError("a hires fix is for txt2img: not with init_image")
        width, height = info.data.get("width"), info.data.get("height")
        if width is None or height is None:
            return v  # the size is refused already
        if (problem := v.size_problem(width, height)) is not None:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _hires_sweep(self) -> JobSpec:
        """A swept width or height: the hires fix fits every one of its sizes (the sizes
        it gives are monotonic in width and in height, so the corners bound them)."""
        if self.hires is None or not ({"width", "height"} & set(self.sweep)):
            return self
        widths = self.sweep.get("width", [self.width])
        heights = self.sweep.get("height", [self.height])
        for w in (min(widths), max(widths)):
            for h in (min(heights), max(heights)):
                if (problem := self.hires.size_problem(w, h)) is not None:
                    raise ValueError(f"hires: {problem} (a swept size)")
        return self

    @field_validator("output_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        bad_segment = any(seg in (".", "..") for seg in v.split("/"))
        if v and (not _PREFIX_RE.fullmatch(v) or bad_segment or len(v) > 256):
            raise ValueError(
                "must be '/'-separated segments of letters, digits, '.', '_', '-' "
                "(no '.' or '..' segments, at most 256 chars)"
            )
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        if len(v) > 32 or any(len(t) > 64 for t in v):
            raise ValueError("at most 32 tags of at most 64 characters")
        for t in v:
            _encodable(t)
        return v

    @model_validator(mode="after")
    def _total(self) -> JobSpec:
        total = self.count * len(self.prompts) * math.prod(len(x) for x in self.sweep.values())
        if total > _limits.max_images:
            raise ValueError(
                f"count x prompts x sweep cells = {total} images; at most {_limits.max_images}"
            )
        return self

    def needs(self) -> frozenset[str]:
        """The ``FEATURES`` this job's images need of a worker."""
        return frozenset(
            name
            for name, used in (
                ("img2img", self.init_image),
                ("hires", self.hires is not None),
                ("embeddings", self.embeddings),
                ("clip_skip", {self.clip_skip, *self.sweep.get("clip_skip", [])} != {1}),
                ("variation_seeds", self.varies()),
                ("seed_resize", self.seed_resize_from_w),
                ("ensd", self.eta_noise_seed_delta),
                ("inpaint", self.inpaint is not None),
            )
            if used
        )

    def varies(self) -> bool:
        """Whether some image has variation seeds (a subseed strength other than 0)."""
        return {self.subseed_strength, *self.sweep.get("subseed_strength", [])} != {0.0}

    @property
    def prompts(self) -> list[str]:
        return self.prompt if isinstance(self.prompt, list) else [self.prompt]

    def resolved(self) -> JobSpec:
        """The spec with a concrete seed (and subseed, when it varies), as it is recorded
        at submit."""
        update: dict[str, int] = {}
        if self.seed == -1:
            update["seed"] = secrets.randbelow(MAX_SEED + 1)
        if self.subseed == -1 and self.varies():
            update["subseed"] = secrets.randbelow(MAX_SEED + 1)
        return self.model_copy(update=update) if update else self


@dataclass(frozen=True)
class ImageParams:
    """Everything needed to render image ``index`` of a job."""

    index: int
    cell: int
    prompt_index: int
    repeat: int
    prompt: str
    negative_prompt: str
    seed: int
    model: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    sampler_name: str
    scheduler: str
    clip_skip: int = 1
    subseed: int = -1  # the variation seed (-1: none)
    subseed_strength: float = 0.0  # 0: the image's noise is its seed's alone
    seed_resize_from: tuple[int, int] | None = None  # (width, height): A1111's seed resize
    eta_noise_seed_delta: int = 0  # A1111's ENSD
    loras: tuple[tuple[str, float], ...] = ()  # (name, weight), the job's, in its order
    embeddings: tuple[str, ...] = ()  # the job's textual-inversion embeddings, by name
    init_image: str = ""  # img2img: the job's input picture (sha256 of inputs/<sha>.png)
    denoising_strength: float = DEFAULT_DENOISING_STRENGTH
    hires: HiresSpec | None = None  # the job's hires fix
    inpaint: InpaintSpec | None = None  # the job's mask and how it is used


@dataclass(frozen=True)
class TaskRange:
    task_no: int
    start: int  # first image index
    end: int  # one past the last image index
    cell: int

    @property
    def images(self) -> range:
        """The indices of its images."""
        return range(self.start, self.end)


class Plan:
    """Index arithmetic over a (resolved) spec: images, cells and tasks, all O(1)."""

    def __init__(self, spec: JobSpec, default_batch_size: int | None = None):
        if spec.seed < 0 or (spec.subseed < 0 and spec.varies()):
            raise ValueError("plan needs a resolved spec (seed and subseed chosen)")
        self.spec = spec
        self.sweep_keys = list(spec.sweep)
        self.sweep_sizes = [len(spec.sweep[k]) for k in self.sweep_keys]
        self.n_cells = math.prod(self.sweep_sizes)
        self.n_prompts = len(spec.prompts)
        self.per_cell = self.n_prompts * spec.count
        self.total = self.n_cells * self.per_cell
        bs = spec.batch_size or default_batch_size or _limits.default_batch_size
        self.batch_size = max(1, min(bs, self.per_cell))
        self.tasks_per_cell = -(-self.per_cell // self.batch_size)
        self.n_tasks = self.n_cells * self.tasks_per_cell
        # the model's place among the sweep's digits (the last key varies fastest)
        self._model_values: list[Any] = list(spec.sweep.get("model", [spec.model]))
        at = self.sweep_keys.index("model") if "model" in spec.sweep else len(self.sweep_keys)
        self._model_stride = math.prod(self.sweep_sizes[at + 1 :])
        self._loras = tuple((lora.name, lora.weight) for lora in spec.loras)
        self._embeddings = tuple(spec.embeddings or ())
        self._seed_resize = (
            (spec.seed_resize_from_w, spec.seed_resize_from_h) if spec.seed_resize_from_w else None
        )

    def cell_values(self, cell: int) -> dict[str, Any]:
        if not 0 <= cell < self.n_cells:
            raise IndexError(f"cell {cell} out of range 0..{self.n_cells - 1}")
        values: dict[str, Any] = {}
        for key, size in zip(reversed(self.sweep_keys), reversed(self.sweep_sizes), strict=True):
            cell, i = divmod(cell, size)
            values[key] = self.spec.sweep[key][i]
        return values

    def cell_settings(self, cell: int) -> dict[str, Any]:
        s = self.spec
        base = {
            "model": s.model,
            "negative_prompt": s.negative_prompt,
            "width": s.width,
            "height": s.height,
            "steps": s.steps,
            "cfg_scale": s.cfg_scale,
            "sampler_name": s.sampler_name,
            "scheduler": s.scheduler,
            "denoising_strength": s.denoising_strength,
            "clip_skip": s.clip_skip,
            "subseed": s.subseed,
            "subseed_strength": s.subseed_strength,
        }
        base.update(self.cell_values(cell))
        return base

    def cell_model(self, cell: int) -> str:
        """The model cell ``cell`` renders, in O(1)."""
        if not 0 <= cell < self.n_cells:
            raise IndexError(f"cell {cell} out of range 0..{self.n_cells - 1}")
        values = self._model_values
        return str(values[(cell // self._model_stride) % len(values)])

    def model_layout(self) -> dict[str, Any]:
        """What ``cell_model`` reads, as data (for the ledger's Lua, which counts images
        per model): image k's model is ``models[(k // per_cell // stride) % len(models)]``."""
        return {
            "per_cell": self.per_cell,
            "stride": self._model_stride,
            "models": [str(m) for m in self._model_values],
        }

    def _model_digits(self, model: str) -> list[int]:
        return [i for i, v in enumerate(self._model_values) if str(v) == model]

    def model_cells(self, model: str, start: int = 0, stop: int | None = None) -> Iterator[int]:
        """The cells of ``model`` in ``[start, stop)``, in order, skipping the others
        without visiting them (a sweep's model is one digit of the cell number)."""
        stop = self.n_cells if stop is None else min(stop, self.n_cells)
        digits = self._model_digits(model)
        if not digits:
            return
        s, n = self._model_stride, len(self._model_values)
        block = max(0, start) // s
        while block * s < stop:
            d = block % n
            at = bisect.bisect_left(digits, d)
            # the next block whose digit is one of the model's
            block += (digits[at] - d) if at < len(digits) else (n - d + digits[0])
            lo = max(start, block * s)
            yield from range(lo, min(stop, block * s + s))
            block += 1

    def count_model_cells(self, model: str, start: int = 0, stop: int | None = None) -> int:
        """How many cells of ``[start, stop)`` render ``model``, in O(sweep values)."""
        stop = self.n_cells if stop is None else min(stop, self.n_cells)
        digits = self._model_digits(model)
        s, period = self._model_stride, self._model_stride * len(self._model_values)

        def below(x: int) -> int:
            whole, rest = divmod(max(0, x), period)
            return whole * len(digits) * s + sum(min(s, max(0, rest - d * s)) for d in digits)

        return max(0, below(stop) - below(start))

    def task_model(self, task_no: int) -> str:
        """The model task ``task_no`` renders."""
        return self.cell_model(self.task(task_no).cell)

    def image(self, index: int) -> ImageParams:
        if not 0 <= index < self.total:
            raise IndexError(f"image {index} out of range 0..{self.total - 1}")
        cell, rest = divmod(index, self.per_cell)
        prompt_index, repeat = divmod(rest, self.spec.count)
        settings = self.cell_settings(cell)
        seed = self.spec.seed + repeat
        if settings["subseed_strength"]:  # A1111: the seed stays, the subseed counts up
            seed, settings["subseed"] = self.spec.seed, settings["subseed"] + repeat
        return ImageParams(
            index=index,
            cell=cell,
            prompt_index=prompt_index,
            repeat=repeat,
            prompt=self.spec.prompts[prompt_index],
            seed=seed,
            loras=self._loras,
            embeddings=self._embeddings,
            init_image=self.spec.init_image,
            hires=self.spec.hires,
            inpaint=self.spec.inpaint,
            seed_resize_from=self._seed_resize,
            eta_noise_seed_delta=self.spec.eta_noise_seed_delta,
            **settings,
        )

    def task(self, task_no: int) -> TaskRange:
        if not 0 <= task_no < self.n_tasks:
            raise IndexError(f"task {task_no} out of range 0..{self.n_tasks - 1}")
        cell, j = divmod(task_no, self.tasks_per_cell)
        start = cell * self.per_cell + j * self.batch_size
        end = min(start + self.batch_size, (cell + 1) * self.per_cell)
        return TaskRange(task_no, start, end, cell)

    def task_of(self, index: int) -> int:
        cell, rest = divmod(index, self.per_cell)
        return cell * self.tasks_per_cell + rest // self.batch_size

    def models(self) -> list[str]:
        return list(dict.fromkeys(self.spec.sweep.get("model", [self.spec.model])))

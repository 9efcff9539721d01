"""The AUTOMATIC1111-compatible API (``/sdapi/v1/...``): tools written for the Stable
Diffusion WebUI's API drive the farm unchanged.

``POST /sdapi/v1/txt2img`` takes A1111's request body, submits one job of ``batch_size x
n_iter`` images with seeds ``seed .. seed+n-1`` (A1111's ``all_seeds``; the farm's image
seed is the job seed plus the repeat index; with a ``subseed_strength``, A1111's variation
seeds, every image keeps ``seed`` and its subseed counts up from ``subseed``), waits
until the job ends and answers with the PNGs in base64 and A1111's ``parameters`` and
``info``. A field that would change the picture in a way the farm cannot render (face
restoration, scripts, ...) is refused with a 422 naming it, never dropped; a field that
does not change the picture is accepted. A field A1111 does not have is refused too: the
farm cannot tell whether it would have changed the picture. ``<lora:name:weight>`` tags
in the prompt become the job's ``loras`` and leave the prompt the model reads, as in
A1111.

``POST /sdapi/v1/img2img`` is the same with A1111's img2img body: ``init_images`` holds the
picture (base64, a ``data:`` URL too; several only if they are all the same picture), which
is checked and stored as ``POST /v1/inputs`` stores one and becomes the job's
``init_image``, with ``denoising_strength`` (default 0.75). A ``mask`` (read as A1111 reads
one) becomes the job's ``inpaint``, with A1111's API defaults (Only masked, padding 0,
"fill"). Only ``resize_mode`` 0 ("Just resize") is rendered; a latent mask, mask blurs that
differ between x and y, an unrounded mask, an inpainting setting without a mask or a noise
multiplier other than 1 is refused with a 422 naming it. The answer's ``parameters`` echo
``init_images`` and ``mask`` as null unless ``include_init_images``.

The wait holds no thread: the endpoint is async and reads the job's state (one HGET in
the threadpool) 0.05 s after submitting, then ever less often, at most 0.5 s apart. It
ends after ``FARM_SDAPI_TIMEOUT`` seconds with a 504 naming the job, or when the client
goes away; either way the job is cancelled (its images done so far stay), since an A1111
client that got no images treats the request as failed and sends it again: a job left
queued would render for nobody, ahead of the request sent again. ``POST /interrupt``
cancels the newest request's job, the one ``/progress`` follows; that request answers
200 with the images finished by then, as A1111's interrupted request does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import redis
from fastapi import APIRouter, Body, HTTPException, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

import storage
from farm.api import inputs
from farm.api.errors import (
    FieldError,
    SafeJSONResponse,
    check_encodable,
    format_errors,
    validation_response,
)
from farm.api.schemas import BODY_ERRORS, ERRORS, ErrorBody
from farm.jobs import TERMINAL, JobNotFound, JobRecord
from farm.models import FLUX_DEFAULTS, LORA, LORA_ENGINES, ModelEntry, ModelRegistry, no_loras
from farm.spec import DEFAULT_DENOISING_STRENGTH, JobSpec, Plan
from storage.keys import image_key
from storage.png import infotext_fields, read_parameters
from workers.engine.base import HIRES_LATENT_MODES, HIRES_PIXEL_UPSCALERS, HIRES_UPSCALERS
from workers.engine.names import DEFAULT_SCHEDULE, MASKED_CONTENT, SAMPLERS, SCHEDULES

if TYPE_CHECKING:
    from farm.api.app import Farm

FIRST_POLL_S = 0.05  # the first look at the job's state after submitting ...
LAST_POLL_S = 0.5  # ... then each pause 1.5x the one before, up to this
MODEL_FIELD = "override_settings.sd_model_checkpoint"
TAG = "sdapi"  # every job submitted here carries this tag
MAX_INIT_IMAGES = 64  # img2img's init_images (all the same picture)
# txt2img's denoising_strength when not given: A1111's API takes its default from the
# txt2img class (0.75; 0.7 is its UI slider's default, and the job spec's)
SDAPI_HIRES_STRENGTH = 0.75
# the job spec's hires fields by A1111's names
HIRES_NAMES = {
    "scale": "hr_scale",
    "resize_x": "hr_resize_x",
    "resize_y": "hr_resize_y",
    "upscaler": "hr_upscaler",
    "steps": "hr_second_pass_steps",
    "denoising_strength": "denoising_strength",
}

# A1111's other names of the engine's samplers, and of its schedules: (default_rho,
# need_inner_model) as A1111's /sdapi/v1/schedulers tells them
SAMPLER_ALIASES: dict[str, tuple[str, ...]] = {
    "Euler a": ("k_euler_a", "k_euler_ancestral"),
    "Euler": ("k_euler",),
    "DPM++ 2M": ("k_dpmpp_2m",),
}
SCHEDULE_TRAITS: dict[str, tuple[float, bool]] = {
    "Automatic": (-1.0, False),
    "Uniform": (-1.0, True),
    "Karras": (7.0, False),
}
# A1111 settings (``override_settings``, ``/sdapi/v1/options``) with the values the farm
# renders with: asking for one of these changes nothing, asking for another is refused
CLIP_SKIP_OPTION = "CLIP_stop_at_last_layers"  # a request's override is its job's clip_skip
ENSD_OPTION = "eta_noise_seed_delta"  # a request's override is its job's ENSD
# a job's fields by the A1111 request fields that set them, for the 422s
# the job's inpaint fields -> the A1111 fields they come from
INPAINT_FIELDS = {
    "inpaint.mask_blur": "mask_blur_x",
    "inpaint.masked_content": "inpainting_fill",
    "inpaint.padding": "inpaint_full_res_padding",
}
FIELDS_FROM_SPEC = {
    "count": "batch_size",
    "model": MODEL_FIELD,
    "clip_skip": f"override_settings.{CLIP_SKIP_OPTION}",
    "eta_noise_seed_delta": f"override_settings.{ENSD_OPTION}",
}
FARM_OPTIONS: dict[str, tuple[Any, ...]] = {
    "CLIP_stop_at_last_layers": (1,),
    "sd_vae": ("Automatic", "None"),
    "eta_noise_seed_delta": (0,),
    "inpainting_mask_weight": (1.0,),  # inpainting checkpoints' "Conditional mask weight"
    "samples_format": ("png",),
    "enable_pnginfo": (True,),
}
_EXTRA_NETWORK = re.compile(r"<(lora|lyco|hypernet):[^>]*>", re.IGNORECASE)
_OTHER_NETWORK = re.compile(r"<(lyco|hypernet):[^>]*>", re.IGNORECASE)  # all but LoRA
_LORA_TAG = re.compile(r"<lora:([^>]*)>", re.IGNORECASE)
_LORA_FIELD = re.compile(r"^loras\[(?P<i>\d+)\](?:\.(?P<what>\w+))?$")
_TITLE = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9A-Fa-f]{1,64})\]$")
_HASH = re.compile(r"[0-9a-f]{8,64}")


class SdapiRequest(BaseModel):
    """The fields A1111's txt2img and img2img requests share, with their defaults, each
    nullable (null means the default, as there)."""

    model_config = ConfigDict(
        extra="allow",  # refused in ``to_spec``, with the field named
        allow_inf_nan=False,
        protected_namespaces=(),
        json_schema_extra={"additionalProperties": False},
    )

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = Field(None, description="refused: the farm has no styles")
    seed: int | None = Field(-1, description="-1 picks one; image i gets seed + i")
    subseed: int | None = Field(-1, description="the variation seed; -1 picks one")
    subseed_strength: float | None = Field(
        0, description="0 to 1: how far each image's noise goes toward its variation seed's"
    )
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = Field(
        None, description=f"{', '.join(SAMPLERS)}, or one followed by a schedule"
    )
    sampler_index: str | None = Field("Euler", description="the sampler if sampler_name is not set")
    scheduler: str | None = Field(None, description=", ".join(SCHEDULES))
    batch_size: int | None = Field(1, description="images rendered together")
    n_iter: int | None = Field(1, description="batches; batch_size x n_iter images in all")
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    distilled_cfg_scale: float | None = Field(
        None,
        description="Forge's guidance of a Flux model (3.5 when neither it nor cfg_scale is "
        "given); other models ignore it",
    )
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = Field(None, description="refused if true")
    tiling: bool | None = Field(None, description="refused if true")
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = Field(
        None, description="sd_model_checkpoint: a title or model_name of /sdapi/v1/sd-models"
    )
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = Field(None, description="refused if set")
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    script_name: str | None = Field(None, description="refused if set")
    script_args: list[Any] | None = Field(default_factory=list)
    send_images: bool | None = Field(True, description="false: answer without the images")
    save_images: bool | None = Field(False, description="the farm stores every image anyway")
    alwayson_scripts: dict[str, Any] | None = Field(
        default_factory=dict, description="refused unless empty"
    )
    infotext: str | None = Field(None, description="refused if set: send the fields")


class Txt2ImgRequest(SdapiRequest):
    """A1111's ``StableDiffusionTxt2ImgProcessingAPI``: its fields and defaults, each
    nullable (null means the default, as there)."""

    firstpass_image: str | None = Field(None, description="refused if set")
    enable_hr: bool | None = Field(
        False, description="hires fix: the job's hires (SD1 and SDXL models)"
    )
    firstphase_width: int | None = Field(0, description="refused unless 0 (the old hires fix)")
    firstphase_height: int | None = Field(0, description="refused unless 0")
    hr_scale: float | None = Field(2.0, description="1 to 4")
    hr_upscaler: str | None = Field(
        None, description=f"{', '.join(HIRES_UPSCALERS)} (none: Latent)"
    )
    hr_second_pass_steps: int | None = Field(0, description="0: the same as steps")
    hr_resize_x: int | None = Field(0, description="0 or a multiple of 8")
    hr_resize_y: int | None = Field(0, description="0 or a multiple of 8")
    hr_checkpoint_name: str | None = Field(None, description="refused unless the same model")
    hr_sampler_name: str | None = Field(None, description="refused unless the same sampler")
    hr_scheduler: str | None = Field(None, description="refused unless the same schedule")
    hr_prompt: str | None = Field("", description="refused unless empty or the prompt")
    hr_negative_prompt: str | None = Field(
        "", description="refused unless empty or the negative prompt"
    )
    hr_additional_modules: list[str] | None = Field(
        None, description='refused unless empty or ["Use same choices"]'
    )


class Img2ImgRequest(SdapiRequest):
    """A1111's ``StableDiffusionImg2ImgProcessingAPI``: its fields and defaults, each
    nullable (null means the default, as there). A ``mask`` inpaints (SD1 and SDXL)."""

    init_images: list[str] | None = Field(
        None,
        description="the picture to start from, base64 PNG, JPEG or WebP (a data: URL too); "
        "one picture (several only if all are the same)",
    )
    resize_mode: int | None = Field(0, description="0 (Just resize) only")
    denoising_strength: float | None = Field(0.75, description="above 0, at most 1")
    image_cfg_scale: float | None = None
    mask: str | None = Field(
        None,
        description="inpainting: the mask, base64 (white, or opaque where it has transparency: "
        "repainted)",
    )
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None
    mask_round: bool | None = True
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = Field(None, description="refused unless 1")
    latent_mask: str | None = Field(None, description="refused if set (a second mask)")
    include_init_images: bool | None = Field(
        False, description="true: the answer's parameters echo init_images"
    )


# A1111's img2img fields that only act with a mask (inpainting), with their defaults: any
# other value without a mask is refused (it would change nothing, yet the client meant it to)
INPAINTING_DEFAULTS: dict[str, Any] = {
    "mask_blur_x": 4,
    "mask_blur_y": 4,
    "mask_blur": None,
    "mask_round": True,
    "inpainting_fill": 0,
    "inpaint_full_res": True,
    "inpaint_full_res_padding": 0,
    "inpainting_mask_invert": 0,
}
_DATA_URL = re.compile(r"^data:[^,;]*(;[^,;]*)*;base64,", re.IGNORECASE)


class TextToImageResponse(BaseModel):
    images: list[str] = Field(description="the PNGs in base64, in seed order")
    parameters: dict[str, Any] = Field(description="the request, with A1111's defaults")
    info: str = Field(description="JSON: seed, all_seeds, all_prompts, infotexts, job_id, ...")


class ImageToImageResponse(TextToImageResponse):
    pass


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float | None
    need_inner_model: bool | None


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class EmbeddingItem(BaseModel):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int = Field(description="the width of its vectors (SDXL: both encoders' summed)")
    vectors: int


class EmbeddingsList(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


# the width A1111 gives an embedding of each family: its encoder's (SDXL: CLIP-L's and
# bigG's summed)
EMBEDDING_SHAPES = {"sd1": 768, "sdxl": 768 + 1280}


class PngInfoRequest(BaseModel):
    image: str = Field(description="a PNG (or another picture) in base64, or a data: URL")


class PngInfoResponse(BaseModel):
    info: str = Field(description="the picture's generation parameters, as written in it")
    items: dict[str, Any] = Field(description="its other text chunks")
    parameters: dict[str, Any] = Field(description="the parameters by A1111's names")


class ProgressResponse(BaseModel):
    progress: float = Field(description="0 to 1, of the newest txt2img job not ended")
    eta_relative: float = Field(description="seconds left, estimated")
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


class Refused(Exception):
    """The request's problems, each ``{"field", "msg"}``: answered as one 422."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{p['field']}: {p['msg']}" for p in problems))
        self.problems = problems


def title(entry: ModelEntry) -> str:
    """A1111's checkpoint title: ``name [first 10 hex of sha256]`` (the name alone for a
    model without a checkpoint, such as ``synthetic``)."""
    return f"{entry.name} [{entry.sha256[:10]}]" if entry.sha256 else entry.name


def resolve_model(models: ModelRegistry, value: Any, default: str) -> ModelEntry:
    """The registered model an A1111 ``sd_model_checkpoint`` names: a title (``name
    [hash]``, the hash checked against the model's sha256), a name with or without
    ``.safetensors``/``.ckpt``, or a sha256 or its first 10+ hex digits. Empty: the farm's
    default model. FieldError naming the field otherwise."""

    def known() -> str:
        titles = [title(e) for e in models.checkpoints()]
        return ", ".join(titles[:20]) + (", ..." if len(titles) > 20 else "")

    if value is None or value == "":
        entry = models.get(default)
        if entry is None:
            raise FieldError(
                MODEL_FIELD,
                f"no model asked for, and the farm's default model {default!r} "
                f"(FARM_DEFAULT_MODEL) is not registered; registered: {known()}",
            )
        return entry
    if not isinstance(value, str):
        raise FieldError(MODEL_FIELD, "must be a string: a title or model_name of sd-models")
    name, want = value.strip(), ""
    if m := _TITLE.match(name):
        name, want = m["name"].strip(), m["hash"].lower()
    for ext in (".safetensors", ".ckpt"):
        name = name.removesuffix(ext)
    entry = models.get(name) if name and len(name) <= 128 else None
    if entry is None and not want and _HASH.fullmatch(name.lower()):
        found = [e for e in models.checkpoints() if e.sha256.startswith(name.lower())]
        entry = found[0] if len(found) == 1 else None
    if entry is None:
        raise FieldError(MODEL_FIELD, f"unknown model {value!r}; registered: {known()}")
    if entry.engine == LORA:
        raise FieldError(
            MODEL_FIELD,
            f"{entry.name!r} is a LoRA, not a checkpoint: put <lora:{entry.name}:1> in the "
            "prompt and name a checkpoint here",
        )
    if not entry.is_checkpoint:
        raise FieldError(
            MODEL_FIELD,
            f"{entry.name!r} is a textual-inversion embedding, not a checkpoint: write its "
            "name in the prompt and name a checkpoint here",
        )
    if want and not entry.sha256.startswith(want):
        have = entry.sha256[:10] or "none (no checkpoint)"
        raise FieldError(
            MODEL_FIELD, f"model {entry.name!r} has hash {have}, not {want}: a different checkpoint"
        )
    return entry


def _sampler(name: str) -> str | None:
    """The engine's name of an A1111 sampler name or alias (any case), or None."""
    low = name.strip().lower()
    for sampler in SAMPLERS:
        if low == sampler.lower() or low in SAMPLER_ALIASES.get(sampler, ()):
            return sampler
    return None


def _schedule(name: str) -> str | None:
    """The engine's name of an A1111 schedule label or name (``Karras``, ``karras``)."""
    low = name.strip().lower()
    for label in SCHEDULES:
        if low in (label.lower(), label.lower().replace(" ", "_")):
            return label
    return None


def cfg_scale(body: SdapiRequest, entry: ModelEntry | None) -> float:
    """The job's ``cfg_scale``: the request's, or A1111's 7. A Flux model's is its distilled
    guidance: Forge's ``distilled_cfg_scale``, else a ``cfg_scale`` the client sent, else
    Forge's 3.5 (Forge would also run a real CFG at a cfg_scale above 1; the farm does not)."""
    given = body.cfg_scale if "cfg_scale" in body.model_fields_set else None
    if entry is not None and entry.engine == "flux":
        if body.distilled_cfg_scale is not None:
            return body.distilled_cfg_scale
        return FLUX_DEFAULTS["cfg_scale"] if given is None else given
    return 7.0 if body.cfg_scale is None else body.cfg_scale


def sampler_and_schedule(body: SdapiRequest, bad: Callable[[str, str], None]) -> tuple[str, str]:
    """The sampler and schedule to render with, as A1111 >= 1.9 reads them: the sampler
    from ``sampler_name`` (else ``sampler_index``), whose name may end in a schedule as
    before 1.9 (``DPM++ 2M Karras``); the schedule from ``scheduler`` (none: Automatic).
    A1111 renders an unknown name with its default one; the farm refuses it."""
    field = "sampler_name" if body.sampler_name else "sampler_index"
    raw = body.sampler_name or body.sampler_index or "Euler"
    schedule = "Automatic"
    if body.scheduler:
        found = _schedule(body.scheduler)
        if found is None:
            names = ", ".join(f"{s} ({s.lower().replace(' ', '_')})" for s in SCHEDULES)
            bad("scheduler", f"must be one of {names}")
        else:
            schedule = found
    sampler = _sampler(raw)
    if sampler is not None:
        return sampler, schedule
    for label in SCHEDULES:
        for suffix in {label, label.lower().replace(" ", "_")}:
            if raw.lower().endswith(" " + suffix.lower()):
                base = _sampler(raw[: -len(suffix) - 1])
                if base is None:
                    continue
                if schedule not in ("Automatic", label):
                    bad(field, f"names schedule {label} but scheduler is {schedule}")
                return base, label
    bad(field, f"must be one of {', '.join(SAMPLERS)} (optionally followed by a schedule)")
    return SAMPLERS[0], schedule


def _non_finite(value: Any, field: str) -> str | None:
    """The first place inside ``value`` holding NaN or an infinity, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return field
    items: Any = ()
    if isinstance(value, dict):
        items = ((f"{field}.{k}", v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{field}[{i}]", v) for i, v in enumerate(value))
    for where, v in items:
        if (found := _non_finite(v, where)) is not None:
            return found
    return None


def _same(value: Any, farm: Any) -> bool:
    """Whether an A1111 setting's value is the farm's: numbers by value (not booleans),
    text in any case."""
    if isinstance(value, bool) or isinstance(farm, bool):
        return value is farm
    if isinstance(value, int | float) and isinstance(farm, int | float):
        return value == farm
    if isinstance(value, str) and isinstance(farm, str):
        return value.strip().lower() == farm.lower()
    return False


def _whole(value: Any, unset: int = 1) -> Any:
    """A setting's number: a float that is a whole number as an int (A1111's settings
    arrive as 2.0 too), null (not set) as ``unset``."""
    if value is None:
        return unset
    return int(value) if isinstance(value, float) and value.is_integer() else value


def check_options(options: dict[str, Any], prefix: str, bad: Callable[[str, str], None]) -> None:
    """Refuse A1111 settings (other than sd_model_checkpoint) that would render otherwise
    than the farm does."""
    for key, value in options.items():
        if key == "sd_model_checkpoint" or value is None:
            continue
        if key in (CLIP_SKIP_OPTION, ENSD_OPTION) and prefix:  # a request's own: its job's
            continue
        allowed = FARM_OPTIONS.get(key)
        if allowed is None:
            bad(f"{prefix}{key}", "the farm renders without this A1111 setting; remove it")
        elif not any(_same(value, a) for a in allowed):
            shown = " or ".join(json.dumps(a) for a in allowed)
            bad(f"{prefix}{key}", f"the farm renders with {shown} only")


def refusals(body: SdapiRequest, sampler: str, bad: Callable[[str, str], None]) -> None:
    """Report every field set to something the farm cannot render (A1111 would change the
    picture for it). Fields that change nothing (the hires fields while enable_hr is
    false, save_images, comments, ...) pass."""
    if isinstance(body, Txt2ImgRequest):
        for name in ("firstphase_width", "firstphase_height"):
            if getattr(body, name):
                bad(name, "a first pass size (the old hires fix) is not available on the farm")
        if body.firstpass_image:
            bad("firstpass_image", "a given first pass image is not available on the farm")
    if body.restore_faces:
        bad("restore_faces", "face restoration is not available on the farm")
    if body.tiling:
        bad("tiling", "tiling (seamless textures) is not available on the farm")
    if body.styles:
        bad("styles", "the farm has no saved prompt styles; put their text in the prompt")
    if body.script_name:
        bad("script_name", "scripts are not available on the farm (for an X/Y/Z grid, "
            "POST a job with a sweep to /v1/jobs)")  # fmt: skip
    for name in body.alwayson_scripts or {}:
        bad(f"alwayson_scripts.{name}", "extension scripts are not available on the farm")
    if body.refiner_checkpoint not in (None, "", "None", "none"):
        bad("refiner_checkpoint", "a refiner pass is not available on the farm")
    if body.infotext:
        bad("infotext", "not read here: send its values as the request's fields")
    if m := _OTHER_NETWORK.search(body.prompt or ""):
        bad("prompt", f"extra networks but LoRA ({m.group(0)}) are not available on the farm")
    if m := _EXTRA_NETWORK.search(body.negative_prompt or ""):
        bad(
            "negative_prompt",
            f"extra networks ({m.group(0)}) in the negative prompt are not available on the "
            "farm (LoRA tags go in the prompt)",
        )
    # sampler settings, where the sampler uses them
    if body.s_min_uncond:
        bad("s_min_uncond", "negative guidance minimum sigma is not available; send 0")
    if sampler == "Euler a":
        for name in ("eta", "s_noise"):
            value = getattr(body, name)
            if value is not None and value != 1.0:
                bad(name, "Euler a renders with 1 on the farm (the A1111 default)")
    if sampler == "Euler" and body.s_churn:
        bad("s_churn", "Euler renders without churn on the farm; send 0")
    check_options(body.override_settings or {}, "override_settings.", bad)


def prompt_loras(prompt: str, bad: Callable[[str, str], None]) -> tuple[str, list[dict[str, Any]]]:
    """A1111's LoRA tags in a prompt: ``<lora:name>`` (weight 1), ``<lora:name:weight>``,
    also ``<lora:name:te:unet>`` and ``te=``/``unet=`` when both weights are the same (the
    farm merges one weight into both). The prompt without the tags, which is what the model
    reads in A1111, and the LoRAs in their order."""
    loras: list[dict[str, Any]] = []
    for m in _LORA_TAG.finditer(prompt):
        tag, items = m.group(0), m.group(1).split(":")
        positional = [i.strip() for i in items if "=" not in i]
        named = dict(i.split("=", 1) for i in items if "=" in i)
        name = positional[0] if positional else ""
        if set(named) - {"te", "unet"} or len(positional) > 3:
            bad("prompt", f"{tag}: only a name and a weight are available on the farm")
            continue
        try:
            te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
            unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
        except ValueError:
            bad("prompt", f"{tag}: the weight must be a number")
            continue
        if te != unet:
            bad("prompt", f"{tag}: one weight for both the text encoder and the UNet on the farm")
        elif any(lora["name"] == name for lora in loras):
            bad("prompt", f"{tag}: LoRA {name!r} is named twice; name it once")
        else:
            loras.append({"name": name, "weight": te})
    return _LORA_TAG.sub("", prompt), loras


def _base64(text: str, field: str, bad: Callable[[str, str], None]) -> bytes | None:
    """The bytes of a base64 picture (a data: URL too, as A1111 takes), or None with the
    problem reported."""
    text = text.strip()
    if text.lower().startswith(("http://", "https://")):
        bad(field, "the farm fetches no URLs: send the picture itself in base64")
        return None
    text = _DATA_URL.sub("", text, count=1)
    try:
        return base64.b64decode(text)
    except (binascii.Error, ValueError) as exc:
        bad(field, f"not base64: {exc}")
        return None


def init_picture(body: Img2ImgRequest, bad: Callable[[str, str], None]) -> tuple[str, bytes] | None:
    """The picture an img2img request starts from, as stored (``inputs.prepare``): its
    sha256 and PNG, or None with the problems reported. Several ``init_images`` are fine
    only when they are all the same picture (the farm starts every image from one)."""
    images = body.init_images or []
    if not images:
        bad("init_images", "give the picture to start from: a list of one base64 PNG, JPEG "
            "or WebP")  # fmt: skip
        return None
    if len(images) > MAX_INIT_IMAGES:
        bad("init_images", f"{len(images)} pictures; at most {MAX_INIT_IMAGES} (all the same)")
        return None
    found: dict[str, bytes] = {}
    seen: set[str] = set()
    ok = True
    for i, text in enumerate(images):
        if text in seen:
            continue
        seen.add(text)
        picture = _stored_picture(text, f"init_images[{i}]", bad)
        if picture is None:
            ok = False
            continue
        found.setdefault(*picture)
    if len(found) > 1:
        bad("init_images", f"{len(found)} different pictures; the farm renders a request from "
            "one picture (send one, or the same one each time)")  # fmt: skip
        return None
    if not ok or not found:
        return None
    return next(iter(found.items()))


def _stored_picture(
    text: Any, field: str, bad: Callable[[str, str], None], mask: bool = False
) -> tuple[str, bytes] | None:
    """A request's base64 picture (``field``) as stored (``inputs.prepare``; ``mask``: read
    as a mask): its sha256 and PNG, or None with the problem reported."""
    data = _base64(text, field, bad) if isinstance(text, str) else None
    if data is None:
        return None
    try:
        sha, png, _size = inputs.prepare(data, field, mask=mask)
    except FieldError as exc:
        bad(exc.field, exc.msg)
        return None
    return sha, png


def img2img_refusals(body: Img2ImgRequest, bad: Callable[[str, str], None]) -> None:
    """The img2img fields set to something the farm cannot render: another resize mode,
    a latent mask, an inpainting setting without a mask, a noise multiplier."""
    if body.resize_mode not in (None, 0):
        bad("resize_mode", "only 0 (Just resize: the picture stretched to width x height) is "
            "available on the farm")  # fmt: skip
    if body.latent_mask:
        bad("latent_mask", "a second mask for the latents is not available on the farm; send "
            "the mask alone")  # fmt: skip
    if not body.mask:
        for name, default in INPAINTING_DEFAULTS.items():
            value = getattr(body, name)
            if value is not None and value != default:
                bad(name, f"acts only with a mask: send a mask, or {json.dumps(default)} or "
                    "nothing")  # fmt: skip
    if body.initial_noise_multiplier not in (None, 1.0):
        bad("initial_noise_multiplier", "the farm renders with 1 (the A1111 default)")


def inpaint_fields(
    body: Img2ImgRequest, bad: Callable[[str, str], None]
) -> tuple[dict[str, Any], tuple[str, bytes]] | None:
    """An img2img request's mask as the job's ``inpaint`` (A1111's names and defaults:
    Only masked with padding 0 and "fill", as its API has them) and the mask as stored,
    or None without a mask or with the problems reported."""
    if not body.mask:
        return None
    mask = _stored_picture(body.mask, "mask", bad, mask=True)
    if mask is None:
        return None
    blur_x, blur_y = body.mask_blur_x, body.mask_blur_y
    if body.mask_blur is not None:  # A1111: mask_blur sets both
        blur_x = blur_y = body.mask_blur
    blur_x = 4 if blur_x is None else blur_x
    blur_y = 4 if blur_y is None else blur_y
    if blur_x != blur_y:
        bad("mask_blur_y", f"{blur_y}: the farm blurs a mask alike both ways; send it equal to "
            f"mask_blur_x ({blur_x}), or mask_blur")  # fmt: skip
    if body.mask_round is False:
        bad("mask_round", "false (a latent mask left unrounded) is not available on the farm; "
            "send true or nothing")  # fmt: skip
    fill = 0 if body.inpainting_fill is None else body.inpainting_fill
    if not (isinstance(fill, int) and 0 <= fill < len(MASKED_CONTENT)):
        bad("inpainting_fill", "must be 0 (fill), 1 (original), 2 (latent noise) or 3 "
            "(latent nothing)")  # fmt: skip
        fill = 1
    invert = 0 if body.inpainting_mask_invert is None else body.inpainting_mask_invert
    if invert not in (0, 1):
        bad("inpainting_mask_invert", "must be 0 (Inpaint masked) or 1 (Inpaint not masked)")
    fields = {
        "mask": mask[0],
        "mask_blur": blur_x,
        "masked_content": MASKED_CONTENT[fill],
        "invert_mask": invert == 1,
        "only_masked": body.inpaint_full_res is not False,
        "padding": body.inpaint_full_res_padding or 0,
    }
    return fields, mask


def _same_choice(value: str | None, same: str, *ours: str | None) -> bool:
    """An ``hr_`` choice that keeps the first pass's: none, A1111's "Use same ..." or the
    first pass's own value."""
    return value in (None, "", same) or any(v is not None and value == v for v in ours)


def hires_fields(
    farm: Farm, body: Txt2ImgRequest, entry: ModelEntry | None, sampler: str, schedule: str,
    bad: Callable[[str, str], None],
) -> dict[str, Any] | None:  # fmt: skip
    """A txt2img's hires fix as the job's ``hires`` (None without ``enable_hr``), with the
    ``hr_`` fields the farm cannot render reported: another checkpoint, sampler, schedule
    or prompt for the second pass, extra modules, a model other than SD1 or SDXL."""
    if not body.enable_hr:
        return None
    if entry is not None and entry.engine not in inputs.IMG2IMG_ENGINES:
        engines = " or ".join(inputs.IMG2IMG_ENGINES)
        bad("enable_hr", f"model {entry.name!r} ({entry.engine}) has no hires fix; it goes "
            f"with {engines} models")  # fmt: skip
    if body.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        try:
            same = resolve_model(farm.models, body.hr_checkpoint_name, "")
        except FieldError:
            same = None
        if entry is None or same is None or same.name != entry.name:
            bad("hr_checkpoint_name", "another checkpoint for the hires pass is not available "
                "on the farm; send null or the first pass's")  # fmt: skip
    hr_sampler = body.hr_sampler_name
    if not _same_choice(hr_sampler, "Use same sampler", sampler, body.sampler_name):
        if hr_sampler is None or _sampler(hr_sampler) != sampler:
            bad("hr_sampler_name", "another sampler for the hires pass is not available on "
                "the farm; send null")  # fmt: skip
    hr_schedule = body.hr_scheduler
    if not _same_choice(hr_schedule, "Use same scheduler", schedule, body.scheduler):
        if hr_schedule is None or _schedule(hr_schedule) != schedule:
            bad("hr_scheduler", "another schedule for the hires pass is not available on the "
                "farm; send null")  # fmt: skip
    if not _same_choice(body.hr_prompt, "", body.prompt):
        bad("hr_prompt", "another prompt for the hires pass is not available on the farm; "
            "send an empty one")  # fmt: skip
    if not _same_choice(body.hr_negative_prompt, "", body.negative_prompt):
        bad("hr_negative_prompt", "another negative prompt for the hires pass is not "
            "available on the farm; send an empty one")  # fmt: skip
    if any(m != "Use same choices" for m in body.hr_additional_modules or []):
        bad("hr_additional_modules", "extra modules for the hires pass are not available on "
            "the farm")  # fmt: skip
    upscaler = body.hr_upscaler or "Latent"  # A1111's latent_upscale_default_mode
    strength = body.denoising_strength
    return {
        "scale": 2.0 if body.hr_scale is None else body.hr_scale,
        "resize_x": body.hr_resize_x or 0,
        "resize_y": body.hr_resize_y or 0,
        "upscaler": upscaler,
        "steps": body.hr_second_pass_steps or 0,
        "denoising_strength": SDAPI_HIRES_STRENGTH if strength is None else strength,
    }


def hires_infotext(spec: JobSpec) -> dict[str, Any]:
    """A hires job's fields in A1111's ``extra_generation_params``, as its PNGs have them."""
    hr = spec.hires
    assert hr is not None
    out: dict[str, Any] = {}
    if hr.resize_x or hr.resize_y:
        out["Hires resize"] = f"{hr.resize_x}x{hr.resize_y}"
    else:
        out["Hires upscale"] = hr.scale
    if hr.steps:
        out["Hires steps"] = hr.steps
    out["Hires upscaler"] = hr.upscaler
    return out


def _hires_error(field: str, msg: str) -> tuple[str, str]:
    """A JobSpec error about ``hires`` with A1111's field names."""
    for ours, theirs in HIRES_NAMES.items():
        msg = msg.replace(f"hires.{ours}", theirs)
    if field == "hires":  # the size it comes out at
        field = "hr_resize_x" if "hr_resize" in msg else "hr_scale"
    else:
        field = HIRES_NAMES.get(field.removeprefix("hires."), "enable_hr")
    return field, msg


def seed_resize(body: SdapiRequest) -> dict[str, int]:
    """The job's seed resize: A1111 resizes the seed's noise when both sizes are above 0
    and ignores them otherwise."""
    w, h = body.seed_resize_from_w or 0, body.seed_resize_from_h or 0
    return {"seed_resize_from_w": w, "seed_resize_from_h": h} if w > 0 and h > 0 else {}


def to_spec(farm: Farm, body: SdapiRequest) -> tuple[JobSpec, ModelEntry]:
    """The farm job an A1111 txt2img or img2img request asks for, or Refused with every
    problem. An img2img request's picture is stored (``inputs``) once nothing is wrong."""
    problems: list[dict[str, str]] = []
    what = "img2img" if isinstance(body, Img2ImgRequest) else "txt2img"

    def bad(field: str, msg: str) -> None:
        if all(p["field"] != field for p in problems):
            problems.append({"field": field, "msg": msg})

    for key in body.model_extra or {}:
        bad(key, f"not a field of A1111's {what}, so what it would change is unknown; remove it")
    raw = body.model_dump(exclude=set(body.model_extra or {}))
    try:
        check_encodable(raw)
    except FieldError as exc:
        raise Refused([*problems, {"field": exc.field, "msg": exc.msg}]) from None
    if (where := _non_finite(raw, "")) is not None:
        bad(where.lstrip("."), "must be a finite number")
    sampler, schedule = sampler_and_schedule(body, bad)
    refusals(body, sampler, bad)
    batch = 1 if body.batch_size is None else body.batch_size
    n_iter = 1 if body.n_iter is None else body.n_iter
    for name, value in (("batch_size", batch), ("n_iter", n_iter)):
        if value < 1:
            bad(name, "must be at least 1")
    most = min(farm.config.sdapi_max_images, farm.config.max_images)
    count = max(1, batch) * max(1, n_iter)
    if count > most:
        count = 1  # reported here, not again by JobSpec
        bad(
            "n_iter" if n_iter > 1 else "batch_size",
            f"batch_size x n_iter = {batch * n_iter} images; at most {most} in one request "
            "(FARM_SDAPI_MAX_IMAGES); POST larger jobs to /v1/jobs",
        )
    overrides = body.override_settings or {}
    entry: ModelEntry | None = None
    try:
        entry = resolve_model(
            farm.models, overrides.get("sd_model_checkpoint"),
            farm.config.default_model,
        )  # fmt: skip
    except FieldError as exc:
        bad(exc.field, exc.msg)
    prompt, loras = prompt_loras(body.prompt or "", bad)
    if body.disable_extra_networks:
        loras = []  # A1111 takes the tags out of the prompt and applies none
    if loras and entry is not None and entry.engine not in LORA_ENGINES:
        bad("prompt", no_loras(entry))
    picture: tuple[str, bytes] | None = None
    masked: tuple[dict[str, Any], tuple[str, bytes]] | None = None
    img2img: dict[str, Any] = {}
    if isinstance(body, Img2ImgRequest):
        img2img_refusals(body, bad)
        picture = init_picture(body, bad)
        masked = inpaint_fields(body, bad)
        if entry is not None and entry.engine not in inputs.IMG2IMG_ENGINES:
            engines = " or ".join(inputs.IMG2IMG_ENGINES)
            bad(MODEL_FIELD, f"model {entry.name!r} ({entry.engine}) cannot start from a "
                f"picture; img2img goes with {engines} models")  # fmt: skip
        strength = body.denoising_strength
        img2img = {
            # a stand-in while the picture is refused, so that the rest is still checked
            "init_image": picture[0] if picture else "0" * 64,
            "denoising_strength": DEFAULT_DENOISING_STRENGTH if strength is None else strength,
            **({"inpaint": masked[0]} if masked else {}),
        }
    hires = None
    if isinstance(body, Txt2ImgRequest):
        hires = hires_fields(farm, body, entry, sampler, schedule, bad)
    fields = {
        "model": entry.name if entry else "synthetic",
        "prompt": prompt,
        "loras": loras,
        "negative_prompt": body.negative_prompt or "",
        "count": count,
        "seed": -1 if body.seed is None else body.seed,
        "subseed": -1 if body.subseed is None else body.subseed,
        "subseed_strength": body.subseed_strength or 0.0,
        **seed_resize(body),
        "width": 512 if body.width is None else body.width,
        "height": 512 if body.height is None else body.height,
        "steps": 50 if body.steps is None else body.steps,
        "clip_skip": _whole(overrides.get(CLIP_SKIP_OPTION)),
        "eta_noise_seed_delta": _whole(overrides.get(ENSD_OPTION), 0),
        "cfg_scale": cfg_scale(body, entry),
        "sampler_name": sampler,
        "scheduler": schedule,
        "batch_size": max(1, batch),
        "tags": [TAG],
        **img2img,
        **({"hires": hires} if hires is not None else {}),
    }
    spec: JobSpec | None = None
    try:
        spec = JobSpec(**fields)
    except ValidationError as exc:
        for e in format_errors(exc.errors()):
            if m := _LORA_FIELD.match(e["field"]):  # a tag of the prompt
                what = f" {m['what']}" if m["what"] else ""
                bad("prompt", f"LoRA {loras[int(m['i'])]['name']!r}:{what} {e['msg']}")
            elif e["field"] == "loras":
                bad("prompt", f"LoRA tags: {e['msg']}")
            elif e["field"].startswith("hires"):
                bad(*_hires_error(e["field"], e["msg"]))
            elif e["field"].startswith("inpaint."):
                field = INPAINT_FIELDS.get(e["field"], "mask")
                if field == "mask_blur_x" and getattr(body, "mask_blur", None) is not None:
                    field = "mask_blur"  # the one sent, which sets both
                bad(field, e["msg"])
            else:
                field = FIELDS_FROM_SPEC.get(e["field"], e["field"])
                bad(field, e["msg"])
    if spec is not None and not problems:
        try:
            farm.check_loras(spec)
        except FieldError as exc:
            bad("prompt", exc.msg)
        try:
            farm.check_families(spec)
        except FieldError as exc:
            bad(FIELDS_FROM_SPEC.get(exc.field, exc.field), exc.msg)
        spec = farm.with_embeddings(spec)  # those its prompts name (no field to refuse)
    if problems or spec is None or entry is None:
        raise Refused(problems or [{"field": "body", "msg": f"not a valid {what} request"}])
    if picture is not None:
        inputs.put_input(farm.store(), *picture)
    if masked is not None:
        inputs.put_input(farm.store(), *masked[1])
    return spec, entry


def _state(farm: Farm, job_id: str) -> str | None:
    raw = farm.redis.hget(farm.ledger.job_key(job_id), "state")
    return raw.decode() if isinstance(raw, bytes) else raw


async def wait_end(farm: Farm, job_id: str, timeout: float, request: Request) -> str:
    """Wait until the job ends ('ended'), ``timeout`` seconds pass ('timeout') or the
    client goes away ('gone'), holding no thread between two looks at the job's state.
    A Redis that does not answer is asked again until the time is up."""
    deadline = time.monotonic() + timeout
    pause = FIRST_POLL_S
    while True:
        await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        pause = min(pause * 1.5, LAST_POLL_S)
        try:
            state = await run_in_threadpool(_state, farm, job_id)
        except redis.RedisError:
            if time.monotonic() >= deadline:
                raise
            state = ""
        if state is None or state in TERMINAL:
            return "ended"
        if await request.is_disconnected():
            return "gone"
        if time.monotonic() >= deadline:
            return "timeout"


def read_images(farm: Farm, job: JobRecord, indices: Sequence[int]) -> list[bytes]:
    """The job's PNGs of ``indices`` from the store, in that order."""
    plan = Plan(job.spec, job.extra.get("batch_size"))
    prefix = job.spec.output_prefix or farm.config.output_prefix
    store = farm.store()
    out = []
    for index in indices:
        key = image_key(prefix, job.id, index, plan.image(index).seed)
        try:
            out.append(store.get_bytes(key))
        except storage.StorageError as exc:
            raise HTTPException(503, f"object storage is unavailable: {exc}") from None
    return out


def answer(
    body: SdapiRequest, job: JobRecord, entry: ModelEntry, indices: Sequence[int], pngs: list[bytes]
) -> Response:
    """A1111's TextToImageResponse (or ImageToImageResponse) for a job that is done, or
    was interrupted with the images of ``indices`` done."""
    spec, n = job.spec, len(pngs)
    plan = Plan(spec, job.extra.get("batch_size"))
    params = [plan.image(i) for i in indices]
    seeds = [p.seed for p in params]
    if spec.varies():
        subseeds = [p.subseed for p in params]
    else:  # the request's, echoed as before: it changed nothing
        subseed = -1 if body.subseed is None else body.subseed
        subseeds = [subseed + i if subseed >= 0 else -1 for i in indices]
    prompt = body.prompt or ""  # with its LoRA tags, as A1111 answers it
    info = {
        "prompt": prompt,
        "all_prompts": [prompt] * n,
        "negative_prompt": spec.negative_prompt,
        "all_negative_prompts": [spec.negative_prompt] * n,
        "seed": seeds[0] if seeds else spec.seed,
        "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else -1,
        "all_subseeds": subseeds,
        "subseed_strength": spec.subseed_strength,
        "width": spec.width,
        "height": spec.height,
        "sampler_name": spec.sampler_name,
        "scheduler": spec.scheduler,
        "cfg_scale": spec.cfg_scale,
        "steps": spec.steps,
        "batch_size": body.batch_size or 1,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": entry.name,
        "sd_model_hash": entry.sha256[:10] or None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": spec.seed_resize_from_w or -1,
        "seed_resize_from_h": spec.seed_resize_from_h or -1,
        "denoising_strength": (
            spec.denoising_strength
            if spec.init_image
            else spec.hires.denoising_strength
            if spec.hires
            else body.denoising_strength
        ),
        "extra_generation_params": {
            "Schedule type": spec.scheduler,
            **({"Denoising strength": spec.denoising_strength} if spec.init_image else {}),
            **(hires_infotext(spec) if spec.hires else {}),
        },
        "index_of_first_image": 0,
        "infotexts": [read_parameters(png) or "" for png in pngs],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)),
        "clip_skip": spec.clip_skip,
        "is_using_inpainting_conditioning": False,
        "job_id": job.id,
    }
    images = (
        [base64.b64encode(png).decode("ascii") for png in pngs]
        if body.send_images is not False
        else []
    )
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters.update(init_images=None, mask=None)  # as A1111 echoes them
    content = {"images": images, "parameters": parameters, "info": json.dumps(info)}
    return SafeJSONResponse(content, headers={"X-Farm-Job": job.id})


def interrupted_key(farm: Farm, job_id: str) -> str:
    """Set while an interrupted job's request answers (``POST /sdapi/v1/interrupt``)."""
    return farm.ledger.key("sdapi", "interrupted", job_id)


def ended(farm: Farm, body: SdapiRequest, job_id: str, entry: ModelEntry) -> Response:
    """The answer for a job that has ended: its images, or why there are none."""
    try:
        job = farm.ledger.get(job_id)
    except JobNotFound:
        raise HTTPException(502, f"job {job_id} vanished while it was awaited") from None
    where = {"X-Farm-Job": job.id}
    if job.state == "done":
        indices = range(job.total)
        return answer(body, job, entry, indices, read_images(farm, job, indices))
    if job.state == "cancelled" and farm.redis.exists(interrupted_key(farm, job.id)):
        # A1111 answers an interrupted request with the images it had finished
        indices = farm.ledger.done_indices(job.id, 0, job.total)
        return answer(body, job, entry, indices, read_images(farm, job, indices))
    if job.state == "failed":
        last = farm.ledger.errors(job.id, limit=1)
        why = (
            f"; last error ({last[0]['stage']} on worker {last[0]['worker']}): {last[0]['error']}"
            if last
            else ""
        )
        raise HTTPException(
            502,
            f"job {job.id} failed: {job.failed} of {job.total} images failed, {job.done} done"
            f"{why}. Its failures: /v1/jobs/{job.id}/errors",
            headers=where,
        )
    raise HTTPException(
        409,
        f"job {job.id} was {job.state} with {job.done} of {job.total} images done; "
        f"those are listed at /v1/jobs/{job.id}/images",
        headers=where,
    )


RESPONSES: dict[int | str, dict[str, Any]] = {
    **BODY_ERRORS,
    422: {
        "model": ErrorBody,
        "description": "a field is not valid or not available; detail names it",
    },
    409: {"model": ErrorBody, "description": "the job was cancelled while awaited"},
    502: {"model": ErrorBody, "description": "the job failed; detail says why"},
    503: {"model": ErrorBody, "description": "no worker is running, or Redis or storage is away"},
    504: {"model": ErrorBody, "description": "the job did not end in time and was cancelled"},
}


def router(farm: Farm) -> APIRouter:
    """The ``/sdapi/v1`` endpoints over ``farm``."""
    config = farm.config
    api = APIRouter(prefix="/sdapi/v1", tags=["A1111-compatible"])
    current_key = farm.ledger.key("sdapi", "current")  # the newest txt2img job

    @api.post(
        "/txt2img",
        response_model=TextToImageResponse,
        responses=RESPONSES,
        summary="Render like A1111's txt2img: submit a job, wait for it, answer its PNGs",
    )
    async def txt2img(request: Request, body: Txt2ImgRequest) -> Response:
        return await render(request, body)

    @api.post(
        "/img2img",
        response_model=ImageToImageResponse,
        responses=RESPONSES,
        summary="Render like A1111's img2img: every image starts from init_images[0]",
    )
    async def img2img(request: Request, body: Img2ImgRequest) -> Response:
        return await render(request, body)

    async def render(request: Request, body: SdapiRequest) -> Response:
        """Submit the request's job, wait for it, answer its PNGs (txt2img and img2img)."""
        try:
            spec, entry = await run_in_threadpool(to_spec, farm, body)
        except Refused as exc:
            return validation_response(exc.problems)
        if not await run_in_threadpool(farm.workers.live):
            raise HTTPException(
                503,
                "no worker is running on the farm (none has a heartbeat), so the images "
                "would never come; start one with `farm worker`",
            )
        job = await run_in_threadpool(farm.ledger.create, spec, config.default_batch_size)
        ttl = max(1, math.ceil(config.sdapi_timeout) + 60)
        await run_in_threadpool(farm.redis.set, current_key, job.id, ex=ttl)
        outcome = await wait_end(farm, job.id, config.sdapi_timeout, request)
        if outcome != "ended":
            res = await run_in_threadpool(farm.ledger.cancel, job.id)
            if outcome == "gone":  # nobody is left to answer
                return Response(status_code=499)
            if res in ("ok", "cancelled"):
                now = await run_in_threadpool(farm.ledger.get, job.id)
                raise HTTPException(
                    504,
                    f"job {job.id} did not end within {config.sdapi_timeout:g} s "
                    f"(FARM_SDAPI_TIMEOUT) and was cancelled with {now.done} of {now.total} "
                    f"images done; follow it at /v1/jobs/{job.id} (its images: "
                    f"/v1/jobs/{job.id}/images)",
                    headers={"X-Farm-Job": job.id},
                )
        return await run_in_threadpool(ended, farm, body, job.id, entry)

    @api.post(
        "/interrupt",
        response_model=dict[str, Any],
        responses=ERRORS,
        summary="Stop the newest txt2img or img2img job: its request answers the images "
        "finished so far",
    )
    def interrupt() -> Response:
        # as A1111's: one stop for the farm's A1111 clients, the job /progress follows
        raw = farm.redis.get(current_key)
        if raw:
            job_id = raw.decode() if isinstance(raw, bytes) else raw
            ttl = max(1, math.ceil(config.sdapi_timeout) + 60)
            farm.redis.set(interrupted_key(farm, job_id), 1, ex=ttl)  # before it ends
            farm.ledger.cancel(job_id)
        return SafeJSONResponse({})

    @api.get(
        "/sd-models",
        response_model=list[SDModelItem],
        responses=ERRORS,
        summary="The registered models",
    )
    def sd_models() -> Response:
        return SafeJSONResponse(
            [
                {
                    "title": title(e),
                    "model_name": e.name,
                    "hash": e.sha256[:10] or None,
                    "sha256": e.sha256 or None,
                    "filename": e.key or e.name,
                    "config": None,
                }
                for e in farm.models.checkpoints()
            ]
        )

    @api.get(
        "/loras",
        response_model=list[LoraItem],
        responses=ERRORS,
        summary="The registered LoRAs, for <lora:name:weight> in a prompt",
    )
    def loras() -> Response:
        return SafeJSONResponse(
            [
                {"name": e.name, "alias": e.name, "path": e.key or e.name, "metadata": {}}
                for e in farm.models.loras()
            ]
        )

    @api.get(
        "/embeddings",
        response_model=EmbeddingsList,
        responses=ERRORS,
        summary="The registered textual-inversion embeddings, used by their names in a prompt",
    )
    def embeddings() -> Response:
        # A1111 lists the embeddings that fit its one loaded model as loaded, the others as
        # skipped; a farm has a model per job and uses those that fit it, so all are listed
        return SafeJSONResponse(
            {
                "loaded": {
                    e.name: {
                        "step": None,
                        "sd_checkpoint": None,
                        "sd_checkpoint_name": None,
                        "shape": EMBEDDING_SHAPES.get(e.family, 0),
                        "vectors": e.vectors,
                    }
                    for e in farm.models.embeddings()
                },
                "skipped": {},
            }
        )

    @api.get(
        "/samplers",
        response_model=list[SamplerItem],
        responses=ERRORS,
        summary="The engine's samplers",
    )
    def samplers() -> Response:
        return SafeJSONResponse(
            [
                {
                    "name": s,
                    "aliases": list(SAMPLER_ALIASES.get(s, ())),
                    "options": {"scheduler": DEFAULT_SCHEDULE[s].lower()},
                }
                for s in SAMPLERS
            ]
        )

    @api.get(
        "/schedulers",
        response_model=list[SchedulerItem],
        responses=ERRORS,
        summary="The engine's schedules",
    )
    def schedulers() -> Response:
        out = []
        for label in SCHEDULES:
            rho, inner = SCHEDULE_TRAITS.get(label, (-1.0, False))
            name = label.lower().replace(" ", "_")
            out.append(
                {"name": name, "label": label, "aliases": None, "default_rho": rho,
                 "need_inner_model": inner}
            )  # fmt: skip
        return SafeJSONResponse(out)

    @api.get(
        "/options",
        response_model=dict[str, Any],
        responses=ERRORS,
        summary="The settings txt2img uses",
    )
    def get_options() -> Response:
        entry = farm.models.get(config.default_model)
        return SafeJSONResponse(
            {
                "sd_model_checkpoint": title(entry) if entry else config.default_model,
                "sd_checkpoint_hash": (entry.sha256 or None) if entry else None,
                **{k: v[0] for k, v in FARM_OPTIONS.items()},
            }
        )

    @api.post(
        "/options",
        responses={**BODY_ERRORS, 422: RESPONSES[422]},
        summary="Accepts the settings the farm renders with; refuses changes",
    )
    def set_options(options: Annotated[dict[str, Any], Body()]) -> Response:
        # The default model is the operator's (FARM_DEFAULT_MODEL): on a farm shared by
        # many clients, one client's POST would switch everybody's renders. A request
        # picks its model with override_settings.sd_model_checkpoint instead.
        check_encodable(options)
        problems: list[dict[str, str]] = []

        def bad(field: str, msg: str) -> None:
            problems.append({"field": field, "msg": msg})

        asked = options.get("sd_model_checkpoint")
        if asked not in (None, ""):
            try:
                entry = resolve_model(farm.models, asked, config.default_model)
            except FieldError as exc:
                bad("sd_model_checkpoint", exc.msg)
            else:
                if entry.name != config.default_model:
                    bad(
                        "sd_model_checkpoint",
                        f"the default model is {config.default_model!r} (FARM_DEFAULT_MODEL), "
                        "the same for every client of the farm; pick a model per request "
                        "with override_settings.sd_model_checkpoint",
                    )
        check_options(options, "", bad)
        if problems:
            return validation_response(problems)
        return SafeJSONResponse(None)

    @api.get(
        "/progress",
        response_model=ProgressResponse,
        responses=ERRORS,
        summary="The newest txt2img job",
    )
    def progress(skip_current_image: bool = False) -> Response:
        raw = farm.redis.get(current_key)
        job: JobRecord | None = None
        if raw:
            try:
                job = farm.ledger.get(raw.decode() if isinstance(raw, bytes) else raw)
            except JobNotFound:
                job = None
        idle = {"skipped": False, "interrupted": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                "sampling_steps": 0}  # fmt: skip
        if job is None or job.state in TERMINAL:
            body = {"progress": 0.0, "eta_relative": 0.0, "state": idle, "textinfo": None}
            return SafeJSONResponse({**body, "current_image": None})
        finished = job.done + job.failed
        state = {
            **idle,
            "job": f"job {job.id}",
            "job_count": job.total,
            "job_no": finished,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)),
            "sampling_steps": job.spec.steps,
        }
        return SafeJSONResponse(
            {
                "progress": finished / job.total if job.total else 0.0,
                "eta_relative": job.eta() or 0.0,
                "state": state,
                "current_image": None,
                "textinfo": f"job {job.id}: {finished} of {job.total} images, {job.state}",
            }
        )

    # what A1111 clients read at start: the farm has none of these, and says so
    for path, empty, what in (
        ("/sd-vae", [], "separate VAEs: each checkpoint renders with its own"),
        ("/hypernetworks", [], "hypernetworks (not supported)"),
    ):
        api.add_api_route(
            path,
            _constant(empty),
            methods=["GET"],
            response_model=type(empty),
            summary=f"None: {what}",
        )
    # the upscalers the hires fix takes: A1111 lists pixel ones and latent modes apart
    upscalers = [
        {"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
        for n in HIRES_PIXEL_UPSCALERS
    ]
    for path, listed, what in (
        ("/upscalers", upscalers, "The pixel upscalers the hires fix takes (no ESRGAN)"),
        ("/latent-upscale-modes", [{"name": n} for n in HIRES_LATENT_MODES],
         "The latent upscale modes the hires fix takes"),
    ):  # fmt: skip
        api.add_api_route(
            path, _constant(listed), methods=["GET"], response_model=list[dict], summary=what
        )
    for path in (
        "/refresh-checkpoints",
        "/refresh-loras",
        "/refresh-vae",
        "/refresh-embeddings",
    ):
        api.add_api_route(
            path,
            _constant(None),
            methods=["POST"],
            summary="Nothing to do: the registry is read at every request",
        )

    @api.post(
        "/png-info",
        response_model=PngInfoResponse,
        responses={**BODY_ERRORS, 422: RESPONSES[422]},
        summary="The generation parameters a picture carries",
    )
    def png_info(body: PngInfoRequest) -> Response:
        problems: list[dict[str, str]] = []

        def bad(field: str, msg: str) -> None:
            problems.append({"field": field, "msg": msg})

        data = _base64(body.image, "image", bad)
        if data is None:
            return validation_response(problems)
        try:
            with Image.open(io.BytesIO(data)) as im:
                chunks = {k: v for k, v in im.info.items() if isinstance(v, str)}
        except Exception as exc:  # whatever Pillow cannot read is the client's to fix
            return validation_response([{"field": "image", "msg": f"not a picture: {exc}"}])
        info = chunks.pop("parameters", "")
        return SafeJSONResponse(
            {"info": info, "items": chunks, "parameters": infotext_fields(info) if info else {}}
        )

    return api


def _constant(value: Any) -> Callable[[], Response]:
    """An endpoint that answers ``value``."""

    def endpoint() -> Response:
        return SafeJSONResponse(value)

    return endpoint
